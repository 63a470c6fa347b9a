"""Lock files: every stack's Python packages pinned with hashes, per OS and architecture.

`gpubake lock` writes images/locks/<stack>/<os>-<arch>.txt with `uv pip compile
--generate-hashes` for the stack's Python version and the OS's newest manylinux tag. A
derived stack (`from:`) is compiled with its parent's pins as constraints, so it keeps every
version of its parent and the parent's layers stay valid for it.

A lock starts with three header lines, then uv's requirements text (pip-compatible):

    # gpubake lock for stack <name> on <os>/<arch> (gpubake lock --stack .. --os .. --arch ..)
    # inputs: <sha256 of the requirements, python, platform and the parent lock's content>
    # content: <sha256 of everything below the header>

`check()` refuses a lock that is missing, stale (inputs), edited by hand (content), or whose
pins disagree with the stack or its parent; `verify()` checks every pin and hash against the
package index; `for_build()` gives a build its lock, re-resolved into the cache when --var
changes what the stack pins.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import html.parser
import json
import os
import re
import subprocess
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from gpubake import GpubakeError, resources, stacks

#: Architectures a lock can be made for.
ARCHES = ("x86_64", "aarch64")
DEFAULT_INDEX = "https://pypi.org/simple"
_HEADER = re.compile(r"^# gpubake lock for stack (?P<stack>\S+) on (?P<os>[^/\s]+)/(?P<arch>\S+)")
_ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(?P<version>[^\s;\\]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_JSON_API = "application/vnd.pypi.simple.v1+json"
#: What uv's fancy error output puts before its lines (a cross, box-drawing arrows).
_BULLETS = "\u00d7\u2570\u2500\u25b6\u2502 "


class LockError(GpubakeError):
    """A lock that is missing, stale, edited, unresolvable or not what the index serves."""


@dataclass(frozen=True)
class Lock:
    """A lock file as read: its pins are {normalized name: (version, (sha256:..., ...))}."""

    path: Path
    text: str
    pins: dict[str, tuple[str, tuple[str, ...]]]
    sha256: str
    stack: str | None = None  # from the header; None for a lock without one
    os_key: str | None = None
    arch: str | None = None
    inputs: str | None = None
    content: str | None = None
    body: str = field(default="", repr=False)

    @property
    def body_sha256(self) -> str:
        return _sha256(self.body)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def lock_path(stack: stacks.Stack, arch: str) -> Path:
    """images/locks/<stack>/<os>-<arch>.txt under the data root."""
    return resources.data_root() / "images" / "locks" / stack.name / f"{stack.os.key}-{arch}.txt"


def cache_root() -> Path:
    return resources.cache_dir() / "locks"


def uv_cache_dir() -> Path:
    """uv's cache for locks and builds (mounted into build containers), created."""
    path = resources.cache_dir() / "uv"
    path.mkdir(parents=True, exist_ok=True)
    return path


def index_url() -> str:
    """The package index locks are resolved from and verified against."""
    for var in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"):
        value = os.environ.get(var, "").strip()
        if value:
            return value.rstrip("/")
    return DEFAULT_INDEX


def fix_command(stack_name: str, os_key: str, arch: str) -> str:
    """The `gpubake lock` command that (re)writes a lock; --arch only when not this machine's."""
    command = f"gpubake lock --stack {stack_name} --os {os_key}"
    return command + (f" --arch {arch}" if arch != stacks.machine_arch() else "")


def _show(path: Path) -> str:
    """A lock's path as messages show it: relative to the data root when inside it."""
    try:
        return str(path.relative_to(resources.data_root()))
    except ValueError:
        return str(path)


# --- uv ---------------------------------------------------------------------------------------


def uv_binary() -> str:
    try:
        from uv import find_uv_bin
    except ImportError:
        raise LockError("uv is not installed: run `pip install uv==0.13.9`") from None
    return find_uv_bin()


