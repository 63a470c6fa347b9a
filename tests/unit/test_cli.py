"""The command line: bad input stops before anything starts, with one line and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpubake import stacks
from tests.engine_proxy import engine_proxy

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, env: dict[str, str] | None = None, timeout: int = 120):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / "build.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
        check=False,
    )


def no_engine_env(tmp_path: Path) -> dict[str, str]:
    return {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}


def fake_bundle(tmp_path: Path) -> str:
    path = tmp_path / "not-pem.txt"
    path.write_text("this is not a certificate\n")
    return str(path)


BAD_INPUTS = [
    (["--gpu", "k80"], "GPU k80 (kepler, sm_37) has no kernels in stack 'pytorch'"),
    (["--stack", "nope"], "unknown stack 'nope'"),
    (["--os", "centos-7"], "unknown OS 'centos-7'"),
    (["--gpu", "rtx9999"], "unknown GPU 'rtx9999'"),
    (["--var", "novalue"], "is not KEY=VALUE"),
    (["--var", "colour=blue"], "--var key 'colour' is unknown"),
    (["--var", "driver_branch=535"], "driver branch 535 is too old for CUDA 13.2"),
    (["--stack", "mxnet", "--os", "ubuntu-24.04"], "stack 'mxnet' needs Python"),
    (
        ["--stack", "mxnet", "--gpu", "m60", "--var", "open_kernel_module=true"],
        "the open kernel module does not support m60",
    ),
    (["--ca-bundle", "/nonexistent/ca.pem"], "no such file"),
    (["--ca-bundle", "{not_pem}"], "holds no PEM certificate"),
    (["--tag", "-bad"], "is not a valid Docker tag"),
    (["--target", "nowhere"], "Invalid value for '--target'"),
    (["--frobnicate"], "No such option '--frobnicate'"),
    (["--var", "packages.torch=latest"], "is not a version number"),
    # malformed cloud and host values: refused before any tool, credential or login is tried
    *(
        (["--target", "gcp-image", "--project", bad, "--zone", "us-central1-a"], needle)
        for bad, needle in (
            ("My_Project", "--project 'My_Project' is not a GCP project id"),
            ("abcde", "is not a GCP project id: 6 to 30"),  # too short
            ("a" * 31, "is not a GCP project id"),  # too long
            ("1project", "is not a GCP project id"),  # starts with a digit
            ("my-project-", "is not a GCP project id"),  # ends with a hyphen
        )
    ),
    (
        ["--target", "gcp-image", "--project", "my-project-1", "--zone", "us-central1"],
        "--zone 'us-central1' is not a GCP zone: write region and zone letter, e.g. us-central1-a",
    ),
    (
        ["--target", "gcp-image", "--project", "my-project-1", "--zone", "central-a"],
        "is not a GCP zone",
    ),
    (["--target", "aws-ami", "--region", "us-east"], "--region 'us-east' is not an AWS region"),
    (["--target", "aws-ami", "--region", "US-EAST-1"], "is not an AWS region"),
    (["--target", "ssh", "--host", "user@"], "--host 'user@' has no host name"),
    (["--target", "ssh", "--host", "@"], "--host '@' has no host name"),
    (["--target", "ssh", "--host", ":22"], "--host ':22' has no host name"),
    (["--target", "ssh", "--host", "root@10.0.0.5:0"], "port '0' is not a number from 1 to 65535"),
    (["--target", "ssh", "--host", "root@10.0.0.5:65536"], "is not a number from 1 to 65535"),
    (["--target", "ssh", "--host", "root@10.0.0.5:ssh"], "is not a number from 1 to 65535"),
    (["--target", "ssh", "--host", "::1"], "write an IPv6 address in brackets"),
    # empty values are mistakes (an unset shell variable), not "use the default"
    (["--stack", ""], "Invalid value for '--stack': is empty"),
    (["--gpu", ""], "Invalid value for '--gpu': is empty"),
    (["--base-image", ""], "Invalid value for '--base-image': is empty"),
    (["--os", " "], "Invalid value for '--os': is empty"),
    (["--target", "ssh", "--host", ""], "Invalid value for '--host': is empty"),
    (["--target", "aws-ami", "--region", ""], "Invalid value for '--region': is empty"),
]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    """A refusal as users must see it: non-zero exit, one `gpubake: error:` line, no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpubake: error: ")
    assert needle in lines[0]


