"""The pytorch-conda path: Miniforge cannot be downloaded here, so it is proven by
check mode here and run for real only where the pinned installer is reachable."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from gpubake import stacks
from gpubake.build.plan import make_plan
from tests.integration.helpers import (
    ROOT,
    ansible_env,
    ansible_playbook,
    apply,
    base_image,
    container,
    run_in,
)

pytestmark = pytest.mark.docker
PLAYBOOK = Path(__file__).with_name("role_test.yml")


def conda_vars() -> dict:
    stack = stacks.resolve("pytorch-conda")
    plan = make_plan(stack, base_image="x", base_image_id="x")
    keep = ("python_env_", "build_ca_")
    return {k: v for k, v in plan.ansible_vars.items() if k.startswith(keep)}


def installer_url() -> str:
    mf = stacks.stacks_data()["stacks"]["pytorch-conda"]["miniforge"]
    return (
        "https://github.com/conda-forge/miniforge/releases/download/"
        f"{mf['version']}/Miniforge3-{mf['version']}-Linux-x86_64.sh"
    )


def reachable(url: str) -> str | None:
    """None when the URL answers (any HTTP status below 400), else why not."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(parts.netloc, timeout=10)
    try:
        conn.request("HEAD", parts.path)
        status = conn.getresponse().status
    except OSError as exc:
        return str(exc)
    finally:
        conn.close()
    return None if status < 400 else f"HTTP {status}"


def test_conda_path_in_check_mode(engine):
    """Check mode walks the whole conda path: pinned URL and checksum, no download."""
    variables = {"roles_under_test": ["python_env"], **conda_vars()}
    vars_file = Path(f"/tmp/gpubake-conda-{os.getpid()}.json")
    vars_file.write_text(json.dumps(variables))
    with container(engine, base_image(engine)) as box:
        # check mode cannot install python3 for Ansible: bootstrap it first for real
        apply(box, PLAYBOOK, {"roles_under_test": []})
        proc = subprocess.run(
            [
                ansible_playbook(),
                "--check",
                "-v",
                "-i",
                f"{box.name},",
                "-e",
                "ansible_connection=community.docker.docker",
                "-e",
                f"@{vars_file}",
                str(PLAYBOOK),
            ],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=ROOT,
            check=False,
            env=ansible_env(),
        )
        rc, _ = run_in(box, "test", "-e", "/opt/miniforge")
    vars_file.unlink()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    mf = stacks.stacks_data()["stacks"]["pytorch-conda"]["miniforge"]
    assert f"would download {installer_url()} and accept it only with" in " ".join(out.split())
    assert mf["sha256"]["x86_64"] in out
    assert "Create the conda environment" in out
    assert rc != 0, "check mode must not install anything"


def test_conda_path_for_real_where_reachable(engine):
    why = reachable(installer_url())
    if why is not None:
        pytest.skip(f"the pinned Miniforge installer cannot be downloaded from here ({why})")
    variables = {"roles_under_test": ["python_env"], **conda_vars()}
    with container(engine, base_image(engine)) as box:
        first, _ = apply(box, PLAYBOOK, variables)
        second, output = apply(box, PLAYBOOK, variables)
        rc, out = run_in(box, "/opt/gpubake/env/bin/python", "--version")
    assert first["changed"] > 0
    assert second["changed"] == 0, output[-4000:]
    assert rc == 0 and out.split()[1].startswith(conda_vars()["python_env_python"])
