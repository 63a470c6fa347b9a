"""The cloud-neutral job: what `job run`, `job sweep` and `job emit` take (JobOptions), the
jobs they make (one per combination of sweep values, each with its own id, results prefix and
runner spec), and the records `job status|logs|fetch|stop` find them by.

A sweep passes its values in the spec, never by editing a script: the command's `{name}`
placeholders are filled in, and the runner sets $GPUBAKE_PARAM_<NAME> (spec field `params`).
Every spec is checked by the runner's own parse_spec before anything is sent.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import re
import secrets
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpubake import GpubakeError, stacks
from gpubake.jobs.runner_code import job_module

CLOUDS = ("gcp", "aws")
DEFAULT_GPU = "t4"
DEFAULT_STACK = "pytorch"
#: The device name the dataset disk is attached as (GCE: /dev/disk/by-id/google-<name>;
#: EC2: the block device mapping's name; on Nitro, without Amazon's udev rules, the runner
#: finds the volume as the one NVMe EBS disk beside the root).
GCP_DATASET_DEVICE = "gpubake-dataset"
AWS_DATASET_DEVICE = "/dev/sdf"

_PARAM = re.compile(r"^([a-z_][a-z0-9_]{0,62})=(.+)$")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_GIT = re.compile(r"^(?P<url>(?:https://|ssh://|git@)\S+?)@(?P<commit>[0-9a-f]{7,40})$")
_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


class JobError(GpubakeError):
    """A job option, check or cloud answer the user has to act on (one line)."""


@dataclass(frozen=True)
class JobOptions:
    """What the user asked for, shared by every job of a run or sweep."""

    cloud: str  # gcp | aws
    results: str  # gs://BUCKET/PREFIX | s3://BUCKET/PREFIX
    command: tuple[str, ...]
    gpu: str = DEFAULT_GPU  # a key of images/gpus.yml
    gpu_count: int = 1
    spot: bool = True
    max_run_duration: int | None = None  # seconds; the cloud deletes / terminates after it
    stack: str = DEFAULT_STACK  # the image: family gpubake-<stack> / AMI tag gpubake-stack
    image: str | None = None  # an explicit image (GCP image or family name, AWS AMI id)
    machine_type: str | None = None  # default: the GPU's smallest machine (images/gpus.yml)
    project: str | None = None
    zone: str | None = None
    region: str | None = None
    profile: str | None = None
    dataset_disk: str | None = None  # GCP: a disk name in the zone; AWS: a snapshot id
    code_dir: str | None = None  # packed and uploaded under the results location
    git: str | None = None  # URL@COMMIT
    env: tuple[tuple[str, str], ...] = ()
    sync_interval: str | None = None
    name: str = "job"  # the id's prefix
    # what the VM writes the results with: an AWS instance profile, a GCP service account
    instance_profile: str | None = None
    service_account: str = "default"  # the project's default compute service account

    def location(self) -> str:
        return f"{self.project}/{self.zone}" if self.cloud == "gcp" else str(self.region)


@dataclass(frozen=True)
class Job:
    """One VM's job: its id (also the instance's name), results prefix and runner spec."""

    id: str
    results: str
    spec: dict[str, Any]
    params: dict[str, str] = field(default_factory=dict)
    sweep: str | None = None
    index: int | None = None

    def spec_text(self) -> str:
        return json.dumps(self.spec, sort_keys=True, separators=(",", ":"))


def parse_duration(text: str, option: str) -> int:
    """'90m', '6h', '3600' -> seconds (one-line error naming the option)."""
    match = _DURATION.match(text.strip())
    if not match or int(match[1]) == 0:
        raise JobError(f"{option} {text!r} is not a duration: write e.g. 6h, 90m or 3600")
    return int(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def runner_deadline(max_run_duration: int) -> int:
    """The runner stops the job this long after its start, before the cloud deletes the VM at
    max_run_duration, so the last checkpoints are synced: a tenth earlier, at most 10 min."""
    return max(60, max_run_duration - min(600, max_run_duration // 10))


def parse_params(texts: Iterable[str]) -> dict[str, list[str]]:
    """--param lr=1e-3,1e-4 ... -> {"lr": ["1e-3", "1e-4"]}, in the order given."""
    params: dict[str, list[str]] = {}
    for text in texts:
        match = _PARAM.match(text)
        if not match:
            raise JobError(
                f"--param {text!r} is not NAME=V1,V2,...: write e.g. --param lr=1e-3,1e-4 "
                "(names: a-z, 0-9, _)"
            )
        name, values = match[1], [v.strip() for v in match[2].split(",")]
        if name in params:
            raise JobError(f"--param {name} is given twice: list its values once, comma-separated")
        if not all(values) or len(set(values)) != len(values):
            raise JobError(f"--param {text!r} has an empty or repeated value")
        params[name] = values
    return params


def combinations(params: Mapping[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the values, the last parameter varying fastest."""
    names = list(params)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*params.values())]


