"""A lock that changed, a version that does not exist and a hash that is not the index's
each stop `gpubake build` before Packer starts: one line naming the package, nothing built,
no container left. The edited locks are made in a copy of the checkout, whose gpubake runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkout import copy_checkout
from tests.integration.helpers import ROOT, build_containers, build_in

pytestmark = [pytest.mark.docker]
LOCK = Path("images/locks/pytorch/debian-12-x86_64.txt")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return copy_checkout(tmp_path_factory.mktemp("tree"))


def gpubake_build(engine, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    before = build_containers(engine)  # (other workers' tests run containers meanwhile)
    proc = build_in(root, "itest-lock", *args, timeout=600)
    proc.new_containers = build_containers(engine) - before
    return proc


def assert_stopped_before_packer(engine, proc, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]  # one line, before any progress
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.new_containers == set()
    assert not engine.images.list("gpubake/pytorch:itest-lock")


def _rewrite(root: Path, edit) -> None:
    path = root / LOCK
    path.write_text(edit(path.read_text()))


def test_the_copy_runs_its_own_gpubake(tree):
    out = subprocess.run(
        [sys.executable, "-c", "import gpubake; print(gpubake.__file__)"],
        capture_output=True,
        text=True,
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        check=True,
    ).stdout
    assert out.strip() == str(tree / "gpubake" / "__init__.py")


def test_a_lock_edited_by_hand_stops_the_build(engine, tree):
    original = (tree / LOCK).read_text()
    try:
        # another version of one pin, its hashes left as they were
        _rewrite(
            tree, lambda t: re.sub(r"^(filelock)==(\S+)", r"\1==3.0.0", t, count=1, flags=re.M)
        )
        proc = gpubake_build(engine, tree)
        assert_stopped_before_packer(engine, proc, str(LOCK), "edited by hand", "gpubake lock")
    finally:
        (tree / LOCK).write_text(original)


def test_a_hash_the_index_does_not_serve_stops_the_build(engine, tree):
    """A lock whose digests were made to fit (as a tampered copy would): the index check
    finds the hash that is no file of that version."""
    from gpubake.build import locks

    original = (tree / LOCK).read_text()
    try:

        def forge(text: str) -> str:
            head, body = text.split("\n", 3)[:3], text.split("\n", 3)[3]
            body = re.sub(
                r"(^filelock==\S+ \\\n    --hash=sha256:)[0-9a-f]{64}",
                r"\g<1>" + "0" * 64,
                body,
                count=1,
                flags=re.M,
            )
            content = locks._sha256(body)  # the digest a forger would write
            return "\n".join([head[0], head[1], f"# content: {content}", body])

        _rewrite(tree, forge)
        proc = gpubake_build(engine, tree)
        assert_stopped_before_packer(engine, proc, "hash mismatch for filelock", "0000")
    finally:
        (tree / LOCK).write_text(original)


def test_a_version_that_does_not_exist_stops_the_build(engine):
    proc = gpubake_build(engine, ROOT, "--var", "packages.torchvision=0.0.1")
    assert_stopped_before_packer(
        engine, proc, "stack 'pytorch' cannot be resolved on debian-12", "torchvision==0.0.1"
    )


def test_a_stack_pin_the_lock_lacks_stops_the_build(engine, tree):
    """images/stacks.yml changed (a new pin) and the lock was not made again."""
    stacks_yml = tree / "images" / "stacks.yml"
    original = stacks_yml.read_text()
    try:
        stacks_yml.write_text(original.replace('torchvision: "0.29.2"', 'torchvision: "0.29.1"', 1))
        proc = gpubake_build(engine, tree)
        assert_stopped_before_packer(engine, proc, "out of date", "gpubake lock --stack pytorch")
    finally:
        stacks_yml.write_text(original)


def test_a_vm_build_from_a_wheelhouse_installs_the_vms_lock():
    """--wheelhouse on a VM target: the plan installs a lock (the stack's re-resolved with role
    jupyter's JupyterLab, which every VM serves) from the wheelhouse, and the SBOM lists its
    hashes; without it, the stack's pins from the index and no lock. The lock is part of the
    input hash: the two are different images."""

    def planned(*more: str) -> tuple[dict, str]:
        proc = subprocess.run(
            [sys.executable, "-m", "gpubake", "build", "--target", "qemu", "--stack", "pytorch",
             "--os", "debian-12", "--dry-run", "--json", *more],
            cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout), proc.stderr

    plain, _said = planned()
    housed, said = planned("--wheelhouse", "/nonexistent/wheels")  # a dry run fetches nothing
    assert "python_env_wheelhouse" not in plain["ansible_vars"]
    assert plain["ansible_vars"]["manifest_lock_pins"] == {}
    assert housed["ansible_vars"]["python_env_wheelhouse"] == "/var/cache/gpubake-wheels"
    pins = housed["ansible_vars"]["manifest_lock_pins"]
    assert pins["jupyterlab"]["version"] == "4.6.6" and pins["torch"]["version"] == "2.15.0"
    assert all(entry["hashes"] for entry in pins.values())
    assert housed["input_hash"] != plain["input_hash"]
    assert re.search(
        r"the VM's lock: stack pytorch's with role jupyter's jupyterlab==4\.6\.6: \S+\.txt", said
    ), said
    assert not Path("/nonexistent/wheels").exists()
