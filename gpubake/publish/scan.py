"""`gpubake scan IMAGE`: every layer of a local image checked for secrets.

A secret a later layer deletes is still in the image (anyone can read its layers), so each
layer is scanned on its own, whiteouts included. Layers are read from the engine's overlay2
directories where this process can read them (a local root engine: fast, nothing is copied)
and from `docker save` otherwise. Results are cached per layer, keyed by its diff id and a
digest of the rules, so a layer shared by many images is read once.

Path rules name files that must never ship (a .netrc, a shell history, the build's CA
bundle...); content rules look for private keys and tokens, but only in small text files
in which a cheap bytes prefilter found a candidate, with detect-secrets' pattern plugins
(never its entropy or keyword plugins, which flag half of site-packages).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import io
import json
import os
import re
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, Any

import click

from gpubake import GpubakeError, resources
from gpubake.build import docker_engine

#: Bumped when a rule changes meaning; the cache key also covers this file's own text.
SCANNER_VERSION = "1"
MAX_CONTENT = 2 << 20  # content rules read text files up to 2 MiB
BINARY_PROBE = 8192  # a NUL in the first 8 KiB: binary, no content rules
_CHUNK = 1 << 20

Progress = Callable[[str], None]


class ScanError(GpubakeError):
    """A secret in an image, or an image that cannot be scanned."""


@dataclass(frozen=True)
class Finding:
    path: str
    layer: int
    layers: int
    diff_id: str
    rule: str
    detail: str

    def line(self) -> str:
        return (
            f"{self.path} in layer {self.layer}/{self.layers} ({self.diff_id[:19]}): "
            f"{self.detail} [{self.rule}]"
        )


@dataclass(frozen=True)
class ScanReport:
    image: str
    layers: int
    files: int
    findings: tuple[Finding, ...]
    cached_layers: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Hit:
    """A finding within one layer, before the layer's place in an image is known."""

    path: str
    rule: str
    detail: str


@dataclass(frozen=True)
class LayerResult:
    files: int
    hits: tuple[Hit, ...]


@dataclass(frozen=True)
class Allow:
    path: str  # an fnmatch glob on the absolute path ('*' crosses '/')
    rule: str
    why: str

    def covers(self, hit: Hit | Finding) -> bool:
        return hit.rule == self.rule and fnmatch.fnmatchcase(hit.path, self.path)


# --- the rules --------------------------------------------------------------------------

# Any of these in a file makes its lines candidates for the content rules and keeps its
# text for hardlinks to it (the config rules need one of the last ones too).
_PREFILTER = re.compile(
    rb"PRIVATE KEY|PuTTY-User-Key-File|AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9]|gh[pousr]_|github_pat_"
    rb"|gl[a-z]{2,7}-|GR1348941|xox[abposr]-|[sr]k_live_|eyJ|aws_secret_access_key"
    rb"|service_account|://[^\s/@]+@|/t/|password|token|secret|\"auths?\""
)
_CONTENT_TRIGGER = re.compile(
    rb"PRIVATE KEY|PuTTY-User-Key-File|AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9]|gh[pousr]_|github_pat_"
    rb"|gl[a-z]{2,7}-|GR1348941|xox[abposr]-|[sr]k_live_|eyJ|aws_secret_access_key"
)
# A real PEM private key: the armour line alone on its line, then a base64 body (source
# code that merely names the armour, as every crypto library does, is not a key).
_PEM_KEY = re.compile(
    rb"^[ \t]*-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----[ \t]*\r?\n"
    rb"(?:[A-Za-z-]+: [^\n]*\r?\n)*\s*[A-Za-z0-9+/=]{40,}",
    re.MULTILINE,
)
_URL_CREDENTIALS = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:'\"]+:[^\s/@'\"]+@")
_CONDA_TOKEN = re.compile(rb"://\S*/t/[A-Za-z0-9_-]{8,}/")
_SECRET_SETTING = re.compile(
    rb"^[ \t]*[\"']?([\w.-]*(?:password|token|secret|api[_-]?key))[\"']?[ \t]*[=:][ \t]*(\S+)",
    re.MULTILINE | re.IGNORECASE,
)
_GCP_SA = re.compile(rb"\"type\"\s*:\s*\"service_account\"")
# detect-secrets wants the value quoted; the AWS CLI's own files do not quote it
_AWS_SECRET_SETTING = re.compile(
    rb"^[ \t]*[\"']?aws_secret_access_key[\"']?[ \t]*[=:][ \t]*[\"']?"
    rb"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])",
    re.MULTILINE | re.IGNORECASE,
)
_NETRC_PASSWORD = re.compile(rb"(?:^|\s)password\s+\S")

