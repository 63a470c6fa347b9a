"""gpubake's own VM base disk (gpubake.build.vm_disk): built once per set of inputs, free of
keys, and booted under QEMU (TCG) from a qcow2 overlay, reached over real SSH with a key
passed through fw_cfg, then powered off from inside. One boot (about 40 s under TCG)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpubake import resources
from gpubake.build import guard, vm_disk
from tests.integration import qemu_boot

NEEDED = [*vm_disk.TOOLS, "qemu-system-x86_64", "ssh", "ssh-keygen", "debugfs"]
MISSING = [tool for tool in NEEDED if not shutil.which(tool)]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="builds a disk through loop devices: root"),
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"missing {' '.join(MISSING)} "
        "(apt-get install -y mmdebstrap qemu-system-x86 qemu-utils fdisk openssh-client)",
    ),
]
SSH_WAIT_S = 180
POWEROFF_WAIT_S = 60


@dataclass
class Built:
    path: Path
    said: list[str]


@dataclass
class Guest:
    proc: subprocess.Popen[bytes]
    port: int
    key: Path
    known_hosts: Path
    serial: Path
    boot_s: float

    def ssh(self, command: str, check: bool = True) -> str:
        done = subprocess.run(
            [*self.ssh_args(), command], capture_output=True, text=True, timeout=120, check=False
        )
        if check:
            assert done.returncode == 0, f"{command}: {done.stderr.strip()[-2000:]}"
        return done.stdout.strip()

    def ssh_args(self) -> list[str]:
        return [
            "ssh",
            *("-i", str(self.key), "-p", str(self.port)),
            *("-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"),
            *("-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={self.known_hosts}"),
            *("-o", "HostKeyAlgorithms=ssh-ed25519"),
            f"{vm_disk.USER}@127.0.0.1",
        ]


@pytest.fixture(scope="module")
def base() -> Built:
    said: list[str] = []
    return Built(vm_disk.ensure_base_disk("debian-12", said.append), said)


@pytest.fixture(scope="module")
def guest(base: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """A qcow2 overlay of the base disk booted under QEMU, with a fresh key for SSH."""
    work = tmp_path_factory.mktemp("vm")
    key, overlay = work / "id_ed25519", work / "overlay.qcow2"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gpubake-test", "-f", str(key)],
        check=True,
        timeout=60,
    )
    overlay_of = ("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b")
    subprocess.run([*overlay_of, str(base.path), str(overlay)], check=True, timeout=60)
    public = key.with_suffix(".pub").read_text(encoding="utf-8").strip()
    with qemu_boot.boot(overlay, work, memory_mb=1024, ssh=True, authorized_key=public) as vm:
        assert vm.ssh_port is not None
        box = Guest(vm.proc, vm.ssh_port, key, work / "known_hosts", vm.serial, 0.0)
        while True:
            probe = subprocess.run(
                [*box.ssh_args(), "true"], capture_output=True, timeout=60, check=False
            )
            if probe.returncode == 0:
                break
            if vm.proc.poll() is not None or time.monotonic() - vm.started > SSH_WAIT_S:
                pytest.fail(
                    f"no SSH login within {SSH_WAIT_S} s (qemu: {vm.proc.poll()}): "
                    f"{vm.serial_text()[-3000:]}"
                )
            time.sleep(2)
        box.boot_s = time.monotonic() - vm.started
        yield box


def test_only_debian_12_is_supported():
    with pytest.raises(vm_disk.VmDiskError, match=r"debian-12 only, not 'ubuntu-22\.04'") as err:
        vm_disk.ensure_base_disk("ubuntu-22.04", lambda line: None)
    assert "\n" not in str(err.value)


def test_second_call_is_a_cache_hit_and_the_build_left_nothing(base):
    if base.said:  # built by this run: it said so first
        assert base.said[0].startswith("building the Debian 12 base disk with mmdebstrap")
        assert base.said[-1] == f"base disk ready: {base.path}"
    said: list[str] = []
    started = time.monotonic()
    again = vm_disk.ensure_base_disk("debian-12", said.append)
    assert time.monotonic() - started < 2
    assert (again, said) == (base.path, [])
    assert again.parent == resources.cache_dir() / "vm-base"
    cache = str(resources.cache_dir())
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    assert cache not in loops
    mounts = Path("/proc/self/mounts").read_text(encoding="utf-8")
    assert cache not in mounts
    assert not list(guard.work_root().glob(f"{guard.slug(vm_disk.LOCK_KEY)}.*"))


def _debugfs(raw: Path, request: str) -> str:
    done = subprocess.run(
        ["debugfs", "-R", request, f"{raw}?offset={vm_disk.PART_START * 512}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_base_disk_is_qcow2_without_keys_or_machine_id(base, tmp_path):
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(base.path)],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == vm_disk.DISK_SIZE_GIB * 2**30
    assert "backing-filename" not in info
    raw = tmp_path / "base.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(base.path), str(raw)], check=True, timeout=300
    )
    assert "Size: 0" in _debugfs(raw, "stat /etc/machine-id")
    assert "ssh_host_" not in _debugfs(raw, "ls /etc/ssh")
    assert "sshd_config" in _debugfs(raw, "ls /etc/ssh")  # the listing worked
    assert ".ssh" not in _debugfs(raw, f"ls /home/{vm_disk.USER}")
    assert "qemu_fw_cfg" in _debugfs(raw, "cat /etc/modules").split()
    grub = _debugfs(raw, "cat /boot/grub/grub.cfg")
    assert re.search(r"linux\s+/boot/vmlinuz-\S+ root=UUID=\S+ ro console=tty0 console=ttyS0", grub)


def test_guest_runs_python_and_its_boot_is_clean(guest):
    assert guest.ssh("python3 -c 'print(6 * 7)'") == "42"
    state = guest.ssh("systemctl is-system-running --wait", check=False)
    assert state in ("running", "degraded"), guest.ssh("systemctl --failed --no-legend", False)
    failed = guest.ssh("systemctl --failed --plain --no-legend")
    assert "gpubake" not in failed
    unit = guest.ssh("systemctl show -p ActiveState -p Result gpubake-firstboot.service")
    assert sorted(unit.split()) == ["ActiveState=active", "Result=success"]
    assert guest.ssh("sudo -n id -un") == "root"


def test_guest_has_the_packages_of_every_vm_images_roles(guest):
    """The roles' own package lists (python_env's python3-venv among them) are installed
    already, so that an emulated build's apt runs find nothing to do."""
    wanted = vm_disk.packages()
    assert {"python3-apt", "python3-venv", "git", "tmux"} <= set(wanted)
    query = "dpkg-query -W -f '${Package} ${db:Status-Status}\\n' " + " ".join(wanted)
    assert sorted(guest.ssh(query).splitlines()) == sorted(f"{p} installed" for p in wanted)


