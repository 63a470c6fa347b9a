"""gpubake-sync: copy a training job's files between a local folder and gs:// or s3://.

The job runner calls it as a subprocess (a hung or crashing cloud client then cannot take the
runner down, and the runner can kill it on its own deadline) and relies on one contract:
exit 0 on success; exit 2 with exactly one line "gpubake-sync: <what is wrong>" on stderr on any
failure, never a traceback (GPUBAKE_SYNC_DEBUG=1 adds the traceback and the clients' logs).

    check URL                             the location answers and its bucket exists
    upload LOCAL_DIR URL [--state FILE] [--deadline S] [--checkpoints]
                                          every regular file, skipping those already there
    download URL LOCAL_DIR                every object under the prefix
    put URL TEXT                          a small text object at exactly URL (_SUCCESS markers)
    fetch-code URL DIR                    a .tar.gz/.tgz/.tar object extracted, else a folder
    serve                                 JSON requests on stdin, events on stdout (the runner)

stdout has a line per file ("uploaded REL (N B)", "downloaded REL (N B)") and one to close
("ok URL", "upload done: ...", "download done: ...", "fetch-code done: ...", "wrote URL (N B)").
A file counts as already there when its size and mtime are those the --state file recorded at
the last sync and the object still has the ETag/generation recorded then (nothing read); else
when an object of the same size has the same md5: the store's own (GCS md5Hash, a single-part
S3 ETag) where it is one, else the "gpubake-md5" metadata that every S3 upload sets (multipart
and KMS objects). Files go up in parallel (UPLOAD_WORKERS), each one atomically: a PUT, an S3
multipart upload or a GCS resumable upload only makes an object once all of it arrived, so a
killed sync never leaves a truncated object in place of a whole one. With --checkpoints the
folder's top-level entries are checkpoints, sent newest first; --deadline S starts no file after
S seconds (what is left is said), so that a sync in a preemption window ends in it.

`serve` keeps the clients loaded for the runner's periodic and final syncs (one process, no
import in the preemption window): one JSON request a line on stdin ({"id", "op": "upload" |
"put" | "check", ...}; {"op": "cut"} makes the running upload start no more files), JSON events
a line on stdout, each request ending with {"event": "done"} or {"event": "error"}.

It runs on the images' own python3 (3.10+) and imports boto3 or google-cloud-storage only when a
URL needs it. Credentials are each cloud's defaults (instance role / profile, google.auth
default). Emulators: boto3 itself honours AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3; with
STORAGE_EMULATOR_HOST set, the GCS client is anonymous and looks up no credentials.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import logging
import os
import posixpath
import queue
import re
import stat
import sys
import tarfile
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

PROG = "gpubake-sync"
MD5_KEY = "gpubake-md5"  # custom metadata: the content's md5, whatever the upload's ETag is
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")
PART_SUFFIX = ".gpubake-part"  # downloads land here first, so a killed sync leaves no torn file

# Bounded, because the runner's final sync has to fit a ~30 s preemption notice.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
S3_MAX_ATTEMPTS = 3
GCS_RETRY_S = 5.0  # about as long as S3's three attempts (the client's default: 120 s)
# Above this, S3 uploads go multipart (their ETag is then no md5, hence MD5_KEY).
S3_MULTIPART_BYTES = 64 << 20
HASH_CHUNK_BYTES = 8 << 20
# Files in flight at once: many small files are latency-bound, so several go at a time.
UPLOAD_WORKERS = 8
EMULATOR_WORKERS = 4
# Parts of one S3 multipart upload in flight (s3transfer's own threads).
S3_PART_WORKERS = 8
# Large files (over S3_MULTIPART_BYTES) in flight at once: each holds up to GCS_CHUNK_BYTES
# in memory on GCS, and a few saturate the link anyway.
LARGE_SLOTS = 2
# A GCS resumable upload sends the file in chunks of this size, one request each. Not
# transfer_manager's sliced uploads: they use the XML multipart API, which gcp-storage-emulator
# lacks (and parallel composite uploads leave composites without md5Hash plus temporary objects
# that a killed sync strands); large chunks keep the per-request overhead small instead.
GCS_CHUNK_BYTES = 1 << 30

_HAVE_DATA_FILTER = hasattr(tarfile, "data_filter")  # 3.10.12+, 3.11.4+ (PEP 706)
_URL = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<bucket>[^/]*)(?:/(?P<path>.*))?", re.S
)
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_GCS_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
_IPV4 = re.compile(r"\d+\.\d+\.\d+\.\d+")
_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^'\"()\[\]]+)")


class SyncError(Exception):
    """A failure reported as one line; str() is the text after 'gpubake-sync: '."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def parse_url(url: str) -> tuple[str, str, str]:
    """(scheme, bucket, prefix) of gs://BUCKET/PREFIX or s3://BUCKET/PREFIX; prefix has no
    leading or trailing '/'. Raises SyncError for any other form or an invalid bucket name."""
    m = _URL.fullmatch(url)
    if not m or m["scheme"] not in ("gs", "s3"):
        raise SyncError(
            f"unsupported URL {url!r}: expected gs://BUCKET/PREFIX or s3://BUCKET/PREFIX"
        )
    scheme, bucket = m["scheme"], m["bucket"]
    if not bucket:
        raise SyncError(f"no bucket in URL {url!r}")
    if not _bucket_name_ok(scheme, bucket):
        raise SyncError(f"invalid bucket name {bucket!r} in {url}")
    return scheme, bucket, (m["path"] or "").strip("/")


