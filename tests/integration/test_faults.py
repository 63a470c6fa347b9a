"""Builds that survive faults: `gpubake build` interrupted by SIGINT, SIGTERM and SIGKILL at
four moments (the base image's debootstrap, a stage's Ansible run, gpu-smoke, the commit),
two builds of one image at once, two stacks at once, and leftovers of a killed build; and
builds with no package index (a wheelhouse, --offline), on the same small stacks.

The default stack takes minutes a build; these tests build a small stack instead (`tiny`:
no framework, one small package), on an OS entry of its own (`faults-12`, Debian 12
again) so that the base image they debootstrap and interrupt is not the suite's. Both are
added to a copy of the checkout (tests.checkout.copy_checkout), whose gpubake
runs. Each moment is reached by waiting for its progress line (-v: Packer's own lines).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import docker.errors
import pytest

from gpubake import resources
from gpubake.build import docker_engine, guard, wheelhouse
from gpubake.build.plan import SBOM_PATH
from tests.checkout import copy_checkout
from tests.integration.helpers import HOST_BUNDLE, build_containers, run_output

pytestmark = [pytest.mark.docker, pytest.mark.slow]
OS = "faults-12"
BASE = f"gpubake/base:{OS}"
TAG = "ftest"
IMAGE = f"gpubake/tiny:{TAG}"
TWICE = "gpubake/tiny:twice"  # test_two_builds_of_one_image...: a tag of its own, see below
#: the edit of tiny's last stage under which test_two_stacks_at_once builds tiny-b
TWO_STACKS_EDIT = 101
STACKS = (Path(__file__).parents[1] / "small_stacks.yml").read_text(encoding="utf-8")
STACKS = STACKS.split("\nstacks:\n", 1)[1]  # the entries, to append to images/stacks.yml
#: A file only one stage's hash covers, per moment: editing it rebuilds from that stage on.
EDITS = {"stage": "roles/base/defaults/main.yml", "finish": "roles/manifest/defaults/main.yml"}


def _add_test_stacks(tree: Path) -> None:
    path = tree / "images" / "stacks.yml"
    text = path.read_text()
    debian = re.search(r"(?ms)^  debian-12:\n.*?(?=^  \S)", text)
    assert debian is not None
    faults = debian[0].replace("  debian-12:\n", f"  {OS}:\n", 1)
    faults = faults.replace("base_image: debian:12\n", "base_image: gpubake-faults/none:12\n")
    text = text.replace(debian[0], debian[0] + faults, 1)
    path.write_text(text.rstrip("\n") + "\n" + STACKS)


def tmp_dir(tree: Path) -> Path:
    """TMPDIR of the builds these tests run: what a build leaves in it is its own, whatever
    other tests (on the other worker) put in /tmp meanwhile."""
    return tree.with_name(f"{tree.name}-tmp")


def build_env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "TMPDIR": str(tmp_dir(tree))}


def gpubake(tree: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpubake", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tree,
        env=build_env(tree),
        check=False,
    )


def build_args(stack: str = "tiny", tag: str = TAG) -> list[str]:
    return [
        "build", "--target", "docker", "--stack", stack, "--os", OS, "--tag", tag,
        "--ca-bundle", str(HOST_BUNDLE),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tree(tmp_path_factory, engine) -> Path:
    _remove_test_images(engine)  # what a run killed before this module's teardown left
    out = copy_checkout(tmp_path_factory.mktemp("faults"))
    tmp_dir(out).mkdir()
    _add_test_stacks(out)
    for stack in ("tiny", "tiny-b"):
        proc = gpubake(out, "lock", "--stack", stack, "--os", OS, timeout=300)
        assert proc.returncode == 0, proc.stderr
    yield out
    _remove_test_images(engine)


def _remove_test_images(engine) -> None:
    for image in engine.images.list():
        if any(t.startswith(("gpubake/tiny", "gpubake-stage/tiny")) for t in image.tags):
            for tag in image.tags:
                engine.images.remove(tag, force=True)
    if any(BASE in i.tags for i in engine.images.list("gpubake/base")):
        engine.images.remove(BASE, force=True)


@pytest.fixture
def built_tiny(engine, tree) -> str:
    """IMAGE, built (by test_interrupted_base_image_creation when the module runs whole)."""
    if _image_id(engine, IMAGE) is None:
        proc = gpubake(tree, *build_args())
        assert proc.returncode == 0, proc.stderr[-3000:]
    return IMAGE


class Run:
    """`gpubake build -v` in the background, its output read as it comes."""

    def __init__(self, tree: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpubake", *args, "-v"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tree,
            env=build_env(tree),
        )
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_for(self, pattern: str, timeout: float = 600) -> bool:
        deadline = time.monotonic() + timeout
        with self._seen:
            while not any(re.search(pattern, line) for line in self.lines):
                if self.proc.poll() is not None and not self._reader.is_alive():
                    return False
                if not self._seen.wait(timeout=max(0.0, deadline - time.monotonic())):
                    return False
        return True

    def finish(self, timeout: float = 900) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return code, "\n".join(self.lines)


def _tmp_names(tree: Path) -> set[str]:
    return {p.name for p in tmp_dir(tree).iterdir()}


def _gone(path: Path) -> bool:
    """Whether the process a work dir is named after (`<key>.<pid>`, gpubake.build.guard) is
    gone."""
    return not Path("/proc", path.suffix.lstrip(".")).exists()


def _image_id(engine, ref: str) -> str | None:
    return next((i.id for i in engine.images.list() if ref in i.tags), None)


def assert_nothing_left(engine, tree: Path, *, tag_was: str | None, tmp_before: set[str]) -> None:
    """Item 1 of the issue after an interruption (and, for SIGKILL, the next run). Work dirs
    and mounts of builds still running elsewhere (another worker's) are theirs, not left."""
    assert build_containers(engine) == set()
    assert not [b for b in engine.containers.list(all=True) if b.name.startswith("gpubake-build")]
    assert _image_id(engine, IMAGE) == tag_was, "the image's tag moved"
    staged = [t for i in engine.images.list() for t in i.tags if ":output-" in t]
    assert staged == []
    work = resources.cache_dir() / "work"
    left = [p for p in work.iterdir() if _gone(p)] if work.is_dir() else []
    assert left == []
    assert _tmp_names(tree) <= tmp_before, _tmp_names(tree) - tmp_before
    mounted = [Path(ln.split()[1]) for ln in Path("/proc/self/mounts").read_text().splitlines()]
    inside = [m for m in mounted if m.is_relative_to(work) and m != work]
    assert not [m for m in inside if _gone(work / m.relative_to(work).parts[0])]


def _edit(tree: Path, name: str, n: int) -> str:
    path = tree / name
    original = path.read_text()
    path.write_text(original + f"# fault test edit {n}\n")
    return original


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
MOMENTS = {
    # moment: (file edited so that the build has this moment, line waited for, then delay)
    "stage": (EDITS["stage"], r"TASK \[gpubake\.gpu\.base : ", 1.0),
    "gpu-smoke": (EDITS["finish"], r"TASK \[Run gpu-smoke\]", 0.0),
    "commit": (EDITS["finish"], r"Committing the container", 0.0),
}


def interrupt(engine, tree: Path, pattern: str, sig: signal.Signals, delay: float) -> str:
    tmp_before = _tmp_names(tree)
    tag_was = _image_id(engine, IMAGE)
    run = Run(tree, *build_args())
    assert run.wait_for(pattern), "\n".join(run.lines[-40:])
    time.sleep(delay)
    run.proc.send_signal(sig)
    code, out = run.finish()
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        time.sleep(3)  # Packer, told by the kernel, removes its container meanwhile
        return out
    last = out.strip().splitlines()[-1]
    assert code == 128 + sig.value, out[-3000:]
    assert re.match(rf"gpubake: error: interrupted: {sig.name} during \S", last), last
    assert "Traceback" not in out
    assert_nothing_left(engine, tree, tag_was=tag_was, tmp_before=tmp_before)
    return out


def test_interrupted_base_image_creation(engine, tree):
    """SIGINT and SIGTERM during debootstrap: no base image, no root left; SIGKILL: the next
    run removes the root it left, says so, and builds the whole image."""
    assert _image_id(engine, BASE) is None
    for sig in SIGNALS:
        tmp_before = _tmp_names(tree)
        run = Run(tree, *build_args())
        assert run.wait_for(rf"building {BASE} with debootstrap"), "\n".join(run.lines[-20:])
        time.sleep(4)  # debootstrap is downloading and unpacking now
        run.proc.send_signal(sig)
        code, out = run.finish()
        assert _image_id(engine, BASE) is None
        if sig != signal.SIGKILL:
            assert code == 128 + sig.value, out[-2000:]
            assert f"interrupted: {sig.name} during the base image's creation" in out
            assert_nothing_left(engine, tree, tag_was=None, tmp_before=tmp_before)
            pgrep = subprocess.run(["pgrep", "-f", f"debootstrap.*{OS}"], check=False)
            assert pgrep.returncode == 1, "debootstrap still runs"
    proc = gpubake(tree, *build_args())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"removed what an interrupted build left: .*work dir .*base-", proc.stderr)
    assert f"built {IMAGE}" in proc.stderr
    assert_nothing_left(engine, tree, tag_was=_image_id(engine, IMAGE), tmp_before=_tmp_names(tree))


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_interrupted_build(engine, tree, built_tiny, moment):
    """Each signal at this moment: afterwards nothing is left and no tag moved; the next run
    (the edit undone) skips, and after SIGKILL it first removes what the killed build left
    and says so."""
    path, pattern, delay = MOMENTS[moment]
    for n, sig in enumerate(SIGNALS):
        tag_was = _image_id(engine, IMAGE)
        assert tag_was is not None
        tmp_before = _tmp_names(tree)
        original = _edit(tree, path, n)
        try:
            interrupt(engine, tree, pattern, sig, delay)
        finally:
            (tree / path).write_text(original)
        proc = gpubake(tree, *build_args())
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"skipped: {IMAGE} is already built" in proc.stderr, proc.stderr[-3000:]
        if sig == signal.SIGKILL:
            assert "removed what an interrupted build left: " in proc.stderr, proc.stderr
        assert_nothing_left(engine, tree, tag_was=tag_was, tmp_before=tmp_before)


