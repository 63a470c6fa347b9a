"""`gpubake job run|sweep|status|emit|gc`: bad input stops in one line before any cloud call."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CLOUD_ENV = (
    "GOOGLE_CLOUD_PROJECT",
    "CLOUDSDK_CORE_PROJECT",
    "CLOUDSDK_COMPUTE_ZONE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


def job(*args: str, tmp_path, env: dict[str, str] | None = None):
    clean = {k: v for k, v in os.environ.items() if k not in CLOUD_ENV}
    return subprocess.run(
        [sys.executable, "-m", "gpubake", "job", *args],
        capture_output=True, text=True, timeout=120, check=False,
        env={**clean, "XDG_STATE_HOME": str(tmp_path / "state"), **(env or {})},
    )  # fmt: skip


AWS = ("--cloud", "aws", "--region", "us-east-1", "--results", "s3://my-bucket/runs")
GCP = ("--cloud", "gcp", "--project", "my-proj", "--zone", "us-central1-a")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("run", "--results", "s3://my-bucket/r", "--", "x"), "Missing option '--cloud'"),
        (("run", *AWS), "Missing argument 'COMMAND...'"),
        (("run", "--cloud", "aws", "--results", "s3://my-bucket/r", "--", "x"), "--region"),
        (("run", *GCP, "--results", "gs://my-bucket/r", "--zone", "nowhere", "--", "x"), "zone"),
        (("run", *AWS, "--gpu", "z80", "--", "x"), "--gpu 'z80' is unknown"),
        (("run", *AWS, "--max-run-duration", "soon", "--", "x"), "is not a duration"),
        (("run", *AWS, "--env", "NOEQUALS", "--", "x"), "--env 'NOEQUALS' is not KEY=VALUE"),
        (("run", *AWS, "--", "x"), "--instance-profile is required on AWS"),
        (("sweep", *AWS, "--", "x"), "needs at least one --param"),
        (("sweep", *AWS, "--param", "lr=1", "--", "x", "{bs}"), "no --param bs"),
        (("status",), "no jobs were launched from this machine yet"),
        (("status", "job-x"), "no job 'job-x' was launched from this machine"),
        (("stop", "job-x"), "no job 'job-x' was launched from this machine"),
        (("emit", "batch", *AWS, "--", "x"), "use --cloud gcp"),
        (("gc", "--cloud", "gcp", "--project", "my-proj"), "--zone is required"),
    ],
)
def test_bad_job_input_is_one_line(args, message, tmp_path):
    proc = job(*args, tmp_path=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_the_region_of_the_aws_profile_is_used(tmp_path):
    config = tmp_path / "aws-config"
    config.write_text("[profile ml]\nregion = eu-west-1\n")
    env = {"AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(config)}
    proc = job(
        "run", "--cloud", "aws", "--profile", "ml", "--results", "s3://my-bucket/r",
        "--image", "ami-0123456789abcdef0", "--dry-run", "--json", "--", "x",
        tmp_path=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    import json

    planned = json.loads(proc.stdout)
    assert planned["location"] == "eu-west-1"
    assert planned["jobs"][0]["request"]["ImageId"] == "ami-0123456789abcdef0"
