"""`gpubake prune`: what old builds leave behind, removed.

- **Stage images** (gpubake-stage/<stack>:<stage>-<hash>) of inputs that changed since. An
  image stays when a tagged image outside gpubake-stage/ (gpubake/<stack>:<tag>, a user's
  own tag) or a container is built on it, and the `keep` newest of each stack's stage stay
  as they are (the next build from the same inputs reuses them). The rest lose their
  gpubake-stage tag; Docker deletes an image once no tag and no child image holds it.
- **Lock files** of the build locks no build holds (~/.cache/gpubake/locks/*.lock).
- **Scan results** cached for layers no local image has, or made by other rules.
- **uv's cache** (the wheels builds install from): `uv cache prune`, uv's own clean-up of
  what no cache entry uses.
- **Wheelhouse files** (~/.cache/gpubake/wheels, `gpubake fetch`'s) that no lock names.
- **VM disks**: disk image folders beyond the `keep` newest of each stack, and base disks of
  old inputs (gpubake.build.prune_disks), never one a build or a process uses.

What is freed is measured: the engine's layer bytes and the cache folders' sizes before and
after. A dry run lists what would go, with the bytes each image holds on its own.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.errors

from gpubake.build import guard, locks, prune_disks, wheelhouse
from gpubake.build.plan import HASH_LABEL
from gpubake.build.stages import STAGE_REPOSITORY
from gpubake.publish import scan

Say = Callable[[str], None]
_STAGE_TAG = re.compile(r"(?P<stage>[a-z][a-z0-9_]*)-[0-9a-f]{12}")


@dataclass
class Pruned:
    """What a prune removed (or, dry, would remove), and the bytes it freed."""

    images: list[dict[str, Any]] = field(default_factory=list)
    kept_in_use: list[str] = field(default_factory=list)
    lock_files: int = 0
    scan_entries: int = 0
    wheels: list[str] = field(default_factory=list)
    vm_images: list[str] = field(default_factory=list)
    base_disks: list[str] = field(default_factory=list)
    freed: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "kept_in_use": self.kept_in_use,
            "lock_files": self.lock_files,
            "scan_entries": self.scan_entries,
            "wheels": self.wheels,
            "vm_images": self.vm_images,
            "base_disks": self.base_disks,
            "freed_bytes": self.freed,
        }


def _stage_of(tag: str) -> tuple[str, str] | None:
    """(stack, stage) of a gpubake-stage tag, or None for any other tag."""
    repository, _, name = tag.rpartition(":")
    if not repository.startswith(f"{STAGE_REPOSITORY}/"):
        return None
    match = _STAGE_TAG.fullmatch(name)
    return (repository.split("/", 1)[1], match["stage"]) if match else None


def _layers(image: Any) -> tuple[str, ...]:
    return tuple(image.attrs.get("RootFS", {}).get("Layers") or ())


def _users(engine: Any) -> list[tuple[str, tuple[str, ...]]]:
    """What holds images: tagged images outside gpubake-stage/ and containers (any state),
    each as (name, its layers)."""
    held = [
        (next(t for t in image.tags if not t.startswith(f"{STAGE_REPOSITORY}/")), _layers(image))
        for image in engine.images.list()
        if any(not t.startswith(f"{STAGE_REPOSITORY}/") for t in image.tags)
    ]
    for box in engine.containers.list(all=True):
        with contextlib.suppress(docker.errors.ImageNotFound, docker.errors.NotFound):
            held.append((f"container {box.name}", _layers(box.image)))
    return held


def _own_bytes(image: Any, candidates: Iterable[Any]) -> int:
    """Bytes `image` adds on top of the largest other image it is built on."""
    mine = _layers(image)
    below = [
        int(other.attrs["Size"])
        for other in candidates
        if other.id != image.id and mine[: len(_layers(other))] == _layers(other)
    ]
    return int(image.attrs["Size"]) - max(below, default=0)


def stage_images(
    engine: Any, images: list[Any], keep: int, stacks: tuple[str, ...] = ()
) -> tuple[list[tuple[Any, list[str]]], list[str]]:
    """Of `images` (gpubake's, by their input-hash label), the stage images to untag, each
    with its gpubake-stage tags, and what stays because something is built on it. `stacks`
    limits it to those stacks' repositories."""
    users = _users(engine)
    groups: dict[tuple[str, str], list[Any]] = {}
    for image in images:
        for tag in image.tags:
            place = _stage_of(tag)
            if place and (not stacks or place[0] in stacks):
                groups.setdefault(place, []).append(image)
    remove: dict[str, tuple[Any, list[str]]] = {}
    in_use: list[str] = []
    for place, group in sorted(groups.items()):
        newest_first = sorted(group, key=lambda i: i.attrs.get("Created", ""), reverse=True)
        for image in newest_first[keep:]:
            layers = _layers(image)
            holder = next((name for name, held in users if held[: len(layers)] == layers), None)
            tags = [t for t in image.tags if _stage_of(t) == place]
            if holder is not None:
                in_use.append(f"{tags[0]} ({image.short_id}): {holder} is built on it")
            else:
                entry = remove.setdefault(image.id, (image, []))
                entry[1].extend(tags)
    return list(remove.values()), in_use


def _free_lock_files(dry_run: bool) -> int:
    count = 0
    for path in sorted(guard.lock_dir().glob("*.lock")):
        lock = guard.BuildLock("", name=path.stem)
        if not lock.try_acquire():
            continue  # a build holds it
        with lock:
            if not dry_run:
                path.unlink(missing_ok=True)
            count += 1
    return count


def _stale_scan_entries(engine: Any) -> list[Path]:
    folder = scan.cache_folder()
    if not folder.is_dir():
        return []
    layers = {d.removeprefix("sha256:") for i in engine.images.list(all=True) for d in _layers(i)}
    current = scan.rules_digest(scan.load_rules())
    stale = []
    for path in folder.glob("*.json"):
        diff_id, _, rules = path.stem.rpartition("-")
        if diff_id not in layers or rules != current:
            stale.append(path)
    return stale


def _folder_bytes(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _layer_bytes(engine: Any) -> int:
    return int(engine.df().get("LayersSize") or 0)


def prune(
    engine: Any, *, keep: int, dry_run: bool, say: Say, stacks: tuple[str, ...] = ()
) -> Pruned:
    """Remove (or list, with `dry_run`) what old builds left; see the module's docstring."""
    done = Pruned()
    house = wheelhouse.default_dir()
    before = {
        "images": _layer_bytes(engine),
        "uv_cache": _folder_bytes(locks.uv_cache_dir()),
        "wheelhouse": wheelhouse.folder_bytes(house),
    }
    everything = engine.images.list(filters={"label": HASH_LABEL})
    removable, done.kept_in_use = stage_images(engine, everything, keep, stacks)
    for image, tags in removable:
        done.images.append(
            {"id": image.short_id, "tags": sorted(tags), "bytes": _own_bytes(image, everything)}
        )
        say(f"{'would remove' if dry_run else 'removing'} {', '.join(sorted(tags))}")
        if dry_run:
            continue
        for tag in tags:
            with contextlib.suppress(docker.errors.ImageNotFound):
                engine.images.remove(tag)  # by tag: an image that gained a child only loses it
    done.lock_files = _free_lock_files(dry_run)
    stale = _stale_scan_entries(engine)
    done.scan_entries = len(stale)
    wheels = wheelhouse.unused(house)
    done.wheels = [path.name for path in wheels]
    for path in wheels:
        say(f"{'would remove' if dry_run else 'removing'} {path.name} (no lock names it)")
    disks = prune_disks.plan(keep, stacks)
    done.kept_in_use += disks.in_use
    done.vm_images = [path.name for path in disks.images]
    done.base_disks = [path.name for path in disks.base_disks]
    disk_bytes = sum(prune_disks.allocated_bytes(path) for path in disks.paths)
    for path in disks.paths:
        say(f"{'would remove' if dry_run else 'removing'} {path}")
    if not dry_run:
        for path in [*stale, *wheels]:
            path.unlink(missing_ok=True)
        for path in disks.paths:
            if path.is_dir():
                guard.remove_tree(path)  # as disk_image.finish removes a replaced folder
            else:
                path.unlink(missing_ok=True)
        subprocess.run(
            [locks.uv_binary(), "cache", "prune", "--cache-dir", str(locks.uv_cache_dir())],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        after = {
            "images": _layer_bytes(engine),
            "uv_cache": _folder_bytes(locks.uv_cache_dir()),
            "wheelhouse": wheelhouse.folder_bytes(house),
        }
        done.freed = {k: max(before[k] - after[k], 0) for k in before}
    else:
        done.freed = {
            "images": sum(i["bytes"] for i in done.images),
            "wheelhouse": sum(path.stat().st_size for path in wheels),
        }
    done.freed["vm_disks"] = disk_bytes
    return done
