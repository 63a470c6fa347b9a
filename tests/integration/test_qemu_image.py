"""`gpubake build --target qemu`, then the sealed image booted as a user boots it.

The build: the small stack `tiny` (tests/small_stacks.yml: six in the environment) with no
NVIDIA driver or CUDA toolkit (`--var driver_source=none --var cuda_source=none`: under
software emulation each apt package costs about a minute), so the image holds what matters
at boot: base, the Python environment, Jupyter, the job runner, gpu-smoke, the manifest, the
seal. Packer boots gpubake's base disk under QEMU (TCG here: this machine's KVM cannot run a
guest), applies the VM playbook over SSH, runs gpu-smoke, seals; the VM powers itself off.
It builds from a wheelhouse (`--wheelhouse`, as a site without a package index would): the
VM's lock (tiny's with JupyterLab) is fetched into it, its files are uploaded to the VM and
installed from there with no index, hashes required, and removed before the seal.

The boots: a copy of the raw disk gets a site file /etc/default/gpubake-job (the metadata
server's address and the storage emulator's, as `virt-customize` would add them), and boots
on "another machine" (a new MAC) that says it is a GCE VM (DMI), with a GCE metadata server
stand-in at 169.254.169.254 and a GCS emulator on the host. The runner reads the job spec,
runs the job as the image's user, syncs its results and powers the VM off: QEMU exits by
itself. A second boot of the same image gets a preemption notice instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpubake.build import disk_image, guard, vm_disk
from tests.checkout import copy_checkout
from tests.integration import qemu_boot
from tests.integration.helpers import HOST_BUNDLE
from tests.metadata_standins import metadata_standin
from tests.object_stores import gcs_server

NEEDED = [*vm_disk.TOOLS, "qemu-system-x86_64", "debugfs", "packer", "ssh-keygen"]
MISSING = [tool for tool in NEEDED if not shutil.which(tool)]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"missing {' '.join(MISSING)} (apt-get install -y mmdebstrap qemu-system-x86 "
        "qemu-utils fdisk packer e2fsprogs openssh-client)",
    ),
]
STACKS = (Path(__file__).parents[1] / "small_stacks.yml").read_text(encoding="utf-8")
BUILD_ARGS = (
    "--target", "qemu", "--stack", "tiny", "--os", "debian-12",
    "--var", "driver_source=none", "--var", "cuda_source=none",
)  # fmt: skip
#: bounds under TCG on this machine type: the build, a boot to the job's end and power-off
BUILD_TIMEOUT_S = 2400
BOOT_TIMEOUT_S = 420
SITE_FILE = "/etc/default/gpubake-job"
OFFSET = vm_disk.PART_START * 512  # the root partition's, for debugfs
#: the build (and its emulated VM) yields the CPU to the other worker's timing-bound tests
NICE = ("nice", "-n", "10")

#: the job of the first boot: what only the booted image can say, written as results
FACTS = r"""
set -u
out=$GPUBAKE_RESULTS_DIR
# the host keys are made at boot, while the job may already run (ssh-keygen is slow emulated)
for _ in $(seq 180); do [ -s /etc/ssh/ssh_host_ed25519_key.pub ] && break; sleep 1; done
cat /etc/ssh/ssh_host_ed25519_key.pub > "$out/host_key.pub"
cat /etc/machine-id > "$out/machine-id"
cat /sys/class/net/e*/address > "$out/mac"
id -un > "$out/user"
python -c 'import six, sys; print(six.__version__, sys.executable)' > "$out/python"
/usr/local/bin/gpu-smoke --json > "$out/smoke.json"; echo $? > "$out/smoke.rc"
systemctl is-system-running > "$out/state" || true
systemctl --failed --plain --no-legend > "$out/failed" || true
# listening TCP sockets (no iproute2 in the image), "address:port" per line, once JupyterLab
# listens (it may start after the job under emulation; 180 s at most)
python - > "$out/listening" <<'EOF'
import socket, struct, time
def listening():
    for line in open("/proc/net/tcp").readlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":
            addr, port = local.split(":")
            yield f"{socket.inet_ntoa(struct.pack('<I', int(addr, 16)))}:{int(port, 16)}"