def _bucket_name_ok(scheme: str, name: str) -> bool:
    # The clouds' naming rules, checked here so a typo fails at once and says so.
    if scheme == "s3":
        return bool(_S3_BUCKET.fullmatch(name)) and ".." not in name and not _IPV4.fullmatch(name)
    labels = name.split(".")
    return (
        bool(_GCS_BUCKET.fullmatch(name))
        and (len(name) <= 63 or len(labels) > 1)
        and all(0 < len(label) <= 63 for label in labels)
    )


class _Location:
    def __init__(self, url: str) -> None:
        self.url = url
        self.scheme, self.bucket, self.prefix = parse_url(url)
        # Listing "run1/", not "run1", so that s3://b/run1 never picks up run10/...
        self.folder = f"{self.prefix}/" if self.prefix else ""

    def key(self, rel: str) -> str:
        return self.folder + rel


class _Object:
    """A listed object; stamp is what changes whenever it is rewritten (S3 ETag, GCS
    generation), recorded in the state file to tell an unchanged object without reading."""

    __slots__ = ("key", "md5", "multipart", "size", "stamp")

    def __init__(
        self, key: str, size: int, md5: str | None, multipart: bool = False, stamp: str = ""
    ) -> None:
        self.key, self.size, self.md5, self.multipart = key, size, md5, multipart
        self.stamp = stamp


def _reason(exc: BaseException) -> str:
    """The useful part of a connection error ('Connection refused'), else its whole text."""
    texts = [str(exc)]
    inner = getattr(exc, "kwargs", {}).get("error")  # botocore keeps urllib3's error here
    if inner is not None:
        texts.insert(0, str(inner))
    for text in texts:
        m = _ERRNO_TEXT.search(text)
        if m:
            return m.group(1).strip()
    return texts[-1][:300]


