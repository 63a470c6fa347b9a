"""gpubake.publish.registry against a real CNCF distribution registry (tests/registry.py):
tiny images pushed by the Docker Engine, read back without pulling layers, tags moved without
uploads; and a TLS + htpasswd registry for trust and credentials. No image is built."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gpubake.build import plan
from gpubake.publish import selection
from gpubake.publish.machine import GpuInfo, Machine
from gpubake.publish.registry import (
    MANIFEST_TYPES,
    OCI_INDEX,
    RegistryClient,
    RegistryError,
    RegistryRef,
    is_loopback,
    parse_registry,
)
from tests.registry import RunningRegistry, start_registry

USER, PASSWORD = "gpubake", "correct horse battery staple"


# -- references (no registry needed) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "namespace", "image"),
    [
        ("127.0.0.1:5000/gpubake", "127.0.0.1:5000", "gpubake", "127.0.0.1:5000/gpubake/pytorch"),
        ("registry.example.com/team/ml", "registry.example.com", "team/ml", None),
        ("localhost:5000", "localhost:5000", "", "localhost:5000/pytorch"),
        ("[::1]:5000/gpubake/", "[::1]:5000", "gpubake", None),
        ("Registry.Example.com/x", "registry.example.com", "x", None),
    ],
)
def test_parse_registry(text, host, namespace, image):
    ref = parse_registry(text)
    assert ref == RegistryRef(host, namespace)
    assert ref.repository("pytorch") == f"{namespace}/pytorch".lstrip("/")
    if image:
        assert ref.image("pytorch") == image


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("https://registry.example.com/ml", "give no scheme"),
        ("gpubake/pytorch", "'gpubake' does not look like a registry host"),
        ("registry.example.com/ML", "'ML' is not a valid namespace part"),
        ("registry.example.com:99999/ml", "port 99999 is out of range"),
        ("registry.example.com/ml:latest", "give no tag or digest"),
        ("bad_host.example.com/ml", "'bad_host.example.com' is not a host name"),
    ],
)
def test_parse_registry_refuses_in_one_line(text, problem):
    with pytest.raises(RegistryError) as exc:
        parse_registry(text)
    message = str(exc.value)
    assert problem in message
    assert message.endswith(
        "expected HOST[:PORT]/NAMESPACE, e.g. 127.0.0.1:5000/gpubake or "
        "registry.example.com/team/ml"
    )
    assert "\n" not in message


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1:5000", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]:5000", True),
        ("10.0.0.1:5000", False),
        ("registry.example.com", False),
        ("localhost.example.com:5000", False),
        ("128.0.0.1", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_insecure_is_refused_for_a_registry_not_on_localhost():
    with pytest.raises(RegistryError) as exc:
        RegistryClient("registry.example.com:5000", insecure=True)
    assert str(exc.value).startswith(
        "--insecure is only allowed for a registry on localhost (127.0.0.1, ::1), not "
        "registry.example.com:5000"
    )


def test_unreachable_registry():
    from tests.registry import free_port

    host = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RegistryError, match=rf"^cannot reach registry {host}: Connection refused$"):
        RegistryClient(host, insecure=True, timeout=5).check()


# -- a plain-HTTP registry on 127.0.0.1, images pushed by the Docker Engine -------------------


def docker(*args: str, timeout: int = 300) -> str:
    proc = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def labels_for(version: str, created: str) -> dict[str, str]:
    """The labels the build side sets, for a made-up pytorch image."""
    return {
        plan.STACK_LABEL: "pytorch",
        plan.FRAMEWORK_LABEL: "pytorch",
        plan.FRAMEWORK_VERSION_LABEL: "2.15.0",
        plan.CUDA_LABEL: "13.2",
        plan.MIN_DRIVER_LABEL: "580",
        plan.CC_LABEL: "7.5,8.0,8.6,8.9,9.0,10.0,12.0",
        plan.SMOKE_LABEL: "cpu-checked",
        plan.SMOKE_DIGEST_LABEL: "sha256:" + "0" * 64,
        plan.HASH_LABEL: "4e5d614f236a",
        plan.PYTHON_LABEL: "3.11",
        plan.OS_LABEL: "debian-12",
        plan.CREATED_LABEL: created,
        plan.VERSION_LABEL: version,
    }


class Images:
    """Tiny images made with `docker import` (a tar of a few files, labels by --change) and
    pushed to the registry; every local tag is removed at the end."""

    def __init__(self, registry: RunningRegistry) -> None:
        self.registry = registry
        self.namespace = f"gpubake-test-{uuid.uuid4().hex[:8]}"
        self.refs: list[str] = []

    def push(self, repo: str, tag: str, labels: dict[str, str], payload: str) -> str:
        """Import, tag, push; the digest `docker push` reported."""
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w") as tar:
            for name, text in (("etc/gpubake-test", payload), ("README", "gpubake test image\n")):
                info = tarfile.TarInfo(name)
                info.size = len(text.encode())
                info.mtime = 0
                tar.addfile(info, io.BytesIO(text.encode()))
        ref = f"{self.registry.host}/{self.namespace}/{repo}:{tag}"
        changes = [arg for k, v in labels.items() for arg in ("--change", f"LABEL {k}={v}")]
        proc = subprocess.run(
            ["docker", "import", *changes, "-", ref],
            input=data.getvalue(),
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        self.refs.append(ref)
        out = docker("push", ref)
        match = re.search(r"digest: (sha256:[0-9a-f]{64}) size: \d+", out)
        assert match, out
        return match.group(1)

    def cleanup(self) -> None:
        for ref in self.refs:
            subprocess.run(["docker", "rmi", "-f", ref], capture_output=True, check=False)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, engine) -> Iterator[RunningRegistry]:
    with start_registry(tmp_path_factory.mktemp("plain")) as registry:
        yield registry


@pytest.fixture(scope="module")
def pushed(plain) -> Iterator[dict]:
    """Two pytorch images (the second newer) in a fresh namespace of the plain registry."""
    images = Images(plain)
    try:
        first_tag = "2.15.0-cu132-py3.11-debian12-20261201-4e5d614f236a"
        second_tag = "2.15.0-cu132-py3.11-debian12-20261202-5f6e725a347b"
        first = images.push(
            "pytorch", first_tag, labels_for(first_tag, "2026-12-01T10:00:00Z"), "one\n"
        )
        second = images.push(
            "pytorch", second_tag, labels_for(second_tag, "2026-12-02T10:00:00Z"), "two\n"
        )
        yield {
            "repo": f"{images.namespace}/pytorch",
            "namespace": images.namespace,
            "first": (first_tag, first),
            "second": (second_tag, second),
        }
    finally:
        images.cleanup()


def raw_manifest(registry: RunningRegistry, repo: str, ref: str) -> tuple[dict, int]:
    """An image manifest as stored, and its size in bytes."""
    resp = requests.get(
        f"{registry.url}/v2/{repo}/manifests/{ref}",
        headers={"Accept": ", ".join(MANIFEST_TYPES)},
        timeout=10,
    )
    resp.raise_for_status()
    return resp.json(), len(resp.content)


def test_tags_catalog_and_digests_as_pushed(plain, pushed):
    client = RegistryClient(plain.host, insecure=True)
    client.check()
    repo = pushed["repo"]
    (first_tag, first), (second_tag, second) = pushed["first"], pushed["second"]
    assert repo in client.catalog()
    assert client.tags(repo) == sorted([first_tag, second_tag])
    assert client.tags(f"{pushed['namespace']}/no-such-stack") == []
    assert client.manifest_digest(repo, first_tag) == first
    assert client.manifest_digest(repo, second_tag) == second
    assert client.manifest_digest(repo, "no-such-tag") is None
    assert client.manifest_digest(repo, first) == first  # by digest too


def test_image_info_reads_labels_without_pulling_layers(plain, pushed):
    client = RegistryClient(plain.host, insecure=True)
    repo = pushed["repo"]
    tag, digest = pushed["first"]
    plain.mark()
    info = client.image_info(repo, tag, "amd64")
    assert info.digest == digest == info.platform_digest
    assert info.labels == labels_for(tag, "2026-12-01T10:00:00Z")
    assert (info.os, info.architecture) == ("linux", "amd64")
    assert info.created  # the config's own creation time
    manifest, _ = raw_manifest(plain, repo, tag)
    assert info.size == manifest["config"]["size"] + sum(x["size"] for x in manifest["layers"])
    # the only blob read is the config; no layer
    fetched = [path for _, path, _ in plain.blob_gets(plain.since_mark())]
    assert fetched == [f"/v2/{repo}/blobs/{manifest['config']['digest']}"]
    layers = {layer["digest"] for layer in manifest["layers"]}
    assert not any(path.endswith(tuple(layers)) for path in fetched)


def test_put_tag_moves_a_tag_without_uploading(plain, pushed):
    client = RegistryClient(plain.host, insecure=True)
    repo = pushed["repo"]
    (_, first), (_, second) = pushed["first"], pushed["second"]
    # the log does show uploads: those of `docker push` (the count below can be nonzero)
    assert any(repo in path for _, path, _ in plain.blob_uploads(plain.requests()))
    plain.mark()
    client.put_tag(repo, first, "2.15-cu132")
    assert client.manifest_digest(repo, "2.15-cu132") == first
    client.put_tag(repo, second, "2.15-cu132")  # moved on to the newer image
    assert client.manifest_digest(repo, "2.15-cu132") == second
    log = plain.since_mark()
    assert plain.blob_uploads(log) == []
    assert not any("/blobs/uploads/" in path for _, path, _ in log)  # not even started
    assert [e for e in log if e[0] == "PUT"] == [
        ("PUT", f"/v2/{repo}/manifests/2.15-cu132", 201),
        ("PUT", f"/v2/{repo}/manifests/2.15-cu132", 201),
    ]
    # selection sees one image for the two tags of the same digest
    infos = [client.image_info(repo, t, "amd64") for t in client.tags(repo)]
    sel = selection.choose(
        infos, "pytorch", Machine("580", (GpuInfo("H100", "9.0", "h100"),), "amd64")
    )
    assert sel.chosen.tag == pushed["second"][0]
    assert [v.aliases for v in sel.verdicts if v.image is sel.chosen] == [("2.15-cu132",)]


def test_put_tag_of_an_unknown_digest_fails_in_one_line(plain, pushed):
    client = RegistryClient(plain.host, insecure=True)
    missing = "sha256:" + "1" * 64
    with pytest.raises(RegistryError, match=rf"^{pushed['repo']}@{missing} is not in registry"):
        client.put_tag(pushed["repo"], missing, "latest")


def _upload(registry: RunningRegistry, repo: str, data: bytes) -> str:
    """A monolithic blob upload (POST, then PUT with the digest)."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = requests.post(f"{registry.url}/v2/{repo}/blobs/uploads/", timeout=10)
    assert start.status_code == 202, start.text
    location = requests.compat.urljoin(registry.url, start.headers["Location"])
    done = requests.put(location, params={"digest": digest}, data=data, timeout=10)
    assert done.status_code == 201, done.text
    return digest


