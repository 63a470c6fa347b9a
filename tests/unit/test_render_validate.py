"""`packer validate .` accepts what gpubake renders, with no flags, for every target x stack x
OS; a render holds only its target's files, and they are `packer fmt` clean."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess

import pytest

from gpubake import resources, stacks
from gpubake.build import ansible, disk_image, targets, vm_disk
from gpubake.build.plan import CloudOptions, make_plan
from gpubake.build.render import COLLECTION_DIR, render

COMBOS = list(
    itertools.product(targets.names(packer=True), stacks.stack_names(), stacks.os_names())
)
CLOUD = CloudOptions(project="gpubake-ci", zone="us-central1-a", region="us-east-1")


@pytest.mark.parametrize(("target", "stack", "os_key"), COMBOS, ids=["-".join(c) for c in COMBOS])
def test_every_combination_renders_and_validates(tmp_path, have_packer, target, stack, os_key):
    gpu = None if target == "docker" else stacks.stacks_data()["default_cloud_gpu"]
    try:
        resolved = stacks.resolve(stack, os_key=os_key, gpu=gpu, target=target)
    except stacks.StackError as exc:
        # the impossible combinations: the stack's wheels lack the OS's Python (MXNet's
        # need <= 3.11, torch 2.15's >= 3.11), for which no lock can be made either
        assert "needs Python" in str(exc), exc
        assert not (
            resources.data_root() / "images" / "locks" / stack / f"{os_key}-x86_64.txt"
        ).exists()
        return
    plan = make_plan(
        resolved,
        target=target,
        base_image=resolved.os.base_image,
        base_image_id="sha256:ci",
        cloud=CLOUD,
        require_gpu=target != "docker",
        ansible_playbook=ansible.playbook_command(),
    )
    disk = targets.get(target).kind == "disk"
    if disk:  # a local disk image: gpubake's own base disk, Debian 12 only
        if os_key not in vm_disk.SUPPORTED:
            with pytest.raises(vm_disk.VmDiskError, match="use --os debian-12"):
                disk_image.render_vars(os_key, "x")
            return
        machine = disk_image.render_vars(os_key, "REPLACE-ME")
        if machine["qemu_base_disk_sha256"] == "REPLACE-ME":
            # no base disk on this machine yet (a fresh one): Packer checks a checksum's form
            machine["qemu_base_disk_sha256"] = "0" * 64
        plan = dataclasses.replace(plan, packer_vars={**plan.packer_vars, **machine})
    var_file = render(plan, tmp_path, with_plugins=False)
    if disk:
        disk_image.prepare(tmp_path)  # the build's login key, which Packer checks
    assert var_file.name == f"{target}.auto.pkrvars.hcl"
    written = sorted(p.name for p in tmp_path.glob("*.pkr*.hcl"))
    assert written == sorted(
        ["variables.pkr.hcl", *targets.get(target).packer_files, var_file.name]
    )
    # no flags: the variables are auto-loaded, and the folder holds one source and one build
    out = subprocess.run(
        [have_packer, "validate", "."],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    fmt = subprocess.run(
        [have_packer, "fmt", "-check", "."], capture_output=True, text=True, cwd=tmp_path
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_a_render_is_usable_by_hand(tmp_path):
    """Only the target's source; the collection and a config that finds it, beside the files."""
    plan = make_plan(
        stacks.resolve(gpu="t4", target="aws-ami"),
        target="aws-ami",
        base_image="x",
        base_image_id="x",
        cloud=CLOUD,
    )
    (tmp_path / "gcp-image.pkr.hcl").write_text("# left by an earlier render\n")
    render(plan, tmp_path, with_plugins=False)
    assert not (tmp_path / "gcp-image.pkr.hcl").exists()
    hcl = "".join(p.read_text() for p in tmp_path.glob("*.pkr.hcl"))
    assert "googlecompute" not in hcl
    assert 'sources = ["source.amazon-ebs.gpubake"]' in hcl
    cfg = (tmp_path / "ansible.cfg").read_text()
    assert "\ncollections_path = collections\n" in cfg
    assert cfg.index("collections_path") > cfg.index("[defaults]")
    collection = tmp_path / COLLECTION_DIR
    for item in ("galaxy.yml", "roles", "playbooks", "plugins", "meta"):
        assert (collection / item).exists(), item
    assert (collection / "playbooks" / "vm.yml").is_file()
    assert not list(collection.rglob("__pycache__"))


