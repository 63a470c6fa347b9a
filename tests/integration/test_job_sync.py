"""gpubake_sync.py (the images' results/checkpoint sync client) against real servers on loopback:
moto's S3 server and gcp-storage-emulator, one of each for the module, a fresh bucket a test.

The command line is what the job runner uses, so the exit codes, stdout lines and the one-line
stderr are asserted through it; the rest calls the module's functions, which is faster.
GPUBAKE_SYNC_PYTHON=/path/to/python runs the command line with another interpreter (an image's
3.10 or 3.12 with roles/job_runner/files/requirements.txt installed)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from tests.modules import load_file
from tests.object_stores import ObjectStoreServer, gcs_server, s3_server

ROOT = Path(__file__).resolve().parents[2]
SYNC = ROOT / "roles" / "job_runner" / "files" / "gpubake_sync.py"
PYTHON = os.environ.get("GPUBAKE_SYNC_PYTHON") or sys.executable
# Variables of the caller's environment that would point a client elsewhere than our server.
FOREIGN_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "STORAGE_EMULATOR_HOST",
    "AWS_ENDPOINT_URL",
)


sync = load_file(SYNC, "gpubake_sync")


@pytest.fixture(scope="module", params=["s3", "gs"])
def server(request):
    with (s3_server if request.param == "s3" else gcs_server)() as srv:
        yield srv


@pytest.fixture
def url(server: ObjectStoreServer, monkeypatch) -> str:
    """s3:// or gs:// of a fresh bucket, with this process's environment pointed at the server
    (for the functions; the command line gets the same through cli())."""
    for name in FOREIGN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    server.make_bucket(bucket)
    return f"{server.kind}://{bucket}"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    return subprocess.run(
        [PYTHON, str(SYNC), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_error(result: subprocess.CompletedProcess, line: str) -> None:
    """Exit 2 and exactly `line` (one line) on stderr."""
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result
    assert result.stderr == line + "\n"


def bucket_of(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


def remote_files(server: ObjectStoreServer, url: str) -> dict[str, bytes]:
    """Every object of url's bucket and its bytes, read with the native client."""
    bucket = bucket_of(url)
    client = server.client()
    if server.kind == "s3":
        listing = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        return {
            o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing
        }
    return {b.name: b.download_as_bytes() for b in client.list_blobs(bucket)}


def put_remote(server: ObjectStoreServer, url: str, key: str, data: bytes) -> None:
    """Write an object with the native client (as another tool would: no gpubake metadata)."""
    bucket = bucket_of(url)
    if server.kind == "s3":
        server.client().put_object(Bucket=bucket, Key=key, Body=data)
    else:
        server.client().bucket(bucket).blob(key).upload_from_string(data)


def local_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "metrics.json": b'{"loss": 0.25}\n',
        "ckpt/step-100/model.bin": os.urandom(3000),
        "ckpt/step-100/optimizer.bin": os.urandom(1500),
        "ckpt/empty.txt": b"",
        "logs/a b/run log.txt": b"step 1\nstep 2\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tarball(members: dict[str, bytes], mode: str = "w:gz", extra=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return buf.getvalue()


# -- check --------------------------------------------------------------------------------------


def test_check_existing_bucket(server, url):
    result = cli(server.env, "check", f"{url}/run1")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"ok {url}/run1\n", "")


def test_check_missing_bucket_is_one_line(server, url):
    missing = f"{server.kind}://no-such-{uuid.uuid4().hex[:12]}/run1"
    result = cli(server.env, "check", missing)
    assert_error(result, f"gpubake-sync: bucket '{bucket_of(missing)}' does not exist ({missing})")
    with pytest.raises(sync.SyncError, match="does not exist"):
        sync.check(missing)