@pytest.mark.parametrize(("args", "needle"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_starts_nothing(args, needle, tmp_path):
    args = [a.replace("{not_pem}", fake_bundle(tmp_path)) for a in args]
    # DOCKER_HOST is a socket that records and drops what it is asked: had the CLI got as far
    # as starting anything, it would have asked it, and failed on it instead of on the input.
    with engine_proxy(tmp_path, upstream=None) as engine:
        proc = run(*args, env=engine.env)
    assert_one_line_error(proc, needle)
    assert proc.stdout == ""
    assert engine.requests == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["render", "--target", "gcp-image", "--project", "x", "--out", "{out}"], "project id"),
        (["render", "--target", "aws-ami", "--region", "nowhere", "--out", "{out}"], "region"),
        (["render", "--target", "ssh", "--out", "{out}"], "--target ssh uses no Packer"),
        (["render", "--stack", "", "--out", "{out}"], "'--stack': is empty"),
        (["smoke", "--host", "user@"], "--host 'user@' has no host name"),
        (["smoke", "--host", "h:99999"], "is not a number from 1 to 65535"),
    ],
)
def test_render_and_smoke_refuse_bad_input(args, needle, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "gpubake", *[a.replace("{out}", str(out)) for a in args]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert_one_line_error(proc, needle)
    assert not out.exists()


def test_unreachable_engine_is_one_line(tmp_path):
    proc = run("--dry-run", env=no_engine_env(tmp_path))
    assert proc.returncode == 1
    expected = "gpubake: error: Docker Engine not reachable: start dockerd"
    assert proc.stderr.strip().startswith(expected)
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_packer_is_one_line(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    proc = run("--dry-run", env={"PATH": str(bindir)})
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "gpubake: error: packer not found on PATH: install it (Debian: apt-get install packer)"
    )


def test_help_explains():
    proc = run("--help")
    assert proc.returncode == 0
    for option in (
        "--target",
        "--stack",
        "--gpu",
        "--os",
        "--var",
        "--ca-bundle",
        "--force",
        "--dry-run",
        "--base-image",
        "--tag",
        "--json",
    ):
        assert option in proc.stdout


def test_stacks_lists_every_stack():
    proc = subprocess.run(
        [sys.executable, "-m", "gpubake", "stacks", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    data = {s["name"]: s for s in json.loads(proc.stdout)}
    assert set(data) == set(stacks.stacks_data()["stacks"])
    assert {"pytorch", "pytorch-legacy", "fastai", "fastai-legacy", "mxnet"} <= set(data)
    assert data["pytorch"]["packages"]["torch"] == "2.15.0"
    # a derived stack has its parent's packages and its own, and adds its stages on top
    assert data["fastai"]["parent"] == "pytorch-notebook"
    assert (
        data["fastai"]["packages"]["jupyterlab"]
        == data["pytorch-notebook"]["packages"]["jupyterlab"]
    )
    assert data["fastai"]["stages"] == "pytorch-notebook + env -> finish"
    assert data["pytorch"]["stages"] == "os -> cuda -> env -> finish"
    text = subprocess.run(
        [sys.executable, "-m", "gpubake", "stacks"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    assert "pytorch (default)" in text
    assert "from pytorch: built on its image" in text
    assert "container stages: pytorch-notebook + env -> finish" in text
    assert data["fastai-legacy"]["kernels"][:2] == ["5.0", "6.0"]
    assert (
        "    kernels for sm_50 to sm_90\n" in text and "    kernels for sm_75 to sm_120\n" in text
    )
    ubuntu = subprocess.run(
        [sys.executable, "-m", "gpubake", "stacks", "--os", "ubuntu-24.04"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    assert "mxnet: not available: stack 'mxnet' needs Python" in ubuntu


@pytest.mark.docker
def test_dry_run_json_starts_nothing(engine, have_packer, tmp_path):
    with engine_proxy(tmp_path) as proxy:  # the real engine, its requests recorded
        proc = run("--dry-run", "--json", "--gpu", "t4", env=proxy.env)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["image"] == "gpubake/pytorch:latest"
    assert plan["stack"]["gpu"]["key"] == "t4"
    assert len(plan["input_hash"]) == 64
    assert "packer build -color=false -on-error=cleanup -var-file=" in plan["packer_command"]
    assert proxy.starting() == []


def _gpubake(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpubake", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        cwd=ROOT,
        check=False,
    )


def test_the_engine_stopping_mid_command_is_one_line(tmp_path):
    """The engine answers the connection's first requests (version, ping), then stops: the
    command's next request is dropped, as when dockerd is stopped or crashes."""
    for debug in ((), ("--debug",)):
        (tmp_path / "engine.sock").unlink(missing_ok=True)
        with engine_proxy(tmp_path, stop_after=2) as engine:
            proc = _gpubake(*debug, "scan", "gpubake/base:debian-12", env=engine.env)
        assert engine.stopped.is_set() and len(engine.requests) == 3, engine.requests
        if debug:  # the traceback, for a bug report
            assert proc.returncode != 0 and "Traceback" in proc.stderr
            assert "requests.exceptions.ConnectionError" in proc.stderr
        else:
            assert_one_line_error(
                proc, "the Docker Engine stopped answering in the middle of the command"
            )
            assert "--debug shows the traceback" in proc.stderr


@pytest.mark.skipif(
    os.geteuid() != 0, reason="a read-only bind mount in a private mount namespace needs root"
)
def test_a_read_only_cache_is_one_line(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    mount = f"mount --bind {cache} {cache} && mount -o remount,bind,ro {cache}"
    proc = subprocess.run(
        # unshare -m: the mount is this process's own and goes with it
        ["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh", sys.executable, "-m",
         "gpubake", "build", "--target", "docker", "--dry-run"],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
        env={**os.environ, "XDG_CACHE_HOME": str(cache)},
    )  # fmt: skip
    assert_one_line_error(
        proc,
        f"{cache}/gpubake: Read-only file system: gpubake keeps its caches in {cache}/gpubake: "
        "make it writable, or set XDG_CACHE_HOME",
    )
