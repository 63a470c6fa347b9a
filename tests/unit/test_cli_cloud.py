"""Cloud and host targets: every bad input stops before anything starts, in one line."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No cloud settings or credentials; HOME is an empty directory."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GOOGLE_", "CLOUDSDK_"))
    }
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    env.update(extra)
    return env


def fake_cli(tmp_path: Path, name: str) -> str:
    """A stand-in for gcloud/aws that must never be reached by these tests."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    tool = bindir / name
    tool.write_text(f"#!/bin/sh\necho '{name} must not run in this test' >&2\nexit 99\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return f"{bindir}:{os.environ['PATH']}"


#: A well-formed GCP project id (6-30 characters): gpubake refuses others before anything.
PROJECT = "my-project-1"


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "build.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
        check=False,
    )


def one_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpubake: error: ")
    assert needle in lines[0], lines[0]


def test_gcp_needs_a_project(tmp_path):
    one_error(
        run(clean_env(tmp_path), "--target", "gcp-image", "--zone", "us-central1-a"),
        "--project is required for gcp-image",
    )


def test_gcp_needs_a_zone(tmp_path):
    one_error(
        run(clean_env(tmp_path), "--target", "gcp-image", "--project", "p"),
        "--zone is required for gcp-image",
    )


def test_aws_needs_a_region(tmp_path):
    one_error(run(clean_env(tmp_path), "--target", "aws-ami"), "--region is required for aws-ami")


def test_disk_smaller_than_the_stack_needs(tmp_path):
    proc = run(
        clean_env(tmp_path), "--target", "aws-ami", "--region", "us-east-1", "--disk-size", "20"
    )
    one_error(proc, "--disk-size 20 GB is too small for stack 'pytorch': it needs at least")


def test_missing_gcp_credentials(tmp_path):
    # no cloud CLI is needed (or run): Application Default Credentials through google.auth
    env = clean_env(tmp_path, PATH=fake_cli(tmp_path, "gcloud"))
    one_error(
        run(env, "--target", "gcp-image", "--project", PROJECT, "--zone", "us-central1-a"),
        "no GCP credentials: run `gcloud auth application-default login`",
    )


@pytest.mark.parametrize(
    ("profile", "needle"),
    [
        ("team", "--profile team: no such profile in ~/.aws/config or ~/.aws/credentials"),
        (None, "no AWS credentials (profile default): set AWS_ACCESS_KEY_ID"),
    ],
)
def test_missing_aws_credentials(tmp_path, profile, needle):
    env = clean_env(tmp_path, PATH=fake_cli(tmp_path, "aws"), AWS_EC2_METADATA_DISABLED="true")
    args = ("--target", "aws-ami", "--region", "us-east-1")
    one_error(run(env, *args, *(("--profile", profile) if profile else ())), needle)


def test_gpu_the_cloud_does_not_offer(tmp_path):
    one_error(
        run(clean_env(tmp_path), "--target", "gcp-image", "--gpu", "a10g"),
        "GPU a10g is not offered on GCP",
    )
    one_error(
        run(clean_env(tmp_path), "--target", "aws-ami", "--stack", "mxnet", "--gpu", "p100"),
        "GPU p100 is not offered on AWS",
    )


def test_open_module_forced_on_pre_turing(tmp_path):
    one_error(
        run(
            clean_env(tmp_path),
            "--target",
            "aws-ami",
            "--stack",
            "mxnet",
            "--gpu",
            "v100",
            "--var",
            "open_kernel_module=true",
        ),
        "the open kernel module does not support v100",
    )


def test_options_of_another_target(tmp_path):
    one_error(
        run(clean_env(tmp_path), "--target", "docker", "--project", "p"),
        "--project applies to --target gcp-image only",
    )
    one_error(run(clean_env(tmp_path), "--target", "ssh"), "--target ssh needs --host")


