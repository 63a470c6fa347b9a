"""A real registry for the tests: the CNCF distribution registry of Debian's `docker-registry`
package, on 127.0.0.1 with a free port, temporary storage and its own config; optionally
with TLS from a test CA, and users: htpasswd (bcrypt, Basic auth), or with token_auth=True
the Docker token protocol (Bearer) through TokenService, the smallest token service the
registry accepts (Debian packages none).

    with start_registry(tmp_path, tls=True, users={"alice": "s3cret"}) as reg:
        RegistryClient(reg.host, certs_dir=reg.certs_dir, ...)

Its log (level info, one line per request) lets a test count what clients sent: blob
uploads, blob downloads.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import requests
import yaml

BINARY = Path("/usr/bin/docker-registry")
# the access log line of a request: "GET /v2/x/blobs/sha256:... HTTP/1.1" 200
_ACCESS_RE = re.compile(r'"(GET|HEAD|PUT|PATCH|POST|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')


def need_registry() -> None:
    if not BINARY.exists():
        pytest.skip(
            f"{BINARY} is absent: install Debian's docker-registry package "
            "(apt-get install docker-registry) for the registry tests"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1 and localhost signed by it:
    (ca.crt, server.crt, server.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=gpubake test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1", cwd=directory,
    )  # fmt: skip
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n",
        encoding="utf-8",
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext",
        cwd=directory,
    )  # fmt: skip
    return directory / "ca.crt", directory / "server.crt", directory / "server.key"


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd entry (the only hash the registry accepts), by apache2-utils'
    htpasswd."""
    binary = shutil.which("htpasswd")
    if binary is None:
        pytest.skip("htpasswd is absent: install Debian's apache2-utils for the auth tests")
    out = subprocess.run(
        [binary, "-Bbn", user, password], check=True, capture_output=True, text=True, timeout=60
    )
    return out.stdout.strip()


