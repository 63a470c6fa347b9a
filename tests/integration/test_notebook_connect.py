"""`gpubake notebook up` then `notebook connect` against a real machine: the VM host (a
booted systemd container with sshd and the VM playbook's JupyterLab, vm_host.py) stands for
the notebook's VM, the Compute API stand-in for GCE, which gives the VM the container's
address. The boot script `up` put in the instance's metadata is run on the machine as GCE's
guest agent runs a startup-script; `connect` (the installed CLI, in its own process) then
logs in with the user's key as gpubake, reads the token, opens the tunnel and prints the URL:
through it JupyterLab answers 200 with the token and 403 without; Ctrl-C closes the tunnel
and leaves the VM running; a changed host key is refused."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from gpubake import stacks
from gpubake.clouds.gcp import ENDPOINT_ENV
from tests.compute_standin import ComputeStandin, compute_standin
from tests.integration.helpers import run_in

pytestmark = [pytest.mark.docker, pytest.mark.slow]
PROJECT = "demo-proj"
ZONE = "us-central1-a"
NAME = "lab"
STORAGE_IMAGE = "/var/tmp/gpubake-test-storage.img"  # stands for the attached disk
STORAGE_LINK = "/dev/disk/by-id/google-gpubake-storage"
IDLE_UNIT = "gpubake-notebook-idle"


@pytest.fixture(scope="module")
def gce(vm_host) -> Iterator[ComputeStandin]:
    vm_host.box.reload()
    address = vm_host.box.attrs["NetworkSettings"]["IPAddress"]
    with compute_standin() as standin:
        standin.add_image(PROJECT, "gpubake-pytorch-1", family="gpubake-pytorch",
                          labels={"gpubake-job-runner": "true"})  # fmt: skip
        t4 = stacks.gpus_data()["gpus"]["t4"]["gcp"]
        standin.add_accelerator_type(PROJECT, ZONE, t4["accelerators"][0])
        standin.add_machine_type(PROJECT, ZONE, t4["build_machine_type"])
        standin.state.nat_ip = address
        yield standin


@pytest.fixture(scope="module")
def user(tmp_path_factory, gce) -> dict[str, Any]:
    """The user's machine: a key, a state folder, the CLI's environment."""
    home = tmp_path_factory.mktemp("laptop")
    key = home / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@laptop", "-f", str(key)],
        check=True,
    )
    env = {
        **os.environ,
        ENDPOINT_ENV: gce.url,
        "XDG_STATE_HOME": str(home / "state"),
        "GOOGLE_CLOUD_PROJECT": "",
    }
    return {"key": key, "env": env, "state": home / "state"}


def gpubake(user: dict[str, Any], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpubake", *args],
        env=user["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def notebook(vm_host, gce, user) -> Iterator[dict[str, Any]]:
    """`notebook up`, and its boot script run on the machine as root (as GCE would)."""
    box = vm_host.box
    made = gpubake(
        user, "notebook", "up", NAME, "--cloud", "gcp", "--project", PROJECT, "--zone", ZONE,
        "--ssh-key", str(user["key"]), "--json",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    (body,) = gce.inserts()
    script = next(i["value"] for i in body["metadata"]["items"] if i["key"] == "startup-script")
    run_in(box, "truncate", "-s", "64M", STORAGE_IMAGE)
    run_in(box, "mkdir", "-p", str(Path(STORAGE_LINK).parent))
    run_in(box, "ln", "-sfn", STORAGE_IMAGE, STORAGE_LINK)
    ran = box.exec_run(["bash", "-c", script], user="root")
    output = ran.output.decode("utf-8", "replace")
    try:
        assert ran.exit_code == 0, output
        yield {"boot_output": output, "body": body}
    finally:
        with contextlib.suppress(docker.errors.NotFound):  # the host went with the group's end
            _undo_boot_script(box)


def _undo_boot_script(box: Any) -> None:
    """What the boot script made, removed: the host is shared with the group's other tests."""
    box.reload()
    if box.status != "running":
        return
    run_in(box, "systemctl", "disable", "--now", f"{IDLE_UNIT}.service")
    run_in(box, "sed", "-i", r"\|/storage ext4|d", "/etc/fstab")
    run_in(box, "rm", "-rf", STORAGE_IMAGE, STORAGE_LINK, "/storage",
           "/home/gpubake/notebooks/storage", f"/etc/systemd/system/{IDLE_UNIT}.service",
           "/etc/gpubake/notebook.json", "/usr/local/lib/gpubake/notebook_idle.py")  # fmt: skip
    run_in(box, "systemctl", "daemon-reload")


