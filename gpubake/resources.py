"""Where gpubake's data lives: images/, the collection (roles/, playbooks/, plugins/, meta/)
and ansible.cfg, in a checkout and in an installed wheel alike.

A wheel carries them under the package as `gpubake/_data/` (setup.py's build_py puts them
there); a checkout has them at the repository root, beside the package. Ansible finds the
collection `gpubake.gpu` through `collections_path()`, a directory of the shape
`ansible_collections/gpubake/gpu` that links to the data.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from importlib import resources
from pathlib import Path

#: The collection's name, as roles and playbooks are called by FQCN.
NAMESPACE, COLLECTION = "gpubake", "gpu"
FQCN = f"{NAMESPACE}.{COLLECTION}"

#: What the collection holds (the tarball of `ansible-galaxy collection build` too).
COLLECTION_ITEMS = ("galaxy.yml", "meta", "plugins", "playbooks", "roles")
#: What the package needs at run time besides the collection.
DATA_ITEMS = (*COLLECTION_ITEMS, "images", "ansible.cfg")

_MARKER = "galaxy.yml"


@functools.cache
def data_root() -> Path:
    """The directory holding images/, roles/, playbooks/, plugins/, meta/, ansible.cfg."""
    package = Path(str(resources.files("gpubake")))
    for candidate in (package / "_data", package.parent):
        if (candidate / _MARKER).is_file() and (candidate / "images").is_dir():
            return candidate
    raise RuntimeError(  # an installation problem, not a user error
        f"gpubake's data (images/, roles/, galaxy.yml) is neither in {package / '_data'} "
        f"nor in {package.parent}: reinstall gpubake"
    )


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpubake"


@functools.cache
def collections_path() -> Path:
    """A directory for ANSIBLE_COLLECTIONS_PATH in which `gpubake.gpu` is this data root.

    It is a symlink under gpubake's cache, keyed by the data root's path, so a checkout and
    an installed wheel (or two checkouts) never see each other's roles.
    """
    root = data_root()
    key = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    base = cache_dir() / "collections" / key
    link = base / "ansible_collections" / NAMESPACE / COLLECTION
    if not (link.is_symlink() and link.resolve() == root.resolve()):
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{COLLECTION}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(root, target_is_directory=True)
        tmp.replace(link)  # atomic: a concurrent run sees the old link or the new one
    return base


def ansible_env() -> dict[str, str]:
    """The environment that makes ansible-playbook use gpubake's config and collection."""
    return {
        "ANSIBLE_CONFIG": str(data_root() / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(collections_path()),
    }


def source_revision() -> str | None:
    """The git commit of the data root when it is a checkout (an installed wheel has none)."""
    root = data_root()
    if not (root / ".git").exists():  # a wheel inside someone's repository is not that repo
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def project_url() -> str:
    """gpubake's source repository (galaxy.yml `repository`: the one copy)."""
    import yaml

    galaxy = yaml.safe_load((data_root() / "galaxy.yml").read_text(encoding="utf-8"))
    return str(galaxy["repository"])