_HISTORIES = frozenset(
    {
        ".bash_history",
        ".zsh_history",
        ".sh_history",
        ".ash_history",
        ".python_history",
        "fish_history",
        ".psql_history",
        ".mysql_history",
        ".sqlite_history",
        ".node_repl_history",
    }
)
_CONFIGS = {  # basename: (rule, what it is)
    "pip.conf": ("pip-credentials", "pip config"),
    "pip.ini": ("pip-credentials", "pip config"),
    "uv.toml": ("uv-credentials", "uv config"),
    ".condarc": ("conda-credentials", "conda config"),
    "condarc": ("conda-credentials", "conda config"),
}
_GCLOUD_FILES = ("/.config/gcloud/credentials.db", "/.config/gcloud/access_tokens.db")


@dataclass(frozen=True)
class Rules:
    build_ca_dir: str

    def check(self, path: str, size: int, read: Callable[[], bytes | None]) -> list[Hit]:
        """The hits of one regular file; `read` gives its bytes (None: binary or too big)."""
        hits = [Hit(path, rule, detail) for rule, detail in self._by_path(path, size, read)]
        if hits:  # flagged already: a second line for the same file says nothing more
            return hits
        data = read()
        return [Hit(path, rule, detail) for rule, detail in _by_content(data)] if data else []

    def _by_path(
        self, path: str, size: int, read: Callable[[], bytes | None]
    ) -> Iterator[tuple[str, str]]:
        name = path.rsplit("/", 1)[-1]
        if path.startswith(self.build_ca_dir + "/"):
            yield "build-ca", f"a file of the build's CA directory {self.build_ca_dir}"
        elif fnmatch.fnmatchcase(path, "/etc/ssh/ssh_host_*_key") and size:
            yield "ssh-host-key", "an SSH host private key (every container would share it)"
        elif re.search(r"/\.ssh/authorized_keys2?$", path) and size:
            yield "authorized-keys", "an SSH authorized_keys file"
        elif name in _HISTORIES and size:
            yield "history", "a non-empty shell or REPL history"
        elif name in (".netrc", "_netrc") and size:
            with_password = _NETRC_PASSWORD.search(read() or b"")
            yield "netrc", "a .netrc with a password" if with_password else "a non-empty .netrc"
        elif name in _CONFIGS:
            rule, what = _CONFIGS[name]
            yield from ((rule, f"a {what} with {why}") for why in _config_secrets(read()))
        elif name == "config.json" and path.endswith("/.docker/config.json"):
            yield from (("docker-auth", f"a Docker login for {r}") for r in _docker_auths(read()))
        elif path.endswith("/.aws/credentials") and size:
            yield "aws-credentials", "an AWS credentials file"
        elif (path.endswith(_GCLOUD_FILES) or name == "application_default_credentials.json") and (
            size
        ):
            yield "gcloud-credentials", "gcloud credentials"


