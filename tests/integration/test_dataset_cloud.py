"""`gpubake dataset create|list|delete` as a user runs them, against the Compute API stand-in
with gcp-storage-emulator, and moto's server (EC2, IAM, S3). Nothing runs the copy on these
stand-ins, so a thread does what the runner on the copy VM does when its job ends: it writes
the outcome marker under the job's results prefix and powers the VM off. Asserted: what the
cloud receives (a CPU VM from the gpubake image, the blank dataset disk attached read-write,
the runner's spec with `dataset.format` and the data as its code), the data uploaded, the copy
VM deleted afterwards, the disk (GCP) or snapshot (AWS) left, and a failed copy leaving
nothing."""

from __future__ import annotations

import datetime
import io
import json
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpubake.clouds.gcp import ENDPOINT_ENV
from tests.aws_helpers import REGION, client, runner_ami, use_server
from tests.compute_standin import ComputeStandin, compute_standin
from tests.integration.test_notebook_cloud import RUNNER, gpubake
from tests.object_stores import GcsServer, S3Server, gcs_server, s3_server

PROJECT = "demo-proj"
ZONE = "us-central1-a"
BUCKET = "gpubake-data"
GCP = ("--cloud", "gcp", "--project", PROJECT, "--zone", ZONE)


@pytest.fixture
def data(tmp_path) -> Path:
    folder = tmp_path / "pets"
    (folder / "images").mkdir(parents=True)
    (folder / "train.csv").write_text("file,label\na.jpg,cat\n", encoding="utf-8")
    (folder / "images" / "a.jpg").write_bytes(b"\xff\xd8jpeg")
    return folder


@pytest.fixture(autouse=True)
def state(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr("gpubake.jobs.datasets.POLL_S", 0.1)


def _marker(outcome: str) -> str:
    return json.dumps({"time": datetime.datetime.now(datetime.UTC).isoformat(), "exit": 0})


class FakeRunner(threading.Thread):
    """The copy VM's side: once `started()` names (job results, vm), write `_<OUTCOME>` there
    and call `power_off(vm)`."""

    def __init__(
        self,
        started: Callable[[], tuple[str, str] | None],
        write: Callable[[str, str], None],
        power_off: Callable[[str], None],
        outcome: str,
    ) -> None:
        super().__init__(daemon=True)
        self.started, self.write, self.power_off, self.outcome = started, write, power_off, outcome
        self.seen: tuple[str, str] | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.seen is None:
            self.seen = self.started()
            time.sleep(0.05)
        if self.seen:
            results, vm = self.seen
            self.write(f"{results}/_{self.outcome}", _marker(self.outcome))
            self.power_off(vm)


# ------------------------------------------------------------------------------------ GCP


@pytest.fixture(scope="module")
def gcp() -> Iterator[tuple[ComputeStandin, GcsServer]]:
    with compute_standin() as gce, gcs_server() as gcs:
        gce.add_image(PROJECT, "gpubake-pytorch-1", family="gpubake-pytorch", labels=RUNNER)
        gce.add_machine_type(PROJECT, ZONE, "e2-standard-4", cpus=4, memory_mb=16384)
        gcs.make_bucket(BUCKET)
        yield gce, gcs


@pytest.fixture
def gcp_env(gcp, monkeypatch) -> tuple[ComputeStandin, GcsServer]:
    gce, gcs = gcp
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(ENDPOINT_ENV, gce.url)
    for name, value in gcs.env.items():
        monkeypatch.setenv(name, value)
    return gce, gcs


def _gcp_runner(gce: ComputeStandin, gcs: GcsServer, outcome: str) -> FakeRunner:
    def started() -> tuple[str, str] | None:
        for body in gce.inserts():
            meta = {i["key"]: i["value"] for i in body["metadata"]["items"]}
            if "gpubake-dataset" in body.get("labels", {}):
                return json.loads(meta["gpubake-job"])["results"], body["name"]
        return None

    def write(url: str, text: str) -> None:
        bucket, _, key = url.removeprefix("gs://").partition("/")
        gcs.client().bucket(bucket).blob(key).upload_from_string(text)

    def power_off(vm: str) -> None:
        with gce.state.lock:
            gce.state.instances[(PROJECT, ZONE, vm)]["status"] = "TERMINATED"

    return FakeRunner(started, write, power_off, outcome)


def test_gcp_dataset_from_a_folder_is_a_disk_and_the_copy_vm_goes(gcp_env, data, capsys):
    gce, gcs = gcp_env
    gce.clear()
    runner = _gcp_runner(gce, gcs, "SUCCESS")
    runner.start()
    code, out, err = gpubake(
        capsys, "dataset", "create", "pets", *GCP, "--from", str(data),
        "--results", f"gs://{BUCKET}/datasets", "--json",
    )  # fmt: skip
    runner.join(10)
    assert code == 0, err
    made = json.loads(out)
    assert made["dataset"] == "pets" and made["size_gb"] == 10
    (body,) = gce.inserts()
    assert body["machineType"].endswith("/machineTypes/e2-standard-4")
    assert "guestAccelerators" not in body
    disk = body["disks"][1]
    assert disk["mode"] == "READ_WRITE" and disk["autoDelete"] is False
    assert disk["initializeParams"]["diskName"] == "pets"
    spec = json.loads({i["key"]: i["value"] for i in body["metadata"]["items"]}["gpubake-job"])
    assert spec["dataset"] == {
        "device": "gpubake-dataset", "mount": "/mnt/dataset", "read_only": False, "format": True,
    }  # fmt: skip
    assert "$GPUBAKE_DATASET_DIR" in spec["command"][-1]
    # the data went up as the job's code
    key = spec["code"]["url"].removeprefix(f"gs://{BUCKET}/")
    blob = gcs.client().bucket(BUCKET).blob(key).download_as_bytes()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        assert sorted(tar.getnames()) == ["images", "images/a.jpg", "train.csv"]
    # the copy VM is deleted, the disk is there, without users
    assert gce.instance(PROJECT, ZONE, body["name"]) is None
    assert gce.disk(PROJECT, ZONE, "pets")["labels"] == {"gpubake-dataset": "pets"}
    assert not gce.disk(PROJECT, ZONE, "pets").get("users")

    code, out, err = gpubake(capsys, "dataset", "list", *GCP, "--json")
    assert code == 0, err
    assert [r["name"] for r in json.loads(out)] == ["pets"]
    code, _, err = gpubake(capsys, "dataset", "create", "pets", *GCP, "--from", str(data),
                           "--results", f"gs://{BUCKET}/datasets")  # fmt: skip
    assert code == 1 and "disk pets exists" in err
    code, _, err = gpubake(capsys, "dataset", "delete", "pets", *GCP)
    assert code == 0, err
    assert gce.disk(PROJECT, ZONE, "pets") is None


def test_gcp_a_failed_copy_leaves_nothing(gcp_env, capsys):
    gce, gcs = gcp_env
    gce.clear()
    runner = _gcp_runner(gce, gcs, "FAILED")
    runner.start()
    code, _, err = gpubake(
        capsys, "dataset", "create", "broken", *GCP, "--from", f"gs://{BUCKET}/nothing/",
        "--size", "20", "--results", f"gs://{BUCKET}/datasets",
    )  # fmt: skip
    runner.join(10)
    assert code == 1 and "ended failed" in err and "gpubake job logs" in err
    assert len(err.strip().splitlines()) == 3  # checking, copying, the error
    (body,) = gce.inserts()
    spec = json.loads({i["key"]: i["value"] for i in body["metadata"]["items"]}["gpubake-job"])
    assert spec["code"] == {"url": f"gs://{BUCKET}/nothing/"}
    assert gce.instance(PROJECT, ZONE, body["name"]) is None
    assert gce.disk(PROJECT, ZONE, "broken") is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--from", "s3://bucket/data/", "--size", "20"), "copies from gs://"),
        (("--from", "gs://bucket/data/"), "give --size"),
        (("--from", "/no/such/folder"), "no such folder"),
    ],
)
def test_gcp_refusals_before_any_call(gcp_env, capsys, args, message):
    gce, _ = gcp_env
    gce.clear()
    code, _, err = gpubake(capsys, "dataset", "create", "x", *GCP, *args,
                           "--results", f"gs://{BUCKET}/datasets")  # fmt: skip
    assert code == 1 and message in err, err
    assert gce.requests() == []


