"""Unit tests for gpubake/gpu_smoke.py: no GPU, no torch; the driver and framework layers are
replaced by fakes of the module's Probe / TorchAdapter / MxnetAdapter shapes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from tests.modules import load_file

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "gpubake" / "gpu_smoke.py"
GPUS_YML = ROOT / "images" / "gpus.yml"


gs = load_file(MODULE, "gpu_smoke_under_test")
MODELS = yaml.safe_load(GPUS_YML.read_text())["gpus"]
H100 = "NVIDIA H100 80GB HBM3"


# --------------------------------------------------------------------------- fakes


def gpu(index=0, name=H100, **kw):
    base = dict(
        uuid=f"GPU-{index:04d}-aaaa",
        memory_mib=81559,
        compute_capability="9.0",
        pcie_gen=5,
        pcie_gen_max=5,
        pcie_width=16,
        pcie_width_max=16,
        ecc_uncorrected=0,
        remap_pending=False,
        remap_failure=False,
        throttle=["gpu_idle"],
    )
    base.update(kw)
    return gs.Gpu(index=index, name=name, **base)


class FakeProbe:
    def __init__(self, gpus=(), driver="580.159.04", cuda="13.0"):
        self._gpus = list(gpus)
        self._driver = gs.Driver(ok=True, version=driver, cuda=cuda, source="fake NVML")

    def driver_info(self):
        return self._driver

    def gpus(self):
        return list(self._gpus)


class FakeTorch:
    """The TorchAdapter surface, with scripted answers; records what was run."""

    name = "torch"

    def __init__(self, n=1, cuda="13.0", tflops=782.0, gbps=3010.0, loss=(2.31, 2.20)):
        self.n, self.cuda, self.tflops, self.gbps, self.loss = n, cuda, tflops, gbps, loss
        self.calls = []
        self.allreduce_result = None

    def import_info(self):
        return {"version": "2.11.0+cu130", "cuda": self.cuda}

    def cuda_info(self):
        return {"available": self.n > 0, "count": self.n}

    def cudnn_info(self):
        return {"available": self.cuda is not None, "version": "9.10.2" if self.cuda else None}

    def nccl_info(self):
        return {"version": "2.27.7", "distributed": True}

    def capability(self, device):
        return (9, 0)

    def train_step(self, device):
        self.calls.append(("train", device))
        return self.loss

    def allreduce(self, n):
        self.calls.append(("allreduce", n))
        return self.allreduce_result or [n * (n + 1) / 2] * (2 * n)

    def free_memory(self, device):
        return 78 << 30

    def matmul_tflops(self, dtype, n, device):
        self.calls.append(("matmul", dtype, n, device))
        return self.tflops

    def copy_gbps(self, nbytes, device):
        self.calls.append(("copy", nbytes, device))
        return self.gbps


class FakeMxnet:
    name = "mxnet"

    def __init__(self, libcuda=False, missing=("libcuda.so.1",)):
        self._libcuda, self._missing = libcuda, list(missing)
        self.imported = False

    def installed(self):
        return True

    def libcuda(self):
        return (True, "") if self._libcuda else (False, "libcuda.so.1: cannot open shared object")

    def library(self):
        return Path("/opt/venv/lib/python3.10/site-packages/mxnet/libmxnet.so")

    def missing_libs(self, lib):
        return self._missing

    def built_cuda(self):
        return "11.7"

    def import_info(self):
        self.imported = True
        return {"version": "1.9.1", "cuda": "11.7"}

    def gpu_array_sum(self):
        return 1024.0 * 1024.0


@pytest.fixture
def gpus_json(tmp_path):
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps(yaml.safe_load(GPUS_YML.read_text())))
    return path


def run(argv, probe, framework=None, env=None, capsys=None, gpus_file=None):
    """main() with --json; returns (exit code, report)."""
    args = ["--json", *argv]
    if gpus_file is not None:
        args += ["--gpus-file", str(gpus_file)]
    rc = gs.main(args, probe=probe, framework=framework, env={} if env is None else env)
    out = capsys.readouterr().out
    return rc, json.loads(out)


def checks(report):
    return {c["name"]: c for c in report["checks"]}


# --------------------------------------------------------------------------- thresholds


def test_judge_passes_at_and_above_threshold_fails_below_and_names_everything():
    label = f"h100 ({H100})"
    assert gs.judge("bf16 matmul", "TFLOP/s", 546.0, 780, 0.70, label)[0]  # exactly 70 %
    assert gs.judge("bf16 matmul", "TFLOP/s", 800.0, 780, 0.70, label)[0]
    ok, detail = gs.judge("bf16 matmul", "TFLOP/s", 512.3, 780, 0.70, label)
    assert not ok
    assert detail == f"bf16 matmul 512.3 TFLOP/s < 70% of 780 expected for h100 ({H100})"
    ok, detail = gs.judge("d2d copy 2048 MiB", "GB/s", 100.0, None, 0.70, "NVIDIA Foo")
    assert ok and detail.endswith("no expected figures for NVIDIA Foo")


# --------------------------------------------------------------------------- model matching


@pytest.mark.parametrize(
    ("name", "key"),
    [
        (H100, "h100"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100 80GB PCIe", "a100-80gb"),
        ("Tesla V100-SXM2-16GB", "v100"),
        ("Tesla T4", "t4"),
        ("NVIDIA A10G", "a10g"),
        ("NVIDIA L4", "l4"),
        ("Tesla V100-SXM2-32GB", "v100-32gb"),
        ("NVIDIA A10", "a10"),
        ("Quadro P5000", "p5000"),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "rtx-pro-6000"),
        # a card whose name contains another's is that card, not the other
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA GH200 480GB", "gh200"),
        ("NVIDIA GB200", "gb200"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        # substrings that must not match: another card whose name contains a known one
        ("Tesla P40", None),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA L40", None),
        ("NVIDIA GeForce RTX 4080", None),
    ],
)
def test_match_model_against_real_gpus_yml(name, key):
    assert gs.match_model(name, MODELS) == key
    assert gs.match_model(name.upper(), MODELS) == key  # case-insensitive


def test_every_model_in_gpus_yml_matches_its_own_name_and_has_expected_figures():
    for key, spec in MODELS.items():
        assert gs.match_model(spec["name"], MODELS) == key, key
        exp = spec["expected"]
        assert exp["matmul_dtype"] in ("bf16", "fp16", "fp32"), key
        assert exp["matmul_tflops"] > 0 and exp["copy_gbps"] > 0, key


def test_h100_pcie_is_not_matched_by_h100_sxm_patterns():
    pcie = "NVIDIA H100 PCIe"
    assert not any(p.lower() in pcie.lower() for p in MODELS["h100"]["match"])


# --------------------------------------------------------------------------- full runs


def test_healthy_h100_passes_with_figures_in_json(capsys, gpus_json):
    fw = FakeTorch()
    rc, report = run([], FakeProbe([gpu()]), fw, capsys=capsys, gpus_file=gpus_json)
    assert rc == 0 and report["ok"] is True
    assert set(report) >= {"version", "host", "duration_s", "gpu_visible", "gpus", "versions"}
    assert report["version"] == 1 and report["gpu_visible"] is True
    g = report["gpus"][0]
    assert (g["index"], g["name"], g["model_key"], g["driver"]) == (0, H100, "h100", "580.159.04")
    assert g["memory_mib"] == 81559
    v = report["versions"]
    assert (v["driver"], v["cuda_driver"], v["torch_cuda"], v["cudnn"], v["nccl"]) == (
        "580.159.04",
        "13.0",
        "13.0",
        "9.10.2",
        "2.27.7",
    )
    by = checks(report)
    for name in ("gpu.present", "driver.cuda_compat", "torch.cuda", "torch.train_step"):
        assert by[name]["status"] == "passed", by[name]
    mm = by["perf.matmul"]
    assert (mm["value"], mm["expected"], mm["unit"]) == (782.0, 780, "TFLOP/s")
    assert by["perf.copy"]["expected"] == 3000 and by["perf.copy"]["unit"] == "GB/s"
    assert ("matmul", "bf16", 8192, 0) in fw.calls  # dtype from gpus.yml, full size
    copy = next(c for c in fw.calls if c[0] == "copy")
    assert copy[1] >= 1 << 30  # a large buffer
    s = report["summary"]
    assert s == {
        "passed": sum(c["status"] == "passed" for c in report["checks"]),
        "failed": 0,
        "skipped": sum(c["status"] == "skipped" for c in report["checks"]),
    }
    assert by["torch.allreduce"] == {
        "name": "torch.allreduce",
        "status": "skipped",
        "detail": "single GPU",
    }
    assert ("allreduce", 1) not in fw.calls


def test_slow_matmul_fails_naming_figure_measured_expected_and_model(capsys, gpus_json):
    fw = FakeTorch(tflops=512.3)
    rc, report = run([], FakeProbe([gpu()]), fw, capsys=capsys, gpus_file=gpus_json)
    assert rc == 1 and report["ok"] is False
    mm = checks(report)["perf.matmul"]
    assert mm["status"] == "failed"
    assert mm["detail"] == f"bf16 matmul 512.3 TFLOP/s < 70% of 780 expected for h100 ({H100})"
    assert checks(report)["perf.copy"]["status"] == "passed"
    assert report["summary"]["failed"] == 1


def test_threshold_option_moves_the_bar(capsys, gpus_json):
    fw = FakeTorch(tflops=600.0, gbps=2300.0)
    rc, report = run(
        ["--threshold", "0.75"], FakeProbe([gpu()]), fw, capsys=capsys, gpus_file=gpus_json
    )
    assert rc == 0  # 600 >= 585, 2300 >= 2250
    fw = FakeTorch(tflops=600.0, gbps=2300.0)
    rc, report = run(
        ["--threshold", "0.8"], FakeProbe([gpu()]), fw, capsys=capsys, gpus_file=gpus_json
    )
    assert rc == 1
    failed = {c["name"] for c in report["checks"] if c["status"] == "failed"}
    assert failed == {"perf.matmul", "perf.copy"}
    assert "< 80% of 780 expected" in checks(report)["perf.matmul"]["detail"]


def test_h100_pcie_is_judged_against_its_own_figures(capsys, gpus_json):
    fw = FakeTorch(tflops=420.0, gbps=1300.0)  # above 70 % of pcie, below 70 % of sxm
    probe = FakeProbe([gpu(name="NVIDIA H100 PCIe")])
    rc, report = run([], probe, fw, capsys=capsys, gpus_file=gpus_json)
    assert rc == 0
    assert report["gpus"][0]["model_key"] == "h100-pcie"
    assert checks(report)["perf.matmul"]["expected"] == 580


def test_unknown_model_passes_with_figures_and_says_so(capsys, gpus_json):
    fw = FakeTorch(tflops=55.5, gbps=900.0)
    probe = FakeProbe([gpu(name="NVIDIA L40", compute_capability="8.9")])
    rc, report = run([], probe, fw, capsys=capsys, gpus_file=gpus_json)
    assert rc == 0
    mm = checks(report)["perf.matmul"]
    assert mm["status"] == "passed" and mm["value"] == 55.5 and "expected" not in mm
    assert mm["detail"].endswith("no expected figures for NVIDIA L40")
    assert ("matmul", "bf16", 8192, 0) in fw.calls  # cc 8.9 -> bf16 by default


def test_pre_ampere_unknown_card_defaults_to_fp16():
    assert gs.PerfChecks._default_dtype(None, gpu(compute_capability="7.5"), 0) == "fp16"
    assert gs.PerfChecks._default_dtype(None, gpu(compute_capability="8.0"), 0) == "bf16"


def test_missing_gpus_file_skips_perf_without_measuring(capsys, tmp_path):
    fw = FakeTorch()
    missing = tmp_path / "nope.json"
    rc, report = run([], FakeProbe([gpu()]), fw, capsys=capsys, gpus_file=missing)
    assert rc == 0
    for name in ("perf.matmul", "perf.copy"):
        c = checks(report)[name]
        assert c["status"] == "skipped"
        assert c["detail"] == f"no expected figures (gpus file {missing} not found)"
    assert not [c for c in fw.calls if c[0] in ("matmul", "copy")]
    assert report["summary"]["passed"] == sum(c["status"] == "passed" for c in report["checks"])


def test_gpus_file_from_env_and_yaml_is_accepted(capsys):
    fw = FakeTorch()
    env = {"GPU_SMOKE_GPUS_FILE": str(GPUS_YML)}
    rc, report = run([], FakeProbe([gpu()]), fw, env=env, capsys=capsys)
    assert rc == 0 and checks(report)["perf.matmul"]["expected"] == 780


def test_broken_gpus_file_fails_perf(capsys, tmp_path):
    bad = tmp_path / "gpus.json"
    bad.write_text("{not json")
    rc, report = run([], FakeProbe([gpu()]), FakeTorch(), capsys=capsys, gpus_file=bad)
    assert rc == 1
    assert checks(report)["perf.matmul"]["detail"].startswith(f"cannot read gpus file {bad}")


def test_skip_perf(capsys, gpus_json):
    fw = FakeTorch(tflops=1.0)
    rc, report = run(["--skip-perf"], FakeProbe([gpu()]), fw, capsys=capsys, gpus_file=gpus_json)
    assert rc == 0 and checks(report)["perf.matmul"]["detail"] == "--skip-perf"
    assert not [c for c in fw.calls if c[0] == "matmul"]


# --------------------------------------------------------------------------- no GPU


def test_no_gpu_runs_cpu_checks_and_skips_gpu_checks(capsys, gpus_json):
    fw = FakeTorch(n=0)
    probe = gs.NoDriver("nvidia-smi not found and NVML unavailable (pynvml not installed)")
    rc, report = run([], probe, fw, capsys=capsys, gpus_file=gpus_json)
    assert rc == 0 and report["ok"] is True and report["gpu_visible"] is False
    by = checks(report)
    assert by["torch.import"]["status"] == "passed"
    assert by["torch.train_step_cpu"]["status"] == "passed"
    assert fw.calls == [("train", "cpu")]  # nothing was run on a GPU
    gpu_checks = [
        n
        for n in by
        if n.startswith(("gpu.", "perf."))
        or n in ("torch.cuda", "torch.cudnn", "torch.nccl", "torch.train_step", "torch.allreduce")
    ]
    assert len(gpu_checks) >= 10
    for name in gpu_checks:
        assert by[name]["status"] == "skipped", by[name]
        assert "no GPU visible" in by[name]["detail"].replace("NVIDIA ", "")
    passed = sorted(n for n, c in by.items() if c["status"] == "passed")
    assert passed == ["torch.import", "torch.train_step_cpu"]
    assert report["summary"] == {"passed": 2, "failed": 0, "skipped": len(by) - 2}


def test_require_gpu_without_gpu_fails_with_one_line_reason(capsys, gpus_json):
    probe = gs.NoDriver("nvidia-smi not found and NVML unavailable (pynvml not installed)")
    rc, report = run(["--require-gpu"], probe, FakeTorch(n=0), capsys=capsys, gpus_file=gpus_json)
    assert rc == 1 and report["ok"] is False
    present = checks(report)["gpu.present"]
    assert present["status"] == "failed"
    assert present["detail"] == (
        "no NVIDIA GPU visible: nvidia-smi not found and NVML unavailable (pynvml not installed)"
    )
    assert "\n" not in present["detail"]
    assert report["summary"]["failed"] == 1


@pytest.mark.parametrize(
    ("cvd", "reason"),
    [("", "CUDA_VISIBLE_DEVICES is empty"), ("-1", "CUDA_VISIBLE_DEVICES=-1 selects no GPU")],
)
def test_cuda_visible_devices_hides_gpus_the_driver_shows(capsys, gpus_json, cvd, reason):
    fw = FakeTorch(n=0)
    env = {"CUDA_VISIBLE_DEVICES": cvd}
    rc, report = run([], FakeProbe([gpu()]), fw, env=env, capsys=capsys, gpus_file=gpus_json)
    assert rc == 0 and report["gpu_visible"] is False and report["gpus"] == []
    assert report["no_gpu_reason"] == f"no NVIDIA GPU visible: {reason}"
    assert checks(report)["gpu.present"]["status"] == "skipped"
    assert checks(report)["driver.version"]["status"] == "passed"  # the driver itself is there
    assert not [c for c in fw.calls if c[0] != "train" or c[1] != "cpu"]
    rc, report = run(
        ["--require-gpu"],
        FakeProbe([gpu()]),
        FakeTorch(n=0),
        env=env,
        capsys=capsys,
        gpus_file=gpus_json,
    )
    assert rc == 1
    assert checks(report)["gpu.present"]["detail"] == f"no NVIDIA GPU visible: {reason}"


def test_cuda_visible_devices_selects_by_index_and_uuid():
    gpus = [gpu(0), gpu(1), gpu(2)]
    assert [g.index for g in gs.visible_gpus(gpus, {})[0]] == [0, 1, 2]
    assert [g.index for g in gs.visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": "2,0"})[0]] == [2, 0]
    assert [g.index for g in gs.visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": "1,7,2"})[0]] == [1]
    by_uuid = gs.visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": "GPU-0001"})[0]
    assert [g.index for g in by_uuid] == [1]


def test_torch_seeing_gpus_the_driver_does_not_is_a_failure(capsys, gpus_json):
    probe = gs.NoDriver("nvidia-smi not found and NVML unavailable (pynvml not installed)")
    rc, report = run([], probe, FakeTorch(n=1), capsys=capsys, gpus_file=gpus_json)
    assert rc == 1
    assert checks(report)["torch.cuda"]["detail"].startswith("torch sees 1 GPU(s) but no NVIDIA")


def test_human_output_says_gpu_checks_did_not_run(capsys, gpus_json):
    probe = gs.NoDriver("nvidia-smi not found and NVML unavailable (pynvml not installed)")
    rc = gs.main(["--gpus-file", str(gpus_json)], probe=probe, framework=FakeTorch(n=0), env={})
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "DETAIL"]
    assert any(ln.startswith("gpu-smoke: 2 passed, 0 failed, ") for ln in lines), out
    assert "GPU checks did not run: no NVIDIA GPU visible: nvidia-smi not found" in out
    assert not any(ln.split()[:2] == ["perf.matmul", "passed"] for ln in lines)


def test_human_output_with_gpu_has_no_did_not_run_line(capsys, gpus_json):
    rc = gs.main(
        ["--gpus-file", str(gpus_json)], probe=FakeProbe([gpu()]), framework=FakeTorch(), env={}
    )
    out = capsys.readouterr().out
    assert rc == 0 and "did not run" not in out
    assert any(ln.split()[:2] == ["perf.matmul", "passed"] for ln in out.splitlines())


# --------------------------------------------------------------------------- driver-side checks


def test_driver_too_old_for_torch_cuda_fails_naming_both_versions(capsys, gpus_json):
    probe = FakeProbe([gpu()], driver="535.261.03", cuda="12.2")
    rc, report = run([], probe, FakeTorch(cuda="13.0"), capsys=capsys, gpus_file=gpus_json)
    assert rc == 1
    c = checks(report)["driver.cuda_compat"]
    assert c["status"] == "failed"
    assert "CUDA 12.2" in c["detail"] and "CUDA 13.0" in c["detail"]
    assert "535.261.03" in c["detail"]


def test_newer_minor_of_the_same_cuda_major_passes_through_minor_compat(capsys, gpus_json):
    # torch cu132 on an R580 driver (CUDA 13.0): minor-version compatibility (>= 580)
    probe = FakeProbe([gpu()], driver="580.159.04", cuda="13.0")
    rc, report = run([], probe, FakeTorch(cuda="13.2"), capsys=capsys, gpus_file=gpus_json)
    c = checks(report)["driver.cuda_compat"]
    assert c["status"] == "passed", c
    assert "minor-version compatibility" in c["detail"]
    assert rc == 0
    # below the major's minimum driver it fails
    probe = FakeProbe([gpu()], driver="520.61.05", cuda="12.0")
    rc, report = run([], probe, FakeTorch(cuda="12.8"), capsys=capsys, gpus_file=gpus_json)
    c = checks(report)["driver.cuda_compat"]
    assert c["status"] == "failed" and "525.60.13" in c["detail"]


def test_newer_driver_than_torch_cuda_passes(capsys, gpus_json):
    probe = FakeProbe([gpu()], driver="580.159.04", cuda="13.0")
    rc, report = run([], probe, FakeTorch(cuda="12.8"), capsys=capsys, gpus_file=gpus_json)
    assert rc == 0 and checks(report)["driver.cuda_compat"]["status"] == "passed"


def test_cpu_only_torch_build_skips_compat_and_nccl_without_gpu(capsys, gpus_json):
    probe = gs.NoDriver("nvidia-smi not found and NVML unavailable (pynvml not installed)")
    rc, report = run([], probe, FakeTorch(n=0, cuda=None), capsys=capsys, gpus_file=gpus_json)
    assert rc == 0
    by = checks(report)
    assert by["driver.cuda_compat"]["status"] == "skipped"
    assert by["torch.nccl"]["status"] == "skipped"
    assert "CPU-only" in by["torch.import"]["detail"]


def test_uncorrected_ecc_errors_fail(capsys, gpus_json):
    probe = FakeProbe([gpu(0), gpu(1, ecc_uncorrected=2)])
    rc, report = run([], probe, FakeTorch(n=2), capsys=capsys, gpus_file=gpus_json)
    assert rc == 1
    ecc = checks(report)["gpu.ecc"]
    assert ecc["status"] == "failed" and "GPU 1: 2 uncorrected volatile ECC errors" in ecc["detail"]


def test_ecc_not_supported_is_skipped_not_passed(capsys, gpus_json):
    g = gpu(ecc_uncorrected=None, name="NVIDIA L4")
    g.notes["ecc"] = "Not Supported"
    rc, report = run(
        [], FakeProbe([g]), FakeTorch(tflops=90, gbps=250), capsys=capsys, gpus_file=gpus_json
    )
    assert rc == 0
    ecc = checks(report)["gpu.ecc"]
    assert ecc["status"] == "skipped" and "Not Supported" in ecc["detail"]


@pytest.mark.parametrize(
    ("fields", "status", "text"),
    [
        ({"remap_pending": True}, "failed", "row remap pending"),
        ({"remap_failure": True}, "failed", "row remapping failed"),
        (
            {"remap_pending": None, "remap_failure": None, "retired_pending": True},
            "failed",
            "page retirement pending",
        ),
        ({"remap_pending": None, "remap_failure": None}, "skipped", "not reported"),
        ({}, "passed", "no pending"),
    ],
)
def test_row_remap(capsys, gpus_json, fields, status, text):
    rc, report = run(
        [], FakeProbe([gpu(**fields)]), FakeTorch(), capsys=capsys, gpus_file=gpus_json
    )
    c = checks(report)["gpu.row_remap"]
    assert c["status"] == status and text in c["detail"]
    assert rc == (1 if status == "failed" else 0)


@pytest.mark.parametrize(
    ("mask", "status", "text"),
    [
        (0x1, "passed", "gpu_idle"),
        (0x4, "passed", "sw_power_cap"),
        (0x20, "passed", "warning: software thermal slowdown"),
        (0x8, "failed", "hw_slowdown"),
        (0x40 | 0x4, "failed", "hw_thermal"),
        (0x80, "failed", "hw_power_brake"),
    ],
)
def test_throttle_reasons(capsys, gpus_json, mask, status, text):
    g = gpu(throttle=gs.throttle_names(mask))
    rc, report = run([], FakeProbe([g]), FakeTorch(), capsys=capsys, gpus_file=gpus_json)
    c = checks(report)["gpu.throttle"]
    assert c["status"] == status and text in c["detail"]
    assert rc == (1 if status == "failed" else 0)


def test_pcie_reports_link_and_fails_only_on_zero_width(capsys, gpus_json):
    rc, report = run(
        [],
        FakeProbe([gpu(pcie_gen=1, pcie_width=16)]),
        FakeTorch(),
        capsys=capsys,
        gpus_file=gpus_json,
    )
    c = checks(report)["gpu.pcie"]
    assert rc == 0 and c["status"] == "passed" and "gen 1 x16 (max gen 5 x16)" in c["detail"]
    rc, report = run(
        [], FakeProbe([gpu(pcie_width=0)]), FakeTorch(), capsys=capsys, gpus_file=gpus_json
    )
    assert rc == 1 and checks(report)["gpu.pcie"]["status"] == "failed"


def test_expect_gpus(capsys, gpus_json):
    rc, report = run(
        ["--expect-gpus", "8"], FakeProbe([gpu()]), FakeTorch(), capsys=capsys, gpus_file=gpus_json
    )
    assert rc == 1 and checks(report)["gpu.count"]["detail"] == "1 visible, 8 expected"
    rc, report = run(
        ["--expect-gpus", "1"], FakeProbe([gpu()]), FakeTorch(), capsys=capsys, gpus_file=gpus_json
    )
    assert rc == 0 and checks(report)["gpu.count"]["status"] == "passed"


# --------------------------------------------------------------------------- multi-GPU


def test_two_gpus_allreduce_runs_and_every_gpu_is_benchmarked(capsys, gpus_json):
    fw = FakeTorch(n=2)
    rc, report = run([], FakeProbe([gpu(0), gpu(1)]), fw, capsys=capsys, gpus_file=gpus_json)
    assert rc == 0
    assert ("allreduce", 2) in fw.calls
    assert checks(report)["torch.allreduce"]["status"] == "passed"
    assert {c[3] for c in fw.calls if c[0] == "matmul"} == {0, 1}
    assert {("train", "cuda:0"), ("train", "cuda:1")} <= set(fw.calls)


def test_wrong_allreduce_sum_fails(capsys, gpus_json):
    fw = FakeTorch(n=2)
    fw.allreduce_result = [3.0, 3.0, 3.0, 2.0]
    rc, report = run([], FakeProbe([gpu(0), gpu(1)]), fw, capsys=capsys, gpus_file=gpus_json)
    assert rc == 1 and checks(report)["torch.allreduce"]["status"] == "failed"


def test_torch_device_count_mismatch_fails(capsys, gpus_json):
    rc, report = run(
        [], FakeProbe([gpu(0), gpu(1)]), FakeTorch(n=1), capsys=capsys, gpus_file=gpus_json
    )
    assert rc == 1 and checks(report)["torch.cuda"]["status"] == "failed"


def test_non_finite_loss_fails(capsys, gpus_json):
    fw = FakeTorch(loss=(2.3, float("nan")))
    rc, report = run([], FakeProbe([gpu()]), fw, capsys=capsys, gpus_file=gpus_json)
    assert rc == 1
    assert checks(report)["torch.train_step"]["detail"].startswith("non-finite loss")


# --------------------------------------------------------------------------- mxnet


def test_mxnet_without_driver_checks_libraries_and_does_not_import(capsys, gpus_json):
    fw = FakeMxnet(libcuda=False, missing=["libcuda.so.1"])
    probe = gs.NoDriver("nvidia-smi not found and NVML unavailable (pynvml not installed)")
    rc, report = run([], probe, fw, capsys=capsys, gpus_file=gpus_json)
    assert rc == 0 and fw.imported is False
    by = checks(report)
    assert by["mxnet.libs"]["status"] == "passed"
    assert by["mxnet.import"]["status"] == "skipped"
    assert by["mxnet.import"]["detail"] == (
        "libcuda.so.1 (NVIDIA driver) not present; mxnet-cu1xx cannot load without it"
    )
    fw = FakeMxnet(libcuda=False, missing=["libcuda.so.1", "libcudnn.so.8"])
    rc, report = run([], probe, fw, capsys=capsys, gpus_file=gpus_json)
    assert rc == 1
    libs = checks(report)["mxnet.libs"]
    assert libs["status"] == "failed" and libs["detail"].endswith("libcudnn.so.8")


def test_mxnet_on_gpu_imports_and_sums_array_and_skips_perf(capsys, gpus_json):
    fw = FakeMxnet(libcuda=True, missing=[])
    rc, report = run([], FakeProbe([gpu()], cuda="12.2"), fw, capsys=capsys, gpus_file=gpus_json)
    assert rc == 0 and fw.imported
    by = checks(report)
    assert by["mxnet.gpu_array"]["status"] == "passed"
    assert by["driver.cuda_compat"]["status"] == "passed"  # 12.2 >= 11.7
    assert report["versions"]["mxnet"] == "1.9.1"
    assert by["perf.matmul"]["status"] == "skipped" and "need torch" in by["perf.matmul"]["detail"]


class FakeTensorflow:
    """TensorFlow as gpu-smoke's adapter sees it: `seen` GPUs, a matmul that is right (or
    `wrong`), on the device asked for."""

    name = "tensorflow"
    size = 256

    def __init__(self, seen=(), wrong=False, cuda="12.5.1"):
        self.seen, self.wrong, self.cuda = list(seen), wrong, cuda
        self.devices: list[str] = []

    def import_info(self):
        return {"version": "2.21.0", "cuda": self.cuda, "cudnn": "9" if self.cuda else None}

    def gpu_names(self):
        return self.seen

    def matmul(self, device):
        self.devices.append(device)
        total = float(self.size**3) - (1.0 if self.wrong else 0.0)
        return total, f"/job:localhost/replica:0/task:0/device:{device.strip('/')}"


def test_tensorflow_without_a_gpu_runs_its_cpu_checks_and_skips_the_gpu_ones(capsys, gpus_json):
    fw = FakeTensorflow()
    probe = gs.NoDriver("nvidia-smi not found and NVML unavailable (pynvml not installed)")
    rc, report = run([], probe, fw, capsys=capsys, gpus_file=gpus_json)
    by = checks(report)
    assert rc == 0, report
    assert by["tensorflow.import"] == {
        "name": "tensorflow.import",
        "status": "passed",
        "detail": "tensorflow 2.21.0 (CUDA 12.5.1, cuDNN 9)",
    }
    assert by["tensorflow.matmul_cpu"]["status"] == "passed"
    assert by["tensorflow.gpus"]["status"] == "skipped"
    assert by["tensorflow.matmul"]["status"] == "skipped"
    assert fw.devices == ["/CPU:0"]
    assert report["versions"]["tensorflow"] == "2.21.0"
    # a CPU-only TensorFlow build is not the stack's: it fails
    rc, report = run([], probe, FakeTensorflow(cuda=None), capsys=capsys, gpus_file=gpus_json)
    assert rc == 1 and checks(report)["tensorflow.import"]["status"] == "failed"


def test_tensorflow_on_a_gpu_sees_it_and_multiplies_there(capsys, gpus_json):
    fw = FakeTensorflow(seen=["/physical_device:GPU:0"])
    rc, report = run([], FakeProbe([gpu()]), fw, capsys=capsys, gpus_file=gpus_json)
    by = checks(report)
    assert rc == 0, report
    assert by["tensorflow.gpus"]["detail"] == (
        "TensorFlow sees 1 of 1 visible GPU(s): /physical_device:GPU:0"
    )
    assert by["tensorflow.matmul"]["status"] == "passed" and fw.devices == ["/CPU:0", "/GPU:0"]
    assert by["driver.cuda_compat"]["status"] == "passed"  # 13.0 >= 12.5
    # TensorFlow blind to the GPU nvidia-smi shows: failed, and no GPU matmul attempted
    fw = FakeTensorflow(seen=[])
    rc, report = run([], FakeProbe([gpu()]), fw, capsys=capsys, gpus_file=gpus_json)
    by = checks(report)
    assert rc == 1 and by["tensorflow.gpus"]["status"] == "failed"
    assert by["tensorflow.matmul"]["status"] == "skipped" and fw.devices == ["/CPU:0"]
    # a wrong product fails
    fw = FakeTensorflow(seen=["/physical_device:GPU:0"], wrong=True)
    rc, report = run([], FakeProbe([gpu()]), fw, capsys=capsys, gpus_file=gpus_json)
    assert rc == 1 and checks(report)["tensorflow.matmul"]["status"] == "failed"


def test_mxnet_dist_cuda():
    assert gs.mxnet_dist_cuda("mxnet-cu117") == "11.7"
    assert gs.mxnet_dist_cuda("mxnet_cu102") == "10.2"
    assert gs.mxnet_dist_cuda("mxnet") is None


def test_real_ldd_finds_every_library_of_a_real_extension_module():
    import _ctypes  # a real shared object with its own dependencies (libffi)

    if not shutil.which("ldd") or not str(_ctypes.__file__).endswith(".so"):
        pytest.skip("needs ldd and a shared-object _ctypes")
    assert gs.MxnetAdapter().missing_libs(Path(_ctypes.__file__)) == []
    with pytest.raises(RuntimeError, match="ldd"):
        gs.MxnetAdapter().missing_libs(Path("/nonexistent/libmxnet.so"))


def test_real_libcuda_probe_reports_no_driver_here():
    if Path("/dev/nvidiactl").exists():
        pytest.skip("this machine has an NVIDIA driver")
    ok, why = gs.MxnetAdapter().libcuda()
    assert ok is False and "libcuda.so.1" in why


# --------------------------------------------------------------------------- probes' parsing


SMI_H100_ROWS = [
    {  # nvidia-smi --query-gpu values as printed with --format=csv,noheader,nounits
        "index": "0", "uuid": "GPU-aaaa", "name": H100, "driver_version": "580.159.04",
        "memory.total": "81559", "compute_cap": "9.0", "pcie.link.gen.current": "5",
        "pcie.link.gen.max": "5", "pcie.link.width.current": "16", "pcie.link.width.max": "16",
        "ecc.errors.uncorrected.volatile.total": "0", "retired_pages.pending": "[N/A]",
        "clocks_throttle_reasons.active": "0x0000000000000001",
    },
    {
        "index": "1", "uuid": "GPU-bbbb", "name": H100, "driver_version": "580.159.04",
        "memory.total": "81559", "compute_cap": "9.0", "pcie.link.gen.current": "1",
        "pcie.link.gen.max": "5", "pcie.link.width.current": "16", "pcie.link.width.max": "16",
        "ecc.errors.uncorrected.volatile.total": "[Not Supported]",
        "retired_pages.pending": "[N/A]", "clocks_throttle_reasons.active": "0x0000000000000048",
    },
]  # fmt: skip


def smi_runner(rows, remapped="GPU-aaaa, 0, 0\nGPU-bbbb, 1, 0\n", unknown=(), seen=None):
    """Answers like nvidia-smi: values in the order the query asked for; a field in `unknown`
    makes the query fail as an unknown field does."""

    def runner(args):
        if seen is not None:
            seen.append(args)
        if args[1:] == []:
            return 0, "| NVIDIA-SMI 580.159.04   Driver Version: 580.159.04   CUDA Version: 13.0 |"
        option, fields = args[1].split("=", 1)
        if option == "--query-remapped-rows":
            return 0, remapped
        if any(f in unknown for f in fields.split(",")):
            return 2, f'Field "{fields}" is not a valid field to query.'
        lines = [", ".join(row.get(f, "[N/A]") for f in fields.split(",")) for row in rows]
        return 0, "\n".join(lines) + "\n"

    return runner


def test_smi_probe_parses_csv_with_na_fields_and_driver_header():
    seen = []
    probe = gs.SmiProbe("nvidia-smi", smi_runner(SMI_H100_ROWS, seen=seen))
    drv = probe.driver_info()
    assert (drv.ok, drv.version, drv.cuda) == (True, "580.159.04", "13.0")
    a, b = probe.gpus()
    assert (a.index, a.name, a.memory_mib, a.pcie_gen, a.pcie_width) == (0, H100, 81559, 5, 16)
    assert a.ecc_uncorrected == 0 and a.throttle == ["gpu_idle"] and a.remap_pending is False
    assert a.compute_capability == "9.0" and b.pcie_gen == 1 and b.pcie_gen_max == 5
    assert b.ecc_uncorrected is None and b.remap_pending is True and b.retired_pending is None
    assert b.throttle == ["hw_slowdown", "hw_thermal"]
    assert gs.throttle_names(0x600) == ["board_limit", "reliability"]
    queried = [a[1] for a in seen if len(a) > 1]
    assert any(q.startswith("--query-gpu=") and "ecc.errors.uncorrected.volatile.total" in q
               for q in queried)  # fmt: skip
    assert all(a[2] == "--format=csv,noheader,nounits" for a in seen if len(a) > 1)


def test_smi_probe_falls_back_when_a_field_is_unknown():
    t4 = {"index": "0", "uuid": "GPU-a", "name": "Tesla T4", "driver_version": "535.261.03",
          "memory.total": "15360", "compute_cap": "7.5", "retired_pages.pending": "No",
          "clocks_event_reasons.active": "0x4"}  # fmt: skip
    runner = smi_runner([t4], remapped="", unknown=("clocks_throttle_reasons.active",))
    (gpu_t4,) = gs.SmiProbe("nvidia-smi", runner).gpus()
    assert gpu_t4.name == "Tesla T4" and gpu_t4.throttle == ["sw_power_cap"]
    assert gpu_t4.retired_pending is False and gpu_t4.remap_pending is None
    old = smi_runner([t4], unknown=("compute_cap",))  # a driver too old for most fields
    (gpu_old,) = gs.SmiProbe("nvidia-smi", old).gpus()
    assert (gpu_old.name, gpu_old.memory_mib, gpu_old.throttle) == ("Tesla T4", 15360, None)


def test_smi_probe_reports_a_failing_nvidia_smi():
    probe = gs.SmiProbe(
        "nvidia-smi",
        lambda args: (
            9,
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n",
        ),
    )
    drv = probe.driver_info()
    assert drv.ok is False and drv.reason.startswith("nvidia-smi failed: NVIDIA-SMI has failed")


def fake_nvml():
    """The pynvml surface NvmlProbe reads, for a Tesla T4 on an R535 driver: no row remapping
    (pre-Ampere), PCIe width not supported, only the old ThrottleReasons getter."""

    class NVMLError(Exception):
        pass

    class NotSupportedError(NVMLError):
        pass

    def not_supported(*_args):
        raise NotSupportedError("Not Supported")

    def ecc(handle, kind, counter):
        assert (kind, counter) == (1, 0)  # uncorrected, volatile
        return 0

    return types.SimpleNamespace(
        NVMLError=NVMLError,
        NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1,
        NVML_VOLATILE_ECC=0,
        nvmlSystemGetDriverVersion=lambda: b"535.261.03",
        nvmlSystemGetCudaDriverVersion_v2=lambda: 12020,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: "Tesla T4",
        nvmlDeviceGetTotalEccErrors=ecc,
        nvmlDeviceGetRemappedRows=not_supported,
        nvmlDeviceGetRetiredPagesPendingStatus=lambda h: 1,
        nvmlDeviceGetCurrentClocksThrottleReasons=lambda h: 0x8,
        nvmlDeviceGetCurrPcieLinkWidth=not_supported,
    )


def test_nvml_probe_guards_unsupported_calls_and_old_names():
    probe = gs.NvmlProbe(fake_nvml())
    drv = probe.driver_info()
    assert (drv.version, drv.cuda, drv.source) == ("535.261.03", "12.2", "NVML")
    (t4,) = probe.gpus()
    assert t4.name == "Tesla T4" and t4.ecc_uncorrected == 0
    assert t4.remap_pending is None and t4.retired_pending is True  # pre-Ampere fallback
    assert t4.throttle == ["hw_slowdown"]  # old ThrottleReasons name when EventReasons is absent
    assert t4.pcie_width is None and t4.notes["pcie_width"] == "Not Supported"


# --------------------------------------------------------------------------- the real thing


def _subprocess_env():
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES",)}
    env.pop("GPU_SMOKE_GPUS_FILE", None)
    return env


def test_real_module_as_subprocess_without_gpu(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi; tests/gpu covers it")
    report_file = tmp_path / "report.json"
    cmd = [sys.executable, str(MODULE), "--json", "--framework", "none"]
    proc = subprocess.run(
        [*cmd, "--report", str(report_file)],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout holds only the JSON
    assert report == json.loads(report_file.read_text())
    assert report["gpu_visible"] is False and report["ok"] is True
    by = checks(report)
    for name in ("gpu.present", "gpu.ecc", "perf.matmul", "perf.copy"):
        assert by[name]["status"] == "skipped", by[name]
    assert report["summary"]["passed"] == 0
    proc = subprocess.run(
        [*cmd, "--require-gpu"],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    present = checks(json.loads(proc.stdout))["gpu.present"]
    assert present["status"] == "failed"
    assert present["detail"].startswith("no NVIDIA GPU visible: ")


@pytest.mark.parametrize("bad", [["--threshold", "abc"], ["--framework", "jax"], ["--nope"]])
def test_bad_usage_exits_2(bad):
    proc = subprocess.run(
        [sys.executable, str(MODULE), *bad],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "usage: gpu-smoke" in proc.stderr


def test_real_torch_adapter_reports_missing_torch(capsys, gpus_json):
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here")
    probe = gs.NoDriver("nvidia-smi not found and NVML unavailable (pynvml not installed)")
    rc, report = run(["--framework", "torch"], probe, None, capsys=capsys, gpus_file=gpus_json)
    assert rc == 1
    imp = checks(report)["torch.import"]
    assert imp["status"] == "failed" and "not installed" in imp["detail"]


def test_real_torch_without_gpu_runs_cpu_step_and_skips_gpu_checks():
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed here")
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi; tests/gpu covers it")
    cmd = [sys.executable, str(MODULE), "--json", "--framework", "torch"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_subprocess_env(),
                          timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    by = checks(report)
    assert by["torch.import"]["status"] == "passed" and report["versions"]["torch"]
    assert by["torch.train_step_cpu"]["status"] == "passed"
    for name in ("torch.cuda", "torch.cudnn", "torch.nccl", "torch.train_step", "perf.matmul"):
        assert by[name]["status"] == "skipped", by[name]


def test_auto_framework_with_nothing_installed_says_so(capsys, gpus_json):
    if importlib.util.find_spec("torch") or importlib.util.find_spec("mxnet"):
        pytest.skip("a framework is installed here")
    probe = gs.NoDriver("nvidia-smi not found and NVML unavailable (pynvml not installed)")
    rc, report = run([], probe, None, capsys=capsys, gpus_file=gpus_json)
    assert rc == 0
    assert checks(report)["framework"]["detail"].startswith("no deep-learning framework found")


def test_arch_flags_become_compute_capabilities():
    """torch's arch flags (read without a GPU) are what an image's label says it runs on."""
    flags = "sm_75 sm_80 sm_86 sm_90 sm_90a sm_100 sm_120 compute_120"
    assert gs.archs(flags) == ["7.5", "8.0", "8.6", "9.0", "10.0", "12.0"]
    assert gs.archs("") == []