def test_the_next_build_after_the_interruptions_builds(engine, tree, built_tiny):
    """(Under a tag of its own: IMAGE stays the unedited build, which the later tests' runs
    of the unedited tree find instead of building it again.)"""
    was = _image_id(engine, IMAGE)
    original = _edit(tree, EDITS["finish"], 99)
    try:
        proc = gpubake(tree, *build_args(tag="next"))
    finally:
        (tree / EDITS["finish"]).write_text(original)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reused" in proc.stderr and "built gpubake/tiny:next" in proc.stderr
    assert re.search(
        r"stage 4/4 tiny:finish: scanned \d+ layers, \d+ files: no secrets", proc.stderr
    )
    assert _image_id(engine, "gpubake/tiny:next") not in (None, was)
    assert _image_id(engine, IMAGE) == was
    assert [t for i in engine.images.list() for t in i.tags if ":output-" in t] == []


PLANTED = """
- name: Leave a credential behind (the fault test's)
  ansible.builtin.copy:
    dest: /root/.netrc
    content: "machine pypi.example.com login ci password s3cret-from-the-test\\n"
    mode: "0600"
"""


def test_a_secret_in_a_layer_fails_the_build_and_moves_no_tag(engine, tree, built_tiny):
    """A role that leaves a .netrc: the scan after the last stage names the file and its
    layer, the build fails, and neither the asked tag nor a staged one is left on it."""
    tasks = tree / "roles" / "manifest" / "tasks" / "main.yml"
    original = tasks.read_text()
    tasks.write_text(original + PLANTED)
    tag_was, tmp_before = _image_id(engine, IMAGE), _tmp_names(tree)
    try:
        proc = gpubake(tree, *build_args())
    finally:
        tasks.write_text(original)
    assert proc.returncode == 1, proc.stderr[-3000:]
    found = re.search(r"secret found: /root/\.netrc in layer (\d+)/(\d+) \(sha256:", proc.stderr)
    assert found and found[1] == found[2], proc.stderr[-3000:]  # the last stage's own layer
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gpubake: error: stage 4/4 tiny:finish: 1 secret(s) found"), last
    assert "s3cret" not in proc.stderr
    assert_nothing_left(engine, tree, tag_was=tag_was, tmp_before=tmp_before)


