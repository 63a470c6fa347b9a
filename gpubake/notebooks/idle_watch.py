"""gpubake notebook idle watcher: powers a notebook VM off when nobody uses JupyterLab.

Runs on the VM as root (unit gpubake-notebook-idle, installed by the boot script):
    /usr/bin/python3 /usr/local/lib/gpubake/notebook_idle.py --config /etc/gpubake/notebook.json
One file, standard library only, Python 3.9+: the VM's system python runs it.

Activity comes from the Jupyter server's own REST API (/api/status, /api/kernels,
/api/terminals, with the server's token). The VM is busy while a kernel runs a cell or a
browser tab holds a kernel connection; otherwise it is idle since the newest activity the
server reports (API use, kernel messages, terminal input and output) or the watcher's start.
A warning goes to the journal and to every terminal warn_s before the stop. On a spot VM the
cloud's preemption notice is watched too: the disks are synced and the users told.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

PROG = "gpubake-notebook-idle"
_UTC = timezone(timedelta(0))
PREEMPTION_URLS = {
    "gcp": "http://metadata.google.internal/computeMetadata/v1/instance/preempted",
    "aws": "http://169.254.169.254/latest/meta-data/spot/instance-action",
}
#: Fallbacks only: the boot script writes jupyter_url and token_file from the jupyter role's
#: defaults (gpubake.notebooks.options.jupyter), and the limits from `notebook up`.
DEFAULTS: dict[str, Any] = {
    "idle_stop_s": 3600,  # 0 or null: no idle stop
    "max_run_s": None,  # seconds after boot; null: no limit
    "warn_s": 300,  # at most half the limit it warns of
    "interval_s": 30,
    "jupyter_url": "http://127.0.0.1:8888",
    "token_file": "/home/gpubake/.jupyter/gpubake-token",
    "poweroff_command": ["systemctl", "poweroff"],
    "state_file": "/run/gpubake/notebook-idle.json",
    "name": None,  # the notebook's name, for the preemption notice
    "cloud": None,  # gcp | aws | null: which preemption notice is watched
    "preemption_urls": PREEMPTION_URLS,
    "preemption_interval_s": 5,  # GCP gives 30 s of notice
}
#: a kernel that says "starting" for longer than this is stuck, not busy
STARTING_GRACE_S = 600
#: Jupyter answers within this; the metadata server is local
HTTP_TIMEOUT_S = 5
METADATA_TIMEOUT_S = 2
#: terminal activity this soon after the watcher's own notice is the notice's echo
NOTICE_ECHO_S = 5
#: The Jupyter server's unit: warnings and stops are logged under it too (JUPYTER_LOG).
JUPYTER_UNIT = "gpubake-jupyter.service"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: slack around the watcher's own request times (the server, on the same clock, stamps
#: them in between)
OWN_SLACK_S = 0.05


def log(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


def to_jupyter_log(text: str, socket_path: str = JOURNAL_SOCKET) -> bool:
    """The line in the Jupyter server's log (`journalctl -u gpubake-jupyter`) and the
    watcher's: journald shows a message that a root process sends with
    OBJECT_SYSTEMD_UNIT=<unit> under that unit as well as under the sender's own
    (systemd.journal-fields(7)). Sent by journald's native protocol; False if no journal
    took it (the caller then prints it)."""
    fields = {
        "MESSAGE": " ".join(text.split()),  # one line: the protocol's simple form
        "PRIORITY": "4",  # warning
        "SYSLOG_IDENTIFIER": PROG,
        "OBJECT_SYSTEMD_UNIT": JUPYTER_UNIT,
    }
    data = "".join(f"{key}={value}\n" for key, value in fields.items()).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(data, socket_path)
    except OSError:
        return False
    return True


def parse_time(text: Any) -> float | None:
    """Epoch seconds of a Jupyter timestamp ("2024-05-01T10:00:00.123456Z"), else None."""
    if not isinstance(text, str) or not text.strip():
        return None
    text = text.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"  # fromisoformat takes "Z" from Python 3.11 on only
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=_UTC)
    return stamp.timestamp()


def iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return (
        datetime.fromtimestamp(seconds, _UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min"


# -- configuration ---------------------------------------------------------------------------


def _number(raw: dict[str, Any], key: str, *, nullable: bool, positive: bool = False) -> Any:
    value = raw.get(key, DEFAULTS[key])
    if value is None and nullable:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or value < 0 or (positive and value == 0):
        log(f"config: {key}={raw.get(key)!r} is not a usable number; using {DEFAULTS[key]!r}")
        return DEFAULTS[key]
    return value


def load_config(path: str | None) -> dict[str, Any]:
    """The settings: the file's keys over DEFAULTS; a missing or broken file (or key) is
    logged and its defaults used, so that a paid VM still stops when idle."""
    raw: Any = {}
    if path:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log(f"config {path}: {exc}; using the defaults")
            raw = {}
    if not isinstance(raw, dict):
        log(f"config {path}: not a JSON object; using the defaults")
        raw = {}
    config = dict(DEFAULTS)
    config.update({k: v for k, v in raw.items() if k not in DEFAULTS})  # kept, unused
    config["idle_stop_s"] = _number(raw, "idle_stop_s", nullable=True)
    config["max_run_s"] = _number(raw, "max_run_s", nullable=True)
    config["warn_s"] = _number(raw, "warn_s", nullable=False)
    config["interval_s"] = _number(raw, "interval_s", nullable=False, positive=True)
    config["preemption_interval_s"] = _number(
        raw, "preemption_interval_s", nullable=False, positive=True
    )
    for key in ("jupyter_url", "token_file", "state_file"):
        value = raw.get(key, DEFAULTS[key])
        config[key] = value if isinstance(value, str) and value else DEFAULTS[key]
    command = raw.get("poweroff_command", DEFAULTS["poweroff_command"])
    if not (isinstance(command, list) and command and all(isinstance(c, str) for c in command)):
        log(f"config: poweroff_command={command!r} is not a list of strings; using the default")
        command = DEFAULTS["poweroff_command"]
    config["poweroff_command"] = list(command)
    cloud = raw.get("cloud")
    if cloud not in (None, "gcp", "aws"):
        log(f"config: cloud={cloud!r} is none of gcp, aws; no preemption notice is watched")
        cloud = None
    config["cloud"] = cloud
    urls = raw.get("preemption_urls")
    config["preemption_urls"] = {**PREEMPTION_URLS, **(urls if isinstance(urls, dict) else {})}
    name = raw.get("name")
    config["name"] = name if isinstance(name, str) and name else None
    return config


def warn_before(config: dict[str, Any], limit_s: float) -> float:
    """How long before a stop for `limit_s` the warning goes out: warn_s, at most half."""
    return min(float(config.get("warn_s") or 0), limit_s / 2)


# -- the decision ----------------------------------------------------------------------------


@dataclass
class Decision:
    idle_s: float
    last_activity: float  # epoch seconds
    busy_kernels: int
    connections: int
    terminals: int
    reason: str  # busy: ..., idle, jupyter not answering
    stop_at: float | None = None  # the earlier of the idle and the max-run stop
    limit: str | None = None  # which: "idle" | "max_run"
    limit_s: float = 0
    warn_at: float | None = None
    stop: bool = False  # stop_at has come
    warn: bool = False  # within the warning time of stop_at (and not yet there)


def _inside(stamp: float, windows: Any) -> bool:
    return any(start - OWN_SLACK_S <= stamp <= end + OWN_SLACK_S for start, end in windows)


def _kernel_busy(kernel: dict[str, Any], now: float) -> bool:
    state = kernel.get("execution_state")
    if state == "busy":
        return True
    if state == "starting":
        started = parse_time(kernel.get("last_activity"))
        return started is None or now - started < STARTING_GRACE_S
    return False


def decide(
    now: float,
    uptime_s: float | None,
    since: float,
    status: dict[str, Any] | None,
    kernels: list[dict[str, Any]],
    terminals: list[dict[str, Any]],
    config: dict[str, Any],
    requests: Any = (),
    notices: Any = (),
    tty_input: Any = (),
) -> Decision:
    """How long the VM has been idle at `now` and whether to warn or stop.

    since: the floor of the last activity (the watcher's start, or the newest activity seen
    before); status/kernels/terminals: what /api/status, /api/kernels and /api/terminals
    returned (status None: Jupyter did not answer, so idle since `since`); requests, notices:
    (start, end) epoch windows of the watcher's own API requests and terminal notices (and
    their echo); tty_input: when each terminal last gave its program input (an SSH login's
    too, which Jupyter does not see). uptime_s: /proc/uptime (None: unknown, no max-run
    stop)."""
    busy = connections = 0
    if status is None:
        last, reason = since, "jupyter not answering"
    else:
        connections = int(status.get("connections") or 0)
        busy = sum(1 for k in kernels if isinstance(k, dict) and _kernel_busy(k, now))
        if busy or connections:
            last = now
            parts = [f"{busy} kernel(s) running"] if busy else []
            parts += [f"{connections} kernel connection(s)"] if connections else []
            reason = "busy: " + ", ".join(parts)
        else:
            # The server's last_activity moves with every authenticated API request unless the
            # handler opts out (APIHandler._track_activity, or ?no_track_activity, which the
            # watcher sends: this is the fallback for a server that ignores it), and a
            # terminal's with any output on its pty, the watcher's own notices included.
            server = parse_time(status.get("last_activity"))
            stamps = [server] if server and not _inside(server, [*requests, *notices]) else []
            for terminal in terminals:
                at = parse_time(terminal.get("last_activity") if isinstance(terminal, dict) else 0)
                stamps += [at] if at and not _inside(at, notices) else []
            stamps += [at for at in tty_input if at]
            # a kernel's moves on its own messages only
            for kernel in kernels:
                at = parse_time(kernel.get("last_activity") if isinstance(kernel, dict) else 0)
                stamps += [at] if at else []
            last = min(max([since, *stamps]), now)
            reason = "idle"
    decision = Decision(
        idle_s=max(0.0, now - last),
        last_activity=last,
        busy_kernels=busy,
        connections=connections,
        terminals=len(terminals) if status is not None else 0,
        reason=reason,
    )
    stops = []
    if config.get("idle_stop_s"):
        stops.append((last + config["idle_stop_s"], "idle", float(config["idle_stop_s"])))
    if config.get("max_run_s") and uptime_s is not None:
        stops.append((now - uptime_s + config["max_run_s"], "max_run", float(config["max_run_s"])))
    if stops:
        stop_at, limit, limit_s = min(stops)
        decision.stop_at, decision.limit, decision.limit_s = stop_at, limit, limit_s
        decision.warn_at = stop_at - warn_before(config, limit_s)
        decision.stop = now >= stop_at
        decision.warn = not decision.stop and now >= decision.warn_at
    return decision


def warning_text(decision: Decision) -> str:
    at = datetime.fromtimestamp(decision.stop_at or 0, _UTC).strftime("%H:%M")
    if decision.limit == "max_run":
        return (
            f"{PROG}: powering off at {at} UTC (max run {span(decision.limit_s)} since boot); "
            "activity does not extend it"
        )
    return (
        f"{PROG}: powering off at {at} UTC (idle {span(decision.idle_s)}; "
        f"limit {span(decision.limit_s)}) unless there is activity"
    )


def stop_text(decision: Decision) -> str:
    if decision.limit == "max_run":
        return f"powering off: max run reached ({span(decision.limit_s)} since boot)"
    return f"powering off: idle {span(decision.idle_s)} (limit {span(decision.limit_s)})"


def preemption_text(name: str | None) -> str:
    return (
        f"{PROG}: spot VM preempted: /storage is kept; start it again with "
        f"`gpubake notebook up {name or 'NAME'}`"
    )


# -- the VM's side ---------------------------------------------------------------------------


def write_terminals(text: str, pts_dir: str = "/dev/pts") -> int:
    """Write `text` to every terminal (Jupyter's and SSH logins'); how many took it."""
    data = ("\r\n" + text + "\r\n").encode("utf-8")
    written = 0
    try:
        entries = sorted(Path(pts_dir).iterdir())
    except OSError:
        return 0
    for path in entries:
        if not path.name.isdigit():  # ptmx, the multiplexer
            continue
        try:
            if not stat.S_ISCHR(path.stat().st_mode):
                continue
            fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            os.write(fd, data)
            written += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return written


def tty_input_times(pts_dir: str = "/dev/pts") -> list[float]:
    """When each terminal last gave its program input: the tty's access time, which the
    kernel moves when a read returns what was typed (what `w` shows as IDLE); the watcher's
    own notices are writes, which move the modification time only."""
    times = []
    try:
        entries = list(Path(pts_dir).iterdir())
    except OSError:
        return []
    for path in entries:
        if path.name.isdigit():
            try:
                times.append(path.stat().st_atime)
            except OSError:
                continue
    return times


def read_uptime(path: str = "/proc/uptime") -> float | None:
    try:
        return float(Path(path).read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def write_state(path: str, decision: Decision, now: float, jupyter: bool) -> None:
    """The state file other tools read over SSH (a new file renamed over the old)."""
    state = {
        "idle_s": int(decision.idle_s),
        "last_activity": iso(decision.last_activity),
        "busy_kernels": decision.busy_kernels,
        "connections": decision.connections,
        "terminals": decision.terminals,
        "stop_at": iso(decision.stop_at),
        "limit": decision.limit,
        "reason": decision.reason,
        "jupyter": jupyter,
        "updated": iso(now),
    }
    target = Path(path)
    try:
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        new = target.with_name(target.name + ".new")
        new.write_text(json.dumps(state, sort_keys=True) + "\n", encoding="utf-8")
        new.chmod(0o644)
        new.replace(target)
    except OSError as exc:
        log(f"cannot write {path}: {exc}")


def resumed_since(path: str, now: float, uptime_s: float | None) -> float | None:
    """The last activity an earlier run of the watcher recorded in this boot: a restarted
    watcher (systemctl restart, Restart=always) does not start the idle clock again."""
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    last = parse_time(state.get("last_activity")) if isinstance(state, dict) else None
    booted = now - uptime_s if uptime_s is not None else None
    if last is None or last > now or (booted is not None and last < booted):
        return None
    return last


class JupyterError(Exception):
    pass


class Watcher:
    def __init__(self, config: dict[str, Any], pts_dir: str = "/dev/pts") -> None:
        self.config = config
        self.pts_dir = pts_dir
        self.started = time.time()
        resumed = resumed_since(config["state_file"], self.started, read_uptime())
        if resumed is not None:
            log(f"resuming: last activity {iso(resumed)} (from {config['state_file']})")
        self.since = resumed if resumed is not None else self.started
        self.requests: collections.deque[tuple[float, float]] = collections.deque(maxlen=12)
        self.notices: collections.deque[tuple[float, float]] = collections.deque(maxlen=32)
        self.jupyter_error: str | None = ""  # "": not asked yet; None: answering
        self.warned_for: int | None = None
        self.powered_off = False
        self.preempted = False
        self._aws_token: tuple[str, float] | None = None

    # -- Jupyter ----------------------------------------------------------------------------
    def _get(self, path: str, token: str) -> Any:
        url = self.config["jupyter_url"].rstrip("/") + path
        request = urllib.request.Request(  # noqa: S310 (jupyter_url: http on localhost)
            url, headers={"Authorization": f"token {token}", "Accept": "application/json"}
        )
        start = time.time()
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:  # noqa: S310
                return json.loads(response.read().decode("utf-8"))
        finally:
            self.requests.append((start, time.time()))

    def activity(self) -> tuple[dict[str, Any], list[Any], list[Any]]:
        """/api/status, /api/kernels, /api/terminals; JupyterError when the server does not
        answer. no_track_activity=1: these handlers would otherwise stamp the server's
        last_activity with the watcher's own polls and keep the VM up for ever."""
        try:
            token = Path(self.config["token_file"]).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise JupyterError(f"no token: {exc}") from exc
        if not token:
            raise JupyterError(f"no token: {self.config['token_file']} is empty")
        try:
            status = self._get("/api/status", token)
            kernels = self._get("/api/kernels?no_track_activity=1", token)
            try:
                terminals = self._get("/api/terminals?no_track_activity=1", token)
            except urllib.error.HTTPError as exc:
                if exc.code != 404:  # 404: terminals are off
                    raise
                terminals = []
        except urllib.error.HTTPError as exc:
            raise JupyterError(f"{exc.filename}: HTTP {exc.code}") from exc
        except (OSError, ValueError) as exc:  # URLError, timeouts, refused; bad JSON
            raise JupyterError(f"{self.config['jupyter_url']}: {exc}") from exc
        if not (isinstance(status, dict) and isinstance(kernels, list)):
            raise JupyterError("unexpected answers from /api/status or /api/kernels")
        return status, kernels, terminals if isinstance(terminals, list) else []

    # -- one poll ---------------------------------------------------------------------------
    def poll(self, act: bool = True) -> Decision:
        now = time.time()
        status: dict[str, Any] | None = None
        kernels: list[Any] = []
        terminals: list[Any] = []
        try:
            status, kernels, terminals = self.activity()
        except JupyterError as exc:
            if self.jupyter_error is None or self.jupyter_error == "":
                log(f"jupyter is not answering ({exc}): idle since {iso(self.since)}")
            self.jupyter_error = str(exc)
        else:
            if self.jupyter_error:
                log("jupyter answers again")
            self.jupyter_error = None
        decision = decide(
            now, read_uptime(), self.since, status, kernels, terminals, self.config,
            requests=list(self.requests), notices=list(self.notices),
            tty_input=tty_input_times(self.pts_dir),
        )  # fmt: skip
        self.since = max(self.since, decision.last_activity)
        if status is None:
            decision.reason = f"jupyter not answering: {self.jupyter_error}"
        if act:
            self._act(decision)
        if self.preempted:
            decision.reason = "preempted: " + decision.reason
        write_state(self.config["state_file"], decision, now, status is not None)
        return decision

    def _act(self, decision: Decision) -> None:
        if decision.stop:
            decision.reason = stop_text(decision)
            if not self.powered_off:
                self.power_off(decision)
        elif decision.warn and self.warned_for != round(decision.stop_at or 0):
            self.warned_for = round(decision.stop_at or 0)  # once per idle period
            self.notify(warning_text(decision))

    def notify(self, text: str, journal: bool = True) -> None:
        """To every terminal, and to the journal (the watcher's and the Jupyter server's)."""
        if journal and not to_jupyter_log(text):  # which is the watcher's journal too
            print(text, flush=True)
        start = time.time()
        write_terminals(text, self.pts_dir)
        self.notices.append((start, time.time() + NOTICE_ECHO_S))

    def power_off(self, decision: Decision) -> None:
        if not to_jupyter_log(f"{PROG}: {stop_text(decision)}"):
            log(stop_text(decision))
        command = self.config["poweroff_command"]
        try:
            result = subprocess.run(command, timeout=120, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            log(f"{' '.join(command)} failed ({exc}); trying again next interval")
            return
        if result.returncode != 0:
            log(f"{' '.join(command)} exited {result.returncode}; trying again next interval")
            return
        self.powered_off = True

    # -- preemption -------------------------------------------------------------------------
    def _metadata(self, url: str, headers: dict[str, str], method: str = "GET") -> str | None:
        """The body of a 200 answer, None for 404; OSError for the rest."""
        request = urllib.request.Request(url, headers=headers, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=METADATA_TIMEOUT_S) as response:  # noqa: S310
                return response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def preemption_notice(self) -> str | None:
        """The cloud's preemption notice, if one is out; errors count as none."""
        cloud = self.config.get("cloud")
        url = self.config["preemption_urls"].get(cloud) if cloud else None
        if not url:
            return None
        try:
            if cloud == "gcp":
                body = self._metadata(url, {"Metadata-Flavor": "Google"})
                return body if body and body.strip().upper() == "TRUE" else None
            for _ in range(2):  # AWS IMDSv2: a session token first; again once if refused
                token = self._imds_token(url)
                try:
                    body = self._metadata(url, {"X-aws-ec2-metadata-token": token})
                except urllib.error.HTTPError as exc:
                    if exc.code != 401:
                        raise
                    self._aws_token = None
                    continue
                return body if body and body.strip() else None
        except (OSError, ValueError):
            return None
        return None

    def _imds_token(self, url: str) -> str:
        if self._aws_token and time.monotonic() - self._aws_token[1] < 3600:
            return self._aws_token[0]
        parts = urllib.parse.urlsplit(url)
        token_url = urllib.parse.urlunsplit(
            (parts.scheme, parts.netloc, "/latest/api/token", "", "")
        )
        token = self._metadata(
            token_url, {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, method="PUT"
        )
        if not token:
            raise OSError("no IMDSv2 token")
        self._aws_token = (token.strip(), time.monotonic())
        return self._aws_token[0]

    def check_preemption(self) -> bool:
        notice = self.preemption_notice()
        if notice is None:
            return False
        self.preempted = True
        os.sync()  # the cloud powers off shortly: what is written gets to the disks
        log(f"spot VM preempted ({self.config['cloud']}: {notice.strip()[:200]}); disks synced")
        self.notify(preemption_text(self.config.get("name")), journal=False)
        return True

    # -- the loop ---------------------------------------------------------------------------
    def next_poll_in(self, decision: Decision) -> float:
        """interval_s, or less to warn and to stop on time."""
        wait = float(self.config["interval_s"])
        now = time.time()
        for moment in (decision.warn_at, decision.stop_at):
            if moment is not None and moment > now:
                wait = min(wait, moment - now + 0.2)
        return wait

    def run(self) -> None:
        watch_cloud = bool(self.config.get("cloud"))
        next_poll = time.monotonic()
        while True:
            if time.monotonic() >= next_poll:
                try:
                    wait = self.next_poll_in(self.poll())
                except Exception as exc:  # keep watching: a paid VM must still stop
                    log(f"poll failed: {type(exc).__name__}: {exc}")
                    wait = float(self.config["interval_s"])
                next_poll = time.monotonic() + wait
            if watch_cloud and not self.preempted:
                self.check_preemption()
            sleep = next_poll - time.monotonic()
            if watch_cloud and not self.preempted:
                sleep = min(sleep, float(self.config["preemption_interval_s"]))
            time.sleep(max(0.2, sleep))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="/etc/gpubake/notebook.json")
    parser.add_argument(
        "--once", action="store_true", help="poll once, write and print the state, do nothing"
    )
    args = parser.parse_args(argv)
    config = load_config(args.config)
    watcher = Watcher(config)
    if args.once:
        watcher.poll(act=False)
        print(Path(config["state_file"]).read_text(encoding="utf-8"), end="")
        return 0
    limits = [
        f"idle stop after {span(config['idle_stop_s'])}" if config["idle_stop_s"] else "",
        f"max run {span(config['max_run_s'])}" if config["max_run_s"] else "",
        f"preemption notices ({config['cloud']})" if config["cloud"] else "",
    ]
    log(
        f"watching {config['jupyter_url']} every {span(config['interval_s'])}: "
        + (", ".join(x for x in limits if x) or "no limits")
    )
    watcher.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