def _chain(exc: BaseException):
    """exc and the errors it wraps: clients re-raise transport errors inside their own."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 8:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo.append(getattr(e, "last_exception", None))


class _S3:
    """boto3, with bounded retries; AWS_ENDPOINT_URL(_S3) and credentials are boto3's own."""

    def __init__(self, loc: _Location) -> None:
        import boto3
        from botocore.config import Config

        self.loc = loc
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
            # every worker and every part thread gets a connection of its own
            max_pool_connections=UPLOAD_WORKERS + LARGE_SLOTS * S3_PART_WORKERS,
        )
        self.client = boto3.session.Session().client("s3", config=config)

    def _endpoint(self) -> str:
        return self.client.meta.endpoint_url

    @contextlib.contextmanager
    def errors(self, key: str | None = None):
        from botocore import exceptions as bx

        try:
            yield
        except Exception as exc:
            for e in _chain(exc):
                if isinstance(e, bx.ClientError):
                    raise self._client_error(e, key) from exc
                if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
                    raise SyncError(f"no usable AWS credentials for {self.loc.url}: {e}") from exc
                if isinstance(e, (bx.ConnectionError, bx.HTTPClientError)):
                    raise SyncError(
                        f"cannot reach {self.loc.url}: {_reason(e)} (endpoint {self._endpoint()})"
                    ) from exc
            if isinstance(exc, bx.BotoCoreError):
                raise SyncError(f"{self.loc.url}: {exc}") from exc
            raise

    def _client_error(self, e, key: str | None) -> SyncError:
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        text = err.get("Message") or code
        url = self.loc.url
        if code == "NoSuchBucket":
            return SyncError(f"bucket {self.loc.bucket!r} does not exist ({url})")
        if key is not None and (code in ("NoSuchKey", "404") or status == 404):
            return SyncError(f"object s3://{self.loc.bucket}/{key} does not exist")
        if status in (401, 403) or code in ("AccessDenied", "InvalidAccessKeyId", "ExpiredToken"):
            return SyncError(f"permission denied on {url}: {code}: {text}")
        return SyncError(f"{url}: {code or status}: {text}")

    def objects(self, prefix: str, limit: int | None = None):
        kwargs = {"Bucket": self.loc.bucket, "Prefix": prefix}
        if limit:
            kwargs["PaginationConfig"] = {"MaxItems": limit, "PageSize": limit}
        with self.errors():
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                for item in page.get("Contents", []):
                    etag = item.get("ETag", "").strip('"')
                    multipart = "-" in etag
                    yield _Object(
                        item["Key"],
                        item["Size"],
                        None if multipart else etag,
                        multipart,
                        etag,
                    )

    def same(self, obj: _Object, md5: str) -> bool:
        if obj.md5 == md5:
            return True
        # A multipart or KMS-encrypted object's ETag is no md5: its MD5_KEY decides. A plain
        # ETag that differs means changed content, whatever stale metadata may claim.
        with self.errors(obj.key):
            head = self.client.head_object(Bucket=self.loc.bucket, Key=obj.key)
        etag_is_md5 = not obj.multipart and not (
            str(head.get("ServerSideEncryption", "")).startswith("aws:kms")
            or head.get("SSECustomerAlgorithm")
        )
        return not etag_is_md5 and head.get("Metadata", {}).get(MD5_KEY) == md5

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self.errors(key):
            try:
                self.client.head_object(Bucket=self.loc.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return False  # a missing bucket too: the folder listing after says which
                raise
        return True

    needs_md5 = True  # a multipart or KMS ETag is no md5: MD5_KEY must be set on upload

    def upload(self, path: Path, key: str, md5: str | None) -> str:
        """Upload path as key; returns the new object's stamp (its ETag)."""
        from boto3.s3.transfer import TransferConfig

        extra = {"Metadata": {MD5_KEY: md5}} if md5 else {}
        with self.errors(key):
            if path.stat().st_size < S3_MULTIPART_BYTES:
                with path.open("rb") as body:  # one PUT, whose answer has the ETag
                    answer = self.client.put_object(
                        Bucket=self.loc.bucket, Key=key, Body=body, **extra
                    )
                return str(answer.get("ETag", "")).strip('"')
            # s3transfer: parts in parallel; the object exists only once all are in
            transfer = TransferConfig(
                multipart_threshold=S3_MULTIPART_BYTES,
                multipart_chunksize=S3_MULTIPART_BYTES,
                max_concurrency=S3_PART_WORKERS,
            )
            self.client.upload_file(str(path), self.loc.bucket, key, extra, None, transfer)
            head = self.client.head_object(Bucket=self.loc.bucket, Key=key)
        return str(head.get("ETag", "")).strip('"')

    def download(self, key: str, path: Path) -> None:
        with self.errors(key):
            self.client.download_file(self.loc.bucket, key, str(path))

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        md5 = _md5(data).hexdigest()
        with self.errors(key):
            self.client.put_object(
                Bucket=self.loc.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                Metadata={MD5_KEY: md5},
            )

    def delete(self, key: str) -> None:
        with self.errors(key):
            self.client.delete_object(Bucket=self.loc.bucket, Key=key)


class _GCS:
    """google-cloud-storage with a bounded retry; anonymous against STORAGE_EMULATOR_HOST."""

    def __init__(self, loc: _Location) -> None:
        self.loc = loc
        with self.errors():
            from google.cloud import storage
            from google.cloud.storage.retry import DEFAULT_RETRY

            self.retry = DEFAULT_RETRY.with_timeout(GCS_RETRY_S).with_delay(
                initial=0.5, maximum=2.0
            )
            if os.environ.get("STORAGE_EMULATOR_HOST"):
                from google.auth.credentials import AnonymousCredentials

                # A placeholder project and no credentials: nothing looks up a real account.
                self.client = storage.Client(
                    project="gpubake-emulator", credentials=AnonymousCredentials()
                )
            else:
                self.client = storage.Client()
            self.bucket = self.client.bucket(loc.bucket)
        self.timeout = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)

    def _endpoint(self) -> str:
        return getattr(getattr(self, "client", None), "api_endpoint", None) or os.environ.get(
            "STORAGE_EMULATOR_HOST", "https://storage.googleapis.com"
        )

    @contextlib.contextmanager
    def errors(self, key: str | None = None):
        try:
            yield
        except Exception as exc:
            err = self._translate(exc, key)
            if err is None:
                raise
            raise err from exc

    def _translate(self, exc: Exception, key: str | None) -> SyncError | None:
        import requests
        from google.api_core import exceptions as gx
        from google.auth import exceptions as ax

        url = self.loc.url
        for e in _chain(exc):
            if isinstance(e, gx.NotFound):
                if key is None:
                    return SyncError(f"bucket {self.loc.bucket!r} does not exist ({url})")
                return SyncError(f"object gs://{self.loc.bucket}/{key} does not exist")
            if isinstance(e, (gx.Forbidden, gx.Unauthorized)):
                return SyncError(f"permission denied on {url}: {e.message}")
            if isinstance(e, ax.DefaultCredentialsError):
                return SyncError(f"no usable Google Cloud credentials for {url}: {e}")
            if isinstance(e, ax.RefreshError):
                return SyncError(f"credentials for {url} were refused: {e}")
            if isinstance(e, (requests.ConnectionError, requests.Timeout, ConnectionError)):
                return SyncError(f"cannot reach {url}: {_reason(e)} (endpoint {self._endpoint()})")
            if isinstance(e, gx.GoogleAPICallError):
                return SyncError(f"{url}: {e.code}: {e.message}")
        if isinstance(exc, (gx.RetryError, ax.GoogleAuthError)):
            return SyncError(f"{url}: {exc}")
        return None

    def objects(self, prefix: str, limit: int | None = None):
        with self.errors():
            blobs = self.client.list_blobs(
                self.bucket,
                prefix=prefix,
                max_results=limit,
                timeout=self.timeout,
                retry=self.retry,
            )
            for blob in blobs:
                # The server's md5Hash is the truth where there is one (none on composite
                # objects); our own MD5_KEY stands in where there is not.
                md5 = base64.b64decode(blob.md5_hash).hex() if blob.md5_hash else None
                yield _Object(
                    blob.name,
                    int(blob.size or 0),
                    md5 or (blob.metadata or {}).get(MD5_KEY),
                    stamp=_gcs_stamp(blob),
                )

    def same(self, obj: _Object, md5: str) -> bool:
        return obj.md5 == md5

    def exists(self, key: str) -> bool:
        with self.errors(key):
            return self.bucket.get_blob(key, timeout=self.timeout, retry=self.retry) is not None

    needs_md5 = False  # the server computes md5Hash; the client checks crc32c on upload

    def upload(self, path: Path, key: str, md5: str | None) -> str:
        """Upload path as key (in one request up to 8 MiB, else a resumable upload of
        GCS_CHUNK_BYTES chunks); returns the new object's stamp (its generation)."""
        blob = self.bucket.blob(key, chunk_size=GCS_CHUNK_BYTES)
        if md5:
            blob.metadata = {MD5_KEY: md5}
        with self.errors():  # a 404 on an upload: the bucket is missing
            blob.upload_from_filename(str(path), timeout=self.timeout, retry=self.retry)
        return _gcs_stamp(blob)

    def download(self, key: str, path: Path) -> None:
        with self.errors(key):
            self.bucket.blob(key).download_to_filename(
                str(path), timeout=self.timeout, retry=self.retry
            )

    def delete(self, key: str) -> None:
        with self.errors(key):
            self.bucket.blob(key).delete(timeout=self.timeout, retry=self.retry)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        blob = self.bucket.blob(key)
        blob.metadata = {MD5_KEY: _md5(data).hexdigest()}
        with self.errors():
            blob.upload_from_string(
                data, content_type=content_type, timeout=self.timeout, retry=self.retry
            )


