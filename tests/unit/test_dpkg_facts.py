"""plugins/modules/dpkg_facts.py (gpubake.gpu.dpkg_facts): dpkg's database, package_facts' shape."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.modules import load_file

ROOT = Path(__file__).resolve().parents[2]
facts = load_file(ROOT / "plugins/modules/dpkg_facts.py", "dpkg_facts")


def test_installed_packages_only_in_package_facts_shape():
    text = (
        "ii \tgit\t1:2.39.5-0+deb12u2\tamd64\n"
        "hi \tlinux-image-amd64\t6.1.158-1\tamd64\n"  # held: installed
        "iF \tnvidia-kernel-dkms\t535.261.03-1\tamd64\n"  # half-configured: installed
        "rc \tpython3-apt\t2.6.0\tamd64\n"  # removed, config files left: not installed
        "un \ttmux\t\t\n"  # known, never installed
        "ii \tlibc6\t2.36-9+deb12u13\tamd64\n"
        "ii \tlibc6\t2.36-9+deb12u13\ti386\n"  # multi-arch: one entry per architecture
        "garbage line\n"
    )
    packages = facts.parse(text)
    assert sorted(packages) == ["git", "libc6", "linux-image-amd64", "nvidia-kernel-dkms"]
    assert packages["git"] == [
        {"name": "git", "version": "1:2.39.5-0+deb12u2", "arch": "amd64", "source": "apt"}
    ]
    assert [p["arch"] for p in packages["libc6"]] == ["amd64", "i386"]


@pytest.mark.skipif(
    subprocess.run(["which", "dpkg-query"], capture_output=True, check=False).returncode != 0,
    reason="dpkg-query is not installed here",
)
def test_this_hosts_database_parses_and_agrees_with_dpkg():
    out = subprocess.run(
        ["dpkg-query", "--show", f"--showformat={facts.FORMAT}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    packages = facts.parse(out)
    status = subprocess.run(
        ["dpkg-query", "--show", "--showformat=${Version}", "dpkg"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert packages["dpkg"][0]["version"] == status