def test_check_unreachable_endpoint_is_one_line(server, url):
    closed = f"http://127.0.0.1:{closed_port()}"
    env = {k: v.replace(server.endpoint, closed) for k, v in server.env.items()}
    result = cli(env, "check", f"{url}/run1")
    assert_error(
        result, f"gpubake-sync: cannot reach {url}/run1: Connection refused (endpoint {closed})"
    )


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_missing_credentials_are_one_line(scheme, tmp_path):
    # no credentials anywhere, and no look-up of a cloud metadata server either
    env = {
        "HOME": str(tmp_path),
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": f"127.0.0.1:{closed_port()}",
        "GCE_METADATA_IP": f"127.0.0.1:{closed_port()}",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}",
    }
    hidden = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ROLE_ARN")
    clean = {k: v for k, v in os.environ.items() if k not in (*FOREIGN_ENV, *hidden)}
    result = subprocess.run(
        [PYTHON, str(SYNC), "check", f"{scheme}://some-bucket/run1"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    cloud = "AWS" if scheme == "s3" else "Google Cloud"
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"gpubake-sync: no usable {cloud} credentials for {scheme}://some-bucket/run1: "
    )
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_permission_denied_is_reported_as_such(monkeypatch):
    from botocore.exceptions import ClientError
    from google.api_core.exceptions import Forbidden

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    denied = ClientError(
        {
            "Error": {"Code": "AccessDenied", "Message": "Access Denied"},
            "ResponseMetadata": {"HTTPStatusCode": 403},
        },
        "ListObjectsV2",
    )
    s3 = sync._S3(sync._Location("s3://b-1/run1"))
    with pytest.raises(sync.SyncError) as err, s3.errors():
        raise denied
    assert str(err.value) == "permission denied on s3://b-1/run1: AccessDenied: Access Denied"
    gcs = sync._GCS(sync._Location("gs://b-1/run1"))
    with pytest.raises(sync.SyncError) as err, gcs.errors():
        raise Forbidden("caller does not have storage.objects.list access")
    assert str(err.value) == (
        "permission denied on gs://b-1/run1: caller does not have storage.objects.list access"
    )


@pytest.mark.parametrize(
    ("bad", "line"),
    [
        (
            "http://x/y",
            "gpubake-sync: unsupported URL 'http://x/y': "
            "expected gs://BUCKET/PREFIX or s3://BUCKET/PREFIX",
        ),
        ("gs://", "gpubake-sync: no bucket in URL 'gs://'"),
        (
            "s3://Bad_Bucket/x",
            "gpubake-sync: invalid bucket name 'Bad_Bucket' in s3://Bad_Bucket/x",
        ),
    ],
)
def test_bad_urls_are_one_line_errors(bad, line, tmp_path):
    for args in (["check", bad], ["upload", str(tmp_path), bad], ["fetch-code", bad, "d"]):
        assert_error(cli({}, *args), line)
    with pytest.raises(sync.SyncError) as err:
        sync.parse_url(bad)
    assert f"gpubake-sync: {err.value}" == line


def test_parse_url_keeps_bucket_and_prefix():
    assert sync.parse_url("gs://my-bucket/runs/r1/") == ("gs", "my-bucket", "runs/r1")
    assert sync.parse_url("s3://my.bucket") == ("s3", "my.bucket", "")
    assert sync.parse_url("gs://my_bucket/x") == ("gs", "my_bucket", "x")  # '_' is fine on GCS
    for bad in ("s3://my_bucket/x", "s3://ab/x", "s3://192.168.1.1/x", "ftp://b/x", "gs:/b/x"):
        with pytest.raises(sync.SyncError):
            sync.parse_url(bad)


def test_usage_errors_are_one_line():
    result = cli({}, "upload", "only-one-arg")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("gpubake-sync: ")
    assert "Traceback" not in result.stderr


# -- upload -------------------------------------------------------------------------------------


def test_upload_nested_tree(server, url, tmp_path):
    files = make_tree(tmp_path / "out")
    (tmp_path / "out" / "latest").symlink_to("ckpt/step-100/model.bin")  # not followed
    (tmp_path / "out" / "x.bin.gpubake-part").write_bytes(b"torn")  # a killed download's
    result = cli(server.env, "upload", str(tmp_path / "out"), f"{url}/run1")
    assert (result.returncode, result.stderr) == (0, "")
    expected = [f"uploaded {rel} ({len(files[rel])} B)" for rel in sorted(files)]
    total = sum(len(d) for d in files.values())
    *lines, last = result.stdout.splitlines()
    assert sorted(lines) == expected  # in the order they finished: files go up in parallel
    assert last == f"upload done: {len(files)} uploaded ({total} B), 0 unchanged, to {url}/run1"
    assert remote_files(server, url) == {f"run1/{rel}": data for rel, data in files.items()}


def test_upload_again_sends_only_what_changed(server, url, tmp_path):
    out = tmp_path / "out"
    files = make_tree(out)
    assert sync.upload(out, f"{url}/run1") == sorted(files)
    assert sync.upload(out, f"{url}/run1") == []
    result = cli(server.env, "upload", str(out), f"{url}/run1")
    assert (
        result.stdout == f"upload done: 0 uploaded (0 B), {len(files)} unchanged, to {url}/run1\n"
    )

    # same size, other bytes: only the md5 can tell
    changed = os.urandom(3000)
    (out / "ckpt/step-100/model.bin").write_bytes(changed)
    (out / "new.txt").write_text("new\n")
    assert sync.upload(out, f"{url}/run1") == ["ckpt/step-100/model.bin", "new.txt"]
    remote = remote_files(server, url)
    assert remote["run1/ckpt/step-100/model.bin"] == changed
    assert remote["run1/new.txt"] == b"new\n"

    # never deletes: a file gone locally stays remote
    (out / "metrics.json").unlink()
    assert sync.upload(out, f"{url}/run1") == []
    assert "run1/metrics.json" in remote_files(server, url)


def test_state_file_spares_rehashing_unchanged_files(server, url, tmp_path, monkeypatch):
    out = tmp_path / "out"
    files = make_tree(out)
    state = tmp_path / "sync-state.json"
    hashed: list[str] = []
    real_md5 = sync._file_md5

    def counting_md5(path):
        hashed.append(path.as_posix().rsplit("/out/", 1)[-1].rsplit("/other/", 1)[-1])
        return real_md5(path)

    monkeypatch.setattr(sync, "_file_md5", counting_md5)
    sync.upload(out, f"{url}/run1", state=state)
    # S3 sets the md5 as metadata; GCS computes its own md5Hash: new files are not hashed
    assert sorted(hashed) == (sorted(files) if server.kind == "s3" else [])
    hashed.clear()
    assert sync.upload(out, f"{url}/run1", state=state) == []
    assert hashed == []  # all from the state file

    model = out / "ckpt/step-100/model.bin"
    model.write_bytes(os.urandom(3000))  # new mtime, same size
    assert sync.upload(out, f"{url}/run1", state=state) == ["ckpt/step-100/model.bin"]
    assert hashed == ["ckpt/step-100/model.bin"]

    # another folder's state is not trusted, even for a file of the same name, size and mtime
    other = tmp_path / "other"
    other.mkdir()
    twin = other / "metrics.json"
    twin.write_bytes(files["metrics.json"].upper())
    mtime_ns = (out / "metrics.json").stat().st_mtime_ns
    os.utime(twin, ns=(mtime_ns, mtime_ns))
    hashed.clear()
    assert sync.upload(other, f"{url}/run2", state=state) == ["metrics.json"]
    assert hashed == (["metrics.json"] if server.kind == "s3" else [])


def test_identical_object_from_another_tool_is_not_uploaded(server, url, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "same.txt").write_bytes(b"identical bytes\n")
    (out / "differs.txt").write_bytes(b"local bytes\n")
    put_remote(server, url, "run1/same.txt", b"identical bytes\n")  # no gpubake-md5 metadata
    put_remote(server, url, "run1/differs.txt", b"other bytes\n")  # same size, other content
    assert sync.upload(out, f"{url}/run1") == ["differs.txt"]
    assert remote_files(server, url)["run1/differs.txt"] == b"local bytes\n"


@pytest.mark.parametrize("server", ["s3"], indirect=True)
def test_s3_multipart_object_is_compared_by_its_md5_metadata(server, url, tmp_path, monkeypatch):
    monkeypatch.setattr(sync, "S3_MULTIPART_BYTES", 5 << 20)  # S3's smallest part
    out = tmp_path / "out"
    out.mkdir()
    big = out / "big.bin"
    big.write_bytes(os.urandom(6 << 20))
    assert sync.upload(out, f"{url}/run1") == ["big.bin"]
    head = server.client().head_object(Bucket=bucket_of(url), Key="run1/big.bin")
    assert "-" in head["ETag"]  # multipart: the ETag is no md5
    md5 = hashlib.md5(big.read_bytes(), usedforsecurity=False).hexdigest()
    assert head["Metadata"]["gpubake-md5"] == md5
    assert sync.upload(out, f"{url}/run1") == []
    big.write_bytes(os.urandom(6 << 20))
    assert sync.upload(out, f"{url}/run1") == ["big.bin"]


def test_missing_local_dir_uploads_nothing(server, url, tmp_path):
    result = cli(server.env, "upload", str(tmp_path / "absent"), f"{url}/run1")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"nothing to upload: {tmp_path / 'absent'} does not exist\n"
    assert remote_files(server, url) == {}


# -- download -----------------------------------------------------------------------------------


def test_download_reproduces_the_tree(server, url, tmp_path):
    files = make_tree(tmp_path / "out")
    sync.upload(tmp_path / "out", f"{url}/run1")
    put_remote(server, url, "run10/not-this-run.txt", b"x")  # a sibling prefix, not a child
    result = cli(server.env, "download", f"{url}/run1", str(tmp_path / "back"))
    assert (result.returncode, result.stderr) == (0, "")
    assert "downloaded ckpt/step-100/model.bin (3000 B)" in result.stdout.splitlines()
    assert local_files(tmp_path / "back") == files


def test_download_of_nothing_writes_nothing(server, url, tmp_path):
    assert sync.download(f"{url}/empty", tmp_path / "dest") == []
    assert not (tmp_path / "dest").exists()


def test_download_refuses_names_escaping_the_folder(server, url, tmp_path):
    # the emulator cannot store a '..' name; '//' (an absolute remainder) shows the same check
    bad = "run1/../evil" if server.kind == "s3" else "run1//etc/evil"
    put_remote(server, url, "run1/good.txt", b"good")
    put_remote(server, url, bad, b"evil")
    dest = tmp_path / "a" / "dest"
    result = cli(server.env, "download", f"{url}/run1", str(dest))
    assert_error(
        result,
        f"gpubake-sync: refusing object '{bad}' from {url}/run1: its name would escape {dest}",
    )
    assert not dest.exists()  # checked before anything was written
    assert not (tmp_path / "a" / "evil").exists()


# -- put, fetch-code ----------------------------------------------------------------------------


def test_put_writes_a_marker(server, url):
    result = cli(server.env, "put", f"{url}/run1/_SUCCESS", "done\n")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"wrote {url}/run1/_SUCCESS (5 B)\n"
    assert remote_files(server, url) == {"run1/_SUCCESS": b"done\n"}
    with pytest.raises(sync.SyncError, match="put needs an object name after the bucket"):
        sync.put_text(url, "x")


def test_fetch_code_from_a_tarball(server, url, tmp_path):
    code = {"train.py": b"print('hi')\n", "pkg/__init__.py": b"", "pkg/util.py": b"X = 1\n"}
    put_remote(server, url, "code/job.tar.gz", tarball(code, "w:gz"))
    result = cli(server.env, "fetch-code", f"{url}/code/job.tar.gz", str(tmp_path / "src"))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"fetch-code done: 3 files from tarball {url}/code/job.tar.gz into {tmp_path / 'src'}\n"
    )
    assert local_files(tmp_path / "src") == code
    # .tgz and plain .tar too
    put_remote(server, url, "code/job.tgz", tarball({"a.py": b"A\n"}, "w:gz"))
    put_remote(server, url, "code/job.tar", tarball({"b.py": b"B\n"}, "w"))
    assert sync.fetch_code(f"{url}/code/job.tgz", tmp_path / "tgz") == ["a.py"]
    assert sync.fetch_code(f"{url}/code/job.tar", tmp_path / "tar") == ["b.py"]
    assert (tmp_path / "tgz/a.py").read_bytes() == b"A\n"
    assert (tmp_path / "tar/b.py").read_bytes() == b"B\n"


