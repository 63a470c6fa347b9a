"""Fixtures shared by the integration modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.vm_host import VmHost, release_vm_host, shared_vm_host
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


def _uses_vm_host(item: pytest.Item) -> bool:
    return "vm_host" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on the shared VM host run one after another, where the first of them is, so
    its container is removed right after the last of them (pytest_runtest_teardown) instead of
    holding about 13 GB of disk while the image modules build."""
    users = [item for item in items if _uses_vm_host(item)]
    if not users:
        return
    first = items.index(users[0])
    others = [item for item in items if not _uses_vm_host(item)]
    items[:] = others[:first] + users + others[first:]


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if _uses_vm_host(item) and (nextitem is None or not _uses_vm_host(nextitem)):
        release_vm_host()
