"""The base disk of gpubake's local VMs: Debian 12 that boots under QEMU, made by gpubake.

The Debian installer cannot be used here (the mirror lacks its .udeb files), so the root is
made with `mmdebstrap --variant=minbase` straight into the ext4 partition of a raw disk
(sfdisk, `losetup --partscan`, mkfs.ext4), GRUB is installed from a chroot, and the disk is
converted to qcow2. It is cached under `cache_dir()/vm-base`, named by a hash of everything
that goes into it, and renamed into place only when complete; loop devices and mounts are
released however the build ends (Ctrl-C and SIGTERM included), and the next build detaches
what a killed one left.

Choices:
- Network: systemd-networkd with one `.network` file for `en*`/`eth*` (DHCP), whatever name
  the NIC gets, and systemd-resolved for the DNS server DHCP gives: nothing to install
  (ifupdown is not in minbase) and no `net.ifnames=0` to keep in step with the NIC.
- Serial console on ttyS0 (GRUB and kernel), so a boot can be read from QEMU's `-serial`.
- No keys in the cached disk: its SSH host keys are removed and /etc/machine-id is empty.
  The unit `gpubake-firstboot.service` runs at every boot, before ssh: `ssh-keygen -A`, and
  the build user `builder` (passwordless sudo) gets the key QEMU passes as
  `-fw_cfg name=opt/gpubake/authorized_key,string=<public key>` (module qemu_fw_cfg).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import yaml

from gpubake import GpubakeError, resources, stacks
from gpubake.build import guard

Echo = Callable[[str], None]

SUPPORTED = ("debian-12",)
#: a new value makes a new disk (for changes not seen in the inputs hashed below)
FORMAT = "1"
DISK_SIZE_GIB = 40  # sparse: the qcow2 holds only what is written (about 1 GB)
PART_START = 2048  # sectors: the root partition starts at 1 MiB
PACKAGES = (
    "linux-image-amd64",
    "systemd-sysv",
    "udev",
    "openssh-server",
    "sudo",
    "grub-pc",
    "dbus",
    "python3",  # Ansible's modules run on it
    "python3-apt",  # and its apt module (role common installs it where missing)
    "systemd-resolved",  # DNS from networkd's DHCP lease
)
#: The Debian packages the roles of every VM image install, read from the roles' own vars:
#: in the base disk mmdebstrap installs them at native speed, and the roles find them there
#: (emulated by TCG, each apt run of the build costs minutes). (role, vars file, variables)
ROLE_PACKAGES = (
    ("base", "vars/Debian.yml", ("__base_packages", "__base_workstation_packages")),
    ("python_env", "vars/main.yml", ("__python_env_os_packages",)),
    ("job_runner", "vars/main.yml", ("__job_runner_apt_packages",)),
)
#: the build's login user (passwordless sudo); a sealed disk image has it no more
#: (images/qemu.pkr.hcl's shutdown command removes it): not the image's user `gpubake`
USER = "builder"
KEY_FW_CFG = "opt/gpubake/authorized_key"
LOCK_KEY = "vm-base"

NETWORK = """\
[Match]
Name=en* eth*

[Network]
DHCP=yes
"""
GRUB = """\
GRUB_TIMEOUT=0
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8"
GRUB_CMDLINE_LINUX_DEFAULT=""  # not "quiet": the boot is read from the serial port
# root=UUID= without /dev/disk/by-uuid (no udev in the build's chroot)
GRUB_DISABLE_LINUX_UUID=true
GRUB_DEVICE="UUID={uuid}"
"""
FIRSTBOOT = f"""\
#!/bin/sh
# gpubake-firstboot (every boot): SSH host keys, and the key QEMU passes through fw_cfg
set -eu
ssh-keygen -A
key=/sys/firmware/qemu_fw_cfg/by_name/{KEY_FW_CFG}/raw
modprobe qemu_fw_cfg 2>/dev/null || true
# (a sealed image has no build user: its logins are the cloud's or the owner's)
if [ -r "$key" ] && id -u {USER} >/dev/null 2>&1; then
    install -d -m 700 -o {USER} -g {USER} /home/{USER}/.ssh
    {{ cat "$key"; echo; }} > /home/{USER}/.ssh/authorized_keys.new
    chown {USER}:{USER} /home/{USER}/.ssh/authorized_keys.new
    chmod 600 /home/{USER}/.ssh/authorized_keys.new
    mv /home/{USER}/.ssh/authorized_keys.new /home/{USER}/.ssh/authorized_keys