def test_fetch_code_from_a_folder(server, url, tmp_path):
    code = {"train.py": b"print('hi')\n", "conf/base.yaml": b"lr: 0.1\n"}
    for rel, data in code.items():
        put_remote(server, url, f"code/v1/{rel}", data)
    assert sorted(sync.fetch_code(f"{url}/code/v1", tmp_path / "src")) == sorted(code)
    assert local_files(tmp_path / "src") == code


def test_fetch_code_of_nothing_is_one_line(server, url, tmp_path):
    where = f"{url}/code/none.tar.gz"
    assert_error(
        cli(server.env, "fetch-code", where, str(tmp_path / "src")),
        f"gpubake-sync: no code at {where} (no tarball and no folder)",
    )
    with pytest.raises(sync.SyncError) as err:
        sync.fetch_code(f"{url}/code/none", tmp_path / "src")
    assert str(err.value) == f"no code at {url}/code/none (no tarball and no folder)"
    assert not (tmp_path / "src").exists()


def test_fetch_code_refuses_an_escaping_tarball(server, url, tmp_path):
    put_remote(server, url, "code/evil.tar.gz", tarball({"ok.py": b"1", "../evil": b"evil"}))
    dest = tmp_path / "job" / "src"
    result = cli(server.env, "fetch-code", f"{url}/code/evil.tar.gz", str(dest))
    assert result.returncode == 2
    assert result.stderr.startswith(f"gpubake-sync: refusing tarball {url}/code/evil.tar.gz: ")
    assert "evil" in result.stderr.split(": ", 2)[2]
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "job" / "evil").exists()
    assert local_files(dest) == {}  # checked before anything was written


