"""Fixtures shared by the integration modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.vm_host import VmHost, release_vm_host, shared_vm_host
from tests.suite import uses_vm_host
from tests.wheel import WheelInstall, install_wheel


@pytest.fixture(scope="session")
def vm_host(engine) -> Iterator[VmHost]:
    """Debian 12 + systemd + sshd, set up twice by `build.py --target ssh` (see vm_host.py)."""
    yield from shared_vm_host(engine)


@pytest.fixture(scope="session")
def wheel_install(tmp_path_factory) -> WheelInstall:
    """gpubake built as a wheel and installed (not editable) into a fresh venv; the default
    image of the suite (test_build.py) is built by this install, from outside the checkout."""
    return install_wheel(tmp_path_factory.mktemp("wheel"))


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """The VM host's tests run one after another (one group, tests/suite.py): its container
    (about 13 GB) is removed right after the last of them, not held while images build."""
    if uses_vm_host(item) and (nextitem is None or not uses_vm_host(nextitem)):
        release_vm_host()
