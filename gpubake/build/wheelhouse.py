"""The wheelhouse: the files the locks name, downloaded once and hash-checked, so that a
container build installs from it with no package index (`gpubake fetch`, `gpubake build
--wheelhouse DIR` / `--offline`).

A lock (`uv pip compile --generate-hashes`) lists the hashes of every file of each pinned
version, for every platform; the wheelhouse holds, per pin, the one file a build for the
stack's Python and OS takes: the wheel whose tags fit best, or the sdist where no wheel fits.
Each file is checked against the lock's hashes when it arrives and again (by a memo of size,
mtime and sha256) when a build asks whether the wheelhouse is complete. The wheelhouse is a
plain folder of files with their index names: it can be copied into an air-gapped site and
given to `--wheelhouse` there. uv itself (python_env installs it from a hash-pinned wheel) is
fetched too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml
from packaging import tags as wheel_tags
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from gpubake import GpubakeError, resources, size_text, stacks
from gpubake.build import locks
from gpubake.build.hashing import file_sha256

#: where build containers see the wheelhouse (read-only), and where a VM or host build
#: uploads its files (python_env removes them at the end of the play)
MOUNT = "/var/cache/gpubake-wheels"
#: size, mtime and sha256 of the files, so that a complete wheelhouse is not read again
MEMO = ".gpubake-sha256.json"
PART = ".gpubake-part"
WORKERS = 4
CHUNK = 1 << 20

Say = Callable[[str], None]


class WheelhouseError(GpubakeError):
    """A wheelhouse that lacks files, a file no index serves, or a download that failed."""


class _StoppedError(Exception):
    """A background fetch told to stop (its build failed or was interrupted)."""


@dataclass(frozen=True)
class Wanted:
    """One pin: a name, its version and the sha256 digests (hex) the lock allows."""

    name: str
    version: str
    hashes: frozenset[str]

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


def default_dir() -> Path:
    return resources.cache_dir() / "wheels"


def platform_tags(python: str, platform: str) -> list[wheel_tags.Tag]:
    """The wheel tags a CPython `python` ("3.12") on uv's `platform`
    ("x86_64-manylinux_2_36") takes, best first."""
    arch, _, manylinux = platform.partition("-")
    newest = int(manylinux.rsplit("_", 1)[-1])
    platforms = []
    for minor in range(newest, 4, -1):
        platforms.append(f"manylinux_2_{minor}_{arch}")
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}.get(minor)
        if legacy:
            platforms.append(f"{legacy}_{arch}")
    major, minor_py = (int(part) for part in python.split(".")[:2])
    version = (major, minor_py)
    return [
        *wheel_tags.cpython_tags(version, platforms=platforms),
        *wheel_tags.compatible_tags(version, f"cp{major}{minor_py}", platforms),
    ]


def _uv_pin(arch: str) -> Wanted:
    """uv itself, as python_env installs it (the role's defaults are the one copy)."""
    defaults = resources.data_root() / "roles" / "python_env" / "defaults" / "main.yml"
    data = yaml.safe_load(defaults.read_text(encoding="utf-8"))
    digest = data["python_env_uv_sha256"].get(arch)
    if not digest:
        raise WheelhouseError(f"python_env pins no uv wheel for {arch}")
    return Wanted("uv", str(data["python_env_uv_version"]), frozenset({digest.lower()}))


def wanted(lock_list: Iterable[locks.Lock], arch: str) -> list[Wanted]:
    """Every pin of the locks (once), and uv."""
    found: dict[tuple[str, str], Wanted] = {}
    for lock in lock_list:
        for name, (version, hashes) in lock.pins.items():
            digests = frozenset(
                h.split(":", 1)[1].lower() for h in hashes if h.startswith("sha256:")
            )
            if not digests:
                raise WheelhouseError(
                    f"lock {lock.path}: {name} {version} has no sha256 hash: make the lock again"
                )
            earlier = found.get((name, version))
            found[(name, version)] = Wanted(
                name, version, digests | (earlier.hashes if earlier else frozenset())
            )
    uv = _uv_pin(arch)
    found.setdefault((uv.name, uv.version), uv)
    return sorted(found.values(), key=lambda w: (w.name, w.version))


def _file_identity(filename: str) -> tuple[str, Version, frozenset[wheel_tags.Tag] | None] | None:
    """(name, version, tags) of a wheel, (name, version, None) of an sdist, None otherwise."""
    try:
        if filename.endswith(".whl"):
            name, version, _, file_tags = parse_wheel_filename(filename)
            return canonicalize_name(name), version, frozenset(file_tags)
        name, version = parse_sdist_filename(filename)
        return canonicalize_name(name), version, None
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        return None


def _rank(filename: str, order: dict[wheel_tags.Tag, int]) -> int | None:
    """How well a file fits (lower is better): a wheel by its best tag, an sdist last; None:
    a wheel for another platform or Python."""
    identity = _file_identity(filename)
    if identity is None:
        return None
    _, _, file_tags = identity
    if file_tags is None:
        return len(order)
    ranks = [order[t] for t in file_tags if t in order]
    return min(ranks) if ranks else None


class _Memo:
    """sha256 of the wheelhouse's files, keyed by name and checked by size and mtime."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / MEMO
        try:
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.data = {}
        self.changed = False

    def sha256(self, path: Path) -> str:
        st = path.stat()
        known = self.data.get(path.name)
        if known and known[:2] == [st.st_size, st.st_mtime_ns]:
            return known[2]
        digest = file_sha256(path, CHUNK)
        self.data[path.name] = [st.st_size, st.st_mtime_ns, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        with contextlib.suppress(OSError):  # a read-only copy of a wheelhouse is fine
            tmp = self.path.with_name(self.path.name + PART)
            tmp.write_text(json.dumps(self.data, sort_keys=True), encoding="utf-8")
            tmp.replace(self.path)


def best_files(
    folder: Path, pins: Iterable[Wanted], order: dict[wheel_tags.Tag, int]
) -> dict[Wanted, Path | None]:
    """Each pin's best-fitting hash-checked file in the wheelhouse (a wheel by its best tag,
    then an sdist), or None."""
    held: dict[tuple[str, Version], list[Path]] = {}  # the files that fit, by name and version
    if folder.is_dir():
        for path in folder.iterdir():
            identity = _file_identity(path.name)
            if identity is not None and path.is_file() and _rank(path.name, order) is not None:
                held.setdefault(identity[:2], []).append(path)
    memo = _Memo(folder)
    found: dict[Wanted, Path | None] = {}
    for pin in pins:
        fits = sorted(
            held.get((pin.name, Version(pin.version)), []),
            key=lambda p: (_rank(p.name, order), p.name),
        )
        found[pin] = next((p for p in fits if memo.sha256(p) in pin.hashes), None)
    memo.save()
    return found


def missing(folder: Path, pins: Iterable[Wanted], order: dict[wheel_tags.Tag, int]) -> list[Wanted]:
    """The pins the wheelhouse has no fitting, hash-checked file of."""
    return [pin for pin, path in best_files(folder, pins, order).items() if path is None]


def _choose(pin: Wanted, files: list[dict], order: dict[wheel_tags.Tag, int]) -> dict | None:
    ranked = []
    for item in files:
        sha = (item.get("hashes") or {}).get("sha256", "").lower()
        rank = _rank(item.get("filename", ""), order)
        if sha in pin.hashes and rank is not None:
            ranked.append((rank, item["filename"], item))
    return min(ranked)[2] if ranked else None


def _download(pin: Wanted, item: dict, folder: Path, stop: threading.Event | None) -> Path:
    target = folder / item["filename"]
    part = target.with_name(target.name + PART)
    digest = hashlib.sha256()
    try:
        get = locks.session().get
        with get(item["url"], stream=True, timeout=60, headers={"Accept": "*/*"}) as response:
            response.raise_for_status()
            with part.open("wb") as handle:
                for chunk in response.iter_content(CHUNK):
                    if stop is not None and stop.is_set():
                        raise _StoppedError
                    digest.update(chunk)
                    handle.write(chunk)
        if digest.hexdigest() not in pin.hashes:
            raise WheelhouseError(
                f"{item['filename']} arrived with sha256 {digest.hexdigest()[:16]}…, which the "
                f"lock does not allow for {pin.label}: the index serves another file"
            )
        part.replace(target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    return target


def fetch(
    folder: Path,
    pins: list[Wanted],
    order: dict[wheel_tags.Tag, int],
    say: Say,
    index: str | None = None,
    stop: threading.Event | None = None,
) -> tuple[int, int]:
    """Download the files of `pins` the wheelhouse lacks; return (files, bytes) downloaded.
    `stop` set: the downloads end at their next chunk (raising _StoppedError)."""
    index = (index or locks.index_url()).rstrip("/")
    folder.mkdir(parents=True, exist_ok=True)
    lacking = missing(folder, pins, order)
    if not lacking:
        return 0, 0
    say(f"fetching {len(lacking)} file(s) into {folder} from {locks.redact(index)}")

    def one(pin: Wanted) -> Path:
        files = locks.project_files(index, pin.name)
        item = _choose(pin, files, order)
        if item is None:
            raise WheelhouseError(
                f"{locks.redact(index)} has no file of {pin.label} with one of the lock's hashes "
                "for this Python and platform: make the lock again (gpubake lock --upgrade)"
            )
        path = _download(pin, item, folder, stop)
        say(f"fetched {path.name} ({size_text(path.stat().st_size)})")
        return path

    done: list[Path] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = [pool.submit(one, pin) for pin in lacking]
        try:
            for future in concurrent.futures.as_completed(futures):
                done.append(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return len(done), sum(p.stat().st_size for p in done)


@dataclass(frozen=True)
class Need:
    """What a stack's build takes from the wheelhouse."""

    pins: list[Wanted]
    order: dict[wheel_tags.Tag, int]


