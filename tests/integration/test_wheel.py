"""An installed gpubake works from any directory: the wheel carries roles, playbooks, images.

The fourth command of the issue, `gpubake build --target docker` from this install, is the
suite's default-image build itself (test_build.py's `built` fixture)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.wheel import ROOT

pytestmark = pytest.mark.docker  # the packer test needs nothing, but the fixture is shared


def test_installed_data_comes_from_the_wheel_not_the_checkout(wheel_install):
    code = "from gpubake import resources; print(resources.data_root())"
    out = subprocess.run(
        [wheel_install.python, "-c", code],
        capture_output=True,
        text=True,
        cwd=wheel_install.workdir,
        check=True,
    ).stdout.strip()
    assert out.startswith(str(wheel_install.venv)) and out.endswith("gpubake/_data"), out
    assert not out.startswith(str(ROOT))


def test_stacks_from_the_wheel(wheel_install):
    proc = wheel_install.run("stacks")
    assert proc.returncode == 0, proc.stderr
    assert "pytorch" in proc.stdout and "mxnet" in proc.stdout


def test_dry_run_json_from_the_wheel_matches_the_checkout(wheel_install):
    args = ("build", "--dry-run", "--json")
    proc = wheel_install.run(*args)
    assert proc.returncode == 0, proc.stderr
    from_wheel = json.loads(proc.stdout)
    here = subprocess.run(
        [sys.executable, str(ROOT / "build.py"), *args[1:]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert here.returncode == 0, here.stderr
    from_checkout = json.loads(here.stdout)
    # the same inputs, byte for byte: a wheel's build reuses a checkout's image and back
    assert from_wheel["input_hash"] == from_checkout["input_hash"]
    assert from_wheel["image"] == from_checkout["image"]


def test_render_from_the_wheel_validates_with_packer(wheel_install, have_packer):
    out = wheel_install.workdir / "gcp"
    proc = wheel_install.run(
        "render",
        "--target",
        "gcp-image",
        "--project",
        "my-proj",
        "--zone",
        "us-central1-a",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert list(out.glob("*.auto.pkrvars.hcl")), sorted(p.name for p in out.iterdir())
    validate = subprocess.run(
        [have_packer, "validate", "."], cwd=out, capture_output=True, text=True, check=False
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr


def test_a_sweep_dry_run_from_the_wheel_uses_the_runners_own_spec_rules(wheel_install):
    """gpubake.jobs is in the wheel, and the runner's files it loads come from the wheel too."""
    proc = wheel_install.run(
        "job", "sweep", "--cloud", "gcp", "--project", "demo-proj", "--zone", "us-central1-a",
        "--results", "gs://my-bucket/runs", "--param", "lr=1e-3,1e-4", "--dry-run", "--json",
        "--", "python", "train.py", "--lr", "{lr}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    jobs = json.loads(proc.stdout)["jobs"]
    assert [j["spec"]["params"] for j in jobs] == [{"lr": "1e-3"}, {"lr": "1e-4"}]
    loaded = subprocess.run(
        [wheel_install.python, "-c",
         "from gpubake.jobs.runner_code import job_module; print(job_module().__file__)"],
        capture_output=True, text=True, cwd=wheel_install.workdir, check=False,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr
    assert str(ROOT) not in loaded.stdout and "_data/roles/job_runner" in loaded.stdout


def test_the_wheel_carries_every_sub_package(wheel_install):
    """pyproject finds the packages (no list to forget one in): each of the checkout's is
    imported from the installed wheel, not from the checkout."""
    names = sorted(
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "gpubake").rglob("__init__.py")
        if "_data" not in init.parts
    )
    assert {
        "gpubake",
        "gpubake.build",
        "gpubake.clouds",
        "gpubake.jobs",
        "gpubake.jobs.emit",
        "gpubake.publish",
    } <= set(names)
    code = (
        "import importlib, sys; [print(importlib.import_module(n).__file__) for n in sys.argv[1:]]"
    )
    proc = subprocess.run(
        [wheel_install.python, "-c", code, *names],
        capture_output=True, text=True, cwd=wheel_install.workdir, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert all(str(ROOT) not in line for line in proc.stdout.splitlines()), proc.stdout
    assert len(proc.stdout.splitlines()) == len(names)
