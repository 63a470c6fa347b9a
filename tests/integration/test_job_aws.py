"""gpubake.jobs.aws against moto's server (EC2, STS, IAM and S3 on one loopback port), through
real boto3 calls: the RunInstances request each job sends (spot, terminate on shutdown, IMDSv2,
the spec as user-data, the tags), a sweep's instances, listing and terminating them, and every
pre-start check refusing in one line with nothing created.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from gpubake.jobs import launch
from gpubake.jobs.aws import IMAGE_PLACEHOLDER, RESULTS_TAG, Aws
from gpubake.jobs.cloud import DEADLINE_LABEL, JOB_LABEL, SWEEP_LABEL
from gpubake.jobs.launch import JobError, JobOptions
from tests.aws_helpers import FOREIGN_ENV, REGION, client, make_ami, runner_ami, use_server
from tests.object_stores import S3Server, s3_server

BUCKET = "gpubake-results"
INSTANCE_PROFILE = "gpubake-job"


@dataclass(frozen=True)
class World:
    server: S3Server
    runner_ami: str  # tagged gpubake-stack=pytorch, gpubake-job-runner=true
    plain_ami: str  # tagged gpubake-stack=tensorflow, without the runner
    snapshot: str


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with s3_server() as server:  # moto.server serves every service on its one port
        ec2 = client(server, "ec2")
        server.make_bucket(BUCKET)
        runner = runner_ami(server)
        plain = make_ami(
            server,
            "gpubake-tensorflow",
            {"gpubake-stack": "tensorflow", "gpubake-job-runner": "false"},
        )
        volume = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=8)["VolumeId"]
        snapshot = ec2.create_snapshot(VolumeId=volume)["SnapshotId"]
        client(server, "iam").create_instance_profile(InstanceProfileName=INSTANCE_PROFILE)
        yield World(server, runner, plain, snapshot)


@pytest.fixture
def aws_env(world: World, monkeypatch, tmp_path) -> World:
    use_server(world.server, monkeypatch, tmp_path)
    return world


def job_options(**overrides: Any) -> JobOptions:
    values: dict[str, Any] = {
        "cloud": "aws",
        "results": f"s3://{BUCKET}/runs",
        "command": ("python", "train.py"),
        "gpu": "t4",
        "region": REGION,
        "max_run_duration": 3600,
    }
    values.update(overrides)
    return JobOptions(**values)


def make_aws(world: World, options: JobOptions, **kwargs: Any) -> Aws:
    return Aws(options, endpoint_url=world.server.endpoint, **kwargs)


def describe(world: World, instance_id: str) -> dict[str, Any]:
    reply = client(world.server, "ec2").describe_instances(InstanceIds=[instance_id])
    return reply["Reservations"][0]["Instances"][0]


def tags_of(item: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in item.get("Tags", [])}


def user_data(world: World, instance_id: str) -> str:
    reply = client(world.server, "ec2").describe_instance_attribute(
        InstanceId=instance_id, Attribute="userData"
    )
    return base64.b64decode(reply["UserData"]["Value"]).decode()


def footprint(world: World) -> tuple[int, int, int]:
    """Instances (any state), volumes and objects in the results bucket: what a refused
    preflight must leave as it was."""
    ec2 = client(world.server, "ec2")
    instances = sum(len(r["Instances"]) for r in ec2.describe_instances()["Reservations"])
    volumes = len(ec2.describe_volumes()["Volumes"])
    objects = client(world.server, "s3").list_objects_v2(Bucket=BUCKET).get("KeyCount", 0)
    return instances, volumes, objects


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- offline


def test_requests_need_no_cloud(monkeypatch, tmp_path):
    # a closed port, no credentials, a profile that exists nowhere: any cloud call would fail
    for name in (*FOREIGN_ENV, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    options = job_options(
        profile="nowhere",
        command=("python", "train.py", "--lr", "{lr}"),
        dataset_disk="snap-0123456789abcdef0",
    )
    jobs = launch.make_jobs(options, launch.parse_params(["lr=1e-3,1e-4"]))
    aws = Aws(options, instance_profile=INSTANCE_PROFILE)

    started = time.monotonic()
    requests = aws.requests(jobs)
    assert time.monotonic() - started < 1

    json.dumps(requests)  # what `job run --dry-run --json` prints
    assert [r["ImageId"] for r in requests] == [IMAGE_PLACEHOLDER.format(stack="pytorch")] * 2
    assert "gpubake-stack=pytorch" in requests[0]["ImageId"]
    for job, request in zip(jobs, requests, strict=True):
        assert request["UserData"] == job.spec_text()
        assert request["InstanceType"] == "g4dn.xlarge"  # t4's build_instance_type
        assert request["InstanceInitiatedShutdownBehavior"] == "terminate"
        assert request["InstanceMarketOptions"]["MarketType"] == "spot"
        assert request["InstanceMarketOptions"]["SpotOptions"] == {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
        }
        assert request["MetadataOptions"]["HttpTokens"] == "required"
        assert request["IamInstanceProfile"] == {"Name": INSTANCE_PROFILE}
        assert request["BlockDeviceMappings"] == [
            {
                "DeviceName": launch.AWS_DATASET_DEVICE,
                "Ebs": {
                    "SnapshotId": "snap-0123456789abcdef0",
                    "DeleteOnTermination": True,
                    "VolumeType": "gp3",
                },
            }
        ]
        for spec in request["TagSpecifications"]:
            tags = {t["Key"]: t["Value"] for t in spec["Tags"]}
            assert tags[JOB_LABEL] == tags["Name"] == job.id
            assert tags[SWEEP_LABEL] == job.sweep
            assert tags[RESULTS_TAG] == job.results
            assert abs(int(tags[DEADLINE_LABEL]) - (time.time() + 3600)) < 60
        assert {s["ResourceType"] for s in request["TagSpecifications"]} == {"instance", "volume"}

    # an explicit AMI, on demand, no instance profile
    plain = Aws(job_options(image="ami-0abc1234", spot=False, profile="nowhere"))
    [request] = plain.requests(launch.make_jobs(plain.options))
    assert request["ImageId"] == "ami-0abc1234"
    assert "InstanceMarketOptions" not in request
    assert "IamInstanceProfile" not in request
    assert "BlockDeviceMappings" not in request
    assert plain.requests(jobs[:1], "ami-0def")[0]["ImageId"] == "ami-0def"


def test_a_machine_type_of_another_gpu_is_refused_offline():
    aws = Aws(job_options(gpu="t4", machine_type="g5.xlarge"))
    with pytest.raises(JobError, match=r"g5\.xlarge carries no t4 GPU.*g4dn"):
        aws.requests(launch.make_jobs(aws.options))


# --------------------------------------------------------------------------- run, sweep


def test_run_starts_one_spot_instance_with_the_spec_as_user_data(aws_env):
    world = aws_env
    options = job_options()
    aws = make_aws(world, options, instance_profile=INSTANCE_PROFILE)
    [job] = launch.make_jobs(options)

    image = aws.preflight([job])
    assert image == world.runner_ami
    before = time.time()
    instance_id = aws.create(job, image)
    after = time.time()

    item = describe(world, instance_id)
    assert item["ImageId"] == world.runner_ami
    assert item["InstanceType"] == "g4dn.xlarge"
    assert item["InstanceLifecycle"] == "spot"
    assert item["MetadataOptions"]["HttpTokens"] == "required"
    assert item["IamInstanceProfile"]["Arn"].endswith(f"instance-profile/{INSTANCE_PROFILE}")
    tags = tags_of(item)
    assert tags["Name"] == tags[JOB_LABEL] == job.id
    assert tags[RESULTS_TAG] == job.results == f"s3://{BUCKET}/runs/{job.id}"
    assert SWEEP_LABEL not in tags
    assert before + 3600 - 1 <= int(tags[DEADLINE_LABEL]) <= after + 3600
    ec2 = client(world.server, "ec2")
    root_volumes = ec2.describe_volumes(
        Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}]
    )["Volumes"]
    assert root_volumes
    assert all(tags_of(v)[JOB_LABEL] == job.id for v in root_volumes)

    spec = user_data(world, instance_id)
    assert spec == job.spec_text()
    assert json.loads(spec)["gpubake_job"] == 1  # what the runner's find_spec looks for
    shutdown = ec2.describe_instance_attribute(
        InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior"
    )
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"

    [listed] = aws.list(job=job.id)
    assert listed.name == instance_id
    assert (listed.job, listed.sweep) == (job.id, None)
    assert listed.machine_type == "g4dn.xlarge"
    assert listed.gpu == "NVIDIA T4"
    assert listed.deadline == float(tags[DEADLINE_LABEL])
    assert listed.hourly_price == pytest.approx(0.00001)  # moto's one spot price
    assert not listed.stopped
    assert abs(listed.created - before) < 120

    aws.stop(listed)
    assert describe(world, instance_id)["State"]["Name"] == "terminated"
    assert aws.list(job=job.id) == []
    aws.stop(listed)  # gone already: nothing to do, no error


def test_a_sweep_starts_one_instance_per_combination_and_gc_deletes_them(aws_env):
    world = aws_env
    options = job_options(
        command=("python", "train.py", "--lr", "{lr}", "--batch-size", "{bs}"),
        spot=False,
        max_run_duration=None,
    )
    aws = make_aws(world, options)
    jobs = launch.make_jobs(options, launch.parse_params(["lr=1e-3,1e-4", "bs=32,64"]))
    assert len(jobs) == 4
    sweep = jobs[0].sweep
    assert sweep

    image = aws.preflight(jobs)
    ids = [aws.create(job, image) for job in jobs]
    assert len(set(ids)) == 4

    specs = [json.loads(user_data(world, i)) for i in ids]
    assert len({json.dumps(s, sort_keys=True) for s in specs}) == 4
    assert {tuple(s["command"][3::2]) for s in specs} == {
        ("1e-3", "32"),
        ("1e-3", "64"),
        ("1e-4", "32"),
        ("1e-4", "64"),
    }
    prefixes = {tags_of(describe(world, i))[RESULTS_TAG] for i in ids}
    assert prefixes == {f"s3://{BUCKET}/runs/{sweep}/{n}" for n in range(4)}
    for instance_id in ids:
        item = describe(world, instance_id)
        assert "InstanceLifecycle" not in item  # on demand
        assert tags_of(item)[SWEEP_LABEL] == sweep
        assert DEADLINE_LABEL not in tags_of(item)

    listed = aws.list(sweep=sweep)
    assert sorted(i.name for i in listed) == sorted(ids)
    assert {i.job for i in listed} == {j.id for j in jobs}
    assert all(i.hourly_price is None and i.deadline is None for i in listed)
    assert set(ids) <= {i.name for i in aws.list()}  # every gpubake job

    gone = dataclasses.replace(listed[0], name="i-0123456789abcdef0")  # gc raced with another
    aws.delete([gone, *listed])
    assert aws.list(sweep=sweep) == []
    assert {describe(world, i)["State"]["Name"] for i in ids} == {"terminated"}
    assert not set(ids) & {i.name for i in aws.list()}


def test_the_dataset_is_a_fresh_volume_from_the_snapshot(aws_env):
    world = aws_env
    options = job_options(dataset_disk=world.snapshot, zone=f"{REGION}b")
    aws = make_aws(world, options)
    [job] = launch.make_jobs(options)
    assert job.spec["dataset"]["device"] == launch.AWS_DATASET_DEVICE

    instance_id = aws.create(job, aws.preflight([job]))
    assert describe(world, instance_id)["Placement"]["AvailabilityZone"] == f"{REGION}b"

    mapping = {m["DeviceName"]: m for m in describe(world, instance_id)["BlockDeviceMappings"]}
    dataset = mapping[launch.AWS_DATASET_DEVICE]["Ebs"]
    assert dataset["DeleteOnTermination"] is True
    [volume] = client(world.server, "ec2").describe_volumes(VolumeIds=[dataset["VolumeId"]])[
        "Volumes"
    ]
    assert volume["SnapshotId"] == world.snapshot
    assert tags_of(volume)[JOB_LABEL] == job.id
    aws.delete(aws.list(job=job.id))
    assert aws.list(job=job.id) == []


def test_a_profile_serves_both_ec2_and_the_results_probe(aws_env, monkeypatch, tmp_path):
    world = aws_env
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(
        "[ml]\naws_access_key_id = testing\naws_secret_access_key = testing\n", encoding="utf-8"
    )
    _no_credentials(monkeypatch)  # only the profile has them
    options = job_options(profile="ml", region=None)
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    (tmp_path / "aws-config").write_text(f"[profile ml]\nregion = {REGION}\n", encoding="utf-8")
    aws = make_aws(world, options)

    assert aws.preflight(launch.make_jobs(options)) == world.runner_ami
    assert aws.region == REGION  # from the profile
    assert "AWS_PROFILE" not in os.environ  # the probe's profile was only lent


def test_without_a_region_it_says_so(aws_env, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    aws = make_aws(aws_env, job_options(region=None))
    with pytest.raises(JobError, match=r"^--region is required"):
        aws.preflight(launch.make_jobs(aws.options))


# --------------------------------------------------------------------------- refusals


def _no_credentials(monkeypatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")


def _unreachable(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")


REFUSALS = {
    "no AMI of the stack": ({"stack": "jax"}, None, r"no AMI of stack jax in us-east-1.*build"),
    "no such AMI": (
        {"image": "ami-0123456789abcdef0"},
        None,
        r"--image ami-0123456789abcdef0: no such AMI",
    ),
    "AMI without the runner": (
        {"stack": "tensorflow"},
        None,
        r"has no job runner.*--var job_runner=true",
    ),
    "explicit AMI without the runner": (
        {"image": "PLAIN"},
        None,
        r"has no job runner.*--stack tensorflow --var job_runner=true",  # the AMI's own stack
    ),
    "instance type not offered": (
        {"gpu": "h200"},  # p5e.48xlarge: not offered in us-east-1 (moto's offerings)
        None,
        r"instance type p5e\.48xlarge is not offered in us-east-1",
    ),
    "no such instance type": (
        {"machine_type": "g4dn.enormous"},
        None,
        r"g4dn\.enormous is not offered",
    ),
    "instance type not offered in the zone": (
        {"zone": "us-east-1z"},
        None,
        r"g4dn\.xlarge is not offered in us-east-1z",
    ),
    "too few GPUs": (
        {"gpu_count": 4, "machine_type": "g4dn.xlarge"},
        None,
        r"g4dn\.xlarge has 1 GPU\(s\), fewer than",
    ),
    "no such snapshot": (
        {"dataset_disk": "snap-0123456789abcdef0"},
        None,
        r"--dataset-disk snap-0123456789abcdef0: no such snapshot",
    ),
    "results bucket missing": (
        {"results": "s3://no-such-bucket/runs"},
        None,
        r"s3://no-such-bucket/runs is not writable",
    ),
    "no such profile": ({"profile": "nowhere"}, None, r"--profile nowhere: no such profile"),
    "no credentials": ({}, _no_credentials, r"no AWS credentials.*AWS_ACCESS_KEY_ID"),
    "endpoint unreachable": ({}, _unreachable, r"Could not connect to the endpoint URL"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_preflight_refuses_in_one_line_and_creates_nothing(aws_env, monkeypatch, case):
    world = aws_env
    overrides, setup, expected = REFUSALS[case]
    if overrides.get("image") == "PLAIN":
        overrides = {**overrides, "image": world.plain_ami}
    options = job_options(**overrides)
    aws = make_aws(world, options)
    jobs = launch.make_jobs(options)
    before = footprint(world)
    if setup:
        setup(monkeypatch)
        if setup is _unreachable:
            aws = Aws(options)  # the endpoint from the environment only

    with pytest.raises(JobError) as refused:
        aws.preflight(jobs)

    message = str(refused.value)
    assert "\n" not in message
    assert "Traceback" not in message
    assert re.search(expected, message), message
    assert footprint(world) == before


def test_a_missing_instance_profile_is_refused(aws_env):
    world = aws_env
    options = job_options()
    aws = make_aws(world, options, instance_profile="no-such-profile")
    before = footprint(world)
    with pytest.raises(JobError, match=r"^--instance-profile no-such-profile: no such instance"):
        aws.preflight(launch.make_jobs(options))
    assert footprint(world) == before


# ---------------------------------------------------------------------- the command line


def _gpubake(*args: str, tmp_path) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "gpubake", "job", *args],
        capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")},
    )  # fmt: skip


def test_sweep_status_stop_and_gc_from_the_command_line(aws_env, tmp_path):
    """`gpubake job sweep` starts 4 instances in moto's EC2; `job status` reads them, `job stop`
    ends one, `job gc` deletes those past their deadline (--dry-run first: nothing goes)."""
    ec2 = client(aws_env.server, "ec2")
    common = ("--cloud", "aws", "--region", REGION, "--instance-profile", INSTANCE_PROFILE)
    swept = _gpubake(
        "sweep", *common, "--results", f"s3://{BUCKET}/cli", "--max-run-duration", "2s",
        "--param", "lr=1e-3,1e-4", "--param", "bs=32,64",
        "--", "python", "train.py", "--lr", "{lr}", "--batch-size", "{bs}",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert swept.returncode == 0, swept.stderr
    sweep = swept.stdout.strip()
    assert swept.stderr.count("started job") == 4
    mine = ec2.describe_instances(Filters=[{"Name": f"tag:{SWEEP_LABEL}", "Values": [sweep]}])
    instances = [i for r in mine["Reservations"] for i in r["Instances"]]
    assert len(instances) == 4
    specs = [
        json.loads(
            base64.b64decode(
                ec2.describe_instance_attribute(InstanceId=i["InstanceId"], Attribute="userData")[
                    "UserData"
                ]["Value"]
            )
        )
        for i in instances
    ]
    assert len({s["results"] for s in specs}) == 4
    assert sorted(tuple(s["command"][3::2]) for s in specs) == [
        ("1e-3", "32"), ("1e-3", "64"), ("1e-4", "32"), ("1e-4", "64"),
    ]  # fmt: skip

    status = _gpubake("status", "--sweep", sweep, "--json", tmp_path=tmp_path)
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    assert len(rows) == 4 and {r["vm"] for r in rows} <= {"pending", "running"}
    assert all(r["outcome"] == "running" and r["cost"].startswith("$") for r in rows)
    table = _gpubake("status", "--sweep", sweep, tmp_path=tmp_path).stdout
    assert table.splitlines()[0].split() == ["JOB", "VM", "OUTCOME", "GPU", "RUNTIME", "COST"]

    first = rows[0]["job"]
    stopped = _gpubake("stop", first, tmp_path=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    gone = _gpubake("status", first, "--json", tmp_path=tmp_path)
    assert json.loads(gone.stdout)[0]["vm"] == "gone"

    time.sleep(2.5)  # past the 2 s deadline
    where = ("--cloud", "aws", "--region", REGION)
    dry = _gpubake("gc", *where, "--dry-run", "--json", tmp_path=tmp_path)
    assert dry.returncode == 0, dry.stderr
    listed = {i["job"] for i in json.loads(dry.stdout)}
    assert {r["job"] for r in rows[1:]} <= listed and first not in listed
    assert len(_gpubake("status", "--sweep", sweep, "--json", tmp_path=tmp_path).stdout) > 0
    still = json.loads(_gpubake("status", "--sweep", sweep, "--json", tmp_path=tmp_path).stdout)
    assert sum(r["vm"] != "gone" for r in still) == 3  # --dry-run deleted nothing
    done = _gpubake("gc", *where, tmp_path=tmp_path)
    assert done.returncode == 0 and done.stderr.count("deleting ") >= 3, done.stderr
    after = json.loads(_gpubake("status", "--sweep", sweep, "--json", tmp_path=tmp_path).stdout)
    assert {r["vm"] for r in after} == {"gone"}