def _gcs_stamp(blob) -> str:
    return str(blob.generation or blob.etag or blob.md5_hash or "")


_STORES: dict | None = None  # serve: clients made once and reused (their connections too)


def _store(loc: _Location):
    if _STORES is not None:
        store = _STORES.get((loc.scheme, loc.bucket))
        if store is None:
            store = _STORES[(loc.scheme, loc.bucket)] = _new_store(loc)
        store.loc = loc
        return store
    return _new_store(loc)


def _new_store(loc: _Location):
    try:
        return _S3(loc) if loc.scheme == "s3" else _GCS(loc)
    except ImportError as exc:
        package = "boto3" if loc.scheme == "s3" else "google-cloud-storage"
        raise SyncError(f"{loc.scheme}:// needs {package}, which is not installed ({exc})") from exc


def _quiet(*_args: object) -> None:
    pass


def check(url: str) -> None:
    """Raise SyncError unless the location answers and its bucket exists (lists one object)."""
    loc = _Location(url)
    next(iter(_store(loc).objects(loc.folder, limit=1)), None)


def _md5(data: bytes = b""):
    # The stores' own content fingerprint; not for security (and so allowed under FIPS).
    return hashlib.md5(data, usedforsecurity=False)


def _file_md5(path: Path) -> str:
    digest = _md5()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class _HashCache:
    """--state: what the last sync knew of each file, by relative path: its size and mtime,
    its md5 once hashed, and the stamp of the object it became. A file whose size and mtime are
    unchanged and whose object still has that stamp is not read again (a multi-GB checkpoint at
    every interval). Only an optimisation: a missing, unreadable or foreign state file just
    means comparing by md5 again."""

    VERSION = 2

    def __init__(self, path: str | os.PathLike | None, root: Path) -> None:
        self.path = Path(path) if path else None
        self.root = str(root.resolve())
        self.old: dict = {}
        self.new: dict = {}
        self.lock = threading.Lock()
        if self.path is None:
            return
        with contextlib.suppress(OSError, ValueError, AttributeError):
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") == self.VERSION and data.get("root") == self.root:
                self.old = dict(data.get("files") or {})

    def known(self, rel: str, st: os.stat_result) -> dict:
        """The entry of an unchanged file (same size and mtime), else {}."""
        entry = self.old.get(rel)
        if (
            isinstance(entry, dict)
            and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns
        ):
            return entry
        return {}

    def unchanged(self, rel: str, st: os.stat_result, obj: _Object | None) -> bool:
        """Unchanged since the last sync here and the object it made is still there: nothing
        to read, nothing to send."""
        entry = self.known(rel, st)
        if entry and obj is not None and obj.stamp and entry.get("stamp") == obj.stamp:
            self.keep(rel, entry)
            return True
        return False

    def md5(self, rel: str, path: Path, st: os.stat_result) -> str:
        md5 = self.known(rel, st).get("md5")
        if md5:
            return str(md5)
        md5 = _file_md5(path)
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
            self.keep(rel, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": md5})
        return md5  # else written while being read: hashed again next time

    def keep(self, rel: str, entry: dict, **more) -> None:
        with self.lock:
            self.new[rel] = {**self.new.get(rel, {}), **entry, **more}

    def save(self) -> None:
        if self.path is None:
            return
        with self.lock:
            data = {"version": self.VERSION, "root": self.root, "files": dict(self.new)}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
            tmp.replace(self.path)
        except OSError as exc:
            raise SyncError(f"cannot write state file {self.path}: {exc.strerror or exc}") from exc


def _local_files(root: Path, skip: set[Path]) -> list[tuple[str, Path, os.stat_result]]:
    """Regular files under root, sorted. Symlinks are not followed (a 'latest' link to a
    checkpoint would upload it twice); sockets, fifos and devices are no files; nor is what a
    killed download left behind (*.gpubake-part), in a folder that is restored, then synced."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath, name)
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue  # deleted since the walk listed it (a rotated checkpoint)
            if stat.S_ISREG(st.st_mode) and path not in skip and not name.endswith(PART_SUFFIX):
                found.append((path.relative_to(root).as_posix(), path, st))
    return sorted(found, key=lambda item: item[0])


def _plan(files: list, checkpoints: bool) -> list[tuple[str, list]]:
    """Groups of files in the order they go up. With checkpoints, a group is a top-level entry
    (step-200/, model.pt): the newest (by its newest file) first, so that the newest complete
    checkpoint is safe before an older one is sent; in a group the largest first (the longest
    transfers start first, and the group ends soonest). Else one group, newest files first."""
    groups: dict[str, list] = {}
    for item in files:
        name = item[0].split("/", 1)[0] if checkpoints else ""
        groups.setdefault(name, []).append(item)
    ordered = sorted(
        groups.items(), key=lambda g: (-max(st.st_mtime_ns for _rel, _path, st in g[1]), g[0])
    )
    for _name, items in ordered:
        if checkpoints:
            items.sort(key=lambda item: (-item[2].st_size, item[0]))
        else:
            items.sort(key=lambda item: (-item[2].st_mtime_ns, item[0]))
    return ordered


def upload(local_dir: str | os.PathLike, url: str, state=None, log=_quiet, **options) -> list[str]:
    """Upload every regular file under local_dir to url's prefix, keeping relative paths, and
    skip those whose content is already there; return the relative paths uploaded, sorted.
    Never deletes anything remote; a missing local_dir uploads nothing. options: see
    sync_folder."""
    return sorted(sync_folder(local_dir, url, state, log, **options)["uploaded"])


def sync_folder(
    local_dir: str | os.PathLike,
    url: str,
    state=None,
    log=_quiet,
    *,
    deadline: float | None = None,
    checkpoints: bool = False,
    workers: int | None = None,
    cut: threading.Event | None = None,
    events=None,
    rate: float | None = None,
) -> dict:
    """upload(), with the outcome: {"uploaded", "unchanged", "left", "bytes", "groups"}.
    deadline (time.monotonic()) and cut: no file starts after it or once cut is set (those are
    "left"; files in flight finish); with rate (bytes/s, as earlier syncs went), neither does
    a file that could not be sent by the deadline at that rate, so that the time left goes to
    files that can still make it. events(dict) is called, from worker threads, with
    {"event": "plan", "groups": [[name, [rel pending, ...]], ...]} first (the order they go
    in), then {"event": "uploaded" | "unchanged" | "skipped", "rel": REL, "size": N} a file."""
    loc = _Location(url)
    root = Path(local_dir).resolve()
    outcome: dict = {"uploaded": [], "unchanged": 0, "left": [], "bytes": 0, "groups": []}
    emit = events or _quiet
    if not root.exists():
        log(f"nothing to upload: {local_dir} does not exist")
        emit({"event": "plan", "groups": []})
        return outcome
    if not root.is_dir():
        raise SyncError(f"{local_dir} is not a directory")
    cache = _HashCache(state, root)
    state_path = cache.path.resolve() if cache.path else None
    skip = {state_path, state_path.with_name(state_path.name + ".tmp")} if state_path else set()
    store = _store(loc)
    remote = {obj.key: obj for obj in store.objects(loc.folder)}  # fails before any hashing
    plan = []
    for name, items in _plan(_local_files(root, skip), checkpoints):
        pending = []
        for rel, path, st in items:
            if cache.unchanged(rel, st, remote.get(loc.key(rel))):
                outcome["unchanged"] += 1
            else:
                pending.append((rel, path, st))
        plan.append((name, pending))
    outcome["groups"] = [[name, [rel for rel, _path, _stat in items]] for name, items in plan]
    emit({"event": "plan", "groups": outcome["groups"]})
    lock = threading.Lock()

    def say(line: str) -> None:  # from worker threads: one line at a time, each whole
        with lock:
            log(line)

    large = threading.Semaphore(LARGE_SLOTS)

    def stopped() -> bool:
        return bool(cut is not None and cut.is_set()) or (
            deadline is not None and time.monotonic() >= deadline
        )

    def too_late(size: int) -> bool:
        if stopped():
            return True
        return bool(deadline is not None and rate and size / rate > deadline - time.monotonic())

    def one(rel: str, path: Path, st: os.stat_result) -> None:
        if too_late(st.st_size):
            cache.keep(rel, cache.known(rel, st))
            with lock:
                outcome["left"].append(rel)
            return
        obj = remote.get(loc.key(rel))
        md5 = None
        try:
            if store.needs_md5 or (obj is not None and obj.size == st.st_size):
                md5 = cache.md5(rel, path, st)
            if obj is not None and obj.size == st.st_size and store.same(obj, md5):
                cache.keep(rel, {"size": st.st_size, "mtime_ns": st.st_mtime_ns}, stamp=obj.stamp)
                with lock:
                    outcome["unchanged"] += 1
                emit({"event": "unchanged", "rel": rel, "size": st.st_size})
                return
            with large if st.st_size >= S3_MULTIPART_BYTES else contextlib.nullcontext():
                stamp = store.upload(path, loc.key(rel), md5)
        except FileNotFoundError:
            say(f"skipped {rel}: deleted before it could be uploaded")
            emit({"event": "skipped", "rel": rel, "size": 0})
            return
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
            cache.keep(rel, {"size": st.st_size, "mtime_ns": st.st_mtime_ns}, stamp=stamp)
        with lock:
            outcome["uploaded"].append(rel)
            outcome["bytes"] += st.st_size
        say(f"uploaded {rel} ({st.st_size} B)")
        emit({"event": "uploaded", "rel": rel, "size": st.st_size})

    workers = max(1, workers or UPLOAD_WORKERS)
    if loc.scheme == "gs" and os.environ.get("STORAGE_EMULATOR_HOST"):
        # gcp-storage-emulator serves one request at a time with a listen backlog of 5: more
        # connections than that wait past the connect timeout, and parallelism gains nothing
        workers = min(workers, EMULATOR_WORKERS)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(one, *item) for _name, items in plan for item in items]
            errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]
    except BaseException:
        with contextlib.suppress(SyncError):
            cache.save()  # what was hashed and sent so far stays valid, whatever failed
        raise
    cache.save()
    left = f", {len(outcome['left'])} left at the deadline" if outcome["left"] else ""
    log(
        f"upload done: {len(outcome['uploaded'])} uploaded ({outcome['bytes']} B), "
        f"{outcome['unchanged']} unchanged{left}, to {url}"
    )
    return outcome


def _target(dest: Path, rel: str, key: str, url: str) -> Path:
    """dest/rel, refusing names that would land outside dest ('..', absolute, via links)."""
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or ".." in parts or "\x00" in rel:
        raise SyncError(f"refusing object {key!r} from {url}: its name would escape {dest}")
    target = dest.joinpath(*parts)
    base = dest.resolve()
    if target.resolve() != base and base not in target.resolve().parents:
        raise SyncError(f"refusing object {key!r} from {url}: it would be written outside {dest}")
    return target


def _fetch(store, key: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + PART_SUFFIX)
    try:
        store.download(key, part)
        part.replace(target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()


def _download(loc: _Location, store, dest: Path, log) -> tuple[list[str], int]:
    objects = [obj for obj in store.objects(loc.folder) if not obj.key.endswith("/")]
    plan = []
    for obj in objects:  # "dir/" keys are folder placeholders that consoles create
        rel = obj.key[len(loc.folder) :]
        plan.append((rel, obj, _target(dest, rel, obj.key, loc.url)))
    total = 0
    for rel, obj, target in plan:
        _fetch(store, obj.key, target)
        total += obj.size
        log(f"downloaded {rel} ({obj.size} B)")
    return [rel for rel, _obj, _target in plan], total


def download(url: str, local_dir: str | os.PathLike, log=_quiet) -> list[str]:
    """Download every object under url's prefix into local_dir, keeping relative paths; return
    them. Every name is checked before anything is written. No objects: nothing is written."""
    loc = _Location(url)
    dest = Path(local_dir)
    names, total = _download(loc, _store(loc), dest, log)
    log(f"download done: {len(names)} downloaded ({total} B), from {url} into {dest}")
    return names


def put_text(url: str, text: str) -> None:
    """Write text (UTF-8) as the object at exactly url."""
    loc = _Location(url)
    if not loc.prefix:
        raise SyncError(f"put needs an object name after the bucket: {url}")
    _store(loc).put_bytes(loc.prefix, text.encode("utf-8"), "text/plain; charset=utf-8")


def read_text(url: str) -> str | None:
    """The object at exactly url as text (UTF-8), None when there is none (the laptop reads
    markers and logs this way)."""
    loc = _Location(url)
    store = _store(loc)
    if not loc.prefix or not store.exists(loc.prefix):
        return None
    with tempfile.TemporaryDirectory(prefix="gpubake-sync-") as tmp:
        path = Path(tmp) / "object"
        store.download(loc.prefix, path)
        return path.read_text(encoding="utf-8", errors="replace")


def upload_file(path: str | os.PathLike, url: str) -> None:
    """One local file, as the object at exactly url (the laptop's packed code)."""
    loc = _Location(url)
    if not loc.prefix:
        raise SyncError(f"upload needs an object name after the bucket: {url}")
    _store(loc).upload(Path(path), loc.prefix, _file_md5(Path(path)))


def remove(url: str) -> None:
    """Delete the object at exactly url (the laptop's write probe)."""
    loc = _Location(url)
    if not loc.prefix:
        raise SyncError(f"remove needs an object name after the bucket: {url}")
    _store(loc).delete(loc.prefix)


def _check_name(member: tarfile.TarInfo) -> None:
    # The data filter would strip a leading '/'; a code tarball with one was made wrong, and
    # refusing it on every Python keeps the images alike.
    if member.name.startswith("/") or ".." in PurePosixPath(member.name).parts:
        raise tarfile.TarError(f"{member.name!r} has an absolute or parent path")


def _check_member(member: tarfile.TarInfo, dest: str, links: set[str]) -> None:
    """PEP 706's 'data' rules for a Python without tarfile.data_filter (before 3.10.12)."""
    name = member.name
    parts = PurePosixPath(name).parts
    if member.isdev():
        raise tarfile.TarError(f"{name!r} is a device or fifo")
    if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
        raise tarfile.TarError(f"{name!r} goes through a link of the archive")
    if member.issym() or member.islnk():
        base = str(PurePosixPath(name).parent) if member.issym() else ""
        target = posixpath.normpath(posixpath.join(dest, base, member.linkname))
        if member.linkname.startswith("/") or os.path.commonpath([dest, target]) != dest:
            raise tarfile.TarError(f"{name!r} links outside the destination")
        links.add("/".join(parts))
    member.mode &= 0o755  # no setuid/setgid, no group/other write
    member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""


def _extract(tarball: Path, dest: Path, url: str) -> list[str]:
    """Extract tarball into dest; every member is checked before anything is written."""
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    try:
        with tarfile.open(tarball) as tf:
            members = tf.getmembers()
            if _HAVE_DATA_FILTER:
                for member in members:
                    _check_name(member)
                    tarfile.data_filter(member, root)
                tf.extractall(root, filter="data")
            else:
                links: set[str] = set()
                for member in members:
                    _check_name(member)
                    _check_member(member, root, links)
                for member in members:
                    tf.extract(member, root)
    except tarfile.TarError as exc:
        raise SyncError(f"refusing tarball {url}: {exc}") from exc
    return sorted(m.name for m in members if m.isfile())


def fetch_code(url: str, dest: str | os.PathLike, log=_quiet) -> list[str]:
    """The job's code into dest: url as a .tar.gz/.tgz/.tar object, extracted; else as a folder
    prefix, downloaded. Returns the files written (relative paths)."""
    loc = _Location(url)
    dest = Path(dest)
    store = _store(loc)
    if loc.prefix.endswith(TARBALL_SUFFIXES) and store.exists(loc.prefix):
        with tempfile.TemporaryDirectory(prefix="gpubake-code-") as tmp:
            tarball = Path(tmp, "code.tar")
            store.download(loc.prefix, tarball)
            names = _extract(tarball, dest, url)
        log(f"fetch-code done: {len(names)} files from tarball {url} into {dest}")
        return names
    names, total = _download(loc, store, dest, log)
    if not names:
        raise SyncError(f"no code at {url} (no tarball and no folder)")
    log(f"fetch-code done: {len(names)} files ({total} B) from folder {url} into {dest}")
    return names


def serve(stdin=None, stdout=None) -> None:
    """The runner's sync process: requests (JSON lines) in, events (JSON lines) out, the
    clients loaded once. A reader thread takes {"op": "cut"} at once (the upload running
    starts no more files: the final sync follows) and queues the rest; requests run one at a
    time. Every event carries the request's "id"; each request ends with "done" or "error"."""
    global _STORES
    _STORES = {}
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    requests: queue.Queue = queue.Queue()
    cut = threading.Event()
    out_lock = threading.Lock()

    def emit(event: dict) -> None:
        with out_lock:
            stdout.write(json.dumps(event) + "\n")
            stdout.flush()

    def read() -> None:
        for line in stdin:
            with contextlib.suppress(ValueError):
                request = json.loads(line)
                if isinstance(request, dict) and request.get("op") == "cut":
                    cut.set()
                elif isinstance(request, dict):
                    requests.put(request)
        requests.put(None)  # stdin closed: the runner is done with us

    threading.Thread(target=read, daemon=True).start()
    while (request := requests.get()) is not None:
        rid = request.get("id")
        cut.clear()
        try:
            result = _serve_one(request, cut, lambda e, rid=rid: emit({"id": rid, **e}))
            emit({"id": rid, "event": "done", **result})
        except Exception as exc:
            emit({"id": rid, "event": "error", "error": _one_line(exc)})


def _serve_one(request: dict, cut: threading.Event, emit) -> dict:
    op = request.get("op")
    if op == "upload":
        seconds = request.get("deadline")
        outcome = sync_folder(
            request["local_dir"],
            request["url"],
            request.get("state"),
            checkpoints=bool(request.get("checkpoints")),
            workers=request.get("workers"),
            deadline=None if seconds is None else time.monotonic() + float(seconds),
            cut=cut,
            events=emit,
            rate=request.get("rate"),
        )
        return {k: v for k, v in outcome.items() if k != "groups"}
    if op == "put":
        put_text(request["url"], request["text"])
        return {}
    if op == "check":
        check(request["url"])
        return {}
    raise SyncError(f"unknown request {op!r}")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        message = "interrupted"
    elif isinstance(exc, SyncError):
        message = str(exc)
    elif isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        message = f"local file error{where}: {exc.strerror or exc}"
    else:
        message = f"unexpected {type(exc).__name__}: {exc}"
    return " ".join(message.split())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own is several lines and exit 2
        raise SyncError(f"{message} (try {PROG} --help)")


def _cli(argv: list[str] | None) -> None:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n", maxsplit=1)[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("check", help="the location answers and its bucket exists")
    p.add_argument("url")
    p = sub.add_parser("upload", help="upload a folder's new or changed files")
    p.add_argument("local_dir")
    p.add_argument("url")
    p.add_argument("--state", help="JSON record of the last sync (sizes, mtimes, md5s)")
    p.add_argument("--deadline", type=float, help="start no file after this many seconds")
    p.add_argument("--rate", type=float, help="with --deadline: bytes/s expected (skip too-big)")
    p.add_argument("--checkpoints", action="store_true", help="top-level entries: newest first")
    p.add_argument("--workers", type=int, help=f"files in flight (default {UPLOAD_WORKERS})")
    p = sub.add_parser("download", help="download every object under the prefix")
    p.add_argument("url")
    p.add_argument("local_dir")
    p = sub.add_parser("put", help="write a small text object at exactly URL")
    p.add_argument("url")
    p.add_argument("text")
    p = sub.add_parser("fetch-code", help="a code tarball extracted, or a code folder")
    p.add_argument("url")
    p.add_argument("dir")
    sub.add_parser("serve", help="JSON requests on stdin, events on stdout (the job runner)")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    if args.command == "check":
        check(args.url)
        log(f"ok {args.url}")
    elif args.command == "upload":
        deadline = None if args.deadline is None else time.monotonic() + args.deadline
        sync_folder(
            args.local_dir,
            args.url,
            args.state,
            log,
            deadline=deadline,
            checkpoints=args.checkpoints,
            workers=args.workers,
            rate=args.rate,
        )
    elif args.command == "download":
        download(args.url, args.local_dir, log=log)
    elif args.command == "put":
        put_text(args.url, args.text)
        log(f"wrote {args.url} ({len(args.text.encode('utf-8'))} B)")
    elif args.command == "serve":
        serve()
    else:
        fetch_code(args.url, args.dir, log=log)


def main(argv: list[str] | None = None) -> int:
    debug = bool(os.environ.get("GPUBAKE_SYNC_DEBUG"))
    if debug:
        logging.basicConfig(level=logging.DEBUG)
    else:
        # stderr carries the one error line only: no Python-version FutureWarnings from the
        # clients, no "Retrying..." log lines through logging's last-resort handler.
        warnings.simplefilter("ignore")
        logging.getLogger().addHandler(logging.NullHandler())
    try:
        _cli(argv)
    except (Exception, KeyboardInterrupt) as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"{PROG}: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