def test_leftovers_of_a_killed_build_are_removed_and_said(engine, tree, built_tiny):
    """A labelled build container and a work dir whose lock no build holds are removed by
    the next build; those of a build still running (its lock held) are not, and neither is
    a user's container of a gpubake image (it inherits the label from the committed build)."""
    gone_key, running_key = guard.stage_key("a" * 64), guard.stage_key("b" * 64)
    boxes = {
        key: engine.containers.create(
            BASE, ["true"], name=f"gpubake-build-{key[6:18]}-faults", labels={guard.LOCK_LABEL: key}
        )
        for key in (gone_key, running_key)
    }
    users = engine.containers.create(
        BASE, ["true"], name="gpubake-faults-users-notebook", labels={guard.LOCK_LABEL: gone_key}
    )
    work = resources.cache_dir() / "work"
    dirs = {key: work / f"{guard.slug(key)}.999999" for key in (gone_key, running_key)}
    for path in dirs.values():
        path.mkdir(parents=True)
        (path / "ansible-vars.json").write_text("{}")
    running = guard.BuildLock(running_key)
    assert running.try_acquire()
    try:
        proc = gpubake(tree, *build_args())
        assert proc.returncode == 0, proc.stderr[-3000:]
        said = next(ln for ln in proc.stderr.splitlines() if "removed what an interrupted" in ln)
        assert boxes[gone_key].name in said and str(dirs[gone_key]) in said
        assert boxes[running_key].name not in said and str(dirs[running_key]) not in said
        names = {b.name for b in engine.containers.list(all=True)}
        assert boxes[gone_key].name not in names and boxes[running_key].name in names
        assert users.name in names and users.name not in said
        assert not dirs[gone_key].exists() and dirs[running_key].exists()
    finally:
        running.release()
        for box in [*boxes.values(), users]:
            with contextlib.suppress(docker.errors.NotFound):
                box.remove(force=True)
        guard.remove_tree(dirs[running_key])


