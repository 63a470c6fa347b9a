"""`gpubake scan` against a real image whose layers plant each kind of secret (keys made
here at test time), one of them deleted again by a later layer."""

from __future__ import annotations

import json
import os
import re
import secrets
import string
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpubake.publish import scan
from tests.integration.helpers import ROOT, base_image

pytestmark = [pytest.mark.docker]

CA_DIR = scan.load_rules().build_ca_dir


def fake(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def keygen(work: Path, kind: str, *extra: str) -> str:
    key = work / f"key-{kind}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-f", str(key)], check=True)
    return key.read_text()


def plant(work: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Files per layer directory of the build context (path in the image: content), and
    the secret texts that must never be printed."""
    rsa = keygen(work, "rsa", "-b", "2048", "-m", "PEM")
    ed25519 = keygen(work, "ed25519")
    aws_id, aws_secret = "AKIA" + fake(16, string.ascii_uppercase + string.digits), fake(40)
    github = "ghp_" + fake(36)
    service_account = {
        "type": "service_account",
        "project_id": "gpubake-test",
        "private_key_id": fake(20),
        "private_key": keygen(work, "rsa", "-b", "2048", "-m", "PKCS8"),
        "client_email": "test@gpubake-test.iam.gserviceaccount.com",
    }
    layers = {
        "layer2": {
            f"{CA_DIR}/ca-bundle.pem": "-----BEGIN CERTIFICATE-----\nMIIB\n",
            "/etc/ssh/ssh_host_ed25519_key": ed25519,
            "/root/.ssh/authorized_keys": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 test@host\n",
        },
        "layer3": {
            "/root/.bash_history": "ls\n",
            "/home/u/.python_history": "import os\n",
            "/root/.netrc": f"machine example.com login u password {fake(16)}\n",
            "/etc/pip.conf": f"[global]\nindex-url = https://u:{fake(12)}@pypi.example.com/s\n",
            "/root/.config/uv/uv.toml": f'[[index]]\nurl = "https://u:{fake(12)}@ex.com/s"\n',
            "/opt/conda/.condarc": f"channels:\n  - https://conda.example.com/t/{fake(20)}/m\n",
        },
        "layer4": {
            "/root/.docker/config.json": json.dumps(
                {"auths": {"registry.example.com": {"auth": fake(24)}}}
            ),
            "/root/.aws/credentials": f"[default]\naws_secret_access_key = {aws_secret}\n",
            "/srv/sa.json": json.dumps(service_account),
            "/root/.config/gcloud/credentials.db": "SQLite format 3",
            "/root/.config/gcloud/application_default_credentials.json": '{"type": "user"}',
            "/srv/deploy_key": rsa,
            "/srv/env.sh": f"export AWS_ACCESS_KEY_ID={aws_id}\nexport GH={github}\n",
        },
    }
    body = [rsa.splitlines()[2], ed25519.splitlines()[2], aws_id, aws_secret, github]
    return layers, body


EXPECTED = {  # path: (layer, rule); layer 1 is the base, layer 5 deletes the .netrc
    f"{CA_DIR}/ca-bundle.pem": (2, "build-ca"),
    "/etc/ssh/ssh_host_ed25519_key": (2, "ssh-host-key"),
    "/root/.ssh/authorized_keys": (2, "authorized-keys"),
    "/root/.bash_history": (3, "history"),
    "/home/u/.python_history": (3, "history"),
    "/root/.netrc": (3, "netrc"),
    "/etc/pip.conf": (3, "pip-credentials"),
    "/root/.config/uv/uv.toml": (3, "uv-credentials"),
    "/opt/conda/.condarc": (3, "conda-credentials"),
    "/root/.docker/config.json": (4, "docker-auth"),
    "/root/.aws/credentials": (4, "aws-credentials"),
    "/srv/sa.json": (4, "gcp-service-account-key"),
    "/root/.config/gcloud/credentials.db": (4, "gcloud-credentials"),
    "/root/.config/gcloud/application_default_credentials.json": (4, "gcloud-credentials"),
    "/srv/deploy_key": (4, "private-key"),
    "/srv/env.sh": (4, "aws-access-key"),  # and a github-token
}


@pytest.fixture(scope="module")
def planted(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list]]:
    work = tmp_path_factory.mktemp("scan")
    layers, body = plant(work)
    context = work / "context"
    for layer, files in layers.items():
        for path, text in files.items():
            target = context / layer / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    (context / "Dockerfile").write_text(
        f"FROM {base_image(engine)}\n"
        + "".join(f"COPY {layer}/ /\n" for layer in layers)
        + "RUN rm /root/.netrc\n"
    )
    tag = f"gpubake-scantest/planted:{uuid.uuid4().hex[:10]}"
    engine.images.build(path=str(context), tag=tag, rm=True, forcerm=True)
    try:
        yield tag, body
    finally:
        engine.images.remove(tag, force=True)


def gpubake_scan(image: str, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpubake", "scan", image, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "XDG_CACHE_HOME": str(cache)},
        check=False,
    )


def test_each_planted_secret_is_named_with_its_layer(planted, tmp_path: Path):
    tag, body = planted
    proc = gpubake_scan(tag, tmp_path)
    assert proc.returncode == 1, proc.stderr
    for path, (layer, rule) in EXPECTED.items():
        assert f"{path} in layer {layer}/5 (sha256:" in proc.stdout, (path, proc.stdout)
        assert f"[{rule}]" in proc.stdout
    assert "[github-token]" in proc.stdout
    *progress, last = proc.stderr.strip().splitlines()  # a line per layer read, then the error
    assert all(
        re.fullmatch(r"gpubake: scanning layer \d/5 \(sha256:[0-9a-f]{12}\)", ln) for ln in progress
    )
    assert last.startswith(f"gpubake: error: {tag}: 17 secrets found"), last
    assert not any(secret in proc.stdout + proc.stderr for secret in body)


def test_json_report_and_the_cache(planted, tmp_path: Path):
    tag, _body = planted
    first = gpubake_scan(tag, tmp_path, "--json")
    again = gpubake_scan(tag, tmp_path, "--json")
    assert first.returncode == again.returncode == 1, first.stderr
    report, cached = json.loads(first.stdout), json.loads(again.stdout)
    got = {f["path"]: (f["layer"], f["rule"]) for f in report["findings"] if f["rule"] != "jwt"}
    assert got == EXPECTED | {"/srv/env.sh": got["/srv/env.sh"]}
    assert report["layers"] == 5 and report["files"] > 1000
    assert cached["cached_layers"] == 5 and cached["findings"] == report["findings"]


def test_docker_save_reads_the_same_as_overlay2(engine, planted, tmp_path, monkeypatch):
    """The docker-save path (the fallback everywhere overlay2 cannot be read) against the
    default; where overlay2 is unreadable both are docker save, still a fair check."""
    tag, _body = planted
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "save"))
    saved = scan.scan_image(engine, tag, via="save")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "auto"))
    auto = scan.scan_image(engine, tag)
    assert saved.cached_layers == auto.cached_layers == 0
    assert (saved.files, saved.findings) == (auto.files, auto.findings)
    assert len(saved.findings) == 17


def test_a_clean_image_passes(engine, tmp_path: Path):
    proc = gpubake_scan(base_image(engine), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.strip().endswith("no secrets found")


def test_an_unknown_image_is_one_line(engine, tmp_path: Path):
    proc = gpubake_scan(f"gpubake-scantest/none:{uuid.uuid4().hex[:8]}", tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "build or pull it first" in proc.stderr


def test_a_scan_ahead_fills_the_cache_and_leaves_the_findings_to_the_final_scan(
    engine, planted, tmp_path, monkeypatch
):
    """What a chain build does with a stage below the last: its layers scanned in a thread
    (nothing reported there), so that the final scan reads them from the cache and still
    reports every finding, with its layer."""
    tag, _body = planted
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    image_id = engine.images.get(tag).id
    thread = scan.scan_ahead(image_id)
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert len(list(scan.cache_folder().glob("*.json"))) == 5  # one result per layer
    final = scan.scan_image(engine, tag)
    assert final.cached_layers == 5
    assert len(final.findings) == 17
    # an image that does not exist (removed meanwhile): the thread ends quietly
    gone = scan.scan_ahead("sha256:" + "0" * 64)
    gone.join(timeout=60)
    assert not gone.is_alive()
