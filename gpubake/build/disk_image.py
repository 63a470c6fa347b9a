"""Target `qemu`: what a local VM disk image needs besides the shared VM build (vm.pkr.hcl).

Before Packer: gpubake's base disk (gpubake.build.vm_disk) and its SHA-256, the accelerator
(KVM where it runs a guest, TCG otherwise) and a throwaway login key for the build. After
Packer (the sealed VM powered itself off): the qcow2, a raw copy, GCP's `disk.raw` tar.gz,
and beside them the image's manifest, SBOM and gpu-smoke report (read from the sealed disk)
and build.json (input hash, stack, sizes, checksums). The folder is written under a temporary
name and renamed when complete, so that a folder under `images_dir()` is always whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from gpubake import GpubakeError, resources
from gpubake.build import guard, vm_disk
from gpubake.build.hashing import file_sha256
from gpubake.build.plan import SBOM_PATH, SMOKE_REPORT

Echo = Callable[[str], None]

#: relative to Packer's working directory (the rendered template in the build's work dir)
SSH_KEY_DIR = "../ssh"
OUTPUT_DIR = "../output"
MANIFEST_PATH = "/etc/gpubake/manifest.json"  # role manifest's manifest_path
#: the files of the sealed image put beside it (read from its root file system)
META_FILES = (MANIFEST_PATH, SBOM_PATH, SMOKE_REPORT)
BUILD_RECORD = "build.json"
#: GCP imports a gzip'd tar holding one file named disk.raw (oldgnu format, sparse)
GCP_TAR = "disk.raw.tar.gz"
ACCEL_ENV = "GPUBAKE_QEMU_ACCEL"
ROOT_OFFSET = vm_disk.PART_START * 512
QEMU = "qemu-system-x86_64"
KVM_PROBE_S = 30


class DiskImageError(GpubakeError):
    """A local disk image cannot be built or finished."""


def images_dir() -> Path:
    return resources.cache_dir() / "vm-images"


def image_dir(name: str) -> Path:
    return images_dir() / name


def lock_key(name: str) -> str:
    """The lock a build of image `name` holds (gpubake prune leaves its folder alone)."""
    return guard.output_key(f"qemu:{name}")


def built(name: str, input_hash: str) -> Path | None:
    """The folder of an image already built from these inputs, if there is one."""
    record = image_dir(name) / BUILD_RECORD
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.parent if data.get("input_hash") == input_hash else None


def accelerator(disk: Path | None, environ: Mapping[str, str] = os.environ) -> str:
    """kvm or tcg: GPUBAKE_QEMU_ACCEL when set; tcg without a usable /dev/kvm; else whether
    `disk` boots under KVM, found out once per kernel and QEMU (some hosts have a /dev/kvm
    that cannot run a stock guest: it stalls in the BIOS). No disk: the verdict found before,
    or kvm."""
    forced = environ.get(ACCEL_ENV, "").strip().lower()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise DiskImageError(f"{ACCEL_ENV}={forced}: use kvm or tcg")
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    probe = vm_disk.base_dir() / "kvm-probe.json"
    key = f"{os.uname().release} {_qemu_version()}"
    with contextlib.suppress(OSError, ValueError):
        found = json.loads(probe.read_text(encoding="utf-8"))
        if found.get("key") == key:
            return "kvm" if found["boots"] else "tcg"
    if disk is None:
        return "kvm"
    boots = _boots_under_kvm(disk)
    probe.write_text(json.dumps({"key": key, "boots": boots}) + "\n", encoding="utf-8")
    return "kvm" if boots else "tcg"


def _qemu_version() -> str:
    done = subprocess.run(
        [QEMU, "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    return done.stdout.splitlines()[0] if done.stdout else "unknown"


def _boots_under_kvm(disk: Path) -> bool:
    """Whether the kernel of `disk` starts under KVM within KVM_PROBE_S (a few seconds where
    KVM works); the disk is not written (-snapshot)."""
    with tempfile.TemporaryDirectory(prefix="gpubake-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        cmd = [
            *(QEMU, "-accel", "kvm", "-m", "512", "-display", "none", "-monitor", "none"),
            *("-nic", "none", "-snapshot", "-serial", f"file:{serial}"),
            *("-drive", f"file={disk},if=virtio,format=qcow2"),
        ]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=guard.die_with_parent,  # gpubake starts no threads of its own
        )
        try:
            deadline = time.monotonic() + KVM_PROBE_S
            while time.monotonic() < deadline and proc.poll() is None:
                if serial.is_file() and b"Linux version" in serial.read_bytes():
                    return True
                time.sleep(0.5)
            return False
        finally:
            with guard.uninterruptible():
                proc.kill()
                proc.wait()


def sha256_of(path: Path) -> str:
    """The file's SHA-256, kept beside it (`<file>.sha256`) for as long as it is unchanged."""
    sidecar = path.with_name(path.name + ".sha256")
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    if sidecar.is_file():
        stored, _, digest = sidecar.read_text(encoding="utf-8").strip().partition(" ")
        if stored == stamp and len(digest) == 64:
            return digest
    digest = file_sha256(path)
    sidecar.write_text(f"{stamp} {digest}\n", encoding="utf-8")
    return digest


