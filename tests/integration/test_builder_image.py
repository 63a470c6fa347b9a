"""gpubake's own builder image (dockerfiles/builder.Dockerfile, scripts/builder-image.sh), built
for real: gpubake, Packer and Ansible run in it as a non-root user, it renders a cloud target
that its Packer validates, and the build-time CA bundle is in no layer of it."""

from __future__ import annotations

import subprocess

import pytest

import gpubake
from tests.integration.helpers import (
    ROOT,
    base_image,
    image_holds,
    make_marker_bundle,
    run_output,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]
TAG = "gpubake/builder:itest"


@pytest.fixture(scope="module")
def builder(engine, tmp_path_factory):
    bundle, marker = make_marker_bundle(tmp_path_factory.mktemp("ca"))
    proc = subprocess.run(
        [
            str(ROOT / "scripts/builder-image.sh"),
            "--ca-bundle",
            str(bundle),
            "--base",
            base_image(engine),
            "--tag",
            TAG,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == TAG
    yield engine.images.get(TAG), marker
    engine.images.remove(TAG, force=True)


def run(engine, *args: str, entrypoint: list[str] | None = None) -> str:
    return run_output(engine, TAG, list(args), entrypoint=entrypoint).decode()


def test_gpubake_packer_and_ansible_run_as_a_non_root_user(engine, builder):
    assert run(engine, "--version").strip() == f"gpubake, version {gpubake.__version__}"
    sh = ["sh", "-c"]
    out = run(engine, "id -u; packer version; ansible-playbook --version", entrypoint=sh)
    uid, packer, ansible = out.splitlines()[:3]
    assert uid == "1000"
    assert packer.startswith("Packer v")
    assert ansible.startswith("ansible-playbook [core 2.")
    assert "pytorch (default):" in run(engine, "stacks")


def test_renders_a_cloud_target_that_its_packer_validates(engine, builder):
    script = (
        "gpubake render --target gcp-image --project my-proj-1 --zone us-central1-a --out /tmp/r"
        " && cd /tmp/r && packer validate . && echo VALID"
    )
    out = run(engine, script, entrypoint=["sh", "-c"])
    assert out.rstrip().endswith("VALID"), out


def test_no_trace_of_the_build_time_ca_bundle(engine, builder):
    image, marker = builder
    assert not image_holds(image, marker), (
        "the build-time CA certificate is in a layer of the image"
    )
    staged = engine.images.list(all=True, filters={"label": "io.gpubake.builder-stage=env"})
    assert staged == [], "the first stage's image (it held the bundle) was kept"
    assert not (ROOT / "build/builder/ca-bundle.pem").exists()
