"""BuildPlan, the input hash and render(): pure, no engine."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from gpubake import resources
from gpubake.build import ansible, hashing
from gpubake.build.plan import (
    HASH_LABEL,
    PlanError,
    check_ca_bundle,
    check_tag,
    make_plan,
)
from gpubake.build.render import COLLECTION_DIR, hcl_value, render
from gpubake.stacks import resolve


def _plan(**kwargs):
    args = {"base_image": "gpubake/base:debian-12", "base_image_id": "sha256:abc"}
    args.update(kwargs)
    stack = args.pop("stack", resolve())
    return make_plan(stack, **args)


def test_same_inputs_same_hash():
    assert _plan().input_hash == _plan().input_hash


def test_hash_changes_with_stack_base_and_files(tmp_path):
    base = _plan().input_hash
    assert _plan(stack=resolve(variables={"packages.torch": "2.14.1"})).input_hash != base
    assert _plan(base_image_id="sha256:def").input_hash != base
    assert _plan(require_gpu=True).input_hash != base
    # the tag, the CA bundle and verbosity do not change what is built
    assert _plan(tag="other").input_hash == base
    assert _plan(verbose=2).input_hash == base


def test_hash_covers_role_files(tmp_path, repo_root):
    copy = tmp_path / "repo"
    for name in ("roles", "playbooks", "images"):
        shutil.copytree(repo_root / name, copy / name)
    shutil.copy(repo_root / "ansible.cfg", copy)
    files_before = hashing.input_files(copy)
    before = hashing.input_hash({"a": 1}, base_image_id="x", root=copy)
    assert any(p.name == "gpu_smoke.py" for p in files_before)  # the symlinked checker counts
    task = copy / "roles" / "base" / "tasks" / "main.yml"
    task.write_text(task.read_text() + "\n# changed\n")
    assert hashing.input_hash({"a": 1}, base_image_id="x", root=copy) != before
    # READMEs do not change an image
    readme = copy / "roles" / "base" / "README.md"
    readme.write_text("changed")
    assert hashing.input_hash({"a": 1}, base_image_id="x", root=copy) == hashing.input_hash(
        {"a": 1}, base_image_id="x", root=copy
    )


def test_labels_and_changes():
    plan = _plan(tag="ci")
    assert plan.labels[HASH_LABEL] == plan.input_hash
    assert plan.labels["org.opencontainers.image.title"] == "gpubake/pytorch"
    assert plan.image_ref == "gpubake/pytorch:ci"
    changes = plan.packer_vars["docker_changes"]
    assert "USER gpubake" in changes
    assert any(c.startswith("ENV PATH=/opt/gpubake/env/bin:") for c in changes)
    assert f'LABEL {HASH_LABEL}="{plan.input_hash}"' in changes


def test_ansible_vars_carry_the_stack_pins():
    plan = _plan()
    v = plan.ansible_vars
    assert v["pytorch_packages"] == {"torch": "2.15.0", "torchvision": "0.29.2"}
    assert v["python_env_kind"] == "uv"
    assert v["manifest_build"]["input_hash"] == plan.input_hash
    assert v["build_ca_bundle"] == ""
    assert "build_ca_environment" not in v
    mx = _plan(stack=resolve("mxnet")).ansible_vars
    assert mx["mxnet_packages"]["mxnet-cu117"] == "1.9.1"
    conda = _plan(stack=resolve("pytorch-conda")).ansible_vars
    assert conda["python_env_kind"] == "conda"
    assert len(conda["python_env_miniforge_sha256"]["x86_64"]) == 64


def test_ca_bundle_is_used_at_build_time_only(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    plan = _plan(ca_bundle=check_ca_bundle(bundle))
    env = plan.ansible_vars["build_ca_environment"]
    assert env["SSL_CERT_FILE"] == "/run/gpubake-build/ca-bundle.crt"
    assert plan.input_hash == _plan().input_hash
    with pytest.raises(PlanError, match="no such file"):
        check_ca_bundle(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(PlanError, match="holds no PEM certificate"):
        check_ca_bundle(junk)


@pytest.mark.parametrize("tag", ["-x", ".x", "a b", "x" * 129, "ünï"])
def test_bad_tags(tag):
    with pytest.raises(PlanError, match="not a valid Docker tag"):
        check_tag(tag)


def test_hcl_value_escapes_templates():
    assert hcl_value("a ${b} %{c}") == '"a $${b} %%{c}"'
    assert json.loads(hcl_value(["x", "y"])) == ["x", "y"]


def test_render_writes_a_self_contained_tree(tmp_path, have_packer):
    plan = _plan(ansible_playbook=ansible.playbook_command())
    var_file = render(plan, tmp_path, with_plugins=False)
    for name in ("variables.pkr.hcl", "docker.pkr.hcl", "ansible.cfg", "ansible-vars.json"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "plugins.pkr.hcl").exists()
    smoke = tmp_path / COLLECTION_DIR / "roles" / "gpu_smoke_test" / "files" / "gpu_smoke.py"
    assert smoke.is_file() and not smoke.is_symlink()
    assert (
        json.loads((tmp_path / "ansible-vars.json").read_text())["gpubake_stack"]["name"]
        == "pytorch"
    )
    out = subprocess.run(
        [have_packer, "validate", f"-var-file={var_file}", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    with_plugins = tmp_path / "modern"
    render(plan, with_plugins, with_plugins=True)
    assert "required_plugins" in (with_plugins / "plugins.pkr.hcl").read_text()


def test_hash_is_the_same_for_a_checkout_and_a_wheel(tmp_path):
    """A wheel carries the data as copies (setup.py: symlinks followed, caches left out) under
    another root; the input files hash the same, by relative path and content."""
    root = resources.data_root()
    wheel = tmp_path / "site-packages" / "gpubake" / "_data"
    wheel.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
    for item in resources.DATA_ITEMS:
        if (root / item).is_dir():
            shutil.copytree(root / item, wheel / item, ignore=ignore)
        else:
            shutil.copyfile(root / item, wheel / item)
    (wheel / "roles" / "base" / "__pycache__").mkdir(exist_ok=True)
    (wheel / "roles" / "base" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    assert hashing.files_digest(wheel) == hashing.files_digest(root)
    rel = {p.relative_to(root).parts[0] for p in hashing.input_files(root)}
    assert {"roles", "playbooks", "images", "ansible.cfg"} <= rel
    assert "galaxy.yml" not in rel


def test_plan_is_pure_its_machine_inputs_are_arguments():
    import datetime as dt

    bare = _plan()
    assert "org.opencontainers.image.created" not in bare.labels
    assert "org.opencontainers.image.revision" not in bare.labels
    assert bare.packer_vars["container_name"] == f"gpubake-build-{bare.input_hash[:12]}"
    when = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
    full = _plan(created=when, git_revision="abc123", build_id="42", ansible_playbook="/x/ap")
    assert full.labels["org.opencontainers.image.created"] == "2026-12-01T12:00:00Z"
    assert full.labels["org.opencontainers.image.revision"] == "abc123"
    assert full.packer_vars["container_name"].endswith("-42")
    assert full.packer_vars["ansible_playbook_command"] == "/x/ap"
    assert full.input_hash == bare.input_hash  # none of them shapes the image