def test_guest_made_its_own_identity_and_took_the_key(guest):
    assert re.fullmatch(r"[0-9a-f]{32}", guest.ssh("cat /etc/machine-id"))
    # the host key ssh accepted is the one made at this boot (the base has none)
    host_key = guest.ssh("cat /etc/ssh/ssh_host_ed25519_key.pub").split()[:2]
    seen = [line.split()[1:3] for line in guest.known_hosts.read_text().splitlines()]
    assert seen == [host_key]
    public = guest.key.with_suffix(".pub").read_text(encoding="utf-8").split()
    assert guest.ssh("cat ~/.ssh/authorized_keys").split() == public


def test_guest_network_and_serial_console(guest):
    assert re.fullmatch(r"en\w+", guest.ssh("ls /sys/class/net | grep -v '^lo$'"))
    assert "10.0.2.3" in guest.ssh("resolvectl dns")  # the DNS server of QEMU's DHCP
    serial = guest.serial.read_text(errors="replace")
    assert "Linux version" in serial
    assert "Debian GNU/Linux 12 gpubake ttyS0" in serial  # the getty on the serial port


def test_poweroff_ends_qemu_with_status_0(guest):
    guest.ssh("sudo -n systemctl poweroff", check=False)  # the connection may drop
    assert guest.proc.wait(timeout=POWEROFF_WAIT_S) == 0