def _config_secrets(data: bytes | None) -> list[str]:
    """What in a pip/uv/conda config carries a credential (never the value)."""
    if not data:
        return []
    found = []
    if _URL_CREDENTIALS.search(data):
        found.append("a user and password in an index URL")
    if _CONDA_TOKEN.search(data):
        found.append("a token in a channel URL")
    for match in _SECRET_SETTING.finditer(data):
        if match.group(2).strip(b"\"',") not in (b"", b"null", b"~", b"None"):
            found.append(f"a {match.group(1).decode('ascii', 'replace')} setting")
    return found


def _docker_auths(data: bytes | None) -> list[str]:
    try:
        auths = json.loads(data or b"").get("auths") or {}
    except (ValueError, AttributeError):
        return []
    if not isinstance(auths, dict):
        return []
    return [
        str(registry)[:80]
        for registry, entry in auths.items()
        if isinstance(entry, dict) and (entry.get("auth") or entry.get("identitytoken"))
    ]


@cache
def _plugins() -> tuple[tuple[str, Any], ...]:
    """detect-secrets' pattern plugins (rule id, plugin): the ones that match a shape, not
    an entropy or a variable name."""
    from detect_secrets.plugins.aws import AWSKeyDetector
    from detect_secrets.plugins.github_token import GitHubTokenDetector
    from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
    from detect_secrets.plugins.jwt import JwtTokenDetector
    from detect_secrets.plugins.private_key import PrivateKeyDetector
    from detect_secrets.plugins.slack import SlackDetector
    from detect_secrets.plugins.stripe import StripeDetector

    return (
        ("private-key", PrivateKeyDetector()),
        ("aws", AWSKeyDetector()),
        ("github-token", GitHubTokenDetector()),
        ("gitlab-token", GitLabTokenDetector()),
        ("slack-token", SlackDetector()),
        ("stripe-key", StripeDetector()),
        ("jwt", JwtTokenDetector()),
    )


_DETAILS = {
    "aws-access-key": "an AWS access key id",
    "aws-secret-key": "an AWS secret access key",
    "github-token": "a GitHub token",
    "gitlab-token": "a GitLab token",
    "slack-token": "a Slack token",
    "stripe-key": "a Stripe live key",
    "jwt": "a JSON web token",
}


def _by_content(data: bytes) -> Iterator[tuple[str, str]]:
    if _GCP_SA.search(data) and b'"private_key"' in data:
        yield "gcp-service-account-key", "a GCP service-account key"
        return
    rules: set[str] = {"aws-secret-key"} if _AWS_SECRET_SETTING.search(data) else set()
    for line in _candidate_lines(data):
        for rule, plugin in _plugins():
            rules.update(
                _rule_of(rule, value)
                for value in plugin.analyze_string(line)
                if _standalone(value, line)
            )
    rules.discard("")
    if "private-key" in rules:
        rules.discard("private-key")
        match = _PEM_KEY.search(data)
        if match:
            yield "private-key", f"a PEM {match.group(1).decode().lower()}"
        elif b"PuTTY-User-Key-File" in data and b"Private-Lines:" in data:
            yield "private-key", "a PuTTY private key"
    for rule in sorted(rules):
        yield rule, _DETAILS[rule]


def _standalone(value: str, line: str) -> bool:
    """Whether `value` occurs as a token of its own, not inside a longer word or a base64
    blob (an embedded font's base64 holds 'AKIA' followed by 16 capitals often enough)."""
    pattern = rf"(?<![A-Za-z0-9+/]){re.escape(value)}"
    if re.fullmatch(r"[A-Z0-9]{20}", value):  # fixed-length ids end at a boundary too
        pattern += r"(?![A-Za-z0-9+/])"
    return re.search(pattern, line) is not None


def _rule_of(rule: str, value: str) -> str:
    if rule != "aws":
        return rule
    if "EXAMPLE" in value:  # AWS's documentation placeholders (AKIAIOSFODNN7EXAMPLE)
        return ""
    return "aws-access-key" if re.fullmatch(r"[A-Z0-9]{20}", value) else "aws-secret-key"


