"""`gpubake prune` on a real engine: a stack's old stage images go, the newest stays, and so
does every one that a tagged image or a container is built on; lock files of free locks go,
a held one stays; scan results of layers no image has, or of other rules, go; so do the
wheelhouse's files that no lock names. Tiny images
of a stack no one builds (zz-prune), and the command's caches in a folder of the test's own
(XDG_CACHE_HOME), so nothing of the rest of the suite is touched."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from contextlib import suppress

import docker
import pytest

from gpubake.build import disk_image, guard, vm_disk
from gpubake.build.plan import HASH_LABEL
from gpubake.publish import scan
from tests.integration.helpers import base_image, tiny_image

pytestmark = [pytest.mark.docker]
STACK = "zz-prune"
REPO = f"gpubake-stage/{STACK}"
FINAL = f"gpubake/{STACK}:itest"


@pytest.fixture(scope="module")
def world(engine):
    """Four env stages of STACK, oldest first: `unused` (nothing on it), `tagged` (FINAL is
    built on it), `boxed` (a container of it exists) and `newest`."""
    base = base_image(engine)
    made = {}
    for n, name in enumerate(("unused", "tagged", "boxed", "newest")):
        digest = f"{n:x}" * 64
        made[name] = tiny_image(
            engine, base, f"{REPO}:env-{digest[:12]}", {HASH_LABEL: digest}, name
        )
        time.sleep(1.1)  # the engine dates images in whole seconds: their order is known
    tiny_image(engine, made["tagged"].id, FINAL, {}, "final")
    box = engine.containers.create(made["boxed"].id, ["true"], name="gpubake-test-prune-box")
    yield made
    box.remove(force=True)
    for ref in [FINAL, *(t for i in engine.images.list(name=REPO) for t in i.tags)]:
        with suppress(docker.errors.APIError):
            engine.images.remove(ref)


def prune(cache, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpubake", "prune", "--stack", STACK, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "XDG_CACHE_HOME": str(cache)},
        check=False,
    )


def exists(engine, image) -> bool:
    try:
        engine.images.get(image.id)
    except docker.errors.ImageNotFound:
        return False
    return True


def test_dry_run_lists_and_removes_nothing_then_prune_keeps_what_is_used(engine, world, tmp_path):
    dry = prune(tmp_path, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    listed = json.loads(dry.stdout)
    assert [i["id"] for i in listed["images"]] == [world["unused"].short_id]
    assert listed["images"][0]["bytes"] > 0  # its own layer, not the base's
    assert all(exists(engine, image) for image in world.values())

    done = prune(tmp_path, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [i["id"] for i in report["images"]] == [world["unused"].short_id]
    assert not exists(engine, world["unused"])
    assert all(exists(engine, world[n]) for n in ("tagged", "boxed", "newest"))
    kept = "\n".join(report["kept_in_use"])
    assert FINAL in kept and "container gpubake-test-prune-box" in kept

    # --keep 0: the newest goes too, what is in use never
    done = prune(tmp_path, "--keep", "0")
    assert done.returncode == 0, done.stderr
    assert not exists(engine, world["newest"])
    assert exists(engine, world["tagged"]) and exists(engine, world["boxed"])
    assert "1 stage image(s)" in done.stdout and "freed" in done.stdout


def test_lock_files_of_free_locks_and_stale_scan_results_go(engine, world, tmp_path, monkeypatch):
    locks = tmp_path / "gpubake" / "locks"
    locks.mkdir(parents=True)
    (locks / "output-free.lock").write_text("gpubake (pid 1)\noutput-x\n")
    held = locks / "output-held.lock"
    held.write_text("gpubake (pid 2)\noutput-y\n")
    results = tmp_path / "gpubake" / "scan"
    results.mkdir(parents=True)
    layer = world["tagged"].attrs["RootFS"]["Layers"][-1].removeprefix("sha256:")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # where prune looks, as it does
    rules = scan.rules_digest(scan.load_rules())
    assert scan.cache_folder() == results and guard.lock_dir() == locks
    keep = results / f"{layer}-{rules}.json"
    gone = [results / f"{'e' * 64}-{rules}.json", results / f"{layer}-{'0' * 16}.json"]
    for path in (keep, *gone):
        path.write_text("{}")
    # the wheelhouse: a file a lock names (one re-resolved into the cache) stays, one no
    # lock names goes
    wheels = tmp_path / "gpubake" / "wheels"
    wheels.mkdir(parents=True)
    named, stray = wheels / "demo-1.0-py3-none-any.whl", wheels / "old-0.1-py3-none-any.whl"
    named.write_bytes(b"named by a lock")
    stray.write_bytes(b"named by none")
    digest = hashlib.sha256(named.read_bytes()).hexdigest()
    resolved = locks / "zz-prune" / "debian-12-x86_64-000000000000.txt"
    resolved.parent.mkdir()
    resolved.write_text(f"demo==1.0 \\\n    --hash=sha256:{digest}\n")
    with held.open("a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        done = prune(tmp_path, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["lock_files"], report["scan_entries"]) == (1, 2)
    assert sorted(p.name for p in locks.glob("*.lock")) == ["output-held.lock"]
    assert keep.exists() and not any(p.exists() for p in gone)
    assert report["wheels"] == [stray.name] and named.exists() and not stray.exists()
    assert report["freed_bytes"]["wheelhouse"] == len(b"named by none")


def _vm_image(root, name: str, stack: str, built_at: float, data: bytes) -> None:
    """An image folder as `--target qemu` leaves it: a build record, a qcow2, a sparse raw."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / f"{name}.qcow2").write_bytes(data)
    with (folder / "disk.raw").open("wb") as raw:
        raw.truncate(2**30)  # 1 GiB of holes: it takes no room, and is not counted as if
    record = folder / disk_image.BUILD_RECORD
    record.write_text(json.dumps({"labels": {"gpubake-stack": stack}}))
    os.utime(record, (built_at, built_at))


