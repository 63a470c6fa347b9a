"""A release as it is made and installed: `python -m build` of a clone (the sdist, then the wheel
built from the sdist: the sdist is complete), `twine check --strict` of both, and
`pipx install` of the wheel giving a `gpubake` that works from any directory. The package and
the collection share one version (gpubake.__version__; tests/unit/test_collection.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import gpubake
from gpubake.resources import DATA_ITEMS
from tests.checkout import copy_checkout, tracked_files
from tests.wheel import WheelInstall

VERSION = gpubake.__version__
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Release:
    sdist: Path
    wheel: Path


def _run(args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    proc = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Release:
    """`python -m build` of a clone: the sdist, and the wheel built from the unpacked sdist."""
    work = tmp_path_factory.mktemp("release")
    src = copy_checkout(work / "gpubake")
    _run([sys.executable, "-m", "build", "--outdir", str(work / "dist"), str(src)], cwd=work)
    return Release(
        sdist=work / "dist" / f"gpubake-{VERSION}.tar.gz",
        wheel=work / "dist" / f"gpubake-{VERSION}-py3-none-any.whl",
    )


def data_files() -> set[str]:
    """The tracked files the wheel carries as gpubake/_data (setup.py's DATA_ITEMS)."""
    return {
        name
        for name in tracked_files()
        if any(name == item or name.startswith(f"{item}/") for item in DATA_ITEMS)
    }


def test_sdist_and_wheel_are_this_version_and_pass_twine_check(release):
    assert release.sdist.is_file() and release.wheel.is_file()
    proc = _run(
        [str(BIN / "twine"), "check", "--strict", str(release.sdist), str(release.wheel)],
        cwd=release.wheel.parent,
    )
    assert proc.stdout.count("PASSED") == 2, proc.stdout
    with zipfile.ZipFile(release.wheel) as whl:
        metadata = whl.read(f"gpubake-{VERSION}.dist-info/METADATA").decode()
    assert f"\nVersion: {VERSION}\n" in metadata
    assert "\nRequires-Dist: ansible==" in metadata


def test_the_sdist_holds_the_package_and_its_data(release):
    """Every tracked file of the package and of its data (roles, playbooks, plugins, images,
    ...) is in the sdist; the wheel built from it carries the same data as gpubake/_data."""
    prefix = f"gpubake-{VERSION}/"
    with tarfile.open(release.sdist) as tar:
        in_sdist = {m.name.removeprefix(prefix) for m in tar.getmembers() if not m.isdir()}
    package = {n for n in tracked_files() if n.startswith("gpubake/")}
    wanted = data_files() | package
    wanted |= {"pyproject.toml", "setup.py", "README.md", "LICENSE", "CHANGELOG.md"}
    missing = sorted(wanted - in_sdist)
    assert not missing, missing
    with zipfile.ZipFile(release.wheel) as whl:
        in_wheel = {n.removeprefix("gpubake/_data/") for n in whl.namelist()}
    missing = sorted(data_files() - in_wheel)
    assert not missing, missing


def test_pipx_install_of_the_wheel_gives_a_working_gpubake(release, tmp_path):
    """pipx with its home and bin directory here; the uv backend (pipx's default where uv is
    installed, as gpubake's own dependency) resolves the dependencies from uv's cache: the pip
    backend takes over a minute for the same."""
    env = dict(
        os.environ,
        PIPX_HOME=str(tmp_path / "pipx"),
        PIPX_BIN_DIR=str(tmp_path / "bin"),
        PIPX_MAN_DIR=str(tmp_path / "man"),
    )
    env.pop("VIRTUAL_ENV", None)
    _run(
        [str(BIN / "pipx"), "install", "--backend", "uv", str(release.wheel)],
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    gpubake_bin = tmp_path / "bin" / "gpubake"
    version = _run([str(gpubake_bin), "--version"], cwd=elsewhere).stdout.strip()
    assert version == f"gpubake, version {VERSION}"
    installed = WheelInstall(
        wheel=release.wheel, venv=tmp_path / "pipx" / "venvs" / "gpubake", workdir=elsewhere
    )
    proc = installed.run("stacks")
    assert proc.returncode == 0, proc.stderr
    assert "pytorch" in proc.stdout and "mxnet" in proc.stdout
    code = "from gpubake import resources; print(resources.data_root())"
    root = _run([installed.python, "-c", code], cwd=elsewhere).stdout.strip()
    assert root.startswith(str(installed.venv)) and root.endswith("gpubake/_data"), root
