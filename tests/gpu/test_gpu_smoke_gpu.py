"""gpu-smoke on a real NVIDIA GPU: runs gpubake/gpu_smoke.py as the image would (a subprocess
of this interpreter, which must hold torch) and checks its verdicts and figures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "gpubake" / "gpu_smoke.py"
GPUS_YML = ROOT / "images" / "gpus.yml"


def _gpu_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(ln.startswith("GPU ") for ln in out.stdout.splitlines())


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _gpu_visible(), reason="no NVIDIA GPU (nvidia-smi not found or no GPU visible)"
    ),
]


def _smoke(args, gpus_file, **env_over):
    env = {k: v for k, v in os.environ.items() if k != "GPU_SMOKE_GPUS_FILE"}
    env.update(env_over)
    cmd = [sys.executable, str(MODULE), "--json", "--gpus-file", str(gpus_file), *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    wall = time.monotonic() - start
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout), wall, proc.stderr


@pytest.fixture(scope="module")
def gpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpubake") / "gpus.json"
    path.write_text(json.dumps(yaml.safe_load(GPUS_YML.read_text())))
    return path


@pytest.fixture(scope="module")
def healthy(gpus_file):
    return _smoke(["--require-gpu"], gpus_file)


def _checks(report):
    return {c["name"]: c for c in report["checks"]}


def test_require_gpu_passes_on_a_healthy_gpu(healthy):
    rc, report, _, stderr = healthy
    failed = [c for c in report["checks"] if c["status"] == "failed"]
    assert rc == 0 and report["ok"] is True, (failed, stderr[-2000:])
    assert report["gpu_visible"] is True
    by = _checks(report)
    for name in ("gpu.present", "driver.version", "torch.import", "torch.cuda", "torch.cudnn"):
        assert by[name]["status"] == "passed", by[name]
    assert by["torch.train_step"]["status"] == "passed"
    assert by["driver.cuda_compat"]["status"] == "passed"


def test_reports_model_and_figures(healthy):
    _, report, _, _ = healthy
    models = yaml.safe_load(GPUS_YML.read_text())["gpus"]
    gpu = report["gpus"][0]
    assert gpu["name"] and gpu["memory_mib"] > 0 and gpu["driver"]
    if gpu["model_key"] is not None:
        assert gpu["model_key"] in models
    by = _checks(report)
    matmul, copy = by["perf.matmul"], by["perf.copy"]
    assert matmul["status"] == "passed" and matmul["unit"] == "TFLOP/s" and matmul["value"] > 1
    assert copy["status"] == "passed" and copy["unit"] == "GB/s" and copy["value"] > 10
    if gpu["model_key"] is not None:
        exp = models[gpu["model_key"]]["expected"]
        assert matmul["expected"] == exp["matmul_tflops"]
        assert copy["expected"] == exp["copy_gbps"]
        assert matmul["value"] >= 0.7 * exp["matmul_tflops"]
        assert gpu["model_key"] in matmul["detail"] and gpu["name"] in matmul["detail"]
    assert report["versions"]["torch"] and report["versions"]["cuda_driver"]


def test_whole_run_is_well_under_a_minute(healthy):
    _, report, wall, _ = healthy
    assert report["duration_s"] < 60
    assert wall < 60


def test_unreachable_threshold_fails_naming_perf_matmul(gpus_file, healthy):
    if healthy[1]["gpus"][0]["model_key"] is None:
        pytest.skip("no expected figures for this GPU model in images/gpus.yml")
    rc, report, _, _ = _smoke(["--require-gpu", "--threshold", "50"], gpus_file)
    assert rc == 1 and report["ok"] is False
    matmul = _checks(report)["perf.matmul"]
    assert matmul["status"] == "failed"
    assert "< 5000% of" in matmul["detail"] and "expected for" in matmul["detail"]


def test_hidden_gpu_with_require_gpu_fails_with_one_line_reason(gpus_file):
    rc, report, _, _ = _smoke(["--require-gpu"], gpus_file, CUDA_VISIBLE_DEVICES="")
    assert rc == 1 and report["gpu_visible"] is False
    present = _checks(report)["gpu.present"]
    assert present["status"] == "failed"
    assert present["detail"] == "no NVIDIA GPU visible: CUDA_VISIBLE_DEVICES is empty"
    for name in ("perf.matmul", "perf.copy", "gpu.ecc"):
        assert _checks(report)[name]["status"] == "skipped"