def need(stack: stacks.Stack, lock_list: Iterable[locks.Lock], arch: str) -> Need:
    if stack.python_env != "uv":
        raise WheelhouseError(
            f"stack '{stack.name}' installs with {stack.python_env}, whose packages come from "
            "conda channels: a wheelhouse holds PyPI's files only; use a uv stack"
        )
    tag_list = platform_tags(stack.python, locks.python_platform(stack, arch))
    return Need(wanted(lock_list, arch), {t: i for i, t in enumerate(tag_list)})


def check(folder: Path, stack: stacks.Stack, lock_list: Iterable[locks.Lock], arch: str) -> None:
    """Refuse (one line) a wheelhouse that lacks a file the build installs (--offline)."""
    wanted_here = need(stack, lock_list, arch)
    lacking = missing(folder, wanted_here.pins, wanted_here.order)
    if lacking:
        raise _lacking(folder, stack, lacking, offline=True)


def _lacking(
    folder: Path, stack: stacks.Stack, lacking: list[Wanted], *, offline: bool
) -> WheelhouseError:
    shown = ", ".join(pin.label for pin in lacking[:3])
    more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
    fix = f"gpubake fetch --stack {stack.name} --os {stack.os.key}"
    fix += "" if folder == default_dir() else f" --wheelhouse {folder}"
    return WheelhouseError(
        f"{'--offline: ' if offline else ''}the wheelhouse {folder} lacks {shown}{more} for "
        f"stack '{stack.name}' on {stack.os.key}: run `{fix}`"
        + (" where the index can be reached" if offline else "")
    )


