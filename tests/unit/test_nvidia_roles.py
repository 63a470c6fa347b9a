"""nvidia_repo and nvidia_driver, rendered: the exact apt entry, keyring, pinned fingerprint and
package names per OS x branch x module flavour x source, the refusals, the unattended-upgrades
file, and the regular expressions the roles match apt's and dkms' output with.

Everything is evaluated by ansible-playbook from the roles' own vars files and templates (the
per-OS file picked by the role's own first_found), on pseudo-hosts whose facts say which OS they
are; nothing is installed. No Docker needed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.nvidia_helpers import OS_FACTS, ROLES, render

FINGERPRINT = "EB693B3035CD5710E231E123A4B469963BF863CC"
KEYRING = "/usr/share/keyrings/cuda-archive-keyring.gpg"
BASE = "https://developer.download.nvidia.com/compute/cuda/repos"
RELEASE = "6.1.0-99-amd64"  # stands for the image's kernel release the role reads from dpkg

# apt 3 (sqv) on NVIDIA's 3BF863CC repositories since 2026-02-01, as reported in
# NVIDIA/cuda-repo-management#39 and #44.
SQV_SHA1_OUTPUT = """\
Hit:1 http://deb.debian.org/debian trixie InRelease
Get:2 https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2404/x86_64  InRelease [1581 B]
Err:2 https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2404/x86_64  InRelease
  Sub-process /usr/bin/sqv returned an error code (1), error message is: Signing key on \
