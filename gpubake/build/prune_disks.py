"""What `gpubake prune` removes of the VM disks: image folders of old inputs, base disks no
build uses any more.

- **Disk images** (`--target qemu`, ~/.cache/gpubake/vm-images/<gpubake-STACK-HASH12>/): of
  each stack's folders, the `keep` newest (by their build record) stay, the others go. A
  folder stays while a build of that name runs (its lock is held) or while a process has one
  of its files open (a QEMU booting the image, an upload reading disk.raw.tar.gz).
- **Base disks** (~/.cache/gpubake/vm-base/<os>-<hash>.qcow2) of inputs that changed: a new
  gpubake (or a changed base package list) builds a new one and never reads the old again.
  The disk images do not depend on them (Packer copies the base, no backing file). Left
  alone while a base disk is being built, or open.

Sizes are what the files take on disk (allocated blocks): disk.raw is sparse.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from gpubake.build import disk_image, guard, vm_disk


@dataclass
class DiskPrune:
    """Folders and files to remove, with their bytes, and what stays in use (and why)."""

    images: list[Path] = field(default_factory=list)
    base_disks: list[Path] = field(default_factory=list)
    in_use: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [*self.images, *self.base_disks]


def allocated_bytes(path: Path) -> int:
    """Bytes a file or folder takes on disk (sparse files count their data only)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    if not path.is_dir():
        return 0
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def open_files() -> dict[Path, str]:
    """Every file a process of this machine has open (that this user may see), each with
    `process PID (NAME)`."""
    found: dict[Path, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            name = (proc / "comm").read_text(encoding="utf-8").strip()
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    found.setdefault(fd.readlink(), f"process {proc.name} ({name})")
    return found


def _user_of(path: Path, opened: dict[Path, str]) -> str | None:
    """Who has `path` (or a file under it) open, if anyone."""
    path = path.resolve()  # /proc's links are resolved paths
    return next((who for file, who in opened.items() if file == path or path in file.parents), None)


def _stack_and_age(folder: Path) -> tuple[str, float] | None:
    """(stack, when built) of a finished image folder; None for anything else."""
    record = folder / disk_image.BUILD_RECORD
    try:
        stack = json.loads(record.read_text(encoding="utf-8"))["labels"]["gpubake-stack"]
        return str(stack), record.stat().st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plan(keep: int, stacks: tuple[str, ...] = ()) -> DiskPrune:
    """What to remove; `stacks` limits the image folders to those stacks' (not base disks)."""
    done = DiskPrune()
    opened = open_files()
    groups: dict[str, list[tuple[float, Path]]] = {}
    root = disk_image.images_dir()
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        found = _stack_and_age(folder)
        if found and (not stacks or found[0] in stacks):
            groups.setdefault(found[0], []).append((found[1], folder))
    for _, group in sorted(groups.items()):
        for _, folder in sorted(group, reverse=True)[keep:]:
            user = _user_of(folder, opened)
            if user is None and _locked(disk_image.lock_key(folder.name)):
                user = "a build of it"
            if user:
                done.in_use.append(f"{folder.name}: {user} uses it")
            else:
                done.images.append(folder)
    done.base_disks = _stale_base_disks(opened, done.in_use)
    return done


def _locked(key: str) -> bool:
    """Whether a build holds the lock on `key` (one that never ran has no lock file: none is
    made here)."""
    lock = guard.BuildLock(key)
    if not lock.path.exists():
        return False
    if not lock.try_acquire():
        return True
    lock.release()
    return False


def _stale_base_disks(opened: dict[Path, str], in_use: list[str]) -> list[Path]:
    folder = vm_disk.base_dir()
    if not folder.is_dir():
        return []
    if _locked(vm_disk.LOCK_KEY):
        in_use.append("base disks: a base disk is being built")
        return []
    current = {vm_disk.base_disk_path(key).name for key in vm_disk.SUPPORTED}
    stale = []
    for disk in sorted(folder.glob("*.qcow2")):
        if disk.name in current:
            continue
        user = _user_of(disk, opened)
        if user:
            in_use.append(f"{disk.name}: {user} uses it")
        else:
            stale.append(disk)
    # checksum memos (disk_image.sha256_of) of disks that are gone or go now
    for memo in sorted(folder.glob("*.qcow2.sha256")):
        disk = memo.with_suffix("")
        if disk in stale or not disk.exists():
            stale.append(memo)
    return stale
