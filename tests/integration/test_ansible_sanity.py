"""`ansible-test sanity` on the collection as a user gets it: the tarball built from the
checkout, installed offline, every sanity test that applies run on this Python.

ansible-test runs each sanity test that needs packages in a virtual environment of its own
(~/.ansible/test/venv/sanity.<test>/...), whatever the Python it is started from holds, and
bootstraps pip into an empty one with a get-pip.py it downloads from
ci-files.testing.ansible.com (ansible_test/_util/target/setup/requirements.py, `bootstrap`).
That host is not reachable here, so:

- ansible-test runs with HOME set to a directory of its own, <this venv>/ansible-test: its
  sanity venvs are made there once (the first run, from PyPI) and reused, offline, after;
- its bootstrap reads a cached get-pip.py first (~/.ansible/test/cache/get_pip_<pip>.py) and
  only downloads one when there is none: the cache holds our own, which makes pip with the
  Python's own ensurepip and then installs the pip version ansible-test pins from PyPI;
- ansible-test hands its commands only PATH, HOME and a few other variables (util.py,
  common_environment), so pip in its venvs reads its settings from files only: the settings
  of the pip that runs this test (`pip config list`: files and PIP_* variables) are written to
  that HOME's pip.conf (the index, certificates, find-links this machine needs).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from ansible.release import __version__ as ansible_core
from ansible_test._internal.python_requirements import get_venv_packages

from tests.collection import ROOT, build_tarball, install_offline

BIN = Path(sys.executable).parent
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
#: ansible-test's own home: its sanity venvs and its pip bootstrap, kept with this venv
HOME = Path(sys.prefix) / "ansible-test"
#: the entries the rules expect for a non-GPL collection, each with its reason
IGNORE = Path("tests") / "sanity" / f"ignore-{ansible_core.rsplit('.', 1)[0]}.txt"

# Run as ansible-test's get-pip.py: argv is pip's install arguments (`pip==X`) and get-pip's
# own --no-setuptools / --no-wheel, which pip does not know. ensurepip in a subprocess: it
# sets PIP_CONFIG_FILE=/dev/null in its own process, which would hide pip.conf from pip.
GET_PIP = '''\
"""Stands in for get-pip.py (tests/integration/test_ansible_sanity.py): ensurepip, then PyPI."""

import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "ensurepip"])
args = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "pip", "install", *args])
'''


def pip_settings() -> dict[str, str]:
    """The settings of the pip that runs this test, from its files and PIP_* variables (the
    later ones win, as in pip)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    settings: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep and "." in key:
            settings[key.split(".", 1)[1]] = ast.literal_eval(value)
    return settings


def prepare_home() -> None:
    """ansible-test's HOME: its pip bootstrap from PyPI, and this pip's settings."""
    pip_version = get_venv_packages(types.SimpleNamespace(version=PYTHON))["pip"]
    cache = HOME / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"get_pip_{pip_version.replace('.', '_')}.py").write_text(GET_PIP)
    conf = HOME / ".config" / "pip" / "pip.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    lines = ["[global]", *(f"{k} = {v}" for k, v in sorted(pip_settings().items()))]
    conf.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """The collection built and installed offline (ansible_collections/gpubake/gpu)."""
    work = tmp_path_factory.mktemp("sanity")
    tarball = build_tarball(work / "dist")
    installed = install_offline(tarball, work / "collections")
    # the ignore file is not shipped (galaxy-importer warns about one in a tarball): it is
    # put where ansible-test reads it in the collection under test
    (installed / IGNORE.parent).mkdir(parents=True)
    shutil.copy(ROOT / IGNORE, installed / IGNORE)
    return installed


def test_ansible_test_sanity_passes_on_the_built_collection(collection):
    prepare_home()
    env = {**os.environ, "HOME": str(HOME)}
    start = time.monotonic()
    # every sanity test that applies, on this Python (the others need theirs installed)
    proc = subprocess.run(
        [str(BIN / "ansible-test"), "sanity", "--python", PYTHON, "--color", "no"],
        cwd=collection,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    took = time.monotonic() - start
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"ansible-test sanity: rc {proc.returncode}\n{said[-6000:]}"
    assert 'Running sanity test "validate-modules"' in said, said[-3000:]
    assert 'Running sanity test "pylint"' in said, said[-3000:]
    print(f"ansible-test sanity (ansible-core {ansible_core}, Python {PYTHON}): {took:.0f} s")
