"""gpu-smoke: check that this machine's NVIDIA GPUs and deep-learning framework work.

Single file, standard library only; torch, mxnet, pynvml (nvidia-ml-py) and PyYAML are used
when present. Installed into every gpubake image as the `gpu-smoke` command.

Exit status: 0 when every check that ran passed, 1 when any failed, 2 for bad usage.
Skipped checks never count as passed. Without a GPU the CPU-side checks run and the GPU checks
are reported as skipped (failed with --require-gpu).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
NO_GPU = "no GPU visible"
DEFAULT_GPUS_FILE = "/etc/gpubake/gpus.json"
# NVML clocks event (formerly "throttle") reason bits, nvmlClocksEventReasons.
# bit i of the mask is THROTTLE_NAMES[i]: 0x1 gpu_idle ... 0x8 hw_slowdown ... 0x400 reliability
THROTTLE_NAMES = ("gpu_idle", "applications_clocks", "sw_power_cap", "hw_slowdown", "sync_boost",
                  "sw_thermal", "hw_thermal", "hw_power_brake", "display_clocks", "board_limit",
                  "reliability")  # fmt: skip
THROTTLE_BAD = ("hw_slowdown", "hw_thermal", "hw_power_brake")
THROTTLE_QUIET = ("gpu_idle", "applications_clocks", "sw_power_cap")
# Gpu integer fields: (NVML getter, nvidia-smi --query-gpu field)
INT_FIELDS = {
    "memory_mib": ("", "memory.total"),
    "pcie_gen": ("nvmlDeviceGetCurrPcieLinkGeneration", "pcie.link.gen.current"),
    "pcie_gen_max": ("nvmlDeviceGetMaxPcieLinkGeneration", "pcie.link.gen.max"),
    "pcie_width": ("nvmlDeviceGetCurrPcieLinkWidth", "pcie.link.width.current"),
    "pcie_width_max": ("nvmlDeviceGetMaxPcieLinkWidth", "pcie.link.width.max"),
    "ecc_uncorrected": ("", "ecc.errors.uncorrected.volatile.total"),
}
SMI_CORE_FIELDS = "index,uuid,name,driver_version,memory.total"
SMI_FIELDS = (
    ",".join(
        ("index,uuid,name,driver_version,compute_cap", *(f for _getter, f in INT_FIELDS.values()))
    )
    + ",retired_pages.pending,clocks_throttle_reasons.active"
)


# --------------------------------------------------------------------------- records


@dataclass
class Check:
    name: str
    status: str
    detail: str = ""
    value: float | None = None
    expected: float | None = None
    unit: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "status": self.status, "detail": self.detail}
        for key in ("value", "expected", "unit"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass
class Gpu:
    """One GPU as the driver (NVML or nvidia-smi) reports it; None means unknown."""

    index: int
    name: str
    uuid: str = ""
    memory_mib: int | None = None
    compute_capability: str | None = None
    pcie_gen: int | None = None
    pcie_gen_max: int | None = None
    pcie_width: int | None = None
    pcie_width_max: int | None = None
    ecc_uncorrected: int | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    retired_pending: bool | None = None
    throttle: list[str] | None = None
    notes: dict[str, str] = field(default_factory=dict)  # why a field is unknown
    model_key: str | None = None


@dataclass
class Driver:
    ok: bool
    reason: str = ""  # why not ok
    version: str | None = None
    cuda: str | None = None  # highest CUDA version the driver supports, "13.0"
    source: str = ""  # "NVML" or "nvidia-smi"


# --------------------------------------------------------------------------- driver probes


class Probe(Protocol):
    def driver_info(self) -> Driver: ...
    def gpus(self) -> list[Gpu]: ...


class NoDriver:
    def __init__(self, reason: str) -> None:
        self.reason = reason

    def driver_info(self) -> Driver:
        return Driver(ok=False, reason=self.reason)

    def gpus(self) -> list[Gpu]:
        return []


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_int(version: int) -> str:
    return f"{version // 1000}.{(version % 1000) // 10}"


class NvmlProbe:
    """The driver through pynvml (nvidia-ml-py); nvmlInit must already have succeeded."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml

    def _call(self, gpu: Gpu, key: str, fn_names: tuple[str, ...], *args: Any) -> Any:
        """First of fn_names that exists and answers; None (reason in gpu.notes) otherwise."""
        for fn_name in fn_names:
            fn = getattr(self.nvml, fn_name, None)
            if fn is None:
                gpu.notes.setdefault(key, f"{fn_name} not in this pynvml")
                continue
            try:
                return fn(*args)
            except self.nvml.NVMLError as exc:  # NotSupported, FunctionNotFound, ...
                gpu.notes[key] = _text(exc) or type(exc).__name__
        return None

    def driver_info(self) -> Driver:
        nv = self.nvml
        cuda = None
        for fn_name in ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"):
            try:
                cuda = _cuda_int(int(getattr(nv, fn_name)()))
                break
            except (AttributeError, nv.NVMLError):
                continue
        try:
            version = _text(nv.nvmlSystemGetDriverVersion())
        except nv.NVMLError as exc:
            return Driver(ok=False, reason=f"NVML cannot read the driver version: {_text(exc)}")
        return Driver(ok=True, version=version, cuda=cuda, source="NVML")

    def gpus(self) -> list[Gpu]:
        nv, out = self.nvml, []
        for index in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(index)
            gpu = Gpu(index=index, name=_text(nv.nvmlDeviceGetName(h)))
            gpu.uuid = _text(self._call(gpu, "uuid", ("nvmlDeviceGetUUID",), h) or "")
            mem = self._call(gpu, "memory", ("nvmlDeviceGetMemoryInfo",), h)
            gpu.memory_mib = int(mem.total) // 2**20 if mem is not None else None
            cc = self._call(gpu, "cc", ("nvmlDeviceGetCudaComputeCapability",), h)
            gpu.compute_capability = f"{cc[0]}.{cc[1]}" if cc else None
            for attr, (getter, _smi_field) in INT_FIELDS.items():
                if getter:
                    setattr(gpu, attr, self._call(gpu, attr, (getter,), h))
            ecc_args = (h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC)
            gpu.ecc_uncorrected = self._call(
                gpu, "ecc", ("nvmlDeviceGetTotalEccErrors",), *ecc_args
            )
            rows = self._call(gpu, "remap", ("nvmlDeviceGetRemappedRows",), h)
            if rows is not None:  # (corrected, uncorrected, pending, failure)
                gpu.remap_pending, gpu.remap_failure = bool(rows[2]), bool(rows[3])
            else:  # before Ampere: dynamic page retirement
                pending = self._call(gpu, "retired", ("nvmlDeviceGetRetiredPagesPendingStatus",), h)
                gpu.retired_pending = None if pending is None else bool(pending)
            getters = ("nvmlDeviceGetCurrentClocksEventReasons",)  # renamed in R535
            getters += ("nvmlDeviceGetCurrentClocksThrottleReasons",)
            mask = self._call(gpu, "throttle", getters, h)
            gpu.throttle = None if mask is None else throttle_names(int(mask))
            out.append(gpu)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()


