"""gpubake.publish.scan's rules on small layer tars built here, its docker-save parsing, the cache
and the allowlist (the Docker Engine side is in tests/integration/test_scan.py)."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import string
import subprocess
import tarfile
from pathlib import Path

import pytest

from gpubake.publish import scan

RULES = scan.load_rules()
CA_DIR = RULES.build_ca_dir


def fake(alphabet: str, n: int) -> str:
    """Made up at test time: no secret-looking text is checked in."""
    return "".join(secrets.choice(alphabet) for _ in range(n))


AWS_ID = "AKIA" + fake(string.ascii_uppercase + string.digits, 16)
AWS_SECRET = fake(string.ascii_letters + string.digits, 40)
GITHUB = "ghp_" + fake(string.ascii_letters + string.digits, 36)


@pytest.fixture(scope="module")
def rsa_pem(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    key = tmp_path_factory.mktemp("key") / "id"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "", "-f", str(key)],
        check=True,
    )
    return key.read_bytes()


@pytest.fixture(scope="module")
def ed25519(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    key = tmp_path_factory.mktemp("key") / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key.read_bytes()


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def layer_tar(files: dict[str, bytes | None], links: dict[str, str] | None = None) -> bytes:
    """An uncompressed layer tar: path -> content (None: an empty directory); hardlinks."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path.lstrip("/"))
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for path, target in (links or {}).items():
            info = tarfile.TarInfo(path.lstrip("/"))
            info.type, info.linkname = tarfile.LNKTYPE, target.lstrip("/")
            tar.addfile(info)
    return out.getvalue()


def hits(files: dict[str, bytes | None], **kw: dict[str, str]) -> dict[str, str]:
    result = scan.scan_layer_tar(io.BytesIO(layer_tar(files, **kw)), RULES)
    return {hit.path: hit.rule for hit in result.hits}


def gcp_key(pem: bytes) -> bytes:
    return json.dumps(
        {
            "type": "service_account",
            "project_id": "p",
            "private_key_id": "0123",
            "private_key": pem.decode(),
            "client_email": "x@p.iam.gserviceaccount.com",
        }
    ).encode()


def test_each_kind_of_secret_is_found_with_its_path_and_rule(rsa_pem: bytes, ed25519: bytes):
    planted = {
        f"{CA_DIR}/ca-bundle.pem": b"-----BEGIN CERTIFICATE-----\nMIIB\n",
        "/etc/ssh/ssh_host_ed25519_key": ed25519,
        "/root/.ssh/authorized_keys": b"ssh-ed25519 AAAAC3Nza user@host\n",
        "/home/u/.ssh/authorized_keys2": b"ssh-rsa AAAAB3Nza user@host\n",
        "/root/.bash_history": b"export TOKEN=x\n",
        "/home/u/.python_history": b"import os\n",
        "/root/.local/share/fish/fish_history": b"- cmd: ls\n",
        "/root/.netrc": b"machine example.com login u password hunter2\n",
        "/etc/pip.conf": b"[global]\nindex-url = https://u:p4ss@pypi.example.com/simple\n",
        "/root/.config/uv/uv.toml": b'[[index]]\nurl = "https://u:p4ss@example.com/simple"\n',
        "/opt/conda/.condarc": b"channels:\n  - https://conda.example.com/t/ab12cd34ef56/main\n",
        "/root/.docker/config.json": b'{"auths": {"reg.example.com": {"auth": "dTpw"}}}',
        "/root/.aws/credentials": b"[default]\naws_access_key_id = x\n",
        "/srv/app/settings.ini": f"aws_secret_access_key = {AWS_SECRET}\n".encode(),
        "/srv/app/sa.json": gcp_key(rsa_pem),
        "/root/.config/gcloud/credentials.db": b"SQLite format 3\0...",
        "/root/.config/gcloud/application_default_credentials.json": b'{"type": "user"}',
        "/root/.config/gcloud/access_tokens.db": b"SQLite format 3\0...",
        "/srv/app/deploy.pem": rsa_pem,
        "/srv/app/id_ed25519": ed25519,
        "/srv/app/env.sh": f'export AWS_ACCESS_KEY_ID="{AWS_ID}"\n'.encode(),
        "/srv/app/gh.txt": f"token: {GITHUB}\n".encode(),
    }
    assert hits(planted) == {
        f"{CA_DIR}/ca-bundle.pem": "build-ca",
        "/etc/ssh/ssh_host_ed25519_key": "ssh-host-key",
        "/root/.ssh/authorized_keys": "authorized-keys",
        "/home/u/.ssh/authorized_keys2": "authorized-keys",
        "/root/.bash_history": "history",
        "/home/u/.python_history": "history",
        "/root/.local/share/fish/fish_history": "history",
        "/root/.netrc": "netrc",
        "/etc/pip.conf": "pip-credentials",
        "/root/.config/uv/uv.toml": "uv-credentials",
        "/opt/conda/.condarc": "conda-credentials",
        "/root/.docker/config.json": "docker-auth",
        "/root/.aws/credentials": "aws-credentials",
        "/srv/app/settings.ini": "aws-secret-key",
        "/srv/app/sa.json": "gcp-service-account-key",
        "/root/.config/gcloud/credentials.db": "gcloud-credentials",
        "/root/.config/gcloud/application_default_credentials.json": "gcloud-credentials",
        "/root/.config/gcloud/access_tokens.db": "gcloud-credentials",
        "/srv/app/deploy.pem": "private-key",
        "/srv/app/id_ed25519": "private-key",
        "/srv/app/env.sh": "aws-access-key",
        "/srv/app/gh.txt": "github-token",
    }