@functools.cache
def _manylinux_minors(arch: str) -> tuple[int, ...]:
    """The glibc 2.x minors uv accepts in --python-platform <arch>-manylinux_2_<minor>."""
    try:
        out = subprocess.run(
            [uv_binary(), "pip", "compile", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    minors = {int(m) for m in re.findall(rf"\b{re.escape(arch)}-manylinux_2_(\d+)\b", out)}
    if re.search(rf"\b{re.escape(arch)}-manylinux2014\b", out):
        minors.add(17)
    return tuple(sorted(minors)) or (17, 28)


def python_platform(stack: stacks.Stack, arch: str) -> str:
    """uv's --python-platform for the stack's OS: the newest manylinux tag its glibc runs."""
    if arch not in ARCHES:
        raise LockError(f"architecture '{arch}' is unknown: use one of {', '.join(ARCHES)}")
    glibc = str(getattr(stack.os, "glibc", "") or "")
    major, _, minor = glibc.partition(".")
    if major != "2" or not minor.isdigit():
        raise LockError(
            f"{stack.os.key} has no glibc version 2.N: set operating_systems.{stack.os.key}."
            "glibc in images/stacks.yml"
        )
    fit = [m for m in _manylinux_minors(arch) if m <= int(minor)]
    if not fit:
        raise LockError(f"uv knows no manylinux tag for glibc {glibc} on {arch}: upgrade uv")
    return f"{arch}-manylinux_2_{fit[-1]}"


def inputs_digest(stack: stacks.Stack, arch: str, parent_lock: Lock | None) -> str:
    """What a lock is made from: the requirements, Python, platform and the parent's pins."""
    data = {
        "requirements": list(stack.requirements),
        "python": stack.python,
        "platform": python_platform(stack, arch),
        "parent": parent_lock.body_sha256 if parent_lock is not None else None,
    }
    return _sha256(json.dumps(data, sort_keys=True))


def _header(stack: stacks.Stack, arch: str) -> str:
    lock_vars = _lock_vars(stack)
    if lock_vars:
        how = f"with {lock_vars} (re-resolved for a build)"
    else:  # --arch always: the file is the same whichever machine wrote it
        how = f"(gpubake lock --stack {stack.name} --os {stack.os.key} --arch {arch})"
    return f"# gpubake lock for stack {stack.name} on {stack.os.key}/{arch} {how}\n"


def _lock_vars(stack: stacks.Stack) -> str:
    """The --var overrides that change what a stack's lock holds, as flags."""
    return " ".join(
        f"--var {k}={v}" for k, v in stack.overrides if k.startswith("packages.") or k == "python"
    )


def _uv_error(stack: stacks.Stack, stderr: str) -> str:
    """uv's refusal cut to one line: its first cause, its first sentence."""
    lines = []
    for raw in _ANSI.sub("", stderr).splitlines():
        line = raw.strip().lstrip(_BULLETS).strip()
        for prefix in ("error:", "cause:", "Caused by:"):
            if line.startswith(prefix):
                line = line[len(prefix) :].strip()
        if line and not line.startswith(("hint:", "help:", "warning:")):
            lines.append(line)
    if len(lines) > 1 and lines[0].rstrip(":").startswith("No solution found"):
        lines = lines[1:]
    message = lines[0] if lines else "uv failed without a message"
    sentence = re.match(r"(.+?\.)(\s|$)", message)
    if sentence:
        message = sentence.group(1)
    return f"stack '{stack.name}' cannot be resolved on {stack.os.key}: {message}"


def compile_lock(
    stack: stacks.Stack,
    arch: str,
    upgrade: bool = False,
    *,
    parent_lock: Lock | None = None,
    prefer: Path | None = None,
) -> str:
    """Resolve the stack's requirements with uv into a lock's text.

    A derived stack is constrained to its parent's pins (`parent_lock`, by default the
    parent's committed lock, checked). Without --upgrade the versions of `prefer` (by default
    the committed lock) are kept where they still fit, so relocking is stable.
    """
    if stack.parent is not None and parent_lock is None:
        parent_lock = check(stack.parent, arch)
    platform_tag = python_platform(stack, arch)
    if prefer is None and not upgrade:
        prefer = lock_path(stack, arch)
    with tempfile.TemporaryDirectory(prefix="gpubake-lock-") as tmp:
        work = Path(tmp)
        out = work / "lock.txt"
        if prefer is not None and prefer.is_file() and not upgrade:
            out.write_text(prefer.read_text(encoding="utf-8"), encoding="utf-8")
        command = [
            uv_binary(),
            "pip",
            "compile",
            "-",
            "--generate-hashes",
            "--python-version",
            stack.python,
            "--python-platform",
            platform_tag,
            "--index-url",
            index_url(),
            "--cache-dir",
            str(uv_cache_dir()),
            "--no-config",
            "--no-header",
            "--color",
            "never",
            "--quiet",
            "--output-file",
            out.name,
        ]
        if upgrade:
            command.append("--upgrade")
        if parent_lock is not None:
            # relative, so uv's "# via -c parent-<name>.txt" notes carry no temporary path
            constraints = work / f"parent-{stack.parent.name}.txt"  # type: ignore[union-attr]
            constraints.write_text(
                "".join(f"{name}=={version}\n" for name, (version, _) in parent_lock.pins.items()),
                encoding="utf-8",
            )
            command += ["--constraint", constraints.name]
        env = {**os.environ, "NO_COLOR": "1", "UV_NO_PROGRESS": "1"}
        try:
            proc = subprocess.run(
                command,
                input="".join(f"{req}\n" for req in stack.requirements),
                capture_output=True,
                text=True,
                cwd=work,
                env=env,
                timeout=1800,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise LockError(
                f"stack '{stack.name}' cannot be resolved on {stack.os.key}: uv took over 30 "
                "minutes (is the package index reachable?)"
            ) from None
        if proc.returncode != 0:
            raise LockError(_uv_error(stack, proc.stderr))
        body = out.read_text(encoding="utf-8")
    digest = inputs_digest(stack, arch, parent_lock)
    return f"{_header(stack, arch)}# inputs: {digest}\n# content: {_sha256(body)}\n{body}"


# --- reading and checking ---------------------------------------------------------------------


def parse(text: str, path: Path) -> Lock:
    """A lock's text read into pins; the header is optional (a plain requirements file)."""
    lines = text.splitlines(keepends=True)
    meta: dict[str, Any] = {}
    body = text
    if lines and (header := _HEADER.match(lines[0])):
        meta = {"stack": header["stack"], "os_key": header["os"], "arch": header["arch"]}
        for key, line in zip(("inputs", "content"), lines[1:3], strict=False):
            prefix = f"# {key}: "
            if line.startswith(prefix):
                meta[key] = line[len(prefix) :].strip()
        body = "".join(lines[3:])
    pins: dict[str, tuple[str, tuple[str, ...]]] = {}
    current = ""

    def flush() -> None:
        nonlocal current
        entry = current.strip()
        current = ""
        if not entry or entry.startswith("-"):  # options such as --index-url
            return
        match = _ENTRY.match(entry)
        if match is None:
            raise LockError(f"lock {_show(path)}: '{entry[:60]}' is not a name==version pin")
        hashes = tuple(t.split("=", 1)[1] for t in entry.split() if t.startswith("--hash="))
        pins[canonicalize_name(match["name"])] = (match["version"], hashes)

    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            flush()
        elif line.endswith("\\"):
            current += " " + line[:-1]
        else:
            current += " " + line
            flush()
    flush()
    return Lock(path=path, text=text, pins=pins, sha256=_sha256(text), body=body, **meta)


def read(stack: stacks.Stack, arch: str) -> Lock:
    """The committed lock of a stack, read but not checked."""
    path = lock_path(stack, arch)
    if not path.is_file():
        raise LockError(
            f"no lock for stack '{stack.name}' on {stack.os.key}/{arch}: run "
            f"`{fix_command(stack.name, stack.os.key, arch)}`"
        )
    return parse(path.read_text(encoding="utf-8"), path)


def _same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def _pin_problems(stack: stacks.Stack, lock: Lock, parent_lock: Lock | None) -> list[str]:
    problems = []
    for name, version in stack.packages:
        pin = lock.pins.get(canonicalize_name(name))
        if pin is None:
            problems.append(f"it has no {name}, which stack '{stack.name}' pins to {version}")
        elif not _same_version(pin[0], version):
            problems.append(f"{name} is {pin[0]}, stack '{stack.name}' pins {version}")
    if parent_lock is not None:
        parent = stack.parent.name if stack.parent else "the parent"
        for name, (version, _) in parent_lock.pins.items():
            pin = lock.pins.get(name)
            if pin is None or not _same_version(pin[0], version):
                has = f"it has {pin[0]}" if pin else "it has none"
                problems.append(f"{name} {version} of parent stack '{parent}' is not kept ({has})")
    for name, (version, hashes) in lock.pins.items():
        if not hashes:
            problems.append(f"{name} {version} has no hash")
    return problems


def _check_file(stack: stacks.Stack, arch: str, path: Path, parent_lock: Lock | None) -> Lock:
    fix = f"run `{fix_command(stack.name, stack.os.key, arch)}`"
    if not path.is_file():
        raise LockError(f"no lock for stack '{stack.name}' on {stack.os.key}/{arch}: {fix}")
    lock = parse(path.read_text(encoding="utf-8"), path)
    shown = _show(path)
    if lock.stack != stack.name or lock.os_key != stack.os.key or lock.arch != arch:
        what = f"stack {lock.stack} on {lock.os_key}/{lock.arch}" if lock.stack else "no header"
        raise LockError(
            f"{shown} is not the lock of stack '{stack.name}' on {stack.os.key}/{arch} "
            f"(its header says {what}): {fix}"
        )
    problems = _pin_problems(stack, lock, parent_lock)
    if lock.content != lock.body_sha256:
        detail = f" ({problems[0]})" if problems else " (its # content digest does not match)"
        raise LockError(f"{shown} was edited by hand{detail}: {fix}")
    if lock.inputs != inputs_digest(stack, arch, parent_lock):
        also = f" or the lock of stack '{stack.parent.name}'" if stack.parent else ""
        raise LockError(f"{shown} is out of date with images/stacks.yml{also}: {fix}")
    if problems:
        raise LockError(f"{shown} does not fit stack '{stack.name}' ({problems[0]}): {fix}")
    return lock


def check(stack: stacks.Stack, arch: str) -> Lock:
    """The committed lock of a stack, refused (one line, with the fix) unless it is current,
    untouched, has a hash for every entry and keeps the stack's and its parent's pins."""
    parent_lock = check(stack.parent, arch) if stack.parent is not None else None
    return _check_file(stack, arch, lock_path(stack, arch), parent_lock)


# --- the index --------------------------------------------------------------------------------


def _file_version(filename: str) -> Version | None:
    try:
        if filename.endswith(".whl"):
            return parse_wheel_filename(filename)[1]
        return parse_sdist_filename(filename)[1]
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        return None


_local = threading.local()
#: PEP 691's JSON first; a PEP 503 HTML page (devpi, Nexus, Artifactory mirrors) is read too
_ACCEPT = f"{_JSON_API}, text/html;q=0.1"


class IndexAnswerError(GpubakeError):
    """The index answered, but not with what a package index answers (why, in one line)."""


def redact(url: str) -> str:
    """An index URL as messages show it: credentials in it hidden."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _session() -> requests.Session:
    """One session per thread (kept-alive connections; requests takes credentials from the
    URL, proxies and CA bundles from the environment)."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
        session.headers.update({"Accept": _ACCEPT, "User-Agent": "gpubake"})
    return session


def _get(url: str) -> tuple[bytes, str] | None:
    """A simple-API page and its content type; None for a 404."""
    response = _session().get(url, timeout=60)
    if response.status_code == 404:
        return None
    if response.status_code in (401, 403):
        raise IndexAnswerError(
            f"refused the request ({response.status_code} {response.reason}): give the "
            "credentials in the URL (https://USER:TOKEN@host/simple) or check them"
        )
    if response.status_code != 200:
        status = f"{response.status_code} {response.reason}"
        raise IndexAnswerError(f"answered {status} for {redact(url)}")
    return response.content, response.headers.get("Content-Type", "").split(";")[0].strip()


class _Anchors(html.parser.HTMLParser):
    """The files of a PEP 503 page: each anchor's file name and its URL's #sha256=."""

    def __init__(self) -> None:
        super().__init__()
        self.files: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag != "a":
            return
        href = urllib.parse.urlsplit(dict(attrs).get("href") or "")
        algorithm, _, digest = href.fragment.partition("=")
        name = urllib.parse.unquote(href.path.rsplit("/", 1)[-1])
        url = urllib.parse.urlunsplit(href._replace(fragment=""))
        self.files.append(
            {"filename": name, "url": url, "hashes": {algorithm: digest} if digest else {}}
        )


def _page(index: str, name: str) -> dict[str, Any] | None:
    """A project's simple-API page as PEP 691 JSON (an HTML page converted)."""
    got = _get(f"{index}/{name}/")
    if got is None:
        return None
    raw, kind = got
    if kind in (_JSON_API, "application/json"):
        try:
            return json.loads(raw)
        except ValueError:
            raise IndexAnswerError(f"sent {name}'s page as broken JSON") from None
    if kind in ("text/html", "application/vnd.pypi.simple.v1+html"):
        parser = _Anchors()
        parser.feed(raw.decode("utf-8", "replace"))
        if parser.files or b"<a" in raw.lower() or b"<html" in raw.lower():
            return {"files": parser.files}
    raise IndexAnswerError(
        f"answered {name}'s page with {kind or 'no content type'}, which is no package index "
        "page (PEP 691 JSON or PEP 503 HTML): check that the URL ends at the index's /simple"
    )


def project_files(index: str, name: str) -> list[dict[str, Any]]:
    """A project's files on the index: {"filename", "url" (absolute), "hashes"}; [] for none."""
    data = _page(index.rstrip("/"), name) or {}
    page = f"{index.rstrip('/')}/{name}/"
    return [
        {**item, "url": urllib.parse.urljoin(page, item.get("url", ""))}
        for item in data.get("files", [])
        if item.get("url")
    ]


def session() -> requests.Session:
    """The index client's session (this thread's), for downloads from the index."""
    return _session()


def failure_reason(exc: BaseException) -> str:
    """Why a request failed, without URLs (they may hold credentials)."""
    return _reason(exc)


def _version_files(index: str, name: str, version: str) -> set[str] | None:
    """The sha256 digests of one version's files on the index; None: no such version."""
    data = _page(index, name)
    if data is None:
        return None
    try:
        wanted = Version(version)
    except InvalidVersion:
        return None
    files = data.get("files", [])
    # Parsing every file name is slow for projects with thousands of files: look first at
    # those that name the version as written, then at all.
    spelled = [f for f in files if f"-{version}" in f.get("filename", "")]
    found: set[str] | None = None
    for candidates in (spelled, files):
        for item in candidates:
            sha = item.get("hashes", {}).get("sha256")
            if sha and _file_version(item.get("filename", "")) == wanted:
                found = (found or set()) | {sha.lower()}
        if found:
            return found
    versions = set()
    for text in data.get("versions", []):  # PEP 700: a version listed, its files not shown
        try:
            versions.add(Version(text))
        except InvalidVersion:
            continue
    return set() if wanted in versions else None


def _verified_memo(lock: Lock) -> Path:
    return cache_root() / "verified" / lock.sha256


def verify(lock: Lock, index: str | None = None) -> None:
    """Every pinned version exists on the index and each of its hashes is one of that
    version's files. Checked once per lock text and index (a memo in the cache)."""
    index = (index or index_url()).rstrip("/")
    memo = _verified_memo(lock)
    if memo.is_file() and memo.read_text(encoding="utf-8").strip() == redact(index):
        return
    shown, where = _show(lock.path), redact(index)
    if lock.stack and lock.os_key and lock.arch:
        fix = f"run `{fix_command(lock.stack, lock.os_key, lock.arch)}`"
    else:
        fix = "run `gpubake lock`"
    names = list(lock.pins)
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        futures = {
            name: pool.submit(_version_files, index, name, lock.pins[name][0]) for name in names
        }
        try:
            found = {name: future.result() for name, future in futures.items()}
        except IndexAnswerError as exc:
            for future in futures.values():
                future.cancel()
            raise LockError(f"lock {shown}: the package index {where} {exc}") from None
        except (requests.RequestException, OSError, ValueError) as exc:
            for future in futures.values():
                future.cancel()
            raise LockError(
                f"lock {shown}: the package index {where} could not be reached "
                f"({_reason(exc)}); the lock cannot be verified without it: check the network, "
                "or point UV_INDEX_URL at a reachable mirror"
            ) from None
    for name in names:
        version, hashes = lock.pins[name]
        files = found[name]
        if files is None:
            raise LockError(f"lock {shown}: {name} {version} does not exist on {where} ({fix})")
        for item in hashes:
            algorithm, _, digest = item.partition(":")
            if algorithm != "sha256" or digest.lower() not in files:
                raise LockError(
                    f"lock {shown}: hash mismatch for {name} {version} ({item[:19]}… is no file "
                    f"of it on {where}): {fix}"
                )
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(where + "\n", encoding="utf-8")


def _reason(exc: BaseException) -> str:
    """The innermost cause of a connection failure, without the URL (which may hold
    credentials) that requests' messages repeat."""
    while exc.__context__ is not None and isinstance(exc, requests.RequestException):
        exc = exc.__context__
    text = str(getattr(exc, "reason", None) or exc)
    return re.sub(r"\S+://\S+", "the index", text)


# --- builds -----------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def for_build(stack: stacks.Stack, arch: str) -> tuple[Lock, str | None]:
    """The lock a build installs, and a note for the user or None.

    The committed lock (checked), or, when --var changes what the stack pins, a lock
    re-resolved into ~/.cache/gpubake/locks/<stack>/<os>-<arch>-<inputs12>.txt.
    """
    parent_lock = None
    if stack.parent is not None:
        parent_lock, _ = for_build(stack.parent, arch)
    committed = lock_path(stack, arch)
    expected = inputs_digest(stack, arch, parent_lock)
    if not stack.overrides or (committed.is_file() and read(stack, arch).inputs == expected):
        return _check_file(stack, arch, committed, parent_lock), None
    path = cache_root() / stack.name / f"{stack.os.key}-{arch}-{expected[:12]}.txt"
    note = f"{_lock_vars(stack) or 'overrides'}: lock re-resolved into {path}"
    if path.is_file():
        try:
            return _check_file(stack, arch, path, parent_lock), note
        except LockError:
            pass  # stale or damaged: make it again
    text = compile_lock(stack, arch, parent_lock=parent_lock, prefer=committed)
    _write(path, text)
    return _check_file(stack, arch, path, parent_lock), note


def subset(lock: Lock, pattern: str) -> str:
    """Requirements text (with hashes) of the lock's entries whose name matches `pattern`:
    the CUDA wheels' layer, for instance."""
    regex = re.compile(pattern)
    out = []
    for name, (version, hashes) in lock.pins.items():
        if regex.search(name):
            out.append(f"{name}=={version}" + "".join(f" \\\n    --hash={h}" for h in hashes))
    return "".join(f"{entry}\n" for entry in out)


# --- gpubake lock -----------------------------------------------------------------------------


def _with_parents(names: Iterable[str]) -> list[str]:
    """The stacks to lock, each after its parents (which are added when not named)."""
    data = stacks.stacks_data()["stacks"]
    ordered: list[str] = []

    def add(name: str, seen: tuple[str, ...] = ()) -> None:
        if name in ordered:
            return
        if name in seen:
            raise LockError(
                f"stacks {' -> '.join((*seen, name))} derive from each other: fix "
                "`from:` in images/stacks.yml"
            )
        parent = data[name].get("from")
        if parent in data:
            add(parent, (*seen, name))
        ordered.append(name)

    for name in names:
        add(name)
    return ordered


def lock_stacks(
    stack_names: Iterable[str] = (),
    os_keys: Iterable[str] = (),
    arch: str | None = None,
    upgrade: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Write the locks of the stacks (all by default) on the OSes (all by default).

    Stack and OS pairs that cannot go together (stacks.resolve refuses them) are skipped
    with a note; an unchanged lock is left as it is ("up to date"); a lock uv cannot resolve
    is "failed" with uv's reason (and so are its children), the others are still made.
    Returns one record per pair, parents before children.
    """
    arch = arch or stacks.machine_arch()
    if arch not in ARCHES:
        raise LockError(f"architecture '{arch}' is unknown: use one of {', '.join(ARCHES)}")
    known = stacks.stack_names()
    wanted = list(stack_names) or known
    for name in wanted:
        if name not in known:
            raise stacks.StackError(f"unknown stack '{name}': choose one of {', '.join(known)}")
    oses = list(os_keys) or stacks.os_names()
    for key in oses:
        stacks.get_os(key)  # unknown OS: its one-line refusal
    say = progress or (lambda _message: None)
    records: list[dict[str, Any]] = []
    for key in oses:
        for name in _with_parents(wanted):
            record: dict[str, Any] = {"stack": name, "os": key, "arch": arch, "status": ""}
            records.append(record)
            try:
                stack = stacks.resolve(name, os_key=key)
            except stacks.StackError as exc:
                record.update(status="skipped", note=str(exc))
                continue
            path = lock_path(stack, arch)
            record["path"] = _show(path)
            failed = [r for r in records if r["os"] == key and r["status"] == "failed"]
            parent = next(
                (r for r in failed if stack.parent and r["stack"] == stack.parent.name), None
            )
            if parent is not None:
                record.update(
                    status="failed",
                    note=f"its parent stack '{parent['stack']}' could not be locked on {key}",
                )
                continue
            if not upgrade:
                try:
                    lock = check(stack, arch)
                except LockError:
                    pass
                else:
                    record.update(status="up to date", packages=len(lock.pins))
                    continue
            say(f"locking stack {name} on {key}/{arch} ...")
            try:
                text = compile_lock(stack, arch, upgrade=upgrade)
            except LockError as exc:
                record.update(status="failed", note=str(exc))
                continue
            old = path.read_text(encoding="utf-8") if path.is_file() else None
            if text != old:
                _write(path, text)
            lock = check(stack, arch)
            record.update(status="up to date" if text == old else "wrote", packages=len(lock.pins))
    return records