Runner = Callable[[list[str]], tuple[int, str]]


def run_command(args: list[str]) -> tuple[int, str]:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return 127, str(exc)
    return proc.returncode, proc.stdout + proc.stderr


def _smi_value(raw: str) -> str | None:
    raw = raw.strip()
    if not raw or raw.startswith("[") or raw.upper() in ("N/A", "NOT SUPPORTED"):
        return None
    return raw


def _smi_int(raw: str | None) -> int | None:
    try:
        return int(float(raw)) if raw is not None else None
    except ValueError:
        return None


def _smi_bool(raw: str | None) -> bool | None:
    low = (raw or "").lower()
    return True if low in ("yes", "1", "true") else False if low in ("no", "0", "false") else None


class SmiProbe:
    """The driver through the nvidia-smi command (no pynvml)."""

    def __init__(self, smi: str = "nvidia-smi", runner: Runner = run_command) -> None:
        self.smi, self.run = smi, runner

    def driver_info(self) -> Driver:
        rc, out = self.run([self.smi])
        if rc != 0:
            first = next((ln.strip() for ln in out.splitlines() if ln.strip()), f"exit {rc}")
            return Driver(ok=False, reason=f"nvidia-smi failed: {first}")
        ver = re.search(r"Driver Version:\s*([\w.]+)", out)
        cuda = re.search(r"CUDA Version:\s*([\d.]+)", out)
        return Driver(
            ok=True,
            version=ver.group(1) if ver else None,
            cuda=cuda.group(1) if cuda else None,
            source="nvidia-smi",
        )

    def _query(self, option: str, fields: str) -> list[dict[str, str | None]] | None:
        rc, out = self.run([self.smi, f"{option}={fields}", "--format=csv,noheader,nounits"])
        if rc != 0:
            return None
        names = fields.split(",")
        rows = [r for r in csv.reader(out.splitlines(), skipinitialspace=True) if r]
        if any(len(r) != len(names) for r in rows):
            return None
        return [{k: _smi_value(v) for k, v in zip(names, r, strict=True)} for r in rows]

    def gpus(self) -> list[Gpu]:
        rows = self._query("--query-gpu", SMI_FIELDS)
        if rows is None:  # newer drivers renamed throttle reasons; older lack some fields
            alt = SMI_FIELDS.replace("clocks_throttle_reasons", "clocks_event_reasons")
            rows = self._query("--query-gpu", alt)
            if rows is not None:
                for row in rows:
                    row["clocks_throttle_reasons.active"] = row["clocks_event_reasons.active"]
        if rows is None:
            rows = self._query("--query-gpu", SMI_CORE_FIELDS) or []
        remaps = {
            r["gpu_uuid"]: r
            for r in self._query(
                "--query-remapped-rows", "gpu_uuid,remapped_rows.pending,remapped_rows.failure"
            )
            or []
        }
        out = []
        for pos, row in enumerate(rows):
            idx = _smi_int(row.get("index"))
            gpu = Gpu(index=pos if idx is None else idx, name=row.get("name") or "?")
            gpu.uuid, gpu.compute_capability = row.get("uuid") or "", row.get("compute_cap")
            for attr, (_getter, smi_field) in INT_FIELDS.items():
                setattr(gpu, attr, _smi_int(row.get(smi_field)))
            if gpu.ecc_uncorrected is None:
                gpu.notes["ecc"] = "N/A (ECC unsupported or disabled)"
            gpu.retired_pending = _smi_bool(row.get("retired_pages.pending"))
            remap = remaps.get(gpu.uuid) or {}
            gpu.remap_pending = _smi_bool(remap.get("remapped_rows.pending"))
            gpu.remap_failure = _smi_bool(remap.get("remapped_rows.failure"))
            mask = row.get("clocks_throttle_reasons.active")
            try:
                gpu.throttle = throttle_names(int(mask, 16)) if mask else None
            except ValueError:
                gpu.throttle = None
            out.append(gpu)
        return out