def test_clean_files_give_no_findings():
    clean = {
        "/etc": None,
        "/root/.bash_history": b"",  # an empty history holds nothing
        "/root/.bashrc": b"export PATH=/usr/bin\n",
        "/etc/pip.conf": b"[global]\nindex-url = https://pypi.example.com/simple\ntoken =\n",
        "/opt/conda/.condarc": b"channels:\n  - conda-forge\n",
        "/root/.docker/config.json": b'{"auths": {}, "credsStore": "pass"}',
        "/usr/lib/python3/crypto.py": b'PEM = "-----BEGIN RSA PRIVATE KEY-----"\nparse(PEM)\n',
        "/usr/share/doc/aws.md": b"aws_access_key_id = AKIAIOSFODNN7EXAMPLE\n",
        "/usr/lib/font.py": b"x = b'AAYAAAAA//gABgAAAD+AKIAQUIXGEHZKMLOPQRSTAB'\n",  # base64
        "/usr/lib/libx.so": b"\0ELF PRIVATE KEY AKIA" + AWS_ID.encode(),  # binary: not read
        "/etc/ssl/certs/ca.pem": b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    }
    assert hits(clean) == {}


def test_a_whiteout_does_not_hide_a_lower_layers_secret(tmp_path: Path):
    lower = layer_tar({"/root/.netrc": b"machine h login u password p\n"})
    upper = layer_tar(
        {"/root/.wh..netrc": b"", "/root/.wh..wh..opq": b"", "/root/.zsh_history": b"ls\n"}
    )
    report = scan_tars(tmp_path, [lower, upper])
    assert [(f.path, f.layer, f.layers, f.rule) for f in report.findings] == [
        ("/root/.netrc", 1, 2, "netrc"),
        ("/root/.zsh_history", 2, 2, "history"),
    ]
    assert report.files == 2  # whiteouts are not files


def test_a_hardlink_to_a_secret_is_found_under_its_own_name(rsa_pem: bytes):
    found = hits(
        {"/opt/pkgs/a/key.pem": rsa_pem}, links={"/opt/env/key.pem": "/opt/pkgs/a/key.pem"}
    )
    assert found == {"/opt/pkgs/a/key.pem": "private-key", "/opt/env/key.pem": "private-key"}


def test_a_findings_line_never_holds_the_secret(rsa_pem: bytes):
    planted = {
        "/root/.netrc": b"machine h login u password hunter2secret\n",
        "/etc/pip.conf": b"[global]\nindex-url = https://u:p4ssw0rdx@example.com/simple\n",
        "/a/env": f"{AWS_ID} {GITHUB}\n".encode(),
        "/a/key": rsa_pem,
    }
    result = scan.scan_layer_tar(io.BytesIO(layer_tar(planted)), RULES)
    text = " ".join(
        scan.Finding(h.path, 1, 1, "sha256:" + "0" * 64, h.rule, h.detail).line()
        for h in result.hits
    )
    assert len(result.hits) == 5  # /a/env: two
    body = rsa_pem.decode().splitlines()[1]
    for secret in ("hunter2secret", "p4ssw0rdx", AWS_ID, GITHUB, body):
        assert secret not in text


def test_a_findings_line_names_the_path_and_layer():
    finding = scan.Finding("/root/.netrc", 3, 5, "sha256:" + "0123456789ab" * 6, "netrc", "x")
    assert finding.line() == "/root/.netrc in layer 3/5 (sha256:0123456789ab): x [netrc]"


