"""`build.py --target ssh` on a running machine: a Debian 12 container with systemd and sshd,
reached over real SSH, set up with the VM playbook twice (vm_host.py). The second run must
change nothing. Driver and CUDA details are checked in test_nvidia_driver.py / test_cuda.py on
the same host."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from gpubake import stacks
from tests.integration.helpers import run_in
from tests.integration.vm_host import build_over_ssh, ssh_host

pytestmark = [pytest.mark.docker, pytest.mark.slow]
_SUMMARY = re.compile(
    r"^gpubake: (?P<book>vm\.yml|smoke\.yml) on (?P<host>\S+): "
    r"(?P<ok>\d+) tasks ok, (?P<changed>\d+) changed",
    re.M,
)
_RECAP = re.compile(r"^127\.0\.0\.1\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=0\s+failed=0", re.M)


def _summaries(output: str) -> dict[str, tuple[int, int]]:
    return {m["book"]: (int(m["ok"]), int(m["changed"])) for m in _SUMMARY.finditer(output)}


def test_first_run_set_the_host_up_over_ssh(vm_host):
    said = _summaries(vm_host.first.output)
    assert set(said) == {"vm.yml", "smoke.yml"}
    assert said["vm.yml"][1] > 20, vm_host.first.output[-3000:]
    # Ansible's own recap agrees with what gpubake reported
    recap = _RECAP.findall(vm_host.first.section("vm.yml") + "\n" + vm_host.first.output)
    assert (str(said["vm.yml"][0]), str(said["vm.yml"][1])) in recap
    assert f"done on {vm_host.login}" in vm_host.first.output  # the same address, rebooted


#: what a second apply after a reboot changes: /run is a tmpfs, so the build-time CA bundle
#: the first apply left there (for a second run to need no change) is gone and placed again
REBOOT_CHANGES = [
    "gpubake.gpu.build_ca : Copy the CA bundle (used by pip, uv, conda and curl during the "
    "build only)",
]


def test_second_run_on_the_rebooted_host_changed_nothing_else(vm_host):
    said = _summaries(vm_host.second.output)
    assert vm_host.second.changed("vm.yml") == REBOOT_CHANGES, vm_host.second.output[-6000:]
    assert said["vm.yml"][1] == len(REBOOT_CHANGES), vm_host.second.output[-6000:]
    # gpu-smoke ran again and rewrote its report: the one change smoke.yml reports
    assert said["smoke.yml"][1] == 1


def test_the_host_was_booted_from_the_snapshot_of_the_first_run(vm_host, engine):
    """The second apply ran on a container booted from the committed first one (its
    record says so), not on the first apply's container."""
    assert vm_host.box.image.id == engine.images.get(vm_host.snapshot).id
    assert vm_host.first.returncode == 0
    assert f"done on {vm_host.login}" in vm_host.second.output


def test_a_running_host_keeps_its_tmp_caches_and_apt_lists(vm_host):
    """image_cleanup is for images: on a machine in use it would wipe the user's files."""
    rc, lists = run_in(vm_host.box, "sh", "-c", "ls /var/lib/apt/lists | grep -c Packages")
    assert rc == 0 and int(lists) > 0
    assert vm_host.first.statuses(
        "gpubake.gpu.image_cleanup : Remove build-only files, empty package lists, caches, logs "
        "and /tmp"
    ) in (
        [],
        ["skipping"],
    )
    rc, _ = run_in(vm_host.box, "test", "-s", "/run/gpubake-build/ca-bundle.crt")
    assert rc == 0  # kept (tmpfs) so that a second run needs no change


