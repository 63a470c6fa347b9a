"""nvidia_driver (with nvidia_repo) in Debian 12 containers.

- For real, from Debian's non-free, on the host `build.py --target ssh` set up (vm_host.py):
  the 535 DKMS module is built and installed for the kernel installed in the image (not the
  host's), nouveau is blacklisted in the initramfs, kernel + headers + driver are held,
  unattended-upgrades is kept off them; a second run changes nothing.
- NVIDIA's CUDA repository is not reachable from here: that path runs in check mode, which shows
  the exact apt entry, the pinned key check, the packages, the kernel release and the DKMS build it
  would do, and changes nothing.
- A driver no package owns (a runfile or Deep Learning VM install, here an nvidia-smi that answers
  580.95.05) is detected and left alone; one of another branch stops the role.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator

import pytest

from tests.integration.helpers import apply, base_image, container, run_in
from tests.integration.nvidia_helpers import (
    PLAYBOOK,
    StandIn,
    apply_json,
    apply_json_failing,
    make_stand_in,
    messages,
    results_named,
    sign_repo,
    stats,
    stop_gpg_agent,
    tar_tree,
    task_results,
)

pytestmark = pytest.mark.docker
FINGERPRINT = "EB693B3035CD5710E231E123A4B469963BF863CC"
REPO = "https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/"
LIST_FILE = "/etc/apt/sources.list.d/cuda-debian12-x86_64.list"
ENTRY = f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg,{FINGERPRINT}] {REPO} /"
HOST_KERNEL = os.uname().release
DEBIAN_KERNEL = re.compile(r"6\.1\.0-\d+-amd64")
NVIDIA_VARS = {
    "roles_under_test": ["nvidia_driver"],
    "nvidia_driver_source": "nvidia",
    "nvidia_driver_branch": "580",
    "nvidia_driver_open": True,
    "nvidia_driver_gpu_architecture": "hopper",
    "nvidia_driver_fabric_manager": True,
}
FAKE_SMI = """#!/bin/sh
# stands for a driver installed by NVIDIA's runfile: no package owns it
case "$*" in
  *--query-gpu=driver_version*) echo 580.95.05 ;;
  *) echo "NVIDIA-SMI 580.95.05" ;;
