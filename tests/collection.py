"""The collection gpubake.gpu as a user gets it: `ansible-galaxy collection build` of the
repository root, then `ansible-galaxy collection install --offline` of the tarball."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def galaxy(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(BIN / "ansible-galaxy"), "collection", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def build_tarball(out_dir: Path) -> Path:
    """The collection tarball, built from the checkout into `out_dir`."""
    galaxy("build", "--force", "--output-path", str(out_dir), str(ROOT))
    (tarball,) = out_dir.glob("gpubake-gpu-*.tar.gz")
    return tarball


def install_offline(requirement: Path | str, collections_dir: Path, *, cwd: Path = ROOT) -> Path:
    """Install a tarball (or a requirements.yml, with -r) without any Galaxy server."""
    args = ["-r", str(requirement)] if str(requirement).endswith(".yml") else [str(requirement)]
    galaxy("install", "--offline", "--force", "-p", str(collections_dir), *args, cwd=cwd)
    return collections_dir / "ansible_collections" / "gpubake" / "gpu"