def _candidate_lines(data: bytes) -> Iterator[str]:
    """The lines around each trigger, at most 4 KiB of each (minified files have long lines)."""
    end = -1
    for match in _CONTENT_TRIGGER.finditer(data):
        if match.start() < end:
            continue
        start = max(data.rfind(b"\n", 0, match.start()) + 1, match.start() - 2048)
        end = data.find(b"\n", match.end())
        end = len(data) if end < 0 else min(end, match.end() + 2048)
        yield data[start:end].decode("utf-8", "replace")


def _sniff(data: bytes) -> bytes | None:
    """The text the content rules see: None for a binary file or one no trigger occurs in."""
    if b"\0" in data[:BINARY_PROBE] or not _PREFILTER.search(data):
        return None
    return data


# --- one layer ---------------------------------------------------------------------------


def _result(files: int, hits: list[Hit]) -> LayerResult:
    """Sorted: the order of a tar and of a directory listing differ."""
    return LayerResult(files, tuple(sorted(hits, key=lambda hit: (hit.path, hit.rule))))


def _tar_path(name: str) -> str:
    name = name[2:] if name.startswith("./") else name
    return "/" + name.strip("/")


def scan_layer_tar(fileobj: IO[bytes], rules: Rules) -> LayerResult:
    """The hits of one (uncompressed) layer tar, read once from start to end."""
    files, hits = 0, []
    kept: dict[str, tuple[int, bytes | None]] = {}  # path: (size, text), for hardlinks
    with tarfile.open(fileobj=fileobj, mode="r|", bufsize=_CHUNK) as layer:
        for member in layer:
            path = _tar_path(member.name)
            if path.rsplit("/", 1)[-1].startswith(".wh."):
                continue  # a whiteout hides a lower file; it holds nothing itself
            if member.isreg():
                text = _member_text(layer, member)
                kept[path] = (member.size, text)
                size = member.size
            elif member.islnk():
                size, text = kept.get(_tar_path(member.linkname), (0, None))
            else:
                continue
            files += 1
            hits += rules.check(path, size, lambda text=text: text)
    return _result(files, hits)