# -- tarball checks without a server, with and without tarfile's data filter -------------------


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


@pytest.mark.parametrize("data_filter", [True, False], ids=["data-filter", "own-checks"])
@pytest.mark.parametrize(
    ("members", "extra"),
    [
        ({"../evil": b"x"}, ()),
        ({"/tmp/gpubake-abs-evil": b"x"}, ()),
        ({}, (_link("up", "../../outside"),)),
        ({}, (_link("abs", "/etc/passwd"),)),
        ({}, (_link("hard", "../outside", tarfile.LNKTYPE),)),
        ({}, (_device("dev"),)),
    ],
    ids=["parent", "absolute", "symlink-out", "symlink-abs", "hardlink-out", "device"],
)
def test_unsafe_tarballs_are_refused(tmp_path, monkeypatch, data_filter, members, extra):
    if data_filter and not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile.data_filter")
    monkeypatch.setattr(sync, "_HAVE_DATA_FILTER", data_filter)
    path = tmp_path / "t.tar"
    path.write_bytes(tarball({"fine.txt": b"ok", **members}, "w", extra))
    dest = tmp_path / "dest"
    with pytest.raises(sync.SyncError, match=r"^refusing tarball gs://b/t\.tar: "):
        sync._extract(path, dest, "gs://b/t.tar")
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("data_filter", [True, False], ids=["data-filter", "own-checks"])
def test_safe_tarball_with_inner_link_extracts(tmp_path, monkeypatch, data_filter):
    monkeypatch.setattr(sync, "_HAVE_DATA_FILTER", data_filter)
    path = tmp_path / "t.tar"
    path.write_bytes(tarball({"pkg/a.py": b"A = 1\n"}, "w", (_link("pkg/b.py", "a.py"),)))
    assert sync._extract(path, tmp_path / "dest", "gs://b/t.tar") == ["pkg/a.py"]
    assert (tmp_path / "dest/pkg/b.py").read_bytes() == b"A = 1\n"


