"""The Packer wrapper: version parsing, command lines, output parsing."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpubake.build.ansible import Progress
from gpubake.build.packer import Packer, PackerError, needs_plugins, parse_version


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


_RUN_BUILD = """
import sys
from pathlib import Path
from gpubake.build import packer
packer.CLEANUP_TIMEOUT_S = 2
work = Path(sys.argv[2])
try:
    seen = work / "seen"
    def on_line(line, message):  # the test interrupts once build() reads Packer's output
        with seen.open("a") as out:
            out.write(line + "\\n")
    packer.Packer(sys.argv[1], (1, 6, 6)).build(work, work / "v.pkrvars.hcl", on_line)
except KeyboardInterrupt:
    print("KeyboardInterrupt reached the caller", file=sys.stderr)
    sys.exit(130)
"""


@pytest.mark.parametrize("hangs", [False, True])
def test_ctrl_c_waits_for_packers_clean_up_and_stops_one_that_hangs(tmp_path, hangs):
    """Ctrl-C during `packer build`: Packer gets Ctrl-C and is waited for; one that does not
    finish its clean-up in time (a stand-in that ignores Ctrl-C and sleeps) is killed with
    its process group, and the caller still gets the interruption, not a TimeoutExpired."""
    pid_file = tmp_path / "packer.pid"
    stub = tmp_path / "packer"
    stub.write_text(
        "#!/bin/bash\n"
        + ("trap '' INT\n" if hangs else "trap 'exit 1' INT\n")
        + f"echo $$ > {pid_file}\necho '==> docker.gpubake: Creating a container'\n"
        + ("exec sleep 300\n" if hangs else "while :; do sleep 0.1; done\n"),
        encoding="utf-8",
    )
    stub.chmod(0o755)
    child = subprocess.Popen(
        [sys.executable, "-c", _RUN_BUILD, str(stub), str(tmp_path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    seen = tmp_path / "seen"  # build() is in its read loop: Ctrl-C there is what is tested
    while not seen.exists() or "Creating a container" not in seen.read_text():
        assert time.monotonic() < deadline and child.poll() is None, "the stand-in never started"
        time.sleep(0.05)
    packer_pid = int(pid_file.read_text())
    child.send_signal(signal.SIGINT)
    _out, err = child.communicate(timeout=30)
    assert child.returncode == 130, err
    assert "KeyboardInterrupt reached the caller" in err
    assert "Traceback" not in err
    assert ("did not finish its clean-up in 2 s and was stopped" in err) is hangs, err
    assert not Path(f"/proc/{packer_pid}").exists() or "Z" in _state(packer_pid)


def _state(pid: int) -> str:
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    return "gone"