def test_the_boot_script_set_up_key_storage_and_watcher(vm_host, notebook, user):
    box = vm_host.box
    public = user["key"].with_name("id_ed25519.pub").read_text(encoding="utf-8").strip()
    _, keys = run_in(box, "cat", "/home/gpubake/.ssh/authorized_keys")
    assert public in keys.splitlines()
    _, kind = run_in(box, "blkid", "-s", "TYPE", "-o", "value", STORAGE_IMAGE)
    assert kind.strip() == "ext4"  # made ext4 on first use
    _, fstab = run_in(box, "cat", "/etc/fstab")
    assert " /storage ext4 defaults,nofail" in fstab
    _, link = run_in(box, "readlink", "/home/gpubake/notebooks/storage")
    assert link.strip() == "/storage"
    rc, state = run_in(box, "systemctl", "is-enabled", f"{IDLE_UNIT}.service")
    assert rc == 0 and state.strip() == "enabled"
    _, config = run_in(box, "cat", "/etc/gpubake/notebook.json")
    assert json.loads(config)["idle_stop_s"] == 3600
    # a second boot runs it again: nothing added twice
    script = next(
        i["value"] for i in notebook["body"]["metadata"]["items"] if i["key"] == "startup-script"
    )
    again = box.exec_run(["bash", "-c", script], user="root")
    assert again.exit_code == 0, again.output.decode()
    _, keys = run_in(box, "cat", "/home/gpubake/.ssh/authorized_keys")
    assert keys.splitlines().count(public) == 1
    _, fstab = run_in(box, "cat", "/etc/fstab")
    assert fstab.count(" /storage ext4 ") == 1


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    assert url.startswith("http://127.0.0.1:")
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 (checked above)
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:  # noqa: S310
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


def test_connect_tunnels_to_jupyterlab_and_ctrl_c_closes_only_the_tunnel(
    vm_host, notebook, user, gce
):
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpubake", "notebook", "connect", NAME, "--port", "0", "--json"],
        env=user["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line, proc.stderr.read() if proc.stderr else ""
        shown = json.loads(line)
        url, port = shown["url"], shown["port"]
        token = url.split("token=", 1)[1]
        _, on_vm = run_in(vm_host.box, "cat", "/home/gpubake/.jupyter/gpubake-token")
        assert token == on_vm.strip()
        assert url == f"http://127.0.0.1:{port}/lab?token={token}"
        assert _get(url) == 200
        assert _get(f"http://127.0.0.1:{port}/api/status") == 403
        assert (
            _get(f"http://127.0.0.1:{port}/api/status", {"Authorization": f"token {token}"}) == 200
        )
        gce.clear()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "tunnel closed" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=3):
        pass
    assert [r for r in gce.requests() if r.method != "GET"] == []  # the VM is left alone
    _, state = run_in(vm_host.box, "systemctl", "is-active", "gpubake-jupyter")
    assert state.strip() == "active"


def test_status_shows_the_watchers_idle_time_read_over_ssh(vm_host, notebook, user):
    deadline = time.monotonic() + 60  # the boot script's watcher polls at its start
    while run_in(vm_host.box, "test", "-s", "/run/gpubake/notebook-idle.json")[0] != 0:
        assert time.monotonic() < deadline, "the watcher wrote no state"
        time.sleep(1)
    shown = gpubake(user, "notebook", "status", NAME, "--json")
    assert shown.returncode == 0, shown.stderr
    row = json.loads(shown.stdout)
    assert row["state"] == "RUNNING" and row["gpu"] == "1x nvidia-tesla-t4"
    assert isinstance(row["idle_s"], int) and 0 <= row["idle_s"] < 3600
    assert row["stop_at"].endswith("Z")  # the idle limit, 60 min from the last activity
    table = gpubake(user, "notebook", "status", NAME)
    assert table.stdout.splitlines()[0].split() == [
        "NAME", "CLOUD", "STATE", "GPU", "MACHINE", "UPTIME", "IDLE", "COST",
    ]  # fmt: skip


def test_a_changed_host_key_is_refused(notebook, user):
    known = user["state"] / "gpubake" / "notebooks" / "known_hosts"
    lines = known.read_text(encoding="utf-8").splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == [f"gpubake-notebook-{NAME}"]
    other = user["key"].with_name("other")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    forged = other.with_name("other.pub").read_text(encoding="utf-8").split()[:2]
    original = known.read_text(encoding="utf-8")
    known.write_text(f"gpubake-notebook-{NAME} {' '.join(forged)}\n", encoding="utf-8")
    try:
        result = gpubake(user, "notebook", "connect", NAME, "--port", "0", timeout=60)
    finally:
        known.write_text(original, encoding="utf-8")
    assert result.returncode == 1
    assert "host key of notebook lab changed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
