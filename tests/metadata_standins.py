"""Loopback stand-ins for the GCE metadata server and EC2's IMDSv2 (no emulator of either can be
installed here), following their documented behaviour (../shared/FACTS.md):

GCE (`/computeMetadata/v1/...`): requests without `Metadata-Flavor: Google` are refused (403);
answers carry `Metadata-Flavor: Google` and an `ETag`; `?wait_for_change=true` blocks until the
value changes, returns at once when `last_etag` is already stale, and returns the current value
after `timeout_sec`; a missing attribute is 404.

EC2 (`/latest/...`): `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`
(1-21600) gives a token; a GET without a valid `X-aws-ec2-metadata-token` is 401;
`meta-data/spot/instance-action` and `meta-data/events/recommendations/rebalance` are 404 until
a notice, then JSON; `user-data` is 404 when the instance has none.

One server answers both (the runner is pointed at it with GCE_METADATA_HOST or
AWS_EC2_METADATA_SERVICE_ENDPOINT). Tests change values with `set_gce` / `spot_notice`, and
read `gce_requests` to see that the runner long-polled.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GCE_PREFIX = "/computeMetadata/v1/"


class MetadataState:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.gce: dict[str, str] = {
            "instance/preempted": "FALSE",
            "instance/maintenance-event": "NONE",
        }
        self.ec2: dict[str, str] = {}
        self.tokens: set[str] = set()
        self.gce_requests: list[str] = []

    @staticmethod
    def etag(value: str) -> str:
        return hashlib.sha256(value.encode()).hexdigest()[:16]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: str = "", headers: dict[str, str] | None = None) -> None:
        data = body.encode()
        # a client that went away mid long-poll (a killed runner) is no error of the server's
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    # -- GCE ------------------------------------------------------------------------

    def _gce(self) -> None:
        state = self.server.state
        url = urllib.parse.urlsplit(self.path)
        if self.headers.get("Metadata-Flavor") != "Google":
            self._send(403, "Missing Metadata-Flavor:Google header.\n")
            return
        key = url.path[len(GCE_PREFIX) :]
        query = urllib.parse.parse_qs(url.query)
        with state.cond:
            state.gce_requests.append(self.path)
        if query.get("wait_for_change", ["false"])[0] == "true":
            timeout = float(query.get("timeout_sec", ["300"])[0])
            with state.cond:
                start = state.gce.get(key)
                last = query.get("last_etag", [None])[0]
                if last is None or (start is not None and last == state.etag(start)):
                    state.cond.wait_for(lambda: state.gce.get(key) != start, timeout=timeout)
        with state.cond:
            value = state.gce.get(key)
        if value is None:
            self._send(404, "Not Found\n", {"Metadata-Flavor": "Google"})
            return
        self._send(200, value, {"Metadata-Flavor": "Google", "ETag": state.etag(value)})

    # -- EC2 ------------------------------------------------------------------------

    def do_PUT(self) -> None:
        if self.path != "/latest/api/token":
            self._send(404)
            return
        try:
            ttl = int(self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= 21600:
            self._send(400)
            return
        token = secrets.token_urlsafe(24)
        with self.server.state.cond:
            self.server.state.tokens.add(token)
        self._send(200, token, {"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)})

    def do_GET(self) -> None:
        if self.path.startswith(GCE_PREFIX):
            self._gce()
            return
        if not self.path.startswith("/latest/"):
            self._send(404)
            return
        state = self.server.state
        with state.cond:
            valid = self.headers.get("X-aws-ec2-metadata-token") in state.tokens
            value = state.ec2.get(self.path[len("/latest/") :])
        if not valid:
            self._send(401)
        elif value is None:
            self._send(404, "Not Found")
        else:
            self._send(200, value, {"Content-Type": "text/plain"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: MetadataState


class MetadataStandin:
    """The running server: `url` (http://host:port), `host_port` (for GCE_METADATA_HOST)."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        host, port = server.server_address[:2]
        self.host_port = f"{host}:{port}"
        self.url = f"http://{self.host_port}"
        self.state = server.state

    def set_gce(self, key: str, value: str | None) -> None:
        with self.state.cond:
            if value is None:
                self.state.gce.pop(key, None)
            else:
                self.state.gce[key] = value
            self.state.cond.notify_all()

    def set_ec2(self, key: str, value: str | None) -> None:
        with self.state.cond:
            if value is None:
                self.state.ec2.pop(key, None)
            else:
                self.state.ec2[key] = value

    def spot_notice(self, action: str = "terminate", seconds: int = 120) -> float:
        """An interruption notice `seconds` ahead; returns the monotonic time it was given."""
        when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
        self.set_ec2(
            "meta-data/spot/instance-action",
            json.dumps({"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}),
        )
        return time.monotonic()

    def preempt(self) -> float:
        """GCE preemption: instance/preempted turns TRUE; returns when (monotonic)."""
        self.set_gce("instance/preempted", "TRUE")
        return time.monotonic()


@contextmanager
def metadata_standin(host: str = "127.0.0.1") -> Iterator[MetadataStandin]:
    server = _Server((host, 0), _Handler)
    server.state = MetadataState()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield MetadataStandin(server)
    finally:  # long-polls still waiting are daemon threads: they do not hold the shutdown
        server.shutdown()
        server.server_close()