def files_for(
    folder: Path, stack: stacks.Stack, lock_list: Iterable[locks.Lock], arch: str
) -> list[Path]:
    """The file each pin of the locks (and uv) installs from, best fit first: what a VM or
    host build uploads. Refuses (one line, as `check`) a wheelhouse that lacks one."""
    wanted_here = need(stack, lock_list, arch)
    found = best_files(folder, wanted_here.pins, wanted_here.order)
    lacking = [pin for pin, path in found.items() if path is None]
    if lacking:
        raise _lacking(folder, stack, lacking, offline=False)
    return sorted(path for path in found.values() if path is not None)


def unused(folder: Path) -> list[Path]:
    """The wheelhouse's files that no lock names (the committed locks, those re-resolved
    into the cache for --var) and that are not uv's, for `gpubake prune`."""
    if not folder.is_dir():
        return []
    named: set[str] = set()
    lock_files = [
        *(resources.data_root() / "images" / "locks").rglob("*.txt"),
        *locks.cache_root().rglob("*.txt"),
    ]
    for path in lock_files:
        with contextlib.suppress(OSError, locks.LockError):
            lock = locks.parse(path.read_text(encoding="utf-8"), path)
            for _version, hashes in lock.pins.values():
                named |= {h.split(":", 1)[1].lower() for h in hashes if h.startswith("sha256:")}
    for arch in locks.ARCHES:
        with contextlib.suppress(WheelhouseError):
            named |= _uv_pin(arch).hashes
    memo = _Memo(folder)
    found = [
        path
        for path in sorted(folder.iterdir())
        if path.is_file()
        and _file_identity(path.name) is not None
        and memo.sha256(path) not in named
    ]
    memo.save()
    return found


