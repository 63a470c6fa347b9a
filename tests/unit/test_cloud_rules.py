"""What each cloud's API documents as invalid, refused before a request is printed: a value
that breaks each rule is one line from the command a user types (`job run --dry-run`,
`job emit`, `build --dry-run`, `render`), and a value at the rule's edge is accepted.

The rules are gpubake.clouds.gcp's and gpubake.clouds.aws's (each with its documentation's
address beside it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpubake.clouds import CloudError
from gpubake.clouds import aws as aws_rules
from gpubake.clouds import gcp as gcp_rules
from tests.unit.test_cli import assert_one_line_error

ROOT = Path(__file__).resolve().parents[2]
GCP_RUN = (
    "job", "run", "--cloud", "gcp", "--project", "demo-proj", "--zone", "us-central1-a",
    "--results", "gs://my-bucket/runs", "--dry-run",
)  # fmt: skip
AWS_RUN = (
    "job", "run", "--cloud", "aws", "--region", "us-east-1", "--results", "s3://my-bucket/runs",
    "--dry-run",
)  # fmt: skip
GCP_EMIT = (
    "job", "emit", "--cloud", "gcp", "--project", "demo-proj", "--zone", "us-central1-a",
    "--results", "gs://my-bucket/runs",
)  # fmt: skip
COMMAND = ("--", "python", "train.py")


def gpubake(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GOOGLE_", "CLOUDSDK"))}
    return subprocess.run(
        [sys.executable, "-m", "gpubake", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, check=False,
    )  # fmt: skip


GCP_REFUSED = [
    ((*GCP_RUN, "--dataset-disk", "Bad_Disk", *COMMAND), "--dataset-disk 'Bad_Disk': GCP names"),
    ((*GCP_RUN, "--dataset-disk", "d" * 64, *COMMAND), "GCP names are 1-63 characters"),
    ((*GCP_RUN, "--image", "Bad_Image", *COMMAND), "--image 'Bad_Image': GCP names"),
    ((*GCP_RUN, "--image", "projects/p/global/x/y", *COMMAND), "give an image name, family/"),
    ((*GCP_RUN, "--machine-type", "n1-standard-bogus", *COMMAND), "is no Compute Engine machine"),
    ((*GCP_RUN, "--gpu", "t4", "--gpu-count", "3", *COMMAND), "a VM takes 1, 2, 4 nvidia-tesla-t4"),
    ((*GCP_RUN, "--gpu", "v100", "--gpu-count", "16", *COMMAND), "takes 1, 2, 4, 8 nvidia-tesla-v"),
    ((*GCP_RUN, "--machine-type", "e2-standard-8", *COMMAND), "attach to N1 machine types only"),
    ((*GCP_RUN, "--service-account", "a b", *COMMAND), "--service-account 'a b' is no service"),
    ((*GCP_RUN, "--max-run-duration", "29s", *COMMAND), "Compute Engine takes 30 s to 120 days"),
    ((*GCP_RUN, "--max-run-duration", "121d", *COMMAND), "Compute Engine takes 30 s to 120 days"),
    ((*GCP_RUN[:-3], "--results", "s3://b-1/r", "--dry-run", *COMMAND), "write to Cloud Storage"),
    ((*GCP_EMIT, "batch", "--gpu", "t4", "--gpu-count", "3", *COMMAND), "a VM takes 1, 2, 4"),
    ((*GCP_EMIT, "batch", "--service-account", "x", *COMMAND), "'x' is no service account"),
    (
        (
            "build",
            "--target",
            "gcp-image",
            "--project",
            "Bad",
            "--zone",
            "us-central1-a",
            "--dry-run",
        ),
        "--project 'Bad' is not a GCP project id",
    ),
    (
        ("render", "--target", "gcp-image", "--zone", "us-central1", "--out", "/nonexistent/r"),
        "--zone 'us-central1' is not a GCP zone",
    ),
    (
        (
            "build",
            "--target",
            "gcp-image",
            "--project",
            "demo-proj",
            "--zone",
            "us-central1-a",
            "--disk-size",
            "65537",
            "--dry-run",
        ),
        "a balanced persistent disk is 10 to 65536 GB",
    ),
]
AWS_REFUSED = [
    ((*AWS_RUN, "--image", "ami-xyz", *COMMAND), "--image 'ami-xyz' is not an AMI id"),
    ((*AWS_RUN, "--image", "ami-123456789", *COMMAND), "(ami- and 8 or 17 hex digits)"),
    ((*AWS_RUN, "--dataset-disk", "vol-12345678", *COMMAND), "is an EBS snapshot id"),
    ((*AWS_RUN, "--instance-profile", "bad profile", *COMMAND), "instance profile name is 1-128"),
    ((*AWS_RUN, "--instance-profile", "p" * 129, *COMMAND), "instance profile name is 1-128"),
    ((*AWS_RUN, "--zone", "us-west-2a", *COMMAND), "not an Availability Zone of region us-east"),
    ((*AWS_RUN, "--gpu-count", "4", *COMMAND), "on EC2 the instance type decides the number"),
    ((*AWS_RUN[:-3], "--results", "gs://b-1/r", "--dry-run", *COMMAND), "AWS jobs write to S3"),
    (("build", "--target", "aws-ami", "--region", "useast1", "--dry-run"), "is not an AWS region"),
    (
        (
            "build",
            "--target",
            "aws-ami",
            "--region",
            "us-east-1",
            "--disk-size",
            "16385",
            "--dry-run",
        ),
        "an EBS gp3 volume is 1 to 16384 GiB",
    ),
]


@pytest.mark.parametrize(
    ("args", "needle"), GCP_REFUSED + AWS_REFUSED, ids=[n for _, n in GCP_REFUSED + AWS_REFUSED]
)
def test_a_value_the_cloud_refuses_is_one_line(args, needle):
    assert_one_line_error(gpubake(*args), needle)


def _accepted(check, *args) -> None:
    check(*args)  # no CloudError


def _refused(check, *args) -> None:
    with pytest.raises(CloudError):
        check(*args)


@pytest.mark.parametrize(
    ("check", "edge", "beyond"),
    [
        (gcp_rules.check_resource_name, ("a" * 62 + "b", "--x"), ("a" * 63 + "b", "--x")),
        (gcp_rules.check_resource_name, ("a", "--x"), ("a-", "--x")),
        (gcp_rules.check_image, ("projects/p-1/global/images/family/f",), ("family/F",)),
        (gcp_rules.check_machine_type, ("custom-8-30720-ext",), ("custom-8",)),
        (gcp_rules.check_machine_type, ("a3-highgpu-8g",), ("a3-highgpu",)),
        (
            gcp_rules.check_gpus,
            ("nvidia-tesla-v100", 8, "n1-standard-96", False),
            ("nvidia-tesla-v100", 16, "n1-standard-96", False),
        ),
        (
            gcp_rules.check_gpus,
            ("nvidia-tesla-t4", 4, "custom-8-30720", False),
            ("nvidia-tesla-t4", 4, "f1-micro", False),
        ),
        (gcp_rules.check_service_account, ("default",), ("defaults",)),
        (gcp_rules.check_service_account, ("sa-1@p-1.iam.gserviceaccount.com",), ("sa-1@p",)),
        (gcp_rules.check_max_run_duration, (30,), (29,)),
        (gcp_rules.check_max_run_duration, (120 * 86400,), (120 * 86400 + 1,)),
        (gcp_rules.check_disk_size, (10,), (9,)),
        (gcp_rules.check_disk_size, (65536,), (65537,)),
        (gcp_rules.check_project, ("abcdef",), ("abcde",)),
        (gcp_rules.check_project, ("a" * 29 + "b",), ("a" * 30 + "b",)),
        (gcp_rules.check_zone, ("europe-west4-c",), ("europe-west4",)),
        (gcp_rules.check_results, ("gs://b-1/r",), ("s3://b-1/r",)),
        (aws_rules.check_ami, ("ami-12345678",), ("ami-1234567",)),
        (aws_rules.check_ami, ("ami-0123456789abcdef0",), ("ami-0123456789ABCDEF0",)),
        (aws_rules.check_snapshot, ("snap-0123456789abcdef0",), ("snap-0123",)),
        (aws_rules.check_instance_profile, ("p" * 128,), ("p" * 129,)),
        (aws_rules.check_instance_profile, ("a+=,.@_-b",), ("a/b",)),
        (aws_rules.check_zone, ("us-east-1-bos-1a", "us-east-1"), ("us-east-1", "us-east-1")),
        (aws_rules.check_zone, ("us-east-1f", "us-east-1"), ("us-east-11a", "us-east-1")),
        (aws_rules.check_gpu_count, (4, "g4dn.12xlarge"), (4, None)),
        (aws_rules.check_region, ("us-gov-west-1",), ("us-east",)),
        (aws_rules.check_disk_size, (16384,), (16385,)),
        (aws_rules.check_results, ("s3://b-1/r",), ("gs://b-1/r",)),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_each_rule_takes_its_edge_and_refuses_past_it(check, edge, beyond):
    _accepted(check, *edge)
    _refused(check, *beyond)


def test_values_at_the_edges_pass_the_command_line():
    ok = gpubake(
        *GCP_RUN, "--gpu", "v100", "--gpu-count", "8", "--max-run-duration", "120d",
        "--service-account", "sa-1@demo-proj.iam.gserviceaccount.com",
        "--image", "projects/demo-proj/global/images/family/gpubake-pytorch",
        "--dataset-disk", "d" * 63, *COMMAND,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    ok = gpubake(
        *AWS_RUN, "--image", "ami-0123456789abcdef0", "--dataset-disk", "snap-12345678",
        "--instance-profile", "p" * 128, "--zone", "us-east-1-bos-1a", "--gpu-count", "4",
        "--machine-type", "g4dn.12xlarge", *COMMAND,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
