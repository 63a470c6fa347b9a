"""Boot a disk image under QEMU for a test: software emulation (TCG: this machine's KVM cannot
run a guest), user-mode networking, the serial console in a file, optionally SSH forwarded
from the host's loopback, a key through fw_cfg, GCE's DMI product name and guest addresses
(the metadata server's 169.254.169.254) relayed to servers on the host's loopback.

A forwarded address must lie in the guest's network: `net=169.254.0.0/16` (NET) holds both
the metadata server's and STORE (where a test puts its object store)."""

from __future__ import annotations

import secrets
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RELAY = Path(__file__).resolve().parents[1] / "tcp_relay.py"
NET = "169.254.0.0/16"
#: a guest address for a server on the host's loopback (relayed like the metadata server)
STORE = ("169.254.0.100", 9000)
GCE_SMBIOS = "type=1,manufacturer=Google,product=Google Compute Engine"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def random_mac() -> str:
    """A locally administered unicast MAC: each boot is "another machine" to the guest."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


@dataclass
class Vm:
    proc: subprocess.Popen[bytes]
    serial: Path
    ssh_port: int | None
    mac: str
    started: float

    def serial_text(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def wait_exit(self, timeout: float) -> tuple[int, float]:
        """(QEMU's exit status, seconds since boot) once the guest powered itself off;
        AssertionError with the serial console's tail if it did not within `timeout`."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the VM did not power itself off within {timeout:.0f} s; serial console: "
                f"{self.serial_text()[-4000:]}"
            ) from None
        return code, time.monotonic() - self.started


@contextmanager
def boot(
    disk: Path,
    work: Path,
    *,
    fmt: str = "qcow2",
    memory_mb: int = 2048,
    ssh: bool = False,
    authorized_key: str | None = None,
    smbios: Sequence[str] = (),
    forwards: Mapping[tuple[str, int], int] | None = None,
    net: str | None = None,
) -> Iterator[Vm]:
    """QEMU running `disk` (booted from its own bootloader); killed on the way out if the
    guest has not powered off. `forwards`: (guest address, port) -> a loopback port."""
    serial, ssh_port, mac = work / "serial.log", free_port() if ssh else None, random_mac()
    netdev = "user,id=n0"
    if net:
        netdev += f",net={net}"
    if ssh_port:
        netdev += f",hostfwd=tcp:127.0.0.1:{ssh_port}-:22"
    for (address, port), local in (forwards or {}).items():
        relay = shlex.join([sys.executable, str(RELAY), "127.0.0.1", str(local)])
        netdev += f",guestfwd=tcp:{address}:{port}-cmd:{relay}"
    cmd = [
        # an emulated guest takes all the CPU it gets: the other worker's tests go first
        *("nice", "-n", "10"),
        *("qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mb), "-smp", "2"),
        *("-display", "none", "-monitor", "none", "-serial", f"file:{serial}"),
        *("-drive", f"file={disk},if=virtio,format={fmt}"),
        *("-netdev", netdev, "-device", f"virtio-net-pci,netdev=n0,mac={mac}"),
    ]
    for table in smbios:
        cmd += ["-smbios", table]
    if authorized_key:
        cmd += ["-fw_cfg", f"name=opt/gpubake/authorized_key,string={authorized_key}"]
    with (work / "qemu.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        yield Vm(proc, serial, ssh_port, mac, time.monotonic())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
