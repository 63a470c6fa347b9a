"""gpubake as a user installs it: a wheel built from the checkout, installed (not editable)
into a fresh venv outside the repository."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class WheelInstall:
    wheel: Path
    venv: Path
    #: a directory outside the checkout to run from
    workdir: Path

    @property
    def gpubake(self) -> str:
        return str(self.venv / "bin" / "gpubake")

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def run(self, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.gpubake, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.workdir,
            check=False,
        )


def install_wheel(work: Path) -> WheelInstall:
    """`pip wheel .` of the checkout, then `pip install` of that file into a new venv."""
    dist, venv, workdir = work / "dist", work / "venv", work / "elsewhere"
    workdir.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = dist.glob("gpubake-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    return WheelInstall(wheel=wheel, venv=venv, workdir=workdir)
