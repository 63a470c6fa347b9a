"""Target `qemu` without booting anything: its registry entry, its plan (the seal removes the
build user; no DKMS check without a driver), the accelerator choice, the checksum cache,
`--var driver_source=none`, and the CLI's dry run and one-line refusals.
(tests/integration/test_qemu_image.py builds and boots the image.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpubake import stacks
from gpubake.build import disk_image, targets, vm_disk
from gpubake.build.plan import make_plan

ROOT = Path(__file__).resolve().parents[2]
NO_DRIVER = {"driver_source": "none", "cuda_source": "none"}


def _plan(variables=None, base_id=None):
    stack = stacks.resolve("pytorch", target="qemu", variables=variables or {})
    return make_plan(
        stack,
        target="qemu",
        base_image=vm_disk.base_image_name("debian-12"),
        base_image_id=base_id or vm_disk.base_image_id("debian-12"),
    )


def test_qemu_is_a_sealed_vm_image_and_takes_disk_size_only():
    target = targets.get("qemu")
    assert (target.kind, target.is_vm, target.is_vm_image, target.is_cloud_image) == (
        "disk", True, True, False
    )  # fmt: skip
    assert targets.check_options("qemu", {"disk_size": 60}) is target
    with pytest.raises(targets.TargetError, match="--project applies to --target gcp-image only"):
        targets.check_options("qemu", {"project": "p"})


def test_the_plan_seals_away_the_build_user_and_checks_dkms_only_with_a_driver():
    plan = _plan(NO_DRIVER)
    av = plan.ansible_vars
    assert plan.packer_vars["ssh_username"] == vm_disk.USER != av["base_user_name"]
    assert av["image_cleanup_vm"] is True
    assert av["nvidia_driver_reboot"] is False  # Packer reboots the VM
    assert av["image_cleanup_expect_dkms"] == []
    assert av["manifest_build"]["driver_source"] == "none"
    assert _plan().ansible_vars["image_cleanup_expect_dkms"] == ["nvidia"]
    assert plan.packer_only == "qemu.gpubake"
    assert plan.packer_vars["ssh_username"] == vm_disk.USER
    assert plan.packer_vars["disk_size_gb"] >= vm_disk.DISK_SIZE_GIB  # never a shrink
    assert plan.image_ref == f"gpubake-pytorch-{plan.input_hash[:12]}"
    # the base disk is an input: another base disk, another image
    assert _plan(NO_DRIVER, base_id="vm-base:debian-12-other").input_hash != plan.input_hash


def test_driver_source_none_leaves_the_toolkit_out():
    stack = stacks.resolve("pytorch", target="qemu", variables=NO_DRIVER)
    assert (stack.driver_source, stack.cuda_source, stack.cuda_toolkit) == ("none", "none", "")
    only_driver = stacks.resolve("pytorch", target="qemu", variables={"driver_source": "none"})
    assert only_driver.cuda_toolkit == only_driver.cuda  # NVIDIA's toolkit, no driver
    with pytest.raises(stacks.StackError, match="choose nvidia or distro or none"):
        stacks.resolve("pytorch", target="qemu", variables={"driver_source": "vendor"})


def test_accelerator_can_be_forced_and_a_bad_value_is_one_line(monkeypatch):
    assert disk_image.accelerator(None, {"GPUBAKE_QEMU_ACCEL": "tcg"}) == "tcg"
    assert disk_image.accelerator(None, {"GPUBAKE_QEMU_ACCEL": "KVM"}) == "kvm"
    with pytest.raises(
        disk_image.DiskImageError, match=r"^GPUBAKE_QEMU_ACCEL=hvf: use kvm or tcg$"
    ):
        disk_image.accelerator(None, {"GPUBAKE_QEMU_ACCEL": "hvf"})


def test_the_kvm_verdict_is_found_once_and_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert disk_image.accelerator(tmp_path / "none.qcow2", {}) == "tcg"
        return
    probe = vm_disk.base_dir() / "kvm-probe.json"
    probe.parent.mkdir(parents=True)
    key = f"{os.uname().release} {disk_image._qemu_version()}"
    for boots, accel in ((False, "tcg"), (True, "kvm")):
        probe.write_text(json.dumps({"key": key, "boots": boots}))
        # the disk does not exist: a probe would fail; the kept verdict answers
        assert disk_image.accelerator(tmp_path / "none.qcow2", {}) == accel
    probe.write_text(json.dumps({"key": "another kernel", "boots": True}))
    assert disk_image.accelerator(None, {}) == "kvm"  # no disk: no probe, no verdict kept


def test_sha256_is_kept_beside_the_file_until_it_changes(tmp_path):
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(b"a" * 1000)
    first = disk_image.sha256_of(disk)
    assert (tmp_path / "d.qcow2.sha256").read_text().split()[1] == first
    (tmp_path / "d.qcow2.sha256").write_text(
        (tmp_path / "d.qcow2.sha256").read_text().replace(first, "f" * 64)
    )
    assert disk_image.sha256_of(disk) == "f" * 64  # read from the sidecar, not the file
    disk.write_bytes(b"b" * 1001)
    assert disk_image.sha256_of(disk) not in (first, "f" * 64)


def test_built_finds_a_folder_of_the_same_inputs_only(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = disk_image.image_dir("gpubake-x-1")
    assert disk_image.built("gpubake-x-1", "h1") is None
    folder.mkdir(parents=True)
    (folder / disk_image.BUILD_RECORD).write_text(json.dumps({"input_hash": "h1"}))
    assert disk_image.built("gpubake-x-1", "h1") == folder
    assert disk_image.built("gpubake-x-1", "h2") is None


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "build.py"), "--target", "qemu", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


def test_dry_run_json_names_the_base_disk_and_no_driver():
    proc = _cli("--var", "driver_source=none", "--var", "cuda_source=none", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["target"] == "qemu"
    assert plan["base_image_id"] == vm_disk.base_image_id("debian-12")
    assert plan["packer_vars"]["ssh_username"] == vm_disk.USER


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--os", "ubuntu-24.04"),
            "local VM disks for debian-12 only, not 'ubuntu-24.04': use --os debian-12",
        ),
        (("--project", "p"), "--project applies to --target gcp-image only"),
    ],
)
def test_what_qemu_cannot_do_is_one_line(args, message):
    proc = _cli(*args, "--dry-run")
    assert proc.returncode != 0
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("gpubake: error: ") and message in line, line
