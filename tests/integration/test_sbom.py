"""Role manifest writes the SBOM in a real image, and `gpubake sbom` reads it back.

The role is applied (by FQCN, as role_test.yml does) to a container of the suite's default
image gpubake/pytorch:itest (built by test_build.py; skipped where it is absent), with the
pins of the stack's committed lock, as the finish stage applies it; no image is built.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gpubake import cli, stacks
from gpubake.build import locks
from gpubake.build import plan as plan_mod
from tests.integration.helpers import apply, run_in

pytestmark = pytest.mark.docker
IMAGE = "gpubake/pytorch:itest"
PLAYBOOK = Path(__file__).with_name("role_test.yml")
PREFIX = "gpubake-sbomtest"


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A Docker client that removes nothing but what this module makes."""
    docker = pytest.importorskip("docker")
    try:
        engine = docker.from_env(timeout=900)
        engine.ping()
    except docker.errors.DockerException as exc:
        pytest.skip(f"no Docker Engine reachable: {exc}")
    try:
        engine.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"{IMAGE} is not built (tests/integration/test_build.py builds it)")
    yield engine
    engine.close()


@contextmanager
def _box(engine: Any) -> Iterator[Any]:
    box = engine.containers.run(
        IMAGE,
        ["sleep", "infinity"],
        name=f"{PREFIX}-{uuid.uuid4().hex[:10]}",
        user="root",
        detach=True,
        entrypoint=[],
    )
    try:
        yield box
    finally:
        box.remove(force=True)


def test_manifest_role_writes_an_sbom_gpubake_sbom_reads(client, capsys):
    stack = stacks.resolve()
    lock = locks.check(stack, stacks.machine_arch())
    torch_version, torch_hashes = lock.pins["torch"]
    variables = {
        "roles_under_test": ["manifest"],
        "manifest_sbom_path": plan_mod.SBOM_PATH,
        "manifest_lock_pins": plan_mod.lock_pins(lock),
        "manifest_build": {"stack": stack.name, "target": "docker"},
    }
    tag = f"{PREFIX}/pytorch:{uuid.uuid4().hex[:10]}"
    with _box(client) as box:
        first, output = apply(box, PLAYBOOK, variables, timeout=600)
        second, output = apply(box, PLAYBOOK, variables, timeout=600)
        _rc, dpkg = run_in(box, "dpkg-query", "-W", "-f", "${Version} ${Architecture}", "python3")
        _rc, leftovers = run_in(box, "find", "/tmp", "-name", "*.gpubake-sbom")
        box.commit(*tag.split(":"), changes=[f"LABEL {plan_mod.SBOM_LABEL}={plan_mod.SBOM_PATH}"])
    try:
        capsys.readouterr()
        cli.main(["sbom", tag])
        text = capsys.readouterr().out
    finally:
        client.images.remove(tag)
    assert first["changed"] > 0 and second["changed"] == 0, output[-4000:]
    assert leftovers.strip() == "", "the scratch directory of the lock's pins is removed"
    document = json.loads(text)
    by_name = {}
    for component in document["components"]:
        by_name.setdefault(component["purl"].split("/")[0], {})[component["name"]] = component
    torch = by_name["pkg:pypi"]["torch"]
    assert torch["version"] == torch_version
    assert {h["content"] for h in torch["hashes"]} == {h.split(":", 1)[1] for h in torch_hashes}
    assert torch["purl"] == f"pkg:pypi/torch@{torch_version.replace('+', '%2B')}"
    python3 = by_name["pkg:deb"]["python3"]
    version, arch = dpkg.split()
    assert python3["version"] == version
    assert python3["purl"] == (
        f"pkg:deb/debian/python3@{version.replace('+', '%2B')}?arch={arch}&distro=debian-12"
    )
    assert document["metadata"]["component"]["name"] == "gpubake/pytorch"
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
