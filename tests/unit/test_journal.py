"""gpubake.build.journal (one line per stage built) and the suite's audit of it (tests/suite.py):
a stage input hash built twice in one run is named, unless --force asked for it."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os

import pytest

from gpubake.build import journal
from tests.suite import rebuilt


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def _entry(digest: str, **extra) -> dict:
    return {"stack": "tiny", "stage": "env", "input_hash": digest, "image": "sha256:1", **extra}


def _write_many(count: int) -> None:
    for n in range(count):
        journal.record(**_entry(f"{n:064x}"), note="x" * 2000)


def test_entries_are_stamped_and_read_back_since_a_time(tmp_path):
    journal.record(**_entry("a" * 64), seconds=1.5, forced=False)
    middle = dt.datetime.now(dt.UTC)
    journal.record(**_entry("b" * 64), seconds=2.0, forced=True)
    assert journal.path() == tmp_path / "gpubake" / "logs" / "builds.jsonl"
    every = list(journal.entries())
    assert [e["input_hash"][0] for e in every] == ["a", "b"]
    assert {e["pid"] for e in every} == {os.getpid()}
    assert [e["input_hash"][0] for e in journal.entries(since=middle)] == ["b"]


def test_concurrent_writers_never_interleave_lines():
    procs = [multiprocessing.Process(target=_write_many, args=(50,)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    lines = journal.path().read_text().splitlines()
    assert len(lines) == 200
    assert all(json.loads(line)["note"] == "x" * 2000 for line in lines)


def test_no_journal_yet_is_no_entries():
    assert list(journal.entries()) == []


def test_the_audit_names_a_stage_built_twice_but_not_a_forced_rebuild():
    first = {**_entry("c" * 64), "time": "t1", "pid": 1}
    forced = {**_entry("c" * 64), "time": "t2", "pid": 2, "forced": True}
    again = {**_entry("c" * 64), "time": "t3", "pid": 3, "forced": False}
    other = {**_entry("d" * 64), "time": "t4", "pid": 4}
    assert rebuilt([first, forced, other]) == []
    (line,) = rebuilt([first, forced, again, other])
    assert line.startswith(f"tiny:env ({'c' * 12}) built at t3 by pid 3, again: first at t1")
