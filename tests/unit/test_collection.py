"""The repository root is the Ansible collection gpubake.gpu: its metadata, its tarball."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

import gpubake
from gpubake import resources
from tests.checkout import tracked_files
from tests.collection import BIN, ROOT, build_tarball, install_offline


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Path:
    return build_tarball(tmp_path_factory.mktemp("collection"))


@pytest.fixture(scope="module")
def tar_names(tarball) -> set[str]:
    with tarfile.open(tarball) as tar:
        return {m.name.removesuffix("/") for m in tar.getmembers()}


def test_galaxy_version_is_the_package_version():
    galaxy = yaml.safe_load((ROOT / "galaxy.yml").read_text())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert galaxy["version"] == gpubake.__version__
    # the package's version is gpubake.__version__ itself: no second copy in pyproject.toml
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "gpubake.__version__"}
    assert (galaxy["namespace"], galaxy["name"]) == (resources.NAMESPACE, resources.COLLECTION)
    assert galaxy["license"] == [pyproject["project"]["license"]]
    for key in ("repository", "tags", "authors", "description"):
        assert galaxy.get(key), key


def test_requires_ansible_admits_the_installed_core():
    from ansible.release import __version__ as core

    runtime = yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text())
    assert core in SpecifierSet(runtime["requires_ansible"])


def test_tarball_holds_the_collection_and_nothing_else(tar_names):
    # galaxy.yml's readme (the collection's own README) must be in the tarball
    readme = yaml.safe_load((ROOT / "galaxy.yml").read_text())["readme"]
    assert readme == "docs/collection.md"
    # README.md: galaxy-importer renders the root README (and fails without one)
    for name in (readme, "README.md", "LICENSE", "CHANGELOG.md", "changelogs/changelog.yaml"):
        assert name in tar_names, name
    for name in ("meta/runtime.yml", "MANIFEST.json", "FILES.json"):
        assert name in tar_names, name
    # of docs/ (the documentation site's pages) the collection's README only
    assert [n for n in tar_names if n.startswith("docs/")] == [readme]
    # every tracked file of roles/, playbooks/, plugins/ (role files/ included)
    for tree in ("roles", "playbooks", "plugins"):
        files = [f for f in tracked_files() if f.startswith(f"{tree}/")]
        assert files, tree
        missing = [f for f in files if f not in tar_names]
        assert not missing, missing
    assert "roles/gpu_smoke_test/files/gpu_smoke.py" in tar_names
    assert "roles/gpu_smoke_test/files/gpus.yml" in tar_names
    top = {name.split("/")[0] for name in tar_names}
    # no tests/: ansible-test's ignore file stays in the repository (galaxy-importer warns
    # about a shipped one; tests/integration/test_ansible_sanity.py puts it in place)
    for absent in ("gpubake", "tests", "build.py", "setup.py", "pyproject.toml", "images", ".ci"):
        assert absent not in top, absent
    assert not [n for n in tar_names if "__pycache__" in n or n.endswith(".pyc")]


def test_tarball_files_are_real_files(tarball):
    """Symlinks to files outside the collection are dropped by the build: none may remain."""
    with tarfile.open(tarball) as tar:
        links = [m.name for m in tar.getmembers() if m.issym() or m.islnk()]
        sizes = {m.name: m.size for m in tar.getmembers() if m.isfile()}
    assert not links, links
    smoke = (ROOT / "roles/gpu_smoke_test/files/gpu_smoke.py").stat().st_size
    assert sizes["roles/gpu_smoke_test/files/gpu_smoke.py"] == smoke


def test_offline_install_then_ansible_doc_shows_the_modules(tarball, tmp_path):
    installed = install_offline(tarball, tmp_path / "collections")
    manifest = json.loads((installed / "MANIFEST.json").read_text())
    assert manifest["collection_info"]["version"] == gpubake.__version__
    modules = sorted(p.stem for p in (installed / "plugins" / "modules").glob("*.py"))
    assert {"dpkg_facts", "write_files"} <= set(modules)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(tmp_path / "collections"))
    env.pop("ANSIBLE_CONFIG", None)
    for module in modules:
        proc = subprocess.run(
            [str(BIN / "ansible-doc"), "-t", "module", "--json", f"gpubake.gpu.{module}"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        doc = json.loads(proc.stdout)[f"gpubake.gpu.{module}"]
        assert doc["doc"]["short_description"], module
        assert doc["examples"].strip() and doc["return"], module
        # the text page too: it renders every field as text (a note YAML read as a mapping
        # broke it, where --json passed)
        text = subprocess.run(
            [str(BIN / "ansible-doc"), "-t", "module", f"gpubake.gpu.{module}"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False,
        )  # fmt: skip
        assert text.returncode == 0, text.stderr[-2000:]
        page = re.sub(r"\x1b\[[0-9;]*m", "", text.stdout)
        assert f"> MODULE gpubake.gpu.{module}" in page and "EXAMPLES:" in page, page[-2000:]