def machine_vars(os_key: str, echo: Echo) -> dict[str, Any]:
    """The Packer variables this machine gives the build: the base disk (made on the first
    build, about 2 minutes), its checksum and the accelerator."""
    disk = vm_disk.ensure_base_disk(os_key, echo)
    return {
        "qemu_base_disk": str(disk),
        "qemu_base_disk_sha256": sha256_of(disk),
        "qemu_accelerator": accelerator(disk),
        "qemu_ssh_key_dir": SSH_KEY_DIR,
        "qemu_output_dir": OUTPUT_DIR,
    }


def render_vars(os_key: str, placeholder: str) -> dict[str, Any]:
    """The machine's variables for `gpubake render`: the base disk when it is built already
    (a build makes it), else placeholders; paths relative to the rendered folder, in which
    `prepare` makes the build's key and download folder."""
    disk = vm_disk.base_disk_path(os_key)
    return {
        "qemu_base_disk": str(disk) if disk.is_file() else placeholder,
        "qemu_base_disk_sha256": sha256_of(disk) if disk.is_file() else placeholder,
        "qemu_accelerator": accelerator(None),
        "qemu_ssh_key_dir": "ssh",
        "qemu_output_dir": "output",
    }


def prepare(scratch: Path) -> None:
    """The build's login key (it goes to the VM through fw_cfg, and the seal removes the
    user it logs in as)."""
    keys = scratch / "ssh"
    keys.mkdir(mode=0o700, exist_ok=True)
    (keys / "id_ed25519").unlink(missing_ok=True)  # a render written again
    (keys / "id_ed25519.pub").unlink(missing_ok=True)
    _run(
        "the build's login key",
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gpubake-build", "-f", "id_ed25519"],
        keys,
    )


def finish(scratch: Path, name: str, record: Mapping[str, Any], echo: Echo) -> Path:
    """The image folder from what Packer left in `scratch`: qcow2, raw, tar.gz, metadata."""
    qcow2 = scratch / "output" / f"{name}.qcow2"
    if not qcow2.is_file():
        raise DiskImageError(f"Packer left no {qcow2.name} in its output directory")
    staging = scratch / "image"
    staging.mkdir()
    qcow2.replace(staging / qcow2.name)
    echo("writing the raw disk and GCP's disk.raw.tar.gz ...")
    raw = staging / "disk.raw"
    convert = ["qemu-img", "convert", "-O", "raw", qcow2.name, raw.name]
    _run("the raw disk", convert, staging, timeout=1800)
    _run(GCP_TAR, ["tar", "--format=oldgnu", "-Szcf", GCP_TAR, raw.name], staging, timeout=3600)
    for path in META_FILES:  # from the sealed image itself (its root is partition 1)
        out = staging / PurePosixPath(path).name
        dump = ["debugfs", "-R", f"dump {path} {out.name}", f"{raw.name}?offset={ROOT_OFFSET}"]
        _run(f"reading {path}", dump, staging)
        if not out.is_file() or not out.stat().st_size:
            raise DiskImageError(f"the sealed image has no {path}")
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(staging.iterdir()):
        files[path.name] = {"bytes": path.stat().st_size}
        if path != raw:  # the raw disk's hash would read 40 GiB of mostly holes
            files[path.name]["sha256"] = file_sha256(path)  # made just now: no memo
    (staging / BUILD_RECORD).write_text(
        json.dumps({**record, "files": files}, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    target = image_dir(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # --force: the old folder goes once the new one is whole
        old = target.with_name(f".{name}.old.{os.getpid()}")
        target.replace(old)
        guard.remove_tree(old)
    staging.replace(target)
    return target


def _run(what: str, cmd: list[str], cwd: Path, timeout: int = 120) -> None:
    guard.run_step(f"disk image: {what}", cmd, DiskImageError, cwd=cwd, timeout=timeout)
