"""VM images: seal.yml removes what identifies the build machine, and validate.sh fails
the bake when anything is left (run for real in a Debian 12 container with sshd).
The same container, running sshd, is the host of `gpubake smoke --host` over real SSH."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.helpers import ROOT, apply, base_image, container, run_in

pytestmark = pytest.mark.docker
ROLE_TEST = Path(__file__).with_name("role_test.yml")
SEAL = ROOT / "playbooks" / "seal.yml"
# the container connection is root already; the seal play asks for become (sudo on VMs)
NO_SUDO = {"ansible_become": False}


DIRT = (
    "set -e; useradd -m packer; mkdir -p /home/packer/.ssh /var/lib/cloud/instances/i-1; "
    "echo ssh-ed25519 AAAA packer > /home/packer/.ssh/authorized_keys; "
    "echo 'sudo reboot' > /home/packer/.bash_history; "
    "echo 0123456789abcdef0123456789abcdef > /etc/machine-id; "
    "ln -s /var/lib/cloud/instances/i-1 /var/lib/cloud/instance; ls /etc/ssh/ssh_host_*"
)


@pytest.fixture(scope="module")
def vm_image(engine):
    """Debian 12 with python3 and openssh-server (host keys made at install), as a VM has."""
    with container(engine, base_image(engine)) as box:
        apply(box, ROLE_TEST, {"roles_under_test": []})  # python3 for Ansible
        rc, out = run_in(
            box,
            "sh",
            "-c",
            "apt-get install -y -q --no-install-recommends openssh-server >/dev/null && echo ok",
        )
        assert rc == 0, out
        image = box.commit(repository="gpubake-test/vm", tag="latest")
    yield image.id
    engine.images.remove(image.id, force=True)


@pytest.fixture(scope="module")
def sealed(engine, vm_image):
    """The VM dirtied like a build machine, then sealed: (recap, output, what is left, image)."""
    with container(engine, vm_image) as box:
        rc, out = run_in(box, "sh", "-c", DIRT)
        assert rc == 0 and "ssh_host_ed25519_key" in out, out
        recap, output = apply(box, SEAL, NO_SUDO)
        _, left = run_in(
            box,
            "sh",
            "-c",
            "ls /etc/ssh/ssh_host_* /home/packer/.ssh/authorized_keys /home/packer/.bash_history "
            "/var/lib/cloud/instance 2>&1; wc -c < /etc/machine-id",
        )
        image = box.commit(repository="gpubake-test/sealed", tag="latest")
    yield recap, output, left, image.id
    engine.images.remove(image.id, force=True)


def validate_in(engine, image: str, prepare: str, *modules: str) -> tuple[int, str]:
    with container(engine, image) as box:
        rc, out = run_in(box, "sh", "-c", prepare)
        assert rc == 0, out
        script = ROOT / "roles" / "image_cleanup" / "files" / "validate.sh"
        subprocess.run(["docker", "cp", str(script), f"{box.name}:/tmp/validate.sh"], check=True)
        return run_in(box, "sh", "/tmp/validate.sh", *modules)


def test_seal_then_validate_passes(sealed):
    recap, output, left, _ = sealed
    assert recap["failed"] == 0
    assert "ok: no SSH host keys" in output and "ok: machine-id empty" in output
    assert left.count("No such file") == 4, left
    assert left.strip().endswith("0")


@pytest.mark.parametrize(
    ("leftover", "message"),
    [
        ("ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key", "SSH host keys left"),
        ("echo abc > /etc/machine-id", "/etc/machine-id is not empty"),
        ("mkdir -p /root/.ssh && echo k > /root/.ssh/authorized_keys", "authorized_keys left"),
        ("mkdir -p /run/gpubake-build", "build-time CA bundle left"),
        ("echo history > /root/.bash_history", "shell history left"),
        ("mkdir -p /var/lib/cloud/instances/i-2", "cloud-init instance state left"),
    ],
)
def test_validate_fails_the_bake_on_leftovers(engine, sealed, leftover, message):
    clean_rc, _ = validate_in(engine, sealed[3], "true")
    assert clean_rc == 0
    rc, out = validate_in(engine, sealed[3], leftover)
    assert rc == 1
    assert f"FAILED: {message}" in out


def test_validate_requires_the_expected_dkms_module(engine, sealed):
    rc, out = validate_in(engine, sealed[3], "true", "nvidia")
    assert rc == 1
    assert "FAILED: dkms not installed (expected module nvidia)" in out


def test_gpubake_smoke_over_real_ssh(engine, vm_image, tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pub = key.with_suffix(".pub").read_text().strip()
    # a known_hosts file of its own: the user's ~/.ssh/known_hosts may hold another
    # container's key for the same 127.0.0.1 port
    known = tmp_path / "known_hosts"
    stale = tmp_path / "stale"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stale)], check=True)
    stale_pub = " ".join(stale.with_suffix(".pub").read_text().split()[:2])
    start = (
        f"mkdir -p /root/.ssh /run/sshd && echo '{pub}' > /root/.ssh/authorized_keys && "
        "chmod 600 /root/.ssh/authorized_keys && exec /usr/sbin/sshd -D -e"
    )
    box = engine.containers.run(
        vm_image, ["sh", "-c", start], detach=True, ports={"22/tcp": ("127.0.0.1", None)}
    )
    try:
        box.reload()
        port = box.attrs["NetworkSettings"]["Ports"]["22/tcp"][0]["HostPort"]
        cmd = [
            sys.executable,
            "-m",
            "gpubake",
            "smoke",
            "--host",
            f"root@127.0.0.1:{port}",
            "--ssh-key",
            str(key),
            "--known-hosts",
            str(known),
            "--json",
            "--framework",
            "none",
        ]
        # a stale key on record for this address (a replaced VM): refused, with the fix
        known.write_text(f"[127.0.0.1]:{port} {stale_pub}\n")
        for _ in range(30):  # sshd needs a moment
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
            if "Host key verification failed" in proc.stderr:
                break
            time.sleep(1)
        assert proc.returncode == 1
        assert f"ssh-keygen -R '[127.0.0.1]:{port}'" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        known.write_text("")  # a fresh file: the key is accepted on first use
        for _ in range(30):  # sshd needs a moment
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
            if "cannot log in" not in proc.stderr:
                break
            time.sleep(1)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["gpu_visible"] is False
        assert report["summary"]["passed"] == 0  # nothing GPU-side can pass without a GPU
        # Debian 12's python3 ran it, not this machine's
        assert report["versions"]["python"].startswith("3.11.")
        assert report["versions"]["python"] != platform.python_version()
        required = subprocess.run(
            [*cmd, "--require-gpu"], capture_output=True, text=True, timeout=120, cwd=ROOT
        )
        assert required.returncode == 1
    finally:
        box.remove(force=True)
