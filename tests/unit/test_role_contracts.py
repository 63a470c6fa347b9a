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
    tf = _yaml(ROOT / "roles" / "tensorflow" / "defaults" / "main.yml")["tensorflow_packages"]
    assert tf == data["stacks"]["tensorflow"]["packages"]
    spec = _yaml(ROOT / "roles" / "tensorflow" / "meta" / "argument_specs.yml")
    assert spec["argument_specs"]["main"]["options"]["tensorflow_packages"]["default"] == tf


def test_smoke_role_ships_the_one_copy_of_the_checker_and_gpu_data():
    files = ROOT / "roles" / "gpu_smoke_test" / "files"
    assert (files / "gpu_smoke.py").resolve() == (ROOT / "gpubake" / "gpu_smoke.py").resolve()
    assert (files / "gpus.yml").resolve() == (ROOT / "images" / "gpus.yml").resolve()


def _stack_order() -> list[tuple[str, str]]:
    """(role, condition) in the order role stack applies them: the one list of roles."""
    order = _yaml(ROOT / "roles" / "stack" / "vars" / "main.yml")["__stack_order"]
    return [(step["role"], str(step["applies"])) for step in order]


def test_the_role_order_is_written_once():
    for book in ("container.yml", "vm.yml"):
        (play,) = _yaml(ROOT / "playbooks" / book)
        assert [r["role"] for r in play["roles"]] == ["gpubake.gpu.stack"], book
        assert play["hosts"] == "{{ gpubake_hosts | default('all') }}", book
        assert "pre_tasks" not in play, f"{book}: the roles gather what they need themselves"
    names = [name for name, _ in _stack_order()]
    assert names[:2] == ["build_ca", "base"]
    assert names[-3:] == ["gpu_smoke_test", "manifest", "image_cleanup"]
    assert names.index("python_env") < names.index("pytorch") < names.index("gpu_smoke_test")
    assert names.index("base") < names.index("nvidia_driver") < names.index("cuda")
    assert names.index("cuda") < names.index("python_env")
    assert sorted(names) == sorted(set(names))
    assert set(names) | {"common", "stack", "nvidia_repo"} == set(ROLES)  # nvidia_repo: included
    for name, when in _stack_order():
        if name in ("nvidia_driver", "cuda", "jupyter", "gcsfuse", "logging_agent"):
            assert "stack_kind == 'vm'" in when, name
    # the roles are included by FQCN, each only when it applies and its run selects it
    (task,) = _yaml(ROOT / "roles" / "stack" / "tasks" / "main.yml")
    assert task["ansible.builtin.include_role"]["name"] == "gpubake.gpu.{{ stack_step.role }}"
    assert task["loop"] == "{{ __stack_order }}"
    assert "stack_step.applies | bool" in task["when"]
    assert "stack_step.role in stack_roles" in task["when"]


@pytest.mark.parametrize("role", [r for r in ROLES if r not in ("common", "stack")])
def test_every_role_brings_its_own_facts(role):
    meta = _yaml(ROOT / "roles" / role / "meta" / "main.yml")
    assert {"role": "gpubake.gpu.common"} in meta["dependencies"], role
    assert _yaml(ROOT / "roles" / "common" / "meta" / "main.yml")["allow_duplicates"] is True


def test_siblings_are_named_by_fqcn():
    for path in sorted((ROOT / "roles").glob("*/tasks/*.yml")) + sorted(
        (ROOT / "playbooks").glob("*.yml")
    ):
        for task in _yaml(path) or []:
            for key in ("ansible.builtin.include_role", "ansible.builtin.import_role"):
                if key in task:
                    name = task[key]["name"]
                    assert name.startswith("gpubake.gpu."), f"{path}: {name}"


def test_one_copy_of_the_apt_fallback_and_the_package_facts():
    found = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "roles").rglob("*")
        if p.is_file() and "python3-apt must be installed" in p.read_text(errors="ignore")
    }
    assert found == {"roles/common/vars/main.yml"}
    gathers = {
        str(p.relative_to(ROOT))
        for p in [*(ROOT / "roles").rglob("*.yml"), *(ROOT / "playbooks").rglob("*.yml")]
        if "package_facts:" in p.read_text() or "gpubake.gpu.dpkg_facts:" in p.read_text()
    }
    assert gathers == {"roles/common/tasks/packages.yml"}


def test_nothing_reboots_unless_asked():
    defaults = _yaml(ROOT / "roles" / "nvidia_driver" / "defaults" / "main.yml")
    assert defaults["nvidia_driver_reboot"] is False
    for path in (ROOT / "roles").rglob("*.yml"):
        if "ansible.builtin.reboot" in path.read_text():
            assert path == ROOT / "roles" / "nvidia_driver" / "handlers" / "main.yml", path


@pytest.mark.parametrize("role", ROLES)
def test_readme_example_uses_the_role_by_fqcn(role):
    readme = (ROOT / "roles" / role / "README.md").read_text(encoding="utf-8")
    assert f"gpubake.gpu.{role}" in readme, (
        f"{role}: README has no example naming gpubake.gpu.{role}"
    )
    assert "```yaml" in readme, f"{role}: README has no example playbook"
