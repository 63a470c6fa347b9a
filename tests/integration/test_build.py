"""The whole docker target for real: the default stack built by an installed gpubake.

One build (module fixture, --force, its own tag, a CA bundle carrying a marker
certificate) by `gpubake build --target docker` of the wheel installed in a fresh venv
(tests/wheel.py), run from outside the checkout; then the image is inspected, run,
scanned, re-applied and rebuilt with `python build.py` of the checkout, which must find
the wheel's image as built from identical inputs.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpubake import stacks
from gpubake.build import docker_engine, locks, stages
from gpubake.build import plan as plan_mod
from tests.checkout import copy_checkout
from tests.integration.helpers import (
    ROOT,
    apply,
    build_containers,
    build_in,
    built_images,
    container,
    image_holds,
    make_marker_bundle,
    run_in,
    run_output,
    smoke_report,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]
TAG = "itest"
IMAGE = f"gpubake/pytorch:{TAG}"


def build(*args: str, timeout: int = 3600) -> subprocess.CompletedProcess[str]:
    """`python build.py --target docker` from the checkout."""
    return subprocess.run(
        [sys.executable, str(ROOT / "build.py"), "--target", "docker", "--tag", TAG, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


@pytest.fixture(scope="module")
def marker_bundle(tmp_path_factory) -> tuple[Path, str]:
    return make_marker_bundle(tmp_path_factory.mktemp("ca"))


def placeholder(engine) -> str:
    """A small gpubake-labelled image under IMAGE's tag, for the build to replace."""
    if any(IMAGE in i.tags for i in engine.images.list("gpubake/pytorch")):
        engine.images.remove(IMAGE)  # this module's own tag, from an earlier run
    _ref, base_id, _note = docker_engine.ensure_base_image(engine, stacks.resolve().os, None, print)
    box = engine.containers.create(base_id, ["true"])
    try:
        label = f"LABEL {plan_mod.HASH_LABEL}=placeholder"
        return box.commit("gpubake/pytorch", TAG, changes=[label]).id
    finally:
        box.remove(force=True)


