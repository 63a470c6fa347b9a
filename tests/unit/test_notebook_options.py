"""The notebook's names, key lookup and boot script, offline: what `notebook up` refuses
before any cloud call, and a boot script bash parses and shellcheck passes."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from gpubake.jobs.launch import JobError
from gpubake.notebooks import boot
from gpubake.notebooks.aws import storage_devices
from gpubake.notebooks.options import NotebookOptions, check_name, find_key, forget_host_key


@pytest.mark.parametrize("name", ["a", "fastai", "d2l-book", "x" * 32])
def test_names_the_clouds_take(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "My_Lab", "9lab", "lab-", "x" * 33, "la b"])
def test_names_refused(name):
    with pytest.raises(JobError, match="notebook name"):
        check_name(name)


def test_key_lookup_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(JobError, match="ssh-keygen -t ed25519"):
        find_key(None)
    key = tmp_path / ".ssh" / "id_rsa"
    key.parent.mkdir()
    key.write_text("private", encoding="utf-8")
    with pytest.raises(JobError, match="public half"):
        find_key(None)
    key.with_name("id_rsa.pub").write_text("not a key\n", encoding="utf-8")
    with pytest.raises(JobError, match="not an OpenSSH public key"):
        find_key(None)
    key.with_name("id_rsa.pub").write_text("ssh-rsa AAAAB3 me@x\n", encoding="utf-8")
    assert find_key(None) == (key, "ssh-rsa AAAAB3 me@x")


def test_forgetting_a_host_key_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    known = tmp_path / "gpubake" / "notebooks" / "known_hosts"
    known.parent.mkdir(parents=True)
    known.write_text(
        "gpubake-notebook-a ssh-ed25519 AAAA1\ngpubake-notebook-b ssh-ed25519 AAAA2\n",
        encoding="utf-8",
    )
    forget_host_key("a")
    assert known.read_text(encoding="utf-8") == "gpubake-notebook-b ssh-ed25519 AAAA2\n"


@pytest.mark.parametrize("devices", ["/dev/disk/by-id/google-gpubake-storage",
                                     storage_devices("vol-0123456789abcdef0")])  # fmt: skip
def test_the_boot_script_parses_and_passes_shellcheck(tmp_path, devices):
    options = NotebookOptions(name="lab", cloud="gcp", idle_stop_s=900, max_run_s=3600)
    text = boot.script("lab", "ssh-ed25519 AAAA me@x", devices, options.watcher_config())
    path = tmp_path / "boot.sh"
    path.write_text(text, encoding="utf-8")
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed")
    checked = subprocess.run(["shellcheck", "-s", "bash", str(path)], capture_output=True,
                             text=True, check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stdout
    assert "'ssh-ed25519 AAAA me@x'" in text  # quoted for the shell
    assert '"idle_stop_s": 900' in text and '"max_run_s": 3600' in text