fi
"""
UNIT = """\
[Unit]
Description=gpubake: SSH host keys and the authorized key from QEMU's fw_cfg
Before=ssh.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/gpubake-firstboot

[Install]
WantedBy=multi-user.target
"""
CHROOT_SCRIPT = f"""\
set -eu
# a system UID: 1000 is the image's own user's (role base)
useradd --system --create-home --shell /bin/bash --groups sudo {USER}
echo '{USER} ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/{USER}
chmod 440 /etc/sudoers.d/{USER}
systemctl enable systemd-networkd systemd-resolved gpubake-firstboot
rm -f /etc/ssh/ssh_host_*
grub-install --target=i386-pc "$1"
update-grub
"""

#: tool -> the Debian package that has it
TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "qemu-img": "qemu-utils",
    "sfdisk": "fdisk",
    "losetup": "mount",
    "partx": "util-linux",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",  # gpubake.build.disk_image reads the sealed image's files
    "mount": "mount",
}


class VmDiskError(GpubakeError):
    """The VM base disk cannot be made (unsupported OS, a missing tool, a failed step)."""


def _sources(osinfo: stacks.OsInfo) -> list[str]:
    assert osinfo.debootstrap is not None
    suite, mirror = osinfo.debootstrap["suite"], osinfo.debootstrap["mirror"]
    security = mirror.replace("/debian", "/debian-security")
    return [
        f"deb {mirror} {suite} main",
        f"deb {mirror} {suite}-updates main",
        f"deb {security} {suite}-security main",
    ]


@functools.cache
def packages() -> tuple[str, ...]:
    """PACKAGES, then ROLE_PACKAGES' (each once, in order); read once per process, as
    hashing.data_digest reads the data root (it does not change while gpubake runs)."""
    found = list(PACKAGES)
    for role, rel, names in ROLE_PACKAGES:
        path = resources.data_root() / "roles" / role / rel
        variables = yaml.safe_load(path.read_text(encoding="utf-8"))
        for name in names:
            found += [package for package in variables[name] if package not in found]
    return tuple(found)


def inputs_hash(osinfo: stacks.OsInfo) -> str:
    assert osinfo.debootstrap is not None
    inputs = {
        "format": FORMAT,
        "suite": osinfo.debootstrap["suite"],
        "sources": _sources(osinfo),
        "packages": packages(),
        "size_gib": DISK_SIZE_GIB,
        "files": [NETWORK, GRUB, FIRSTBOOT, UNIT, CHROOT_SCRIPT],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def base_image_id(os_key: str) -> str:
    """What a disk image's input hash takes from its base disk (known before it is built)."""
    check_supported(os_key)
    return f"vm-base:{os_key}-{inputs_hash(stacks.get_os(os_key))}"


def base_image_name(os_key: str) -> str:
    """How a disk image's plan names its base (the `base image` of a dry run)."""
    return f"gpubake base disk {os_key}"


def check_supported(os_key: str) -> None:
    if os_key not in SUPPORTED:
        raise VmDiskError(
            f"gpubake makes local VM disks for {', '.join(SUPPORTED)} only, not {os_key!r}: "
            "use --os debian-12"
        )


def base_dir() -> Path:
    return resources.cache_dir() / "vm-base"


