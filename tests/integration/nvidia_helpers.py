"""Helpers for the nvidia_driver / cuda / nvidia_repo tests.

- `render`: evaluate the roles' own variables and templates with ansible-playbook on the local
  machine (connection local, facts given, nothing installed), for the unit tests.
- `apply_json`: ansible-playbook against a container with the JSON callback, so a test can read
  each task's result (check mode, diffs, messages) instead of scraping text.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES = ROOT / "roles"
HOST_KERNEL = os.uname().release


def _env(**extra: str) -> dict[str, str]:
    from gpubake import resources

    return {
        **os.environ,
        **resources.ansible_env(),
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_NOCOLOR": "1",
        **extra,
    }


def _facts(distribution: str, version: str, release: str, arch: str = "x86_64") -> dict[str, Any]:
    return {
        "distribution": distribution,
        "distribution_version": version,
        "distribution_major_version": version.split(".")[0],
        "distribution_release": release,
        "os_family": "Debian",
        "architecture": arch,
        "kernel": HOST_KERNEL,
        "virtualization_type": "kvm",
        "virtualization_role": "guest",
        "packages": {},
    }


# The OSes the roles support, as Ansible's facts describe them.
OS_FACTS: dict[str, dict[str, Any]] = {
    "debian12": _facts("Debian", "12.15", "bookworm"),
    "ubuntu2204": _facts("Ubuntu", "22.04", "jammy"),
    "ubuntu2404": _facts("Ubuntu", "24.04", "noble"),
    "ubuntu2404_arm": _facts("Ubuntu", "24.04", "noble", "aarch64"),
}


def render(
    tmp_path: Path,
    hosts: Mapping[str, Mapping[str, Any]],
    tasks: Sequence[Mapping[str, Any]],
    *,
    roles: Sequence[str] = ("nvidia_repo", "nvidia_driver", "cuda"),
    expect_failure: bool = False,
) -> dict[str, Any]:
    """Run `tasks` on local pseudo-hosts with the given facts after loading each role's variables
    (its own tasks/vars.yml, so the per-OS first_found dispatch is the role's). The tasks leave
    what they computed in `gpubake_out` (templates through the template lookup: no module runs);
    return {host: gpubake_out}."""
    inventory = {
        "all": {
            "hosts": {
                name: {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
                for name in hosts
            }
        }
    }
    load = [
        {
            "name": f"Load {role}'s variables",
            "ansible.builtin.include_role": {
                "name": f"gpubake.gpu.{role}",
                "tasks_from": "vars.yml",
                "public": True,
            },
        }
        for role in roles
    ]
    write = {"name": "Print what was computed", "ansible.builtin.debug": {"var": "gpubake_out"}}
    # the facts as a play variable (inventory variables cannot set ansible_facts)
    plays = [
        {
            "name": "render",
            "hosts": "all",
            "gather_facts": False,
            "vars": {
                "gpubake_facts": {name: dict(facts) for name, facts in hosts.items()},
                "ansible_facts": "{{ gpubake_facts[inventory_hostname] }}",
            },
            "tasks": [*load, *tasks, write],
        }
    ]
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory), encoding="utf-8")
    (tmp_path / "play.yml").write_text(yaml.safe_dump(plays, sort_keys=False), encoding="utf-8")
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(tmp_path / "inventory.yml"),
            str(tmp_path / "play.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(ANSIBLE_FORKS="8", ANSIBLE_STDOUT_CALLBACK="ansible.posix.json"),
        cwd=ROOT,
        check=False,
    )
    if not expect_failure:
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.find("{") :])
    printed = report["plays"][0]["tasks"][-1]["hosts"]
    return {name: printed[name]["gpubake_out"] for name in hosts if name in printed}


def apply_json(
    box: Any,
    playbook: Path,
    extra_vars: Mapping[str, Any],
    *,
    check: bool = False,
    diff: bool = False,
    timeout: int = 2400,
) -> tuple[dict[str, Any], str]:
    """ansible-playbook against a container, JSON callback; returns (report, raw output).
    Fails the test unless ansible-playbook exits 0."""
    report, proc_out, rc = _run_json(
        box, playbook, extra_vars, check=check, diff=diff, timeout=timeout
    )
    assert rc == 0, proc_out[-8000:]
    return report, proc_out


def apply_json_failing(
    box: Any, playbook: Path, extra_vars: Mapping[str, Any], *, timeout: int = 1200
) -> dict[str, Any]:
    """The same, for a run that must fail: returns the report."""
    report, proc_out, rc = _run_json(
        box, playbook, extra_vars, check=False, diff=False, timeout=timeout
    )
    assert rc != 0, proc_out[-8000:]
    return report


def _run_json(
    box: Any,
    playbook: Path,
    extra_vars: Mapping[str, Any],
    *,
    check: bool,
    diff: bool,
    timeout: int,
) -> tuple[dict[str, Any], str, int]:
    vars_file = Path(f"/tmp/{box.name}-nvidia-vars.json")
    vars_file.write_text(json.dumps(dict(extra_vars)), encoding="utf-8")
    cmd = [
        str(Path(sys.executable).parent / "ansible-playbook"),
        "-i",
        f"{box.name},",
        "-e",
        "ansible_connection=community.docker.docker",
        "-e",
        f"@{vars_file}",
        str(playbook),
    ]
    cmd += ["--check"] if check else []
    cmd += ["--diff"] if diff else []
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(ANSIBLE_STDOUT_CALLBACK="ansible.posix.json"),
            cwd=ROOT,
            check=False,
        )
    finally:
        vars_file.unlink(missing_ok=True)
    start = proc.stdout.find("{")
    report = json.loads(proc.stdout[start:]) if start >= 0 else {}
    return report, proc.stdout + proc.stderr, proc.returncode


def task_results(report: Mapping[str, Any], host: str) -> list[tuple[str, dict[str, Any]]]:
    """(task name, result) for every task the host ran, in order."""
    results = []
    for play in report.get("plays", []):
        for task in play.get("tasks", []):
            result = task.get("hosts", {}).get(host)
            if result is not None:
                results.append((task["task"]["name"], result))
    return results


def results_named(report: Mapping[str, Any], host: str, name: str) -> list[dict[str, Any]]:
    return [result for task, result in task_results(report, host) if task == name]


def messages(report: Mapping[str, Any], host: str) -> list[str]:
    """Every msg a task printed (debug reports, failures), loop items included."""
    found: list[str] = []
    for _task, result in task_results(report, host):
        for item in [result, *result.get("results", [])]:
            msg = item.get("msg")
            if isinstance(msg, str):
                found.append(msg)
    return found


def stats(report: Mapping[str, Any], host: str) -> dict[str, int]:
    return report["stats"][host]


PLAYBOOK = Path(__file__).with_name("role_test.yml")


# ---- a local stand-in for NVIDIA's CUDA repository -----------------------------------------------


@dataclass
class StandIn:
    """A flat apt repository laid out like NVIDIA's (<base>/debian12/x86_64/), signed with a
    throwaway key, serving a cuda-keyring package and an empty cuda-drivers-580."""

    root: Path  # the tree to copy into the container at /srv
    good: str  # fingerprint of the key the repository is signed with and its keyring holds
    other: str  # fingerprint of a second key
    gnupg: Path


def _gpg(home: Path, *args: str, data: bytes | None = None) -> bytes:
    batch = ["--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
    return subprocess.run(
        ["gpg", "--homedir", str(home), *batch, *args],
        input=data,
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout


def _new_key(home: Path, uid: str) -> str:
    _gpg(home, "--quick-gen-key", uid, "ed25519", "sign", "never")
    listing = _gpg(home, "--with-colons", "--list-keys", uid).decode()
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))


def _deb(folder: Path, package: str, files: Mapping[str, bytes]) -> None:
    tree = folder / f"{package}-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {'1.1-1' if package == 'cuda-keyring' else '1.0'}\n"
        "Architecture: all\nMaintainer: gpubake tests <tests@example.invalid>\n"
        f"Description: stand-in for NVIDIA's {package}\n",
        encoding="utf-8",
    )
    for path, content in files.items():
        target = tree / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    name = "cuda-keyring_1.1-1_all.deb" if package == "cuda-keyring" else f"{package}_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(folder / name)],
        capture_output=True,
        check=True,
        timeout=120,
    )
    shutil.rmtree(tree)


def sign_repo(stand_in: StandIn, folder: Path, fingerprint: str) -> None:
    """(Re)write Release and InRelease of a flat repository folder, signed by `fingerprint`."""
    packages = (folder / "Packages").read_bytes()
    release = (
        "Origin: gpubake-test\nLabel: gpubake-test\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S UTC', time.gmtime())}\n"
        f"SHA256:\n {hashlib.sha256(packages).hexdigest()} {len(packages)} Packages\n"
    ).encode()
    (folder / "Release").write_bytes(release)
    signed = _gpg(stand_in.gnupg, "--local-user", fingerprint, "--clearsign", data=release)
    (folder / "InRelease").write_bytes(signed)


def make_stand_in(work: Path) -> StandIn:
    """Two repositories under work/root/srv: nvidia/ (keyring holds the signing key) and bad/
    (keyring holds another key)."""
    home = work / "gnupg"
    home.mkdir(mode=0o700)
    good = _new_key(home, "stand-in cudatools <good@example.invalid>")
    other = _new_key(home, "someone else <other@example.invalid>")
    stand_in = StandIn(work / "root", good, other, home)
    for base, key in (("nvidia", good), ("bad", other)):
        folder = stand_in.root / "srv" / base / "debian12" / "x86_64"
        folder.mkdir(parents=True)
        keyring = _gpg(home, "--export", key)
        entry = (
            "deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] "
            f"file:///srv/{base}/debian12/x86_64/ /\n"
        )
        _deb(
            folder,
            "cuda-keyring",
            {
                "/usr/share/keyrings/cuda-archive-keyring.gpg": keyring,
                "/etc/apt/sources.list.d/cuda-debian12-x86_64.list": entry.encode(),
            },
        )
        _deb(folder, "cuda-drivers-580", {})
        scan = subprocess.run(
            ["dpkg-scanpackages", "--multiversion", "."],
            cwd=folder,
            capture_output=True,
            check=True,
            timeout=120,
        )
        (folder / "Packages").write_bytes(scan.stdout)
        sign_repo(stand_in, folder, good)
    return stand_in


def stop_gpg_agent(stand_in: StandIn) -> None:
    subprocess.run(
        ["gpgconf", "--homedir", str(stand_in.gnupg), "--kill", "all"], check=False, timeout=60
    )


def tar_tree(root: Path) -> bytes:
    """A tar of everything under root, for container.put_archive('/')."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
    return buffer.getvalue()
