"""Strict lint as tests: ruff, yamllint, ansible-lint (production), shellcheck, packer fmt."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpubake import resources

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return str(path)


def run(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False, env=env
    )


def shell_scripts() -> list[str]:
    tracked = run("git", "ls-files").stdout.split()
    scripts = [f for f in tracked if f.endswith(".sh") or f in (".ci/run",)]
    for name in tracked:
        path = ROOT / name
        if path.is_file() and not name.endswith(".sh") and name not in scripts:
            head = path.read_bytes()[:32]
            if head.startswith((b"#!/bin/sh", b"#!/usr/bin/env bash", b"#!/bin/bash")):
                scripts.append(name)
    return sorted(scripts)


def test_ruff_check():
    out = run(tool("ruff"), "check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format():
    out = run(tool("ruff"), "format", "--check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_yamllint():
    out = run(tool("yamllint"), "--strict", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ansible_lint_production_profile():
    config = (ROOT / ".ansible-lint").read_text()
    assert "profile: production" in config
    assert "skip_list" not in config and "warn_list" not in config
    # the roles call each other and the modules by FQCN: ansible-lint finds the collection
    # gpubake.gpu (this checkout) on ANSIBLE_COLLECTIONS_PATH, as ansible-playbook does
    env = {**os.environ, **resources.ansible_env()}
    out = run(tool("ansible-lint"), "--offline", env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in out.stderr + out.stdout


def test_shellcheck():
    scripts = shell_scripts()
    assert ".ci/run" in scripts and "scripts/setup.sh" in scripts
    out = run(tool("shellcheck"), *scripts)
    assert out.returncode == 0, out.stdout + out.stderr


def test_packer_fmt():
    out = run(tool("packer"), "fmt", "-check", "images")
    assert out.returncode == 0, out.stdout + out.stderr