def _put_manifest(registry: RunningRegistry, repo: str, ref: str, doc: dict) -> tuple[str, int]:
    body = json.dumps(doc).encode()
    resp = requests.put(
        f"{registry.url}/v2/{repo}/manifests/{ref}",
        data=body,
        headers={"Content-Type": doc["mediaType"]},
        timeout=10,
    )
    assert resp.status_code == 201, resp.text
    return "sha256:" + hashlib.sha256(body).hexdigest(), len(body)


def test_image_info_picks_the_platform_of_an_index(plain, pushed):
    """An OCI index of an amd64 and an arm64 image (the arm64 one made through the API: its
    config says arm64, its layer is the amd64 image's, never run)."""
    repo = pushed["repo"]
    tag, amd_digest = pushed["first"]
    amd, amd_size = raw_manifest(plain, repo, tag)
    config = requests.get(
        f"{plain.url}/v2/{repo}/blobs/{amd['config']['digest']}", timeout=10
    ).json()
    config["architecture"] = "arm64"
    arm_config = json.dumps(config).encode()
    arm = {
        **amd,
        "config": {
            **amd["config"],
            "digest": _upload(plain, repo, arm_config),
            "size": len(arm_config),
        },
    }
    arm_digest, arm_size = _put_manifest(plain, repo, "arm64-only", arm)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": amd["mediaType"],
                "digest": digest,
                "size": size,
                "platform": {"os": "linux", "architecture": arch},
            }
            for digest, size, arch in (
                (amd_digest, amd_size, "amd64"),
                (arm_digest, arm_size, "arm64"),
            )
        ],
    }
    index_digest, _ = _put_manifest(plain, repo, "multi", index)
    client = RegistryClient(plain.host, insecure=True)
    assert client.manifest_digest(repo, "multi") == index_digest
    on_arm = client.image_info(repo, "multi", "arm64")
    assert (on_arm.architecture, on_arm.platform_digest) == ("arm64", arm_digest)
    assert on_arm.digest == index_digest  # what a pull by digest names
    on_amd = client.image_info(repo, "multi", "amd64")
    assert (on_amd.architecture, on_amd.platform_digest) == ("amd64", amd_digest)
    assert on_amd.labels == labels_for(tag, "2026-12-01T10:00:00Z")
    # an arm64-only tag read for an amd64 machine says arm64: selection rejects it
    assert client.image_info(repo, "arm64-only", "amd64").architecture == "arm64"