def test_two_builds_of_one_image_one_builds_the_other_waits_then_skips(engine, tree, built_tiny):
    original = _edit(tree, EDITS["finish"], 100)
    try:
        first = Run(tree, *build_args(tag="twice"))
        assert first.wait_for(r"stage 4/4 tiny:finish: building")
        second = Run(tree, *build_args(tag="twice"))
        assert second.wait_for(rf"waiting for gpubake \(pid {first.proc.pid} .*{TWICE}", 120)
        code1, out1 = first.finish()
        code2, out2 = second.finish()
    finally:
        (tree / EDITS["finish"]).write_text(original)
    assert code1 == 0, out1[-3000:]
    assert code2 == 0, out2[-3000:]
    assert f"built {TWICE}" in out1
    assert f"skipped: {TWICE} is already built" in out2 and "building" not in out2
    assert out1.strip().splitlines()[-1] == out2.strip().splitlines()[-1] == TWICE


def test_two_stacks_at_once_both_build(engine, tree, built_tiny):
    """tiny (its last stage changed) and tiny-b, which derives from it, at once: tiny-b
    waits for the stage it shares, reuses it, and builds its own; both succeed."""
    original = _edit(tree, EDITS["finish"], TWO_STACKS_EDIT)
    try:
        first = Run(tree, *build_args("tiny", "ctest"))
        assert first.wait_for(r"stage 4/4 tiny:finish: building")
        second = Run(tree, *build_args("tiny-b", "ctest"))
        code2, out2 = second.finish()
        code1, out1 = first.finish()
    finally:
        (tree / EDITS["finish"]).write_text(original)
    assert code1 == 0, out1[-3000:]
    assert code2 == 0, out2[-3000:]
    assert "built gpubake/tiny:ctest" in out1 and "built gpubake/tiny-b:ctest" in out2
    assert re.search(r"waiting for gpubake \(pid \d+ .*\) to finish stage 4/6 tiny:finish", out2)
    assert "stage 4/6 tiny:finish: reused" in out2
    labels = engine.images.get("gpubake/tiny-b:ctest").labels
    assert labels["io.gpubake.stack"] == "tiny-b"


def test_force_rebuilds_the_stacks_own_stages_only(engine, tree, built_tiny):
    """--force rebuilds the asked stack's own stages only: tiny's, below, are reused. On the
    tree test_two_stacks_at_once built tiny-b from, whose images are there."""
    ref = "gpubake/tiny-b:ctest"
    original = _edit(tree, EDITS["finish"], TWO_STACKS_EDIT)
    try:
        if _image_id(engine, ref) is None:  # this test alone
            proc = gpubake(tree, *build_args("tiny-b", "ctest"))
            assert proc.returncode == 0, proc.stderr[-3000:]
        was = _image_id(engine, ref)
        proc = gpubake(tree, *build_args("tiny-b", "ctest"), "--force")
    finally:
        (tree / EDITS["finish"]).write_text(original)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for number, stage in enumerate(("os", "cuda", "env", "finish"), 1):
        assert f"stage {number}/6 tiny:{stage}: reused" in proc.stderr, proc.stderr[-3000:]
    assert "stage 5/6 tiny-b:env: building" in proc.stderr
    assert "stage 6/6 tiny-b:finish: building" in proc.stderr
    assert _image_id(engine, ref) not in (None, was)