def base_disk_path(os_key: str) -> Path:
    """Where the base disk of `os_key` is (once built) for the current inputs."""
    check_supported(os_key)
    return base_dir() / f"{os_key}-{inputs_hash(stacks.get_os(os_key))}.qcow2"


def ensure_base_disk(os_key: str, echo: Echo) -> Path:
    """The qcow2 base disk for `os_key`, built once per set of inputs (about 2 minutes)."""
    target = base_disk_path(os_key)
    osinfo = stacks.get_os(os_key)
    if target.is_file():
        return target
    for tool, package in TOOLS.items():
        if not shutil.which(tool):
            raise VmDiskError(
                f"{tool} not found (needed to build the VM base disk): "
                f"install it with apt-get install -y {package}"
            )
    if os.geteuid() != 0:
        raise VmDiskError("building the VM base disk needs root (loop devices, mounts, chroot)")
    with guard.sigterm_interrupts(), guard.held(LOCK_KEY, echo, "the VM base disk"):
        if not target.is_file():  # else made by the build this one waited for
            _remove_leftovers()
            _build(osinfo, target, echo)
    return target


def _build(osinfo: stacks.OsInfo, target: Path, echo: Echo) -> None:
    with guard.work_dir(LOCK_KEY) as work:
        raw, root = work / "disk.raw", work / "root"
        root.mkdir()
        with raw.open("wb") as disk:
            disk.truncate(DISK_SIZE_GIB * 2**30)
        _run(
            "partition the disk",
            ["sfdisk", "--quiet", str(raw)],
            f"start={PART_START}, type=83, bootable\n",
        )
        undo = contextlib.ExitStack()  # detach and unmount, last in first out
        try:
            loop = _run("attach the disk", ["losetup", "--find", "--show", "--partscan", str(raw)])
            undo.callback(_run, "detach the disk", ["losetup", "--detach", loop])
            part = _partition(loop)
            fs_uuid = str(uuid.uuid4())
            _run("format the root", ["mkfs.ext4", "-q", "-L", "root", "-U", fs_uuid, part])
            _mount(undo, [part, str(root)])
            echo("building the Debian 12 base disk with mmdebstrap (about 2 minutes, once) ...")
            _run("mmdebstrap", _mmdebstrap_cmd(osinfo, root), timeout=1800)
            _configure(root, fs_uuid)
            for sub in ("dev", "proc", "sys"):
                _mount(undo, ["--bind", f"/{sub}", str(root / sub)])
            echo("installing GRUB on the base disk ...")
            _run("install GRUB", ["chroot", str(root), "sh", "-c", CHROOT_SCRIPT, "-", loop])
            _check_root(root, fs_uuid)
            subprocess.run(["fstrim", str(root)], capture_output=True, check=False, timeout=120)
        finally:
            with guard.uninterruptible():
                undo.close()
        echo("converting the base disk to qcow2 ...")
        qcow2 = work / "disk.qcow2"
        _run(
            "convert to qcow2",
            ["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)],
            timeout=900,
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        qcow2.replace(target)
    for old in target.parent.glob(f"{target.name.rsplit('-', 1)[0]}-*.qcow2*"):
        if not old.name.startswith(target.name):  # other inputs' disk or its checksum memo
            old.unlink()
    echo(f"base disk ready: {target}")


def _mmdebstrap_cmd(osinfo: stacks.OsInfo, root: Path) -> list[str]:
    assert osinfo.debootstrap is not None
    return [
        "mmdebstrap",
        "--variant=minbase",
        f"--include={','.join(packages())}",
        osinfo.debootstrap["suite"],
        str(root),
        *_sources(osinfo),
    ]


def _configure(root: Path, fs_uuid: str) -> None:
    """The files that make the root boot, get an address and take a key (see the docstring)."""
    files = {
        "etc/fstab": f"UUID={fs_uuid} / ext4 errors=remount-ro 0 1\n",
        "etc/hostname": "gpubake\n",
        "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 gpubake\n::1 localhost ip6-localhost\n",
        "etc/systemd/network/50-gpubake-dhcp.network": NETWORK,
        "etc/default/grub.d/gpubake.cfg": GRUB.format(uuid=fs_uuid),
        "etc/systemd/system/gpubake-firstboot.service": UNIT,
        "usr/local/sbin/gpubake-firstboot": FIRSTBOOT,
        "etc/machine-id": "",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (root / "usr/local/sbin/gpubake-firstboot").chmod(0o755)
    with (root / "etc/modules").open("a", encoding="utf-8") as modules:
        modules.write("qemu_fw_cfg\n")
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)  # mmdebstrap's copy of the host's
    resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")


def _check_root(root: Path, fs_uuid: str) -> None:
    """What a boot would find out late: the fw_cfg module, GRUB's root=, no host keys."""
    if not list(root.glob("usr/lib/modules/*/kernel/drivers/firmware/qemu_fw_cfg.ko*")):
        raise VmDiskError("the Debian kernel of the base disk has no qemu_fw_cfg module")
    if f"root=UUID={fs_uuid}" not in (root / "boot/grub/grub.cfg").read_text(encoding="utf-8"):
        raise VmDiskError("update-grub wrote no root=UUID= for the base disk's root")
    if list(root.glob("etc/ssh/ssh_host_*")):
        raise VmDiskError("the base disk still has SSH host keys")


def _partition(loop: str) -> str:
    """The device of the disk's partition (partx adds it where the kernel did not)."""
    part = f"{loop}p1"
    for attempt in range(20):
        if Path(part).exists():
            return part
        if attempt == 5:
            _run("add the partition", ["partx", "--add", loop])
        time.sleep(0.25)
    raise VmDiskError(f"partition device {part} did not appear (losetup --partscan, partx)")


def _mount(undo: contextlib.ExitStack, args: list[str]) -> None:
    _run("mount", ["mount", *args])
    undo.callback(_unmount, args[-1])


def _unmount(path: str) -> None:
    if subprocess.run(["umount", path], capture_output=True, check=False, timeout=60).returncode:
        subprocess.run(["umount", "--lazy", path], capture_output=True, check=False, timeout=60)


def _remove_leftovers() -> None:
    """Unmount and detach what killed base disk builds left, and remove their work dirs; the
    caller holds the lock, so no other base disk build runs."""
    ours = str(guard.work_root() / guard.slug(LOCK_KEY)) + "."
    _stop_strays(ours)
    mounts = Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines()
    for point in reversed([line.split()[1] for line in mounts]):  # the binds, then the root
        if point.startswith(ours):
            _unmount(point)
    loops = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    ).stdout
    for name, _, back in (line.strip().partition(" ") for line in loops.splitlines()):
        if back.strip().startswith(ours):
            subprocess.run(
                ["losetup", "--detach", name], capture_output=True, check=False, timeout=60
            )
    for path in guard.work_root().glob(f"{guard.slug(LOCK_KEY)}.*"):
        guard.remove_tree(path)


def _stop_strays(prefix: str) -> None:
    """SIGKILL what still works in a killed build's root: an orphaned mmdebstrap (it outlives
    gpubake's SIGKILL: SIGINT from die_with_parent does not stop it) and dpkg in its chroot."""
    for _ in range(50):  # until none is left (10 s at most)
        groups = set()
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError, ValueError):  # gone meanwhile; /proc/self
                cmdline = (proc / "cmdline").read_text("utf-8", "replace")
                if str((proc / "root").readlink()).startswith(prefix) or prefix in cmdline:
                    groups.add(os.getpgid(int(proc.name)))
        groups.discard(os.getpgrp())
        if not groups:
            return
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        time.sleep(0.2)


def _run(step: str, cmd: list[str], stdin: str | None = None, timeout: int = 300) -> str:
    """One step of the build (guard.run_step): its stdout, stripped."""
    return guard.run_step(f"VM base disk: {step}", cmd, VmDiskError, stdin=stdin, timeout=timeout)
