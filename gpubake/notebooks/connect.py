"""`notebook connect`: OpenSSH to the VM (the user's key, gpubake's own known_hosts file with
one HostKeyAlias per notebook: the host key is learned on first use and checked after), the
Jupyter token read on the VM, and `ssh -N -L` holding the tunnel until Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpubake.build.hosts import SSH_OPTIONS
from gpubake.jobs.launch import JobError
from gpubake.notebooks.options import (
    host_alias,
    jupyter,
    known_hosts,
)

SSH_PORT = 22
ANSWER_TIMEOUT_S = 300.0  # a VM just started: boot, sshd, the boot script
TOKEN_TIMEOUT_S = 180.0  # JupyterLab writes the token at its first start
STATE_FILE = "/run/gpubake/notebook-idle.json"  # what the idle watcher last saw


def ssh_options(name: str, key: Path) -> list[str]:
    """`build --target ssh`'s options (batch mode, the host key learned on first use and
    checked after) with gpubake's own known_hosts file, where the key is kept under the
    notebook's name (the VM's address changes with each start)."""
    path = known_hosts()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.touch(mode=0o600)
    return [
        *SSH_OPTIONS,
        "-o",
        f"UserKnownHostsFile={path}",
        "-i",
        str(key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        f"HostKeyAlias={host_alias(name)}",
        "-o",
        "HashKnownHosts=no",  # forget_host_key finds the alias's line
        "-o",
        "ServerAliveInterval=30",
    ]


def _ssh() -> str:
    found = shutil.which("ssh")
    if not found:
        raise JobError(
            "no `ssh` on PATH: install OpenSSH's client (apt-get install openssh-client)"
        )
    return found


def wait_for_port(address: str, port: int, timeout: float, echo: Callable[[str], None]) -> None:
    deadline = time.monotonic() + timeout
    told = False
    while True:
        try:
            with socket.create_connection((address, port), timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise JobError(
                    f"the VM at {address} does not answer on port {port} after {timeout:.0f} s: "
                    "see its serial console, or `gpubake notebook status`"
                ) from None
            if not told:
                echo(f"waiting for {address} to answer SSH")
                told = True
            time.sleep(3)


def run_remote(
    name: str, key: Path, login: str, command: str, *, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_ssh(), *ssh_options(name, key), login, command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _refused(name: str, result: subprocess.CompletedProcess[str]) -> JobError:
    text = " ".join(result.stderr.split())[-300:]
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in result.stderr or "Host key verification" in (
        result.stderr
    ):
        return JobError(
            f"the host key of notebook {name} changed since the first connection: someone may "
            f"be in between; if the VM was made again, remove the {host_alias(name)} line from "
            f"{known_hosts()}"
        )
    return JobError(f"ssh to notebook {name} failed: {text}")


def read_token(name: str, key: Path, login: str, echo: Callable[[str], None]) -> str:
    """The server's token, once JupyterLab has written it (its first start makes it)."""
    token_file = shlex.quote(str(jupyter()["jupyter_token_file"]))
    # the token is the JupyterLab user's own (0600): another login (OS Login) reads it with
    # sudo, which GCE gives OS Login users with roles/compute.osAdminLogin
    own = login.split("@", 1)[0] == jupyter()["jupyter_user"]
    command = f"cat {token_file}" if own else f"sudo -n cat {token_file}"
    deadline = time.monotonic() + TOKEN_TIMEOUT_S
    told = False
    while True:
        result = run_remote(name, key, login, command)
        token = result.stdout.strip()
        if result.returncode == 0 and token:
            return token
        if result.returncode == 255:  # ssh's own failure, not the command's
            raise _refused(name, result)
        if time.monotonic() > deadline:
            raise JobError(
                f"no Jupyter token on notebook {name} after {TOKEN_TIMEOUT_S:.0f} s "
                f"({token_file}): see `journalctl -u gpubake-jupyter` on the VM"
            )
        if not told:
            echo("waiting for JupyterLab's first start")
            told = True
        time.sleep(3)


def idle_state(name: str, key: Path, login: str) -> dict[str, Any] | None:
    """What the VM's idle watcher last wrote, or None (not reachable, not written yet)."""
    try:
        result = run_remote(name, key, login, f"cat {STATE_FILE}", timeout=20)
        return json.loads(result.stdout) if result.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, OSError):
        return None


def free_port(preferred: int) -> int:
    """`preferred` where nothing listens on it locally, else one the kernel picks."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise JobError("no free local port for the tunnel")


def open_tunnel(name: str, key: Path, login: str, port: int) -> subprocess.Popen[bytes]:
    """`ssh -N -L 127.0.0.1:PORT:127.0.0.1:8888`, once the local end accepts connections."""
    proc = subprocess.Popen(
        [
            _ssh(),
            *ssh_options(name, key),
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            f"127.0.0.1:{port}:127.0.0.1:{jupyter()['jupyter_port']}",
            login,
        ],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # Ctrl-C reaches gpubake, which then closes the tunnel
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
            raise JobError(f"the SSH tunnel to notebook {name} closed: {' '.join(err.split())}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return proc
        time.sleep(0.3)
    close(proc)
    raise JobError(f"the SSH tunnel to notebook {name} did not open in 30 s")


def close(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
