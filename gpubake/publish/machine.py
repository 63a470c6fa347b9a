"""This machine's NVIDIA driver, GPUs and CPU architecture: what decides which image runs here.

Read from `nvidia-smi`, or stated with --driver / --gpu (for another machine, or one whose
GPU is not visible here). GPU facts come from images/gpus.yml through gpubake.stacks.
"""

from __future__ import annotations

import platform
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gpubake import GpubakeError, stacks

QUERY = ("name", "driver_version", "compute_cap")
#: platform.machine() as the OCI architecture names images carry
ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_DRIVER_RE = re.compile(r"^\d{3,4}(?:\.\d{1,3}){0,2}$")
#: a compute capability as nvidia-smi and the labels write it, e.g. 8.6, 10.0
CC_RE = re.compile(r"^\d{1,2}\.\d$")

Runner = Callable[..., subprocess.CompletedProcess[str]]


class MachineError(GpubakeError):
    """A --driver / --gpu that cannot be, or nvidia-smi output that cannot be read."""


@dataclass(frozen=True)
class GpuInfo:
    name: str  # as nvidia-smi prints it, or gpus.yml's name for --gpu
    compute_capability: str  # "9.0"; "" when neither nvidia-smi nor gpus.yml knows it
    key: str | None  # the images/gpus.yml key (h100, t4, ...) when the name matches one


@dataclass(frozen=True)
class Machine:
    driver: str | None  # "580.95.05" (read) or "580" (--driver 580); None: no NVIDIA driver
    gpus: tuple[GpuInfo, ...]
    arch: str  # OCI architecture: amd64 | arm64

    @property
    def driver_branch(self) -> int | None:
        return int(self.driver.split(".")[0]) if self.driver else None


def _matches(name: str, pattern: str) -> bool:
    # whole words only: "NVIDIA L4" must not claim an "NVIDIA L40S"
    return bool(re.search(rf"(?<![A-Za-z0-9]){re.escape(pattern)}(?![A-Za-z0-9])", name, re.I))


def gpu_key(name: str, gpus_data: Mapping[str, Any]) -> str | None:
    """The gpus.yml key whose `match` list names this GPU (the longest match wins)."""
    best: tuple[int, str] | None = None
    for key, raw in gpus_data["gpus"].items():
        for pattern in raw.get("match") or []:
            if _matches(name, pattern) and (best is None or len(pattern) > best[0]):
                best = (len(pattern), key)
    return best[1] if best else None


def parse_nvidia_smi(
    csv_text: str, gpus_data: Mapping[str, Any]
) -> tuple[str | None, tuple[GpuInfo, ...]]:
    """Parse `nvidia-smi --query-gpu=name,driver_version[,compute_cap] --format=csv,noheader`:
    (driver version, one GpuInfo per GPU). Old drivers have no compute_cap column, or print
    [N/A]: then gpus.yml's figure for the matched model is used."""
    driver: str | None = None
    gpus: list[GpuInfo] = []
    for line in csv_text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) not in (2, 3) or not fields[0] or not _DRIVER_RE.match(fields[1]):
            raise MachineError(
                f"cannot read nvidia-smi's line '{line.strip()[:80]}': state the machine with "
                "--driver and --gpu"
            )
        name, version = fields[0], fields[1]
        driver = driver or version
        key = gpu_key(name, gpus_data)
        cc = fields[2] if len(fields) == 3 and CC_RE.match(fields[2]) else ""
        if not cc and key is not None:
            cc = str(gpus_data["gpus"][key]["compute_capability"])
        gpus.append(GpuInfo(name=name, compute_capability=cc, key=key))
    return driver, tuple(gpus)


def _nvidia_smi(runner: Runner) -> tuple[str | None, tuple[GpuInfo, ...]]:
    """Ask nvidia-smi; no binary, no driver loaded or no GPU all mean (None, ())."""
    query = list(QUERY)
    while True:
        try:
            proc = runner(
                ["nvidia-smi", f"--query-gpu={','.join(query)}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None, ()
        # drivers before ~510 do not know compute_cap: ask again without it
        if (
            proc.returncode != 0
            and "compute_cap" in query
            and "compute_cap" in proc.stdout + (proc.stderr or "")
        ):
            query.remove("compute_cap")
            continue
        if proc.returncode != 0:
            return None, ()
        return parse_nvidia_smi(proc.stdout, stacks.gpus_data())


def check_driver(driver: str) -> str:
    value = driver.strip()
    if not _DRIVER_RE.match(value):
        raise MachineError(
            f"--driver '{driver}' is not a driver version: give a branch such as 580 or a "
            "version such as 580.95.05"
        )
    return value


def gpu_from_key(key: str) -> GpuInfo:
    if key.strip().lower() not in stacks.gpu_names():
        raise MachineError(
            f"--gpu '{key}' is unknown: choose one of {', '.join(stacks.gpu_names())}"
        )
    gpu = stacks.get_gpu(key.strip())
    return GpuInfo(name=gpu.name, compute_capability=gpu.compute_capability, key=gpu.key)


def this_arch() -> str:
    machine = platform.machine().lower()
    return ARCHES.get(machine, machine)


def detect(
    driver: str | None = None,
    gpu: str | None = None,
    runner: Runner = subprocess.run,
    *,
    arch: str | None = None,
) -> Machine:
    """This machine, with --driver / --gpu (and arch) overriding what nvidia-smi says. With
    both given nvidia-smi is not run: the machine described may be another one."""
    stated_driver = check_driver(driver) if driver is not None else None
    stated_gpu = gpu_from_key(gpu) if gpu is not None else None
    if arch is not None and arch not in set(ARCHES.values()):
        raise MachineError(f"--arch '{arch}' is unknown: choose amd64 or arm64")
    read_driver, read_gpus = (None, ()) if stated_driver and stated_gpu else _nvidia_smi(runner)
    return Machine(
        driver=stated_driver or read_driver,
        gpus=(stated_gpu,) if stated_gpu else read_gpus,
        arch=arch or this_arch(),
    )
