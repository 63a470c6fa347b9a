"""The input hash: everything an image is built from, as one sha256.

Same inputs never pay twice: the hash is stored as an image label, and a build
whose hash already exists is skipped.

The files are read from gpubake's data root (resources.data_root(): the repository in a
checkout, gpubake/_data in an installed wheel) by their paths relative to it, symlinks
followed, so a checkout and a wheel of the same commit give the same hash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gpubake.resources import data_root

#: Trees and files (relative to the data root) that shape an image: the roles, the playbooks
#: that order them, the modules they call, the collection's runtime metadata (plugin routing,
#: requires_ansible), the Packer templates and stack data, and Ansible's configuration.
#: galaxy.yml is left out: it describes the collection (authors, tags, version), not an image;
#: the gpubake version is a label of its own.
HASHED_TREES = ("roles", "playbooks", "plugins", "meta", "images")
HASHED_FILES = ("ansible.cfg",)
_SKIP_PARTS = {"__pycache__", ".pytest_cache", "molecule", "tests"}
_SKIP_SUFFIXES = {".pyc", ".pyo", ".md"}


def _skipped(rel: Path) -> bool:
    # hidden entries (editor state, .ansible/ caches) differ between a checkout and a wheel
    return (
        bool(_SKIP_PARTS.intersection(rel.parts))
        or rel.suffix in _SKIP_SUFFIXES
        or any(part.startswith(".") for part in rel.parts)
    )


def input_files(root: Path | None = None) -> list[Path]:
    """Files that change what a build produces, sorted; symlinks are followed."""
    root = data_root() if root is None else root
    files: list[Path] = []
    for tree in HASHED_TREES:
        for path in (root / tree).rglob("*"):
            if not _skipped(path.relative_to(root)) and path.is_file():
                files.append(path)
    files.extend(root / name for name in HASHED_FILES if (root / name).is_file())
    return sorted(files)


def files_digest(root: Path | None = None, files: Iterable[Path] | None = None) -> str:
    """sha256 over the input files' relative paths and contents."""
    root = data_root() if root is None else root
    digest = hashlib.sha256()
    for path in input_files(root) if files is None else files:
        rel = path.relative_to(root).as_posix()
        digest.update(f"file {rel}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
        digest.update(b"\n")
    return digest.hexdigest()


@functools.cache
def data_digest() -> str:
    """files_digest() of the installed data root, once per process (it does not change)."""
    return files_digest(data_root())


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def input_hash(
    resolved: Mapping[str, Any],
    *,
    base_image_id: str,
    files: Iterable[Path] | None = None,
    root: Path | None = None,
    digest_of_files: str | None = None,
) -> str:
    """sha256 over the files (their digest), the resolved plan and the base image id."""
    if digest_of_files is None:
        if root is None and files is None:
            digest_of_files = data_digest()
        else:
            digest_of_files = files_digest(root, files)
    digest = hashlib.sha256()
    digest.update(f"files {digest_of_files}\n".encode())
    digest.update(f"plan {canonical_json(resolved)}\n".encode())
    digest.update(f"base {base_image_id}\n".encode())
    return digest.hexdigest()


#: Files every container stage runs through: the playbooks, the role that orders the roles,
#: the collection's runtime metadata, Ansible's configuration and the Packer templates.
STAGE_COMMON = (
    "playbooks/container_image.yml",
    "playbooks/container.yml",
    "playbooks/smoke.yml",
    "roles/stack",
    "meta/runtime.yml",
    "ansible.cfg",
    "images/docker.pkr.hcl",
    "images/variables.pkr.hcl",
)
_FQCN_RE = re.compile(r"\bgpubake\.gpu\.([a-z_][a-z0-9_]*)")


def _tree_files(root: Path, rel: str) -> list[Path]:
    path = root / rel
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file() and not _skipped(p.relative_to(root))]


def role_closure(roles: Iterable[str], root: Path | None = None) -> tuple[set[str], set[str]]:
    """(roles, modules): `roles` and every role or module of the collection they name by
    FQCN (meta dependencies, include_role, tasks), transitively. The stack role, which names
    every role, is not followed: each stage applies only its own roles."""
    root = data_root() if root is None else root
    found: set[str] = set()
    modules: set[str] = set()
    todo = [r for r in roles if r != "stack"]
    while todo:
        role = todo.pop()
        if role in found:
            continue
        found.add(role)
        for path in _tree_files(root, f"roles/{role}"):
            for name in _FQCN_RE.findall(path.read_text(encoding="utf-8", errors="replace")):
                if (root / "roles" / name).is_dir() and name != "stack":
                    todo.append(name)
                elif (root / "plugins" / "modules" / f"{name}.py").is_file():
                    modules.add(name)
    return found, modules


def stage_files(roles: Iterable[str], root: Path | None = None) -> list[Path]:
    """The files a container stage applying `roles` reads, sorted."""
    root = data_root() if root is None else root
    closure, modules = role_closure(roles, root)
    files: set[Path] = set()
    for rel in (*STAGE_COMMON, *(f"roles/{r}" for r in closure)):
        files.update(_tree_files(root, rel))
    files.update(root / "plugins" / "modules" / f"{m}.py" for m in modules)
    return sorted(files)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's content, read in chunks (wheels, disk images)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