def _frozen(engine, image: str) -> list[str]:
    return sorted(run_output(engine, image, ["uv", "pip", "freeze"]).decode().split())


def _sbom_packages(engine, image: str) -> list[tuple]:
    sbom = json.loads(docker_engine.read_image_file(engine, image, SBOM_PATH))
    return sorted(
        (c["name"], c.get("version"), json.dumps(c.get("hashes", []), sort_keys=True))
        for c in sbom["components"]
    )


def test_wheelhouse_then_offline_builds(engine, tree, built_tiny, tmp_path):
    """The air-gapped journey: `gpubake fetch` where the index is reachable; a build given the
    wheelhouse fetches what it lacks (before the stage that installs it) and installs from it
    with no index; `--offline` is refused in one line while a file is missing, and once the
    files are there it builds with build containers that have no network and an index
    address that answers nothing.
    What it installs is what the index build (tiny-b:ctest) installed, and its SBOM lists the
    same packages and hashes."""
    house = tmp_path / "wheelhouse"
    fetched = gpubake(tree, "fetch", "--stack", "tiny", "--os", OS, "--wheelhouse", str(house))
    assert fetched.returncode == 0, fetched.stderr
    names = sorted(p.name for p in house.iterdir() if not p.name.startswith("."))
    assert [n.split("-")[0] for n in names] == ["six", "uv"], names
    assert f"tiny on {OS}: 2 file(s) fetched" in fetched.stdout
    again = gpubake(tree, "fetch", "--stack", "tiny", "--os", OS, "--wheelhouse", str(house))
    assert f"tiny on {OS}: 0 file(s) fetched" in again.stdout, again.stdout + again.stderr

    offline = [*build_args("tiny-b", "offline"), "--offline", "--wheelhouse", str(house)]
    refused = gpubake(tree, *offline)
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("gpubake: error: --offline: the wheelhouse") and "idna 3.10" in last
    assert f"gpubake fetch --stack tiny-b --os {OS} --wheelhouse {house}" in last
    assert _image_id(engine, "gpubake/tiny-b:offline") is None

    online = gpubake(tree, *build_args("tiny-b", "wheels"), "--wheelhouse", str(house), "-vv")
    assert online.returncode == 0, online.stderr[-3000:]
    assert re.search(r"fetched idna-3\.10-\S+\.whl", online.stderr)
    # fetched while the build ran, before the stage that installs the lock built
    fetched_at = online.stderr.index(f"wheelhouse {house}: fetched 1 file(s)")
    assert online.stderr.index("stage 4/6 tiny:finish: reused") < fetched_at
    assert fetched_at < online.stderr.index("stage 5/6 tiny-b:env: building")
    assert "--find-links" in online.stderr and wheelhouse.MOUNT in online.stderr

    no_index = "http://127.0.0.1:9/simple"  # nothing listens: asking an index fails at once
    cut_off = {**build_env(tree), **dict.fromkeys(("UV_INDEX_URL", "PIP_INDEX_URL"), no_index)}
    proc = subprocess.run(
        [sys.executable, "-m", "gpubake", *offline, "--force", "-v"],
        capture_output=True, text=True, timeout=900, cwd=tree, env=cut_off, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = re.findall(r"Run command: docker run .*", proc.stderr)
    assert len(runs) == 2 and all("--network none" in line for line in runs), runs
    assert "stage 5/6 tiny-b:env: building" in proc.stderr

    index = "gpubake/tiny-b:ctest"  # built from the index by test_two_stacks_at_once
    if _image_id(engine, index) is None:  # this test alone
        original = _edit(tree, EDITS["finish"], TWO_STACKS_EDIT)
        try:
            proc = gpubake(tree, *build_args("tiny-b", "ctest"))
        finally:
            (tree / EDITS["finish"]).write_text(original)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for image in ("gpubake/tiny-b:wheels", "gpubake/tiny-b:offline"):
        assert "idna==3.10" in _frozen(engine, image)
        assert _frozen(engine, image) == _frozen(engine, index)
        assert _sbom_packages(engine, image) == _sbom_packages(engine, index)