deadline = time.monotonic() + 180
while time.monotonic() < deadline and not any(a.endswith(":8888") for a in listening()):
    time.sleep(1)
print("\n".join(listening()))
EOF
"""

#: the job of the second boot: a step and a checkpoint every second until SIGINT
TRAIN = r"""
import os, signal, sys, time
stop = False
def on_int(signum, frame):
    global stop
    stop = True
signal.signal(signal.SIGINT, on_int)
ckpt, results = os.environ["GPUBAKE_CKPT_DIR"], os.environ["GPUBAKE_RESULTS_DIR"]
for _ in range(180):  # the host keys are made at boot, maybe after the job started
    if os.path.exists("/etc/ssh/ssh_host_ed25519_key.pub"):
        break
    time.sleep(1)
for name, path in (("host_key.pub", "/etc/ssh/ssh_host_ed25519_key.pub"),
                   ("machine-id", "/etc/machine-id")):
    with open(path) as src, open(os.path.join(results, name), "w") as dst:
        dst.write(src.read())
step = 0
while not stop:
    step += 1
    with open(os.path.join(ckpt, "model.tmp"), "w") as f:
        f.write(f"weights at step {step}\n")
    os.replace(os.path.join(ckpt, "model.tmp"), os.path.join(ckpt, "model.pt"))
    with open(os.path.join(results, "last_step"), "w") as f:
        f.write(str(step))
    print(f"step {step}", flush=True)
    for _ in range(10):
        if stop:
            break
        time.sleep(0.1)
print(f"SIGINT: stopping after step {step}", flush=True)
sys.exit(130)
"""


@dataclass
class Built:
    tree: Path
    folder: Path
    output: str
    seconds: float

    @property
    def wheels(self) -> Path:
        return wheels_of(self.tree)


def wheels_of(tree: Path) -> Path:
    """The wheelhouse a build in `tree` installs from (--wheelhouse), beside the tree."""
    return tree.with_name(tree.name + "-wheels")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """The image, built as a user builds it, or found built from identical inputs by an
    earlier run (as the VM host's snapshot is: a change to the roles, the stack or the base
    disk builds it anew). Folders of the small stack's earlier inputs are removed."""
    tree = copy_checkout(tmp_path_factory.mktemp("qemu-tree"))
    stacks = tree / "images" / "stacks.yml"
    extra = STACKS.split("\nstacks:\n", 1)[1]
    stacks.write_text(stacks.read_text(encoding="utf-8").rstrip("\n") + "\n" + extra)
    started = time.monotonic()
    proc = _build(tree)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    folder = Path(proc.stdout.strip().splitlines()[-1])
    for other in folder.parent.glob("gpubake-tiny-*"):
        if other != folder:
            shutil.rmtree(other)
    return Built(tree, folder, output, time.monotonic() - started)


def _build(tree: Path, *more: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NICE, sys.executable, "-m", "gpubake", "build", *BUILD_ARGS, "--ca-bundle",
         str(HOST_BUNDLE), "--wheelhouse", str(wheels_of(tree)),
         *more],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stores() -> Iterator[dict[str, Any]]:
    with gcs_server() as gcs, metadata_standin() as md:
        yield {"gs": gcs, "md": md}