def fill_command(command: tuple[str, ...], values: Mapping[str, str]) -> list[str]:
    """The command with each {name} replaced by its value; a placeholder without a --param is
    an error (a typo would otherwise reach the training script verbatim)."""

    def one(match: re.Match[str]) -> str:
        if match[1] not in values:
            raise JobError(
                f"the command uses {{{match[1]}}} but no --param {match[1]}=... is given"
            )
        return values[match[1]]

    return [_PLACEHOLDER.sub(one, arg) for arg in command]


def parse_git(text: str) -> tuple[str, str]:
    match = _GIT.match(text)
    if not match:
        raise JobError(
            f"--git {text!r} is not URL@COMMIT: pin the commit, e.g. "
            "--git https://github.com/me/train.git@3f2a9c1"
        )
    return match["url"], match["commit"]


def new_id(prefix: str, now: datetime.datetime | None = None) -> str:
    """job-20261203-145500-3fa2: sortable, unique enough, a valid GCE name and label value."""
    if not _NAME.match(prefix):
        raise JobError(f"--name {prefix!r}: use a-z, 0-9 and '-', starting with a letter, up to 31")
    now = now or datetime.datetime.now(datetime.UTC)
    return f"{prefix}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def code_url(options: JobOptions, base: str) -> str | None:
    """Where the job's code comes from: the packed --code DIR under the base prefix, or git."""
    if options.code_dir and options.git:
        raise JobError("--code and --git both name the code: give one")
    if options.code_dir:
        if not Path(options.code_dir).is_dir():
            raise JobError(f"--code {options.code_dir}: no such directory")
        return f"{base}/code.tar.gz"
    return None


def check_options(options: JobOptions) -> None:
    if options.cloud not in CLOUDS:
        raise JobError(f"--cloud {options.cloud!r}: use gcp or aws")
    if not options.command:
        raise JobError("no command: give it after --, e.g. gpubake job run ... -- python train.py")
    if options.gpu not in stacks.gpu_names():
        raise JobError(
            f"--gpu {options.gpu!r} is unknown: use one of {', '.join(stacks.gpu_names())}"
        )
    if options.gpu_count < 1:
        raise JobError("--gpu-count must be 1 or more")


