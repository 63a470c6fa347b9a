"""The legacy PyTorch family for real: `fastai-legacy` (on pytorch-notebook-legacy on
pytorch-legacy, torch 2.7 with CUDA 12.6 wheels) built as a user builds it for the
Quadro P5000 the fast.ai tutorial recommends. gpu-smoke passes in it on the CPU, its
compute-capability label is what its wheels carry and covers Maxwell, Pascal and Volta,
`gpubake pull fastai` takes it where the fastai image cannot run, and fast.ai trains in it.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import suppress

import docker
import pytest

from gpubake import stacks
from gpubake.build import docker_engine
from gpubake.build import plan as plan_mod
from gpubake.publish import selection
from tests.integration.helpers import (
    ROOT,
    assert_environment_is_the_lock,
    build_in,
    remove_stack_images,
    run_output,
    smoke_report,
)
from tests.integration.notebook_helpers import FASTAI_TWO_EPOCHS
from tests.registry import RunningRegistry, start_registry

pytestmark = [pytest.mark.docker, pytest.mark.slow]
TAG = "itest"
STACK = "fastai-legacy"
IMAGE = f"gpubake/{STACK}:{TAG}"
CHAIN = ("pytorch-legacy", "pytorch-notebook-legacy", STACK)
#: the cards the family is for (images/gpus.yml), none of which the fastai image runs on
OLD_GPUS = ("m4000", "p100", "p5000", "v100")


def gpubake(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpubake", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )


@pytest.fixture(scope="module")
def legacy(engine):
    """What a P5000 user builds: `--stack fastai --gpu p5000` names the stack to build."""
    refused = build_in(ROOT, TAG, "--stack", "fastai", "--gpu", "p5000")
    try:
        proc = build_in(ROOT, TAG, "--stack", STACK, "--gpu", "p5000", timeout=3600)
        assert proc.returncode == 0, proc.stderr[-6000:]
        yield {"refused": refused, "proc": proc, "image": engine.images.get(IMAGE)}
    finally:
        remove_stack_images(engine, CHAIN, TAG)


def test_fastai_for_a_p5000_names_the_legacy_stack(legacy):
    refused = legacy["refused"]
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpubake: error: "), refused.stderr
    assert f"--stack {STACK}" in lines[0]


def test_the_build_ran_gpu_smoke_and_it_passes_on_the_cpu(engine, legacy):
    err = legacy["proc"].stderr
    assert "gpu-smoke passed in it" in err or f"skipped: {IMAGE} is already built" in err
    report = smoke_report(engine, IMAGE)
    by = {c["name"]: c["status"] for c in report["checks"]}
    assert by["torch.import"] == "passed" and by["torch.train_step_cpu"] == "passed"
    assert by["torch.cuda"] == "skipped" and by["torch.train_step"] == "skipped"
    assert report["versions"]["torch"].split("+")[0] == "2.7.1"


def test_the_environment_is_exactly_the_lock(engine, legacy):
    assert_environment_is_the_lock(engine, IMAGE, STACK)


def _label(image) -> list[str]:
    return image.labels[plan_mod.CC_LABEL].split(",")


def test_the_label_is_what_the_wheels_carry_and_covers_the_old_cards(engine, legacy):
    # the kernels torch was compiled with (get_arch_list() needs a GPU; its source does not)
    code = "import torch; print(torch._C._cuda_getArchFlags())"
    flags = run_output(engine, IMAGE, ["python", "-c", code]).decode().split()
    carried = [f"{f[3:-1]}.{f[-1]}" for f in flags if f.startswith("sm_")]
    assert _label(legacy["image"]) == carried, flags
    cards = stacks.gpus_data()["gpus"]
    default = stacks.resolve("fastai").kernels
    for gpu in OLD_GPUS:
        cc = cards[gpu]["compute_capability"]
        assert selection.runs_on(cc, _label(legacy["image"])), (gpu, cc)
        assert not selection.runs_on(cc, default), (gpu, cc)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[RunningRegistry]:
    with start_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def pushed(engine, legacy, registry):
    """Small stand-ins of both fast.ai images (the base image with each real image's labels)
    pushed with `gpubake push`: what pull reads of an image is its labels."""
    fastai = build_in(ROOT, TAG, "--stack", "fastai", timeout=3600)
    assert fastai.returncode == 0, fastai.stderr[-4000:]
    base, _id, _note = docker_engine.ensure_base_image(engine, stacks.resolve().os, None, print)
    where = f"{registry.host}/gpubake"
    made = []
    for stack in ("fastai", STACK):
        labels = dict(engine.images.get(f"gpubake/{stack}:{TAG}").labels)
        dockerfile = f"FROM {base}\nLABEL " + " ".join(
            f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())
        )
        engine.images.build(
            fileobj=io.BytesIO(dockerfile.encode()), tag=f"gpubake/{stack}:standin", rm=True
        )
        made.append(f"gpubake/{stack}:standin")
        push = ["push", "--stack", stack, "--tag", "standin", "--registry", where]
        proc = gpubake(*push, "--insecure", "--allow-cpu-checked")
        assert proc.returncode == 0, proc.stderr[-3000:]
    yield where
    for ref in made:
        engine.images.remove(ref, force=True)
    # what the pulls left: pulled by digest, so named only in RepoDigests (read from the
    # plain listing: images.list() inspects each image, and another worker's test may
    # remove one in between)
    for image in engine.api.images():
        if any(ref.startswith(registry.host) for ref in image.get("RepoDigests") or []):
            with suppress(docker.errors.ImageNotFound):
                engine.images.remove(image["Id"], force=True)


@pytest.mark.parametrize(
    ("gpu", "stack"), [*((gpu, STACK) for gpu in OLD_GPUS), ("t4", "fastai"), ("l4", "fastai")]
)
def test_pull_fastai_takes_the_image_that_runs_on_the_gpu(pushed, gpu, stack):
    proc = gpubake(
        "pull", "fastai", "--registry", pushed, "--insecure", "--driver", "580",
        "--gpu", gpu, "--no-smoke", "--explain",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    *explained, pinned = proc.stdout.strip().splitlines()
    assert re.fullmatch(rf"{re.escape(pushed)}/{stack}@sha256:[0-9a-f]{{64}}", pinned), pinned
    chosen = [line for line in explained if line.startswith("chosen ")]
    assert len(chosen) == 1 and chosen[0].split()[1].startswith(f"gpubake/{stack}:"), explained
    if stack == STACK:  # the fastai image was passed over for its kernels
        cc = stacks.gpus_data()["gpus"][gpu]["compute_capability"]
        assert any(f"not {cc} (" in line for line in explained if line.startswith("no ")), explained


def test_fastai_trains_two_epochs_on_images_on_the_cpu(engine, legacy):
    out = run_output(engine, IMAGE, ["python", "-c", FASTAI_TWO_EPOCHS]).decode()
    assert re.search(r"^trained 2 epochs on cpu losses \[", out, re.M), out[-2000:]
