"""Targets `ssh` and `local`: the VM playbook applied straight to a running machine with
ansible-playbook (no Packer), then gpu-smoke there."""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from gpubake import GpubakeError, stacks
from gpubake.build import ansible
from gpubake.build.ansible import Progress
from gpubake.build.plan import BuildPlan
from gpubake.build.render import ansible_variables
from gpubake.resources import data_root

SSH_OPTIONS = [
    "-o",
    "BatchMode=yes",
    "-o",
    "ConnectTimeout=15",
    "-o",
    "StrictHostKeyChecking=accept-new",
]


class HostError(GpubakeError):
    """The host cannot be reached, refused us, or the playbook failed there."""


@dataclasses.dataclass(frozen=True)
class SshLogin:
    """How to reach a host: USER@HOST[:PORT], an optional key, an optional known_hosts file
    (host keys are accepted on first use and checked after that)."""

    host: str
    key: Path | None = None
    known_hosts: Path | None = None

    def options(self) -> list[str]:
        opts = list(SSH_OPTIONS)
        if self.known_hosts is not None:
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        return opts


def split_host(host: str) -> tuple[str | None, str, int | None]:
    """USER@HOST[:PORT] (HOST may be [IPv6]) -> (user, host, port); one line if malformed."""
    user, at, rest = host.rpartition("@")
    if rest.startswith("["):  # [2001:db8::1]:2222
        name, close, tail = rest[1:].partition("]")
        sep, port = tail[:1], tail[1:]
        bad_tail = bool(tail) and sep != ":"
    else:
        bad_tail = rest.count(":") > 1  # a bare IPv6 address: write it as [ADDRESS]
        name, sep, port = rest.partition(":")
        close = "]"
    usage = "USER@HOST or USER@HOST:PORT"
    if bad_tail and not rest.startswith("["):
        raise HostError(f"--host '{host}': write an IPv6 address in brackets, e.g. root@[::1]:22")
    if not name or not close or bad_tail or any(c.isspace() for c in host):
        raise HostError(f"--host '{host}' has no host name: write {usage}")
    if at and not user:
        raise HostError(
            f"--host '{host}' has an empty user name: write {usage}, or leave USER@ out"
        )
    if sep and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise HostError(f"--host '{host}': port '{port}' is not a number from 1 to 65535")
    return user or None, name, int(port) if sep else None


def ssh_command(login: SshLogin) -> list[str]:
    user, name, port = split_host(login.host)
    cmd = ["ssh", *login.options()]
    if port:
        cmd += ["-p", str(port)]
    if login.key:
        cmd += ["-i", str(login.key), "-o", "IdentitiesOnly=yes"]
    return [*cmd, f"{user}@{name}" if user else name]


def check_ssh(login: SshLogin) -> None:
    """Reach the host and authenticate before anything is applied; one line if not."""
    host = login.host
    if login.key is not None and not login.key.is_file():
        raise HostError(f"--ssh-key {login.key}: no such file")
    if login.known_hosts is not None and not login.known_hosts.parent.is_dir():
        raise HostError(f"--known-hosts {login.known_hosts}: its folder does not exist")
    try:
        out = subprocess.run(
            [*ssh_command(login), "true"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise HostError(f"ssh {host} did not answer in 60 s") from None
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1:] or [f"ssh exited with {out.returncode}"]
        hint = ""
        if "Host key verification failed" in last[0]:
            _, name, port = split_host(host)
            entry = f"[{name}]:{port}" if port else name
            hint = (
                f" (the host key differs from the one on record: if the machine was "
                f"replaced, run `ssh-keygen -R '{entry}'` or pass --known-hosts FILE)"
            )
        raise HostError(f"cannot log in to {host} over ssh: {last[0]}{hint}")


SYSTEM_PYTHON = Path("/usr/bin/python3")  # ansible.cfg's interpreter_python


def inventory(target: str, login: SshLogin | None) -> list[str]:
    if login is None:  # local
        args = ["-i", "localhost,", "-c", "local"]
        if not SYSTEM_PYTHON.exists():  # a host whose only Python is gpubake's own
            args += ["-e", f"ansible_python_interpreter={sys.executable}"]
        return args
    user, name, port = split_host(login.host)
    args = ["-i", f"{name},", "--ssh-common-args", " ".join(login.options())]
    if user:
        args += ["-u", user]
    if port:
        args += ["-e", f"ansible_port={port}"]
    if login.key:
        args += ["--private-key", str(login.key)]
    return args


def apply(
    plan: BuildPlan,
    *,
    login: SshLogin | None,
    on_line: Callable[[str, str | None], None],
    check: bool = False,
    on_done: Callable[[str, Progress], None] | None = None,
) -> None:
    """Run playbooks/vm.yml, then playbooks/smoke.yml, on the host; `on_done(book, progress)`
    after each playbook that succeeded."""
    with tempfile.TemporaryDirectory(prefix="gpubake-host-") as tmp:
        variables = ansible_variables(plan, Path(tmp))  # with --wheelhouse, the lock too
        vars_file = ansible.write_vars(Path(tmp) / "ansible-vars.json", variables)
        # check mode installs nothing, so gpu-smoke then runs from gpubake itself (run_smoke)
        playbooks = ["vm.yml"] if check else ["vm.yml", "smoke.yml"]
        args = [
            *inventory(plan.target, login),
            "--become",
            "-e",
            f"@{vars_file}",
            *(["--check", "--diff"] if check else []),
        ]
        for book in playbooks:
            try:
                progress = ansible.run_playbook(book, args, on_line)
            except ansible.AnsibleError as exc:
                raise HostError(str(exc)) from None
            if on_done is not None:
                on_done(book, progress)


SMOKE_SOURCE = Path("roles") / "gpu_smoke_test" / "files" / "gpu_smoke.py"


def run_smoke(login: SshLogin | None, args: list[str]) -> int:
    """Run gpubake's own gpu_smoke.py on this machine (login None) or over ssh, with the
    GPU data."""
    source = data_root() / SMOKE_SOURCE
    gpus = json.dumps(stacks.gpus_data())
    if login is None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            fh.write(gpus)
        try:
            cmd = [sys.executable, str(source), "--gpus-file", fh.name, *args]
            return subprocess.run(cmd, check=False).returncode
        finally:
            Path(fh.name).unlink()
    quoted = " ".join(shlex.quote(arg) for arg in args)
    remote = (
        f'f=$(mktemp) && printf %s {shlex.quote(gpus)} >"$f" && '
        f'python3 - --gpus-file "$f" {quoted}; rc=$?; rm -f "$f"; exit $rc'
    )
    with source.open("rb") as stdin:
        return subprocess.run([*ssh_command(login), remote], stdin=stdin, check=False).returncode