def system_probe() -> Probe:
    """NVML when pynvml loads and initialises, else nvidia-smi, else NoDriver."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        nvml_why = "pynvml not installed"
    else:
        try:
            pynvml.nvmlInit()
            return NvmlProbe(pynvml)
        except Exception as exc:
            nvml_why = f"NVML: {_text(exc)}"
    smi = shutil.which("nvidia-smi")
    if smi:
        return SmiProbe(smi)
    return NoDriver(f"nvidia-smi not found and NVML unavailable ({nvml_why})")


def throttle_names(mask: int) -> list[str]:
    return [name for bit, name in enumerate(THROTTLE_NAMES) if mask & (1 << bit)]


def visible_gpus(gpus: list[Gpu], env: dict[str, str]) -> tuple[list[Gpu], str]:
    """Apply CUDA_VISIBLE_DEVICES the way the CUDA runtime does; returns (gpus, why-none)."""
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return gpus, ""
    if cvd.strip() == "":
        return [], "CUDA_VISIBLE_DEVICES is empty"
    tokens = [t.strip() for t in cvd.split(",")]
    if any(t.startswith("MIG-") for t in tokens):
        return gpus, ""  # MIG instances are not mapped to NVML devices here
    chosen: list[Gpu] = []
    for tok in tokens:  # like CUDA: the list ends at the first entry that names no device
        if re.fullmatch(r"-?\d+", tok):
            hit = next((g for g in gpus if g.index == int(tok)), None)
        elif tok.startswith("GPU-"):
            hit = next((g for g in gpus if g.uuid and g.uuid.startswith(tok)), None)
        else:
            hit = None
        if hit is None:
            break
        if hit not in chosen:
            chosen.append(hit)
    return chosen, "" if chosen else f"CUDA_VISIBLE_DEVICES={cvd} selects no GPU"


# --------------------------------------------------------------------------- expected figures


def read_gpus_file(path: str) -> tuple[dict[str, Any] | None, str, bool]:
    """A gpus.json / gpus.yml as a dict; returns (data, why-none, is-broken)."""
    p = Path(path)
    if not p.is_file():
        return None, f"no expected figures (gpus file {path} not found)", False
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix in (".yml", ".yaml"):
            try:
                import yaml  # type: ignore[import-untyped]
            except ImportError:
                return None, f"no expected figures (PyYAML needed to read {path})", False
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        return None, f"cannot read gpus file {path}: {exc}", True
    if not isinstance(data, dict):
        return None, f"gpus file {path} is not a mapping", True
    return data, "", False


def load_models(path: str) -> tuple[dict[str, Any] | None, str, bool]:
    """The `gpus` mapping of a gpus.json / gpus.yml; returns (models, why-none, is-broken)."""
    data, why, broken = read_gpus_file(path)
    if data is None:
        return None, why, broken
    models = data.get("gpus")
    if not isinstance(models, dict):
        return None, f"gpus file {path} has no 'gpus' mapping", True
    return models, "", False


def _bounded(hay: str, start: int, pat: str) -> bool:
    """A match must not cut a word at its start nor a number at its end ("L4" vs "L40S")."""
    before = hay[start - 1] if start > 0 else " "
    end = start + len(pat)
    after = hay[end] if end < len(hay) else " "
    return not (pat[0].isalnum() and before.isalnum()) and not (
        pat[-1].isdigit() and after.isdigit()
    )


def match_model(name: str, models: dict[str, Any]) -> str | None:
    """Key of the first model one of whose `match` strings occurs in name (case-insensitive)."""
    hay = name.lower()
    for key, spec in models.items():
        for pat in (spec or {}).get("match") or []:
            pat = str(pat).lower()
            at = hay.find(pat)
            while pat and at != -1:
                if _bounded(hay, at, pat):
                    return key
                at = hay.find(pat, at + 1)
    return None


def judge(
    figure: str, unit: str, measured: float, expected: float | None, threshold: float, model: str
) -> tuple[bool, str]:
    """(ok, detail) for a measured figure against threshold * expected."""
    if not expected:
        return True, f"{figure} {measured:.1f} {unit}; no expected figures for {model}"
    pct = f"{round(threshold * 100, 2):g}%"
    ok = measured >= threshold * expected * (1 - 1e-9)  # at the threshold passes
    op = ">=" if ok else "<"
    return ok, f"{figure} {measured:.1f} {unit} {op} {pct} of {expected:g} expected for {model}"


def _version_tuple(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text or "")[:3])


# --------------------------------------------------------------------------- frameworks


class TorchAdapter:
    """Everything gpu-smoke asks of PyTorch; tests replace it with a fake of the same shape."""

    name = "torch"

    def __init__(self) -> None:
        self.torch: Any = None

    def import_info(self) -> dict[str, Any]:
        import torch  # type: ignore[import-not-found]

        self.torch = torch
        # the GPU architectures the wheel's kernels are built for (no GPU needed to read)
        flags = getattr(torch._C, "_cuda_getArchFlags", lambda: "")() or ""
        return {"version": torch.__version__, "cuda": torch.version.cuda, "archs": archs(flags)}

    def cuda_info(self) -> dict[str, Any]:
        available = bool(self.torch.cuda.is_available())
        return {"available": available, "count": self.torch.cuda.device_count() if available else 0}

    def cudnn_info(self) -> dict[str, Any]:
        cudnn = self.torch.backends.cudnn
        available = bool(cudnn.is_available())
        return {"available": available, "version": cudnn_version(cudnn.version() or 0)}

    def nccl_info(self) -> dict[str, Any]:
        t = self.torch
        dist = bool(t.distributed.is_available() and t.distributed.is_nccl_available())
        ver = t.cuda.nccl.version()
        ver = ".".join(str(x) for x in ver) if isinstance(ver, tuple) else str(ver)
        return {"version": ver, "distributed": dist}

    def capability(self, device: int) -> tuple[int, int]:
        return tuple(self.torch.cuda.get_device_capability(device))  # type: ignore[return-value]

    def train_step(self, device: str) -> tuple[float, float]:
        """One SGD step of a tiny conv + MLP net; (loss before, loss after)."""
        t, nn = self.torch, self.torch.nn
        gen = t.Generator().manual_seed(0)
        x = t.randn(16, 3, 8, 8, generator=gen).to(device)
        y = t.randint(0, 10, (16,), generator=gen).to(device)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(512, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        ).to(device)
        opt = t.optim.SGD(model.parameters(), lr=0.05)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with t.no_grad():
            after = nn.functional.cross_entropy(model(x), y)
        return float(loss.item()), float(after.item())

    def allreduce(self, n: int) -> list[float]:
        """NCCL all-reduce (sum) of one tensor per device; every device's resulting values."""
        t = self.torch
        tensors = [t.full((1 << 20,), float(i + 1), device=f"cuda:{i}") for i in range(n)]
        t.cuda.nccl.all_reduce(tensors)
        for i in range(n):
            t.cuda.synchronize(i)
        return [float(x.min().item()) for x in tensors] + [float(x.max().item()) for x in tensors]

    def free_memory(self, device: int) -> int:
        self.torch.cuda.empty_cache()  # return what earlier checks cached
        return int(self.torch.cuda.mem_get_info(device)[0])

    def _time_ms(self, device: int, fn: Callable[[], Any], runs: int, warm_s: float) -> float:
        """Median milliseconds of fn over `runs` CUDA-event-timed runs, after warming up."""
        t = self.torch
        with t.cuda.device(device):
            begin, done = time.monotonic(), 0
            while done < 3 or time.monotonic() - begin < warm_s:  # let the clocks ramp up
                fn()
                done += 1
                if done % 3 == 0:
                    t.cuda.synchronize()
            events = [
                (t.cuda.Event(enable_timing=True), t.cuda.Event(enable_timing=True))
                for _run in range(runs)
            ]
            for start, end in events:
                start.record()
                fn()
                end.record()
            t.cuda.synchronize()
            return statistics.median(s.elapsed_time(e) for s, e in events)

    def matmul_tflops(self, dtype: str, n: int, device: int) -> float:
        t = self.torch
        dt = {"bf16": t.bfloat16, "fp16": t.float16, "fp32": t.float32}[dtype]
        a, b = (t.randn(n, n, device=f"cuda:{device}", dtype=dt) for _operand in range(2))
        c = t.empty(n, n, device=f"cuda:{device}", dtype=dt)
        ms = self._time_ms(device, lambda: t.matmul(a, b, out=c), runs=20, warm_s=0.3)
        return 2.0 * n**3 / (ms / 1e3) / 1e12

    def copy_gbps(self, nbytes: int, device: int) -> float:
        t = self.torch
        src = t.randint(0, 256, (nbytes,), dtype=t.uint8, device=f"cuda:{device}")
        dst = t.empty_like(src)
        ms = self._time_ms(device, lambda: dst.copy_(src), runs=15, warm_s=0.1)
        return 2.0 * nbytes / (ms / 1e3) / 1e9  # bytes read + bytes written


def archs(flags: str) -> list[str]:
    """Compute capabilities of a build's arch flags, e.g. "sm_75 sm_90a sm_120" ->
    ["7.5", "9.0", "12.0"] (PTX-only "compute_XX" entries left out)."""
    found = {m.group(1) for m in re.finditer(r"\bsm_(\d+)", flags)}
    ccs = sorted((int(n[:-1]), int(n[-1])) for n in found if len(n) >= 2)
    return [f"{major}.{minor}" for major, minor in ccs]


def cudnn_version(v: int) -> str | None:
    if not v:
        return None
    if v >= 90000:  # cuDNN 9: major*10000 + minor*100 + patch
        return f"{v // 10000}.{(v % 10000) // 100}.{v % 100}"
    return f"{v // 1000}.{(v % 1000) // 100}.{v % 100}"