def _debugfs(raw: Path, *requests: str, write: bool = False) -> str:
    done = subprocess.run(
        [
            "debugfs",
            *(["-w"] if write else []),
            "-f",
            "-",
            f"{raw}?offset={vm_disk.PART_START * 512}",
        ],
        input="\n".join(requests) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def test_the_build_says_what_it_does_and_writes_every_file(built):
    said = built.output
    if "skipped: " in said:  # built by an earlier run from identical inputs (see `built`)
        assert "already built from identical inputs" in said
    else:
        assert "QEMU with tcg" in said  # this machine's KVM fails the boot probe
        assert "play: Run the gpu-smoke check" in said
        # the VM's lock (tiny's re-resolved with JupyterLab), its files uploaded and installed
        assert "the VM's lock: stack tiny's with role jupyter's jupyterlab==" in said, said[:3000]
        assert re.search(r"wheelhouse \S+-wheels: \d+ file\(s\), .* to upload", said), said[:3000]
        assert "python_env : Upload and unpack the wheelhouse's files" in said
        assert "python_env : Install the lock, hashes required" in said
        assert f"built {built.folder.name} in " in said and "gpu-smoke passed on it" in said
    assert built.folder.parent == disk_image.images_dir()
    names = sorted(p.name for p in built.folder.iterdir())
    name = built.folder.name
    assert names == sorted(
        [
            f"{name}.qcow2",
            "disk.raw",
            "disk.raw.tar.gz",
            "manifest.json",
            "sbom.cdx.json",
            "smoke-report.json",
            "build.json",
        ]
    )
    record = json.loads((built.folder / "build.json").read_text())
    for file, facts in record["files"].items():
        assert (built.folder / file).stat().st_size == facts["bytes"]
    tar = built.folder / "disk.raw.tar.gz"
    assert record["files"][tar.name]["sha256"] == hashlib.sha256(tar.read_bytes()).hexdigest()
    with tarfile.open(built.folder / "disk.raw.tar.gz", "r:gz") as tar:
        assert tar.getnames() == ["disk.raw"]  # what GCP's images create --source-uri takes
    manifest = json.loads((built.folder / "manifest.json").read_text())
    assert (manifest["stack"], manifest["target"]) == ("tiny", "qemu")
    assert (manifest["driver_source"], manifest["cuda_source"]) == ("none", "none")
    assert manifest["input_hash"] == record["input_hash"]
    sbom = json.loads((built.folder / "sbom.cdx.json").read_text())
    components = {c["name"]: c for c in sbom["components"]}
    # installed from the lock: the SBOM lists its hashes, one of them the uploaded file's
    # (a build skipped above fetched nothing: then the lock's hashes only)
    wheels = {hashlib.sha256(p.read_bytes()).hexdigest() for p in built.wheels.glob("*.whl")}
    for name in ("six", "jupyterlab"):
        listed = {h["content"] for h in components[name].get("hashes", [])}
        assert listed, components[name]
        assert listed & wheels or "skipped: " in said, (name, components[name])
    smoke = json.loads((built.folder / "smoke-report.json").read_text())
    assert smoke["gpu_visible"] is False


def test_the_same_build_again_is_skipped(built):
    proc = _build(built.tree)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped: " in proc.stderr and "already built from identical inputs" in proc.stderr
    assert proc.stdout.strip() == str(built.folder)


def test_the_sealed_image_has_no_identity_and_no_build_user(built):
    raw = built.folder / "disk.raw"
    # powered off cleanly: the root file system was unmounted, nothing left in its journal
    stats = _debugfs(raw, "stats")
    assert re.search(r"^Filesystem state:\s+clean$", stats, re.M), stats[:2000]
    assert "needs_recovery" not in stats
    assert "gpubake-wheels" not in _debugfs(raw, "ls /var/cache")  # the upload is removed
    etc_ssh = _debugfs(raw, "ls -l /etc/ssh")
    assert "sshd_config" in etc_ssh and "ssh_host_" not in etc_ssh
    assert "Size: 0" in _debugfs(raw, "stat /etc/machine-id")
    assert vm_disk.USER not in _debugfs(raw, "ls /home")
    assert vm_disk.USER not in _debugfs(raw, "cat /etc/passwd")
    assert vm_disk.USER not in _debugfs(raw, "ls /etc/sudoers.d")
    assert ".ssh" not in _debugfs(raw, "ls -a /home/gpubake")


def _boot_copy(built: Built, work: Path, site: dict[str, str]) -> Path:
    """A copy of the raw disk (sparse) with the site file, written as virt-customize would."""
    raw = work / "disk.raw"
    subprocess.run(
        ["cp", "--sparse=always", str(built.folder / "disk.raw"), str(raw)], check=True, timeout=600
    )
    local = work / "site.env"
    local.write_text("".join(f"{k}={v}\n" for k, v in site.items()))
    _debugfs(raw, "cd /etc/default", f"write {local} gpubake-job", write=True)
    assert "STORAGE_EMULATOR_HOST" in _debugfs(raw, f"cat {SITE_FILE}")
    return raw


@dataclass
class Booted:
    results: dict[str, bytes]
    exit_code: int
    seconds: float
    mac: str
    serial: str


def _run_job(built, stores, work: Path, spec: dict[str, Any], during=None) -> Booted:
    gcs, md = stores["gs"], stores["md"]
    raw = _boot_copy(
        built,
        work,
        {
            "GCE_METADATA_HOST": "169.254.169.254",  # no DNS name for it on QEMU's network
            "STORAGE_EMULATOR_HOST": "http://{}:{}".format(*qemu_boot.STORE),
        },
    )
    md.set_gce("instance/preempted", "FALSE")
    md.set_gce("instance/attributes/gpubake-job", json.dumps(spec))
    md_port, gcs_port = (int(url.rsplit(":", 1)[1]) for url in (md.host_port, gcs.endpoint))
    with qemu_boot.boot(
        raw,
        work,
        fmt="raw",
        smbios=[qemu_boot.GCE_SMBIOS],
        forwards={("169.254.169.254", 80): md_port, qemu_boot.STORE: gcs_port},
        net=qemu_boot.NET,
    ) as vm:
        if during is not None:
            during(vm)
        code, seconds = vm.wait_exit(BOOT_TIMEOUT_S)
        serial = vm.serial_text()
    raw.unlink()  # a few GB: this boot's copy is done with
    return Booted(_results(gcs, spec), code, seconds, vm.mac, serial)


def _results(gcs, spec: dict[str, Any]) -> dict[str, bytes]:
    """The job's objects by their names under its results prefix. Each is read through a
    fresh blob: the emulator's media links name the address the guest wrote to."""
    bucket, _, prefix = spec["results"].split("://", 1)[1].partition("/")
    blobs = gcs.client().bucket(bucket)
    return {
        key[len(prefix) + 1 :]: blobs.blob(key).download_as_bytes()
        for key in gcs.keys(bucket, prefix + "/")
    }


def _spec(gcs, command: Any, **more: Any) -> dict[str, Any]:
    bucket = f"boot-{uuid.uuid4().hex[:10]}"
    gcs.make_bucket(bucket)
    job = f"b-{uuid.uuid4().hex[:8]}"
    return {
        "gpubake_job": 1,
        "id": job,
        "command": command,
        "results": f"gs://{bucket}/runs/{job}",
        "sync_interval": 10,
        **more,
    }


@pytest.fixture(scope="module")
def first_boot(built, stores, tmp_path_factory) -> Booted:
    spec = _spec(stores["gs"], FACTS)
    return _run_job(built, stores, tmp_path_factory.mktemp("boot1"), spec)


def test_first_boot_runs_the_job_from_the_metadata_server_and_powers_off(first_boot):
    assert first_boot.exit_code == 0, first_boot.serial[-3000:]
    out = first_boot.results
    assert json.loads(out["_SUCCESS"])["exit_code"] == 0, out.get("logs/job.log")
    assert out["results/user"].decode().strip() == "gpubake"
    six, python = out["results/python"].decode().split()
    assert (six, python) == ("1.17.0", "/opt/gpubake/env/bin/python")


def test_first_boot_made_a_fresh_identity_on_another_machine(first_boot):
    out = first_boot.results
    assert out["results/mac"].decode().strip() == first_boot.mac
    assert len(out["results/machine-id"].decode().strip()) == 32
    assert out["results/host_key.pub"].decode().startswith("ssh-ed25519 ")
    assert out["results/state"].decode().strip() == "running", out["results/failed"]


def test_jupyter_listens_on_localhost_only_and_gpu_smoke_passes_on_the_cpu(first_boot):
    out = first_boot.results
    listening = out["results/listening"].decode().split()
    assert "127.0.0.1:8888" in listening
    assert not [a for a in listening if a.endswith(":8888") and a != "127.0.0.1:8888"]
    assert out["results/smoke.rc"].decode().strip() == "0"
    smoke = json.loads(out["results/smoke.json"])
    assert smoke["gpu_visible"] is False


def test_a_second_boot_is_preempted_and_keeps_its_checkpoint(built, stores, first_boot, tmp_path):
    md = stores["md"]
    spec = _spec(stores["gs"], ["python", "-c", TRAIN], sync_interval=10)
    noticed: list[float] = []

    def preempt_after_a_sync(vm) -> None:
        gcs = stores["gs"]
        bucket, _, prefix = spec["results"].split("://", 1)[1].partition("/")
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < deadline and vm.proc.poll() is None:
            if any(k.endswith("checkpoints/model.pt") for k in gcs.keys(bucket, prefix)):
                md.set_gce("instance/preempted", "TRUE")
                noticed.append(time.monotonic())
                return
            time.sleep(2)
        raise AssertionError(f"no checkpoint synced: {vm.serial_text()[-3000:]}")

    second = _run_job(built, stores, tmp_path, spec, during=preempt_after_a_sync)
    assert second.exit_code == 0
    out = second.results
    marker = json.loads(out["_PREEMPTED"])
    log = out.get("logs/job.log", b"").decode()
    assert marker["exit_code"] == 130 and "_SUCCESS" not in out, log[-3000:]
    last = int(out["results/last_step"])
    assert out["checkpoints/model.pt"] == f"weights at step {last}\n".encode()
    assert f"SIGINT: stopping after step {last}" in out["logs/job.log"].decode()
    # another machine: its own MAC, and a host key and machine-id made at its own first boot
    assert second.mac != first_boot.mac
    assert out["results/host_key.pub"].startswith(b"ssh-ed25519 ")
    for fact in ("host_key.pub", "machine-id"):
        assert out[f"results/{fact}"] != first_boot.results[f"results/{fact}"], fact


def test_an_interrupted_build_leaves_nothing(built):
    """SIGINT once the VM is up and Ansible runs in it: no QEMU, loop device, mount or work
    dir is left, and the image built before is still whole."""
    record = (built.folder / "build.json").read_text()
    proc = subprocess.Popen(
        [*NICE, sys.executable, "-m", "gpubake", "build", *BUILD_ARGS, "--force"],
        cwd=built.tree,
        env={**os.environ, "PYTHONPATH": str(built.tree)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "play: Provision a gpubake VM image or host" in line:
            break
    else:
        pytest.fail("".join(lines[-40:]))
    proc.send_signal(signal.SIGINT)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("gpubake: error: interrupted: SIGINT during the Packer build of "), last
    assert "Traceback" not in out
    # this build's work dir (other workers' builds have their own, mounts included)
    key = disk_image.lock_key(built.folder.name)
    work = str(guard.work_root() / guard.slug(key)) + "."
    assert _qemu_processes_in(work) == []
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert work not in loops
    assert work not in Path("/proc/self/mounts").read_text(encoding="utf-8")
    assert list(guard.work_root().glob(f"{guard.slug(key)}.*")) == []
    assert (built.folder / "build.json").read_text() == record


def _qemu_processes_in(folder: str) -> list[str]:
    """QEMU processes started in `folder` (Packer starts QEMU in its template's folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = str((proc / "cwd").readlink())
        except (OSError, ValueError):
            continue
        if "qemu-system" in cmdline and (cwd.startswith(folder) or folder in cmdline):
            found.append(f"{proc.name}: {cmdline}")
    return found
