"""Real object-store servers on a free port, for tests: moto's S3 server and gcp-storage-emulator.

Each runs as its own subprocess (no state shared with, or leaked into, the test process) and is
stopped on leaving the context. `host` is where it listens and what the endpoint names, so a
server bound on the Docker bridge's gateway can be reached from a container.

    with s3_server() as s3:
        s3.make_bucket("results")
        subprocess.run([...], env={**os.environ, **s3.env})
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

START_TIMEOUT_S = 20.0
# No proxy from the environment may stand between a test and a server on this machine.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


#: objects larger than this are read back as their SHA-256 (a Digest), not held in memory
LARGE_BYTES = 64 << 20
_READ_CHUNK = 8 << 20


class Digest(str):
    """The SHA-256 (hex) of an object too large to keep."""


def _kept(chunks: Iterator[bytes], size: int) -> bytes | Digest:
    if size <= LARGE_BYTES:
        return b"".join(chunks)
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return Digest(digest.hexdigest())


class ObjectStoreServer:
    """A running server: endpoint (http://HOST:PORT), env (what a client process needs),
    make_bucket(name), client() (the native client, configured for this server) and
    read(bucket, prefix): every object under the prefix, each in one streamed GET."""

    kind = ""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.endpoint = f"http://{_url_host(host)}:{port}"
        self.env: dict[str, str] = {}

    def client(self):
        raise NotImplementedError

    def make_bucket(self, name: str) -> None:
        raise NotImplementedError


class S3Server(ObjectStoreServer):
    kind = "s3"

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",  # moto takes any credentials
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.session.Session(
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=self.endpoint)

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str) -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def read(self, bucket: str, prefix: str) -> dict[str, bytes | Digest]:
        # one GET each: boto3's ranged parallel downloads re-read the whole object from
        # moto's memory for every range (74 s for 1 GiB here, 2 s for one GET)
        client, found = self.client(), {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"]
                found[item["Key"]] = _kept(body.iter_chunks(_READ_CHUNK), item["Size"])
        return found


class GcsServer(ObjectStoreServer):
    kind = "gs"

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.env = {"STORAGE_EMULATOR_HOST": self.endpoint}

    def client(self):
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="test",
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=self.endpoint),
        )

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(name)

    def keys(self, bucket: str, prefix: str) -> list[str]:
        return [blob.name for blob in self.client().bucket(bucket).list_blobs(prefix=prefix)]

    def read(self, bucket: str, prefix: str) -> dict[str, bytes | Digest]:
        found = {}
        for blob in self.client().bucket(bucket).list_blobs(prefix=prefix):
            with blob.open("rb", chunk_size=_READ_CHUNK) as stream:
                chunks = iter(lambda s=stream: s.read(_READ_CHUNK), b"")
                found[blob.name] = _kept(chunks, int(blob.size or 0))
        return found


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with _DIRECT.open(url, timeout=2) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


def _output(log) -> bytes:
    # pread: the server shares this file's offset, which a seek would move under its writes
    return os.pread(log.fileno(), os.fstat(log.fileno()).st_size, 0)


def _bind_failed(log) -> bool:
    # the emulator's server thread dies on a taken port while its process lives on
    return b"Address already in use" in _output(log)


@contextlib.contextmanager
def _serve(make, host: str, argv, health_path: str) -> Iterator[ObjectStoreServer]:
    for attempt in range(3):
        port = _free_port(host)
        server = make(host, port)
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(
                [sys.executable, *argv(host, port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            try:
                deadline = time.monotonic() + START_TIMEOUT_S
                while not _answers(server.endpoint + health_path):
                    exited = proc.poll() is not None
                    if (exited or _bind_failed(log)) and attempt < 2:
                        break  # the port was taken meanwhile: another one
                    if exited or time.monotonic() > deadline:
                        tail = _output(log)[-2000:].decode(errors="replace")
                        state = (
                            f"exited with {proc.returncode}"
                            if exited
                            else f"did not answer within {START_TIMEOUT_S:.0f} s"
                        )
                        raise RuntimeError(
                            f"{server.kind} server on {server.endpoint} {state}; output:\n{tail}"
                        )
                    time.sleep(0.1)
                else:
                    yield server
                    return
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextlib.contextmanager
def s3_server(host: str = "127.0.0.1") -> Iterator[S3Server]:
    """moto's S3 server (`python -m moto.server`), in memory, on a free port of host."""
    with _serve(
        S3Server, host, lambda h, p: ["-m", "moto.server", "-H", h, "-p", str(p)], "/"
    ) as s:
        yield s


@contextlib.contextmanager
def gcs_server(host: str = "127.0.0.1") -> Iterator[GcsServer]:
    """gcp-storage-emulator (GCS JSON API), in memory, on a free port of host."""

    def argv(h: str, p: int) -> list[str]:
        return ["-m", "gcp_storage_emulator", "start", "--host", h, "--port", str(p), "-M", "-q"]

    with _serve(GcsServer, host, argv, "/") as s:
        yield s


__all__ = ["Digest", "GcsServer", "ObjectStoreServer", "S3Server", "gcs_server", "s3_server"]