def mxnet_dist_cuda(dist_name: str) -> str | None:
    """CUDA version an MXNet wheel was built for, from its name: mxnet-cu117 -> 11.7."""
    m = re.fullmatch(r"mxnet[-_]cu(\d+)(\d)", dist_name.lower())
    return f"{m.group(1)}.{m.group(2)}" if m else None


class MxnetAdapter:
    """MXNet, inspected without importing it when the driver's libcuda.so.1 is missing."""

    name = "mxnet"

    def installed(self) -> bool:
        return importlib.util.find_spec("mxnet") is not None

    def libcuda(self) -> tuple[bool, str]:
        try:
            ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            return False, str(exc)
        return True, ""

    def library(self) -> Path | None:
        spec = importlib.util.find_spec("mxnet")
        for loc in (spec.submodule_search_locations or []) if spec else []:
            lib = Path(loc) / "libmxnet.so"
            if lib.is_file():
                return lib
        return None

    def missing_libs(self, lib: Path) -> list[str]:
        """Libraries ldd cannot resolve for libmxnet.so."""
        ldd = shutil.which("ldd")
        if not ldd:
            raise RuntimeError("ldd not found")
        rc, out = run_command([ldd, str(lib)])
        if rc != 0:
            raise RuntimeError(f"ldd {lib} failed: {out.strip()[:200]}")
        return [ln.split("=>")[0].strip() for ln in out.splitlines() if "not found" in ln]

    def built_cuda(self) -> str | None:
        names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
        return next((v for v in map(mxnet_dist_cuda, names) if v), None)

    def import_info(self) -> dict[str, Any]:
        import mxnet  # type: ignore[import-not-found]

        return {"version": mxnet.__version__, "cuda": self.built_cuda()}

    def gpu_array_sum(self) -> float:
        from mxnet import np, npx  # type: ignore[import-not-found]

        npx.set_np()
        a = np.zeros((1024, 1024), ctx=npx.gpu())
        return float((a + 1).sum())


class TensorflowAdapter:
    """TensorFlow: its build (CUDA, cuDNN), the GPUs it sees, a matmul on a device."""

    name = "tensorflow"
    size = 256

    def import_info(self) -> dict[str, Any]:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # its start-up notices, not errors
        import tensorflow as tf  # type: ignore[import-not-found]

        build = dict(tf.sysconfig.get_build_info())
        return {
            "version": tf.__version__,
            "cuda": build.get("cuda_version"),
            "cudnn": build.get("cudnn_version"),
        }

    def gpu_names(self) -> list[str]:
        import tensorflow as tf  # type: ignore[import-not-found]

        return [d.name for d in tf.config.list_physical_devices("GPU")]

    def matmul(self, device: str) -> tuple[float, str]:
        """(sum of ones(n, n) @ ones(n, n), the device it ran on): n**3 when right."""
        import tensorflow as tf  # type: ignore[import-not-found]

        with tf.device(device):
            ones = tf.ones((self.size, self.size))
            product = tf.linalg.matmul(ones, ones)
        return float(tf.reduce_sum(product).numpy()), product.device


# --------------------------------------------------------------------------- check names

# Every check gpu-smoke reports, by group; the report lists them in this order.
FRAMEWORK = "framework"
GPU_PRESENT, GPU_COUNT, DRIVER_VERSION = "gpu.present", "gpu.count", "driver.version"
GPU_MODEL, GPU_ECC, GPU_ROW_REMAP = "gpu.model", "gpu.ecc", "gpu.row_remap"
GPU_THROTTLE, GPU_PCIE, CUDA_COMPAT = "gpu.throttle", "gpu.pcie", "driver.cuda_compat"
DRIVER_CHECKS = (GPU_PRESENT, GPU_COUNT, DRIVER_VERSION, GPU_MODEL, GPU_ECC, GPU_ROW_REMAP,
                 GPU_THROTTLE, GPU_PCIE, CUDA_COMPAT)  # fmt: skip
TORCH_IMPORT, TORCH_CUDA, TORCH_CUDNN, TORCH_NCCL = (
    "torch.import", "torch.cuda", "torch.cudnn", "torch.nccl"
)  # fmt: skip
TORCH_TRAIN_CPU, TORCH_TRAIN_GPU = "torch.train_step_cpu", "torch.train_step"
TORCH_ALLREDUCE = "torch.allreduce"
TORCH_CHECKS = (TORCH_IMPORT, TORCH_CUDA, TORCH_CUDNN, TORCH_NCCL, TORCH_TRAIN_CPU,
                TORCH_TRAIN_GPU, TORCH_ALLREDUCE)  # fmt: skip
MXNET_IMPORT, MXNET_LIBS, MXNET_GPU_ARRAY = "mxnet.import", "mxnet.libs", "mxnet.gpu_array"
MXNET_CHECKS = (MXNET_LIBS, MXNET_IMPORT, MXNET_GPU_ARRAY)
TF_IMPORT, TF_MATMUL_CPU = "tensorflow.import", "tensorflow.matmul_cpu"
TF_GPUS, TF_MATMUL_GPU = "tensorflow.gpus", "tensorflow.matmul"
TF_CHECKS = (TF_IMPORT, TF_MATMUL_CPU, TF_GPUS, TF_MATMUL_GPU)
PERF_MATMUL, PERF_COPY = "perf.matmul", "perf.copy"
PERF_CHECKS = (PERF_MATMUL, PERF_COPY)


# --------------------------------------------------------------------------- the checks


class Smoke:
    """One run of gpu-smoke: the state the check groups share (what was found, the checks so
    far) and the order they run in: driver, then the framework's (torch or mxnet), then perf."""

    def __init__(self, opts: argparse.Namespace, probe: Probe, fw: Any, env: dict[str, str]):
        self.opts, self.probe, self.fw, self.env = opts, probe, fw, env
        self.checks: list[Check] = []
        keys = ("driver", "cuda_driver", "torch", "torch_cuda", "cudnn", "nccl", "mxnet")
        keys += ("tensorflow",)
        self.versions: dict[str, str | None] = {"python": platform.python_version()}
        self.versions.update(dict.fromkeys(keys))
        self.models, self.models_why, self.models_broken = load_models(opts.gpus_file)
        data = read_gpus_file(opts.gpus_file)[0] or {}
        # minimum driver per CUDA major: minor-version compatibility
        self.cuda_table: dict[str, Any] = data.get("cuda") or {}
        self.gpus: list[Gpu] = []
        self.why_no_gpu = ""
        self.driver = Driver(ok=False)
        self.fw_cuda: str | None = None
        self.torch_gpu_ok = False
        self.driver_group = DriverChecks(self)

    def add(self, name: str, status: str, detail: str = "", **numbers: Any) -> Check:
        check = Check(name, status, detail, **numbers)
        self.checks.append(check)
        return check

    def guard(self, name: str, fn: Callable[[], Any], soft: bool = False) -> None:
        """Run fn (which adds its own check); an exception becomes a failed check, or with
        soft (a check that could not be exercised anyway) a skipped one."""
        try:
            fn()
        except Exception as exc:
            msg = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            self.add(name, SKIPPED if soft else FAILED, f"{NO_GPU}; {msg}" if soft else msg)

    @property
    def visible(self) -> bool:
        return bool(self.gpus)

    def run(self) -> None:
        self.driver_group.run()
        if self.fw is None:
            if self.opts.framework == "auto":
                self.add(
                    FRAMEWORK,
                    SKIPPED,
                    "no deep-learning framework found (torch, mxnet, tensorflow)",
                )
            self.driver_group.cuda_compat()
        elif self.fw.name == "torch":
            TorchChecks(self).run()
        elif self.fw.name == "tensorflow":
            TensorflowChecks(self).run()
        else:
            MxnetChecks(self).run()
        PerfChecks(self).run()


