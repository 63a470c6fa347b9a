"""gpubake.build.guard without an engine: locks across processes (freed when the holder is killed),
the waiting message, work dirs and their names, SIGTERM as an interruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpubake.build import guard

HOLD = """
import sys, time
from gpubake.build import guard
lock = guard.BuildLock(sys.argv[1])
assert lock.try_acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "gpubake"


def hold(key: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, key],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_held_elsewhere_is_busy_until_its_holder_is_killed():
    key = guard.output_key("gpubake/pytorch:latest")
    holder = hold(key)
    try:
        assert not guard.BuildLock(key).try_acquire()
        assert guard.holder_of(guard.BuildLock(key).path).startswith(f"gpubake (pid {holder.pid}")
        assert guard.key_of(guard.BuildLock(key).path) == key
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = guard.BuildLock(key)
    assert lock.try_acquire()  # the kernel let go of the killed holder's flock
    lock.release()


def test_acquire_says_whom_it_waits_for_then_takes_the_lock():
    key = guard.stage_key("c" * 64)
    holder = hold(key)
    said: list[str] = []

    def release_soon() -> None:
        time.sleep(1)
        holder.send_signal(signal.SIGTERM)

    import threading

    threading.Thread(target=release_soon, daemon=True).start()
    lock = guard.BuildLock(key)
    try:
        assert lock.acquire(said.append, "stage 2/4 pytorch:cuda") is True
        assert said == [f"waiting for gpubake (pid {holder.pid} on {os.uname().nodename}) "
                        "to finish stage 2/4 pytorch:cuda ..."]  # fmt: skip
        assert lock.held
    finally:
        lock.release()
        holder.wait()
    assert lock.acquire(said.append, "again") is False and len(said) == 1
    lock.release()


def test_names_are_short_and_distinct():
    """Packer's plugin sockets live in the work dir: a socket path has at most 107 bytes."""
    keys = [
        guard.output_key("registry.example.com:5000/" + "x" * 200 + ":tag"),
        guard.stage_key("a" * 64),
        guard.stage_key("b" * 64),
        guard.base_key("gpubake/base:x"),
    ]
    names = [guard.slug(k) for k in keys]
    assert len(set(names)) == len(names)
    assert all(len(n) <= 25 and "." not in n and "/" not in n for n in names)
    assert names[1].startswith("stage-") and names[0].startswith("output-")


def test_work_dir_is_private_under_the_cache_and_gone_after(cache):
    with guard.work_dir(guard.stage_key("d" * 64)) as path:
        assert path.parent == cache / "work"
        assert path.stat().st_mode & 0o777 == 0o700
        (path / "ansible-vars.json").write_text("{}")
    assert not path.exists()
    with pytest.raises(RuntimeError), guard.work_dir(guard.stage_key("d" * 64)) as again:
        raise RuntimeError("a failing build")
    assert not again.exists()


def test_sigterm_is_an_interruption_that_cleanup_sees():
    code = """
import os, signal, sys
from gpubake.build import guard
try:
    with guard.sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()
except KeyboardInterrupt as exc:
    print(type(exc).__name__, guard.signal_of(exc).name)
print(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        check=True,
    ).stdout.split()
    assert out == ["Terminated", "SIGTERM", "True"]


def test_interrupted_error_is_one_line_with_the_signals_exit_code():
    exc = guard.BuildInterruptedError("SIGTERM during stage 1/4 tiny:os: ...", 143)
    assert str(exc) == "interrupted: SIGTERM during stage 1/4 tiny:os: ..."
    assert exc.exit_code == 143


def test_end_group_stops_what_a_leader_left_running():
    """Packer's Ansible workers can outlive Packer: end_group returns when none runs, TERM
    first (a process that ignores it gets KILL after the grace)."""
    script = "trap '' TERM; sleep 60 & sleep 60 & exit 0"  # the children ignore TERM too
    leader = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    leader.wait()
    assert guard._group_running(leader.pid)
    started = time.monotonic()
    guard.end_group(leader.pid, grace=1.0)
    assert not guard._group_running(leader.pid)
    assert time.monotonic() - started < 5
    done = subprocess.Popen(["true"], start_new_session=True)
    done.wait()
    started = time.monotonic()
    guard.end_group(done.pid)  # nothing left: returns at once
    assert time.monotonic() - started < 1


class StepError(guard.GpubakeError):
    pass


def test_run_step_returns_stdout_and_says_a_failure_in_one_line():
    assert guard.run_step("echo", ["sh", "-c", "echo ' hi '"], StepError) == "hi"
    assert guard.run_step("cat", ["cat"], StepError, stdin="fed\n") == "fed"
    script = "echo partial; echo 'no space left\n  on device' >&2; exit 3"
    with pytest.raises(StepError) as err:
        guard.run_step("VM base disk: mmdebstrap", ["/bin/sh", "-c", script], StepError)
    assert str(err.value) == "VM base disk: mmdebstrap failed (sh): on device"


def test_run_step_past_its_timeout_stops_its_whole_group(tmp_path):
    """A step's children (mmdebstrap's apt, tar's gzip) go with it."""
    script = f"echo $$ > {tmp_path}/group; sleep 60 & echo $! > {tmp_path}/child; sleep 60"
    started = time.monotonic()
    with pytest.raises(StepError, match=r"^disk image: tar took more than 1 s$"):
        guard.run_step("disk image: tar", ["sh", "-c", script], StepError, timeout=1)
    assert time.monotonic() - started < 10
    assert not guard._group_running(int((tmp_path / "group").read_text()))
    child = Path(f"/proc/{(tmp_path / 'child').read_text().strip()}/stat")
    assert not child.exists() or child.read_text().rsplit(")", 1)[1].split()[0] == "Z"
