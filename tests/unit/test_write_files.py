"""plugins/modules/write_files.py (gpubake.gpu.write_files), run by ansible-playbook on this
machine as the roles run it: several files in one module call, each written only when its
content, mode or owner differ; check mode writes nothing; --diff shows what changes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from gpubake import resources
from gpubake.build import ansible

PLAYBOOK = """\
- name: Write files
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Write them
      gpubake.gpu.write_files:
        files: "{{ files }}"
        directory_mode: "0750"
      register: written
    - name: Show the result
      ansible.builtin.debug:
        msg: "RESULT {{ written | to_json }}"
"""


def play(tmp_path: Path, files: list[dict], *flags: str) -> tuple[int, dict, str]:
    book = tmp_path / "play.yml"
    book.write_text(PLAYBOOK)
    proc = subprocess.run(
        [
            ansible.playbook_command(),
            "-i", "localhost,", str(book), "-e", json.dumps({"files": files}), *flags,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **resources.ansible_env(), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "t")},
        check=False,
    )  # fmt: skip
    result = {}
    for line in proc.stdout.splitlines():
        if '"msg": "RESULT ' in line:
            result = json.loads(json.loads("{" + line.strip().rstrip(",") + "}")["msg"][7:])
    return proc.returncode, result, proc.stdout + proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="writes files owned by root")
def test_writes_all_files_in_one_call_and_only_what_differs(tmp_path):
    out = tmp_path / "out"
    files = [
        {"path": str(out / "new/dir/manifest.json"), "content": '{"a": 1}\n'},
        {"path": str(out / "run.sh"), "content": "#!/bin/sh\necho hi\n", "mode": "0755"},
    ]
    out.mkdir()
    rc, result, log = play(tmp_path, files)
    assert rc == 0, log
    assert result["changed"] is True
    assert result["changed_files"] == [f["path"] for f in files]
    assert (out / "new/dir/manifest.json").read_text() == '{"a": 1}\n'
    assert (out / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (out / "new").stat().st_mode & 0o777 == 0o750  # made on the way, directory_mode
    assert (out / "new/dir/manifest.json").stat().st_mode & 0o777 == 0o644
    assert not list(out.rglob(".gpubake-write.*"))  # no temporary file left

    rc, result, log = play(tmp_path, files)  # the same again: nothing changes
    assert (rc, result["changed"], result["changed_files"]) == (0, False, []), log

    (out / "run.sh").chmod(0o700)  # a mode that differs is put back, the content kept
    files[0]["content"] = '{"a": 2}\n'
    rc, result, log = play(tmp_path, files, "--check", "--diff")
    assert rc == 0 and result["changed_files"] == [f["path"] for f in files], log
    assert '+{"a": 2}' in log and '-{"a": 1}' in log  # the diff of the content
    assert (out / "new/dir/manifest.json").read_text() == '{"a": 1}\n'  # check mode: unwritten
    rc, result, log = play(tmp_path, files)
    assert rc == 0 and (out / "new/dir/manifest.json").read_text() == '{"a": 2}\n', log
    assert (out / "run.sh").stat().st_mode & 0o777 == 0o755


def test_a_relative_path_or_an_unknown_owner_fails_in_one_line(tmp_path):
    rc, _, log = play(tmp_path, [{"path": "relative.txt", "content": "x"}])
    assert rc != 0 and "path 'relative.txt' is not absolute" in log
    target = tmp_path / "x.txt"
    rc, _, log = play(tmp_path, [{"path": str(target), "content": "x", "owner": "nobody-here"}])
    assert rc != 0 and "no user 'nobody-here' on the host" in log
    assert not target.exists()