class DriverChecks:
    """Driver side: GPUs present and healthy (ECC, row remaps, clocks, PCIe), the driver's
    version, and the driver's CUDA against the framework's build (CUDA_COMPAT)."""

    def __init__(self, smoke: Smoke) -> None:
        self.s = smoke

    def run(self) -> None:
        try:
            self.s.driver = self.s.probe.driver_info()
            all_gpus = self.s.probe.gpus() if self.s.driver.ok else []
        except Exception as exc:
            self.s.driver = Driver(
                ok=False, reason=f"GPU query failed: {type(exc).__name__}: {exc}"
            )
            all_gpus = []
        self.s.versions["driver"], self.s.versions["cuda_driver"] = (
            self.s.driver.version,
            self.s.driver.cuda,
        )
        self.s.gpus, why = visible_gpus(all_gpus, self.s.env)
        if not why and not self.s.gpus:
            why = (
                self.s.driver.reason
                if not self.s.driver.ok
                else "the NVIDIA driver reports no GPUs"
            )
        self.s.why_no_gpu = f"no NVIDIA GPU visible: {why}" if not self.s.gpus else ""
        if self.s.visible:
            names = ", ".join(sorted({g.name for g in self.s.gpus}))
            self.s.add(GPU_PRESENT, PASSED, f"{len(self.s.gpus)} GPU(s): {names}")
        else:
            self.s.add(
                GPU_PRESENT, FAILED if self.s.opts.require_gpu else SKIPPED, self.s.why_no_gpu
            )
        if self.s.opts.expect_gpus is not None:
            n, want = len(self.s.gpus), self.s.opts.expect_gpus
            if not self.s.visible and not self.s.opts.require_gpu and want > 0:
                self.s.add(GPU_COUNT, SKIPPED, NO_GPU)
            else:
                ok = n == want
                self.s.add(GPU_COUNT, PASSED if ok else FAILED, f"{n} visible, {want} expected")
        if self.s.driver.ok:
            self.s.add(
                DRIVER_VERSION,
                PASSED,
                f"{self.s.driver.version} (CUDA {self.s.driver.cuda}) via {self.s.driver.source}",
            )
        else:
            self.s.add(DRIVER_VERSION, SKIPPED, f"no NVIDIA driver: {self.s.driver.reason}")
        if not self.s.visible:
            for name in (GPU_MODEL, GPU_ECC, GPU_ROW_REMAP, GPU_THROTTLE, GPU_PCIE):
                self.s.add(name, SKIPPED, NO_GPU)
            return
        self.s.guard(GPU_MODEL, self._models)
        self.per_gpu(GPU_ECC, self._ecc)
        self.per_gpu(GPU_ROW_REMAP, self._remap)
        self.per_gpu(GPU_THROTTLE, self._throttle)
        self.per_gpu(GPU_PCIE, self._pcie)

    def _models(self) -> None:
        parts = []
        for g in self.s.gpus:
            g.model_key = match_model(g.name, self.s.models) if self.s.models else None
            mem = f", {g.memory_mib} MiB" if g.memory_mib else ""
            parts.append(f"{g.index}: {g.name} ({g.model_key or 'unknown model'}{mem})")
        self.s.add(GPU_MODEL, PASSED, "; ".join(parts))

    def per_gpu(self, name: str, fn: Callable[[Gpu], tuple[str, str]]) -> None:
        """Fold one (status, detail) per GPU into one check: any failed -> failed, all skipped
        -> skipped, else passed."""
        try:
            results = [(g, *fn(g)) for g in self.s.gpus]
        except Exception as exc:
            self.s.add(name, FAILED, f"{type(exc).__name__}: {exc}")
            return
        statuses = {s for _gpu, s, _detail in results}
        status = FAILED if FAILED in statuses else PASSED if PASSED in statuses else SKIPPED
        self.s.add(name, status, "; ".join(f"GPU {g.index}: {d}" for g, _status, d in results))

    @staticmethod
    def _ecc(g: Gpu) -> tuple[str, str]:
        if g.ecc_uncorrected is None:
            return SKIPPED, f"ECC not reported ({g.notes.get('ecc', 'not supported')})"
        n = g.ecc_uncorrected
        return PASSED if n == 0 else FAILED, f"{n} uncorrected volatile ECC errors"

    @staticmethod
    def _remap(g: Gpu) -> tuple[str, str]:
        if g.remap_failure:
            return FAILED, "row remapping failed (no spare rows left)"
        if g.remap_pending:
            return FAILED, "row remap pending (needs a GPU reset)"
        if g.retired_pending:
            return FAILED, "page retirement pending (needs a GPU reset)"
        if g.remap_pending is None and g.retired_pending is None:
            why = g.notes.get("remap") or g.notes.get("retired") or "not supported"
            return SKIPPED, f"row remapping / page retirement not reported ({why})"
        return PASSED, "no pending row remaps or page retirements"

    @staticmethod
    def _throttle(g: Gpu) -> tuple[str, str]:
        if g.throttle is None:
            return SKIPPED, f"clock event reasons not reported ({g.notes.get('throttle', 'N/A')})"
        bad = [r for r in g.throttle if r in THROTTLE_BAD]
        notable = [r for r in g.throttle if r not in THROTTLE_QUIET]
        if bad:
            return FAILED, "hardware slowdown active: " + ", ".join(bad)
        if "sw_thermal" in notable:
            return PASSED, "warning: software thermal slowdown active (" + ", ".join(notable) + ")"
        return PASSED, "active: " + (", ".join(g.throttle) or "none")

    @staticmethod
    def _pcie(g: Gpu) -> tuple[str, str]:
        if g.pcie_width is None and g.pcie_gen is None:
            return SKIPPED, f"PCIe link not reported ({g.notes.get('pcie_width', 'N/A')})"
        link = f"gen {g.pcie_gen} x{g.pcie_width} (max gen {g.pcie_gen_max} x{g.pcie_width_max})"
        return (FAILED, f"PCIe link width 0: {link}") if g.pcie_width == 0 else (PASSED, link)

    def cuda_compat(self) -> None:
        name = CUDA_COMPAT
        if not self.s.fw_cuda:
            fw = self.s.fw.name if self.s.fw else "none"
            self.s.add(name, SKIPPED, f"no framework CUDA build to compare (framework: {fw})")
        elif not self.s.driver.ok:
            self.s.add(name, SKIPPED, f"no NVIDIA driver: {self.s.driver.reason}")
        elif not self.s.driver.cuda:
            self.s.add(name, SKIPPED, "the driver's CUDA version is unknown")
        else:
            drv, fw = self.s.driver.cuda, self.s.fw_cuda
            detail = (
                f"driver {self.s.driver.version} supports CUDA {drv}, "
                f"{self.s.fw.name} built for CUDA {fw}"
            )
            ok = _version_tuple(drv)[:2] >= _version_tuple(fw)[:2]
            if not ok:
                ok, why = self._minor_compat(drv, fw)
                detail = f"{detail}: {why}"
            self.s.add(name, PASSED if ok else FAILED, detail)

    def _minor_compat(self, drv: str, fw: str) -> tuple[bool, str]:
        """CUDA minor-version compatibility: same major and the major's minimum driver."""
        major = str(_version_tuple(fw)[0])
        minimum = (self.s.cuda_table.get(major) or {}).get("min_driver")
        if _version_tuple(drv)[0] != _version_tuple(fw)[0] or not minimum:
            return False, "driver too old"
        if _version_tuple(self.s.driver.version or "0") >= _version_tuple(str(minimum)):
            return True, (
                f"runs through CUDA minor-version compatibility (CUDA {major}.x needs "
                f"driver >= {minimum})"
            )
        return False, f"driver too old (CUDA {major}.x needs driver >= {minimum})"


