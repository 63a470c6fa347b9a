"""A copy of the checkout as a clone has it: the files git tracks (the index: new files once
`git add`ed, with their working-tree content), nothing untracked or ignored (no .venv, build
output, caches)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout
    return [name for name in out.decode().split("\0") if name]


def copy_checkout(dest: Path) -> Path:
    """The tracked files of the checkout copied into `dest` (made; a file deleted in the
    working tree but still tracked is left out). Returns `dest`."""
    for name in tracked_files():
        src = ROOT / name
        if not src.is_file() and not src.is_symlink():
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
    return dest