# -- the laptop's side (gpubake.jobs.storage): the same client, loaded from the role's files


def test_probe_leaves_nothing_and_refuses_a_missing_bucket(url):
    from gpubake.jobs import storage
    from gpubake.jobs.launch import JobError

    storage.probe(f"{url}/runs")
    assert list(sync._store(sync._Location(url)).objects("")) == []
    missing = url.replace("://t-", "://missing-")
    with pytest.raises(JobError, match=r"is not writable: bucket .* does not exist") as err:
        storage.probe(f"{missing}/runs")
    assert "\n" not in str(err.value)


def test_the_newest_marker_tells_how_a_job_ended(url, tmp_path):
    from gpubake.jobs import storage

    job = f"{url}/runs/j1"
    assert storage.outcome(job) is None and storage.log_text(job) is None
    sync.put_text(f"{job}/_PREEMPTED", '{"job": "j1", "time": "2026-12-03T10:00:00+00:00"}')
    assert storage.outcome(job)["state"] == "preempted"
    # run again after the preemption, and finished
    sync.put_text(f"{job}/_SUCCESS", '{"job": "j1", "time": "2026-12-03T11:00:00+00:00"}')
    assert storage.outcome(job) == {
        "state": "succeeded",
        "job": "j1",
        "time": "2026-12-03T11:00:00+00:00",
    }
    sync.put_text(f"{job}/logs/job.log", "step 1\nstep 2\n")
    assert storage.log_text(job) == "step 1\nstep 2\n"
    code = tmp_path / "code.tar.gz"
    code.write_bytes(b"not really a tarball")
    storage.upload_code(code, f"{job}/code.tar.gz")
    names = storage.fetch(job, tmp_path / "out", log=lambda _line: None)
    assert sorted(names) == ["_PREEMPTED", "_SUCCESS", "code.tar.gz", "logs/job.log"]
    assert (tmp_path / "out" / "code.tar.gz").read_bytes() == b"not really a tarball"
    sync.remove(f"{job}/code.tar.gz")
    assert sync.read_text(f"{job}/code.tar.gz") is None


