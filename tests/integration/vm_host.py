"""A running "VM" reached over real SSH: a Debian 12 container with systemd and sshd, set up by
`build.py --target ssh` with the VM playbook, twice.

The stack is the one a Debian 12 machine can take from Debian alone: MXNet (CUDA 11 wheels)
with the driver (535, proprietary flavour, DKMS-built for the image's kernel) and the CUDA
toolkit (11.8) from Debian's non-free. One set-up serves every test that inspects such a host
(test_vm_host.py, test_nvidia_driver.py, test_cuda.py): the DKMS build alone takes minutes.
It is done once per session, by whichever test asks first; the container is removed at the
end.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.helpers import HOST_BUNDLE, ROOT, run_in
from tests.integration.systemd_helpers import systemd_container, systemd_image

STACK_ARGS = (
    "--stack",
    "mxnet",
    "--var",
    "driver_source=distro",
    "--var",
    "cuda_source=distro",
    # Debian 12's open flavour cannot be installed at the moment: its
    # nvidia-open-kernel-dkms (535.261.03) lags the rest of the 535 packages (535.309.01)
    "--var",
    "open_kernel_module=false",
)


@dataclass
class Applied:
    """One `build.py --target ssh -v` run: its exit code, its output, how long it took."""

    returncode: int
    output: str  # stdout + stderr (-v: Ansible's own output is on stderr)
    seconds: float

    def section(self, playbook: str) -> str:
        """The part of the output from ansible-playbook's run of `playbook`."""
        start = self.output.find(f"PLAY [{_PLAY_NAMES[playbook]}]")
        end = self.output.find("PLAY RECAP", start)
        return self.output[start : end if end >= 0 else None]

    def statuses(self, title: str) -> list[str]:
        """How each run of the task (or handler) `role : name` ended: ok, changed, skipping,
        included, failed: the first result line after its header."""
        found = []
        for header in re.finditer(
            rf"^(?:TASK|RUNNING HANDLER) \[{re.escape(title)}\]", self.output, re.M
        ):
            result = _RESULT.search(self.output, header.end())
            found.append(result["status"] if result else "none")
        return found

    def said(self, start: str) -> list[str]:
        """Every debug/assert message that starts with `start` (as Ansible printed it)."""
        return re.findall(rf'"msg": "({re.escape(start)}(?:[^"\\]|\\.)*)"', self.output)


_RESULT = re.compile(r"^(?P<status>ok|changed|skipping|included|failed|fatal):", re.M)
_PLAY_NAMES = {
    "vm.yml": "Provision a gpubake VM image or host",
    "smoke.yml": "Run the gpu-smoke check",
}


@dataclass
class VmHost:
    box: Any
    login: str  # root@127.0.0.1:PORT
    key: Path
    known_hosts: Path
    first: Applied
    second: Applied

    def build(self, *args: str, timeout: int = 3600) -> Applied:
        return build_over_ssh(self.login, self.key, self.known_hosts, *args, timeout=timeout)


def build_over_ssh(login: str, key: Path, known: Path, *args: str, timeout: int) -> Applied:
    cmd = [
        sys.executable,
        "build.py",
        "--target",
        "ssh",
        "--host",
        login,
        "--ssh-key",
        str(key),
        "--known-hosts",
        str(known),
        *args,
    ]
    start = time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )
    return Applied(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start)


@contextmanager
def ssh_host(engine: Any) -> Iterator[tuple[Any, str, Path, Path]]:
    """A fresh Debian 12 container with systemd and sshd that our key logs in to as root:
    (container, root@127.0.0.1:PORT, key, known_hosts file)."""
    image = systemd_image(engine, ("openssh-server",))
    with (
        tempfile.TemporaryDirectory(prefix="gpubake-vmhost-") as tmp,
        systemd_container(engine, image, ports={"22/tcp": ("127.0.0.1", None)}) as box,
    ):
        key, known = Path(tmp) / "id_ed25519", Path(tmp) / "known_hosts"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        pub = key.with_suffix(".pub").read_text(encoding="utf-8").strip()
        rc, out = run_in(
            box,
            "sh",
            "-c",
            f"install -d -m 700 /root/.ssh && echo '{pub}' > /root/.ssh/authorized_keys && "
            "chmod 600 /root/.ssh/authorized_keys && systemctl is-active ssh",
        )
        assert rc == 0, out
        box.reload()
        port = box.attrs["NetworkSettings"]["Ports"]["22/tcp"][0]["HostPort"]
        yield box, f"root@127.0.0.1:{port}", key, known


_SHARED: dict[str, Any] = {}


def shared_vm_host(engine: Any) -> Iterator[VmHost]:
    """Generator for a session fixture (see the module's docstring)."""
    if "error" in _SHARED:
        raise _SHARED["error"]
    if "value" in _SHARED:
        yield _SHARED["value"]
        return
    stack = _SHARED["stack"] = ExitStack()
    try:
        box, login, key, known = stack.enter_context(ssh_host(engine))
        args = (*STACK_ARGS, "--ca-bundle", str(HOST_BUNDLE), "-v")
        first = build_over_ssh(login, key, known, *args, timeout=3600)
        assert first.returncode == 0, first.output[-12000:]
        second = build_over_ssh(login, key, known, *args, timeout=1800)
        assert second.returncode == 0, second.output[-12000:]
    except BaseException as exc:
        release_vm_host(exc)
        raise
    value = _SHARED["value"] = VmHost(box, login, key, known, first, second)
    print(  # shown with -s
        f"\nVM playbook over ssh: first run {first.seconds:.0f} s, second {second.seconds:.0f} s"
    )
    try:
        yield value
    finally:
        release_vm_host()


def release_vm_host(error: BaseException | None = None) -> None:
    """Remove the container (about 13 GB) now; tests/integration/conftest.py calls this after
    the last test that uses it, so it does not hold the disk while later modules build images."""
    stack = _SHARED.pop("stack", None)
    _SHARED.pop("value", None)
    _SHARED.setdefault("error", error or RuntimeError("the shared VM host was already removed"))
    if stack is not None:
        stack.close()
