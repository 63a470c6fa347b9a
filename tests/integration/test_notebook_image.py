"""Derived stacks for real: `fastai` built on `pytorch-notebook` on `pytorch` (whose stages
test_build.py built, so they are reused), then a fastai container started as the README
says, serving JupyterLab (FACTS.md: /api open, the rest behind the token, a login page)."""

from __future__ import annotations

import http.client
import itertools
import json
import re
import subprocess
import time
import uuid

import pytest

from gpubake import locks, stacks
from tests.integration.helpers import ROOT, build_in, run_in, run_output

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
    lock = locks.check(stacks.resolve("fastai"), stacks.machine_arch())
    out = run_output(engine, f"gpubake/fastai:{TAG}", ["uv", "pip", "freeze"]).decode()
    frozen = {
        line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
        for line in out.splitlines()
        if "==" in line
    }
    assert frozen == {name: version for name, (version, _) in lock.pins.items()}


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


def _request(port: int, path: str, token: str | None = None, method="GET", body=None):
    """(status, text) of one request to the container's published port."""
    headers = {"Authorization": f"token {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _wait_for_api(port: int, box, seconds: int = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if _request(port, "/api")[0] == 200:
                return
        except OSError:
            pass
        box.reload()
        assert box.status == "running", box.logs().decode()[-3000:]
        time.sleep(1)
    raise AssertionError(f"/api did not answer in {seconds} s: {box.logs().decode()[-3000:]}")


@pytest.fixture
def storage(engine):
    """A named volume for /storage holding a pre-run.sh hook (written as the image's user)."""
    name = f"gpubake-test-storage-{uuid.uuid4().hex[:8]}"
    hook = 'echo "pre-run ran as $(id -un)" > /storage/pre-run.log\n'
    run_output(
        engine,
        f"gpubake/fastai:{TAG}",
        ["sh", "-c", f"printf '%s' '{hook}' > /storage/pre-run.sh"],
        volumes={name: {"bind": "/storage", "mode": "rw"}},
    )
    yield name
    engine.volumes.get(name).remove(force=True)


def test_fastai_container_serves_jupyterlab(engine, chain, storage):
    token = uuid.uuid4().hex
    # as the README says: docker run -p 8888:8888 -v gpubake-storage:/storage gpubake/fastai
    box = engine.containers.run(
        f"gpubake/fastai:{TAG}",
        detach=True,
        environment={"JUPYTER_TOKEN": token},
        ports={"8888/tcp": ("127.0.0.1", None)},
        volumes={storage: {"bind": "/storage", "mode": "rw"}},
        name=f"gpubake-test-{uuid.uuid4().hex[:8]}",
    )
    try:
        box.reload()
        port = box.attrs["NetworkSettings"]["Ports"]["8888/tcp"][0]["HostPort"]
        port = int(port)
        _wait_for_api(port, box)
        assert _request(port, "/api/status")[0] == 403
        assert _request(port, "/api/status", token)[0] == 200
        status, page = _request(port, "/")
        assert status == 302, status  # to the login page
        status, page = _request(port, "/login")
        assert status == 200 and "login_submit" in page
        assert run_in(box, "cat", "/storage/pre-run.log")[1].strip() == "pre-run ran as gpubake"
        assert run_in(box, "pwd", user="gpubake")[1].strip() == "/notebooks"
        for tool in ("git", "ssh"):
            assert run_in(box, "which", tool)[0] == 0, tool

        # a notebook saved through the server under /notebooks and a file under /storage
        notebook = {
            "type": "notebook",
            "content": {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5},
        }
        saved = _request(port, "/api/contents/saved.ipynb", token, "PUT", json.dumps(notebook))
        assert saved[0] in (200, 201), saved
        assert run_in(box, "sh", "-c", "echo kept > /storage/data.txt", user="gpubake")[0] == 0

        # the tutorials' first cell, in a kernel: torch and fastai import, no GPU here
        code, out = run_in(
            box,
            "jupyter",
            "nbconvert",
            "--to",
            "notebook",
            "--execute",
            "/notebooks/gpu-check.ipynb",
            "--output",
            "/tmp/gpu-check.out.ipynb",
            user="gpubake",
        )
        assert code == 0, out
        executed = json.loads(run_in(box, "cat", "/tmp/gpu-check.out.ipynb")[1])
        text = json.dumps([c["outputs"] for c in executed["cells"] if c["cell_type"] == "code"])
        assert "torch 2.15.0" in text and "fastai 2.8.12" in text, text

        box.restart(timeout=20)
        box.reload()  # a published ephemeral port may change with the restart
        port = int(box.attrs["NetworkSettings"]["Ports"]["8888/tcp"][0]["HostPort"])
        _wait_for_api(port, box)
        assert _request(port, "/api/contents/saved.ipynb", token)[0] == 200
        assert run_in(box, "cat", "/storage/data.txt")[1].strip() == "kept"

        # the HEALTHCHECK on /api reports the server healthy
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            box.reload()
            if box.attrs["State"].get("Health", {}).get("Status") == "healthy":
                break
            time.sleep(2)
        assert box.attrs["State"]["Health"]["Status"] == "healthy"
    finally:
        box.remove(force=True, v=True)
    # the volume outlives the container: the data is still there for the next one
    kept = run_output(
        engine,
        f"gpubake/fastai:{TAG}",
        ["cat", "/storage/data.txt"],
        volumes={storage: {"bind": "/storage", "mode": "rw"}},
    )
    assert kept.decode().strip() == "kept"