def test_tls_client_against_a_plain_registry(plain):
    with pytest.raises(RegistryError, match=rf"^registry {plain.host} does not answer TLS"):
        RegistryClient(plain.host).check()


# -- TLS from a test CA, htpasswd users ------------------------------------------------------


@pytest.fixture(scope="module")
def secure(tmp_path_factory) -> Iterator[RunningRegistry]:
    with start_registry(
        tmp_path_factory.mktemp("secure"), tls=True, users={USER: PASSWORD}
    ) as registry:
        yield registry


def docker_config(directory: Path, host: str, user: str, password: str) -> Path:
    """A Docker config as `docker login host` writes it (base64 user:password)."""
    directory.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return directory


def test_tls_and_login(secure, tmp_path):
    config = docker_config(tmp_path / "docker", secure.host, USER, PASSWORD)
    client = RegistryClient(secure.host, docker_config_dir=config, certs_dir=secure.certs_dir)
    client.check()
    assert client.tags("gpubake/pytorch") == []
    assert client.catalog() == []


def test_docker_config_env(secure, tmp_path, monkeypatch):
    """The Docker config found through $DOCKER_CONFIG, as docker itself finds it."""
    config = docker_config(tmp_path / "docker", secure.host, USER, PASSWORD)
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    RegistryClient(secure.host, certs_dir=secure.certs_dir).check()


