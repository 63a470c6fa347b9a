"""Shared fixtures: the Docker Engine (skip where none runs), a repo-root path."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def engine() -> Iterator[object]:
    """A session-wide Docker client; tests needing it skip where no engine runs."""
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env(timeout=900)
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.skip(f"no Docker Engine reachable: {exc}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def have_packer() -> str:
    path = shutil.which("packer")
    if not path:
        pytest.skip("packer is not installed")
    return path