def test_it_went_over_ssh_not_a_container_connection(vm_host):
    # the host's sshd logged logins with our key (Ansible multiplexes its tasks over them)
    fingerprint = subprocess.run(
        ["ssh-keygen", "-lf", str(vm_host.key.with_suffix(".pub"))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    # (since this boot: the journal kept the first apply's logins, with that run's key; a
    # container's boot id is the host's, so -b cannot tell the boots apart)
    since = f"@{vm_host.booted_at}"
    rc, log = run_in(
        vm_host.box, "journalctl", "-u", "ssh", "--since", since, "--no-pager", "-o", "cat"
    )
    assert rc == 0
    logins = re.findall(r"Accepted publickey for root from \S+ .*: (\S+ \S+)", log)
    # at least the login check and Ansible's (it multiplexes vm.yml and smoke.yml over one)
    assert len(logins) >= 2, log[-2000:]
    assert set(logins) == {f"ED25519 {fingerprint}"}


def test_gpu_smoke_ran_on_the_host_and_skipped_the_gpu(vm_host):
    section = vm_host.first.section("smoke.yml")
    assert "gpu-smoke" in section
    rc, out = run_in(vm_host.box, "/usr/local/bin/gpu-smoke", "--json", "--framework", "mxnet")
    report = json.loads(out)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["gpu_visible"] is False
    # MXNet's CUDA 11 libraries all resolve, and with Debian's libcuda1 (the driver's user
    # side) it imports; an array on the GPU needs a GPU: skipped, never passed
    assert checks["mxnet.libs"]["status"] == "passed", checks["mxnet.libs"]
    assert checks["mxnet.import"]["status"] == "passed", checks["mxnet.import"]
    assert "mxnet 1.9.1 (CUDA 11.7)" in checks["mxnet.import"]["detail"]
    assert checks["mxnet.gpu_array"]["status"] == "skipped", checks["mxnet.gpu_array"]
    assert rc == 0
    rc, _ = run_in(vm_host.box, "/usr/local/bin/gpu-smoke", "--require-gpu")
    assert rc == 1


def test_jupyter_serves_on_localhost_only(vm_host):
    rc, state = run_in(vm_host.box, "systemctl", "is-active", "gpubake-jupyter")
    assert rc == 0, state
    rc, listening = run_in(vm_host.box, "ss", "-Hltn", "sport = :8888")
    assert rc == 0
    assert [line.split()[3] for line in listening.splitlines()] == ["127.0.0.1:8888"]


def test_manifest_records_the_sources(vm_host):
    rc, out = run_in(vm_host.box, "cat", "/etc/gpubake/manifest.json")
    assert rc == 0, out
    manifest = json.loads(out)
    assert manifest["stack"] == "mxnet"
    assert manifest["target"] == "ssh"
    assert (manifest["driver_source"], manifest["cuda_source"]) == ("distro", "distro")
    assert manifest["cuda_toolkit"] == "11.8"


OFFLINE = (
    "rm -rf /var/lib/apt/lists/* && "
    "echo 'Acquire::http::Proxy \"http://127.0.0.1:9\";' >/etc/apt/apt.conf.d/99offline"
)
# what apt says when it cannot resolve a package in check mode, each way
NO_LISTS = "and apt says: No package matching 'ca-certificates' is available"
NO_BINDINGS = "and apt says: python3-apt must be installed to use check mode."


@pytest.mark.parametrize(
    ("prepare", "apt_says"),
    [(OFFLINE, NO_LISTS), (f"{OFFLINE} && dpkg --purge python3-apt", NO_BINDINGS)],
    ids=["empty-apt-lists", "no-python3-apt"],
)
def test_check_mode_on_a_fresh_host_reports_and_changes_nothing(engine, prepare, apt_says):
    """`--check` on a machine nothing was applied to yet (as on a GPU host before its first
    run), whose apt lists are empty and whose apt reaches no mirror (as on a fresh container
    or cloud image, or an offline GPU host), with or without python3-apt (which check mode
    cannot install): the VM playbook in check mode lists what it would add, changes nothing,
    then gpu-smoke runs from gpubake itself; without a GPU, --require-gpu fails it."""
    with ssh_host(engine) as (box, login, key, known):
        rc, out = run_in(box, "sh", "-c", prepare)
        assert rc == 0, out
        _, before = run_in(box, "sh", "-c", "dpkg-query -W | sha256sum; ls /opt /etc/apt/*.d")
        done = build_over_ssh(login, key, known, "--check", "-v", timeout=1800)
        said = _summaries(done.output.replace("would change", "changed"))
        assert said["vm.yml"][1] > 5, done.output[-6000:]
        # what apt cannot resolve in check mode is reported, package by package
        unresolved = [m for m in done.said("check mode: would install ") if "apt says: " in m]
        base = [m for m in unresolved if "tmux" in m]  # the base tools
        assert base and base[0].endswith(apt_says), unresolved
        assert any("linux-headers-amd64" in m for m in unresolved), unresolved  # the kernel
        assert done.said("check mode: apt's lists know no linux-image-"), done.output[-6000:]
        holds = done.said("check mode: /opt/gpubake/env holds none of them; would install ")
        torch = dict(stacks.resolve().packages)["torch"]
        assert any(f"torch=={torch}" in m for m in holds), holds
        assert "JupyterLab would be installed and run as gpubake" in done.output
        assert "The manifest would be written to /etc/gpubake/manifest.json" in done.output
        assert "check mode changed nothing; running gpu-smoke from gpubake itself" in done.output
        assert done.returncode == 1
        assert done.output.rstrip().endswith(f"gpu-smoke failed on {login} (exit 1)")
        _, after = run_in(box, "sh", "-c", "dpkg-query -W | sha256sum; ls /opt /etc/apt/*.d")
        assert after == before
        assert run_in(box, "id", "gpubake")[0] != 0