def test_credential_helper(secure, tmp_path, monkeypatch):
    """credHelpers: `docker-credential-<name> get` reads the server on stdin, answers JSON."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-gpubake-test"
    secret = {"ServerURL": secure.host, "Username": USER, "Secret": PASSWORD}
    helper.write_text(
        "#!/bin/sh\n"
        '[ "$1" = get ] || exit 1\n'
        f'read -r server; [ "$server" = "{secure.host}" ] || '
        "{ echo 'credentials not found in native keychain'; exit 1; }\n"
        f"echo '{json.dumps(secret)}'\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    config = tmp_path / "docker"
    config.mkdir()
    (config / "config.json").write_text(
        json.dumps({"auths": {secure.host: {}}, "credHelpers": {secure.host: "gpubake-test"}})
    )
    RegistryClient(secure.host, docker_config_dir=config, certs_dir=secure.certs_dir).check()


@pytest.mark.parametrize("case", ["no config", "no entry for this host", "wrong password"])
def test_login_failures_are_one_line(secure, tmp_path, case):
    config = tmp_path / "docker"
    if case == "no entry for this host":
        docker_config(config, "registry.example.com", USER, PASSWORD)
    elif case == "wrong password":
        docker_config(config, secure.host, USER, "wrong")
    client = RegistryClient(secure.host, docker_config_dir=config, certs_dir=secure.certs_dir)
    with pytest.raises(RegistryError) as exc:
        client.check()
    h = secure.host
    expected = (
        f"registry {h} refused the credentials of `docker login {h}` (wrong user or password?): "
        "log in again"
        if case == "wrong password"
        else f"registry {h} requires credentials: run `docker login {h}`"
    )
    assert str(exc.value) == expected


def test_untrusted_certificate(secure, tmp_path):
    config = docker_config(tmp_path / "docker", secure.host, USER, PASSWORD)
    empty = tmp_path / "certs.d"
    client = RegistryClient(secure.host, docker_config_dir=config, certs_dir=empty)
    with pytest.raises(RegistryError) as exc:
        client.check()
    message = str(exc.value)
    assert message.startswith(f"registry {secure.host} certificate not trusted (")
    assert message.endswith(f"put its CA in {empty}/{secure.host}/ca.crt")
    assert "\n" not in message


def test_insecure_client_against_a_tls_registry(secure):
    with pytest.raises(RegistryError, match=rf"^registry {secure.host} speaks TLS"):
        RegistryClient(secure.host, insecure=True).check()


# -- the Docker token protocol (Bearer), as Docker Hub, GHCR and Harbor use it --------------


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Iterator[RunningRegistry]:
    with start_registry(
        tmp_path_factory.mktemp("tokens"), tls=True, users={USER: PASSWORD}, token_auth=True
    ) as registry:
        yield registry


def test_bearer_token_with_the_login_credentials(tokens, tmp_path):
    config = docker_config(tmp_path / "docker", tokens.host, USER, PASSWORD)
    client = RegistryClient(tokens.host, docker_config_dir=config, certs_dir=tokens.certs_dir)
    client.check()
    assert client.tags("gpubake/pytorch") == []  # authorized, then 404: no such repository
    assert client.manifest_digest("gpubake/pytorch", "latest") is None
    assert client.catalog() == []
    # a token per scope, each asked for with the credentials of `docker login`
    assert tokens.tokens.issued == [
        (USER, []),
        (USER, ["repository:gpubake/pytorch:pull"]),
        (USER, ["registry:catalog:*"]),
    ]


@pytest.mark.parametrize("whose", ["the user's", "unknown"])
def test_bearer_token_for_an_identity_token(tokens, tmp_path, whose):
    """`docker login` to an OAuth2 registry stores an identity token, not a password: it is
    exchanged at the token service (a POST, grant_type=refresh_token), as docker does."""
    config = tmp_path / "docker"
    config.mkdir()
    identity = f"idt-{USER}" if whose == "the user's" else "idt-nobody"
    (config / "config.json").write_text(
        json.dumps({"auths": {tokens.host: {"auth": "", "identitytoken": identity}}})
    )
    client = RegistryClient(tokens.host, docker_config_dir=config, certs_dir=tokens.certs_dir)
    before = len(tokens.tokens.issued)
    if whose == "unknown":
        with pytest.raises(RegistryError, match="refused the credentials"):
            client.check()
        return
    client.check()
    assert client.tags("gpubake/pytorch") == []
    assert tokens.tokens.issued[before:] == [
        (f"{USER} (identity token)", []),
        (f"{USER} (identity token)", ["repository:gpubake/pytorch:pull"]),
    ]


def test_bearer_without_credentials_or_with_a_wrong_password(tokens, tmp_path):
    h = tokens.host
    anonymous = RegistryClient(h, docker_config_dir=tmp_path / "none", certs_dir=tokens.certs_dir)
    anonymous.check()  # /v2/ takes an anonymous token, as on Docker Hub
    with pytest.raises(RegistryError) as exc:
        anonymous.tags("gpubake/pytorch")
    assert str(exc.value) == f"registry {h} requires credentials: run `docker login {h}`"
    config = docker_config(tmp_path / "docker", h, USER, "wrong")
    wrong = RegistryClient(h, docker_config_dir=config, certs_dir=tokens.certs_dir)
    with pytest.raises(RegistryError) as exc:
        wrong.check()
    assert str(exc.value) == (
        f"registry {h} refused the credentials of `docker login {h}` (wrong user or "
        "password?): log in again"
    )


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"auths": {"reg.example:5000": {"auth": "bm9jb2xvbg=="}}}, "is malformed for"),
        ({"auths": {}, "credsStore": "gpubake-absent"}, "docker-credential-gpubake-absent not"),
        ({"auths": {}, "credHelpers": {"reg.example:5000": "gpubake-absent"}}, "install its"),
    ],
    ids=["auth without a colon", "absent credsStore", "absent credHelper"],
)
def test_a_broken_docker_config_is_one_line(tmp_path, config, needle, capfd):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RegistryError) as exc:
        RegistryClient("reg.example:5000", docker_config_dir=tmp_path)._credentials()
    message = str(exc.value)
    assert needle in message and "\n" not in message, message
    assert message.startswith(f"the Docker config {tmp_path}/config.json")
    assert capfd.readouterr().err == ""  # docker-py's own warning is not shown