def _member_text(layer: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | None:
    if not member.size or member.size > MAX_CONTENT:
        return None
    handle = layer.extractfile(member)
    return _sniff(handle.read()) if handle else None


def scan_layer_dir(root: Path, rules: Rules) -> LayerResult:
    """The hits of one layer unpacked in a directory (an overlay2 `diff`)."""
    files, hits = 0, []
    for path, size in _walk(str(root), ""):
        files += 1
        hits += rules.check(path, size, lambda p=path, s=size: _file_text(root, p, s))
    return _result(files, hits)


def _walk(top: str, prefix: str) -> Iterator[tuple[str, int]]:
    """(path in the image, size) of the regular files under `top`; symlinks, devices and
    whiteouts (overlay2's are 0/0 character devices) hold nothing to scan."""
    with os.scandir(top) as entries:
        for entry in entries:
            path = f"{prefix}/{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(entry.path, path)
            elif entry.is_file(follow_symlinks=False):
                yield path, entry.stat(follow_symlinks=False).st_size


def _file_text(root: Path, path: str, size: int) -> bytes | None:
    if not size or size > MAX_CONTENT:
        return None
    with (root / path.lstrip("/")).open("rb") as handle:
        head = handle.read(BINARY_PROBE)
        return None if b"\0" in head else _sniff(head + handle.read())


# --- the cache ---------------------------------------------------------------------------


def cache_folder() -> Path:
    """Where a layer's scan result is kept: <diff id>-<rules digest>.json."""
    return resources.cache_dir() / "scan"


def _cache_file(diff_id: str, rules_digest: str) -> Path:
    return cache_folder() / f"{diff_id.removeprefix('sha256:')}-{rules_digest}.json"


def _load_cached(diff_id: str, rules_digest: str) -> LayerResult | None:
    try:
        data = json.loads(_cache_file(diff_id, rules_digest).read_text(encoding="utf-8"))
        return LayerResult(data["files"], tuple(Hit(**hit) for hit in data["hits"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(diff_id: str, rules_digest: str, result: LayerResult) -> None:
    target = _cache_file(diff_id, rules_digest)
    target.parent.mkdir(parents=True, exist_ok=True)
    body = {"diff_id": diff_id, "files": result.files}
    body["hits"] = [dataclasses.asdict(hit) for hit in result.hits]
    partial = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    partial.write_text(json.dumps(body), encoding="utf-8")
    partial.replace(target)  # atomic: a concurrent scan never reads half a file


def rules_digest(rules: Rules) -> str:
    """What a cached layer result depends on: the rules (this file), their settings and
    detect-secrets' version. The allowlist applies at report time, so it is not in it."""
    from importlib.metadata import version

    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"{SCANNER_VERSION}\0{rules.build_ca_dir}\0".encode())
    digest.update(version("detect-secrets").encode())
    return digest.hexdigest()[:16]


# --- the rules' data -----------------------------------------------------------------------


def load_rules() -> Rules:
    import yaml

    defaults = resources.data_root() / "roles" / "build_ca" / "defaults" / "main.yml"
    ca_dir = str(yaml.safe_load(defaults.read_text(encoding="utf-8"))["build_ca_dir"])
    return Rules(build_ca_dir="/" + ca_dir.strip("/"))


def load_allowlist(path: Path | None = None) -> tuple[Allow, ...]:
    import yaml

    path = path or resources.data_root() / "images" / "scan-allow.yml"
    entries = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    allows = []
    for entry in entries:
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) and entry[k].strip() for k in ("path", "rule", "why")
        ):
            raise ScanError(f"{path}: each entry needs a path glob, a rule and why: {entry!r}")
        allows.append(Allow(entry["path"], entry["rule"], entry["why"]))
    return tuple(allows)


# --- reading an image's layers ----------------------------------------------------------


class _ChunkReader(io.RawIOBase):
    """A file over an iterator of byte chunks (the `docker save` stream)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks, self._left = iter(chunks), memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._left = memoryview(chunk)
        n = min(len(buffer), len(self._left))
        buffer[:n], self._left = self._left[:n], self._left[n:]
        return n


class _Hashing:
    """Reads through to `inner` and hashes what passes (a layer's diff id)."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner, self.sha = inner, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.sha.update(data)
        return data

    def drain(self) -> str:
        while self.read(_CHUNK):
            pass
        return "sha256:" + self.sha.hexdigest()


def _via_save(
    engine: Any, ref: str, wanted: set[str], rules: Rules, progress: Progress
) -> Iterator[tuple[str, LayerResult]]:
    """(diff id, result) of the layers of `docker save`: legacy `<id>/layer.tar` (Docker
    20.10) or OCI `blobs/sha256/<diff id>` (Docker 25+). A layer.tar that is a symlink
    repeats a layer already read; config and manifest blobs are not layers."""
    stream = io.BufferedReader(_ChunkReader(engine.api.get_image(ref, chunk_size=_CHUNK)), _CHUNK)
    yield from layers_of_save(stream, wanted, rules, progress)


def layers_of_save(
    stream: IO[bytes], wanted: set[str], rules: Rules, progress: Progress
) -> Iterator[tuple[str, LayerResult]]:
    """(diff id, result) of each layer in a `docker save` tar stream."""
    with tarfile.open(fileobj=stream, mode="r|", bufsize=_CHUNK) as saved:
        for member in saved:
            name = member.name.removeprefix("./")
            blob = "sha256:" + name.removeprefix("blobs/sha256/")
            is_blob = name.startswith("blobs/sha256/") and blob in wanted
            if not member.isreg() or not (is_blob or name.endswith("/layer.tar")):
                continue  # a symlinked repeat, a cached OCI layer, a config or manifest
            progress(f"scanning {name} ({member.size / 2**20:.0f} MiB) from docker save")
            handle = _Hashing(saved.extractfile(member))  # type: ignore[arg-type]
            result = scan_layer_tar(handle, rules)  # type: ignore[arg-type]
            yield handle.drain(), result


def _overlay_dirs(engine: Any, image: Any) -> dict[str, Path] | None:
    """Each diff id's overlay2 `diff` directory, from the engine's layer database, or None
    where they cannot be read here exactly (another driver, a remote or rootless engine,
    no permission, a database that does not match the image's own GraphDriver data)."""
    graph = image.attrs.get("GraphDriver") or {}
    if graph.get("Name") != "overlay2":
        return None
    try:
        root = Path(engine.info()["DockerRootDir"])
        chain, dirs = "", {}
        for diff_id in image.attrs["RootFS"]["Layers"]:
            chain = diff_id if not chain else _sha(f"{chain} {diff_id}")
            entry = root / "image" / "overlay2" / "layerdb" / chain.replace(":", "/")
            if (entry / "diff").read_text(encoding="ascii").strip() != diff_id:
                return None
            cache_id = (entry / "cache-id").read_text(encoding="ascii").strip()
            dirs[diff_id] = root / "overlay2" / cache_id / "diff"
    except (OSError, KeyError, ValueError):
        return None
    data = graph.get("Data") or {}
    listed = {data.get("UpperDir"), *(data.get("LowerDir") or "").split(":")} - {None, ""}
    mine = {str(d) for d in dirs.values()}
    if listed != mine or not all(os.access(d, os.R_OK | os.X_OK) for d in mine):
        return None
    return dirs


def _sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# --- one image -----------------------------------------------------------------------------


def scan_image(
    engine: Any,
    ref: str,
    *,
    progress: Progress | None = None,
    via: str = "auto",
) -> ScanReport:
    """Scan every layer of the local image `ref`. `via`: "auto" (overlay2 where readable,
    else docker save), "save" or "overlay"."""
    say = progress or (lambda _msg: None)
    image = _get_image(engine, ref)
    rules = load_rules()

    def read(todo: set[str]) -> Iterator[tuple[str, LayerResult]]:
        return _read_layers(engine, image, ref, todo, rules, via, say)

    import docker

    try:
        return scan_layers(ref, list(image.attrs["RootFS"]["Layers"]), read, rules=rules)
    except (docker.errors.DockerException, tarfile.TarError) as exc:  # e.g. removed meanwhile
        raise ScanError(f"cannot read the layers of {ref}: {exc}") from None


def scan_ahead(image_id: str) -> threading.Thread:
    """Scan the layers of the local image `image_id` into the cache in a thread, while the
    caller goes on (a chain's next stage builds): the image's final scan then finds them
    cached and reads only its own top layer. Nothing is reported here: a finding or an error
    is the final scan's to report (it scans again whatever is not cached)."""

    def work() -> None:
        try:  # its own client: the caller's is busy in the caller's thread
            scan_image(docker_engine.client(), image_id)
        except Exception:  # the final scan reads, and reports, these layers again
            return

    thread = threading.Thread(target=work, name=f"scan-{image_id[7:19]}", daemon=True)
    thread.start()
    return thread


Reader = Callable[[set[str]], Iterable[tuple[str, LayerResult]]]


def scan_layers(
    ref: str,
    diff_ids: list[str],
    read: Reader,
    *,
    rules: Rules | None = None,
    allows: tuple[Allow, ...] | None = None,
) -> ScanReport:
    """The report of an image whose layers are `diff_ids` (bottom first): cached layers
    come from the cache; `read(the others)` yields (diff id, result) for them."""
    rules = rules or load_rules()
    digest = rules_digest(rules)
    results = {d: r for d in set(diff_ids) if (r := _load_cached(d, digest)) is not None}
    cached = set(results)
    if todo := set(diff_ids) - cached:  # all cached: nothing is read, no docker save
        for diff_id, result in read(todo):
            if diff_id in todo:
                results[diff_id] = result
                _store(diff_id, digest, result)
    if missing := set(diff_ids) - set(results):
        raise ScanError(f"{ref}: layers {sorted(missing)} were not in its `docker save` output")
    allows = load_allowlist() if allows is None else allows
    return _report(ref, diff_ids, results, cached, allows)


def _get_image(engine: Any, ref: str) -> Any:
    import docker

    try:
        return engine.images.get(ref)
    except docker.errors.ImageNotFound:
        raise ScanError(f"no local image {ref}: build or pull it first") from None
    except docker.errors.DockerException as exc:
        raise ScanError(f"cannot read image {ref} from the Docker Engine: {exc}") from None


def _read_layers(
    engine: Any, image: Any, ref: str, todo: set[str], rules: Rules, via: str, say: Progress
) -> Iterator[tuple[str, LayerResult]]:
    dirs = _overlay_dirs(engine, image) if via in ("auto", "overlay") else None
    if dirs is not None:
        order = list(image.attrs["RootFS"]["Layers"])
        for diff_id in sorted(todo, key=list(dirs).index):
            say(f"scanning layer {order.index(diff_id) + 1}/{len(order)} ({diff_id[:19]})")
            yield diff_id, scan_layer_dir(dirs[diff_id], rules)
    elif via == "overlay":
        raise ScanError(f"{ref}: its overlay2 layers cannot be read here")
    else:
        yield from _via_save(engine, ref, todo, rules, say)


def _report(
    ref: str,
    diff_ids: list[str],
    results: dict[str, LayerResult],
    cached: set[str],
    allows: tuple[Allow, ...],
) -> ScanReport:
    total = len(diff_ids)
    findings = tuple(
        Finding(hit.path, index, total, diff_id, hit.rule, hit.detail)
        for index, diff_id in enumerate(diff_ids, 1)
        for hit in results[diff_id].hits
        if not any(allow.covers(hit) for allow in allows)
    )
    return ScanReport(
        image=ref,
        layers=total,
        files=sum(results[d].files for d in diff_ids),
        findings=findings,
        cached_layers=sum(d in cached for d in diff_ids),
    )


# --- the command ---------------------------------------------------------------------------


@click.command("scan")
@click.argument("image")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def scan_command(image: str, as_json: bool) -> None:
    """Check every layer of the local IMAGE for private keys, credentials and tokens.

    Each layer on its own: a file a later layer deletes is still in the image. Rules:
    detect-secrets' pattern plugins on text files, and gpubake's own (the build's CA bundle,
    SSH host keys, authorized_keys, shell histories, .netrc, pip/uv/conda configs with
    credentials, Docker configs with auths, cloud credential files). Exit 0 when clean; 1
    with a line per finding (file, layer, rule) otherwise. Allowed false positives:
    images/scan-allow.yml. The same scan runs after every `gpubake build --target docker`.

    \b
    gpubake scan gpubake/pytorch
    gpubake scan --json myregistry/ml/fastai:2.15-cu132 | jq .findings
    """
    engine = docker_engine.client()
    report = scan_image(engine, image, progress=lambda m: click.echo(f"gpubake: {m}", err=True))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for finding in report.findings:
            click.echo(finding.line())
    summary = (
        f"{_count(report.layers, 'layer')} ({report.cached_layers} cached), "
        f"{_count(report.files, 'file')}"
    )
    if report.findings:
        raise ScanError(
            f"{image}: {_count(len(report.findings), 'secret')} found in its layers ({summary}; "
            "listed above): remove them in the role that adds them and rebuild (a later layer's "
            "rm does not help), or allow a false positive in images/scan-allow.yml"
        )
    click.echo(f"gpubake: scanned {image}: {summary}, no secrets found", err=True)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
