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


#: Names of the containers the tests start (tests/integration/*helpers.py, test_jobs.py).
TEST_CONTAINER_PREFIXES = (
    "gpubake-test-",
    "gpubake-systemd-",
    "gpubake-sdbuild-",
    "gpubake-jobsd-",
)


def pytest_report_header() -> str:
    """The free disk, first: the suite needs tens of GB (images, the VM host, the uv cache),
    and a full disk shows up late and far from its cause."""
    free = shutil.disk_usage("/").free / 2**30
    return f"disk: {free:.0f} GiB free on /"


@pytest.fixture(scope="session")
def engine() -> Iterator[object]:
    """A session-wide Docker client; tests needing it skip where no engine runs. Containers
    an interrupted earlier session left stopped are removed first (the VM host's is ~13 GB)."""
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env(timeout=900)
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.skip(f"no Docker Engine reachable: {exc}")
    for box in client.containers.list(all=True, filters={"status": "exited"}):
        if box.name.startswith(TEST_CONTAINER_PREFIXES):
            box.remove(force=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def have_packer() -> str:
    path = shutil.which("packer")
    if not path:
        pytest.skip("packer is not installed")
    return path
