"""A Docker Engine socket that records what a command asked of the engine.

`DOCKER_HOST=unix://<proxy.socket>` for the command under test: each HTTP request line it
sends is recorded, then passed to the real engine (or, with no upstream, the connection is
closed: an engine that is not there; with `stop_after=N`, the engine stops after N
requests: every connection is dropped and new ones are refused). Tests assert on the
command's own requests, so other tests starting containers at the same time (pytest-xdist)
cannot make them pass or fail.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

ENGINE_SOCKET = "/var/run/docker.sock"
_REQUEST_LINE = re.compile(rb"(?:^|\r\n)(GET|HEAD|POST|PUT|DELETE) (\S+) HTTP/1\.[01]\r\n")
#: requests that start or make something: a container, a build, a commit (a pull is not)
STARTING = re.compile(r"^POST (/v[\d.]+)?/(containers/create|build|commit)\b")


class EngineStoppedError(OSError):
    pass


class EngineProxy:
    def __init__(self, path: Path, upstream: str | None, stop_after: int | None = None) -> None:
        self.path, self.upstream, self.stop_after = path, upstream, stop_after
        self.stopped = threading.Event()
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(16)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        return {"DOCKER_HOST": f"unix://{self.path}"}

    def starting(self) -> list[str]:
        """The recorded requests that would start or make something."""
        with self._lock:
            return [r for r in self.requests if STARTING.match(r)]

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _record(self, data: bytes) -> None:
        with self._lock:
            self.requests.extend(
                f"{m[1].decode()} {m[2].decode()}" for m in _REQUEST_LINE.finditer(data)
            )
            if self.stop_after is not None and len(self.requests) > self.stop_after:
                self.stopped.set()
                self._server.close()  # new connections are refused
                raise EngineStoppedError  # drops this connection

    def _handle(self, client: socket.socket) -> None:
        with client:
            if self.upstream is None:
                self._record(client.recv(65536))
                return
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as engine:
                engine.connect(self.upstream)
                back = threading.Thread(target=_pump, args=(engine, client, None), daemon=True)
                back.start()
                _pump(client, engine, self._record)
                back.join(timeout=5)

    def close(self) -> None:
        self._server.close()


def _pump(src: socket.socket, dst: socket.socket, record) -> None:
    try:
        while data := src.recv(65536):
            if record is not None:
                record(data)
            dst.sendall(data)
    except EngineStoppedError:
        with suppress(OSError):
            src.shutdown(socket.SHUT_RDWR)  # the client's request is never answered
    except OSError:
        pass
    finally:
        with suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@contextmanager
def engine_proxy(
    directory: Path, upstream: str | None = ENGINE_SOCKET, stop_after: int | None = None
) -> Iterator[EngineProxy]:
    proxy = EngineProxy(directory / "engine.sock", upstream, stop_after)
    try:
        yield proxy
    finally:
        proxy.close()
