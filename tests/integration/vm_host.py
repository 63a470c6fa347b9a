"""A running "VM" reached over real SSH: a Debian 12 container with systemd and sshd, set up by
`build.py --target ssh` with the VM playbook, then booted again and set up a second time.

The stack is the one a Debian 12 machine can take from Debian alone: MXNet (CUDA 11 wheels)
with the driver (535, proprietary flavour, DKMS-built for the image's kernel) and the CUDA
toolkit (11.8) from Debian's non-free. One set-up serves every test that inspects such a host
(test_vm_host.py, test_nvidia_driver.py, test_cuda.py), by whichever test asks first.

The first apply (about 10 minutes: the DKMS build, CUDA 11.8, MXNet's CUDA wheels) is done
once per set of inputs: its host is committed as a snapshot image, SNAPSHOT_REPOSITORY:<key>,
with the first apply's output in it (RECORD), where the key is gpubake's own input hash of
the apply (roles, playbooks, modules, stack data and locks, ansible.cfg: what gpubake's build
skip trusts) plus the systemd image below it. Every run then boots a container from the
snapshot, as a VM is rebooted, and applies the playbook a second time over SSH: that apply
must change nothing but re-place the build-time CA bundle in /run, the tmpfs the reboot
emptied. Tests about the first apply read its recorded output; the tests about the host
inspect the booted snapshot after the second apply. The container is removed after the last
of them; the snapshot (about 13 GB) is kept for the next run and replaced when the key
changes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.integration.helpers import HOST_BUNDLE, ROOT, remove_other_tags, run_in
from tests.integration.systemd_helpers import systemd_container, systemd_image

SNAPSHOT_REPOSITORY = "gpubake/test-vm-host"
#: the first apply's output, in the snapshot
RECORD = "/var/lib/gpubake-test/first-apply.json"
#: changes how a snapshot is made or read: a new value makes a new snapshot
SNAPSHOT_FORMAT = "1"

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

    def changed(self, playbook: str) -> list[str]:
        """The tasks (and handlers) of `playbook`'s run that reported a change, in order."""
        section = self.section(playbook)
        found = []
        for header in re.finditer(r"^(?:TASK|RUNNING HANDLER) \[(.+?)\]", section, re.M):
            result = _RESULT.search(section, header.end())
            if result and result["status"] == "changed":
                found.append(header[1])
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
    first: Applied  # on a fresh host; recorded in the snapshot when it was made
    second: Applied  # on the snapshot, booted again
    snapshot: str
    made: bool  # whether this run made the snapshot (else: an earlier run, same inputs)
    booted_at: int  # when the snapshot was booted (epoch seconds; the journal has older boots)

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
def ssh_host(
    engine: Any, image: str | None = None, port: int | None = None
) -> Iterator[tuple[Any, str, Path, Path]]:
    """A fresh Debian 12 container with systemd and sshd (or one booted from `image`, a
    snapshot) that a new key logs in to as root, over `port` (default: any free one):
    (container, root@127.0.0.1:PORT, key, known_hosts file)."""
    image = image or systemd_image(engine, ("openssh-server",))
    with (
        tempfile.TemporaryDirectory(prefix="gpubake-vmhost-") as tmp,
        systemd_container(engine, image, ports={"22/tcp": ("127.0.0.1", port)}) as box,
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


def snapshot_ref(engine: Any) -> str:
    """SNAPSHOT_REPOSITORY:<key> for the current inputs (see the module's docstring)."""
    plan = subprocess.run(
        [sys.executable, "build.py", "--target", "ssh", "--host", "root@127.0.0.1:22",
         *STACK_ARGS, "--ca-bundle", str(HOST_BUNDLE), "--dry-run", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=True,
    ).stdout  # fmt: skip
    below = engine.images.get(systemd_image(engine, ("openssh-server",))).id
    key = hashlib.sha256(
        "\n".join((json.loads(plan)["input_hash"], below, SNAPSHOT_FORMAT)).encode()
    ).hexdigest()
    return f"{SNAPSHOT_REPOSITORY}:{key[:16]}"


def ssh_port(ref: str) -> int:
    """The host's SSH port, the same for the first apply and the booted snapshot: the host is
    reached at one address, as a VM is (the manifest records it), below the ephemeral ports
    the engine publishes other containers on."""
    return 20000 + int(ref.rsplit(":", 1)[1], 16) % 10000


def _make_snapshot(engine: Any, ref: str) -> Applied:
    """The first apply, on a fresh host, committed as `ref` with its output in it."""
    remove_other_tags(engine, SNAPSHOT_REPOSITORY, ref)
    with ssh_host(engine, port=ssh_port(ref)) as (box, login, key, known):
        args = (*STACK_ARGS, "--ca-bundle", str(HOST_BUNDLE), "-v")
        first = build_over_ssh(login, key, known, *args, timeout=3600)
        assert first.returncode == 0, first.output[-12000:]
        data = json.dumps(asdict(first)).encode()
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo(RECORD.lstrip("/"))
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
        assert box.put_archive("/", archive.getvalue())
        # (root's authorized_keys go with it: every boot writes a new one)
        repository, tag = ref.split(":")
        box.commit(repository=repository, tag=tag, changes=['CMD ["/sbin/init"]'])
    return first


def _recorded(box: Any) -> Applied:
    rc, out = run_in(box, "cat", RECORD)
    assert rc == 0, out
    return Applied(**json.loads(out))


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
        ref = snapshot_ref(engine)
        made = not engine.images.list(name=ref)
        if made:
            _make_snapshot(engine, ref)
        booted_at = time.time()
        box, login, key, known = stack.enter_context(ssh_host(engine, ref, ssh_port(ref)))
        first = _recorded(box)
        args = (*STACK_ARGS, "--ca-bundle", str(HOST_BUNDLE), "-v")
        second = build_over_ssh(login, key, known, *args, timeout=1800)
        assert second.returncode == 0, second.output[-12000:]
    except BaseException as exc:
        release_vm_host(exc)
        raise
    value = _SHARED["value"] = VmHost(
        box, login, key, known, first, second, ref, made, int(booted_at)
    )
    print(  # shown with -s
        f"\nVM playbook over ssh: first run {first.seconds:.0f} s"
        f" ({'now' if made else 'recorded in ' + ref}), second {second.seconds:.0f} s"
    )
    try:
        yield value
    finally:
        release_vm_host()


def release_vm_host(error: BaseException | None = None) -> None:
    """Remove the container now; tests/integration/conftest.py calls this after the last
    test that uses it, so it does not hold memory and disk while later modules build."""
    stack = _SHARED.pop("stack", None)
    _SHARED.pop("value", None)
    _SHARED.setdefault("error", error or RuntimeError("the shared VM host was already removed"))
    if stack is not None:
        stack.close()