# ------------------------------------------------------------------------------------ AWS


@pytest.fixture(scope="module")
def moto() -> Iterator[S3Server]:
    with s3_server() as server:
        server.make_bucket(BUCKET)
        runner_ami(server)
        client(server, "iam").create_instance_profile(InstanceProfileName="data-copier")
        yield server


@pytest.fixture
def aws_env(moto, monkeypatch, tmp_path) -> Any:
    use_server(moto, monkeypatch, tmp_path)
    return client(moto, "ec2")


def test_aws_dataset_is_a_snapshot_and_the_copy_instance_and_volume_go(aws_env, moto, data, capsys):
    ec2 = aws_env

    def started() -> tuple[str, str] | None:
        found = ec2.describe_instances(Filters=[
            {"Name": "tag:gpubake-dataset", "Values": ["pets"]},
            {"Name": "instance-state-name", "Values": ["running"]},
        ])  # fmt: skip
        for inst in [i for r in found["Reservations"] for i in r["Instances"]]:
            tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
            return tags["gpubake-results"], inst["InstanceId"]
        return None

    def write(url: str, text: str) -> None:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        moto.client().put_object(Bucket=bucket, Key=key, Body=text.encode())

    runner = FakeRunner(
        started, write, lambda vm: ec2.terminate_instances(InstanceIds=[vm]), "SUCCESS"
    )
    runner.start()
    code, out, err = gpubake(
        capsys, "dataset", "create", "pets", "--cloud", "aws", "--region", REGION,
        "--from", str(data), "--results", f"s3://{BUCKET}/datasets",
        "--instance-profile", "data-copier", "--json",
    )  # fmt: skip
    runner.join(10)
    assert code == 0, err
    snapshot = json.loads(out)["dataset"]
    assert snapshot.startswith("snap-")
    (snap,) = ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"]
    assert {t["Key"]: t["Value"] for t in snap["Tags"]} == {"gpubake-dataset": "pets"}
    assert snap["VolumeSize"] == 10
    # the copy volume was made for it and is gone; the instance is terminated
    assert not ec2.describe_volumes(Filters=[{"Name": "volume-id", "Values": [snap["VolumeId"]]}])[
        "Volumes"
    ]
    _, vm = runner.seen or ("", "")
    state = ec2.describe_instances(InstanceIds=[vm])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] == "terminated"
    code, out, err = gpubake(capsys, "dataset", "list", "--cloud", "aws", "--region", REGION,
                             "--json")  # fmt: skip
    assert [(r["name"], r["id"]) for r in json.loads(out)] == [("pets", snapshot)]
    code, _, err = gpubake(capsys, "dataset", "delete", "pets", "--cloud", "aws",
                           "--region", REGION)  # fmt: skip
    assert code == 0, err
    assert not ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": "tag:gpubake-dataset", "Values": ["pets"]}])["Snapshots"]  # fmt: skip
