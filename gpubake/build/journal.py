"""The build journal: one JSON line per stage that Packer built, appended to
`~/.cache/gpubake/logs/builds.jsonl` (what was built, from which inputs, how long it took,
whether --force asked for it). It answers "was this built again from identical inputs?":
the test suite reads it to prove that one run builds nothing twice."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpubake import resources


def path() -> Path:
    return resources.cache_dir() / "logs" / "builds.jsonl"


def record(**entry: Any) -> None:
    """Append one entry, stamped with the time and this process. One write of one line
    with O_APPEND: concurrent builds never interleave their lines."""
    line = json.dumps(
        {"time": dt.datetime.now(dt.UTC).isoformat(), "pid": os.getpid(), **entry},
        sort_keys=True,
    )
    target = path()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def entries(since: dt.datetime | None = None) -> Iterator[dict[str, Any]]:
    """The recorded entries, oldest first; those before `since` (aware) left out."""
    try:
        lines = path().read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a full disk: not an entry
        if since is None or dt.datetime.fromisoformat(entry["time"]) >= since:
            yield entry
