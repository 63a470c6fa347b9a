"""What keeps a build's mess from outliving it.

- A lock per output (an image tag, a stage's input hash, a base image): two builds of the
  same output run one after the other, builds of different outputs at once.
- Every build container is labelled with the lock its build holds, and every work dir (the
  Ansible variables, Packer's temporary files, a debootstrap root) lives under gpubake's
  cache, named after that lock.
- A lock is an flock(2) on a file under the cache, which the kernel releases when its holder
  dies, even by SIGKILL: "its lock is free" is exactly "its build is gone". The next build
  removes what such a build left (`remove_leftovers`) and says so.
- SIGTERM is handled as Ctrl-C is: both unwind the build through its cleanup and end with
  one line, "interrupted: ...", and exit 130 or 143.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from gpubake import GpubakeError, one_line, resources
from gpubake.build.labels import HASH_LABEL, LABEL_PREFIX

#: On build containers: the key of the lock their build holds while they exist.
LOCK_LABEL = f"{LABEL_PREFIX}.build-lock"
#: The tag a container image's last stage gets until gpu-smoke's labels and the secret scan
#: are done; only then is the asked tag moved onto it (`gpubake-stage/<stack>:output-<hash>`).
STAGED_TAG_PREFIX = "output-"

Say = Callable[[str], None]


def lock_dir() -> Path:
    return resources.cache_dir() / "locks"


def work_root() -> Path:
    return resources.cache_dir() / "work"


def output_key(image_ref: str) -> str:
    return f"output-{image_ref}"


def stage_key(input_hash: str) -> str:
    return f"stage-{input_hash}"


def base_key(image_ref: str) -> str:
    return f"base-{image_ref}"


def slug(key: str) -> str:
    """A short file name for `key` (its kind and a digest, no '.'): Packer's plugin sockets
    live in the work dir named after it, and a socket's path has at most 107 bytes."""
    kind = re.sub(r"[^a-z]", "", key.split("-", 1)[0])[:8]
    return f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


class BuildLock:
    """An exclusive lock on one output, held by this process until release()."""

    def __init__(self, key: str, name: str | None = None) -> None:
        self.key = key
        self.slug = name or slug(key)
        self.path = lock_dir() / f"{self.slug}.lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def try_acquire(self) -> bool:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._took(fd)
        return True

    def acquire(self, say: Say, what: str) -> bool:
        """Take the lock, waiting (and saying so) while another build holds it; returns
        whether it waited."""
        if self.try_acquire():
            return False
        holder = holder_of(self.path)
        say(f"waiting for {holder} to finish {what} ...")
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # Ctrl-C still interrupts the wait
        except BaseException:
            os.close(fd)
            raise
        self._took(fd)
        return True

    def _took(self, fd: int) -> None:
        self._fd = fd
        if not self.key:
            return  # taken by its file name only (a leftover's): leave what it says
        holder = f"gpubake (pid {os.getpid()} on {socket.gethostname()})\n{self.key}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> BuildLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock_text(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []


def holder_of(path: Path) -> str:
    """Who holds (or last held) the lock in `path`: its first line."""
    return next(iter(_lock_text(path)), "") or "another gpubake build"


def key_of(path: Path) -> str:
    """The key of the lock in `path`: its second line ('' if unknown)."""
    lines = _lock_text(path)
    return lines[1] if len(lines) > 1 else ""


@contextlib.contextmanager
def held(key: str, say: Say, what: str) -> Iterator[bool]:
    """The lock on `key` for the block; yields whether it had to wait for it."""
    lock = BuildLock(key)
    waited = lock.acquire(say, what)
    try:
        yield waited
    finally:
        lock.release()


@contextlib.contextmanager
def work_dir(key: str) -> Iterator[Path]:
    """A private directory under the cache for the holder of the lock on `key`, removed at
    the end of the block (however it ends); one a killed build left is removed by the next
    build, which finds its lock free."""
    path = work_root() / f"{slug(key)}.{os.getpid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=False)
    try:
        yield path
    finally:
        remove_tree(path)


def remove_tree(path: Path) -> None:
    """rm -rf, after unmounting what a killed debootstrap left mounted inside (/proc, /sys)."""
    mounted = [
        Path(line.split()[1].replace("\\040", " "))
        for line in Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines()
    ]
    inside = sorted((m for m in mounted if m.is_relative_to(path)), key=lambda m: -len(m.parts))
    for mount in inside:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
    for _ in range(10):  # a file written meanwhile makes rmtree miss its folder: again
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.2)


def _group_running(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies, which only wait to be reaped
    by init, do not count)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):  # gone meanwhile
            state, _ppid, group = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            if int(group) == pgid and state != "Z":
                return True
    return False


