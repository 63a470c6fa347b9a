"""Derived stacks for real: `fastai` built on `pytorch-notebook` on `pytorch` (whose stages
test_build.py built, so they are reused): layers shared, the environment exactly the lock,
no download cache left. test_notebook_browser.py then uses the image as a user does."""

from __future__ import annotations

import itertools
import re
import subprocess

import pytest

from tests.integration.helpers import ROOT, assert_environment_is_the_lock, build_in, run_output
from tests.integration.notebook_helpers import FASTAI_TWO_EPOCHS

pytestmark = [pytest.mark.docker, pytest.mark.slow]
TAG = "itest"
CHAIN = ("pytorch", "pytorch-notebook", "fastai")


def build(*args: str) -> subprocess.CompletedProcess[str]:
    return build_in(ROOT, TAG, *args, timeout=3600)


@pytest.fixture(scope="module")
def chain(engine):
    proc = build("--stack", "fastai")
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {"proc": proc, **{name: engine.images.get(f"gpubake/{name}:{TAG}") for name in CHAIN}}


def _history(ref: str) -> list[list[str]]:
    out = subprocess.run(
        ["docker", "history", "--no-trunc", "--format", "{{.ID}}\t{{.Size}}\t{{.CreatedBy}}", ref],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split("\t") for line in out.splitlines()]


def test_each_image_shares_its_parents_layers_unchanged(chain):
    layers = {name: chain[name].attrs["RootFS"]["Layers"] for name in CHAIN}
    for parent, child in itertools.pairwise(CHAIN):
        assert layers[child][: len(layers[parent])] == layers[parent], (parent, child)
        assert len(layers[child]) == len(layers[parent]) + 2  # its env and finish stages
        # docker history lists the parent's entries, unchanged, below the child's own
        ours, theirs = _history(f"gpubake/{child}:{TAG}"), _history(f"gpubake/{parent}:{TAG}")
        assert ours[len(ours) - len(theirs) :] == theirs


def test_the_build_reused_pytorch_and_reported_each_own_layer(chain):
    err = chain["proc"].stderr
    if "skipped: gpubake/fastai:itest is already built" in err:
        pytest.skip("fastai:itest was built before from identical inputs (not a fresh engine)")
    assert "gpu-smoke passed in it" in err
    # test_build.py built pytorch's stages: here they are reused, not built again
    for number, stage in enumerate(("os", "cuda", "env", "finish"), 1):
        assert f"stage {number}/8 pytorch:{stage}: reused" in err, err[-3000:]
    for number, stage in enumerate(
        ("pytorch-notebook:env", "pytorch-notebook:finish", "fastai:env", "fastai:finish"), 5
    ):
        assert re.search(rf"stage {number}/8 {stage}: built in \S+, its layer \d+\.\d+ [GM]B", err)


def test_the_environment_is_exactly_the_lock(engine, chain):
    assert_environment_is_the_lock(engine, f"gpubake/fastai:{TAG}", "fastai")


def test_no_download_cache_is_left_in_the_image(engine, chain):
    script = (
        # (Debian's python3-venv ships pip's and setuptools' wheels for ensurepip)
        "find / -xdev -path /usr/share/python-wheels -prune -o \\( -name '*.whl' "
        "-o -path '*/.cache/uv*' -o -path '*/.cache/pip*' -o -name 'archive-v0' "
        "-o -name 'wheels-v*' -o -name 'built-wheels-v*' \\) -print; "
        "find /run/gpubake-uv-cache -mindepth 1 -print 2>/dev/null; true"
    )
    out = run_output(engine, f"gpubake/fastai:{TAG}", ["sh", "-c", script], user="root").decode()
    assert out.strip() == ""


def test_fastai_trains_two_epochs_on_images_on_the_cpu(engine, chain):
    out = run_output(engine, f"gpubake/fastai:{TAG}", ["python", "-c", FASTAI_TWO_EPOCHS])
    assert re.search(r"^trained 2 epochs on cpu losses \[", out.decode(), re.M), out[-2000:]
