"""What a container image carries for the pulling side: immutable and rolling tags, the
labels gpubake.publish.selection reads, and one-line refusals of push / pull / images."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys

import pytest

from gpubake import stacks
from gpubake.build import plan as plan_mod
from gpubake.build import stages
from gpubake.build.plan import immutable_tag, make_plan, rolling_tags
from tests.unit.test_cli import assert_one_line_error, no_engine_env

WHEN = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def _plan(stack: str = "pytorch", **extra):
    return make_plan(
        stacks.resolve(stack),
        target="docker",
        base_image="gpubake/base:debian-12",
        base_image_id="sha256:" + "b" * 64,
        **extra,
    )


def test_immutable_tag_names_versions_date_and_hash():
    stack = stacks.resolve()
    tag = immutable_tag(stack, "2026-12-01T12:00:00Z", "4e5d614f236a" + "0" * 52)
    torch = dict(stack.packages)["torch"]
    cuda = stack.cuda.replace(".", "")
    assert tag == f"{torch}-cu{cuda}-py{stack.python}-debian12-20261201-4e5d614f236a"
    assert plan_mod.check_tag(tag) == tag  # a valid Docker tag
    assert rolling_tags(torch, stack.cuda) == [f"{'.'.join(torch.split('.')[:2])}-cu132", "latest"]
    assert rolling_tags("1.9.1", "11.7")[0] == "1.9-cu117"


def test_container_labels_say_what_pulling_needs():
    plan = _plan(created=WHEN, git_revision="abc123")
    labels = plan.labels
    stack = plan.stack
    assert labels[plan_mod.STACK_LABEL] == "pytorch"
    # the oldest driver CUDA 13 runs on (gpus.yml), not the branch a VM image installs
    assert labels[plan_mod.MIN_DRIVER_LABEL] == "580"
    ccs = labels[plan_mod.CC_LABEL].split(",")
    # CUDA 13 builds for Turing (7.5) on, Blackwell too; no Volta (7.0), no Kepler (3.7)
    assert {"7.5", "9.0", "10.0"} <= set(ccs) and "7.0" not in ccs and "3.7" not in ccs
    assert labels["io.gpubake.framework-version"] == dict(stack.packages)["torch"]
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.base.digest"] == "sha256:" + "b" * 64
    # the immutable tag names the last stage's hash: gpubake.build.stages sets it
    assert plan_mod.VERSION_LABEL not in labels
    # and a legacy stack on CUDA 11 runs on older GPUs and drivers (minor-version
    # compatibility from 450.80.02), though its VM images install 580
    mx = _plan("mxnet", created=WHEN)
    assert mx.stack.driver_branch == "580" and mx.labels[plan_mod.MIN_DRIVER_LABEL] == "450"
    assert "7.0" in mx.labels[plan_mod.CC_LABEL].split(",")
    # the legacy PyTorch family: CUDA 12.6 (525 on), the kernels its wheels carry, sm_50 on
    legacy = _plan("fastai-legacy", created=WHEN)
    assert legacy.labels[plan_mod.MIN_DRIVER_LABEL] == "525"
    assert legacy.labels[plan_mod.CC_LABEL] == "5.0,6.0,7.0,7.5,8.0,8.6,9.0"
    assert legacy.labels[plan_mod.STACK_LABEL] == "fastai-legacy"


def test_the_immutable_tag_names_the_last_stages_hash():
    whole = _plan(created=WHEN)
    chain = stages.plan_chain(
        whole.stack,
        lambda s: _plan(s.name, created=WHEN),
        {"pytorch": _lock()},
        uv_cache=None,
    )
    final = chain[-1]
    version = final.plan.labels[plan_mod.VERSION_LABEL]
    assert version.endswith("-" + final.input_hash[:12])
    assert final.input_hash != whole.input_hash
    assert (
        f"LABEL {plan_mod.VERSION_LABEL}={version!r}".replace("'", '"')
        in (final.plan.packer_vars["docker_changes"])
    )
    # the stages below the last are no published images: no version label
    assert plan_mod.VERSION_LABEL not in chain[0].plan.labels


def _lock():
    from tests.unit.test_stages import LOCKS

    return LOCKS["pytorch"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["push", "--registry", ""], "'--registry': is empty"),
        (["push"], "Missing option '--registry'"),
        (["push", "--registry", "http://127.0.0.1:5000/x"], "HOST[:PORT]/NAMESPACE"),
        (
            ["push", "--registry", "registry.example.com/ml", "--insecure"],
            "--insecure is only allowed for a registry on localhost",
        ),
        (["push", "--registry", "127.0.0.1:5000/ml", "--stack", "nope"], "unknown stack 'nope'"),
        (["pull", "--registry", "127.0.0.1:5000/ml", "--driver", "new"], "--driver 'new'"),
        (
            ["pull", "--registry", "127.0.0.1:5000/ml", "--gpu", "rtx9999"],
            "--gpu 'rtx9999' is unknown",
        ),
        (["pull", "nope", "--registry", "127.0.0.1:5000/ml"], "unknown stack 'nope'"),
        (["images", "--registry", "10.0.0.1:5000/ml", "--insecure"], "only allowed"),
    ],
)
def test_push_pull_images_refuse_bad_input_in_one_line(args, needle, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gpubake", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**no_engine_env(tmp_path), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert_one_line_error(proc, needle)
    assert proc.stdout == ""


def test_push_help_explains_tags():
    out = subprocess.run(
        [sys.executable, "-m", "gpubake", "push", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(r"immutable\s+tag", out) and "rolling" in out and "--allow-cpu-checked" in out
