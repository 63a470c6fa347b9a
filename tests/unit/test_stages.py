"""Container stages: which roles each applies, what its hash covers, what derived stacks
share, the lock part each installs and the download cache each mounts. Pure, no engine."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
from pathlib import Path

import pytest
import yaml

from gpubake import resources
from gpubake.build import hashing, stages, wheelhouse
from gpubake.build.locks import Lock
from gpubake.build.plan import HASH_LABEL, make_plan
from gpubake.build.render import LOCK_FILE, render
from gpubake.stacks import resolve

PINS = {
    "torch": ("2.15.0", ("sha256:" + "1" * 64,)),
    "torchvision": ("0.29.2", ("sha256:" + "2" * 64,)),
    "nvidia-cublas": ("13.1.0.3", ("sha256:" + "3" * 64, "sha256:" + "4" * 64)),
    "nvidia-cudnn-cu13": ("9.13.0.50", ("sha256:" + "5" * 64,)),
    "jupyterlab": ("4.6.6", ("sha256:" + "6" * 64,)),
    "fastai": ("2.8.12", ("sha256:" + "7" * 64,)),
    "fastbook": ("0.0.29", ("sha256:" + "8" * 64,)),
}


def _lock(names, extra=""):
    lines = []
    for name in names:
        version, hashes = PINS[name]
        lines.append(f"{name}=={version}" + "".join(f" \\\n    --hash={h}" for h in hashes))
    text = "\n".join(lines) + "\n" + extra
    pins = {n: PINS[n] for n in names}
    return Lock(Path("x.txt"), text, pins, hashlib.sha256(text.encode()).hexdigest())


LOCKS = {
    "pytorch": _lock(["nvidia-cublas", "nvidia-cudnn-cu13", "torch", "torchvision"]),
    "pytorch-notebook": _lock(
        ["jupyterlab", "nvidia-cublas", "nvidia-cudnn-cu13", "torch", "torchvision"]
    ),
    "fastai": _lock(list(PINS)),
}


def _chain(name="pytorch", locks=LOCKS, uv_cache=Path("/cache/uv"), **plan_args):
    def plan_for(stack):
        args = {"base_image": "gpubake/base:debian-12", "base_image_id": "sha256:abc", "tag": "t"}
        return make_plan(stack, **{**args, **plan_args})

    return stages.plan_chain(resolve(name), plan_for, locks, uv_cache=uv_cache)


def test_a_root_stack_is_four_stages_each_on_the_one_before():
    chain = _chain()
    assert [s.name for s in chain] == ["os", "cuda", "env", "finish"]
    assert chain[0].roles == ("build_ca", "base", "python_env", "image_cleanup")
    assert chain[2].roles == ("build_ca", "pytorch", "image_cleanup")
    assert chain[0].plan.base_image == "gpubake/base:debian-12"
    for below, stage in itertools.pairwise(chain):
        assert stage.plan.base_image == below.plan.image_ref
        assert stage.plan.packer_vars["base_image"] == below.plan.image_ref
    assert [s.plan.image_ref for s in chain][:3] == [
        f"gpubake-stage/pytorch:{s.name}-{s.input_hash[:12]}" for s in chain[:3]
    ]
    final = chain[-1]
    assert final.final and final.plan.image_ref == "gpubake/pytorch:t"
    assert final.plan.labels[HASH_LABEL] == final.input_hash
    assert final.plan.ansible_vars["manifest_build"]["input_hash"] == final.input_hash
    # gpu-smoke runs after the last stage only; each stage applies its own roles
    assert [s.plan.ansible_vars["gpubake_smoke"] for s in chain] == [False, False, False, True]
    assert [tuple(s.plan.ansible_vars["gpubake_stage_roles"]) for s in chain] == [
        s.roles for s in chain
    ]
    assert len({s.input_hash for s in chain}) == 4
    assert len({s.plan.packer_vars["container_name"] for s in chain}) == 4


def test_derived_stacks_add_their_stages_on_the_parents_image():
    pytorch, notebook, fastai = _chain(), _chain("pytorch-notebook"), _chain("fastai")
    assert [s.input_hash for s in fastai[:4]] == [s.input_hash for s in pytorch]
    assert [s.input_hash for s in fastai[:6]] == [s.input_hash for s in notebook]
    assert [s.label for s in fastai[4:]] == [
        "pytorch-notebook:env",
        "pytorch-notebook:finish",
        "fastai:env",
        "fastai:finish",
    ]
    assert fastai[4].plan.base_image == "gpubake/pytorch:t"
    assert fastai[6].plan.base_image == "gpubake/pytorch-notebook:t"
    # the notebook role is the notebook stack's own: fastai's env stage does not run it again
    assert fastai[4].roles == ("build_ca", "pytorch", "notebook", "image_cleanup")
    assert fastai[6].roles == ("build_ca", "pytorch", "image_cleanup")
    assert fastai[4].plan.ansible_vars["notebook_packages"] == {
        "jupyterlab": "4.6.6",
        "pip": "26.3",
    }
    changes = fastai[-1].plan.packer_vars["docker_changes"]
    for line in (
        "USER gpubake",
        "WORKDIR /notebooks",
        'VOLUME ["/storage"]',
        "EXPOSE 8888",
        'CMD ["/usr/local/bin/gpubake-notebook"]',
    ):
        assert line in changes
    assert any(c.startswith("HEALTHCHECK ") and "gpubake-notebook-health" in c for c in changes)
    # the intermediate stages keep the defaults: no volume, no notebook command
    assert not any(
        c.startswith(("VOLUME", "HEALTHCHECK"))
        for c in fastai[4].plan.packer_vars["docker_changes"]
    )


def test_each_stage_installs_its_part_of_the_lock_through_the_cache():
    chain = _chain()
    os_stage, cuda, env, finish = chain
    assert os_stage.plan.python_env_lock == "" and finish.plan.python_env_lock == ""
    # the CUDA layer: NVIDIA's wheels only, with their hashes, installed without dependencies
    assert cuda.plan.python_env_lock.count("--hash=sha256:") == 3
    assert "torch==" not in cuda.plan.python_env_lock
    assert cuda.plan.ansible_vars["python_env_install"] == {
        "nvidia-cublas": "13.1.0.3",
        "nvidia-cudnn-cu13": "9.13.0.50",
    }
    assert cuda.plan.ansible_vars["python_env_lock_no_deps"] is True
    assert env.plan.python_env_lock == LOCKS["pytorch"].text
    assert env.plan.ansible_vars["python_env_lock_no_deps"] is False
    for stage in (cuda, env):
        assert stage.plan.packer_vars["cache_volumes"] == {"/cache/uv": stages.UV_CACHE_MOUNT}
        assert stage.plan.ansible_vars["python_env_cache_dir"] == stages.UV_CACHE_MOUNT
    for stage in (os_stage, finish):
        assert "cache_volumes" not in stage.plan.packer_vars
    # a lock change rebuilds the stages that install it and those after them, not the OS stage
    other = {**LOCKS, "pytorch": _lock(["nvidia-cublas", "torch", "torchvision"])}
    changed = [
        a.input_hash != b.input_hash for a, b in zip(chain, _chain(locks=other), strict=True)
    ]
    assert changed == [False, True, True, True]
    # where the cache lives on this machine is not an input; the tag and CA bundle neither
    for cache in (Path("/elsewhere"), None):  # nor whether it is mounted at all
        assert [s.input_hash for s in _chain(uv_cache=cache)] == [s.input_hash for s in chain]
    assert _chain(tag="other")[-1].input_hash == chain[-1].input_hash


@pytest.fixture
def data_copy(tmp_path, monkeypatch):
    """A copy of gpubake's data the hashes are read from, to edit."""
    root = tmp_path / "data"
    for item in (*hashing.HASHED_TREES, *hashing.HASHED_FILES):
        src = resources.data_root() / item
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, root / item)
    monkeypatch.setattr(hashing, "data_root", lambda: root)
    return root