class TorchChecks:
    """torch: import, CUDA devices, cuDNN, NCCL, a training step on the CPU and on each GPU,
    an all-reduce over the GPUs."""

    def __init__(self, smoke: Smoke) -> None:
        self.s = smoke

    def run(self) -> None:
        fw = self.s.fw
        try:
            info = fw.import_info()
        except Exception as exc:
            why = "not installed" if isinstance(exc, ModuleNotFoundError) else f"{exc}"
            self.s.add(TORCH_IMPORT, FAILED, f"torch did not import: {type(exc).__name__}: {why}")
            self.s.driver_group.cuda_compat()
            for name in (TORCH_CUDA, TORCH_TRAIN_CPU, TORCH_TRAIN_GPU):
                self.s.add(name, SKIPPED, "torch did not import")
            return
        self.s.versions["torch"], self.s.versions["torch_cuda"] = info["version"], info.get("cuda")
        if info.get("archs"):
            self.s.versions["torch_archs"] = ",".join(info["archs"])
        self.s.fw_cuda = info.get("cuda")
        build = f"CUDA {self.s.fw_cuda}" if self.s.fw_cuda else "CPU-only build"
        self.s.add(TORCH_IMPORT, PASSED, f"torch {info['version']} ({build})")
        self.s.driver_group.cuda_compat()
        self.s.guard(TORCH_CUDA, self._torch_cuda)
        self.s.guard(TORCH_CUDNN, self._torch_cudnn, soft=not self.s.visible)
        self.s.guard(TORCH_NCCL, self._torch_nccl, soft=not self.s.visible)
        self.s.guard(TORCH_TRAIN_CPU, lambda: self._train(["cpu"], TORCH_TRAIN_CPU))
        if not self.s.visible:
            for name in (TORCH_TRAIN_GPU, TORCH_ALLREDUCE):
                self.s.add(name, SKIPPED, NO_GPU)
            return
        if not self.s.torch_gpu_ok:
            for name in (TORCH_TRAIN_GPU, TORCH_ALLREDUCE):
                self.s.add(name, SKIPPED, "torch cannot use the GPU (see torch.cuda)")
            return
        devices = [f"cuda:{i}" for i in range(len(self.s.gpus))]
        self.s.guard(TORCH_TRAIN_GPU, lambda: self._train(devices, TORCH_TRAIN_GPU))
        if len(self.s.gpus) < 2:
            self.s.add(TORCH_ALLREDUCE, SKIPPED, "single GPU")
        else:
            self.s.guard(TORCH_ALLREDUCE, self._allreduce)

    def _torch_cuda(self) -> None:
        info = self.s.fw.cuda_info()
        n, want = info["count"], len(self.s.gpus)
        if not self.s.visible:
            if n:
                self.s.add(TORCH_CUDA, FAILED, f"torch sees {n} GPU(s) but {self.s.why_no_gpu}")
            else:
                self.s.add(TORCH_CUDA, SKIPPED, NO_GPU)
            return
        self.s.torch_gpu_ok = bool(info["available"]) and n > 0
        ok = self.s.torch_gpu_ok and n == want
        detail = f"torch.cuda.is_available()={info['available']}, {n} device(s), {want} visible"
        if not self.s.fw_cuda:
            detail += "; torch is a CPU-only build"
        self.s.add(TORCH_CUDA, PASSED if ok else FAILED, detail)

    def _torch_cudnn(self) -> None:
        info = self.s.fw.cudnn_info()
        self.s.versions["cudnn"] = info["version"]
        found = info["available"] and info["version"]
        if not self.s.visible:  # the library may load, but nothing ran on a GPU
            self.s.add(TORCH_CUDNN, SKIPPED, NO_GPU + (f" (cuDNN {found} found)" if found else ""))
        elif found:
            self.s.add(TORCH_CUDNN, PASSED, f"cuDNN {info['version']}")
        else:
            self.s.add(TORCH_CUDNN, FAILED, "cuDNN not available to torch")

    def _torch_nccl(self) -> None:
        if not self.s.fw_cuda:
            status = FAILED if self.s.visible else SKIPPED
            self.s.add(TORCH_NCCL, status, "torch is a CPU-only build (no NCCL)")
            return
        info = self.s.fw.nccl_info()
        self.s.versions["nccl"] = info["version"]
        ok = info["distributed"]
        detail = f"NCCL {info['version']}, torch.distributed NCCL backend "
        detail += "available" if ok else "MISSING"
        if not self.s.visible:
            self.s.add(TORCH_NCCL, SKIPPED, f"{NO_GPU} ({detail})")
        else:
            self.s.add(TORCH_NCCL, PASSED if ok else FAILED, detail)

    def _train(self, devices: list[str], name: str) -> None:
        losses = [self.s.fw.train_step(d) for d in devices]
        bad = [
            d for d, pair in zip(devices, losses, strict=True) if not all(map(math.isfinite, pair))
        ]
        shown = ", ".join(
            f"{d} loss {a:.3f} -> {b:.3f}" for d, (a, b) in zip(devices, losses, strict=True)
        )
        self.s.add(name, FAILED if bad else PASSED, ("non-finite loss: " if bad else "") + shown)

    def _allreduce(self) -> None:
        n = len(self.s.gpus)
        values, want = self.s.fw.allreduce(n), n * (n + 1) / 2
        ok = all(v == want for v in values)
        detail = f"NCCL all-reduce over {n} GPUs: sum {'=' if ok else '!='} {want:g}"
        self.s.add(TORCH_ALLREDUCE, PASSED if ok else FAILED, detail + ("" if ok else f" {values}"))


