"""A cloud build's preflight through the cloud's SDK, as `gpubake job` does, no CLI.

`gpubake build --target gcp-image|aws-ami` with credentials as users have them (GCP:
Application Default Credentials from a file; AWS: keys in the environment), the cloud CLIs
on PATH replaced by ones that fail if run, against the Compute API stand-in and moto's EC2:
an image of the account built from the same inputs is found by its label / tag, and the build
is skipped, having asked the cloud only through its SDK.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from gpubake.build.plan import CloudOptions
from gpubake.clouds import build as cloud_build
from gpubake.clouds.aws import AwsSession
from gpubake.clouds.gcp import ENDPOINT_ENV, GcpSession
from gpubake.jobs import aws as job_aws
from gpubake.jobs import gcp as job_gcp
from gpubake.jobs.launch import JobOptions
from tests.compute_standin import ComputeStandin, compute_standin
from tests.object_stores import S3Server, s3_server
from tests.unit.test_cli_cloud import clean_env, fake_cli

ROOT = Path(__file__).resolve().parents[2]
PROJECT, ZONE, REGION = "demo-proj", "us-central1-a", "us-east-1"
#: an authorized_user ADC file, as `gcloud auth application-default login` writes it
ADC = {
    "type": "authorized_user",
    "client_id": "764086051850-test.apps.googleusercontent.com",
    "client_secret": "d-FL95Q19q7MQmFpd7hHD0Ty",
    "refresh_token": "1//0test-refresh-token",
}


def gpubake(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpubake", "build", *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, check=False,
    )  # fmt: skip


def no_cloud_cli(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No cloud settings from this machine; gcloud and aws on PATH fail if anything runs them."""
    fake_cli(tmp_path, "gcloud")
    return clean_env(tmp_path, PATH=fake_cli(tmp_path, "aws"), **extra)


def input_hash(env: dict[str, str], *args: str) -> str:
    proc = gpubake(env, *args, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["input_hash"]


@pytest.fixture(scope="module")
def gce() -> Iterator[ComputeStandin]:
    with compute_standin() as standin:
        yield standin


@pytest.fixture(scope="module")
def moto() -> Iterator[S3Server]:
    with s3_server() as server:  # moto.server serves EC2 and STS on the same port
        yield server


def test_gcp_preflight_finds_the_built_image_with_adc_and_no_cli(gce, tmp_path):
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps(ADC))
    env = no_cloud_cli(tmp_path, GOOGLE_APPLICATION_CREDENTIALS=str(adc), **{ENDPOINT_ENV: gce.url})
    args = ("--target", "gcp-image", "--project", PROJECT, "--zone", ZONE)
    digest = input_hash(env, *args)
    gce.add_image(PROJECT, "gpubake-pytorch-built", labels={"gpubake-input-hash": digest[:40]})
    proc = gpubake(env, *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "gpubake-pytorch-built"
    assert "skipped: gpubake-pytorch-built is already built from identical inputs" in proc.stderr
    assert "must not run" not in proc.stderr
    [listed] = gce.requests("GET", "/global/images")
    assert listed.query["filter"] == f'labels.gpubake-input-hash = "{digest[:40]}"'


def test_aws_preflight_finds_the_built_ami_with_keys_in_the_environment(moto, tmp_path):
    env = no_cloud_cli(tmp_path, **moto.env, AWS_EC2_METADATA_DISABLED="true")
    args = ("--target", "aws-ami", "--region", REGION)
    digest = input_hash(env, *args)
    ec2 = boto3.session.Session(
        aws_access_key_id=moto.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=moto.env["AWS_SECRET_ACCESS_KEY"],
        region_name=REGION,
    ).client("ec2", endpoint_url=moto.endpoint)
    base = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    builder = ec2.run_instances(ImageId=base, InstanceType="t3.micro", MinCount=1, MaxCount=1)
    instance = builder["Instances"][0]["InstanceId"]
    ami = ec2.create_image(InstanceId=instance, Name="gpubake-pytorch-built")["ImageId"]
    ec2.create_tags(Resources=[ami], Tags=[{"Key": "gpubake-input-hash", "Value": digest}])
    proc = gpubake(env, *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ami
    assert "must not run" not in proc.stderr


def test_no_gcp_credentials_is_one_line_without_any_cli(tmp_path):
    proc = gpubake(
        no_cloud_cli(tmp_path), "--target", "gcp-image", "--project", PROJECT, "--zone", ZONE
    )
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no GCP credentials: run `gcloud auth application-default login`" in proc.stderr


def test_the_build_and_jobs_go_through_the_same_sdk_entry_points(gce, moto, monkeypatch):
    """Patch google.auth.default and boto3's Session: both the build's preflight and
    `gpubake job`'s go through them (one module per cloud, gpubake.clouds)."""
    calls: list[str] = []
    real_default = __import__("google.auth", fromlist=["default"]).default

    def default(*args: Any, **kwargs: Any) -> Any:
        calls.append("google.auth.default")
        return real_default(*args, **kwargs)

    class Session(boto3.session.Session):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            calls.append("boto3.Session")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr("google.auth.default", default)
    monkeypatch.setattr("boto3.session.Session", Session)
    for name, value in moto.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv(ENDPOINT_ENV, gce.url)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)

    gcp_build = cloud_build.session("gcp-image", CloudOptions(project=PROJECT, zone=ZONE))
    assert isinstance(gcp_build, GcpSession)
    gcp_build.check_credentials()
    common = {"results": "gs://results-bucket/runs", "command": ("true",)}
    job = job_gcp.Gcp(JobOptions(cloud="gcp", project=PROJECT, zone=ZONE, gpu="t4", **common))
    job.check_credentials()
    assert calls == ["google.auth.default"] * 2

    calls.clear()
    aws_build = cloud_build.session("aws-ami", CloudOptions(region=REGION))
    assert isinstance(aws_build, AwsSession)
    aws_build.check_credentials()
    common["results"] = "s3://results-bucket/runs"
    job_aws.Aws(JobOptions(cloud="aws", region=REGION, **common)).check_credentials()
    assert calls == ["boto3.Session"] * 2
