"""Fixtures shared by the integration modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.vm_host import VmHost, shared_vm_host


@pytest.fixture(scope="session")
def vm_host(engine) -> Iterator[VmHost]:
    """Debian 12 + systemd + sshd, set up twice by `build.py --target ssh` (see vm_host.py)."""
    yield from shared_vm_host(engine)