EB693B3035CD5710E231E123A4B469963BF863CC is not bound:            No binding signature at time \
2026-01-29T20:38:48Z   because: Policy rejected non-revocation signature (PositiveCertification) \
requiring second pre-image resistance   because: SHA1 is not considered secure since \
2026-02-01T00:00:00Z
W: OpenPGP signature verification failed: https://developer.download.nvidia.com/compute/cuda/\
repos/ubuntu2404/x86_64  InRelease: Sub-process /usr/bin/sqv returned an error code (1)
E: The repository 'https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2404/x86_64  \
InRelease' is not signed.
"""
APT_OK_OUTPUT = """\
Get:1 https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64  InRelease [1581 B]
Get:2 https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64  Packages [812 kB]
Fetched 813 kB in 1s (712 kB/s)
Reading package lists...
"""

REPO_VARS = {
    "url": "{{ __nvidia_repo_url }}",
    "list_file": "{{ __nvidia_repo_list_file }}",
    "source_line": "{{ __nvidia_repo_source_line }}",
    "keyring": "{{ nvidia_repo_keyring }}",
    "fingerprint": "{{ nvidia_repo_key_fingerprint }}",
    "keyring_deb_url": "{{ __nvidia_repo_keyring_deb_url }}",
    "lists_glob": "{{ __nvidia_repo_lists_glob }}",
    "sha1_regex": "{{ __nvidia_repo_sha1_regex }}",
    "sha1_message": "{{ __nvidia_repo_sha1_message }}",
    "apt_error_regex": "{{ __nvidia_repo_apt_error_regex }}",
    "components_needed": "{{ __nvidia_repo_os_components_needed }}",
    "deb822_debian_regex": "{{ __nvidia_repo_deb822_debian_regex }}",
}
DRIVER_COMBOS = [
    {
        "key": f"{branch}-{'open' if is_open else 'proprietary'}-{source}",
        "branch": branch,
        "open": is_open,
        "source": source,
    }
    for branch in ("535", "580")
    for is_open in (False, True)
    for source in ("nvidia", "distro")
]


UNATTENDED_TEMPLATE = ROLES / "nvidia_driver" / "templates" / "unattended-upgrades.conf.j2"


def _lookup(key: str, template: Path) -> str:
    """A set_fact value adding `key`: the template rendered by the template lookup."""
    return (
        f"{{{{ gpubake_out | combine({{'{key}': "
        f"lookup('ansible.builtin.template', '{template}')}}) }}}}"
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nvidia-render")
    hosts = dict(OS_FACTS)
    # an image that already has a cloud kernel keeps it
    hosts["debian12_cloud"] = {
        **OS_FACTS["debian12"],
        "packages": {"linux-image-cloud-amd64": [{"version": "6.1.158-1"}]},
    }
    hosts["ubuntu2204_gcp"] = {
        **OS_FACTS["ubuntu2204"],
        "packages": {"linux-image-gcp": [{"version": "6.8.0.1015.15~22.04.1"}]},
    }
    tasks = [
        {
            "name": "Repository values",
            "ansible.builtin.set_fact": {
                "gpubake_out": {
                    "repo": REPO_VARS,
                    "flavour": "{{ __nvidia_driver_kernel_flavour_name }}",
                    "driver": {},
                    "oneline_regex": {},
                    "deb822_regex": {},
                },
            },
        },
        {
            "name": "Debian component regular expressions, per component",
            "ansible.builtin.set_fact": {
                "gpubake_out": "{{ gpubake_out | combine({"
                "'oneline_regex': {item: __nvidia_repo_oneline_regex | join}, "
                "'deb822_regex': {item: __nvidia_repo_deb822_regex | join}}, recursive=true) }}"
            },
            "loop": ["contrib", "non-free", "non-free-firmware"],
            "vars": {"__nvidia_repo_component": "{{ item }}"},
        },
        {
            "name": "Driver values per branch, module flavour and source",
            "ansible.builtin.set_fact": {
                "gpubake_out": "{{ gpubake_out | combine({'driver': gpubake_out.driver | combine({"
                "item.key: {'packages': __nvidia_driver_packages_resolved, "
                "'kernel_packages': __nvidia_driver_kernel_packages, "
                "'held': __nvidia_driver_held_packages, "
                "'blacklist': __nvidia_driver_unattended_blacklist, "
                "'dkms': __nvidia_driver_dkms, "
                "'dkms_regex': __nvidia_driver_dkms_installed_regex}})}) }}"
            },
            "loop": DRIVER_COMBOS,
            "vars": {
                "nvidia_driver_branch": "{{ item.branch }}",
                "nvidia_driver_open": "{{ item.open }}",
                "nvidia_driver_source": "{{ item.source }}",
                "__nvidia_driver_kernel_release": RELEASE,
            },
        },
        {
            "name": "Ubuntu's precompiled modules and Fabric Manager",
            "ansible.builtin.set_fact": {
                "gpubake_out": "{{ gpubake_out | combine({'precompiled': "
                "{'packages': __nvidia_driver_packages_resolved, 'dkms': __nvidia_driver_dkms, "
                "'held': __nvidia_driver_held_packages}}) }}"
            },
            "vars": {
                "nvidia_driver_branch": "535",
                "nvidia_driver_open": False,
                "nvidia_driver_source": "distro",
                "nvidia_driver_precompiled": True,
                "nvidia_driver_fabric_manager": True,
                "__nvidia_driver_kernel_release": RELEASE,
            },
            "when": "__nvidia_driver_packages_precompiled | length > 0",
        },
        {
            "name": "Render the repository entry",
            "ansible.builtin.set_fact": {
                "gpubake_out": _lookup(
                    "cuda_list", ROLES / "nvidia_repo" / "templates" / "cuda.list.j2"
                )
            },
        },
        {
            "name": "Render the unattended-upgrades file",
            "ansible.builtin.set_fact": {"gpubake_out": _lookup("unattended", UNATTENDED_TEMPLATE)},
            "vars": {
                "nvidia_driver_branch": "535",
                "nvidia_driver_open": False,
                "nvidia_driver_source": "distro",
                "__nvidia_driver_kernel_release": RELEASE,
            },
        },
    ]
    return render(tmp, hosts, tasks)


def repo(rendered, host):
    return rendered[host]["repo"]


@pytest.mark.parametrize(
    ("host", "distro", "arch"),
    [
        ("debian12", "debian12", "x86_64"),
        ("ubuntu2204", "ubuntu2204", "x86_64"),
        ("ubuntu2404", "ubuntu2404", "x86_64"),
        ("ubuntu2404_arm", "ubuntu2404", "sbsa"),
    ],
)
def test_apt_entry_keyring_and_pinned_fingerprint(rendered, host, distro, arch):
    values = repo(rendered, host)
    url = f"{BASE}/{distro}/{arch}/"
    line = f"deb [signed-by={KEYRING},{FINGERPRINT}] {url} /"
    assert values["url"] == url
    assert values["fingerprint"] == FINGERPRINT
    assert values["keyring"] == KEYRING
    assert values["source_line"] == line
    # cuda-keyring's own file name: the package's entry is replaced, never duplicated
    assert values["list_file"] == f"/etc/apt/sources.list.d/cuda-{distro}-{arch}.list"
    assert values["keyring_deb_url"] == f"{url}cuda-keyring_1.1-1_all.deb"
    written = rendered[host]["cuda_list"]
    assert written.splitlines()[1:] == [line]
    assert written.startswith("#") and FINGERPRINT in written.splitlines()[0]


def test_only_debian_needs_extra_components(rendered):
    assert repo(rendered, "debian12")["components_needed"] is True
    assert repo(rendered, "ubuntu2204")["components_needed"] is False
    assert repo(rendered, "ubuntu2404")["components_needed"] is False


@pytest.mark.parametrize("host", ["debian12", "ubuntu2404"])
def test_lists_glob_matches_the_file_apt_writes(rendered, host):
    import fnmatch

    glob = repo(rendered, host)["lists_glob"]
    distro = "debian12" if host == "debian12" else "ubuntu2404"
    apt_name = f"developer.download.nvidia.com_compute_cuda_repos_{distro}_x86%5f64_InRelease"
    assert fnmatch.fnmatch(apt_name, glob)
    assert fnmatch.fnmatch(f"_srv_nvidia_{distro}_x86%5f64_InRelease", glob)  # a file: source
    other = "developer.download.nvidia.com_compute_cuda_repos_ubuntu2204_x86%5f64_InRelease"
    assert not fnmatch.fnmatch(other, glob)
    assert not fnmatch.fnmatch(apt_name.replace("InRelease", "Packages"), glob)


def test_sha1_refusal_is_recognised_and_explained(rendered):
    values = repo(rendered, "ubuntu2404")
    assert re.search(values["sha1_regex"], SQV_SHA1_OUTPUT)
    assert not re.search(values["sha1_regex"], APT_OK_OUTPUT)
    message = values["sha1_message"]
    for needed in ("SHA-1", "NVIDIA/cuda-repo-management#39", FINGERPRINT, "never disables"):
        assert needed in message, message
    assert "cuda_source: distro" in message


def test_apt_errors_are_recognised(rendered):
    regex = re.compile(repo(rendered, "debian12")["apt_error_regex"], re.MULTILINE)
    assert regex.search(SQV_SHA1_OUTPUT)
    assert not regex.search(APT_OK_OUTPUT)
    no_key = "W: GPG error: https://x/ InRelease: NO_PUBKEY A4B469963BF863CC\n"
    assert regex.search(no_key)
    assert regex.search("E: Conflicting values set for option Signed-By regarding source x\n")


# ---- Debian's contrib / non-free components (tasks_from: distro.yml) ---------------------------

ONE_LINE = """\
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
deb http://deb.debian.org/debian/ bookworm main non-free-firmware
# deb http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/x.gpg] https://example.com/apt stable main
deb http://deb.debian.org/debian trixie main
"""
ONE_LINE_EXPECTED = """\
deb http://deb.debian.org/debian bookworm main contrib non-free non-free-firmware
deb http://deb.debian.org/debian bookworm-updates main contrib non-free non-free-firmware
deb http://deb.debian.org/debian-security bookworm-security main contrib non-free non-free-firmware
deb http://deb.debian.org/debian/ bookworm main non-free-firmware contrib non-free
# deb http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/x.gpg] https://example.com/apt stable main
deb http://deb.debian.org/debian trixie main
"""
DEB822 = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def _replace_like_ansible(text: str, regexes: dict[str, str]) -> tuple[str, int]:
    """ansible.builtin.replace: re.MULTILINE, the replacement `\\1 <component>`, per component."""
    changes = 0
    for component, regex in regexes.items():
        text, n = re.compile(regex, re.MULTILINE).subn(rf"\1 {component}", text)
        changes += n
    return text, changes


def test_components_added_to_debian_one_line_entries_only(rendered):
    regexes = rendered["debian12"]["oneline_regex"]
    once, changed = _replace_like_ansible(ONE_LINE, regexes)
    assert once == ONE_LINE_EXPECTED
    assert changed == 11
    again, changed_again = _replace_like_ansible(once, regexes)
    assert (again, changed_again) == (once, 0), "a second run must change nothing"


def test_components_added_to_debian_deb822_entries(rendered):
    values = rendered["debian12"]
    once, _ = _replace_like_ansible(DEB822, values["deb822_regex"])
    assert once.splitlines()[3] == "Components: main contrib non-free non-free-firmware"
    assert once.splitlines()[9] == "Components: main non-free-firmware contrib non-free"
    assert _replace_like_ansible(once, values["deb822_regex"]) == (once, 0)
    debian = re.compile(values["repo"]["deb822_debian_regex"])
    assert debian.match("URIs: http://deb.debian.org/debian\n")
    assert debian.match("URIs: https://cdn-aws.deb.debian.org/debian-security/\n")
    assert not debian.match("URIs: https://download.docker.com/linux/debian-ish\n")
    assert not debian.match("URIs: https://packages.cloud.google.com/apt\n")


# ---- driver packages --------------------------------------------------------------------------

NVIDIA_PACKAGES = {"proprietary": "cuda-drivers-{b}", "open": "nvidia-open-{b}"}
DEBIAN_DISTRO = {
    "proprietary": [
        "nvidia-kernel-dkms",
        "nvidia-smi",
        "libcuda1",
        "nvidia-persistenced",
        "firmware-nvidia-gsp",
    ],
    "open": [
        "nvidia-open-kernel-dkms",
        "nvidia-smi",
        "libcuda1",
        "nvidia-persistenced",
        "firmware-nvidia-gsp",
    ],
}


@pytest.mark.parametrize("host", ["debian12", "ubuntu2204", "ubuntu2404"])
@pytest.mark.parametrize("branch", ["535", "580"])
@pytest.mark.parametrize("flavour", ["proprietary", "open"])
def test_driver_packages_from_nvidia(rendered, host, branch, flavour):
    values = rendered[host]["driver"][f"{branch}-{flavour}-nvidia"]
    assert values["packages"] == [NVIDIA_PACKAGES[flavour].format(b=branch)]
    assert values["dkms"] is True


@pytest.mark.parametrize("branch", ["535", "580"])
@pytest.mark.parametrize("flavour", ["proprietary", "open"])
def test_driver_packages_from_debian(rendered, branch, flavour):
    values = rendered["debian12"]["driver"][f"{branch}-{flavour}-distro"]
    assert values["packages"] == DEBIAN_DISTRO[flavour]
    assert values["kernel_packages"] == ["linux-image-amd64", "linux-headers-amd64"]


@pytest.mark.parametrize("host", ["ubuntu2204", "ubuntu2404"])
@pytest.mark.parametrize("branch", ["535", "580"])
def test_driver_packages_from_ubuntu(rendered, host, branch):
    driver = rendered[host]["driver"]
    assert driver[f"{branch}-proprietary-distro"]["packages"] == [
        f"nvidia-headless-{branch}-server",
        f"nvidia-utils-{branch}-server",
    ]
    assert driver[f"{branch}-open-distro"]["packages"] == [
        f"nvidia-headless-{branch}-server-open",
        f"nvidia-utils-{branch}-server",
    ]
    assert driver[f"{branch}-open-distro"]["kernel_packages"] == [
        "linux-image-generic",
        "linux-headers-generic",
    ]


@pytest.mark.parametrize("host", ["ubuntu2204", "ubuntu2404"])
def test_ubuntu_precompiled_modules_need_no_dkms_or_headers(rendered, host):
    values = rendered[host]["precompiled"]
    assert values["packages"] == [
        "linux-modules-nvidia-535-server-generic",
        "nvidia-headless-no-dkms-535-server",
        "nvidia-utils-535-server",
    ]
    assert values["dkms"] is False
    assert values["held"] == [
        "linux-image-generic",
        f"linux-image-{RELEASE}",
        *values["packages"],
        "nvidia-fabricmanager-535",
    ]


def test_kernel_flavour_is_the_images_own(rendered):
    assert rendered["debian12"]["flavour"] == "amd64"
    assert rendered["debian12_cloud"]["flavour"] == "cloud-amd64"
    assert rendered["debian12_cloud"]["driver"]["535-proprietary-distro"]["kernel_packages"] == [
        "linux-image-cloud-amd64",
        "linux-headers-cloud-amd64",
    ]
    assert rendered["ubuntu2204"]["flavour"] == "generic"
    assert rendered["ubuntu2204_gcp"]["flavour"] == "gcp"


def test_kernel_headers_and_driver_are_held_together(rendered):
    values = rendered["debian12"]["driver"]["535-proprietary-distro"]
    assert values["held"] == [
        "linux-image-amd64",
        "linux-headers-amd64",
        f"linux-image-{RELEASE}",
        f"linux-headers-{RELEASE}",
        *DEBIAN_DISTRO["proprietary"],
    ]
    blacklist = values["blacklist"]
    for name in values["held"]:
        assert any(re.fullmatch(pattern, name) for pattern in blacklist), name
    # exact patterns for the held packages, then the families that move with them
    assert blacklist[: len(values["held"])] == [f"^{re.escape(n)}$" for n in values["held"]]
    for family_member in ("libnvidia-ml1", "nvidia-kernel-support", "linux-image-6.1.0-100-amd64"):
        assert any(re.match(pattern, family_member) for pattern in blacklist), family_member
    for unrelated in ("openssh-server", "libc6", "linux-libc-dev"):
        assert not any(re.match(pattern, unrelated) for pattern in blacklist), unrelated


def test_unattended_upgrades_file(rendered):
    text = rendered["debian12"]["unattended"]
    lines = text.splitlines()
    start = lines.index("Unattended-Upgrade::Package-Blacklist {")
    assert lines[-1] == "};"
    entries = [re.fullmatch(r'    "(.*)";', line).group(1) for line in lines[start + 1 : -1]]
    held = rendered["debian12"]["driver"]["535-proprietary-distro"]["held"]
    assert entries[: len(held)] == [f"^{re.escape(n)}$" for n in held]
    assert "^nvidia-" in entries and "^libnvidia-" in entries and "^linux-headers-" in entries
    assert all(line.startswith("//") for line in lines[:start])


@pytest.mark.parametrize("branch", ["535", "580"])
def test_dkms_status_regex(rendered, branch):
    regex = re.compile(rendered["debian12"]["driver"][f"{branch}-open-distro"]["dkms_regex"])
    assert regex.search(f"nvidia-current/{branch}.309.01, {RELEASE}, x86_64: installed\n")
    assert regex.search(f"nvidia/{branch}.95.05, {RELEASE}, x86_64: installed (WARNING Diff)\n")
    other = "580" if branch == "535" else "535"
    assert not regex.search(f"nvidia-current/{other}.309.01, {RELEASE}, x86_64: installed\n")
    assert not regex.search(f"nvidia-current/{branch}.309.01, {RELEASE}, x86_64: built\n")
    # built for another kernel (the build host's) does not count
    assert not regex.search(f"nvidia-current/{branch}.309.01, 6.18.44-fc, x86_64: installed\n")
    assert not regex.search(f"nvidia-current/{branch}.309.01, {RELEASE}1, x86_64: installed\n")


# ---- refusals -----------------------------------------------------------------------------------

DEBIAN_CASES = {
    "open-kepler": {"nvidia_driver_open": True, "nvidia_driver_gpu_architecture": "kepler"},
    "open-maxwell": {"nvidia_driver_open": True, "nvidia_driver_gpu_architecture": "maxwell"},
    "open-pascal": {"nvidia_driver_open": True, "nvidia_driver_gpu_architecture": "Pascal"},
    "open-volta": {"nvidia_driver_open": True, "nvidia_driver_gpu_architecture": "volta"},
    "open-turing": {"nvidia_driver_open": True, "nvidia_driver_gpu_architecture": "turing"},
    "open-unknown": {"nvidia_driver_open": True, "nvidia_driver_gpu_architecture": ""},
    "proprietary-volta": {"nvidia_driver_open": False, "nvidia_driver_gpu_architecture": "volta"},
    "proprietary-blackwell": {
        "nvidia_driver_open": False,
        "nvidia_driver_gpu_architecture": "blackwell",
    },
    "kepler-580": {
        "nvidia_driver_open": False,
        "nvidia_driver_gpu_architecture": "kepler",
        "nvidia_driver_branch": "580",
    },
    "blackwell-535": {
        "nvidia_driver_gpu_architecture": "blackwell",
        "nvidia_driver_branch": "535",
    },
    "blackwell-580": {
        "nvidia_driver_gpu_architecture": "blackwell",
        "nvidia_driver_branch": "580",
    },
    "pascal-595": {
        "nvidia_driver_open": False,
        "nvidia_driver_gpu_architecture": "pascal",
        "nvidia_driver_branch": "595",
    },
    "kepler-470": {
        "nvidia_driver_open": False,
        "nvidia_driver_gpu_architecture": "kepler",
        "nvidia_driver_branch": "470",
    },
    # the facts as gpubake passes them from gpus.yml win over the file
    "passed-open-unsupported": {
        "nvidia_driver_open": True,
        "nvidia_driver_gpu_architecture": "turing",
        "nvidia_driver_gpu_open_kernel_module": "unsupported",
    },
    "passed-last-branch": {
        "nvidia_driver_open": False,
        "nvidia_driver_gpu_architecture": "turing",
        "nvidia_driver_gpu_last_branch": 535,
        "nvidia_driver_branch": "580",
    },
    "distro-580": {"nvidia_driver_source": "distro", "nvidia_driver_branch": "580"},
    "distro-535": {
        "nvidia_driver_source": "distro",
        "nvidia_driver_branch": "535",
        "nvidia_driver_open": False,
    },
    "distro-535-open": {"nvidia_driver_source": "distro", "nvidia_driver_branch": "535"},
    "distro-fabric-manager": {
        "nvidia_driver_source": "distro",
        "nvidia_driver_branch": "535",
        "nvidia_driver_open": False,
        "nvidia_driver_fabric_manager": True,
    },
    "nvidia-fabric-manager": {"nvidia_driver_fabric_manager": True},
    "precompiled-on-debian": {
        "nvidia_driver_source": "distro",
        "nvidia_driver_branch": "535",
        "nvidia_driver_open": False,
        "nvidia_driver_precompiled": True,
    },
}
UBUNTU_CASES = {
    "precompiled": {
        "nvidia_driver_source": "distro",
        "nvidia_driver_precompiled": True,
        "nvidia_driver_branch": "570",
    },
    "precompiled-from-nvidia": {"nvidia_driver_precompiled": True},
}


CHECKS = ROLES / "nvidia_driver" / "tasks" / "checks.yml"
GPUS_FILE = ROLES / "gpu_smoke_test" / "files" / "gpus.yml"


def _case_tasks(cases: dict[str, dict], host: str) -> list[dict]:
    tasks = []
    for name, case_vars in cases.items():
        record = "{{ gpubake_out | default({}) | combine({'%s': %s}) }}"
        tasks.append(
            {
                "name": f"Case {name}",
                "when": f"inventory_hostname == '{host}'",
                "block": [
                    {
                        "name": f"Checks for {name}",
                        "ansible.builtin.include_tasks": str(CHECKS),
                        # outside the role there is no role_path to find gpus.yml by
                        "vars": {**case_vars, "__nvidia_driver_gpus_file": str(GPUS_FILE)},
                    },
                    {
                        "name": f"Passed {name}",
                        "ansible.builtin.set_fact": {"gpubake_out": record % (name, "'passed'")},
                    },
                ],
                "rescue": [
                    {
                        "name": f"Refused {name}",
                        "ansible.builtin.set_fact": {
                            "gpubake_out": record % (name, "ansible_failed_result.msg")
                        },
                    }
                ],
            }
        )
    return tasks


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    hosts = {"debian12": OS_FACTS["debian12"], "ubuntu2404": OS_FACTS["ubuntu2404"]}
    done = render(
        tmp_path_factory.mktemp("nvidia-refusals"),
        hosts,
        _case_tasks(DEBIAN_CASES, "debian12")
        + _case_tasks({f"ubuntu-{k}": v for k, v in UBUNTU_CASES.items()}, "ubuntu2404"),
        roles=("nvidia_driver",),
    )
    return {
        **{k: v for k, v in done["debian12"].items() if k in DEBIAN_CASES},
        **{k: v for k, v in done["ubuntu2404"].items() if k.startswith("ubuntu-")},
    }


@pytest.mark.parametrize("arch", ["kepler", "maxwell", "pascal", "volta"])
def test_open_module_refused_before_turing(refusals, arch):
    message = refusals[f"open-{arch}"]
    assert message != "passed"
    assert arch.capitalize() in message
    assert "Turing and newer" in message
    assert "nvidia_driver_open: false" in message


@pytest.mark.parametrize(
    "case", ["open-turing", "open-unknown", "proprietary-volta", "kepler-470", "blackwell-580"]
)
def test_workable_requests_pass(refusals, case):
    assert refusals[case] == "passed"


def test_architecture_facts_passed_in_win_over_gpus_yml(refusals):
    assert "nvidia_driver_open: false" in refusals["passed-open-unsupported"]
    assert "up to driver branch 535, not 580" in refusals["passed-last-branch"]


def test_no_architecture_fact_is_copied_into_the_role():
    text = " ".join(
        p.read_text() for p in (ROLES / "nvidia_driver").rglob("*.yml") if "tasks" in p.parts
    )
    text += (ROLES / "nvidia_driver" / "vars" / "main.yml").read_text()
    for copied in ("[kepler", "blackwell]", "470"):
        assert copied not in text, copied


def test_proprietary_module_refused_on_blackwell(refusals):
    assert "nvidia_driver_open: true" in refusals["proprietary-blackwell"]


def test_kepler_needs_branch_470(refusals):
    assert "470" in refusals["kepler-580"] and "580" in refusals["kepler-580"]


def test_branches_an_architecture_cannot_use_are_refused(refusals):
    """gpus.yml's first and last branches: Blackwell from 570, Pascal up to 580."""
    assert refusals["blackwell-535"] == "Blackwell GPUs need driver branch 570 or newer, not 535."
    assert refusals["pascal-595"] == "Pascal GPUs are supported up to driver branch 580, not 595."


