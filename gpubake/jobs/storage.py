"""The results location seen from the laptop, through the runner's own bucket client
(gpubake_sync): the write probe before anything starts, the code upload, the markers that
say how a job ended, its log and its files."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from gpubake.jobs.launch import JobError
from gpubake.jobs.runner_code import sync_module

#: The markers the runner writes (never deleted), in the order `job status` trusts them.
MARKERS = {"_SUCCESS": "succeeded", "_FAILED": "failed", "_PREEMPTED": "preempted"}


def _sync_call(what: str, func, *args: Any) -> Any:
    try:
        return func(*args)
    except sync_module().SyncError as exc:
        raise JobError(f"{what}: {exc}") from None
    except Exception as exc:  # a client's own error (a missing --profile, ...): one line
        raise JobError(f"{what}: {type(exc).__name__}: {exc}".replace("\n", " ")) from None


def probe(results: str) -> None:
    """Write and remove a probe object under the results location: refuse a location the
    jobs could not write to before any VM costs money."""
    sync = sync_module()
    url = f"{results.rstrip('/')}/.gpubake-probe-{secrets.token_hex(4)}"
    _sync_call(f"the results location {results} is not writable", sync.put_text, url, "probe")
    _sync_call(f"the probe object {url} could not be removed", sync.remove, url)


def upload_code(tarball: Path, url: str) -> None:
    """The packed --code DIR, at exactly url (the spec's code.url)."""
    sync = sync_module()
    _sync_call(f"uploading the code to {url}", sync.upload_file, tarball, url)


def outcome(results: str) -> dict[str, Any] | None:
    """The newest marker under a job's prefix: {"state": succeeded|failed|preempted, ...}."""
    sync = sync_module()
    found = []
    for name, state in MARKERS.items():
        text = _sync_call(f"reading {results}/{name}", sync.read_text, f"{results}/{name}")
        if text is None:
            continue
        try:
            body = json.loads(text)
        except ValueError:
            body = {}
        found.append({"state": state, **(body if isinstance(body, dict) else {})})
    # a preempted run that was started again and finished leaves both: the newest counts
    return max(found, key=lambda m: str(m.get("time", "")), default=None)


def log_text(results: str) -> str | None:
    sync = sync_module()
    return _sync_call(f"reading the log of {results}", sync.read_text, f"{results}/logs/job.log")


def fetch(results: str, dest: Path, log=print) -> list[str]:
    """Results, checkpoints, logs and markers of a job, into dest (relative paths kept)."""
    sync = sync_module()
    return _sync_call(f"fetching {results}", sync.download, results, dest, log)
