"""gpubake-job: run one training job on a gpubake instance, then always shut it down.

Standard library only (it runs on the OS's python3, 3.10 and newer, whatever the training
environment holds). At boot (`gpubake-job boot`, from gpubake-job.service) it looks for a job
spec in the instance metadata (GCE attribute `gpubake-job`, EC2 user-data that is a JSON
object with "gpubake_job"); without one it does nothing. With one it:

- mounts the dataset disk read-only, fetches the code (a tarball or folder in a bucket, or a
  git URL at a commit), restores earlier checkpoints from the results location;
- runs the command as a non-root user in its own process group, with the Python environment
  and CUDA on PATH, its output to journald (field GPUBAKE_JOB_ID) and to <results>/logs/;
- syncs $GPUBAKE_CKPT_DIR and $GPUBAKE_RESULTS_DIR to the results location every
  sync_interval, the checkpoints also as soon as a new one settles (checkpoint_poll), and at
  the end (local writes, then a sync: never checkpoints through gcsfuse), all through one
  `gpubake-sync serve` process that stays loaded (no cloud SDK import in the window);
- watches for preemption (GCE: long-polls of instance/preempted and instance/maintenance-event;
  EC2: IMDSv2 spot/instance-action every 5 s, rebalance hints), and on a notice signals the
  job's process group, touches $GPUBAKE_PREEMPT_FILE and makes a final sync that ends inside
  the window: the newest checkpoint first, no file started too late to finish, power-off on
  time; _PREEMPTED names the newest checkpoint that is complete in the results location;
- writes _SUCCESS, _FAILED or _PREEMPTED, then powers off (or stays up for a while if the
  spec says so). The unit's ExecStopPost (`gpubake-job backstop`) powers off a machine whose
  runner died; a transient systemd timer powers off one whose runner hung past max_run_time.

`gpubake-job local SPEC` runs a spec on this machine without mounting or powering off, to
try a job before paying for it. Test hooks (documented, as google-auth and botocore have
theirs): GCE_METADATA_HOST, AWS_EC2_METADATA_SERVICE_ENDPOINT, GPUBAKE_CLOUD (gce, ec2, none),
GPUBAKE_POWEROFF_COMMAND, GPUBAKE_EC2_POLL_SECONDS, GPUBAKE_DEADLINE_SLACK_SECONDS,
GPUBAKE_JOB_CONFIG.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pwd
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CONFIG_FILE = Path("/etc/gpubake/job-runner.json")
STATE_DIR = Path("/run/gpubake-job")  # tmpfs: a reboot forgets a finished job
SPEC_VERSION = 1
GCE_ATTRIBUTE = "gpubake-job"
DEADLINE_UNIT = "gpubake-job-deadline"
STAY_UNIT = "gpubake-job-stay"
# Seconds from a preemption notice to the hard stop, when the notice does not say.
WINDOWS = {"gce": 30.0, "ec2": 120.0}
# Seconds kept back from the window for the final sync, the marker and the power-off.
SYNC_RESERVE = {"gce": 12.0, "ec2": 40.0}
# Seconds at the end of the window for _PREEMPTED (with a fresh client if the sync process had
# to be killed) and the power-off: the final sync's uploads end before.
END_RESERVE = 4.0
# A periodic sync runs to its end, however long a large checkpoint takes (killing it at the next
# interval would start it over, forever); this only bounds a hung one. A notice cuts it short.
PERIODIC_SYNC_TIMEOUT = 3600.0
# A sync that sent at least this much measures the upload rate the final sync plans with (a file
# it could not send by the window's end is not started: the time goes to those that can).
RATE_MIN_BYTES = 32 << 20
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
# checkpoint_dir is given to the job's user: never under these
SYSTEM_DIRS = {
    "",
    "bin",
    "boot",
    "dev",
    "etc",
    "lib",
    "lib32",
    "lib64",
    "opt",
    "proc",
    "root",
    "run",
    "sbin",
    "srv",
    "sys",
    "usr",
    "var",
}
_DURATION = re.compile(r"^(\d+)\s*([smh]?)$")
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_PARAM_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BUCKET_URL = re.compile(r"^(gs|s3)://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/.*)?$")
_GIT_URL = re.compile(r"^(https://|ssh://|git@|file://).+")
_COMMIT = re.compile(r"^[0-9a-fA-F]{7,40}$|^[A-Za-z0-9._/-]+$")

DEFAULT_CONFIG: dict[str, Any] = {
    "user": "gpubake",
    "env_prefix": "/opt/gpubake/env",
    "sync": [sys.executable, str(Path(__file__).resolve().with_name("gpubake_sync.py"))],
    "poweroff": ["systemctl", "poweroff"],
    "work_root": "/var/lib/gpubake-job",
}


class SpecError(ValueError):
    """A job spec that cannot run: the message is one line naming the field and the fix."""


class StepError(RuntimeError):
    """A step of the job failed (code fetch, mount, sync): one line for _FAILED and the log."""


# ---------------------------------------------------------------------------- the job spec

FIELDS = {
    "gpubake_job": "spec format version (1)",
    "id": "job id, [a-z0-9-], up to 63 characters",
    "command": "the command: a list of arguments, or one string run by bash",
    "code": "where the code comes from: {url: gs://|s3:// tarball or folder, or a git URL "
    "with commit}",
    "dataset": "{device, mount (/mnt/dataset), read_only (true), format (false: with "
    "read_only false, a blank disk is made ext4 and given to the job's user)}",
    "results": "gs://BUCKET/PREFIX or s3://BUCKET/PREFIX",
    "checkpoint_dir": "local directory for checkpoints ($GPUBAKE_CKPT_DIR)",
    "sync_interval": "seconds (or 30s, 5m, 1h) between syncs, at least 10",
    "checkpoint_poll": "seconds between looks for a new checkpoint to sync at once (0: off)",
    "preempt_signal": "SIGINT (default) or SIGTERM",
    "grace_period": "seconds the job gets to stop after the signal",
    "env": "environment variables for the command",
    "params": "a sweep's values {name: value}, seen by the command as $GPUBAKE_PARAM_<NAME>",
    "max_run_time": "hard deadline: the job is stopped and the machine powered off after it",
    "on_end": "poweroff (default) or stay",
    "stay_minutes": "with on_end stay: minutes before the machine powers off anyway",
    "user": "the non-root user the command runs as",
}


def _duration(field: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and _DURATION.match(value.strip()):
        number, unit = _DURATION.match(value.strip()).groups()  # type: ignore[union-attr]
        seconds = int(number) * {"": 1, "s": 1, "m": 60, "h": 3600}[unit]
    else:
        raise SpecError(f"{field} {value!r} is not a duration: write seconds or e.g. '5m', '2h'")
    if seconds < minimum:
        raise SpecError(f"{field} {value!r} is shorter than {minimum} s")
    return seconds


def _bucket_url(field: str, value: Any) -> str:
    if not isinstance(value, str) or not _BUCKET_URL.match(value):
        raise SpecError(
            f"{field} {value!r} is not a bucket URL: write gs://BUCKET/PREFIX or s3://BUCKET/PREFIX"
        )
    return value.rstrip("/")


def parse_spec(text: str, *, now: datetime.datetime | None = None) -> dict[str, Any]:
    """The checked spec with every default filled in; SpecError (one line) otherwise."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"the job spec is not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(raw, dict):
        raise SpecError('the job spec is not a JSON object: write {"gpubake_job": 1, ...}')
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise SpecError(
            f"unknown field {unknown[0]!r} in the job spec: the fields are {', '.join(FIELDS)}"
        )
    if raw.get("gpubake_job") != SPEC_VERSION:
        raise SpecError(f"gpubake_job must be {SPEC_VERSION} (the spec format version)")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    spec: dict[str, Any] = {"gpubake_job": SPEC_VERSION}
    spec["id"] = raw.get("id") or now.strftime("job-%Y%m%d-%H%M%S")
    if not isinstance(spec["id"], str) or not _ID.match(spec["id"]):
        raise SpecError(f"id {spec['id']!r} is not a job id: use a-z, 0-9 and '-', up to 63")
    command = raw.get("command")
    if isinstance(command, str) and command.strip():
        spec["command"] = command
    elif (
        isinstance(command, list)
        and command
        and all(isinstance(a, str) for a in command)
        and command[0]
    ):
        spec["command"] = list(command)
    else:
        raise SpecError(
            "command is missing or empty: give a list of arguments or one shell string, "
            'e.g. "command": ["python", "train.py"]'
        )
    if "results" not in raw:
        raise SpecError("results is missing: give gs://BUCKET/PREFIX or s3://BUCKET/PREFIX")
    spec["results"] = _bucket_url("results", raw["results"])
    spec["code"] = _code(raw.get("code"))
    spec["dataset"] = _dataset(raw.get("dataset"))
    value = raw.get("checkpoint_dir")
    if value is not None:
        if not isinstance(value, str) or not value.startswith("/"):
            raise SpecError(f"checkpoint_dir {value!r} is not an absolute path")
        top = Path(value).parts[1] if len(Path(value).parts) > 1 else ""
        if top in SYSTEM_DIRS or ".." in Path(value).parts:
            raise SpecError(
                f"checkpoint_dir {value!r} is a system directory: use e.g. /mnt/checkpoints "
                "or leave it out (the job's own folder)"
            )
    spec["checkpoint_dir"] = value
    spec["sync_interval"] = _duration("sync_interval", raw.get("sync_interval", 300), 10)
    spec["checkpoint_poll"] = _duration("checkpoint_poll", raw.get("checkpoint_poll", 5))
    preempt = raw.get("preempt_signal", "SIGINT")
    if preempt not in SIGNALS:
        raise SpecError(f"preempt_signal {preempt!r} is not SIGINT or SIGTERM")
    spec["preempt_signal"] = preempt
    spec["grace_period"] = _duration("grace_period", raw.get("grace_period", 20))
    spec["max_run_time"] = (
        _duration("max_run_time", raw["max_run_time"], 1)
        if raw.get("max_run_time") is not None
        else None
    )
    env = raw.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and _ENV_NAME.match(k) and isinstance(v, str) for k, v in env.items()
    ):
        raise SpecError('env must map variable names to strings, e.g. {"EPOCHS": "3"}')
    reserved = sorted(k for k in env if k.startswith("GPUBAKE_"))
    if reserved:
        raise SpecError(f"env {reserved[0]} is reserved: gpubake-job sets the GPUBAKE_ variables")
    spec["env"] = dict(env)
    params = raw.get("params", {})
    if not isinstance(params, dict) or not all(
        isinstance(k, str) and _PARAM_NAME.match(k) and isinstance(v, str)
        for k, v in params.items()
    ):
        raise SpecError('params must map names (a-z, 0-9, _) to strings, e.g. {"lr": "1e-3"}')
    spec["params"] = dict(params)
    on_end = raw.get("on_end", "poweroff")
    if on_end not in ("poweroff", "stay"):
        raise SpecError(f"on_end {on_end!r} is not poweroff or stay")
    spec["on_end"] = on_end
    spec["stay_minutes"] = _duration("stay_minutes", raw.get("stay_minutes", 60), 1)
    user = raw.get("user")
    if user is not None and (not isinstance(user, str) or user == "root" or not user):
        raise SpecError(f"user {user!r} cannot run the job: name a non-root user")
    spec["user"] = user
    return spec