def end_group(pgid: int, grace: float = 5.0) -> None:
    """Return once nothing of process group `pgid` runs. Called when its leader (Packer) has
    ended: what it left (Ansible's workers, an SSH control master) gets SIGTERM, then SIGKILL
    after `grace` seconds; so nothing still writes into a build's work dir when it is removed."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        if not _group_running(pgid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while _group_running(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)


def stop_group(proc: subprocess.Popen[Any], grace: float = 30.0) -> None:
    """Stop a step started in a process group of its own (run_step): SIGTERM to the group,
    SIGKILL to what is left after `grace` seconds; returns when nothing of it runs."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=grace)  # reaps the leader, once its pipes close
    end_group(proc.pid)  # what outlived the leader, or ignored SIGTERM
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def run_step(
    what: str,
    cmd: list[str],
    error: type[GpubakeError],
    *,
    stdin: str | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
) -> str:
    """Run one step of a build in a process group of its own, stopped whole (stop_group)
    when the build is interrupted or the step runs past `timeout`; returns its stdout,
    stripped. A failure raises `error`, one line: "WHAT failed (COMMAND): its last line"."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=die_with_parent,  # gpubake starts no threads of its own
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except BaseException as exc:
        with uninterruptible():
            stop_group(proc)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise error(f"{what} took more than {timeout:g} s") from None
        raise
    if proc.returncode != 0:
        tail = (err.strip() or out.strip()).splitlines()[-1:] or ["no output"]
        raise error(f"{what} failed ({Path(cmd[0]).name}): {one_line(tail[0])}")
    return out.strip()


# --------------------------------------------------------------------------- signals


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C (KeyboardInterrupt) through every cleanup."""


class BuildInterruptedError(GpubakeError):
    """A build stopped by SIGINT or SIGTERM, after its cleanup: one line, "interrupted: ...",
    and the exit code a shell gives a command killed by that signal (128 + its number).
    Not a KeyboardInterrupt: click would turn that into a bare "aborted"."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(f"interrupted: {message}")
        self.exit_code = exit_code


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Cleanup that a second Ctrl-C or SIGTERM must not cut short."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def signal_of(exc: KeyboardInterrupt) -> signal.Signals:
    return signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn of long-running children (Packer, debootstrap): SIGINT when gpubake dies,
    even by SIGKILL, so that they clean up and stop instead of building on as orphans."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)


# --------------------------------------------------------------------------- leftovers


def _free(key_slug: str) -> BuildLock | None:
    """The lock named `key_slug`, taken, when no build holds it (else None)."""
    lock = BuildLock("", name=key_slug)
    return lock if lock.try_acquire() else None


def _stage_hashes(keys: set[str]) -> set[str]:
    """The input hashes of the stage locks among `keys`."""
    return {m[1] for key in keys if (m := re.fullmatch(r"stage-([0-9a-f]{64})", key))}


def remove_leftovers(engine: Any, say: Say) -> list[str]:
    """Remove what builds that are gone left behind: their labelled build containers, their
    work dirs, and the half-finished images of the stages they were building (untagged
    commits, last stages not yet moved to their tag). Says what it removed."""
    import docker.errors

    removed: list[str] = []
    stale_keys: set[str] = set()
    boxes = engine.containers.list(all=True, filters={"label": LOCK_LABEL})
    dirs = sorted(work_root().glob("*.*")) if work_root().is_dir() else []
    for box in boxes:
        # a committed build container passes its label on to the image: a container of any
        # gpubake image (a user's notebook, a test's host) has it too, and is not a build's
        if not box.name.startswith("gpubake-build-"):
            continue
        key = box.labels.get(LOCK_LABEL, "")
        lock = _free(slug(key))
        if lock is None:
            continue  # its build is running
        with lock, contextlib.suppress(docker.errors.NotFound):
            box.remove(force=True)
            removed.append(f"build container {box.name}")
            stale_keys.add(key)
    for path in dirs:
        key_slug = path.name.rsplit(".", 1)[0]
        lock = _free(key_slug)
        if lock is None:
            continue
        with lock:
            remove_tree(path)
            stale_keys.add(key_of(lock.path))
        removed.append(f"work dir {path}")
    removed += remove_stage_images(engine, _stage_hashes(stale_keys))
    if removed:
        say(f"removed what an interrupted build left: {', '.join(removed)}")
    return removed


def remove_stage_images(engine: Any, hashes: set[str]) -> list[str]:
    """Untagged commits and staged last stages of the stages with these input hashes."""
    import docker.errors

    removed = []
    for digest in hashes:
        for image in engine.images.list(filters={"label": f"{HASH_LABEL}={digest}"}):
            staged = [t for t in image.tags if t.rsplit(":", 1)[-1].startswith(STAGED_TAG_PREFIX)]
            if image.tags and staged != image.tags:
                continue  # a finished image (a stage's own tag, an output tag)
            with contextlib.suppress(docker.errors.APIError):
                for tag in staged:
                    engine.images.remove(tag, noprune=False)
                if not staged:
                    engine.images.remove(image.id, noprune=False)
                removed.append(f"unfinished image {image.short_id}")
    return removed