def make_jobs(
    options: JobOptions,
    params: Mapping[str, list[str]] | None = None,
    *,
    now: datetime.datetime | None = None,
) -> list[Job]:
    """One job for `job run` (no params), one per combination for a sweep; every spec checked
    by the runner's parse_spec."""
    check_options(options)
    results = options.results.rstrip("/")
    sweep = new_id(f"{options.name}-sweep" if params else options.name, now) if params else None
    if params:
        base = f"{results}/{sweep}"
        runs = [
            (f"{sweep}-{i}", f"{base}/{i}", values, i)
            for i, values in enumerate(combinations(params))
        ]
    else:
        job_id = new_id(options.name, now)
        base = f"{results}/{job_id}"
        runs = [(job_id, base, {}, None)]
    code = code_url(options, base)
    git = parse_git(options.git) if options.git else None
    jobs = []
    for job_id, prefix, values, index in runs:
        raw: dict[str, Any] = {
            "gpubake_job": 1,
            "id": job_id,
            "command": fill_command(options.command, values),
            "results": prefix,
            "env": dict(options.env),
            "params": dict(values),
        }
        if code:
            raw["code"] = {"url": code}
        elif git:
            raw["code"] = {"url": git[0], "commit": git[1]}
        if options.dataset_disk:
            device = GCP_DATASET_DEVICE if options.cloud == "gcp" else AWS_DATASET_DEVICE
            raw["dataset"] = {"device": device, "read_only": True}
        if options.sync_interval:
            raw["sync_interval"] = options.sync_interval
        if options.max_run_duration:
            raw["max_run_time"] = runner_deadline(options.max_run_duration)
        try:
            spec = job_module().parse_spec(json.dumps(raw))
        except job_module().SpecError as exc:
            raise JobError(f"the job spec would be refused by the runner: {exc}") from None
        jobs.append(Job(job_id, prefix, spec, dict(values), sweep, index))
    return jobs


def pack_code(directory: str | os.PathLike[str]) -> Path:
    """DIR as a .tar.gz (a temporary file the caller removes), without VCS folders and caches."""
    skip = {".git", ".hg", ".svn", "__pycache__", ".venv", ".mypy_cache", ".pytest_cache"}
    handle, name = tempfile.mkstemp(prefix="gpubake-code-", suffix=".tar.gz")
    os.close(handle)
    root = Path(directory)

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if skip & set(Path(info.name).parts):
            return None
        if info.issym() or info.islnk():
            target = Path(info.name).parent / info.linkname
            if info.linkname.startswith("/") or ".." in target.parts:
                raise JobError(
                    f"--code {directory}: {info.name} links outside the folder "
                    f"({info.linkname}); the VM refuses such a tarball: copy the file in instead"
                )
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    try:
        with tarfile.open(name, "w:gz") as tar:
            for child in sorted(root.iterdir()):
                tar.add(child, arcname=child.name, filter=keep)
    except (OSError, JobError) as exc:
        Path(name).unlink(missing_ok=True)
        if isinstance(exc, JobError):
            raise
        raise JobError(f"--code {directory}: packing it failed: {exc}") from None
    return Path(name)


# ------------------------------------------------------------------------------- records


def state_dir() -> Path:
    """Where launched jobs are recorded ($XDG_STATE_HOME/gpubake/jobs)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpubake" / "jobs"


@dataclass(frozen=True)
class Record:
    """What `job status|logs|fetch|stop` need to find a job again."""

    id: str
    cloud: str
    results: str
    instance: str  # GCE instance name / EC2 instance id
    location: str  # project/zone or region
    profile: str | None = None
    gpu: str = DEFAULT_GPU
    machine_type: str = ""
    gpu_count: int = 1
    sweep: str | None = None
    index: int | None = None
    params: dict[str, str] = field(default_factory=dict)
    created: str = ""

    def save(self) -> Path:
        path = state_dir() / f"{self.id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path


def records(*, sweep: str | None = None) -> list[Record]:
    found = []
    for path in sorted(state_dir().glob("*.json")):
        try:
            record = Record(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            continue  # not ours, or an older format: `job status` lists the rest
        if sweep is None or record.sweep == sweep:
            found.append(record)
    return found


def find_record(job_id: str) -> Record:
    path = state_dir() / f"{job_id}.json"
    if not path.is_file():
        known = [r.id for r in records()][-3:]
        hint = f" (recent: {', '.join(known)})" if known else ""
        raise JobError(
            f"no job {job_id!r} was launched from this machine{hint}: see gpubake job status"
        )
    return Record(**json.loads(path.read_text(encoding="utf-8")))
