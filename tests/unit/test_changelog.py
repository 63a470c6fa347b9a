"""One changelog for the one version string: CHANGELOG.md is antsibull-changelog's output from
changelogs/changelog.yaml (the fragments of each release), never edited by hand, and its top
entry is the package's version (changelogs/README.md says how to add a fragment)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml
from packaging.version import Version

import gpubake
from tests.collection import BIN, ROOT

CHANGELOG = ROOT / "CHANGELOG.md"
CHANGES = ROOT / "changelogs" / "changelog.yaml"


def changelog_tool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(BIN / "antsibull-changelog"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_fragments_and_changelog_yaml_pass_lint():
    proc = changelog_tool("lint")
    assert not proc.stdout.strip(), proc.stdout  # lint prints one line per problem
    proc = changelog_tool("lint-changelog-yaml", str(CHANGES))
    assert not proc.stdout.strip(), proc.stdout


def test_changelog_md_is_generated_from_changelog_yaml(tmp_path):
    """`antsibull-changelog generate` in a copy reproduces CHANGELOG.md byte for byte: an edit by
    hand fails here (add a fragment instead; pending fragments are not part of it)."""
    shutil.copy(ROOT / "galaxy.yml", tmp_path / "galaxy.yml")
    shutil.copytree(ROOT / "changelogs", tmp_path / "changelogs")
    (tmp_path / "changelogs" / ".plugin-cache.yaml").unlink(missing_ok=True)
    changelog_tool("generate", cwd=tmp_path)
    generated = (tmp_path / "CHANGELOG.md").read_bytes()
    assert generated == CHANGELOG.read_bytes(), "CHANGELOG.md differs from its generated form"


def test_the_top_entry_is_the_package_version():
    config = yaml.safe_load((ROOT / "changelogs" / "config.yaml").read_text())
    assert config["output"] == [{"file": "CHANGELOG.md", "format": "md"}]
    releases = yaml.safe_load(CHANGES.read_text())["releases"]
    newest = max(releases, key=Version)
    assert newest == gpubake.__version__
    # every release says what it holds
    assert releases[newest]["changes"]["release_summary"].strip()
    headings = re.findall(r"^## v(.+)$", CHANGELOG.read_text(encoding="utf-8"), re.MULTILINE)
    assert headings, "CHANGELOG.md has no release heading"
    assert headings[0].replace("\\", "") == gpubake.__version__
