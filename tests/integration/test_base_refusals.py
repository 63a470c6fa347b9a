"""Refusals of a build whose base image cannot be had: one line, nothing started.

Here, not with the other CLI tests: these builds go far enough to sweep what interrupted
builds left (guard.remove_leftovers), so they run in the builds group, one after another
with the fault matrix, whose killed builds' leftovers the next build of its own must find.
"""

from __future__ import annotations

import pytest

from tests.engine_proxy import engine_proxy
from tests.unit.test_cli import run


@pytest.mark.docker
def test_missing_base_image_is_one_line(engine, have_packer, tmp_path):
    with engine_proxy(tmp_path) as proxy:  # the real engine, its requests recorded
        proc = run("--base-image", "gpubake/does-not-exist:0", env=proxy.env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "gpubake: error: --base-image gpubake/does-not-exist:0: not found locally and cannot be "
        "pulled: load it first (docker load / docker import) or leave --base-image out"
    ]
    assert proxy.requests, "the engine was not asked for the image"
    assert proxy.starting() == []


@pytest.mark.docker
def test_ubuntu_without_a_loadable_base_is_one_line(engine, have_packer):
    if any("ubuntu:24.04" in image.tags for image in engine.images.list()):
        pytest.skip("ubuntu:24.04 is present locally")
    proc = run("--os", "ubuntu-24.04")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    # progress ("pulling ...") may come first; the error is the one last line
    assert "cannot pull ubuntu:24.04 and gpubake bootstraps only Debian locally" in lines[-1]
    assert [ln for ln in lines if "error" in ln] == [lines[-1]]
