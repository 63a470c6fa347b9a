"""The Packer wrapper: version parsing, command lines, output parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpubake.ansible import Progress
from gpubake.packer import Packer, PackerError, needs_plugins, parse_version


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("Packer v1.6.6\n", (1, 6, 6)),
        (
            "Packer v1.11.2\n\nYour version of Packer is out of date! The latest version\n",
            (1, 11, 2),
        ),
        ("1.9.4", None),
    ],
)
def test_parse_version(text, version):
    if version is None:
        with pytest.raises(PackerError, match="cannot read Packer's version"):
            parse_version(text)
    else:
        assert parse_version(text) == version


def test_plugins_only_from_1_7():
    assert not needs_plugins((1, 6, 6))
    assert needs_plugins((1, 7, 0))
    assert needs_plugins((1, 11, 2))


def test_build_command_line():
    p = Packer("/usr/bin/packer", (1, 6, 6))
    cmd = p.command("build", Path("/w"), Path("/w/docker.pkrvars.hcl"))
    assert cmd == [
        "/usr/bin/packer",
        "build",
        "-color=false",
        "-on-error=cleanup",
        "-var-file=/w/docker.pkrvars.hcl",
        "/w",
    ]
    assert p.command("validate", Path("/w"), Path("/w/v.hcl")) == [
        "/usr/bin/packer",
        "validate",
        "-var-file=/w/v.hcl",
        "/w",
    ]
    assert p.command("init", Path("/w")) == ["/usr/bin/packer", "init", "/w"]


def test_init_is_a_no_op_before_1_7(tmp_path):
    # 1.6 has no `packer init`: nothing must run (a missing binary would raise)
    Packer("/nonexistent/packer", (1, 6, 6)).init(tmp_path)


OUTPUT = """\
==> docker.gpubake: Provisioning with Ansible...
    docker.gpubake: PLAY [Provision a gpubake container image] ******
    docker.gpubake: TASK [Gather facts] ******
    docker.gpubake: ok: [default]
    docker.gpubake: TASK [python_env : Install uv from its hash-checked wheel] ******
    docker.gpubake: fatal: [default]: FAILED! => {"cmd": ["pip"], "msg": "non-zero return code"}
==> docker.gpubake: Provisioning step had errors: Running the cleanup provisioner, if present...
Build 'docker.gpubake' errored after 1 minute 2 seconds: Error executing Ansible: exit status 2
"""


def test_progress_names_the_failing_role_and_task():
    progress = Progress()
    messages = [progress.feed(line) for line in OUTPUT.splitlines()]
    assert "play: Provision a gpubake container image" in messages
    assert "[  1] Gather facts" in messages
    assert "[  2] python_env : Install uv from its hash-checked wheel" in messages
    summary = progress.summary()
    assert summary == (
        "build failed in role python_env, task 'Install uv from its hash-checked wheel': "
        "non-zero return code"
    )


def test_progress_reports_packer_errors_without_a_task():
    progress = Progress()
    progress.feed("Build 'docker.gpubake' errored after 2 seconds: Error creating container: boom")
    assert progress.summary() == "build failed: Error creating container: boom"


def test_progress_reports_ansible_parse_errors():
    progress = Progress()
    progress.feed("    docker.gpubake: [ERROR]: YAML parsing failed: Colons in unquoted values")
    progress.feed("Build 'docker.gpubake' errored after 3 seconds: Error executing Ansible")
    assert (
        progress.summary()
        == "build failed: ansible: YAML parsing failed: Colons in unquoted values"
    )


def test_real_packer_version(have_packer):
    p = Packer.detect()
    assert p.version >= (1, 6, 0)
    assert p.needs_plugins == (p.version >= (1, 7, 0))


def test_progress_reads_ansible_2_19_task_errors():
    progress = Progress()
    for line in [
        "    docker.gpubake: TASK [image_cleanup : Validating arguments against arg spec 'm'] *",
        "    docker.gpubake: TASK [image_cleanup : Empty /tmp] ***",
        "    docker.gpubake: [ERROR]: Task failed: Module failed: rmtree failed: busy",
        '    docker.gpubake: failed: [default] (item=/tmp/x) => {"msg": "rmtree failed: busy"}',
    ]:
        progress.feed(line)
    assert progress.tasks_seen == 1  # argument validation is not counted as a step
    assert (
        progress.summary()
        == "build failed in role image_cleanup, task 'Empty /tmp': rmtree failed: busy"
    )


def test_failed_command_reports_what_it_printed_last():
    progress = Progress()
    progress.feed("    docker.gpubake: TASK [python_env : Install the pinned packages] ***")
    progress.feed(
        '    docker.gpubake: fatal: [default]: FAILED! => {"msg": "non-zero return code", '
        '"stderr": "error: No solution found\\n  cause: no version of torch==0.0.1", "rc": 1}'
    )
    assert progress.summary() == (
        "build failed in role python_env, task 'Install the pinned packages': "
        "non-zero return code: error: No solution found cause: no version of torch==0.0.1"
    )


def test_richer_failure_line_after_an_ansible_2_19_error_wins():
    progress = Progress()
    progress.feed("TASK [python_env : Install the pinned packages] ***")
    progress.feed("[ERROR]: Task failed: Module failed: non-zero return code")
    progress.feed(
        'fatal: [default]: FAILED! => {"msg": "non-zero return code", "stderr": "x==0.1"}'
    )
    assert progress.summary().endswith("non-zero return code: x==0.1")


RECAP_OUTPUT = """\
PLAY [Provision a gpubake VM image or host] ******
TASK [base : Install the base tools] ******
changed: [10.0.0.5]
TASK [jupyter : Install JupyterLab] ******
ok: [10.0.0.5]
TASK [nvidia_driver : Install the driver packages of branch 535] ******
changed: [10.0.0.5] => (item=nvidia-kernel-dkms)
changed: [10.0.0.5] => (item=nvidia-smi)
RUNNING HANDLER [nvidia_driver : Rebuild the initramfs] ******
changed: [10.0.0.5]
PLAY RECAP ******
10.0.0.5    : ok=41   changed=3    unreachable=0    failed=0    skipped=12   rescued=0
"""


def test_progress_counts_changed_tasks_from_the_recap():
    progress = Progress()
    for line in RECAP_OUTPUT.splitlines():
        progress.feed(line)
    assert progress.recap == {"ok": 41, "changed": 3, "failed": 0}
    assert progress.changed_tasks == [
        "base : Install the base tools",
        "nvidia_driver : Install the driver packages of branch 535",
        "nvidia_driver : Rebuild the initramfs",
    ]
    assert progress.changed_summary().startswith("41 tasks ok, 3 changed (base : Install")


def test_progress_with_nothing_changed():
    progress = Progress()
    progress.feed("TASK [base : Install the base tools] ***")
    progress.feed("ok: [h]")
    progress.feed("h : ok=7    changed=0    unreachable=0    failed=0    skipped=1")
    assert progress.changed_summary() == "7 tasks ok, 0 changed"
