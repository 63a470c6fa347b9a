"""The input hash: everything an image is built from, as one sha256.

Same inputs never pay twice: the hash is stored as an image label, and a build
whose hash already exists is skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gpubake import ROOT

#: Trees and files (relative to the repository) that shape an image.
HASHED_TREES = ("roles", "playbooks", "images")
HASHED_FILES = ("ansible.cfg",)
_SKIP_PARTS = {"__pycache__", ".pytest_cache", "molecule", "tests"}
_SKIP_SUFFIXES = {".pyc", ".pyo", ".md"}


def input_files(root: Path = ROOT) -> list[Path]:
    """Files that change what a build produces, sorted; symlinks are followed."""
    files: list[Path] = []
    for tree in HASHED_TREES:
        for path in (root / tree).rglob("*"):
            rel = path.relative_to(root)
            if _SKIP_PARTS.intersection(rel.parts) or path.suffix in _SKIP_SUFFIXES:
                continue
            if path.is_file():
                files.append(path)
    files.extend(root / name for name in HASHED_FILES if (root / name).is_file())
    return sorted(files)


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def input_hash(
    resolved: Mapping[str, Any],
    *,
    base_image_id: str,
    files: Iterable[Path] | None = None,
    root: Path = ROOT,
) -> str:
    """sha256 over the files' paths and contents, the resolved plan and the base image id."""
    digest = hashlib.sha256()
    for path in input_files(root) if files is None else files:
        rel = path.relative_to(root).as_posix()
        digest.update(f"file {rel}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
        digest.update(b"\n")
    digest.update(f"plan {canonical_json(resolved)}\n".encode())
    digest.update(f"base {base_image_id}\n".encode())
    return digest.hexdigest()
