"""What the notebook image tests share: the notebook tutorial's commands
(docs/tutorials/notebook-container.md), a server started by one of them (as a user does, in
the foreground), and small wheels to pip install offline."""

from __future__ import annotations

import base64
import hashlib
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

from tests.doc_blocks import command_lines, section_blocks
from tests.integration.helpers import ROOT

#: the page whose commands these tests run
TUTORIAL = ROOT / "docs" / "tutorials" / "notebook-container.md"
#: where the browser tests keep their screenshots (build/ is ignored by git)
ARTIFACTS = Path(os.environ.get("GPUBAKE_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
_TOKEN_RE = re.compile(r"http://127\.0\.0\.1:8888/lab\?token=([0-9a-f]{32,})")


def tutorial_notebook_block() -> list[str]:
    """The command lines (no comments) of the tutorial's first sh block under
    '## Build it, then start it'."""
    block = next(b for b in section_blocks(TUTORIAL, "Build it, then start it") if b.kind == "sh")
    return [line.split("  #", 1)[0].rstrip() for line in command_lines(block.text)]


def tutorial_docker_runs() -> list[str]:
    return [line for line in tutorial_notebook_block() if line.startswith("docker run ")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_test(command: str, image: str, port: int, names: dict[str, str]) -> list[str]:
    """A tutorial command with only what a test must change: the image's tag, the host
    port, and the volume and folder names (`names`, the tutorial's name to the test's)."""
    command = command.replace("127.0.0.1:8888:8888", f"127.0.0.1:{port}:8888")
    for tutorial_name, test_name in names.items():
        command = command.replace(tutorial_name, test_name)
    argv = shlex.split(command)
    assert argv[-1] == "gpubake/fastai", argv
    return [*argv[:-1], image]


class Server:
    """A tutorial's `docker run` in the foreground, as a user runs it: its output is read as it
    comes; stop() is the user's Ctrl-C."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str], seconds: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for line in self.lines:
                if match := pattern.search(line):
                    return match
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"{self.argv} exited:\n" + "\n".join(self.lines[-40:]))
            self.lines.append(line)
        raise AssertionError(f"no {pattern.pattern!r} in {seconds} s:\n" + "\n".join(self.lines))

    def token(self) -> str:
        return self.wait_for(_TOKEN_RE).group(1)

    @property
    def log(self) -> str:
        self._drain()
        return "\n".join(self.lines)

    def _drain(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.lines.append(line)

    def exited(self, seconds: float = 60) -> int:
        code = self.proc.wait(timeout=seconds)
        time.sleep(0.2)  # the reader thread's last lines
        self._drain()
        return code

    def stop(self) -> int:
        """Ctrl-C, as the user stops it: docker run passes SIGINT on to the container (--rm
        removes it). Again after 20 s, as a user presses it again when a first one was lost
        (a SIGINT while Jupyter is busy starting a kernel can be)."""
        for _ in range(3):
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
            try:
                return self.exited(20)
            except subprocess.TimeoutExpired:
                continue
        self.proc.kill()
        raise AssertionError(f"{self.argv} did not stop on Ctrl-C:\n{self.log[-3000:]}")


def container_of(volume: str) -> str:
    """The id of the running container that mounts `volume` (the tutorial's commands name none)."""
    out = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"volume={volume}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(out) == 1, out
    return out[0]


def docker_exec(cid: str, *cmd: str, user: str = "gpubake") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "exec", "-u", user, cid, *cmd],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def make_wheel(
    directory: Path, name: str, version: str, source: str, requires: Iterable[str] = ()
) -> Path:
    """A pure-Python wheel of one module `name` holding `source`, as pip installs it."""
    dist = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    files = {
        f"{name}.py": source,
        f"{dist}/METADATA": metadata,
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: gpubake-tests\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    wheel.chmod(0o644)
    return wheel


#: fast.ai trains two epochs on a tiny synthetic image dataset (two classes of coloured
#: squares, a resnet18 from scratch: nothing downloaded) and prints the epochs it recorded
#: and their losses; run with the image's python, on the CPU where there is no GPU.
FASTAI_TWO_EPOCHS = """\
import math, tempfile
from pathlib import Path
import numpy as np
from PIL import Image
from fastai.vision.all import ImageDataLoaders, Resize, accuracy, resnet18, set_seed, vision_learner
set_seed(0)
root, rng = Path(tempfile.mkdtemp()), np.random.default_rng(0)
for label, channel in (("red", 0), ("blue", 2)):
    (root / label).mkdir()
    for i in range(24):
        pixels = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        pixels[..., channel] = rng.integers(180, 255, (64, 64), dtype=np.uint8)
        Image.fromarray(pixels).save(root / label / f"{i}.png")
dls = ImageDataLoaders.from_folder(root, valid_pct=0.25, seed=0, item_tfms=Resize(64), bs=8)
learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)
with learn.no_bar():
    learn.fit(2)
losses = [row[0] for row in learn.recorder.values]
assert all(math.isfinite(v) for v in losses), losses
print("trained", len(losses), "epochs on", dls.device.type, "losses", losses)
"""