def _code(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = {"url": value}
    if not isinstance(value, dict) or set(value) - {"url", "commit"} or "url" not in value:
        raise SpecError('code must be {"url": ..., "commit": ...} (commit for git URLs only)')
    url, commit = value["url"], value.get("commit")
    if isinstance(url, str) and _BUCKET_URL.match(url):
        if commit is not None:
            raise SpecError("code.commit is for git URLs: a bucket URL names the code itself")
        return {"url": url}
    if isinstance(url, str) and _GIT_URL.match(url):
        if not isinstance(commit, str) or not _COMMIT.match(commit):
            raise SpecError(f"code.commit is missing for git URL {url}: pin the commit to run")
        return {"url": url, "commit": commit}
    raise SpecError(
        f"code.url {url!r} is neither a bucket URL (gs://, s3://) nor a git URL (https://, ssh://)"
    )


def _dataset(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or "device" not in value:
        raise SpecError('dataset must be {"device": NAME_OR_PATH, "mount": "/mnt/dataset"}')
    extra = sorted(set(value) - {"device", "mount", "read_only", "format"})
    if extra:
        raise SpecError(f"unknown field dataset.{extra[0]}: use device, mount, read_only, format")
    device, mount = value["device"], value.get("mount", "/mnt/dataset")
    if not isinstance(device, str) or not device:
        raise SpecError("dataset.device is empty: name the attached disk or give its path")
    if not isinstance(mount, str) or not mount.startswith("/") or mount == "/":
        raise SpecError(f"dataset.mount {mount!r} is not an absolute directory")
    read_only = value.get("read_only", True)
    if not isinstance(read_only, bool):
        raise SpecError("dataset.read_only must be true or false")
    fmt = value.get("format", False)
    if not isinstance(fmt, bool):
        raise SpecError("dataset.format must be true or false")
    if fmt and read_only:
        raise SpecError("dataset.format needs read_only false: a disk to fill is written")
    return {"device": device, "mount": mount, "read_only": read_only, "format": fmt}


def tool(argv: list[str], timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """A system tool on the way to power-off (findmnt, blkid, mount, umount, systemctl,
    systemd-run), bounded: a hung one (a stuck NFS or disk, a busy systemd) gives exit 124 and
    says so instead of holding the machine up. GPUBAKE_TOOL_TIMEOUT: its seconds (30)."""
    if timeout is None:
        timeout = float(os.environ.get("GPUBAKE_TOOL_TIMEOUT", "30"))
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(
            argv, 124, "", f"{argv[0]} hung: gave up after {timeout:g} s"
        )
    except OSError as exc:
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: {exc.strerror or exc}")


def ec2_nvme_volume(
    device: str, by_id: Path = Path("/dev/disk/by-id"), root: str | None = None
) -> str | None:
    """On Nitro instances an EBS volume mapped as /dev/sdf is an NVMe disk; the /dev/sdf link
    exists only where Amazon's udev rules are installed. Without it: the one EBS volume that
    is not the root disk (a job gets exactly one, its dataset), else None."""
    if root is None:
        proc = tool(["findmnt", "-n", "-o", "SOURCE", "/"])
        root = os.path.realpath(proc.stdout.strip()) if proc.returncode == 0 else ""
    candidates = []
    for link in sorted(by_id.glob("nvme-Amazon_Elastic_Block_Store_*")):
        if "-part" in link.name:
            continue
        target = os.path.realpath(link)
        if root and (root == target or root.startswith(target + "p")):
            continue  # the root disk or one of its partitions
        if target not in candidates:
            candidates.append(target)
    return candidates[0] if len(candidates) == 1 else None


# ------------------------------------------------------------------------ clouds, metadata


def detect_cloud() -> str:
    """gce, ec2 or none: GPUBAKE_CLOUD, then the metadata overrides, then DMI."""
    forced = os.environ.get("GPUBAKE_CLOUD", "").strip().lower()
    if forced in ("gce", "ec2", "none"):
        return forced
    if os.environ.get("GCE_METADATA_HOST"):
        return "gce"
    if os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT"):
        return "ec2"
    for path, prefix, cloud in (
        ("/sys/class/dmi/id/product_name", "Google", "gce"),
        ("/sys/devices/virtual/dmi/id/board_asset_tag", "i-", "ec2"),  # Nitro
        ("/sys/class/dmi/id/sys_vendor", "Amazon EC2", "ec2"),
        ("/sys/hypervisor/uuid", "ec2", "ec2"),  # Xen (p3, ...)
    ):
        with contextlib.suppress(OSError):
            if Path(path).read_text(encoding="utf-8").strip().startswith(prefix):
                return cloud
    return "none"


def _gce_base() -> str:
    host = os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")
    return f"http://{host}/computeMetadata/v1/"


def _ec2_base() -> str:
    return os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254").rstrip("/")


def _http(
    method: str, url: str, headers: dict[str, str], timeout: float
) -> tuple[int, str, dict[str, str]]:
    """(status, body, headers); a 4xx/5xx is a status, not an exception."""
    request = urllib.request.Request(url, method=method, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return (
                response.status,
                response.read().decode("utf-8", "replace"),
                dict(response.headers),
            )
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace"), dict(err.headers or {})


def gce_get(path: str, *, etag: str = "", wait: int = 0) -> tuple[int, str, str]:
    """GET a GCE metadata path: (status, value, ETag); `wait` long-polls for a change."""
    url = _gce_base() + path
    if wait:
        url += f"?wait_for_change=true&timeout_sec={wait}" + (f"&last_etag={etag}" if etag else "")
    status, body, headers = _http(
        "GET", url, {"Metadata-Flavor": "Google"}, timeout=wait + 10 if wait else 5
    )
    return status, body, headers.get("ETag", headers.get("etag", ""))


class Imds:
    """EC2 IMDSv2: a session token, renewed when the service says it is no longer valid."""

    def __init__(self) -> None:
        self.token = ""

    def _token(self) -> str:
        status, body, _headers = _http(
            "PUT",
            f"{_ec2_base()}/latest/api/token",
            {"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
            timeout=5,
        )
        if status != 200:
            raise OSError(f"IMDSv2 token request answered {status}")
        return body.strip()

    def get(self, path: str) -> tuple[int, str]:
        for _attempt in range(2):
            if not self.token:
                self.token = self._token()
            status, body, _headers = _http(
                "GET",
                f"{_ec2_base()}/latest/{path}",
                {"X-aws-ec2-metadata-token": self.token},
                timeout=5,
            )
            if status != 401:
                return status, body
            self.token = ""
        return status, body


def find_spec(cloud: str) -> str | None:
    """The job spec's text from the instance metadata, None when the instance has none."""
    if cloud == "gce":
        status, body, _headers = gce_get(f"instance/attributes/{GCE_ATTRIBUTE}")
        if status == 404:
            return None
        if status != 200:
            raise OSError(f"the metadata server answered {status} for the job spec")
        return body
    if cloud == "ec2":
        status, body = Imds().get("user-data")
        if status == 404:
            return None
        if status != 200:
            raise OSError(f"IMDS answered {status} for the user-data")
        try:  # user-data is often a cloud-init script: only a gpubake spec is a job
            is_job = "gpubake_job" in json.loads(body)
        except (ValueError, TypeError):
            is_job = False
        return body if is_job else None
    return None


class Notice:
    """A preemption notice, set once by whichever watcher sees it first."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""
        self.window = 0.0
        self.seen_at = 0.0
        self._lock = threading.Lock()

    def raise_(self, reason: str, window: float) -> None:
        with self._lock:
            if not self.event.is_set():
                self.reason, self.window, self.seen_at = reason, window, time.monotonic()
                self.event.set()


def watch_gce(path: str, bad: tuple[str, ...], notice: Notice, stop: threading.Event, log) -> None:
    """Long-poll one GCE metadata value until it takes a value in `bad`."""
    etag = ""
    while not stop.is_set():
        try:
            status, value, etag_now = gce_get(path, etag=etag, wait=60 if etag else 0)
        except Exception as exc:  # the server restarts, the network blips: try again soon
            log(f"metadata {path}: {exc}; retrying")
            stop.wait(1)
            continue
        if status != 200:
            stop.wait(1)
            continue
        etag = etag_now or etag
        if value.strip() in bad:
            notice.raise_(f"GCE {path} = {value.strip()}", WINDOWS["gce"])
            return


def watch_ec2(notice: Notice, stop: threading.Event, log, on_rebalance) -> None:
    """Poll spot/instance-action (404 until a notice) and the rebalance recommendation."""
    imds, interval = Imds(), float(os.environ.get("GPUBAKE_EC2_POLL_SECONDS", "5"))
    rebalance_seen = False
    while not stop.is_set():
        try:
            status, body = imds.get("meta-data/spot/instance-action")
            if status == 200:
                window = WINDOWS["ec2"]
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    when = json.loads(body)["time"].replace("Z", "+00:00")
                    left = datetime.datetime.fromisoformat(when) - datetime.datetime.now(
                        datetime.timezone.utc
                    )
                    window = max(10.0, min(window, left.total_seconds()))
                notice.raise_(f"EC2 spot/instance-action {body.strip()}", window)
                return
            if not rebalance_seen:
                status, body = imds.get("meta-data/events/recommendations/rebalance")
                if status == 200:
                    rebalance_seen = True
                    log(f"EC2 rebalance recommendation {body.strip()}: syncing early")
                    on_rebalance()
        except Exception as exc:
            log(f"IMDS: {exc}; retrying")
        stop.wait(interval)


# --------------------------------------------------------------------------------- logging


class JobLog:
    """The runner's and the job's lines: to journald (field GPUBAKE_JOB_ID, so the logging
    agents ship them tagged) or stdout, and to the log file synced to <results>/logs/."""

    def __init__(self, job_id: str, path: Path | None) -> None:
        self.job_id, self.path = job_id, path
        self._file = None
        self._lock = threading.Lock()
        self._journal: socket.socket | None = None
        if Path("/run/systemd/journal/socket").exists() and os.environ.get("INVOCATION_ID"):
            with contextlib.suppress(OSError):
                self._journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._journal.connect("/run/systemd/journal/socket")

    def open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8", buffering=1)

    def __call__(self, line: str, *, source: str = "runner") -> None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        text = line if source == "job" else f"gpubake-job: {line}"
        # journald's native protocol: a newline would start a binary field and drop the entry
        text = text.replace("\r", " ").replace("\n", " | ")
        with self._lock:
            if self._file is not None:
                with contextlib.suppress(OSError):  # a full disk must not stop the runner
                    self._file.write(f"{stamp} {text}\n")
            sent = False
            if self._journal is not None:
                fields = (
                    f"MESSAGE={text}\nSYSLOG_IDENTIFIER=gpubake-job\nPRIORITY=6\n"
                    f"GPUBAKE_JOB_ID={self.job_id}\nGPUBAKE_SOURCE={source}\n"
                )
                with contextlib.suppress(OSError):
                    self._journal.send(fields.encode("utf-8", "replace"))
                    sent = True
            if not sent:
                print(text, flush=True)


# ---------------------------------------------------------------------------------- runner


def load_config() -> dict[str, Any]:
    config = dict(DEFAULT_CONFIG)
    path = Path(os.environ.get("GPUBAKE_JOB_CONFIG", CONFIG_FILE))
    if path.is_file():
        config.update(json.loads(path.read_text(encoding="utf-8")))
    if os.environ.get("GPUBAKE_POWEROFF_COMMAND"):
        config["poweroff"] = shlex.split(os.environ["GPUBAKE_POWEROFF_COMMAND"])
    return config


class State:
    """What the backstop needs to know, in /run (tmpfs): the job, its end action, whether
    the runner got as far as its own shutdown."""

    def __init__(self, directory: Path, *, enabled: bool = True) -> None:
        self.path = directory / "state.json"
        self.data: dict[str, Any] = {}
        self.enabled = enabled  # a local run powers nothing off: no backstop to inform

    def update(self, **values: Any) -> None:
        self.data.update(values)
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data), encoding="utf-8")
        tmp.replace(self.path)

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}


class SyncServer:
    """`gpubake-sync serve`: one process for the job's syncs and markers, started once, so the
    cloud SDK is imported and its connections opened before a notice comes. Still a process of
    its own: a hung or crashing client cannot take the runner down, and the runner kills it on
    its own deadline (and starts another for the next request)."""

    def __init__(self, argv: list[str], log) -> None:
        self.argv, self.log = argv, log
        self.proc: subprocess.Popen[str] | None = None
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._ids = 0
        self._lock = threading.Lock()  # one request at a time (cut() goes through at once)

    def _start(self) -> subprocess.Popen[str]:
        if self.proc is None or self.proc.poll() is not None:
            self.events = queue.Queue()
            self.proc = subprocess.Popen(
                [*self.argv, "serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
            threading.Thread(target=self._read, args=(self.proc, self.events), daemon=True).start()
        return self.proc

    @staticmethod
    def _read(proc: subprocess.Popen[str], events: queue.Queue) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with contextlib.suppress(ValueError):
                events.put(json.loads(line))
        events.put(None)  # it ended

    def request(self, op: str, *, timeout: float, on_event=None, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its end; StepError with the one-line error when it
        fails or does not end in `timeout` (the process is then killed)."""
        if not self._lock.acquire(timeout=max(0.1, timeout)):
            raise StepError(f"sync {op}: an earlier request still ran after {timeout:.0f} s")
        try:
            deadline = time.monotonic() + timeout
            proc = self._start()
            self._ids += 1
            rid = self._ids
            try:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({"id": rid, "op": op, **fields}) + "\n")
                proc.stdin.flush()
            except OSError as exc:
                self.kill()
                raise StepError(f"sync {op}: the sync process is gone ({exc})") from None
            while True:
                try:
                    event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    self.kill()
                    raise StepError(f"sync {op} did not finish in {timeout:.0f} s") from None
                if event is None:
                    err = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
                    self.kill()
                    raise StepError(err[-1] if err else f"sync {op}: the sync process ended")
                if event.get("id") != rid:
                    continue  # a request given up on earlier
                if event.get("event") == "error":
                    raise StepError(f"gpubake-sync: {event.get('error')}")
                if event.get("event") == "done":
                    return event
                if on_event is not None:
                    on_event(event)
        finally:
            self._lock.release()

    def cut(self) -> None:
        """The upload now running starts no more files (its files in flight finish)."""
        proc = self.proc
        if proc is not None and proc.poll() is None and proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.write('{"op": "cut"}\n')
                proc.stdin.flush()

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def close(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.close()  # it ends by itself
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


class Checkpoints:
    """Which checkpoints (top-level entries of the checkpoint folder) are complete in the
    results location, from the final sync's plan and its file events."""

    def __init__(self) -> None:
        self.order: list[str] = []  # newest first
        self.pending: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def event(self, event: dict[str, Any]) -> None:
        with self._lock:
            if event.get("event") == "plan":
                self.order = [name for name, _files in event.get("groups", [])]
                self.pending = {name: set(rels) for name, rels in event.get("groups", [])}
            elif event.get("event") in ("uploaded", "unchanged", "skipped"):
                rel = str(event.get("rel", ""))
                self.pending.get(rel.split("/", 1)[0], set()).discard(rel)

    def summary(self) -> dict[str, Any]:
        """{"checkpoint": the newest complete one (or None), "newest_checkpoint_synced",
        "checkpoints_left": newer ones not complete there}."""
        with self._lock:
            left: list[str] = []
            for name in self.order:
                if not self.pending.get(name):
                    return {
                        "checkpoint": name,
                        "newest_checkpoint_synced": not left,
                        "checkpoints_left": left,
                    }
                left.append(name)
            return {"checkpoint": None, "newest_checkpoint_synced": False, "checkpoints_left": left}


class Runner:
    def __init__(self, config: dict[str, Any], *, local: bool, work: Path | None) -> None:
        self.config, self.local = config, local
        self.work_override = work
        self.state = State(STATE_DIR, enabled=not local)
        self.cloud = detect_cloud()
        self.log = JobLog("-", None)
        self.spec: dict[str, Any] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.notice = Notice()
        self.stop = threading.Event()
        self._sync_lock = threading.Lock()
        self.server = SyncServer(config["sync"], self.log)
        self.checkpoints = Checkpoints()  # as the last sync of the checkpoints left them
        self.rate: float | None = None  # bytes/s of the last sync that sent enough to tell
        self.mounted: Path | None = None
        self.deadline_armed = False
        self.timer_at: float | None = None  # when the deadline timer fires (monotonic)
        self.finishing = False

    # -- sync ---------------------------------------------------------------------------

    def sync_tool(self, *args: str, timeout: float = 600) -> str:
        """Run the sync client once (code, restore, a marker when the server is gone);
        StepError with its one-line error when it fails."""
        proc = subprocess.Popen(
            [*self.config["sync"], *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = proc.communicate(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise StepError(f"sync {args[0]} did not finish in {timeout:.0f} s") from None
        if proc.returncode != 0:
            lines = err.strip().splitlines() or [f"exit status {proc.returncode}"]
            raise StepError(lines[-1])
        return out

    def sync(
        self,
        *,
        timeout: float = 600,
        final: bool = False,
        deadline: float | None = None,
        only_checkpoints: bool = False,
    ) -> None:
        """Upload checkpoints, results and logs (only what changed), checkpoints first and the
        newest of them first. A final sync cuts a periodic one short (its files in flight
        finish) and fails (StepError) if any folder could not be synced; `deadline`
        (monotonic): no file starts after it."""
        end = time.monotonic() + timeout
        if final:
            self.stop.set()
            self.server.cut()
        # a final sync lets a cut periodic one finish its files in flight for half its time,
        # then kills it (files are atomic: nothing half-sent replaces anything) and goes on
        wait = (end - time.monotonic()) * (0.5 if final else 1.0)
        if not self._sync_lock.acquire(timeout=max(0.1, wait)):
            if not final:
                raise StepError(f"an earlier sync still ran after {timeout:.0f} s")
            self.server.kill()
            if not self._sync_lock.acquire(timeout=5.0):
                raise StepError("an earlier sync still held the sync process after it was killed")
        failed: list[str] = []
        try:
            results = self.spec["results"]
            folders = [(self.ckpt_dir, "checkpoints"), (self.results_dir, "results")]
            if not only_checkpoints:
                folders.append((self.logs_dir, "logs"))
            for local, name in folders:
                if self.stop.is_set() and not final:
                    return  # a final sync follows
                remote = f"{results}/{name}"
                left = end - time.monotonic()
                if left < 0.5:
                    failed.append(f"{name}: no time left")
                    continue
                fields: dict[str, Any] = {
                    "local_dir": str(local),
                    "url": remote,
                    "state": str(self.work / f".sync-{local.name}.json"),
                    "checkpoints": name == "checkpoints",
                }
                if deadline is not None:
                    fields["deadline"] = max(0.0, deadline - time.monotonic())
                    fields["rate"] = self.rate
                track = Checkpoints() if name == "checkpoints" else None
                started = time.monotonic()
                try:
                    done = self.server.request(
                        "upload", timeout=left, on_event=track and track.event, **fields
                    )
                except StepError as exc:
                    self.log(f"sync of {local} to {remote} failed: {exc}")
                    failed.append(f"{local.name}: {exc}")
                    continue
                finally:
                    if track is not None and track.order:
                        self.checkpoints = track
                if done.get("left"):
                    self.log(f"{len(done['left'])} file(s) of {name} left: no time to send them")
                    failed.append(f"{name}: {len(done['left'])} file(s) left at the deadline")
                took = time.monotonic() - started
                if done.get("bytes", 0) >= RATE_MIN_BYTES and took > 0:
                    self.rate = done["bytes"] / took  # what the final sync plans with
                if done.get("uploaded") and local != self.logs_dir:
                    self.log(f"synced {len(done['uploaded'])} file(s) of {name} to {remote}")
        finally:
            self._sync_lock.release()
        if final and failed:
            raise StepError("; ".join(failed))

    def marker(self, name: str, *, timeout: float = 20, **fields: Any) -> None:
        body = json.dumps(
            {
                "job": self.spec.get("id"),
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                **fields,
            }
        )
        url = f"{self.spec['results']}/{name}"
        started = time.monotonic()
        try:
            self.server.request("put", url=url, text=body, timeout=timeout)
        except StepError as exc:  # a killed or broken sync process: a fresh client, once
            self.log(f"writing {name} through the sync process failed ({exc}): again")
            left = timeout - (time.monotonic() - started)
            self.sync_tool("put", url, body, timeout=max(2.0, left))
        self.log(f"wrote {url}: {body}")

    # -- set-up -------------------------------------------------------------------------

    def prepare_dirs(self) -> None:
        if self.work_override:
            root = self.work_override
        elif self.local:
            cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
            root = Path(cache) / "gpubake" / "jobs" / self.spec["id"]
        else:
            root = Path(self.config["work_root"]) / self.spec["id"]
        self.work = root
        self.ckpt_dir = Path(self.spec["checkpoint_dir"] or root / "checkpoints")
        self.results_dir = root / "results"
        self.logs_dir = root / "logs"
        self.code_dir = root / "code"
        self.preempt_file = root / "PREEMPTED"
        # a restarted instance (termination action STOP) keeps /var/lib: start clean
        self.preempt_file.unlink(missing_ok=True)
        shutil.rmtree(self.code_dir, ignore_errors=True)
        for directory in (root, self.ckpt_dir, self.results_dir, self.logs_dir, self.code_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.log.open(self.logs_dir / "job.log")

    def mount_dataset(self) -> None:
        dataset = self.spec["dataset"]
        if dataset is None:
            return
        mount = Path(dataset["mount"])
        if self.local:
            self.log(f"local run: the dataset is not mounted; {mount} is used as it is")
            return
        device = dataset["device"]
        if not device.startswith("/"):
            if self.cloud != "gce":
                raise StepError(
                    f"dataset.device {device!r}: give the device's path on {self.cloud}"
                )
            device = f"/dev/disk/by-id/google-{device}"
        if self.cloud == "ec2" and not Path(device).exists():
            device = ec2_nvme_volume(device) or device
        source = Path(device)
        if not source.exists():
            raise StepError(f"dataset device {device} does not exist: is the disk attached?")
        mount.mkdir(parents=True, exist_ok=True)
        options = ["ro"] if dataset["read_only"] else ["rw"]
        if source.is_dir():  # a directory standing in for a disk (tests, a host path)
            argv = ["mount", "--bind", "-o", ",".join(options), str(source), str(mount)]
        else:
            kind = tool(["blkid", "-o", "value", "-s", "TYPE", str(source)]).stdout.strip()
            if dataset["format"] and not kind:  # a blank disk the job fills (`dataset create`)
                made = tool(["mkfs.ext4", "-q", "-m", "0", "-L", "gpubake-data", str(source)])
                if made.returncode != 0:
                    raise StepError(f"making ext4 on {device} failed: {made.stderr.strip()}")
                self.log(f"made ext4 on the blank disk {device}")
            if dataset["read_only"] and kind in ("ext3", "ext4"):
                options.append("noload")  # no journal replay: it would write to the disk
            argv = ["mount", "-o", ",".join(options), str(source), str(mount)]
        proc = tool(argv)
        if proc.returncode != 0:
            raise StepError(f"mounting {device} at {mount} failed: {proc.stderr.strip()}")
        self.mounted = mount
        user = self._user() if dataset["format"] else None
        if user is not None:  # the job's user fills it
            os.chown(mount, user.pw_uid, user.pw_gid)
        if dataset["read_only"]:
            probe = mount / ".gpubake-write-probe"
            try:
                probe.write_text("x", encoding="utf-8")
            except OSError:
                pass
            else:
                probe.unlink()
                raise StepError(f"{mount} was mounted read-only but takes writes")
        self.log(f"mounted {device} at {mount} ({','.join(options)})")

    def fetch_code(self) -> Path:
        code = self.spec["code"]
        if code is None:
            return self.code_dir  # empty, the job's own
        if code["url"].startswith(("gs://", "s3://")):
            self.sync_tool("fetch-code", code["url"], str(self.code_dir), timeout=900)
        else:
            for argv in (
                ["git", "clone", "--quiet", code["url"], str(self.code_dir)],
                ["git", "-C", str(self.code_dir), "checkout", "--quiet", code["commit"]],
            ):
                try:
                    proc = subprocess.run(
                        argv,
                        capture_output=True,
                        text=True,
                        check=False,
                        timeout=900,
                        env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
                    )
                except subprocess.TimeoutExpired:
                    raise StepError(f"{' '.join(argv[:2])} did not finish in 900 s") from None
                if proc.returncode != 0:
                    lines = proc.stderr.strip().splitlines() or ["no output"]
                    raise StepError(f"{' '.join(argv[:2])} failed: {lines[-1]}")
        self.log(f"fetched the code from {code['url']}")
        return self.code_dir

    def restore_checkpoints(self) -> None:
        """A rerun of a preempted job starts from its last synced checkpoint."""
        out = self.sync_tool(
            "download", f"{self.spec['results']}/checkpoints", str(self.ckpt_dir), timeout=900
        )
        count = sum(1 for ln in out.splitlines() if ln.startswith("downloaded "))
        if count:
            self.log(f"restored {count} checkpoint file(s) from {self.spec['results']}/checkpoints")

    def _user(self) -> pwd.struct_passwd | None:
        if self.local:  # `gpubake job local`: the command runs as whoever runs it
            return None
        name = self.spec["user"] or self.config["user"]
        try:
            return pwd.getpwnam(name)
        except KeyError:
            raise StepError(f"user {name} does not exist: name an existing non-root user") from None

    def start(self, cwd: Path) -> None:
        user = self._user()
        if user is not None:
            # the job's folders only: the work root (logs, sync state, the preempt file), which
            # the runner writes as root, stays root's, so no link the job plants is followed
            for path in (self.ckpt_dir, self.results_dir, self.code_dir):
                for name in [path, *path.rglob("*")]:
                    os.lchown(name, user.pw_uid, user.pw_gid)
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": user.pw_dir if user else os.environ.get("HOME", str(self.work)),
            "USER": user.pw_name if user else os.environ.get("USER", ""),
            "LOGNAME": user.pw_name if user else os.environ.get("LOGNAME", ""),
            "PYTHONUNBUFFERED": "1",
            **self.spec["env"],
            "GPUBAKE_JOB_ID": self.spec["id"],
            "GPUBAKE_CKPT_DIR": str(self.ckpt_dir),
            "GPUBAKE_RESULTS_DIR": str(self.results_dir),
            "GPUBAKE_PREEMPT_FILE": str(self.preempt_file),
            "GPUBAKE_ENV_PREFIX": self.config["env_prefix"],
            **{f"GPUBAKE_PARAM_{k.upper()}": v for k, v in self.spec["params"].items()},
        }
        if self.spec["dataset"]:
            env["GPUBAKE_DATASET_DIR"] = self.spec["dataset"]["mount"]
        if self.local:  # the caller's PATH (their environment) and terminal settings
            env = {**os.environ, **env, "PATH": os.environ.get("PATH", env["PATH"])}
        # a login shell reads /etc/profile.d (CUDA's PATH); the environment goes in front of it
        # (the trap of a root startup script that finds no Python)
        prelude = (
            'if [ -d "$GPUBAKE_ENV_PREFIX/bin" ]; then PATH="$GPUBAKE_ENV_PREFIX/bin:$PATH"; '
            'export PATH VIRTUAL_ENV="$GPUBAKE_ENV_PREFIX"; fi; '
        )
        command = self.spec["command"]
        if isinstance(command, str):
            argv = ["bash", "-lc", prelude + command]
        else:
            argv = ["bash", "-lc", prelude + 'exec "$@"', "gpubake-job", *command]
        kwargs: dict[str, Any] = {}
        if user is not None and os.geteuid() == 0:
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self.log(f"starting {command!r} in {cwd} as {user.pw_name if user else 'this user'}")
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the notice goes to all of it
            **kwargs,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _on_sigterm(self, _signum: int, _frame: Any) -> None:
        if not self.finishing:
            self.notice.raise_("SIGTERM: the system is shutting down", WINDOWS.get(self.cloud, 30))

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self.log(raw.decode("utf-8", "replace").rstrip("\n"), source="job")

    def signal_job(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop_job(self, sig: int, grace: float, *, signalled: bool = False) -> int:
        """Signal the job's process group (unless `signalled` already), wait `grace`, then
        kill what is left."""
        assert self.proc is not None
        if not signalled:
            self.signal_job(sig)
        try:
            return self.proc.wait(timeout=max(0.0, grace))
        except subprocess.TimeoutExpired:
            self.log(f"the job did not stop within {grace:.0f} s: killing it")
            self.signal_job(signal.SIGKILL)
            try:  # a process in uninterruptible sleep (a hung GPU) may never go
                return self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.log("the job did not die after SIGKILL: going on without it")
                return -9

    # -- watchers -----------------------------------------------------------------------

    def start_watchers(self) -> None:
        if self.cloud == "gce":
            for path, bad in (
                ("instance/preempted", ("TRUE",)),
                ("instance/maintenance-event", ("TERMINATE_ON_HOST_MAINTENANCE",)),
            ):
                threading.Thread(
                    target=watch_gce,
                    args=(path, bad, self.notice, self.stop, self.log),
                    daemon=True,
                ).start()
        elif self.cloud == "ec2":
            threading.Thread(
                target=watch_ec2,
                args=(self.notice, self.stop, self.log, self._sync_soon),
                daemon=True,
            ).start()
        threading.Thread(target=self._periodic_sync, daemon=True).start()
        if self.spec["checkpoint_poll"]:
            threading.Thread(target=self._watch_checkpoints, daemon=True).start()

    def _ckpt_fingerprint(self) -> list[tuple[str, int, int]]:
        found = []
        for dirpath, _dirnames, filenames in os.walk(self.ckpt_dir):
            for name in filenames:
                path = Path(dirpath, name)
                with contextlib.suppress(OSError):
                    st = path.lstat()
                    found.append((str(path), st.st_size, st.st_mtime_ns))
        return sorted(found)

    def _watch_checkpoints(self) -> None:
        """Sync the checkpoints as soon as a new one has settled (unchanged for one look), so
        that at a notice only what changed since is left to send."""
        seen = synced = self._ckpt_fingerprint()
        while not self.stop.wait(self.spec["checkpoint_poll"]):
            now = self._ckpt_fingerprint()
            if now != seen:
                seen = now  # still being written: wait until it settles
                continue
            if now != synced:
                with contextlib.suppress(StepError):
                    self.sync(timeout=PERIODIC_SYNC_TIMEOUT, only_checkpoints=True)
                    synced = now

    def _sync_soon(self) -> None:
        threading.Thread(target=self.sync, kwargs={"timeout": 300}, daemon=True).start()

    def _periodic_sync(self) -> None:
        while not self.stop.wait(self.spec["sync_interval"]):
            self.sync(timeout=PERIODIC_SYNC_TIMEOUT)

    def arm_deadline(self) -> None:
        """A transient timer that powers off even if this runner hangs past max_run_time."""
        limit = self.spec["max_run_time"]
        if self.local or not limit or not shutil.which("systemd-run"):
            return
        # the runner's own stop (grace, final sync) comes first; the timer is for a hung runner
        slack = int(os.environ.get("GPUBAKE_DEADLINE_SLACK_SECONDS", "120"))
        after = limit + self.spec["grace_period"] + slack
        proc = poweroff_timer(self.config, DEADLINE_UNIT, after)
        if proc.returncode != 0:
            self.log(f"could not arm the {after} s deadline timer: {proc.stderr.strip()}")
        else:
            self.deadline_armed = True
            self.timer_at = time.monotonic() + after
            self.log(f"armed the deadline: power-off in {after} s even if this runner hangs")

    # -- the job ------------------------------------------------------------------------

    def run(self, spec_text: str) -> int:
        """Run the job; returns the runner's exit status (0: the job succeeded)."""
        self.state.update(job=None, on_end="poweroff", shut_down=False, started=time.time())
        if not self.local:
            # an earlier job of this boot may have left its timers
            for unit in (DEADLINE_UNIT, STAY_UNIT):
                tool(["systemctl", "stop", f"{unit}.timer"])
        # A Spot VM's soft-off comes with the notice: systemd stops this unit with SIGTERM; an
        # evicted pod (job emit k8s) or a Batch task gets it too, with the runner as PID 1
        signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self.spec = parse_spec(spec_text)
        except SpecError as exc:
            self.log(f"bad job spec: {exc}")
            self._fail_early(spec_text, f"bad job spec: {exc}")
            return 2
        self.log = JobLog(self.spec["id"], None)
        self.state.update(
            job=self.spec["id"], on_end=self.spec["on_end"], stay_minutes=self.spec["stay_minutes"]
        )
        self.prepare_dirs()
        self.state.update(results=self.spec["results"], work=str(self.work))
        self.log(f"job {self.spec['id']} on {self.cloud}; results in {self.spec['results']}")
        try:  # starts the sync process: its clients are loaded from now on
            self.server.request("check", url=self.spec["results"], timeout=60)
        except StepError as exc:
            self.log(f"the results location cannot be used: {exc}")
            return 2
        try:
            self.mount_dataset()
            cwd = self.fetch_code()
            self.restore_checkpoints()
            self.start_watchers()
            self.start(cwd)
            self.arm_deadline()  # from the job's start, as _supervise counts max_run_time
        except (StepError, OSError) as exc:
            self.log(f"the job could not start: {exc}")
            self._finish_failed(f"the job could not start: {exc}", None)
            return 1
        return self._supervise()

    def _supervise(self) -> int:
        assert self.proc is not None
        limit = self.spec["max_run_time"]
        started = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                break
            if self.notice.event.wait(0.2):
                return self._preempted()
            if limit and time.monotonic() - started > limit:
                self.log(f"the job ran past max_run_time ({limit} s): stopping it")
                code = self.stop_job(signal.SIGTERM, self.spec["grace_period"])
                self._finish_failed(f"max_run_time {limit} s exceeded", code)
                return 1
        code = self.proc.wait()
        time.sleep(0.2)  # let the pump write the job's last lines
        self.stop.set()
        if code == 0:
            self.log("the job succeeded")
            try:
                self.sync(final=True, timeout=self.final_budget())
                self.marker("_SUCCESS", exit_code=0)
            except StepError as exc:
                self.log(f"the final sync failed: {exc}")
                with contextlib.suppress(StepError):
                    self.marker("_FAILED", exit_code=0, reason=f"the final sync failed: {exc}")
                return 1
            return 0
        self._finish_failed(f"the command exited with {code}", code)
        return 1

    def final_budget(self, default: float = 600) -> float:
        """Seconds a final sync may take: less when the deadline timer would cut it."""
        if self.timer_at is None:
            return default
        return max(10.0, min(default, self.timer_at - time.monotonic() - 15))

    def _finish_failed(self, reason: str, code: int | None) -> None:
        self.stop.set()
        try:
            self.sync(final=True, timeout=self.final_budget())
        except StepError as exc:
            self.log(f"the final sync failed: {exc}")
        with contextlib.suppress(StepError):
            self.marker("_FAILED", exit_code=code, reason=reason)

    def _preempted(self) -> int:
        notice = self.notice
        window = notice.window
        end = notice.seen_at + window - END_RESERVE  # the final sync's uploads end by then
        reserve = SYNC_RESERVE.get(self.cloud, 12.0)
        grace = min(float(self.spec["grace_period"]), max(2.0, window - reserve))
        sig = SIGNALS[self.spec["preempt_signal"]]
        self.preempt_file.touch()
        self.signal_job(sig)
        self.log(
            f"preemption notice ({notice.reason}): sent {self.spec['preempt_signal']} to "
            f"the job, {grace:.0f} s to stop"
        )
        # once: a second SIGINT is "stop now" to many training loops, and a job that is
        # already exiting (its handler reset by the interpreter's shutdown) dies of it
        code = self.stop_job(sig, grace, signalled=True)  # the checkpoint watcher syncs meanwhile
        self.stop.set()
        try:  # no file starts in the last second: it could not end in time
            self.sync(timeout=max(1.0, end - time.monotonic()), final=True, deadline=end - 1)
        except StepError as exc:
            self.log(f"the final sync after the notice failed: {exc}")
        summary = self.checkpoints.summary()
        self.log(
            f"the newest complete checkpoint in {self.spec['results']}/checkpoints: "
            f"{summary['checkpoint']} (not synced: {', '.join(summary['checkpoints_left']) or '-'})"
        )
        left = window - (time.monotonic() - notice.seen_at) - 1
        with contextlib.suppress(StepError):
            self.marker(
                "_PREEMPTED",
                exit_code=code,
                reason=notice.reason,
                timeout=max(2, left),
                **summary,
            )
        return 3

    def _fail_early(self, spec_text: str, reason: str) -> None:
        """A spec that does not parse: write _FAILED if its results location can be read."""
        try:
            results = _bucket_url("results", json.loads(spec_text).get("results"))
        except (SpecError, ValueError, AttributeError):
            return
        self.spec = {"id": None, "results": results}
        with contextlib.suppress(StepError):
            self.marker("_FAILED", exit_code=None, reason=reason)

    # -- the end ------------------------------------------------------------------------

    def finish(self) -> None:
        """Unmount, then power off (or schedule it after stay_minutes)."""
        self.finishing = True
        self.stop.set()
        self.server.close()
        if self.mounted is not None:
            proc = tool(["umount", str(self.mounted)])
            if proc.returncode != 0:
                self.log(f"unmounting {self.mounted} failed: {proc.stderr.strip()}: powering off")
        if self.local:
            return
        if self.deadline_armed:  # the runner got here itself: the backstop timer is not needed
            tool(["systemctl", "stop", f"{DEADLINE_UNIT}.timer"])
        if self.spec.get("on_end") == "stay":
            minutes = self.spec["stay_minutes"]
            self.log(f"on_end stay: the machine powers off in {minutes} min")
            proc = poweroff_timer(self.config, STAY_UNIT, minutes * 60)
            if proc.returncode == 0:
                self.state.update(shut_down=True)
                return
            self.log(f"could not arm the stay timer: {proc.stderr.strip()}: powering off now")
        # marked done only once the command was taken: otherwise the backstop tries again
        if poweroff(self.config, self.log):
            self.state.update(shut_down=True)


def poweroff_timer(
    config: dict[str, Any], unit: str, seconds: int
) -> subprocess.CompletedProcess[str]:
    """A transient systemd timer that runs `gpubake-job poweroff` in `seconds`, whatever
    becomes of this process."""
    return tool(
        [
            "systemd-run",
            f"--unit={unit}",
            "--collect",  # unloaded once done, so the next job can arm its own
            f"--on-active={seconds}s",
            "--timer-property=AccuracySec=1s",  # a timer's default accuracy is a minute
            f"--setenv=GPUBAKE_POWEROFF_COMMAND={shlex.join(config['poweroff'])}",
            sys.executable,
            str(Path(__file__).resolve()),
            "poweroff",
        ]
    )


def poweroff(config: dict[str, Any], log) -> bool:
    """Run the power-off command first (nothing, a full disk included, may stand before it),
    then say so; True when it was taken."""
    try:
        proc = subprocess.run(
            config["poweroff"], capture_output=True, text=True, check=False, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        with contextlib.suppress(Exception):
            log(f"power-off command {shlex.join(config['poweroff'])} failed: {exc}")
        return False
    with contextlib.suppress(Exception):
        if proc.returncode == 0:
            log(f"powered off: {shlex.join(config['poweroff'])}")
        else:
            log(f"power-off command failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.returncode == 0


# ------------------------------------------------------------------------------- commands


def cmd_boot(config: dict[str, Any]) -> int:
    runner = Runner(config, local=False, work=None)
    deadline = time.monotonic() + 60
    while True:  # the network may come up after this unit
        try:
            text = find_spec(runner.cloud)
            break
        except Exception as exc:
            if time.monotonic() > deadline:
                print(
                    f"gpubake-job: cannot read the job spec from the {runner.cloud} metadata: {exc}"
                )
                return 1
            time.sleep(2)
    if text is None:
        print(f"gpubake-job: no job spec on this instance ({runner.cloud}): nothing to do")
        return 0
    return _run_and_finish(runner, text)


def _run_and_finish(runner: Runner, text: str) -> int:
    status = 1
    try:
        status = runner.run(text)
    except Exception:  # the runner's own bug must not keep the machine up
        runner.log("the runner failed: " + traceback.format_exc().strip().replace("\n", " | "))
    finally:
        runner.finish()
    return status


def cmd_backstop(config: dict[str, Any]) -> int:
    """ExecStopPost: the runner is gone; power off unless it got to its own shutdown."""
    state = State(STATE_DIR)
    state.data = state.read()
    if not state.data or state.data.get("shut_down"):
        return 0
    job_id, results = state.data.get("job"), state.data.get("results")
    log = JobLog(job_id or "-", None)
    if state.data.get("on_end") == "stay":
        minutes = int(state.data.get("stay_minutes", 60))
        if poweroff_timer(config, STAY_UNIT, minutes * 60).returncode == 0:
            log(f"the runner ended early; on_end stay: the machine powers off in {minutes} min")
            state.update(shut_down=True)
            return 0
    log("the runner ended before its shutdown: powering off (backstop)")
    try:
        if job_id and results:
            marker = {"job": job_id, "exit_code": None, "reason": "the runner died (backstop)"}
            subprocess.run(
                [*config["sync"], "put", f"{results}/_FAILED", json.dumps(marker)],
                capture_output=True,
                timeout=20,
                check=False,
            )
    except (OSError, subprocess.SubprocessError) as exc:
        log(f"could not write _FAILED: {exc}")
    finally:
        if poweroff(config, log):
            state.update(shut_down=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpubake-job", description=__doc__.split("\n\n", maxsplit=1)[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("boot", help="run the instance's job spec, if it has one (the unit's start)")
    run = sub.add_parser("run", help="run a spec file on this instance, powering off at the end")
    run.add_argument("spec")
    local = sub.add_parser("local", help="run a spec file here: no mount, no power-off")
    local.add_argument("spec")
    local.add_argument("--work-dir", type=Path, help="where the job's files go")
    check = sub.add_parser("validate", help="check a spec file and print it with its defaults")
    check.add_argument("spec")
    sub.add_parser("backstop", help="power off if the runner died (the unit's ExecStopPost)")
    sub.add_parser("poweroff", help="power off now (the deadline and stay timers)")
    args = parser.parse_args(argv)
    config = load_config()
    if args.command == "boot":
        return cmd_boot(config)
    if args.command == "backstop":
        return cmd_backstop(config)
    if args.command == "poweroff":
        poweroff(config, JobLog("-", None))
        return 0
    try:
        text = Path(args.spec).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"gpubake-job: cannot read {args.spec}: {exc.strerror}", file=sys.stderr)
        return 2
    if args.command == "validate":
        try:
            print(json.dumps(parse_spec(text), indent=2))
        except SpecError as exc:
            print(f"gpubake-job: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "local":
        runner = Runner(config, local=True, work=args.work_dir)
        return _run_and_finish(runner, text)
    return _run_and_finish(Runner(config, local=False, work=None), text)


if __name__ == "__main__":
    sys.exit(main())