class MxnetChecks:
    """MXNet (legacy): its libraries resolve, import, an array on npx.gpu()."""

    def __init__(self, smoke: Smoke) -> None:
        self.s = smoke

    def run(self) -> None:
        fw = self.s.fw
        if not fw.installed():
            self.s.add(MXNET_IMPORT, FAILED, "mxnet not installed")
            self.s.driver_group.cuda_compat()
            return
        has_cuda, cuda_err = fw.libcuda()
        lib = fw.library()
        if lib is None:
            self.s.add(MXNET_LIBS, SKIPPED, "libmxnet.so not found in the mxnet package")
        else:

            def libs() -> None:
                missing = [m for m in fw.missing_libs(lib) if has_cuda or m != "libcuda.so.1"]
                note = "" if has_cuda else " (libcuda.so.1 comes with the NVIDIA driver)"
                if missing:
                    self.s.add(
                        MXNET_LIBS, FAILED, f"{lib.name} cannot resolve: {', '.join(missing)}"
                    )
                else:
                    self.s.add(MXNET_LIBS, PASSED, f"all libraries of {lib.name} resolve{note}")

            self.s.guard(MXNET_LIBS, libs)
        self.s.fw_cuda = fw.built_cuda()
        if not has_cuda:
            self.s.add(
                MXNET_IMPORT,
                SKIPPED,
                "libcuda.so.1 (NVIDIA driver) not present; mxnet-cu1xx cannot load without it",
            )
            self.s.driver_group.cuda_compat()
            self.s.add(MXNET_GPU_ARRAY, SKIPPED, NO_GPU if not self.s.visible else cuda_err)
            return
        try:
            info = fw.import_info()
        except Exception as exc:
            self.s.add(MXNET_IMPORT, FAILED, f"{type(exc).__name__}: {str(exc).strip()[:300]}")
            self.s.driver_group.cuda_compat()
            self.s.add(MXNET_GPU_ARRAY, SKIPPED, "mxnet did not import")
            return
        self.s.versions["mxnet"] = info["version"]
        self.s.fw_cuda = info.get("cuda") or self.s.fw_cuda
        self.s.add(MXNET_IMPORT, PASSED, f"mxnet {info['version']} (CUDA {self.s.fw_cuda})")
        self.s.driver_group.cuda_compat()
        if not self.s.visible:
            self.s.add(MXNET_GPU_ARRAY, SKIPPED, NO_GPU)
            return

        def gpu_array() -> None:
            total, want = fw.gpu_array_sum(), 1024 * 1024
            ok = total == want
            self.s.add(
                MXNET_GPU_ARRAY,
                PASSED if ok else FAILED,
                f"(zeros(1024, 1024) + 1).sum() on npx.gpu() = {total:g}, want {want}",
            )

        self.s.guard(MXNET_GPU_ARRAY, gpu_array)


class TensorflowChecks:
    """TensorFlow: import with its CUDA and cuDNN build (against the driver), a matmul on the
    CPU, the GPUs TensorFlow sees against those visible, a matmul on the first of them."""

    def __init__(self, smoke: Smoke) -> None:
        self.s = smoke

    def run(self) -> None:
        fw = self.s.fw
        try:
            info = fw.import_info()
        except Exception as exc:
            self.s.add(TF_IMPORT, FAILED, f"{type(exc).__name__}: {str(exc).strip()[:300]}")
            self.s.driver_group.cuda_compat()
            for name in TF_CHECKS[1:]:
                self.s.add(name, SKIPPED, "tensorflow did not import")
            return
        self.s.versions["tensorflow"], self.s.versions["cudnn"] = info["version"], info["cudnn"]
        self.s.fw_cuda = info["cuda"]
        built = f"CUDA {info['cuda']}, cuDNN {info['cudnn']}" if info["cuda"] else "no CUDA"
        self.s.add(
            TF_IMPORT, PASSED if info["cuda"] else FAILED, f"tensorflow {info['version']} ({built})"
        )
        self.s.driver_group.cuda_compat()
        self.s.guard(TF_MATMUL_CPU, lambda: self._matmul(TF_MATMUL_CPU, "/CPU:0"))
        if not self.s.visible:
            self.s.add(TF_GPUS, SKIPPED, NO_GPU)
            self.s.add(TF_MATMUL_GPU, SKIPPED, NO_GPU)
            return
        self.s.guard(TF_GPUS, self._gpus)
        if self.s.checks[-1].status != PASSED:
            self.s.add(TF_MATMUL_GPU, SKIPPED, "TensorFlow sees no GPU (see tensorflow.gpus)")
            return
        self.s.guard(TF_MATMUL_GPU, lambda: self._matmul(TF_MATMUL_GPU, "/GPU:0"))

    def _gpus(self) -> None:
        seen, visible = self.s.fw.gpu_names(), len(self.s.gpus)
        ok = len(seen) == visible
        detail = f"TensorFlow sees {len(seen)} of {visible} visible GPU(s)"
        self.s.add(TF_GPUS, PASSED if ok else FAILED, f"{detail}: {', '.join(seen) or 'none'}")

    def _matmul(self, name: str, device: str) -> None:
        total, ran_on = self.s.fw.matmul(device)
        want = float(self.s.fw.size**3)
        kind = device.split(":")[0].strip("/")
        ok = total == want and kind in ran_on.upper()
        detail = (
            f"ones({self.s.fw.size}, {self.s.fw.size}) @ itself on {ran_on or '?'}: sum {total:g}"
        )
        self.s.add(
            name, PASSED if ok else FAILED, detail if ok else f"{detail}, want {want:g} on {kind}"
        )