def folder_bytes(folder: Path) -> int:
    """The bytes of the wheelhouse's files (not its memo); 0 when there is none."""
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != MEMO)


@contextlib.contextmanager
def _fetching(folder: Path) -> Iterator[None]:
    """A failed download as one line (a WheelhouseError)."""
    try:
        yield
    except locks.IndexAnswerError as exc:
        index = locks.redact(locks.index_url())
        raise WheelhouseError(f"fetching into {folder}: the package index {index} {exc}") from None
    except (requests.RequestException, OSError) as exc:
        raise WheelhouseError(
            f"fetching into {folder} failed ({locks.failure_reason(exc)}): check the network, or "
            "point UV_INDEX_URL at a reachable mirror; what arrived is kept"
        ) from None


def fetch_for(
    folder: Path, stack: stacks.Stack, lock_list: Iterable[locks.Lock], arch: str, say: Say
) -> tuple[int, int]:
    wanted_here = need(stack, lock_list, arch)
    with _fetching(folder):
        return fetch(folder, wanted_here.pins, wanted_here.order, say)


class Prefetch:
    """What a container build's wheelhouse lacks, downloaded while the build's first stage
    runs: that stage (the OS's packages, the environment) takes only uv from the wheelhouse,
    so the `first` pins (uv) are fetched at `start` and the rest in a thread; `wait` before a
    stage installs the lock from it. The download overlaps the first stage's apt work instead
    of preceding it."""

    def __init__(
        self,
        folder: Path,
        needed: Need,
        say: Say,
        *,
        first: frozenset[str] = frozenset({"uv"}),
        index: str | None = None,
    ) -> None:
        self.folder = folder
        self._need = needed
        self._first = first
        self._say = say
        self._index = index
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._result: tuple[int, int] = (0, 0)
        self._error: BaseException | None = None
        self.waited = False

    def start(self) -> None:
        if self._thread is not None:
            return
        first = [pin for pin in self._need.pins if pin.name in self._first]
        with _fetching(self.folder):
            fetch(self.folder, first, self._need.order, self._say, self._index)
        self._thread = threading.Thread(target=self._run, name="gpubake-fetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with _fetching(self.folder):
                self._result = fetch(
                    self.folder,
                    self._need.pins,
                    self._need.order,
                    self._say,
                    self._index,
                    stop=self._stop,
                )
        except BaseException as exc:  # handed to the build's thread by wait()
            self._error = exc

    @property
    def started(self) -> bool:
        return self._thread is not None

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> tuple[int, int]:
        """(files, bytes) fetched; the download's error, raised here, in the build's thread."""
        self.start()
        assert self._thread is not None
        self._thread.join()
        self.waited = True
        if self._error is not None:
            raise self._error
        return self._result

    def stop(self) -> None:
        """End the download (a failed or interrupted build): files that arrived are kept."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
