"""Role contracts: argument_specs equal defaults, pins mirror images/stacks.yml, layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gpubake import stacks

ROOT = Path(__file__).resolve().parents[2]
ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if p.is_dir())


def _yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_match_defaults(role):
    role_dir = ROOT / "roles" / role
    spec = _yaml(role_dir / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    defaults_file = role_dir / "defaults" / "main.yml"
    defaults = _yaml(defaults_file) if defaults_file.exists() else {}
    defaults = defaults or {}
    assert set(spec) == set(defaults), f"{role}: spec and defaults name different variables"
    for name, option in spec.items():
        assert option.get("default") == defaults[name], f"{role}: {name} default differs"
        assert option.get("description"), f"{role}: {name} has no description"
        assert name.startswith(f"{role}_"), f"{role}: public variable {name} lacks the role prefix"


@pytest.mark.parametrize("role", ROLES)
def test_role_has_readme_naming_every_variable(role):
    role_dir = ROOT / "roles" / role
    readme = (role_dir / "README.md").read_text(encoding="utf-8")
    spec = _yaml(role_dir / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    for name in spec:
        assert name in readme, f"{role}: README does not mention {name}"
    assert (role_dir / "meta" / "main.yml").is_file()
    assert (role_dir / "tasks" / "main.yml").is_file()


def test_role_pins_mirror_stacks_yml():
    data = stacks.stacks_data()
    py = _yaml(ROOT / "roles" / "python_env" / "defaults" / "main.yml")
    assert py["python_env_uv_version"] == data["tools"]["uv"]["version"]
    assert py["python_env_uv_sha256"] == data["tools"]["uv"]["sha256"]
    conda = data["stacks"]["pytorch-conda"]["miniforge"]
    assert py["python_env_miniforge_version"] == conda["version"]
    assert py["python_env_miniforge_sha256"] == conda["sha256"]
    torch = _yaml(ROOT / "roles" / "pytorch" / "defaults" / "main.yml")["pytorch_packages"]
    assert torch == data["stacks"]["pytorch"]["packages"]
    mx = _yaml(ROOT / "roles" / "mxnet" / "defaults" / "main.yml")["mxnet_packages"]
    assert mx == data["stacks"]["mxnet"]["packages"]


def test_smoke_role_ships_the_one_copy_of_the_checker_and_gpu_data():
    files = ROOT / "roles" / "gpu_smoke_test" / "files"
    assert (files / "gpu_smoke.py").resolve() == (ROOT / "gpubake" / "gpu_smoke.py").resolve()
    assert (files / "gpus.yml").resolve() == (ROOT / "images" / "gpus.yml").resolve()


def test_container_playbook_orders_roles():
    play = _yaml(ROOT / "playbooks" / "container.yml")[0]
    names = [r["role"] for r in play["roles"]]
    assert names[-3:] == ["gpu_smoke_test", "manifest", "image_cleanup"]
    assert names.index("python_env") < names.index("pytorch") < names.index("gpu_smoke_test")
    assert names[0] == "build_ca"