def test_debian_ships_535_only(refusals):
    assert refusals["distro-535"] == "passed"
    message = refusals["distro-580"]
    assert "535 only" in message and "nvidia_driver_source: nvidia" in message


def test_debians_open_module_packages_are_refused_before_apt(refusals):
    message = refusals["distro-535-open"]
    assert "open kernel module packages of branch 535 cannot be installed" in message
    assert "nvidia_driver_open: false" in message


def test_fabric_manager_needs_a_source_that_has_it(refusals):
    assert "Fabric Manager" in refusals["distro-fabric-manager"]
    assert refusals["nvidia-fabric-manager"] == "passed"


def test_precompiled_modules_are_ubuntus(refusals):
    assert "Precompiled" in refusals["precompiled-on-debian"]
    assert refusals["ubuntu-precompiled"] == "passed"
    assert "Precompiled" in refusals["ubuntu-precompiled-from-nvidia"]


# ---- the fingerprint check itself ----------------------------------------------------------------

# the one fingerprint script every signed repository uses (role common, tasks/signed_repo.yml)
SCRIPT = ROLES / "common" / "files" / "key_fingerprints.sh"


def _gpg(home: Path, *args: str) -> str:
    batch = ["--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
    return subprocess.run(
        ["gpg", "--homedir", str(home), *batch, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout


@pytest.fixture(scope="module")
def keyrings(tmp_path_factory):
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    try:
        fprs = []
        for uid in ("one <one@example.invalid>", "two <two@example.invalid>"):
            _gpg(home, "--quick-gen-key", uid, "ed25519", "sign", "never")
            listing = _gpg(home, "--with-colons", "--list-keys", uid)
            fpr = re.search(r"^fpr:+([0-9A-F]{40}):", listing, re.MULTILINE).group(1)
            _gpg(home, "--quick-add-key", fpr, "cv25519", "encr", "never")
            fprs.append(fpr)
        one = home / "one.gpg"
        both = home / "both.gpg"
        one.write_bytes(
            subprocess.run(
                ["gpg", "--homedir", str(home), "--export", fprs[0]],
                capture_output=True,
                check=True,
                timeout=60,
            ).stdout
        )
        both.write_bytes(
            subprocess.run(
                ["gpg", "--homedir", str(home), "--export", *fprs],
                capture_output=True,
                check=True,
                timeout=60,
            ).stdout
        )
        yield fprs, one, both
    finally:
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "all"], check=False, timeout=60
        )


def _fingerprints(path: Path) -> list[str]:
    proc = subprocess.run(
        ["sh", str(SCRIPT), str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    return proc.stdout.split()


def test_fingerprint_script_lists_primary_keys_only(keyrings):
    fprs, one, both = keyrings
    assert _fingerprints(one) == [fprs[0]]  # its encryption subkey is not listed
    assert _fingerprints(both) == fprs


def test_fingerprint_script_on_debians_keyring():
    keyring = Path("/usr/share/keyrings/debian-archive-bookworm-stable.gpg")
    if shutil.which("gpg") is None or not keyring.exists():
        pytest.skip("gpg or Debian's keyring is not here")
    assert _fingerprints(keyring) == ["4D64FEC119C2029067D6E791F8D2585B8783D481"]


def test_fingerprint_script_prints_nothing_for_a_non_keyring(tmp_path):
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    junk = tmp_path / "junk.gpg"
    junk.write_bytes(b"not a key")
    proc = subprocess.run(
        ["sh", str(SCRIPT), str(junk)], capture_output=True, text=True, timeout=60
    )
    assert proc.stdout == ""
