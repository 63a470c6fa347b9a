"""The collection's own README (galaxy.yml `readme:`, docs/collection.md) works as written: its
build-and-install commands run in a clone of the checkout and leave an installed collection
whose modules ansible-doc shows, and its example project installs the tarball and passes
`ansible-playbook --syntax-check` against that collection."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import gpubake
from tests.checkout import ROOT, copy_checkout
from tests.collection import BIN
from tests.doc_blocks import command_lines, section_blocks

DOC = ROOT / "docs" / "collection.md"
TARBALL = f"gpubake-gpu-{gpubake.__version__}.tar.gz"


def blocks(title: str, kind: str) -> list[str]:
    """The bodies of the `kind` blocks of the README's `## title` section."""
    blocks = section_blocks(DOC, title)
    assert blocks, f"docs/collection.md has no blocks in a section {title!r}"
    return [b.text for b in blocks if b.kind == kind]


def commands(title: str) -> list[str]:
    return [line.strip() for body in blocks(title, "sh") for line in command_lines(body)]


def clean_env(home: Path) -> dict[str, str]:
    """A user's shell: the venv's tools first on PATH (python3, ansible-galaxy, ansible-doc),
    a home of its own (~/.ansible/collections), no ANSIBLE_* settings of the suite."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(home)
    env.pop("VIRTUAL_ENV", None)
    return env


def run(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        shlex.split(line), cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, str]]:
    """The README's build-and-install block run line by line in a clone: (clone, env,
    outputs by command)."""
    work = tmp_path_factory.mktemp("readme")
    clone = copy_checkout(work / "gpubake")
    home = work / "home"
    home.mkdir()
    env = clean_env(home)
    outputs = {line: run(line, clone, env).stdout for line in commands(BUILD)}
    return clone, env, outputs


BUILD = "Building and installing the tarball"
USE = "Using the roles in your own playbooks"


def test_the_build_block_is_the_documented_one():
    """The block installs distlib (ansible-galaxy needs it for galaxy.yml's manifest), builds,
    installs this version's tarball offline and asks ansible-doc."""
    assert commands(BUILD) == [
        "python3 -m pip install ansible-core distlib",
        "ansible-galaxy collection build",
        f"ansible-galaxy collection install --offline {TARBALL}",
        "ansible-doc gpubake.gpu.write_files",
    ]


def test_the_build_and_install_commands_work_as_written(installed):
    clone, env, outputs = installed
    assert (clone / TARBALL).is_file()
    target = Path(env["HOME"]) / ".ansible" / "collections" / "ansible_collections" / "gpubake"
    manifest = json.loads((target / "gpu" / "MANIFEST.json").read_text())
    assert manifest["collection_info"]["version"] == gpubake.__version__
    assert manifest["collection_info"]["readme"] == "docs/collection.md"
    assert (target / "gpu" / "docs" / "collection.md").read_bytes() == DOC.read_bytes()
    doc = re.sub(r"\x1b\[[0-9;]*m", "", outputs["ansible-doc gpubake.gpu.write_files"])
    assert "> MODULE gpubake.gpu.write_files" in doc and "EXAMPLES:" in doc, doc[-2000:]


def test_the_example_project_installs_and_its_playbook_passes_syntax_check(installed, tmp_path):
    clone, env, _ = installed
    files = {}
    for body in blocks(USE, "yaml"):
        name = body.split()[1].rstrip(":")  # "# requirements.yml of your project"
        files[name] = body
        yaml.safe_load(body)
    assert set(files) == {"requirements.yml", "site.yml"}
    requirements = yaml.safe_load(files["requirements.yml"])["collections"]
    assert requirements == [{"name": f"./{TARBALL}", "type": "file"}]
    project = tmp_path / "project"
    project.mkdir()
    for name, body in files.items():
        (project / name).write_text(body)
    (project / "ansible.cfg").write_text("[defaults]\ncollections_path = ./collections\n")
    (project / "inventory").write_text("[gpu_boxes]\ngpu1 ansible_host=192.0.2.10\n")
    shutil.copy(clone / TARBALL, project / TARBALL)
    # a home without the collection the build block installed: the project's own is used
    (tmp_path / "home").mkdir()
    env = clean_env(tmp_path / "home")
    lines = commands(USE)
    assert [line.split()[0] for line in lines] == ["ansible-galaxy", "ansible-playbook"]
    run(lines[0], project, env)
    assert (project / "collections/ansible_collections/gpubake/gpu/MANIFEST.json").is_file()
    proc = run(f"{lines[1]} --syntax-check", project, env)
    assert "playbook: site.yml" in proc.stdout
    # the import of gpubake.gpu.vm was resolved from the project's collections
    listed = run(f"{lines[1]} --list-tasks", project, env).stdout
    assert "Provision a gpubake VM image or host" in listed, listed
