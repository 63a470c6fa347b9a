"""`gpubake notebook up|stop|down|status|list` as a user runs them, against the Compute API
stand-in (tests/compute_standin.py) and moto's EC2 server: what each cloud receives (the VM,
its /storage disk, the SSH access, the labels and idle settings, the boot script), the disk
kept by `down` and reused by the next `up`, removed by `down --delete-storage`, and the
refusals in one line with nothing created."""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpubake import cli, stacks
from gpubake.clouds.gcp import ENDPOINT_ENV
from tests.aws_helpers import REGION, client, runner_ami, use_server
from tests.compute_standin import ComputeStandin, compute_standin
from tests.object_stores import S3Server, s3_server

PROJECT = "demo-proj"
ZONE = "us-central1-a"
BARE_ZONE = "us-central1-f"  # offers no GPU
RUNNER = {"gpubake-job-runner": "true"}
GCP = ("--cloud", "gcp", "--project", PROJECT, "--zone", ZONE)
AWS = ("--cloud", "aws", "--region", REGION)


def gpubake(capsys, *args: str) -> tuple[int, str, str]:
    """`gpubake ARGS` in this process (the CLI's own entry point): exit code, out, err."""
    code: Any = 0
    try:
        cli.main(list(args))
    except SystemExit as exc:
        code = exc.code
    seen = capsys.readouterr()
    return int(code or 0), seen.out, seen.err


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("key")
    key = folder / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@laptop", "-f", str(key)],
        check=True,
    )
    return key, key.with_name(key.name + ".pub").read_text(encoding="utf-8").strip()