def scan_tars(tmp_path: Path, tars: list[bytes], **kw: object) -> scan.ScanReport:
    """scan_layers over in-memory layer tars, read through the docker-save parser's hashing."""
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    by_id = dict(zip(diff_ids, tars, strict=True))

    def read(todo: set[str]):
        for diff_id in todo:
            handle = scan._Hashing(io.BytesIO(by_id[diff_id]))
            result = scan.scan_layer_tar(handle, scan.load_rules())  # type: ignore[arg-type]
            assert handle.drain() == diff_id
            yield diff_id, result

    return scan.scan_layers("img", diff_ids, read, **kw)  # type: ignore[arg-type]


def test_the_allowlist_drops_only_what_it_names(tmp_path: Path, rsa_pem: bytes):
    tars = [layer_tar({"/usr/lib/tornado/test/test.key": rsa_pem, "/srv/key.pem": rsa_pem})]
    allow_file = tmp_path / "allow.yml"
    allow_file.write_text(
        "- path: '/usr/lib/*/test/test.key'\n  rule: private-key\n  why: a public test key\n"
    )
    report = scan_tars(tmp_path, tars, allows=scan.load_allowlist(allow_file))
    assert [f.path for f in report.findings] == ["/srv/key.pem"]
    allow_file.write_text("- path: '/srv/*'\n  rule: private-key\n")  # no reason given
    with pytest.raises(scan.ScanError, match="why"):
        scan.load_allowlist(allow_file)


def test_the_shipped_allowlist_loads_and_gives_reasons():
    assert all(entry.why for entry in scan.load_allowlist())


def test_a_scanned_layer_is_not_read_again(tmp_path: Path, own_cache: Path):
    base = layer_tar({"/etc/os-release": b"debian\n"})
    top = layer_tar({"/root/.bash_history": b"ls\n"})
    first = scan_tars(tmp_path, [base, top])
    assert first.cached_layers == 0 and len(list((own_cache / "gpubake" / "scan").iterdir())) == 2

    def must_not_read(todo: set[str]):
        raise AssertionError(f"read {todo} again")

    again = scan.scan_layers("img", ids(base, top), must_not_read)
    assert again.cached_layers == 2 and again.findings == first.findings
    assert again.files == first.files == 2
    # a new layer on top: only that one is read
    extra = layer_tar({"/root/.netrc": b"machine h password p\n"})
    third = scan_tars(tmp_path, [base, top, extra])
    assert third.cached_layers == 2 and [f.layer for f in third.findings] == [2, 3]


def ids(*tars: bytes) -> list[str]:
    return ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]


def save_tar(layers: list[bytes], *, oci: bool) -> bytes:
    """A `docker save` stream: legacy (`<id>/layer.tar`, a repeated layer as a symlink) or
    OCI (`blobs/sha256/<diff id>`, `<id>/layer.tar` symlinks to them, a config blob)."""
    out, seen = io.BytesIO(), {}
    with tarfile.open(fileobj=out, mode="w") as tar:
        config = b'{"rootfs": {}}'
        if oci:
            add(tar, f"blobs/sha256/{hashlib.sha256(config).hexdigest()}", config)
        for n, data in enumerate(layers):
            digest = hashlib.sha256(data).hexdigest()
            name = f"v1id{n}/layer.tar"
            if oci and digest not in seen:
                add(tar, f"blobs/sha256/{digest}", data)
                seen[digest] = f"blobs/sha256/{digest}"
            if digest in seen:
                info = tarfile.TarInfo(name)
                info.type, info.linkname = tarfile.SYMTYPE, f"../{seen[digest]}"
                tar.addfile(info)
            else:
                add(tar, name, data)
                seen[digest] = name
        add(tar, "manifest.json", b"[]")
    return out.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("oci", [False, True], ids=["legacy", "oci"])
def test_docker_save_layouts_give_each_layer_by_diff_id(oci: bool, rsa_pem: bytes):
    layers = [
        layer_tar({"/etc/os-release": b"debian\n"}),
        layer_tar({"/srv/key.pem": rsa_pem}),
        layer_tar({"/etc/os-release": b"debian\n"}),  # identical to layer 1: a symlink
    ]
    wanted = set(ids(*layers))
    got = dict(scan.layers_of_save(io.BytesIO(save_tar(layers, oci=oci)), wanted, RULES, print))
    assert set(got) == wanted
    report = scan.scan_layers("img", ids(*layers), lambda todo: got.items(), allows=())
    assert [(f.path, f.layer, f.layers) for f in report.findings] == [("/srv/key.pem", 2, 3)]