class PerfChecks:
    """Performance: a bf16/fp16 matmul and a device-to-device copy, against the expected
    figures of the GPU model (images/gpus.yml)."""

    def __init__(self, smoke: Smoke) -> None:
        self.s = smoke

    def run(self) -> None:
        names = (PERF_MATMUL, PERF_COPY)
        models = self.s.models
        skip = ""
        if self.s.opts.skip_perf:
            skip = "--skip-perf"
        elif not self.s.visible:
            skip = NO_GPU
        elif self.s.fw is None or self.s.fw.name != "torch":
            fw = self.s.fw.name if self.s.fw else "none"
            skip = f"performance checks need torch (framework: {fw})"
        elif not self.s.torch_gpu_ok:
            skip = "torch cannot use the GPU (see torch.cuda)"
        elif models is None:
            for name in names:
                self.s.add(name, FAILED if self.s.models_broken else SKIPPED, self.s.models_why)
            return
        if skip:
            for name in names:
                self.s.add(name, SKIPPED, skip)
            return
        self.s.guard(PERF_MATMUL, lambda: self._perf(models, PERF_MATMUL))
        self.s.guard(PERF_COPY, lambda: self._perf(models, PERF_COPY))

    def _perf(self, models: dict[str, Any], name: str) -> None:
        rows = []  # (gpu, ok, detail, measured, expected)
        for pos, g in enumerate(self.s.gpus):  # torch renumbers visible GPUs from 0
            key = g.model_key if g.model_key is not None else match_model(g.name, models)
            exp = ((models.get(key) or {}).get("expected") or {}) if key else {}
            label = f"{key} ({g.name})" if key else g.name
            free = self.s.fw.free_memory(pos)
            if name == PERF_MATMUL:
                dtype = exp.get("matmul_dtype") or self._default_dtype(g, pos)
                size = 4 if dtype == "fp32" else 2
                n = 8192
                while n > 1024 and 3 * n * n * size > free // 2:
                    n //= 2
                measured, unit = self.s.fw.matmul_tflops(dtype, n, pos), "TFLOP/s"
                figure, want = f"{dtype} matmul", exp.get("matmul_tflops")
                if n != 8192:
                    figure += f" ({n}^3)"
            else:
                nbytes = max(min(2 << 30, free // 4) // (1 << 20), 1) << 20
                measured, unit = self.s.fw.copy_gbps(nbytes, pos), "GB/s"
                figure, want = f"d2d copy {nbytes >> 20} MiB", exp.get("copy_gbps")
            ok, detail = judge(figure, unit, measured, want, self.s.opts.threshold, label)
            rows.append((g, ok, detail, measured, want, unit))
        worst = min(rows, key=lambda r: (r[1], r[3] / r[4] if r[4] else math.inf))
        many = len(rows) > 1
        detail = "; ".join(f"GPU {g.index}: {d}" if many else d for g, _ok, d, *_figures in rows)
        status = PASSED if all(r[1] for r in rows) else FAILED
        self.s.add(name, status, detail, value=round(worst[3], 1), expected=worst[4], unit=worst[5])

    def _default_dtype(self, g: Gpu, pos: int) -> str:
        cc = _version_tuple(g.compute_capability) or tuple(self.s.fw.capability(pos))
        return "bf16" if cc >= (8, 0) else "fp16"


# --------------------------------------------------------------------------- report and cli


def pick_framework(choice: str) -> Any:
    if choice == "none":
        return None
    if choice in ("torch", "mxnet", "tensorflow"):
        return {"torch": TorchAdapter, "mxnet": MxnetAdapter, "tensorflow": TensorflowAdapter}[
            choice
        ]()
    # auto: find_spec, not import, so a broken install is reported rather than passed over
    if importlib.util.find_spec("torch") is not None:
        return TorchAdapter()
    if importlib.util.find_spec("mxnet") is not None:
        return MxnetAdapter()
    if importlib.util.find_spec("tensorflow") is not None:
        return TensorflowAdapter()
    return None


def _fraction(text: str) -> float:
    value = float(text)
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError("threshold must be > 0")
    return value


def parse_args(argv: list[str] | None, env: dict[str, str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu-smoke", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print only the JSON report")
    p.add_argument("--require-gpu", action="store_true", help="no visible GPU is a failure")
    p.add_argument(
        "--threshold",
        type=_fraction,
        default=0.70,
        metavar="FRACTION",
        help="fraction of the expected figures to reach (default 0.70)",
    )
    p.add_argument("--expect-gpus", type=int, metavar="N", help="exact number of GPUs expected")
    p.add_argument(
        "--framework", choices=("auto", "torch", "mxnet", "tensorflow", "none"), default="auto"
    )
    p.add_argument(
        "--gpus-file",
        metavar="PATH",
        default=env.get("GPU_SMOKE_GPUS_FILE") or DEFAULT_GPUS_FILE,
        help="expected figures per GPU model (JSON; YAML with PyYAML)",
    )
    p.add_argument("--skip-perf", action="store_true", help="skip the matmul and copy benchmarks")
    p.add_argument("--report", metavar="FILE", help="also write the JSON report to FILE")
    return p.parse_args(argv)


def build_report(smoke: Smoke, duration: float) -> dict[str, Any]:
    counts = {s: sum(c.status == s for c in smoke.checks) for s in (PASSED, FAILED, SKIPPED)}
    gpus = []
    for g in smoke.gpus:
        d = dataclasses.asdict(g)
        d["driver"] = smoke.driver.version
        gpus.append(d)
    return {
        "version": 1,
        "host": socket.gethostname(),
        "duration_s": round(duration, 2),
        "gpu_visible": smoke.visible,
        "no_gpu_reason": smoke.why_no_gpu or None,
        "gpus": gpus,
        "versions": smoke.versions,
        "checks": [c.as_dict() for c in smoke.checks],
        "summary": counts,
        "ok": counts[FAILED] == 0,
    }


def render(report: dict[str, Any]) -> str:
    checks = report["checks"]
    w_name = max([len("CHECK")] + [len(c["name"]) for c in checks])
    lines = [f"{'CHECK':<{w_name}}  {'STATUS':<7}  DETAIL"]
    lines += [f"{c['name']:<{w_name}}  {c['status']:<7}  {c['detail']}" for c in checks]
    s = report["summary"]
    lines.append(
        f"gpu-smoke: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped"
        f" in {report['duration_s']:.1f}s"
    )
    if not report["gpu_visible"]:
        lines.append(f"GPU checks did not run: {report['no_gpu_reason']}")
    lines += [f"FAILED {c['name']}: {c['detail']}" for c in checks if c["status"] == FAILED]
    return "\n".join(lines)


def main(
    argv: list[str] | None = None,
    probe: Probe | None = None,
    framework: Any = None,
    env: dict[str, str] | None = None,
) -> int:
    """Run gpu-smoke. Tests inject probe (driver side), framework (a TorchAdapter- or
    MxnetAdapter-shaped fake; it must have .name) and env (instead of os.environ)."""
    env = dict(os.environ) if env is None else env
    opts = parse_args(argv, env)
    start = time.monotonic()
    own_probe = probe is None
    probe = system_probe() if probe is None else probe
    fw = framework if framework is not None else pick_framework(opts.framework)
    smoke = Smoke(opts, probe, fw, env)
    try:  # with --json, stray prints from frameworks must not corrupt the report
        with contextlib.redirect_stdout(sys.stderr if opts.json else sys.stdout):
            smoke.run()
    finally:
        if own_probe and hasattr(probe, "close"):
            probe.close()
    report = build_report(smoke, time.monotonic() - start)
    text = json.dumps(report, indent=2)
    if opts.report:
        Path(opts.report).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.report).write_text(text + "\n", encoding="utf-8")
    print(text if opts.json else render(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
