"""Shared fixtures: the Docker Engine (skip where none runs), a repo-root path; the suite's
workers, order, time report and build audit (tests/suite.py)."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.suite import SuitePlugin

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


def pytest_configure(config: pytest.Config) -> None:
    # A shell without job control starts a background command (`pytest ... &`) with SIGINT
    # ignored, and every child inherits that: the gpubake processes the fault and push tests
    # interrupt with SIGINT would ignore it. The suite gives them SIGINT as a terminal does.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.pluginmanager.register(SuitePlugin(config), "gpubake-suite")


@pytest.hookimpl(tryfirst=True)  # before xdist starts its workers
def pytest_sessionstart(session: pytest.Session) -> None:
    """Containers an interrupted earlier run left stopped are removed, once, by the process
    that runs the session (the VM host's is ~13 GB): a worker doing it could remove another
    worker's container that has just stopped."""
    if hasattr(session.config, "workerinput"):
        return
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except docker.errors.DockerException:  # no engine: the tests that need one skip
        return
    try:
        for box in client.containers.list(all=True, filters={"status": "exited"}):
            if box.name.startswith(TEST_CONTAINER_PREFIXES):
                box.remove(force=True)
    finally:
        client.close()


def pytest_report_header() -> str:
    """The free disk, first: the suite needs tens of GB (images, the VM host, the uv cache),
    and a full disk shows up late and far from its cause."""
    free = shutil.disk_usage("/").free / 2**30
    return f"disk: {free:.0f} GiB free on /"


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