def test_cloud_plans_carry_gpu_leak_guards_and_labels():
    gcp = make_plan(
        stacks.resolve(gpu="t4", target="gcp-image"),
        target="gcp-image",
        base_image="debian-cloud/debian-12",
        base_image_id="x",
        cloud=CLOUD,
        require_gpu=True,
    )
    pv = gcp.packer_vars
    assert pv["gcp_accelerator_type"] == "nvidia-tesla-t4"
    assert pv["gcp_machine_type"] == "n1-standard-8"
    assert pv["gcp_gpu"] is True and pv["preemptible"] is True
    assert pv["image_labels"]["gpubake-input-hash"] == gcp.input_hash[:40]
    assert all(
        ch.islower() or ch.isdigit() or ch in "-_" for v in pv["image_labels"].values() for ch in v
    )
    assert gcp.ansible_vars["gpu_smoke_test_args"] == ["--require-gpu"]
    assert pv["disk_size_gb"] >= 50
    # a machine type that brings its GPUs takes no accelerator
    l4 = make_plan(
        stacks.resolve(gpu="l4", target="gcp-image"),
        target="gcp-image",
        base_image="x",
        base_image_id="x",
        cloud=CLOUD,
    )
    assert l4.packer_vars["gcp_machine_type"] == "g2-standard-4"
    assert l4.packer_vars["gcp_accelerator_type"] == ""
    assert l4.packer_vars["gcp_gpu"] is True

    aws = make_plan(
        stacks.resolve(gpu="h100", target="aws-ami"),
        target="aws-ami",
        base_image="x",
        base_image_id="x",
        cloud=CLOUD,
        require_gpu=True,
    )
    av = aws.packer_vars
    assert av["aws_instance_type"] == "p5.4xlarge"  # one H100, not eight
    assert av["spot"] is True
    assert av["image_labels"]["gpubake-input-hash"] == aws.input_hash
    assert aws.ansible_vars["nvidia_driver_fabric_manager"] is True  # p5 has NVSwitch
    assert aws.ansible_vars["nvidia_driver_open"] is True

    cpu = make_plan(
        stacks.resolve(target="aws-ami"),
        target="aws-ami",
        base_image="x",
        base_image_id="x",
        cloud=CloudOptions(region="eu-west-1", gpu_build=False),
    )
    assert cpu.packer_vars["aws_instance_type"] == "m6i.xlarge"
    assert cpu.ansible_vars["gpu_smoke_test_args"] == []


def test_packer_1_6_gets_ssh_rsa_for_its_proxy():
    stack = stacks.resolve(gpu="t4", target="gcp-image")
    old = make_plan(
        stack,
        target="gcp-image",
        base_image="x",
        base_image_id="x",
        cloud=CLOUD,
        packer_version=(1, 6, 6),
    )
    new = make_plan(
        stack,
        target="gcp-image",
        base_image="x",
        base_image_id="x",
        cloud=CLOUD,
        packer_version=(1, 11, 2),
    )
    assert "HostKeyAlgorithms=+ssh-rsa" in " ".join(old.packer_vars["ansible_ssh_extra_args"])
    assert new.packer_vars["ansible_ssh_extra_args"] == []


def test_image_builds_reboot_through_packer_not_ansible(repo_root):
    """Ansible's reboot module cannot reconnect through Packer's SSH proxy: image builds turn
    the role's reboot off and Packer reboots between the VM playbook and gpu-smoke."""
    for target in ("gcp-image", "aws-ami", "qemu", "ssh"):
        plan = make_plan(
            stacks.resolve(target=target),
            target=target,
            base_image="x",
            base_image_id="x",
            cloud=CLOUD,
        )
        assert plan.ansible_vars["nvidia_driver_reboot"] is (target == "ssh")
    hcl = (repo_root / "images" / "vm.pkr.hcl").read_text(encoding="utf-8")
    vm, smoke = hcl.index("playbooks/vm.yml"), hcl.index("playbooks/smoke.yml")
    shell = hcl.index('provisioner "shell"')
    assert vm < shell < smoke
    reboot = hcl[shell : hcl.index("}", shell)]
    assert '"sudo systemctl reboot"' in reboot
    assert "expect_disconnect = true" in reboot
    # then a command that starts only once the VM answers again, before gpu-smoke's Ansible
    wait = hcl[hcl.index('provisioner "shell"', shell + 1) : smoke]
    assert 'start_retry_timeout = "15m"' in wait and 'pause_before        = "30s"' in wait