def test_old_vm_disk_images_and_base_disks_go_unless_in_use(engine, world, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # where prune looks, as it does
    images, bases = disk_image.images_dir(), vm_disk.base_dir()
    now = time.time()
    names = ("gpubake-zz-prune-d", "gpubake-zz-prune-c", "gpubake-zz-prune-b", "gpubake-zz-prune-a")
    for age, name in enumerate(names):
        _vm_image(images, name, STACK, now - 100 * age, b"q" * 8192)
    # a build of -c runs (--force): it holds the image's lock
    building = guard.BuildLock(disk_image.lock_key("gpubake-zz-prune-c"))
    assert building.try_acquire()
    _vm_image(images, "gpubake-other-a", "other", now - 1000, b"o")  # not --stack's
    (images / "not-an-image").mkdir()  # no build record: not gpubake's, left alone
    current = vm_disk.base_disk_path("debian-12")
    old = bases / "debian-12-0000000000000000.qcow2"
    bases.mkdir(parents=True)
    for disk in (current, old):
        disk.write_bytes(b"d" * 4096)
        disk.with_name(disk.name + ".sha256").write_text("memo")
    orphan = bases / "debian-12-1111111111111111.qcow2.sha256"
    orphan.write_text("memo")
    # a QEMU of the oldest image still running: it keeps its qcow2 open
    qcow2 = images / "gpubake-zz-prune-a" / "gpubake-zz-prune-a.qcow2"
    holder = subprocess.Popen(["sh", "-c", 'exec 3<"$1"; echo open; exec sleep 120', "sh", qcow2],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        dry = prune(tmp_path, "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        assert json.loads(dry.stdout)["vm_images"] == ["gpubake-zz-prune-b"]
        assert (images / "gpubake-zz-prune-b").is_dir() and old.exists()

        done = prune(tmp_path, "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
    finally:
        holder.kill()
        holder.wait()
        building.release()
    assert report["vm_images"] == ["gpubake-zz-prune-b"]
    assert sorted(p.name for p in images.iterdir()) == [
        "gpubake-other-a", "gpubake-zz-prune-a", "gpubake-zz-prune-c", "gpubake-zz-prune-d",
        "not-an-image",
    ]  # fmt: skip
    kept = "\n".join(report["kept_in_use"])
    assert f"gpubake-zz-prune-a: process {holder.pid} (sleep) uses it" in kept
    assert "gpubake-zz-prune-c: a build of it uses it" in kept
    assert report["base_disks"] == [old.name, f"{old.name}.sha256", orphan.name]
    assert sorted(p.name for p in bases.iterdir()) == [current.name, f"{current.name}.sha256"]
    # what the files took on disk: the qcow2's data, the base disk and memos, not the holes
    assert 8192 + 4096 <= report["freed_bytes"]["vm_disks"] < 2**20
