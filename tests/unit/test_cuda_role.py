"""cuda, rendered: package names, CUDA_HOME and library directories per OS x version x source,
the refusal of a CUDA the distribution does not ship, and the profile.d / ld.so.conf.d files
(the profile script is then sourced by a real sh). No Docker needed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.nvidia_helpers import OS_FACTS, ROLES, render

TEMPLATES = ROLES / "cuda" / "templates"
COMBOS = [
    {"key": "13.2-nvidia", "version": "13.2", "source": "nvidia", "cudnn": True, "nccl": True},
    {"key": "12.8-nvidia", "version": "12.8", "source": "nvidia", "cudnn": True, "nccl": True},
    {
        "key": "13.2-nvidia-bare",
        "version": "13.2",
        "source": "nvidia",
        "cudnn": False,
        "nccl": False,
    },
    {
        "key": "distro",
        "version": "{{ __cuda_distro_version }}",
        "source": "distro",
        "cudnn": True,
        "nccl": True,
    },
]
HOSTS = ("debian12", "ubuntu2204", "ubuntu2404")
DISTRO = {
    "debian12": "11.8",
    "ubuntu2204": "11.5",
    "ubuntu2404": "12.0",
}


def _template(key: str, name: str) -> str:
    return (
        f"{{{{ gpubake_out | combine({{item.key: {{'{key}': "
        f"lookup('ansible.builtin.template', '{TEMPLATES / name}')}}}}, recursive=true) }}}}"
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    loop_vars = {
        "cuda_version": "{{ item.version }}",
        "cuda_source": "{{ item.source }}",
        "cuda_cudnn": "{{ item.cudnn }}",
        "cuda_nccl": "{{ item.nccl }}",
    }
    tasks = [
        {
            "name": "Values per version and source",
            "ansible.builtin.set_fact": {
                "gpubake_out": "{{ gpubake_out | default({}) | combine({item.key: {"
                "'packages': __cuda_packages_resolved, 'home': __cuda_home_resolved, "
                "'library_dirs': __cuda_library_dirs, 'nvcc_regex': __cuda_nvcc_release_regex, "
                "'version': cuda_version}}) }}"
            },
            "loop": COMBOS,
            "vars": loop_vars,
        },
        {
            "name": "The profile script",
            "ansible.builtin.set_fact": {"gpubake_out": _template("profile", "gpubake-cuda.sh.j2")},
            "loop": COMBOS,
            "vars": loop_vars,
        },
        {
            "name": "The loader configuration",
            "ansible.builtin.set_fact": {"gpubake_out": _template("ld", "gpubake-cuda.conf.j2")},
            "loop": COMBOS,
            "vars": loop_vars,
        },
    ]
    hosts = {name: OS_FACTS[name] for name in (*HOSTS, "ubuntu2404_arm")}
    return render(tmp_path_factory.mktemp("cuda-render"), hosts, tasks, roles=("cuda",))


@pytest.mark.parametrize("host", [*HOSTS, "ubuntu2404_arm"])
def test_toolkit_cudnn_and_nccl_from_nvidia(rendered, host):
    values = rendered[host]
    assert values["13.2-nvidia"]["packages"] == [
        "cuda-toolkit-13-2",
        "libcudnn9-cuda-13",
        "libcudnn9-dev-cuda-13",
        "libnccl2",
        "libnccl-dev",
    ]
    assert values["12.8-nvidia"]["packages"][:3] == [
        "cuda-toolkit-12-8",
        "libcudnn9-cuda-12",
        "libcudnn9-dev-cuda-12",
    ]
    assert values["13.2-nvidia-bare"]["packages"] == ["cuda-toolkit-13-2"]
    assert values["13.2-nvidia"]["home"] == "/usr/local/cuda-13.2"
    assert values["13.2-nvidia"]["library_dirs"] == ["/usr/local/cuda-13.2/lib64"]


@pytest.mark.parametrize("host", HOSTS)
def test_distribution_toolkit(rendered, host):
    values = rendered[host]["distro"]
    assert values["version"] == DISTRO[host]
    assert values["packages"] == ["nvidia-cuda-toolkit"]  # no cuDNN / NCCL from the distribution
    assert values["home"] == "/usr/lib/nvidia-cuda-toolkit"
    assert values["library_dirs"] == []


def test_nvcc_release_regex(rendered):
    regex = re.compile(rendered["debian12"]["distro"]["nvcc_regex"])
    assert regex.search("Cuda compilation tools, release 11.8, V11.8.89")
    assert not regex.search("Cuda compilation tools, release 11.5, V11.5.119")
    assert not regex.search("Cuda compilation tools, release 1118, V11.8.89")
    regex13 = re.compile(rendered["debian12"]["13.2-nvidia"]["nvcc_regex"])
    assert regex13.search("Cuda compilation tools, release 13.2, V13.2.51")
    assert not regex13.search("Cuda compilation tools, release 13.1, V13.1.80")


def _source(script: str, tmp_path: Path, path: str) -> list[str]:
    """Source the rendered profile script in a real sh, print CUDA_HOME and PATH."""
    file = tmp_path / "gpubake-cuda.sh"
    file.write_text(script, encoding="utf-8")
    proc = subprocess.run(
        [
            "sh",
            "-c",
            '. "$1" && . "$1" && printf "%s\\n%s\\n" "$CUDA_HOME" "$PATH"',
            "sh",
            str(file),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={"PATH": path},
    )
    return proc.stdout.splitlines()


@pytest.mark.parametrize(
    ("key", "home"),
    [("13.2-nvidia", "/usr/local/cuda-13.2"), ("distro", "/usr/lib/nvidia-cuda-toolkit")],
)
def test_profile_script_puts_nvcc_first_on_path_once(rendered, tmp_path, key, home):
    script = rendered["debian12"][key]["profile"]
    assert f"export CUDA_HOME={home}" in script.splitlines()
    cuda_home, path = _source(script, tmp_path, "/usr/bin:/bin")
    assert cuda_home == home
    assert path == f"{home}/bin:/usr/bin:/bin"  # sourced twice, added once


def test_loader_configuration(rendered):
    nvidia = rendered["debian12"]["13.2-nvidia"]["ld"].splitlines()
    assert nvidia[0].startswith("#")
    assert nvidia[1:] == ["/usr/local/cuda-13.2/lib64"]
    distro = rendered["debian12"]["distro"]["ld"].splitlines()
    assert all(line.startswith("#") for line in distro), distro  # default path already


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    checks = ROLES / "cuda" / "tasks" / "checks.yml"
    cases = {
        "distro-13.2": {"cuda_source": "distro", "cuda_version": "13.2"},
        "distro-11.8": {"cuda_source": "distro", "cuda_version": "11.8"},
        "nvidia-13.2": {"cuda_source": "nvidia", "cuda_version": "13.2"},
        "bad-version": {"cuda_version": "13"},
    }
    record = "{{ gpubake_out | default({}) | combine({'%s': %s}) }}"
    tasks = [
        {
            "name": f"Case {name}",
            "block": [
                {"name": "Checks", "ansible.builtin.include_tasks": str(checks), "vars": case},
                {
                    "name": "Passed",
                    "ansible.builtin.set_fact": {"gpubake_out": record % (name, "'passed'")},
                },
            ],
            "rescue": [
                {
                    "name": "Refused",
                    "ansible.builtin.set_fact": {
                        "gpubake_out": record % (name, "ansible_failed_result.msg")
                    },
                }
            ],
        }
        for name, case in cases.items()
    ]
    hosts = {"debian12": OS_FACTS["debian12"]}
    return render(tmp_path_factory.mktemp("cuda-refusals"), hosts, tasks, roles=("cuda",))[
        "debian12"
    ]


def test_a_cuda_the_distribution_does_not_ship_is_refused(refusals):
    message = refusals["distro-13.2"]
    assert "ships CUDA 11.8 (nvidia-cuda-toolkit), not 13.2" in message
    assert 'cuda_version: "11.8"' in message and "cuda_source: nvidia" in message
    assert refusals["distro-11.8"] == "passed"
    assert refusals["nvidia-13.2"] == "passed"
    assert "major.minor" in refusals["bad-version"]
