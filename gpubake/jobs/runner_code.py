"""The runner's own Python files (role job_runner), used on the laptop too, so the spec rules
and the bucket client have one copy: gpubake_job.parse_spec checks every spec `job run`
writes, gpubake_sync reads and writes the results location (probe, logs, fetch, code)."""

from __future__ import annotations

import functools
import importlib.util
import sys
from types import ModuleType

from gpubake.resources import data_root


def _load(stem: str) -> ModuleType:
    name = f"gpubake._runner_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    path = data_root() / "roles" / "job_runner" / "files" / f"{stem}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@functools.cache
def job_module() -> ModuleType:
    """roles/job_runner/files/gpubake_job.py (parse_spec, SpecError, GCE_ATTRIBUTE)."""
    return _load("gpubake_job")


@functools.cache
def sync_module() -> ModuleType:
    """roles/job_runner/files/gpubake_sync.py (check, upload, download, put_text, SyncError)."""
    return _load("gpubake_sync")