@pytest.fixture(scope="module")
def built(engine, marker_bundle, wheel_install):
    bundle, _ = marker_bundle
    replaced = placeholder(engine)
    before = build_containers(engine)
    started = time.monotonic()
    proc = wheel_install.run(
        "build",
        "--target",
        "docker",
        "--tag",
        TAG,
        "--force",
        "--ca-bundle",
        str(bundle),
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    image = engine.images.get(IMAGE)
    return {
        "proc": proc,
        "image": image,
        "seconds": time.monotonic() - started,
        "containers_before": before,
        "replaced": replaced,
    }


def test_build_reports_progress_and_success(built):
    err = built["proc"].stderr
    assert re.search(r"\[\s*\d+\] python_env : Install the", err), err[-3000:]
    assert f"built {IMAGE}" in err and "gpu-smoke passed in it" in err
    assert built["proc"].stdout.strip() == IMAGE


def test_default_image_scans_clean(built, wheel_install):
    """The build scanned every layer before it tagged the image; `gpubake scan` agrees."""
    scanned = re.search(
        r"stage 4/4 pytorch:finish: scanned (\d+) layers, \d+ files: no secrets",
        built["proc"].stderr,
    )
    assert scanned, built["proc"].stderr[-3000:]
    assert int(scanned[1]) == len(built["image"].attrs["RootFS"]["Layers"])
    proc = wheel_install.run("scan", IMAGE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no secrets found" in proc.stderr


def test_sbom_lists_locked_torch_and_the_os_python3(engine, built, wheel_install):
    """The SBOM of the default image lists torch with the locked version and hash, and the
    OS's python3 package (`gpubake sbom`: read from the image without running it)."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    assert built["image"].labels[plan_mod.SBOM_LABEL] == plan_mod.SBOM_PATH
    proc = wheel_install.run("sbom", IMAGE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(proc.stdout) is None
    document = json.loads(proc.stdout)
    components = document["components"]
    lock = locks.check(stacks.resolve(), stacks.machine_arch())
    version, hashes = lock.pins["torch"]
    pypi = {c["name"].lower(): c for c in components if c["purl"].startswith("pkg:pypi/")}
    assert pypi["torch"]["version"] == version
    locked = {h.split(":", 1)[1] for h in hashes}
    assert {h["content"] for h in pypi["torch"]["hashes"]} == locked
    debs = {c["name"]: c for c in components if c["purl"].startswith("pkg:deb/debian/")}
    with container(engine, IMAGE) as box:
        rc, out = run_in(box, "dpkg-query", "-W", "-f", "${Version}", "python3")
    assert rc == 0 and debs["python3"]["version"] == out.strip()
    assert debs["python3"]["purl"].endswith("&distro=debian-12")


def test_replaced_image_is_removed(engine, built):
    """--force moved the tag off the image it named before; that image, untagged, is gone."""
    replaced = built["replaced"]
    assert built["image"].id != replaced
    assert f"removed {replaced[:19]}, the image {IMAGE} pointed to before" in built["proc"].stderr
    assert replaced not in {i.id for i in engine.images.list(all=True)}


def test_image_labels_user_and_manifest(engine, built):
    image = built["image"]
    config = image.attrs["Config"]
    labels = config["Labels"]
    digest = labels[plan_mod.HASH_LABEL]
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert labels["org.opencontainers.image.title"] == "gpubake/pytorch"
    assert labels["io.gpubake.stack"] == "pytorch"
    assert config["User"] == "gpubake"
    assert config["Cmd"] == ["/bin/bash"]
    assert any(e.startswith("PATH=/opt/gpubake/env/bin:") for e in config["Env"])
    out = run_output(engine, IMAGE, ["cat", "/etc/gpubake/manifest.json"])
    manifest = json.loads(out)
    stack = stacks.resolve()
    assert manifest["input_hash"] == digest
    assert manifest["stack"] == "pytorch"
    assert manifest["frameworks"]["torch"] == dict(stack.packages)["torch"]
    assert manifest["python"].startswith(stack.python + ".")
    assert manifest["os"]["id"] == "debian" and manifest["os"]["version_id"] == "12"
    assert "nvidia-cudnn-cu13" in manifest["cuda_libraries"]
    assert manifest["torch_build"]["cuda"] == stack.cuda


def test_container_image_has_no_workstation_tools_and_stale_apt_lists(engine, built):
    """Role params of playbooks/container.yml reach the roles role stack includes: no git or
    tmux (base_workstation_tools: false); image_cleanup dates the emptied apt lists to 1970,
    so a later stage's apt refreshes them instead of finding no package."""
    script = (
        "dpkg-query -W -f='${Package} ${Status}\\n' git tmux 2>/dev/null | grep -c installed;"
        " stat -c %Y /var/lib/apt/lists; find /var/lib/apt/lists -type f ! -name lock | wc -l;"
        " test -e /var/lib/apt/periodic/update-success-stamp && echo stamp || echo no-stamp"
    )
    out = run_output(engine, IMAGE, ["sh", "-c", script], user="root", entrypoint=[]).decode()
    assert out.split() == ["0", "0", "0", "no-stamp"], out


def test_container_runs_as_non_root_and_imports_torch(engine, built):
    code = "import os, torch, torchvision; print(os.getuid(), torch.__version__.split('+')[0])"
    out = run_output(engine, IMAGE, ["python", "-c", code]).decode().split()
    assert out == ["1000", dict(stacks.resolve().packages)["torch"]]


def test_the_compute_capability_label_is_what_the_wheels_carry(engine, built):
    """The label `gpubake pull` chooses by (stacks.yml `kernels`) against torch's own list of
    the kernels it was compiled with (get_arch_list() needs a GPU; this does not)."""
    code = "import torch; print(torch._C._cuda_getArchFlags())"
    flags = run_output(engine, IMAGE, ["python", "-c", code]).decode().split()
    carried = [f"{flag[3:-1]}.{flag[-1]}" for flag in flags if flag.startswith("sm_")]
    assert built["image"].labels[plan_mod.CC_LABEL].split(",") == carried, flags


def test_gpu_smoke_cpu_mode_skips_gpu_checks(engine, built):
    report = smoke_report(engine, IMAGE)
    by = {c["name"]: c["status"] for c in report["checks"]}
    assert report["gpu_visible"] is False
    assert by["torch.import"] == "passed"
    assert by["torch.train_step_cpu"] == "passed"
    for name in ("gpu.present", "torch.cuda", "torch.train_step", "perf.matmul", "perf.copy"):
        assert by[name] == "skipped", name
    assert not any(
        s == "passed" for n, s in by.items() if n.startswith(("gpu.", "perf.", "driver."))
    )
    # the build's own smoke report is in the image too
    saved = run_output(engine, IMAGE, ["cat", "/etc/gpubake/smoke-report.json"])
    assert json.loads(saved)["ok"] is True


def test_no_trace_of_the_ca_bundle_or_build_leftovers(engine, built, marker_bundle):
    _, marker = marker_bundle
    assert not image_holds(engine.images.get(IMAGE), marker), (
        "the build-time CA certificate is in a layer of the image"
    )
    listing = run_output(
        engine,
        IMAGE,
        [
            "sh",
            "-c",
            "ls -A /run/gpubake-build /root/.cache 2>&1; ls -A /var/lib/apt/lists; "
            "ls -A /tmp; ls /var/cache/apt/archives/*.deb 2>&1; exit 0",
        ],
        user="root",
    ).decode()
    assert "No such file" in listing.splitlines()[0]  # /run/gpubake-build
    assert ".deb" not in listing.replace("*.deb", "")
    assert "torchinductor" not in listing
    names = [c.name for c in engine.containers.list(all=True)]
    assert [n for n in names if n.startswith("gpubake-build-")] == []


def _chain(engine, base: str):
    """The stages of the default image, planned as gpubake plans them."""
    stack = stacks.resolve()
    lock = locks.check(stack, stacks.machine_arch())
    base_id = engine.images.get(base).id

    def plan_for(level):
        return plan_mod.make_plan(level, base_image=base, base_image_id=base_id, tag=TAG)

    return stages.plan_chain(stack, plan_for, {stack.name: lock}, uv_cache=None), lock


def test_playbook_applied_again_changes_nothing(engine, built, tmp_path):
    """The container playbook with every role (root) on the built image, the whole lock
    given: every role is already converged."""
    labels = built["image"].attrs["Config"]["Labels"]
    chain, lock = _chain(engine, labels["org.opencontainers.image.base.name"])
    final = chain[-1]
    assert final.input_hash == labels[plan_mod.HASH_LABEL]
    lock_file = tmp_path / "python-env.lock"
    lock_file.write_text(lock.text)
    variables = {**final.plan.ansible_vars, "python_env_lock_file": str(lock_file)}
    del variables["gpubake_stage_roles"]  # all of them, in one run
    with container(engine, IMAGE) as box:
        recap, output = apply(box, ROOT / "playbooks" / "container.yml", variables)
        _rc, out = run_in(box, "find", "/var/lib/apt/lists", "-type", "f", "!", "-name", "lock")
    assert recap["failed"] == 0, output[-5000:]
    assert recap["changed"] == 0, output[-5000:]
    assert out.strip() == "", "a converged image must not need apt lists"


def test_each_stage_is_a_layer_of_its_own(engine, built):
    """os, cuda, env and finish: each stage image is the one below plus one layer, and the
    CUDA wheels sit in the cuda layer, below torch."""
    chain, _lock = _chain(engine, built["image"].labels["org.opencontainers.image.base.name"])
    layers = [engine.images.get(s.plan.image_ref).attrs["RootFS"]["Layers"] for s in chain]
    assert layers[-1] == built["image"].attrs["RootFS"]["Layers"]
    for below, above in itertools.pairwise(layers):
        assert above[:-1] == below
    err = built["proc"].stderr
    for stage in chain:
        assert re.search(
            rf"stage \d/4 {stage.label}: built in \d+m\d\ds, its layer \d+\.\d+ [GM]B", err
        )
    cuda, env = (engine.images.get(s.plan.image_ref) for s in chain[1:3])
    code = "import glob; print(len(glob.glob('/opt/gpubake/env/lib/python3*/site-packages/{}')))"
    for image, (nvidia, torch) in ((cuda, (1, 0)), (env, (1, 1))):
        for pattern, want in (("nvidia", nvidia), ("torch", torch)):
            out = run_output(engine, image.id, ["python3", "-c", code.format(pattern)]).decode()
            assert int(out) == want, (image.tags, pattern)


def test_identical_build_is_skipped_in_seconds(built):
    started = time.monotonic()
    proc = build()
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "skipped: gpubake/pytorch:itest is already built from identical inputs" in proc.stderr
    # nothing was built (a stage's Packer build takes a minute or more); the time itself is
    # about 2 s on an idle engine, and was seen at 12 s on a busy one
    assert "building" not in proc.stderr, proc.stderr
    assert seconds < 45, seconds


def test_skipped_build_keeps_its_tag_on_its_own_image(engine, built):
    """Two images from identical inputs (a newer copy under another tag): a no-change build
    of the first tag is skipped and leaves that tag where it was."""
    box = engine.containers.create(IMAGE, ["true"])
    try:
        copy = box.commit(repository="gpubake/pytorch", tag=f"{TAG}-copy")
    finally:
        box.remove(force=True)
    try:
        assert copy.id != built["image"].id
        assert copy.labels[plan_mod.HASH_LABEL] == built["image"].labels[plan_mod.HASH_LABEL]
        proc = build()
        assert proc.returncode == 0, proc.stderr
        assert f"image {built['image'].short_id}" in proc.stderr
        assert engine.images.get(IMAGE).id == built["image"].id
        assert engine.images.get(f"gpubake/pytorch:{TAG}-copy").id == copy.id
    finally:
        engine.images.remove(copy.id, force=True)


def test_failing_stage_names_role_and_task_and_leaves_nothing(engine, built, tmp_path):
    """A failing task in the last stage's role (in a copy of the checkout): the stages below
    are reused, the error names the role and task, and no image or container is left."""
    tree = copy_checkout(tmp_path / "tree")
    tasks = tree / "roles" / "gpu_smoke_test" / "tasks" / "main.yml"
    tasks.write_text(
        tasks.read_text()
        + "\n- name: Fail on purpose\n  ansible.builtin.fail:\n    msg: stopped by the test\n"
    )
    # the build's own: its labelled containers and gpubake-labelled images (other workers'
    # tests start and remove containers and images of their own meanwhile)
    before, images_before = build_containers(engine), built_images(engine)
    proc = build_in(tree, "itest-broken")
    assert proc.returncode == 1
    for stage in ("os", "cuda", "env"):
        assert re.search(rf"stage \d/4 pytorch:{stage}: reused", proc.stderr), proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "gpubake: error: build failed in role gpu_smoke_test, task 'Fail on purpose': "
    ), last
    assert "stopped by the test" in last
    assert "full log: " in last
    assert "Traceback" not in proc.stderr
    assert build_containers(engine) == before
    assert built_images(engine) == images_before
