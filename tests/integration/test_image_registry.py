"""Publishing for real: the default image pushed to a real registry (Debian's CNCF
distribution registry on 127.0.0.1, tests/registry.py) and pulled back by digest with
`gpubake pull`, the way a user without a build machine gets it.

One module flow, in order: push (a CPU-checked image only with --allow-cpu-checked), push
again (no layer sent), remove the local image and pull it back by digest (gpu-smoke runs in
it), refuse an old driver; then LABEL-only variants of the image (no new layer) test the
immutable tag, the rolling tags and --explain, and one with a new layer is pushed and
killed midway. Last, a TLS + htpasswd registry, with a small image: refused without
credentials and with a wrong password, pushed after `docker login`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker.errors
import pytest

from gpubake import stacks
from gpubake.build import docker_engine
from gpubake.build import plan as plan_mod
from gpubake.publish.registry import RegistryClient
from tests.integration.helpers import ROOT, build_in
from tests.registry import RunningRegistry, start_registry
from tests.unit.test_cli import assert_one_line_error

pytestmark = [pytest.mark.docker, pytest.mark.slow]
TAG = "itest"
IMAGE = f"gpubake/pytorch:{TAG}"
NAMESPACE = "gpubake"
REPOSITORY = f"{NAMESPACE}/pytorch"
CERTS_D = Path("/etc/docker/certs.d")


def gpubake(
    *args: str, env: dict[str, str] | None = None, timeout: int = 1800
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpubake", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture(scope="module")
def built(engine):
    """The suite's default image (test_build.py builds it; skipped here as built)."""
    proc = build_in(ROOT, TAG, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return engine.images.get(IMAGE)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Iterator[RunningRegistry]:
    with start_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


def _rolling(image) -> list[str]:
    """The rolling tags an image's own labels give (e.g. 2.15-cu132, latest): torch and CUDA
    as the build recorded them, not as images/stacks.yml says today."""
    version = image.labels[plan_mod.FRAMEWORK_VERSION_LABEL]
    assert version == dict(stacks.resolve().packages)["torch"]
    return plan_mod.rolling_tags(version, image.labels[plan_mod.CUDA_LABEL])


def _where(reg: RunningRegistry) -> str:
    return f"{reg.host}/{NAMESPACE}"


def pull(reg: RunningRegistry, *args: str, driver: str, gpu: str):
    """`gpubake pull` from the plain-HTTP registry, for the machine --driver / --gpu state."""
    where = ["--registry", _where(reg), "--insecure", "--driver", driver, "--gpu", gpu]
    return gpubake("pull", *args, *where)


@pytest.fixture(scope="module")
def first_push(built, plain):
    where = _where(plain)
    refused = gpubake("push", "--registry", where, "--tag", TAG, "--insecure")
    tags_after_refusal = RegistryClient(plain.host, insecure=True).tags(REPOSITORY)
    plain.mark()
    proc = gpubake("push", "--registry", where, "--tag", TAG, "--insecure", "--allow-cpu-checked")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {
        "refused": refused,
        "tags_after_refusal": tags_after_refusal,
        "proc": proc,
        "uploads": plain.blob_uploads(plain.since_mark()),
        "pinned": proc.stdout.strip(),
    }


def _tags(engine) -> set[str]:
    """The local tags of gpubake/pytorch, under any registry's name (a push's temporary
    tags are such); only this module's group makes them, while other workers' tests tag
    images of their own."""
    return {t for i in engine.images.list() for t in i.tags if f"{REPOSITORY}:" in t}


def _digests(reg: RunningRegistry) -> dict[str, str]:
    client = RegistryClient(reg.host, insecure=True)
    return {tag: client.manifest_digest(REPOSITORY, tag) or "" for tag in client.tags(REPOSITORY)}


def test_a_cpu_checked_image_is_pushed_only_when_asked(first_push):
    assert_one_line_error(first_push["refused"], "--allow-cpu-checked")
    assert "was checked on a CPU only" in first_push["refused"].stderr
    assert first_push["tags_after_refusal"] == []  # nothing was pushed
    assert "--allow-cpu-checked: pushing gpubake/pytorch:itest" in first_push["proc"].stderr


def test_push_publishes_the_immutable_then_the_rolling_tags(built, plain, first_push):
    labels = built.labels
    immutable = labels[plan_mod.VERSION_LABEL]
    stack = stacks.resolve()
    rolling = _rolling(built)
    digest = first_push["pinned"].rsplit("@", 1)[1]
    assert first_push["pinned"] == f"{plain.host}/{REPOSITORY}@{digest}"
    assert _digests(plain) == {immutable: digest, **dict.fromkeys(rolling, digest)}
    assert first_push["uploads"], "the first push sent the layers"
    # the rolling tags were written after the immutable one, each with no blob sent
    puts = [p for m, p, s in plain.requests() if m == "PUT" and "/manifests/" in p]
    order = [p.rsplit("/", 1)[1] for p in puts]
    assert order[0] == immutable and set(order[1:3]) == set(rolling), order
    # what pulling needs is readable from the registry, without pulling a layer
    info = RegistryClient(plain.host, insecure=True).image_info(REPOSITORY, immutable, "amd64")
    assert info.config_digest == built.id
    assert info.labels[plan_mod.SMOKE_LABEL] == plan_mod.SMOKE_CPU_CHECKED
    assert info.labels[plan_mod.MIN_DRIVER_LABEL] == stack.driver_branch
    assert info.labels[plan_mod.SMOKE_DIGEST_LABEL].startswith("sha256:")
    assert "9.0" in info.labels[plan_mod.CC_LABEL].split(",")


def test_a_second_push_sends_no_layer(plain, first_push):
    where = _where(plain)
    plain.mark()
    proc = gpubake("push", "--registry", where, "--tag", TAG, "--insecure", "--allow-cpu-checked")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == first_push["pinned"]
    assert plain.blob_uploads(plain.since_mark()) == []
    assert "already holds this image" in proc.stderr and "nothing to send" in proc.stderr


def test_images_lists_the_registry_without_pulling(built, plain, first_push):
    plain.mark()
    proc = gpubake("images", "--registry", _where(plain), "--insecure")
    assert proc.returncode == 0, proc.stderr
    header, row = proc.stdout.splitlines()[:2]
    assert header.split()[:3] == ["STACK", "TAG", "VERSIONS"]
    assert row.startswith("pytorch ") and built.labels[plan_mod.VERSION_LABEL] in row
    assert "580+" in row and "h100" in row and first_push["pinned"].split("@")[1][:19] in row
    rows = json.loads(gpubake("images", "--registry", _where(plain), "--insecure", "--json").stdout)
    assert [r["stack"] for r in rows] == ["pytorch"] and sorted(rows[0]["aliases"]) == sorted(
        _rolling(built)
    )
    # only the image config was read: no layer blob
    gets = {p.rsplit("/", 1)[1] for _, p, _ in plain.blob_gets(plain.since_mark())}
    assert gets == {built.id}


def test_pull_chooses_by_driver_and_gpu_pulls_by_digest_and_runs_gpu_smoke(
    engine, built, plain, first_push
):
    original = built.id
    try:  # its own layer goes with it (on a fresh engine nothing is built on it yet)
        engine.images.remove(original, force=True)
    except docker.errors.APIError as exc:
        if "dependent child images" not in str(exc):
            raise
        pytest.skip(
            f"{IMAGE} has child images here (an earlier run's notebook images): it cannot be "
            "removed to be pulled back; a fresh engine (CI) runs this"
        )
    with pytest.raises(docker.errors.ImageNotFound):
        engine.images.get(original)
    try:
        proc = pull(plain, "pytorch", driver="580", gpu="h100")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip() == first_push["pinned"]
        assert f"pulling {first_push['pinned']}" in proc.stderr
        assert "gpu-smoke in" in proc.stderr and "0 failed" in proc.stderr
        assert "(no GPU: its CPU-side checks only)" in proc.stderr
        pulled = engine.images.get(first_push["pinned"])
        assert pulled.id == original  # the very image that was built
    finally:
        if docker_engine.local_image(engine, original) is not None:
            engine.images.get(original).tag("gpubake/pytorch", TAG)  # for the modules after


def test_pull_refuses_a_driver_older_than_every_image(plain, first_push):
    proc = pull(plain, driver="535", gpu="t4")
    assert_one_line_error(
        proc, "driver 535 is older than every pytorch image's minimum (580): update the driver"
    )
    assert "mxnet" in proc.stderr  # the stack that runs on it


def _variant(engine, name: str, labels: dict[str, str], *, new_layer_mb: int = 0) -> str:
    """gpubake/pytorch:<name>: the built image with other labels (no new layer), or with a
    layer of random bytes too."""
    lines = [f"FROM {IMAGE}"]
    if new_layer_mb:
        lines += [
            "USER root",
            f"RUN head -c {new_layer_mb * 1000000} /dev/urandom > /opt/filler",
            "USER gpubake",
        ]
    lines.append("LABEL " + " ".join(f"{k}={json.dumps(v)}" for k, v in labels.items()))
    image, _ = engine.images.build(
        fileobj=io.BytesIO("\n".join(lines).encode()), tag=f"gpubake/pytorch:{name}", rm=True
    )
    return image.id


@pytest.fixture(scope="module")
def variants(engine, built, first_push):
    immutable = built.labels[plan_mod.VERSION_LABEL]
    names = {
        # another image under the same immutable tag: a rebuild from identical inputs
        "changed": {"io.gpubake.test": "changed"},
        # and one from other inputs (another input hash)
        "other": {plan_mod.HASH_LABEL: "0" * 64},
        # a newer build: its own immutable tag, a later date
        "newer": {
            plan_mod.VERSION_LABEL: immutable + "-newer",
            plan_mod.CREATED_LABEL: "2099-01-01T00:00:00Z",
        },
        # newer still, but for a driver this machine lacks
        "needs595": {
            plan_mod.VERSION_LABEL: immutable + "-needs595",
            plan_mod.CREATED_LABEL: "2099-02-01T00:00:00Z",
            plan_mod.MIN_DRIVER_LABEL: "595",
        },
    }
    names["bigger"] = {
        plan_mod.VERSION_LABEL: immutable + "-bigger",
        plan_mod.CREATED_LABEL: "2099-03-01T00:00:00Z",
    }
    ids = {
        name: _variant(engine, name, labels, new_layer_mb=300 if name == "bigger" else 0)
        for name, labels in names.items()
    }
    yield ids
    # by id: a push (even a killed one) leaves the image a registry name and a digest too
    for image_id in ids.values():
        with contextlib.suppress(docker.errors.ImageNotFound):
            engine.images.remove(image_id, force=True)


@pytest.mark.parametrize(
    ("variant", "needle"),
    [
        ("changed", "already holds another build from identical inputs"),
        ("other", "already holds another image"),
    ],
)
def test_an_immutable_tag_is_never_moved(plain, first_push, variants, variant, needle):
    before = _digests(plain)
    where = ["--registry", _where(plain), "--insecure", "--allow-cpu-checked"]
    proc = gpubake("push", "--tag", variant, *where)
    assert_one_line_error(proc, needle)
    assert "an immutable tag is never moved" in proc.stderr
    assert _digests(plain) == before


def test_rolling_tags_move_to_a_newer_push(built, plain, first_push, variants):
    proc = gpubake(
        "push",
        "--registry",
        _where(plain),
        "--tag",
        "newer",
        "--insecure",
        "--allow-cpu-checked",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = proc.stdout.strip().rsplit("@", 1)[1]
    old = first_push["pinned"].rsplit("@", 1)[1]
    tags = _digests(plain)
    for name in _rolling(built):
        assert tags[name] == new != old
    assert old in tags.values()  # the first image keeps its immutable tag


def test_an_interrupted_push_leaves_the_rolling_tags(engine, built, plain, first_push, variants):
    """A push stopped by SIGINT, SIGTERM or SIGKILL while it sends a new layer: the rolling
    tags stay where they were, no temporary tag is left, and SIGINT and SIGTERM end with one
    "interrupted: ..." line."""
    for name in ("needs595",):
        proc = gpubake(
            "push",
            "--registry",
            _where(plain),
            "--tag",
            name,
            "--insecure",
            "--allow-cpu-checked",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    before = _digests(plain)
    tags_before = _tags(engine)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        plain.mark()
        push = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpubake",
                "push",
                "--registry",
                _where(plain),
                "--tag",
                "bigger",
                "--insecure",
                "--allow-cpu-checked",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and push.poll() is None:
                if any(m == "POST" for m, p, _ in plain.since_mark() if "/blobs/uploads/" in p):
                    break  # the new layer's upload has started
                time.sleep(0.2)
            assert push.poll() is None, "the push ended before its layer upload was seen"
            push.send_signal(sig)
        finally:
            _out, err = push.communicate(timeout=120)
        if sig != signal.SIGKILL:
            assert push.returncode == 128 + sig.value, err[-2000:]
            last = err.strip().splitlines()[-1]
            assert last.startswith(f"gpubake: error: interrupted: {sig.name} during the push"), last
            assert "Traceback" not in err
            assert _tags(engine) == tags_before
        rolling = _rolling(built)
        after = _digests(plain)
        assert {t: after[t] for t in rolling} == {t: before[t] for t in rolling}


def test_explain_lists_the_chosen_and_the_rejected(built, plain, first_push, variants):
    proc = pull(plain, "--explain", "--no-smoke", driver="580", gpu="h100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    chosen = [line for line in lines if line.startswith("chosen")]
    rejected = [line for line in lines if line.startswith("no ")]
    assert len(chosen) == 1 and "-newer" in chosen[0], lines
    assert any("-needs595" in line and "595" in line for line in rejected), lines
    assert any(line.startswith("fits") for line in lines), lines  # the first, older image
    # the newest image this machine can run; the rolling tags name a newer one it cannot
    newer = _digests(plain)[built.labels[plan_mod.VERSION_LABEL] + "-newer"]
    assert lines[-1] == f"{plain.host}/{REPOSITORY}@{newer}"


@pytest.fixture(scope="module")
def secure(tmp_path_factory) -> Iterator[RunningRegistry]:
    with start_registry(
        tmp_path_factory.mktemp("secure"), tls=True, users={"gpubake": "s3cret"}
    ) as reg:
        trust = CERTS_D / reg.host  # where the Docker Engine and gpubake look for its CA
        trust.mkdir(parents=True, exist_ok=True)
        assert reg.ca_cert_path is not None
        shutil.copyfile(reg.ca_cert_path, trust / "ca.crt")
        try:
            yield reg
        finally:
            shutil.rmtree(trust, ignore_errors=True)


@pytest.fixture(scope="module")
def small(engine, built):
    """A small gpubake-labelled image (the base image with the built image's labels)."""
    base, _id, _note = docker_engine.ensure_base_image(engine, stacks.resolve().os, None, print)
    labels = dict(built.labels)
    labels[plan_mod.VERSION_LABEL] += "-small"
    dockerfile = f"FROM {base}\nLABEL " + " ".join(
        f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())
    )
    image, _ = engine.images.build(
        fileobj=io.BytesIO(dockerfile.encode()), tag="gpubake/pytorch:small", rm=True
    )
    yield image
    engine.images.remove("gpubake/pytorch:small", force=True)


def _login_config(directory: Path, host: str, user: str, password: str) -> Path:
    """A Docker config as `docker login` leaves it, for a password that has changed since."""
    import base64

    directory.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return directory


def test_push_to_a_tls_registry_with_auth(secure, small, tmp_path):
    where = f"{secure.host}/{NAMESPACE}"
    push = ["push", "--registry", where, "--tag", "small", "--allow-cpu-checked"]
    client = RegistryClient(
        secure.host,
        docker_config_dir=_login_config(tmp_path / "right", secure.host, "gpubake", "s3cret"),
    )
    # no credentials at all
    none = gpubake(*push, env={"DOCKER_CONFIG": str(tmp_path / "empty")})
    assert_one_line_error(none, f"registry {secure.host} requires credentials: run `docker login")
    # credentials of an earlier login whose password no longer holds
    wrong = _login_config(tmp_path / "wrong", secure.host, "gpubake", "old-password")
    refused = gpubake(*push, env={"DOCKER_CONFIG": str(wrong)})
    assert_one_line_error(refused, "refused the credentials")
    assert client.tags(REPOSITORY) == []  # nothing was pushed
    assert secure.blob_uploads(secure.requests()) == []
    # `docker login` for real (the engine checks the password over TLS), then push
    config = tmp_path / "docker"
    login = subprocess.run(
        [
            "docker",
            "--config",
            str(config),
            "login",
            secure.host,
            "-u",
            "gpubake",
            "--password-stdin",
        ],
        input="s3cret",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert login.returncode == 0, login.stderr
    proc = gpubake(*push, env={"DOCKER_CONFIG": str(config)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    digest = proc.stdout.strip().rsplit("@", 1)[1]
    assert client.manifest_digest(REPOSITORY, small.labels[plan_mod.VERSION_LABEL]) == digest
    # and --insecure is refused for any registry not on this machine
    remote = gpubake("push", "--registry", "registry.example.com/ml", "--insecure")
    assert_one_line_error(remote, "--insecure is only allowed for a registry on localhost")