def test_job_logs_and_fetch_take_a_results_url(url, tmp_path, server):
    job = f"{url}/runs/j2"
    sync.put_text(f"{job}/logs/job.log", "hello from the job\n")
    env = {**server.env, "XDG_STATE_HOME": str(tmp_path / "state")}
    clean = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    run = [sys.executable, "-m", "gpubake", "job"]
    logs = subprocess.run(
        [*run, "logs", job], env={**clean, **env}, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert logs.returncode == 0 and logs.stdout == "hello from the job\n", logs.stderr
    empty = subprocess.run(
        [*run, "fetch", f"{url}/runs/none", str(tmp_path / "o")], env={**clean, **env},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert empty.returncode == 1
    assert (
        empty.stderr.startswith("gpubake: error: nothing under ") and empty.stderr.count("\n") == 1
    )
    unknown = subprocess.run(
        [*run, "fetch", "job-nope", str(tmp_path / "o")], env={**clean, **env},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert "no job 'job-nope' was launched from this machine" in unknown.stderr


def test_job_logs_follow_prints_to_the_end_and_stops_at_the_marker(url):
    from gpubake.jobs.commands import follow_log

    job = f"{url}/runs/j3"
    sync.put_text(f"{job}/logs/job.log", "step 1\nstep 2\nfailed: out of memory\n")
    sync.put_text(f"{job}/_FAILED", '{"job": "j3", "exit_code": 1}')
    out = io.StringIO()
    follow_log(job, follow=True, interval=0, out=out)
    assert out.getvalue() == "step 1\nstep 2\nfailed: out of memory\n"
    # no marker and the VM gone: it stops too, instead of waiting for ever
    other = f"{url}/runs/j4"
    sync.put_text(f"{other}/logs/job.log", "step 1\n")
    out = io.StringIO()
    follow_log(other, follow=True, interval=0, out=out, vm_alive=lambda: False)
    assert out.getvalue() == "step 1\n"


def test_a_sweeps_values_reach_the_command_through_the_runner(url, tmp_path, server):
    """The spec's params (gpubake job sweep) as $GPUBAKE_PARAM_<NAME>, in a real run."""
    spec = tmp_path / "spec.json"
    script = (
        "import os, pathlib; pathlib.Path(os.environ['GPUBAKE_RESULTS_DIR'], 'lr')"
        ".write_text(os.environ['GPUBAKE_PARAM_LR'])"
    )
    spec.write_text(json.dumps({
        "gpubake_job": 1, "id": "swept-0", "command": [sys.executable, "-c", script],
        "results": f"{url}/runs/swept-0", "params": {"lr": "1e-4"},
    }))  # fmt: skip
    clean = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "gpubake", "job", "local", str(spec), "--work-dir",
         str(tmp_path / "work")],
        env={**clean, **server.env, "GPUBAKE_CLOUD": "none", "GPUBAKE_JOB_CONFIG": os.devnull},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sync.read_text(f"{url}/runs/swept-0/results/lr") == "1e-4"


# -- parallel, ordered, deadline-bound and atomic uploads (the runner's final sync) ------------


def _serve(server: ObjectStoreServer) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    return subprocess.Popen(
        [PYTHON, str(SYNC), "serve"], env={**clean, **server.env}, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
    )  # fmt: skip


def _ask(proc: subprocess.Popen, rid: int, op: str, **fields) -> list[dict]:
    """One request to `gpubake-sync serve`: its events, the closing one last."""
    proc.stdin.write(json.dumps({"id": rid, "op": op, **fields}) + "\n")
    events = []
    while True:
        event = json.loads(proc.stdout.readline())
        assert event["id"] == rid
        events.append(event)
        if event["event"] in ("done", "error"):
            return events


def test_serve_sends_the_newest_checkpoint_first_and_keeps_to_its_deadline(
    server, url, tmp_path, monkeypatch
):
    ckpt = tmp_path / "ckpt"
    for step, age in (("step-100", 20), ("step-200", 10), ("step-300", 0)):
        for name in ("model.bin", "optim.bin"):
            path = ckpt / step / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(2000 if name == "model.bin" else 1000))
            os.utime(path, (path.stat().st_mtime - age,) * 2)
    state = str(tmp_path / "state.json")
    proc = _serve(server)
    try:
        # nothing may start after the deadline: all is left, nothing sent
        *_, done = _ask(proc, 1, "upload", local_dir=str(ckpt), url=f"{url}/c", state=state,
                        checkpoints=True, deadline=0)  # fmt: skip
        assert (done["event"], done["uploaded"], len(done["left"])) == ("done", [], 6)
        assert remote_files(server, url) == {}
        plan, *events, done = _ask(
            proc, 2, "upload", local_dir=str(ckpt), url=f"{url}/c", state=state,
            checkpoints=True, workers=1,
        )  # fmt: skip
        # newest checkpoint first, its largest file first
        assert plan["groups"] == [
            ["step-300", ["step-300/model.bin", "step-300/optim.bin"]],
            ["step-200", ["step-200/model.bin", "step-200/optim.bin"]],
            ["step-100", ["step-100/model.bin", "step-100/optim.bin"]],
        ]
        assert [e["rel"] for e in events] == [r for _, rels in plan["groups"] for r in rels]
        assert {e["event"] for e in events} == {"uploaded"} and done["left"] == []
        assert remote_files(server, url) == {
            f"c/{p.relative_to(ckpt).as_posix()}": p.read_bytes()
            for p in ckpt.rglob("*") if p.is_file()
        }  # fmt: skip
        # unchanged: size, mtime and the objects' stamps match the state; nothing is read
        monkeypatch.setattr(sync, "_file_md5", lambda _path: pytest.fail("hashed again"))
        outcome = sync.sync_folder(ckpt, f"{url}/c", state, checkpoints=True)
        assert (outcome["uploaded"], outcome["unchanged"]) == ([], 6)
        plan, done = _ask(proc, 3, "upload", local_dir=str(ckpt), url=f"{url}/c", state=state,
                          checkpoints=True)  # fmt: skip
        assert [g[1] for g in plan["groups"]] == [[], [], []] and done["unchanged"] == 6
        # the same process writes markers, and says what failed in one line
        assert _ask(proc, 4, "put", url=f"{url}/_PREEMPTED", text="{}")[-1]["event"] == "done"
        assert remote_files(server, url)["_PREEMPTED"] == b"{}"
        missing = url.replace("://t-", "://missing-")
        error = _ask(proc, 5, "check", url=missing)[-1]
        assert error["event"] == "error" and "does not exist" in error["error"]
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0  # stdin closed: it ends by itself


def _has_open(pid: int, path: Path) -> bool:
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if fd.readlink() == path:
                    return True
    return False


def test_a_killed_upload_never_leaves_a_truncated_object(server, url, tmp_path):
    """SIGKILL in the middle of a large upload (S3 multipart, GCS resumable): the object is
    still the whole earlier version, never part of the new one."""
    out = tmp_path / "out"
    out.mkdir()
    big = out / "model.pt"
    big.write_bytes(b"old" * 1000)
    assert sync.upload(out, f"{url}/run1") == ["model.pt"]
    with big.open("wb") as f:  # the new version: 160 MiB, seconds to send here
        for _ in range(160):
            f.write(os.urandom(1 << 20))
    clean = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    proc = subprocess.Popen(
        [PYTHON, str(SYNC), "upload", str(out), f"{url}/run1"], env={**clean, **server.env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # killed once it reads the file (the upload has begun), long before all of it is sent
    deadline = time.monotonic() + 60
    while not _has_open(proc.pid, big) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.kill()
    stdout, _ = proc.communicate()
    assert "uploaded model.pt" not in stdout
    assert remote_files(server, url) == {"run1/model.pt": b"old" * 1000}
    # the next sync sends it whole
    assert sync.upload(out, f"{url}/run1") == ["model.pt"]
    assert remote_files(server, url)["run1/model.pt"] == big.read_bytes()