@dataclass
class RunningRegistry:
    host: str  # 127.0.0.1:PORT
    log_path: Path
    ca_cert_path: Path | None  # the test CA (TLS only)
    process: subprocess.Popen[bytes]
    certs_dir: Path | None = None  # a certs.d tree trusting the CA: <certs_dir>/<host>/ca.crt
    tokens: TokenService | None = None  # the token service (token_auth only)
    _log_mark: int = field(default=0, repr=False)

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_cert_path else 'http'}://{self.host}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request the registry logged, up to now: a request
        is logged just after its answer, so a marker request is sent and waited for first."""
        marker = f"/v2/?gpubake-sync={time.monotonic_ns()}"
        verify = str(self.ca_cert_path) if self.ca_cert_path else True
        requests.get(self.url + marker, verify=verify, timeout=10)
        deadline = time.monotonic() + 10
        while True:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
            if f" {marker} " in text or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return [
            (m, p, int(s))
            for m, p, s in _ACCESS_RE.findall(text)
            if not p.startswith("/v2/?gpubake-sync=")
        ]

    def mark(self) -> None:
        """Count only requests after this point in since_mark()."""
        self._log_mark = len(self.requests())

    def since_mark(self) -> list[tuple[str, str, int]]:
        return self.requests()[self._log_mark :]

    @staticmethod
    def blob_uploads(entries: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
        """Requests that send blob data (POST starts an upload, PATCH/PUT carry the bytes)."""
        return [e for e in entries if "/blobs/uploads/" in e[1] and e[0] in ("PATCH", "PUT")]

    @staticmethod
    def blob_gets(entries: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
        return [e for e in entries if e[0] == "GET" and "/blobs/sha256:" in e[1]]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """Issues registry tokens (JWT, ES256, the signing certificate in the `x5c` header, which
    the registry checks against `rootcertbundle`) over plain HTTP on 127.0.0.1: to `users`
    with the right password every action asked for, to anonymous clients none (as Docker
    Hub does), 401 to a wrong password."""

    SERVICE = "gpubake-test-registry"
    ISSUER = "gpubake-test-token-service"

    def __init__(self, directory: Path, users: dict[str, str]) -> None:
        serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
        directory.mkdir(parents=True, exist_ok=True)
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", "token.key", "-out", "token.crt", "-days", "2",
            "-subj", "/CN=gpubake test token service", cwd=directory,
        )  # fmt: skip
        self.cert_path = directory / "token.crt"
        self._key = serialization.load_pem_private_key(
            (directory / "token.key").read_bytes(), password=None
        )
        pem = self.cert_path.read_text()
        self._x5c = "".join(pem.split("-----")[2].split())  # the DER certificate, base64
        self.users = users
        #: identity tokens the service takes as OAuth2 refresh tokens, and whose they are
        self.identity_tokens = {f"idt-{name}": name for name in users}
        self.issued: list[tuple[str, list[str]]] = []  # (user or "", scopes asked)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.realm = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def token(self, user: str, scopes: list[str]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        access = []
        for scope in scopes if user else []:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        claims = {
            "iss": self.ISSUER,
            "sub": user,
            "aud": self.SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signed = ".".join(_b64url(json.dumps(part).encode()) for part in (header, claims))
        r, s = decode_dss_signature(self._key.sign(signed.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signed}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlparse(self.path).query)
                user = ""
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    name, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if service.users.get(name) != password:
                        self._answer(401, {"details": "wrong user or password"})
                        return
                    user = name
                scopes = query.get("scope", [])
                service.issued.append((user, scopes))
                token = service.token(user, scopes)
                self._answer(200, {"token": token, "access_token": token, "expires_in": 300})

            def do_POST(self) -> None:
                """The OAuth2 form of the token protocol: an identity token (`docker login`'s
                `identitytoken`) as the refresh token."""
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                grant = form.get("grant_type", [""])[0]
                user = service.identity_tokens.get(form.get("refresh_token", [""])[0])
                if grant != "refresh_token" or user is None:
                    self._answer(401, {"error": "invalid_grant"})
                    return
                scopes = " ".join(form.get("scope", [])).split()
                service.issued.append((f"{user} (identity token)", scopes))
                token = service.token(user, scopes)
                self._answer(200, {"access_token": token, "expires_in": 300})

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:  # quiet
                pass

        return Handler


def _config(
    root: Path,
    port: int,
    tls: tuple[Path, Path, Path] | None,
    htpasswd: Path | None,
    tokens: TokenService | None = None,
):
    config: dict = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "storage")},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": "gpubake-test",  # shared by nothing: one instance
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    if tls is not None:
        config["http"]["tls"] = {"certificate": str(tls[1]), "key": str(tls[2])}
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": "gpubake-test", "path": str(htpasswd)}}
    if tokens is not None:
        config["auth"] = {
            "token": {
                "realm": tokens.realm,
                "service": tokens.SERVICE,
                "issuer": tokens.ISSUER,
                "rootcertbundle": str(tokens.cert_path),
            }
        }
    return config


@contextmanager
def start_registry(
    tmp_path: Path,
    *,
    tls: bool = False,
    users: dict[str, str] | None = None,
    token_auth: bool = False,
) -> Iterator[RunningRegistry]:
    """Start a registry in tmp_path/registry-<port>; stop it and keep nothing running when the
    block ends. `users` log in with Basic auth (htpasswd), or through a TokenService
    (`running.tokens`) with token_auth. Skips the test where docker-registry is absent."""
    need_registry()
    port = free_port()
    root = tmp_path / f"registry-{port}"
    root.mkdir(parents=True)
    tls_files = make_tls(root / "tls") if tls else None
    htpasswd = None
    tokens = TokenService(root / "token", users or {}) if token_auth else None
    if users and not token_auth:
        htpasswd = root / "htpasswd"
        htpasswd.write_text(
            "".join(htpasswd_line(u, p) + "\n" for u, p in users.items()), encoding="utf-8"
        )
    config = root / "config.yml"
    config.write_text(
        yaml.safe_dump(_config(root, port, tls_files, htpasswd, tokens)), encoding="utf-8"
    )
    log_path = root / "registry.log"
    host = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(BINARY), "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    certs_dir = None
    if tls_files is not None:
        certs_dir = root / "certs.d"
        (certs_dir / host).mkdir(parents=True)
        shutil.copy(tls_files[0], certs_dir / host / "ca.crt")
    running = RunningRegistry(
        host=host,
        log_path=log_path,
        ca_cert_path=tls_files[0] if tls_files else None,
        process=process,
        certs_dir=certs_dir,
        tokens=tokens,
    )
    try:
        _wait_ready(running)
        yield running
    finally:
        running.stop()
        if tokens is not None:
            tokens.stop()


def _wait_ready(reg: RunningRegistry, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    verify = str(reg.ca_cert_path) if reg.ca_cert_path else True
    while time.monotonic() < deadline:
        if reg.process.poll() is not None:
            tail = reg.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"docker-registry exited ({reg.process.returncode}):\n{tail}")
        try:
            # 200, or 401 with auth: either way it answers
            if requests.get(f"{reg.url}/v2/", verify=verify, timeout=2).status_code in (200, 401):
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"docker-registry on {reg.host} did not answer within {timeout} s")
