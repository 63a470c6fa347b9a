"""The wheelhouse (gpubake.build.wheelhouse) against a package index on loopback that serves
the simple API (PEP 691 JSON) and its files: which file of a pin it takes for a stack's
Python and platform, the hash check of what arrives, what it does not fetch again, and what
a build refuses when files are missing."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from typing import ClassVar

import pytest

from gpubake import stacks
from gpubake.build import locks, wheelhouse

PY = "3.11"
PLATFORM = "x86_64-manylinux_2_36"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: name -> {filename: bytes}; "served" overrides what a file's URL returns (a wrong file)
FILES = {
    "demo": {
        "demo-1.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl": b"linux-311",
        "demo-1.0-cp312-cp312-manylinux_2_17_x86_64.whl": b"linux-312",
        "demo-1.0-cp311-cp311-musllinux_1_2_x86_64.whl": b"musl",
        "demo-1.0-cp311-cp311-manylinux_2_39_x86_64.whl": b"too-new-glibc",
        "demo-1.0-cp311-cp311-win_amd64.whl": b"windows",
        "demo-1.0.tar.gz": b"sdist",
    },
    "pure": {"pure-2.0-py3-none-any.whl": b"pure", "pure-2.0.tar.gz": b"pure-sdist"},
    "onlysdist": {"onlysdist-0.1.tar.gz": b"only-sdist"},
    "liar": {"liar-1.0-py3-none-any.whl": b"the-listed-bytes"},
    # served a chunk (wheelhouse.CHUNK) at a time, slowly: a download still running
    "slow": {"slow-1.0-py3-none-any.whl": b"s" * (8 * wheelhouse.CHUNK)},
}
SLOW_SECONDS = 0.25  # between two chunks of the slow file
SERVED = {"liar-1.0-py3-none-any.whl": b"other-bytes"}


class _Index(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Index.requests.append(self.path)
        parts = self.path.strip("/").split("/")
        if parts[0] == "simple" and len(parts) == 2 and parts[1] in FILES:
            body = json.dumps(
                {
                    "meta": {"api-version": "1.1"},
                    "name": parts[1],
                    "files": [
                        {"filename": f, "url": f"../../files/{f}", "hashes": {"sha256": _sha(d)}}
                        for f, d in FILES[parts[1]].items()
                    ],
                }
            ).encode()
            self._send(body, "application/vnd.pypi.simple.v1+json")
        elif parts[0] == "files" and len(parts) == 2:
            every = {f: d for files in FILES.values() for f, d in files.items()}
            if parts[1] in every:
                self._send(SERVED.get(parts[1], every[parts[1]]), "application/octet-stream")
                return
            self.send_error(404)
        else:
            self.send_error(404)

    def _send(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body != FILES["slow"]["slow-1.0-py3-none-any.whl"]:
            self.wfile.write(body)
            return
        for start in range(0, len(body), wheelhouse.CHUNK):
            time.sleep(SLOW_SECONDS)
            try:
                self.wfile.write(body[start : start + wheelhouse.CHUNK])
            except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
                return

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def index():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()


def pin(name: str, version: str, *filenames: str) -> wheelhouse.Wanted:
    return wheelhouse.Wanted(name, version, frozenset(_sha(FILES[name][f]) for f in filenames))


def order() -> dict:
    return {t: i for i, t in enumerate(wheelhouse.platform_tags(PY, PLATFORM))}


def test_platform_tags_take_older_glibc_and_legacy_names_not_newer():
    tags = {str(t) for t in wheelhouse.platform_tags(PY, PLATFORM)}
    assert "cp311-cp311-manylinux_2_36_x86_64" in tags
    assert "cp311-cp311-manylinux2014_x86_64" in tags
    assert "py3-none-any" in tags
    assert "cp311-cp311-manylinux_2_39_x86_64" not in tags
    assert "cp312-cp312-manylinux_2_17_x86_64" not in tags
    assert not any("musllinux" in t or "win" in t for t in tags)


def test_fetch_takes_the_fitting_wheel_and_not_again(index, tmp_path):
    every = FILES["demo"]
    wanted = [
        pin("demo", "1.0", *every),  # the lock lists every file's hash
        pin("pure", "2.0", *FILES["pure"]),
        pin("onlysdist", "0.1", "onlysdist-0.1.tar.gz"),
    ]
    lines: list[str] = []
    count, size = wheelhouse.fetch(tmp_path, wanted, order(), lines.append, index=index)
    held = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert held == [
        "demo-1.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "onlysdist-0.1.tar.gz",  # no wheel: the sdist
        "pure-2.0-py3-none-any.whl",  # the wheel before the sdist
    ]
    assert count == 3 and size == sum(len(FILES[p.split("-")[0]][p]) for p in held)
    assert any(line.startswith("fetched demo-1.0-cp311") for line in lines)
    _Index.requests.clear()
    assert wheelhouse.fetch(tmp_path, wanted, order(), lines.append, index=index) == (0, 0)
    assert _Index.requests == []  # complete: the index is not asked
    assert wheelhouse.missing(tmp_path, wanted, order()) == []


def test_a_file_whose_bytes_are_not_the_locks_is_refused_and_not_kept(index, tmp_path):
    wanted = [pin("liar", "1.0", "liar-1.0-py3-none-any.whl")]
    with pytest.raises(wheelhouse.WheelhouseError, match="which the lock does not allow"):
        wheelhouse.fetch(tmp_path, wanted, order(), lambda _: None, index=index)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a part of it


def test_a_pin_with_no_file_for_this_platform_is_named(index, tmp_path):
    wanted = [pin("demo", "1.0", "demo-1.0-cp311-cp311-win_amd64.whl")]
    with pytest.raises(wheelhouse.WheelhouseError, match=r"has no file of demo 1\.0"):
        wheelhouse.fetch(tmp_path, wanted, order(), lambda _: None, index=index)


def test_a_changed_file_counts_as_missing(index, tmp_path):
    wanted = [pin("pure", "2.0", "pure-2.0-py3-none-any.whl")]
    wheelhouse.fetch(tmp_path, wanted, order(), lambda _: None, index=index)
    (tmp_path / "pure-2.0-py3-none-any.whl").write_bytes(b"tampered")
    assert wheelhouse.missing(tmp_path, wanted, order()) == wanted


def test_wanted_holds_every_pin_once_and_uv(tmp_path):
    lock = locks.parse(
        "six==1.17.0 \\\n    --hash=sha256:" + "a" * 64 + "\nidna==3.10 --hash=sha256:" + "b" * 64,
        tmp_path / "lock.txt",
    )
    found = wheelhouse.wanted([lock, lock], "x86_64")
    assert [(w.name, w.version) for w in found][:2] == [("idna", "3.10"), ("six", "1.17.0")]
    (uv,) = [w for w in found if w.name == "uv"]
    assert len(uv.hashes) == 1 and len(found) == 3


@pytest.mark.parametrize(
    ("refuse", "prefix"),
    [(wheelhouse.check, "--offline: "), (wheelhouse.files_for, "")],
    ids=["offline-build", "vm-upload"],
)
def test_a_build_names_what_the_wheelhouse_lacks(tmp_path, refuse, prefix):
    """An offline build (check) and a VM or host build (files_for, what it uploads) refuse a
    wheelhouse that lacks files in one line naming them and the fetch that adds them."""
    stack = stacks.resolve("pytorch")
    lock = locks.check(stack, "x86_64")
    with pytest.raises(wheelhouse.WheelhouseError) as caught:
        refuse(tmp_path, stack, [lock], "x86_64")
    message = str(caught.value)
    assert message.startswith(f"{prefix}the wheelhouse {tmp_path} lacks ")
    assert "more for stack 'pytorch' on debian-12" in message
    assert f"gpubake fetch --stack pytorch --os debian-12 --wheelhouse {tmp_path}`" in message


def test_a_vm_build_uploads_each_pins_best_fitting_file(tmp_path):
    """What a VM or host build uploads: per pin the wheel of the best tag (not the sdist,
    not another Python's or platform's), hash-checked; a pin with none is None."""
    for files in FILES.values():
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
    wanted = [pin("demo", "1.0", *FILES["demo"]), pin("pure", "2.0", *FILES["pure"])]
    wanted.append(pin("onlysdist", "0.1", "onlysdist-0.1.tar.gz"))
    (tmp_path / "onlysdist-0.1.tar.gz").write_bytes(b"not the lock's bytes")
    found = wheelhouse.best_files(tmp_path, wanted, order())
    assert {w.name: p.name if p else None for w, p in found.items()} == {
        "demo": "demo-1.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "pure": "pure-2.0-py3-none-any.whl",
        "onlysdist": None,
    }


def _prefetch(index, folder, pins, lines, *, first):
    needed = wheelhouse.Need(pins, order())
    return wheelhouse.Prefetch(folder, needed, lines.append, first=first, index=index)


def test_a_build_fetches_its_first_pins_at_once_and_the_rest_behind(index, tmp_path):
    """What a build with an incomplete wheelhouse does: the first stage's pins (uv) arrive
    before it starts; the rest (here a slow file) downloads while it builds, and the stage
    that installs the lock waits for it."""
    slow = pin("slow", "1.0", *FILES["slow"])
    pure = pin("pure", "2.0", *FILES["pure"])
    lines: list[str] = []
    prefetch = _prefetch(index, tmp_path, [pure, slow], lines, first=frozenset({"pure"}))
    started = time.monotonic()
    prefetch.start()
    assert time.monotonic() - started < 8 * SLOW_SECONDS  # did not wait for the slow file
    assert (tmp_path / "pure-2.0-py3-none-any.whl").exists()
    assert prefetch.running() and not (tmp_path / "slow-1.0-py3-none-any.whl").exists()
    count, size = prefetch.wait()
    assert (count, size) == (1, len(FILES["slow"]["slow-1.0-py3-none-any.whl"]))
    assert wheelhouse.missing(tmp_path, [pure, slow], order()) == []
    assert not prefetch.running() and prefetch.waited


def test_a_background_fetch_fails_in_the_builds_thread_and_stops_when_told(index, tmp_path):
    liar = pin("liar", "1.0", "liar-1.0-py3-none-any.whl")
    failing = _prefetch(index, tmp_path / "a", [liar], [], first=frozenset())
    failing.start()
    with pytest.raises(wheelhouse.WheelhouseError, match="which the lock does not allow"):
        failing.wait()

    slow = pin("slow", "1.0", *FILES["slow"])
    stopped = _prefetch(index, tmp_path / "b", [slow], [], first=frozenset())
    stopped.start()
    time.sleep(2 * SLOW_SECONDS)  # a chunk or two arrived
    started = time.monotonic()
    stopped.stop()  # a failed build: the download ends at its next chunk
    assert time.monotonic() - started < 4 * SLOW_SECONDS
    assert not stopped.running()
    assert list((tmp_path / "b").iterdir()) == []  # neither the file nor a part of it