def _edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n# one more line\n")


@pytest.mark.parametrize(
    ("edited", "changed"),
    [
        ("roles/gpu_smoke_test/tasks/main.yml", [False, False, False, True]),
        ("roles/pytorch/tasks/main.yml", [False, False, True, True]),
        ("roles/python_env/tasks/packages.yml", [True, True, True, True]),
        ("roles/common/tasks/main.yml", [True, True, True, True]),  # every role depends on it
        ("playbooks/container.yml", [True, True, True, True]),
        # VM-only roles are in no container stage
        ("roles/nvidia_driver/tasks/main.yml", [False, False, False, False]),
        ("roles/logging_agent/tasks/main.yml", [False, False, False, False]),
    ],
)
def test_a_stage_hash_covers_its_own_roles_only(data_copy, edited, changed):
    before = [s.input_hash for s in _chain()]
    _edit(data_copy / edited)
    after = [s.input_hash for s in _chain()]
    assert [a != b for a, b in zip(before, after, strict=True)] == changed


def test_render_writes_the_stage_lock_beside_the_vars(tmp_path):
    env = _chain()[2]
    render(env.plan, tmp_path, with_plugins=False)
    lock = tmp_path / LOCK_FILE
    assert lock.read_text() == LOCKS["pytorch"].text
    variables = json.loads((tmp_path / "ansible-vars.json").read_text())
    assert variables["python_env_lock_file"] == str(lock.resolve())
    assert variables["gpubake_stage_roles"] == ["build_ca", "pytorch", "image_cleanup"]
    # a stage without a lock leaves none behind from an earlier render
    render(_chain()[0].plan, tmp_path, with_plugins=False)
    assert not lock.exists()
    assert "python_env_lock_file" not in json.loads((tmp_path / "ansible-vars.json").read_text())