esac
"""


@pytest.fixture(scope="module")
def debian(engine) -> str:
    return base_image(engine)


@pytest.fixture
def bootstrapped(engine, debian) -> Iterator[object]:
    """A Debian 12 container with Python (role_test.yml's bootstrap, run for real, no role)."""
    with container(engine, debian) as box:
        apply(box, PLAYBOOK, {"roles_under_test": []})
        yield box


def _tar(name: str, data: bytes, mode: int) -> bytes:
    """A one-file tar for container.put_archive."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = mode
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _exists(box, path: str) -> bool:
    return run_in(box, "test", "-e", path)[0] == 0


def _after(result: dict) -> str:
    """The content a file task would write, from its --diff."""
    diffs = result["diff"] if isinstance(result["diff"], list) else [result["diff"]]
    return "".join(d.get("after", "") for d in diffs if isinstance(d.get("after"), str))


# ---- NVIDIA's repository, check mode -----------------------------------------------------------


@pytest.fixture(scope="module")
def nvidia_check(engine, debian):
    with container(engine, debian) as box:
        apply(box, PLAYBOOK, {"roles_under_test": []})  # Python, for real
        report, _ = apply_json(box, PLAYBOOK, NVIDIA_VARS, check=True, diff=True)
        untouched = {
            path: _exists(box, path)
            for path in (
                LIST_FILE,
                "/usr/share/keyrings/cuda-archive-keyring.gpg",
                "/etc/modprobe.d/gpubake-blacklist-nouveau.conf",
                "/etc/apt/apt.conf.d/51gpubake-nvidia-driver",
                "/var/lib/dkms",
            )
        }
        untouched["kernel installed"] = run_in(box, "dpkg-query", "-W", "linux-image-amd64")[0] == 0
        held = run_in(box, "apt-mark", "showhold")[1]
        yield report, box.name, untouched, held


def test_check_mode_shows_the_exact_pinned_apt_entry(nvidia_check):
    report, host, untouched, _held = nvidia_check
    assert stats(report, host)["failures"] == 0
    (entry,) = results_named(
        report,
        host,
        "gpubake.gpu.nvidia_repo : Write the repository entry (only the pinned key may sign it)",
    )
    assert entry["changed"] is True
    written = _after(entry).splitlines()
    assert written[1:] == [ENTRY]
    assert FINGERPRINT in written[0]
    assert untouched[LIST_FILE] is False, "check mode must not write the entry"


def test_check_mode_states_the_keyring_and_apt_steps(nvidia_check):
    report, host, untouched, _held = nvidia_check
    said = messages(report, host)
    assert any(
        f"would download {REPO}cuda-keyring_1.1-1_all.deb" in m
        and f"exactly the key {FINGERPRINT}" in m
        for m in said
    ), said
    assert any(
        "would run apt-get update for " + LIST_FILE in m and "NVIDIA/cuda-repo-management#39" in m
        for m in said
    ), said
    assert untouched["/usr/share/keyrings/cuda-archive-keyring.gpg"] is False


def test_check_mode_plans_the_driver_for_the_images_kernel(nvidia_check):
    report, host, untouched, held = nvidia_check
    said = messages(report, host)
    assert any(
        "would install nvidia-open-580 and nvidia-fabricmanager-580 from nvidia" in m for m in said
    )
    (kernel,) = [m for m in said if m.startswith("Image kernel: ")]
    release = kernel.split()[2]
    assert DEBIAN_KERNEL.fullmatch(release), kernel
    assert release != HOST_KERNEL
    assert f"the build host runs {HOST_KERNEL}, which is not used" in kernel
    assert any(
        f"would build the NVIDIA 580 module with DKMS for the image's kernel {release}" in m
        for m in said
    ), said
    (install_kernel,) = results_named(
        report,
        host,
        # role common's one apt install, for the kernel packages
        "gpubake.gpu.common : Install linux-image-amd64, linux-headers-amd64",
    )
    assert install_kernel["changed"] is True
    would_hold = [
        "linux-image-amd64",
        "linux-headers-amd64",
        f"linux-image-{release}",
        f"linux-headers-{release}",
        "nvidia-open-580",
        "nvidia-fabricmanager-580",
    ]
    assert f"check mode: would hold {', '.join(would_hold)} (not installed yet)" in said
    (blacklist,) = results_named(
        report, host, "gpubake.gpu.nvidia_driver : Keep unattended-upgrades from moving them"
    )
    assert r'    "^nvidia\-open\-580$";' in _after(blacklist).splitlines()
    assert held.strip() == "", "check mode must hold nothing"
    assert untouched["kernel installed"] is False and untouched["/var/lib/dkms"] is False


def test_check_mode_never_reboots_a_container(nvidia_check):
    report, host, *_ = nvidia_check
    reboots = results_named(
        report, host, "gpubake.gpu.nvidia_driver : Reboot to load the NVIDIA driver"
    )
    assert reboots, "the handler must have been notified"
    assert all(r.get("skipped") for r in reboots)


def test_a_second_entry_for_nvidias_repository_is_refused(bootstrapped):
    box = bootstrapped
    stale = "deb https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/ /\n"
    run_in(box, "sh", "-c", f"printf '{stale}' > /etc/apt/sources.list.d/cuda.list")
    report = apply_json_failing(box, PLAYBOOK, NVIDIA_VARS)
    said = " ".join(messages(report, box.name))
    assert "/etc/apt/sources.list.d/cuda.list also names developer.download.nvidia.com" in said
    assert LIST_FILE in said
    assert not _exists(box, LIST_FILE)


# ---- nvidia_repo for real, against a local stand-in for NVIDIA's repository --------------------
# Same layout, same cuda-keyring package shape, a throwaway signing key instead of 3BF863CC: the
# download, the fingerprint checks, the pinned entry and apt's verification all run for real.

STAND_IN_LIST = "/etc/apt/sources.list.d/cuda-debian12-x86_64.list"
STAND_IN_URL = "file:///srv/nvidia/debian12/x86_64/"


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Iterator[StandIn]:
    if shutil.which("gpg") is None or shutil.which("dpkg-scanpackages") is None:
        pytest.skip("gpg and dpkg-dev are needed to build the stand-in repository")
    made = make_stand_in(tmp_path_factory.mktemp("stand-in"))
    try:
        yield made
    finally:
        stop_gpg_agent(made)


@pytest.fixture(scope="module")
def stand_in_box(engine, debian, stand_in):
    variables = {
        "roles_under_test": ["nvidia_repo"],
        "nvidia_repo_base_url": "file:///srv/nvidia",
        "nvidia_repo_key_fingerprint": stand_in.good,
    }
    with container(engine, debian) as box:
        apply(box, PLAYBOOK, {"roles_under_test": []})
        box.put_archive("/", tar_tree(stand_in.root))
        first, _ = apply_json(box, PLAYBOOK, variables)
        second, _ = apply_json(box, PLAYBOOK, variables)
        yield box, variables, first, second


def test_stand_in_repository_added_with_the_pinned_key_for_real(stand_in_box, stand_in):
    box, _variables, first, second = stand_in_box
    assert stats(first, box.name)["changed"] > 0
    changed = [name for name, r in task_results(second, box.name) if r.get("changed")]
    assert stats(second, box.name)["changed"] == 0, changed
    rc, entry = run_in(box, "cat", STAND_IN_LIST)
    assert entry.splitlines()[1:] == [
        "deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg,"
        f"{stand_in.good}] {STAND_IN_URL} /"
    ]
    rc, version = run_in(box, "dpkg-query", "--show", "--showformat=${Version}", "cuda-keyring")
    assert (rc, version) == (0, "1.1-1")
    rc, policy = run_in(box, "apt-cache", "policy", "cuda-drivers-580")
    assert "Candidate: 1.0" in policy and "file:/srv/nvidia/debian12/x86_64  Packages" in policy
    assert not _exists(box, "/tmp/gpubake-nvidia-repo")


def test_stand_in_signed_by_another_key_is_refused(stand_in_box, stand_in):
    """apt keeps verifying: a repository signed by a key the keyring lacks stops the role."""
    box, variables, *_ = stand_in_box
    folder = stand_in.root / "srv" / "nvidia" / "debian12" / "x86_64"
    sign_repo(stand_in, folder, stand_in.other)
    try:
        box.put_archive("/", tar_tree(stand_in.root))
        run_in(box, "sh", "-c", "rm -f /var/lib/apt/lists/*srv_nvidia_*")
        report = apply_json_failing(box, PLAYBOOK, variables)
        said = " ".join(messages(report, box.name))
        assert f"apt could not read NVIDIA's CUDA repository {STAND_IN_URL}" in said
        assert "NO_PUBKEY" in said or "not signed" in said
    finally:
        sign_repo(stand_in, folder, stand_in.good)
        box.put_archive("/", tar_tree(stand_in.root))


def test_fingerprint_in_the_entry_pins_the_key_even_if_the_keyring_grows(stand_in_box, stand_in):
    box, variables, *_ = stand_in_box
    folder = stand_in.root / "srv" / "nvidia" / "debian12" / "x86_64"
    sign_repo(stand_in, folder, stand_in.other)
    box.put_archive("/", tar_tree(stand_in.root))
    other = subprocess.run(
        ["gpg", "--homedir", str(stand_in.gnupg), "--export", stand_in.other],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    box.put_archive("/tmp", _tar("other.gpg", other, 0o644))
    keyring = "/usr/share/keyrings/cuda-archive-keyring.gpg"
    run_in(box, "sh", "-c", f"cat /tmp/other.gpg >> {keyring}")
    update = [
        "apt-get",
        "update",
        "-o",
        "Dir::Etc::SourceParts=-",
        "-o",
        "APT::Get::List-Cleanup=0",
    ]
    # the role's entry names the pinned fingerprint: the other key's signature is not accepted
    rc, out = run_in(box, *update, "-o", f"Dir::Etc::SourceList={STAND_IN_LIST}")
    assert rc != 0 and "is not signed" in out, out
    # control: the same keyring without the fingerprint in the entry would have accepted it
    run_in(
        box,
        "sh",
        "-c",
        f"echo 'deb [signed-by={keyring}] {STAND_IN_URL} /' > /tmp/unpinned.list",
    )
    rc, out = run_in(box, *update, "-o", "Dir::Etc::SourceList=/tmp/unpinned.list")
    assert rc == 0 and "is not signed" not in out, out
    # and the role refuses a keyring holding anything but the pinned key
    report = apply_json_failing(box, PLAYBOOK, variables)
    said = " ".join(messages(report, box.name))
    assert f"{keyring} holds the keys" in said
    assert stand_in.other in said and f"not only the pinned ['{stand_in.good}']" in said


def test_a_cuda_keyring_with_another_key_is_not_installed(bootstrapped, stand_in):
    box = bootstrapped
    box.put_archive("/", tar_tree(stand_in.root))
    variables = {
        "roles_under_test": ["nvidia_repo"],
        "nvidia_repo_base_url": "file:///srv/bad",
        "nvidia_repo_key_fingerprint": stand_in.good,
    }
    report = apply_json_failing(box, PLAYBOOK, variables)
    said = " ".join(messages(report, box.name))
    assert "file:///srv/bad/debian12/x86_64/cuda-keyring_1.1-1_all.deb holds the keys" in said
    assert stand_in.other in said and "refusing to trust it" in said
    assert run_in(box, "dpkg-query", "-W", "cuda-keyring")[0] != 0
    assert not _exists(box, "/usr/share/keyrings/cuda-archive-keyring.gpg")
    assert not _exists(box, "/tmp/gpubake-nvidia-repo")


# ---- a driver already present --------------------------------------------------------------------


def test_a_driver_no_package_owns_is_detected_and_left_alone(bootstrapped):
    box = bootstrapped
    box.put_archive("/usr/local/bin", _tar("nvidia-smi", FAKE_SMI.encode(), 0o755))
    report, _ = apply_json(box, PLAYBOOK, NVIDIA_VARS)
    host = box.name
    assert stats(report, host)["changed"] == 0
    said = messages(report, host)
    (found,) = [m for m in said if m.startswith("NVIDIA driver present:")]
    assert "580.95.05 from nvidia-smi (/usr/local/bin/nvidia-smi, owned by no package)" in found
    assert "Leaving it alone; not adding: nvidia-open-580, kernel linux-image-amd64" in found
    assert "Fabric Manager nvidia-fabricmanager-580" in found
    (install,) = results_named(report, host, "gpubake.gpu.nvidia_driver : Install the driver")
    assert install.get("skipped") is True
    assert not _exists(box, LIST_FILE) and not _exists(box, "/boot/vmlinuz")
    assert run_in(box, "dpkg-query", "-W", "linux-image-amd64")[0] != 0


def test_a_driver_of_another_branch_no_package_owns_stops_the_role(bootstrapped):
    box = bootstrapped
    box.put_archive("/usr/local/bin", _tar("nvidia-smi", FAKE_SMI.encode(), 0o755))
    report = apply_json_failing(box, PLAYBOOK, {**NVIDIA_VARS, "nvidia_driver_branch": "595"})
    said = " ".join(messages(report, box.name))
    assert "another branch is present and no package owns it" in said
    assert "580.95.05 from nvidia-smi" in said


# ---- Debian's 535 for real, on the VM host set up over ssh (vm_host.py) ---------------------


def _image_kernel(box) -> str:
    rc, depends = run_in(
        box, "dpkg-query", "--show", "--showformat=${Depends}", "linux-image-amd64"
    )
    assert rc == 0, depends
    return re.search(r"linux-image-(6\.1\.0-\d+-amd64)", depends).group(1)


@pytest.mark.slow
def test_distro_driver_installed_first_and_left_as_is_second(vm_host):
    # role common's one apt install, for the driver packages (tasks/packages.yml)
    title = (
        "gpubake.gpu.common : Install nvidia-kernel-dkms, nvidia-smi, libcuda1, "
        "nvidia-persistenced, firmware-nvidia-gsp"
    )
    assert vm_host.first.statuses(title) == ["changed"]
    assert vm_host.second.statuses(title) in (["ok"], ["skipping"])


@pytest.mark.slow
def test_dkms_built_the_535_module_for_the_images_kernel_not_the_hosts(vm_host):
    box = vm_host.box
    release = _image_kernel(box)
    assert release != HOST_KERNEL
    rc, status = run_in(box, "dkms", "status")
    assert rc == 0, status
    assert re.search(
        rf"^nvidia-current/535\.[\d.]+, {re.escape(release)}, x86_64: installed", status, re.M
    ), status
    assert HOST_KERNEL not in status
    module = f"/lib/modules/{release}/updates/dkms/nvidia-current.ko"
    rc, vermagic = run_in(box, "modinfo", "-F", "vermagic", module)
    assert rc == 0 and vermagic.startswith(release + " "), vermagic
    rc, version = run_in(box, "modinfo", "-F", "version", module)
    assert version.startswith("535."), version
    assert not _exists(box, f"/lib/modules/{HOST_KERNEL}")
    assert vm_host.first.said(
        f"Image kernel: {release} (linux-image-amd64); the build host runs {HOST_KERNEL}"
    )


@pytest.mark.slow
def test_debian_non_free_enabled_on_debians_own_entries(vm_host):
    box = vm_host.box
    rc, sources = run_in(box, "cat", "/etc/apt/sources.list")
    assert rc == 0
    assert sources.splitlines() == [
        "deb http://deb.debian.org/debian bookworm main contrib non-free non-free-firmware",
        "deb http://deb.debian.org/debian bookworm-updates main contrib non-free non-free-firmware",
        "deb http://deb.debian.org/debian-security bookworm-security"
        " main contrib non-free non-free-firmware",
    ]
    policy = run_in(box, "apt-cache", "policy")[1]
    for component in ("contrib", "non-free", "non-free-firmware"):
        assert f",c={component}," in policy


@pytest.mark.slow
def test_nouveau_blacklisted_in_the_initramfs_too(vm_host):
    box = vm_host.box
    release = _image_kernel(box)
    rc, conf = run_in(box, "cat", "/etc/modprobe.d/gpubake-blacklist-nouveau.conf")
    assert rc == 0 and "blacklist nouveau" in conf.splitlines()
    rc, listing = run_in(box, "lsinitramfs", f"/boot/initrd.img-{release}")
    assert rc == 0, listing
    assert "etc/modprobe.d/gpubake-blacklist-nouveau.conf" in listing.splitlines()


@pytest.mark.slow
def test_kernel_headers_and_driver_held_together(vm_host):
    box = vm_host.box
    release = _image_kernel(box)
    rc, held = run_in(box, "apt-mark", "showhold")
    assert rc == 0
    assert set(held.split()) >= {
        "linux-image-amd64",
        "linux-headers-amd64",
        f"linux-image-{release}",
        f"linux-headers-{release}",
        "nvidia-kernel-dkms",
        "nvidia-smi",
        "libcuda1",
        "nvidia-persistenced",
        "firmware-nvidia-gsp",
    }
    rc, dump = run_in(box, "apt-config", "dump", "Unattended-Upgrade::Package-Blacklist")
    assert rc == 0
    patterns = re.findall(r'^Unattended-Upgrade::Package-Blacklist:: "(.*)";$', dump, re.M)
    for name in (
        "nvidia-kernel-dkms",
        f"linux-image-{release}",
        "libnvidia-ml1",
        "nvidia-kernel-support",
    ):
        assert any(re.match(p, name) for p in patterns), (name, patterns)
    assert not any(re.match(p, "openssh-server") for p in patterns)


@pytest.mark.slow
def test_no_reboot_in_a_container(vm_host):
    reboots = vm_host.first.statuses("gpubake.gpu.nvidia_driver : Reboot to load the NVIDIA driver")
    assert reboots and set(reboots) == {"skipping"}
    rc, boots = run_in(vm_host.box, "journalctl", "--list-boots", "--no-pager", "-q")
    assert rc == 0
    assert len(re.findall(r"^\s*-?\d+ [0-9a-f]{32} ", boots, re.M)) == 1, boots


@pytest.mark.slow
def test_the_driver_the_role_installed_is_not_mistaken_for_a_foreign_one(vm_host):
    """On the second run the 535 module it built is found on disk, and the role converges it
    (it does not leave it alone as if someone else had installed it)."""
    (found,) = vm_host.second.said("NVIDIA driver present:")
    assert re.search(
        r"535\.[\d.]+ in /lib/modules/6\.1\.0-\d+-amd64/updates/dkms/nvidia-current\.ko", found
    )
    assert "Converging it to: nvidia-kernel-dkms" in found
