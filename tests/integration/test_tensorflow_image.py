"""The TensorFlow stack for real: TensorFlow from PyPI with its CUDA libraries from NVIDIA's
wheels in their own layer below it, locked; gpu-smoke's TensorFlow checks pass on the CPU
(the GPU ones skipped), and the Paperspace tutorial's device check runs."""

from __future__ import annotations

import pytest

from gpubake import stacks
from gpubake.build import plan as plan_mod
from gpubake.build.stages import STAGE_REPOSITORY
from tests.integration.helpers import (
    ROOT,
    assert_environment_is_the_lock,
    build_in,
    remove_stack_images,
    run_output,
    smoke_report,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]
TAG = "itest"
STACK = "tensorflow"
IMAGE = f"gpubake/{STACK}:{TAG}"


@pytest.fixture(scope="module")
def built(engine):
    try:
        proc = build_in(ROOT, TAG, "--stack", STACK, timeout=3600)
        assert proc.returncode == 0, proc.stderr[-6000:]
        yield {"proc": proc, "image": engine.images.get(IMAGE)}
    finally:
        remove_stack_images(engine, (STACK,), TAG)


def test_gpu_smoke_runs_tensorflows_checks_on_the_cpu(engine, built):
    err = built["proc"].stderr
    assert "gpu-smoke passed in it" in err or f"skipped: {IMAGE} is already built" in err
    report = smoke_report(engine, IMAGE)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["tensorflow.import"]["status"] == "passed"
    # the CUDA and cuDNN TensorFlow was built with, as it reports them
    assert "(CUDA 12.5" in checks["tensorflow.import"]["detail"], checks["tensorflow.import"]
    assert "cuDNN 9" in checks["tensorflow.import"]["detail"]
    assert checks["tensorflow.matmul_cpu"]["status"] == "passed"
    for name in ("tensorflow.gpus", "tensorflow.matmul", "gpu.present"):
        assert checks[name]["status"] == "skipped", name
    assert not any(c["name"].startswith("torch.") for c in report["checks"])
    assert report["versions"]["tensorflow"] == dict(stacks.resolve(STACK).packages)[STACK]


def test_the_paperspace_tutorials_device_check_runs(engine, built):
    code = (
        "from tensorflow.python.client import device_lib; "
        "print(*[d.device_type for d in device_lib.list_local_devices()])"
    )
    out = run_output(engine, IMAGE, ["python", "-c", code]).decode().split()
    assert out[-1:] == ["CPU"], out  # and GPU on a GPU machine


def test_the_label_is_what_tensorflow_was_built_for(engine, built):
    code = (
        "import tensorflow as tf; "
        "print(*tf.sysconfig.get_build_info()['cuda_compute_capabilities'])"
    )
    built_for = run_output(engine, IMAGE, ["python", "-c", code]).decode().split()
    kernels = [f"{a[3:-1]}.{a[-1]}" for a in built_for if a.startswith("sm_")]
    ptx = [f"{a[8:-1]}.{a[-1]}" for a in built_for if a.startswith("compute_")]
    assert built["image"].labels[plan_mod.CC_LABEL].split(",") == kernels, built_for
    assert ptx == [str(stacks.raw_stack(STACK)["kernels"]["ptx"])], built_for


def test_the_cuda_libraries_are_a_layer_below_tensorflow(engine, built):
    final = built["image"].attrs["RootFS"]["Layers"]
    cuda = [
        image
        for image in engine.images.list(name=f"{STAGE_REPOSITORY}/{STACK}")
        if any(t.startswith(f"{STAGE_REPOSITORY}/{STACK}:cuda-") for t in image.tags)
        and final[: len(image.attrs["RootFS"]["Layers"])] == image.attrs["RootFS"]["Layers"]
    ]
    assert len(cuda) == 1, [i.tags for i in cuda]
    assert len(final) == len(cuda[0].attrs["RootFS"]["Layers"]) + 2  # env and finish above
    code = (
        "import importlib.util as u, importlib.metadata as m; "
        "print(u.find_spec('tensorflow') is None, m.version('nvidia-cudnn-cu12'))"
    )
    out = run_output(engine, cuda[0].id, ["python", "-c", code]).decode().split()
    assert out == ["True", dict(stacks.resolve(STACK).packages)["nvidia-cudnn-cu12"]]


def test_the_environment_is_exactly_the_lock(engine, built):
    assert_environment_is_the_lock(engine, IMAGE, STACK)