def test_every_stage_role_is_one_the_stack_role_applies():
    """stack_roles names roles of role stack's order (roles/stack/vars/main.yml; its argument
    spec cannot list them as choices: null, the default, would fail them)."""
    order = (resources.data_root() / "roles" / "stack" / "vars" / "main.yml").read_text()
    applied = {step["role"] for step in yaml.safe_load(order)["__stack_order"]}
    for name in ("pytorch", "pytorch-notebook", "fastai", "mxnet", "pytorch-conda"):
        for stage in _chain(
            name,
            locks={n: LOCKS["fastai"] for n in LOCKS}
            | {"mxnet": LOCKS["fastai"], "pytorch-conda": LOCKS["fastai"]},
        ):
            assert set(stage.roles) <= applied, (stage.label, set(stage.roles) - applied)


def test_a_gpu_build_gives_the_smoke_stage_the_gpus_and_requires_them():
    """On a machine whose GPUs Docker can pass on, the stage that runs gpu-smoke gets them
    (docker run --gpus all) and gpu-smoke must run its GPU checks; the image is the same,
    so no stage's hash changes."""

    def chain(gpu_build: bool):
        def plan_for(stack):
            args = {"base_image": "gpubake/base:debian-12", "base_image_id": "sha256:abc"}
            return make_plan(stack, **args)

        return stages.plan_chain(
            resolve("fastai"), plan_for, LOCKS, uv_cache=None, gpu_build=gpu_build
        )

    cpu, gpu = chain(False), chain(True)
    assert [s.input_hash for s in cpu] == [s.input_hash for s in gpu]
    for plain, with_gpu in zip(cpu, gpu, strict=True):
        assert plain.plan.packer_vars.get("container_gpus") is None
        assert plain.plan.ansible_vars["gpu_smoke_test_args"] == []
        if with_gpu.smoke:
            assert with_gpu.plan.packer_vars["container_gpus"] == ["--gpus", "all"]
            assert with_gpu.plan.ansible_vars["gpu_smoke_test_args"] == ["--require-gpu"]
        else:  # only the stages that run gpu-smoke see the GPUs
            assert "container_gpus" not in with_gpu.plan.packer_vars
    assert [s.smoke for s in gpu].count(True) == 3  # pytorch's, the notebook's, fastai's finish


def test_a_wheelhouse_build_mounts_it_read_only_everywhere_and_keeps_every_hash():
    """--wheelhouse: every stage sees the wheelhouse (read-only) and installs from it, none
    mounts uv's cache; --offline: every build container has no network. The images are the
    ones built from the index, so no stage's hash changes."""

    def chain(**options):
        def plan_for(stack):
            args = {"base_image": "gpubake/base:debian-12", "base_image_id": "sha256:abc"}
            return make_plan(stack, **args)

        return stages.plan_chain(resolve("fastai"), plan_for, LOCKS, **options)

    index = chain(uv_cache=Path("/cache/uv"))
    house = chain(uv_cache=None, wheels=Path("/w"), offline=True)
    assert [s.input_hash for s in index] == [s.input_hash for s in house]
    for stage in house:
        assert stage.plan.ansible_vars["python_env_wheelhouse"] == wheelhouse.MOUNT
        assert "python_env_cache_dir" not in stage.plan.ansible_vars
        assert stage.plan.packer_vars["cache_volumes"] == {"/w": f"{wheelhouse.MOUNT}:ro"}
        assert stage.plan.packer_vars["container_network"] == ["--network", "none"]
    assert not any("container_network" in s.plan.packer_vars for s in index)


def test_a_stack_without_a_framework_installs_its_lock_in_its_env_stage():
    """framework: none (the suite's small stacks): python_env installs the lock where the
    framework role would, so the stack's packages are in its image."""
    bare = dataclasses.replace(resolve("pytorch"), framework="none")
    assert stages.stage_roles(bare, "env") == ("build_ca", "python_env", "image_cleanup")
    assert "pytorch" in stages.stage_roles(resolve("pytorch"), "env")