def test_unreachable_ssh_host(tmp_path):
    # port 1 on loopback: nothing listens there, the connection is refused at once
    proc = run(clean_env(tmp_path), "--target", "ssh", "--host", "root@127.0.0.1:1")
    one_error(proc, "cannot log in to root@127.0.0.1:1 over ssh:")


def test_missing_ssh_key(tmp_path):
    one_error(
        run(
            clean_env(tmp_path),
            "--target",
            "ssh",
            "--host",
            "root@127.0.0.1:1",
            "--ssh-key",
            str(tmp_path / "nokey"),
        ),
        "--ssh-key",
    )


def test_known_hosts_goes_with_ssh_only(tmp_path):
    one_error(
        run(clean_env(tmp_path), "--target", "local", "--known-hosts", str(tmp_path / "kh")),
        "--known-hosts applies to --target ssh only",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gpubake", "smoke", "--known-hosts", str(tmp_path / "kh")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    one_error(proc, "--ssh-key and --known-hosts go with --host")


def test_known_hosts_in_a_missing_folder(tmp_path):
    proc = run(
        clean_env(tmp_path),
        "--target",
        "ssh",
        "--host",
        "root@127.0.0.1:1",
        "--known-hosts",
        str(tmp_path / "no" / "kh"),
    )
    one_error(proc, "its folder does not exist")


def test_host_dry_run_names_where_driver_and_toolkit_come_from(tmp_path):
    proc = run(
        clean_env(tmp_path),
        "--target",
        "ssh",
        "--host",
        "root@10.0.0.5",
        "--stack",
        "mxnet",
        "--var",
        "driver_source=distro",
        "--var",
        "cuda_source=distro",
        "--dry-run",
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "driver       branch 535, proprietary module, from the OS's packages; CUDA toolkit "
        "11.8 from the OS's packages" in proc.stdout
    )
    assert "applies      ansible-playbook playbooks/vm.yml, then playbooks/smoke.yml" in proc.stdout


def test_cloud_dry_run_prints_the_packer_command(tmp_path, have_packer):
    proc = run(
        clean_env(tmp_path),
        "--target",
        "gcp-image",
        "--project",
        PROJECT,
        "--zone",
        "us-central1-a",
        "--gpu",
        "l4",
        "--dry-run",
    )
    assert proc.returncode == 0, proc.stderr
    assert "g2-standard-4" in proc.stdout
    assert (
        "build -color=false -on-error=cleanup -only=googlecompute.gpubake -var-file=<work dir>/gcp"
        in (proc.stdout)
    )


def test_local_target_uses_gpubakes_python_where_the_system_has_none(monkeypatch, tmp_path):
    from gpubake.build import hosts

    monkeypatch.setattr(hosts, "SYSTEM_PYTHON", tmp_path / "no-python3")
    assert hosts.inventory("local", None) == [
        "-i",
        "localhost,",
        "-c",
        "local",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
    ]
    monkeypatch.setattr(hosts, "SYSTEM_PYTHON", Path(sys.executable))
    assert hosts.inventory("local", None) == ["-i", "localhost,", "-c", "local"]


def test_host_runs_find_the_collection_from_any_directory(tmp_path, monkeypatch):
    """ssh/local run ansible-playbook with gpubake's config and collection path: the
    playbooks' FQCN roles (gpubake.gpu.<role>) resolve wherever gpubake is run from."""
    from gpubake import resources
    from gpubake.build import ansible

    monkeypatch.chdir(tmp_path)
    env = ansible.run_env()
    link = Path(env["ANSIBLE_COLLECTIONS_PATH"]) / "ansible_collections" / "gpubake" / "gpu"
    assert link.resolve() == resources.data_root().resolve()
    assert env["ANSIBLE_CONFIG"] == str(resources.data_root() / "ansible.cfg")
    for book in ("vm.yml", "smoke.yml"):  # raises AnsibleError naming the failure if not
        ansible.run_playbook(book, ["--syntax-check", "-i", "localhost,"], lambda ln, _: None)