@pytest.fixture(autouse=True)
def state(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    for name in ("GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT", "CLOUDSDK_COMPUTE_ZONE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "state"


# ------------------------------------------------------------------------------------ GCP


@pytest.fixture(scope="module")
def gce() -> Iterator[ComputeStandin]:
    with compute_standin() as standin:
        standin.add_image(PROJECT, "gpubake-pytorch-1", family="gpubake-pytorch", labels=RUNNER)
        t4 = stacks.gpus_data()["gpus"]["t4"]["gcp"]
        standin.add_accelerator_type(PROJECT, ZONE, t4["accelerators"][0], max_cards=4)
        standin.add_machine_type(PROJECT, ZONE, t4["build_machine_type"])
        standin.add_machine_type(PROJECT, BARE_ZONE, t4["build_machine_type"])
        standin.add_image("oslogin-proj", "gpubake-pytorch-1", family="gpubake-pytorch",
                          labels=RUNNER)  # fmt: skip
        standin.add_accelerator_type("oslogin-proj", ZONE, t4["accelerators"][0])
        standin.add_machine_type("oslogin-proj", ZONE, t4["build_machine_type"])
        standin.set_project_metadata("oslogin-proj", {"enable-oslogin": "TRUE"})
        yield standin


@pytest.fixture
def gcp_env(gce, monkeypatch) -> ComputeStandin:
    monkeypatch.setenv(ENDPOINT_ENV, gce.url)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    return gce


def _metadata(body: dict[str, Any]) -> dict[str, str]:
    return {i["key"]: i["value"] for i in body["metadata"]["items"]}


def test_gcp_up_makes_the_vm_with_its_disk_key_labels_and_idle_settings(
    gcp_env, ssh_key, capsys, tmp_path
):
    gce, (key, public) = gcp_env, ssh_key
    gce.clear()
    code, out, err = gpubake(
        capsys, "notebook", "up", "fastai", *GCP, "--ssh-key", str(key), "--idle-stop", "30m",
        "--max-run", "8h", "--storage-size", "50", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["next"] == "gpubake notebook connect fastai"
    (body,) = gce.inserts()
    assert body["name"] == "gpubake-nb-fastai"
    assert body["labels"] == {
        "gpubake-notebook": "fastai",
        "gpubake-idle-stop": "1800",
        "gpubake-max-run": "28800",
    }
    assert body["scheduling"]["provisioningModel"] == "SPOT"
    assert body["scheduling"]["instanceTerminationAction"] == "STOP"  # the disk outlives it
    assert body["scheduling"]["maxRunDuration"] == {"seconds": "28800"}
    assert body["guestAccelerators"][0]["acceleratorType"].endswith("nvidia-tesla-t4")
    boot, storage = body["disks"]
    assert boot["boot"] and boot["initializeParams"]["sourceImage"].endswith("gpubake-pytorch-1")
    assert storage["deviceName"] == "gpubake-storage" and storage["autoDelete"] is False
    assert storage["initializeParams"]["diskName"] == "gpubake-nb-fastai-storage"
    assert storage["initializeParams"]["diskSizeGb"] == "50"
    meta = _metadata(body)
    assert meta["ssh-keys"] == f"gpubake:{public}"
    script = meta["startup-script"]
    assert public in script and '"idle_stop_s": 1800' in script and '"max_run_s": 28800' in script
    assert "/dev/disk/by-id/google-gpubake-storage" in script
    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr
    assert gce.disk(PROJECT, ZONE, "gpubake-nb-fastai-storage") is not None

    # a second `up` of a running notebook changes nothing
    gce.clear()
    code, out, err = gpubake(capsys, "notebook", "up", "fastai", *GCP, "--ssh-key", str(key))
    assert code == 0, err
    assert "already running" in err
    assert gce.inserts() == []

    # stop, then up starts the same VM
    code, _, err = gpubake(capsys, "notebook", "stop", "fastai")
    assert code == 0, err
    assert gce.instance(PROJECT, ZONE, "gpubake-nb-fastai")["status"] == "TERMINATED"
    code, _, err = gpubake(capsys, "notebook", "status", "fastai", "--json")
    assert code == 0, err
    code, out, err = gpubake(capsys, "notebook", "up", "fastai", *GCP, "--ssh-key", str(key))
    assert code == 0, err
    assert gce.requests("POST", "/instances/gpubake-nb-fastai/start")
    assert gce.inserts() == []
    code, out, err = gpubake(capsys, "notebook", "list", "--json")
    (row,) = json.loads(out)
    assert row["state"] == "RUNNING" and row["gpu"] == "1x nvidia-tesla-t4"

    # down keeps the disk; the next up mounts it again
    code, _, err = gpubake(capsys, "notebook", "down", "fastai")
    assert code == 0, err
    assert gce.instance(PROJECT, ZONE, "gpubake-nb-fastai") is None
    assert gce.disk(PROJECT, ZONE, "gpubake-nb-fastai-storage") is not None
    gce.clear()
    code, _, err = gpubake(capsys, "notebook", "up", "fastai", *GCP, "--ssh-key", str(key))
    assert code == 0, err
    (body,) = gce.inserts()
    storage = body["disks"][1]
    assert "initializeParams" not in storage
    assert storage["source"].endswith(f"/zones/{ZONE}/disks/gpubake-nb-fastai-storage")

    # down --delete-storage removes both
    code, _, err = gpubake(capsys, "notebook", "down", "fastai", "--delete-storage")
    assert code == 0, err
    assert gce.instance(PROJECT, ZONE, "gpubake-nb-fastai") is None
    assert gce.disk(PROJECT, ZONE, "gpubake-nb-fastai-storage") is None
    code, _, err = gpubake(capsys, "notebook", "status", "fastai")
    assert code == 1 and "no notebook 'fastai'" in err


def test_gcp_os_login_project_gets_no_ssh_keys_metadata(gcp_env, ssh_key, capsys):
    gce, (key, _) = gcp_env, ssh_key
    where = ("--cloud", "gcp", "--project", "oslogin-proj", "--zone", ZONE, "--ssh-key", str(key))
    gce.clear()
    code, _, err = gpubake(capsys, "notebook", "up", "lab", *where)
    assert code == 1 and "OS Login" in err and "--ssh-user" in err
    assert len(err.strip().splitlines()) == 1
    assert gce.inserts() == []
    code, _, err = gpubake(capsys, "notebook", "up", "lab", *where, "--ssh-user", "me_example_com")
    assert code == 0, err
    (body,) = gce.inserts()
    assert "ssh-keys" not in _metadata(body)
    gpubake(capsys, "notebook", "down", "lab", "--delete-storage")


def test_gcp_gpu_quota_is_checked_where_the_region_lists_it(gcp_env, ssh_key, capsys):
    gce, (key, _) = gcp_env, ssh_key
    gce.set_quota(PROJECT, "us-central1", "NVIDIA_T4_GPUS", 4, 3)
    gce.set_quota(PROJECT, "us-central1", "PREEMPTIBLE_NVIDIA_T4_GPUS", 8, 8)
    gce.clear()
    try:
        code, _, err = gpubake(capsys, "notebook", "up", "q", *GCP, "--ssh-key", str(key))
        assert code == 1, err
        assert "quota PREEMPTIBLE_NVIDIA_T4_GPUS in us-central1: 0 of 8 free, 1 needed" in err
        assert gce.inserts() == []
        # a standard VM counts against the standard quota, which has one left
        code, _, err = gpubake(
            capsys, "notebook", "up", "q", *GCP, "--ssh-key", str(key), "--no-spot"
        )
        assert code == 0, err
        assert gce.inserts()[0]["scheduling"]["provisioningModel"] == "STANDARD"
        gpubake(capsys, "notebook", "down", "q", "--delete-storage")
    finally:
        with gce.state.lock:
            gce.state.quotas.clear()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--zone", BARE_ZONE), "is not offered in zone"),
        (("--stack", "tensorflow"), "no image in family gpubake-tensorflow"),
        (("--storage-size", "5"), "--storage-size"),
        (("--idle-stop", "soon"), "is not a duration"),
        (("--ssh-from", "everyone"), "is not an address range"),
        (("--name-is-not-an-option",), "No such option"),
    ],
)
def test_gcp_refusals_are_one_line_with_nothing_made(gcp_env, ssh_key, capsys, args, message):
    gce, (key, _) = gcp_env, ssh_key
    gce.clear()
    code, _, err = gpubake(capsys, "notebook", "up", "nb", *GCP, "--ssh-key", str(key), *args)
    assert code != 0 and message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert gce.inserts() == []


def test_bad_name_and_missing_key_are_one_line(gcp_env, capsys, tmp_path):
    code, _, err = gpubake(capsys, "notebook", "up", "My_Lab", *GCP)
    assert code == 1 and "notebook name 'My_Lab'" in err
    code, _, err = gpubake(
        capsys, "notebook", "up", "lab", *GCP, "--ssh-key", str(tmp_path / "nokey")
    )
    assert code == 1 and "no such file" in err


def test_gcp_dry_run_prints_the_request_and_sends_nothing(gcp_env, ssh_key, capsys):
    gce, (key, public) = gcp_env, ssh_key
    gce.clear()
    code, out, err = gpubake(
        capsys, "notebook", "up", "dry", *GCP, "--ssh-key", str(key), "--dry-run", "--json"
    )
    assert code == 0, err
    assert gce.requests() == []
    body = json.loads(out)["requests"]["instances.insert"]
    assert body["name"] == "gpubake-nb-dry"
    assert body["disks"][0]["initializeParams"]["sourceImage"].endswith("family/gpubake-pytorch")
    assert _metadata(body)["ssh-keys"] == f"gpubake:{public}"


# ------------------------------------------------------------------------------------ AWS


@pytest.fixture(scope="module")
def moto() -> Iterator[tuple[S3Server, str]]:
    with s3_server() as server:
        yield server, runner_ami(server)


@pytest.fixture
def aws_env(moto, monkeypatch, tmp_path) -> Any:
    server, _ = moto
    use_server(server, monkeypatch, tmp_path)
    monkeypatch.setattr("gpubake.notebooks.aws.POLL_S", 0.2)
    return client(server, "ec2")


def _instances(ec2: Any, name: str) -> list[dict[str, Any]]:
    found = ec2.describe_instances(
        Filters=[{"Name": "tag:gpubake-notebook", "Values": [name]},
                 {"Name": "instance-state-name", "Values": ["pending", "running", "stopped"]}]
    )  # fmt: skip
    return [i for r in found["Reservations"] for i in r["Instances"]]


def _volumes(ec2: Any, name: str) -> list[dict[str, Any]]:
    return ec2.describe_volumes(
        Filters=[{"Name": "tag:gpubake-notebook-storage", "Values": [name]}]
    )["Volumes"]


def test_aws_up_stop_down_keeps_and_reuses_the_volume(aws_env, moto, ssh_key, capsys):
    ec2, (_, image), (key, public) = aws_env, moto, ssh_key
    code, out, err = gpubake(
        capsys, "notebook", "up", "d2l", *AWS, "--ssh-key", str(key), "--storage-size", "40",
        "--idle-stop", "45m", "--ssh-from", "198.51.100.7/24", "--json",
    )  # fmt: skip
    assert code == 0, err
    (inst,) = _instances(ec2, "d2l")
    assert json.loads(out)["instance"] == inst["InstanceId"]
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags["gpubake-notebook"] == "d2l" and tags["gpubake-idle-stop"] == "2700"
    assert inst["ImageId"] == image and inst["KeyName"] == "gpubake-nb-d2l"
    (group,) = inst["SecurityGroups"]
    assert group["GroupName"] == "gpubake-notebook-ssh"
    (rule,) = ec2.describe_security_groups(GroupIds=[group["GroupId"]])["SecurityGroups"][0][
        "IpPermissions"
    ]
    assert (rule["FromPort"], rule["ToPort"], rule["IpRanges"][0]["CidrIp"]) == (
        22,
        22,
        "198.51.100.0/24",
    )
    pair = ec2.describe_key_pairs(KeyNames=["gpubake-nb-d2l"])["KeyPairs"][0]
    assert pair["KeyName"] == "gpubake-nb-d2l"
    behaviour = ec2.describe_instance_attribute(
        InstanceId=inst["InstanceId"], Attribute="instanceInitiatedShutdownBehavior"
    )["InstanceInitiatedShutdownBehavior"]["Value"]
    assert behaviour == "stop"  # the watcher's power-off keeps the instance and its disks
    user_data = ec2.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="userData")
    packed = base64.b64decode(user_data["UserData"]["Value"])
    assert len(packed) <= 16384  # EC2's limit; cloud-init unpacks gzip
    script = gzip.decompress(packed).decode()
    assert script.startswith("#!/bin/bash\n")
    (volume,) = _volumes(ec2, "d2l")
    assert (
        volume["Size"] == 40 and volume["AvailabilityZone"] == inst["Placement"]["AvailabilityZone"]
    )
    assert public in script and volume["VolumeId"].replace("-", "") in script
    assert '"idle_stop_s": 2700' in script
    assert [a["InstanceId"] for a in volume["Attachments"]] == [inst["InstanceId"]]

    # up again: the same instance
    code, _, err = gpubake(capsys, "notebook", "up", "d2l", *AWS, "--ssh-key", str(key))
    assert code == 0 and "already running" in err
    assert [i["InstanceId"] for i in _instances(ec2, "d2l")] == [inst["InstanceId"]]

    code, _, err = gpubake(capsys, "notebook", "stop", "d2l")
    assert code == 0, err
    (stopped,) = _instances(ec2, "d2l")
    assert stopped["State"]["Name"] in ("stopping", "stopped")
    code, out, err = gpubake(capsys, "notebook", "status", "d2l", "--json")
    assert code == 0, err
    assert json.loads(out)["state"] in ("stopping", "stopped")

    # down: instance gone, volume kept; up again attaches the same volume
    code, _, err = gpubake(capsys, "notebook", "down", "d2l")
    assert code == 0, err
    assert _instances(ec2, "d2l") == []
    (kept,) = _volumes(ec2, "d2l")
    assert kept["VolumeId"] == volume["VolumeId"] and kept["State"] == "available"
    assert not ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": ["gpubake-nb-d2l"]}])[
        "KeyPairs"
    ]
    code, _, err = gpubake(capsys, "notebook", "up", "d2l", *AWS, "--ssh-key", str(key))
    assert code == 0, err
    (again,) = _instances(ec2, "d2l")
    assert again["InstanceId"] != inst["InstanceId"]
    (reused,) = _volumes(ec2, "d2l")
    assert reused["VolumeId"] == volume["VolumeId"]
    assert [a["InstanceId"] for a in reused["Attachments"]] == [again["InstanceId"]]

    code, _, err = gpubake(capsys, "notebook", "down", "d2l", "--delete-storage")
    assert code == 0, err
    assert _instances(ec2, "d2l") == [] and _volumes(ec2, "d2l") == []


def test_aws_dry_run_prints_the_calls_and_makes_nothing(aws_env, ssh_key, capsys):
    ec2, (key, public) = aws_env, ssh_key
    code, out, err = gpubake(
        capsys, "notebook", "up", "dry", *AWS, "--ssh-key", str(key), "--dry-run", "--json"
    )
    assert code == 0, err
    calls = json.loads(out)["requests"]
    assert list(calls) == [
        "ImportKeyPair",
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "CreateVolume",
        "RunInstances",
        "AttachVolume",
    ]
    assert calls["ImportKeyPair"]["PublicKeyMaterial"] == public
    assert calls["RunInstances"]["InstanceMarketOptions"]["SpotOptions"] == {
        "SpotInstanceType": "persistent",
        "InstanceInterruptionBehavior": "stop",
    }
    assert _instances(ec2, "dry") == [] and _volumes(ec2, "dry") == []
