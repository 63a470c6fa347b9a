"""What the tests against moto's server share: a boto3 client of it, this process pointed at
it with nothing of the machine's own AWS set-up, and a gpubake AMI (tagged as `gpubake build
--target aws-ami` tags one) to start instances from."""

from __future__ import annotations

import functools
from typing import Any

from tests.object_stores import S3Server

REGION = "us-east-1"
#: Environment that could steer boto3 away from the test server or its dummy credentials.
FOREIGN_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_EC2",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_STS",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CA_BUNDLE",
)


@functools.cache
def client(server: S3Server, service: str) -> Any:
    """A client of the server with its dummy credentials (cached: botocore reads the EC2
    model, megabytes of JSON, once per session)."""
    import boto3

    return boto3.session.Session(
        aws_access_key_id=server.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=server.env["AWS_SECRET_ACCESS_KEY"],
        region_name=REGION,
    ).client(service, endpoint_url=server.endpoint)


def use_server(server: S3Server, monkeypatch: Any, tmp_path: Any) -> None:
    """boto3 in this process pointed at the server, with its dummy credentials and nothing
    from the machine's own AWS configuration."""
    for name in FOREIGN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name in ("config", "credentials"):
        (tmp_path / f"aws-{name}").write_text("", encoding="utf-8")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no IMDS credentials lookup
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)


def make_ami(server: S3Server, name: str, tags: dict[str, str]) -> str:
    """An AMI of this account with `tags` (made from a stopped instance of moto's own)."""
    ec2 = client(server, "ec2")
    base = ec2.describe_images(
        Owners=["amazon"], Filters=[{"Name": "architecture", "Values": ["x86_64"]}]
    )["Images"][0]["ImageId"]
    builder = ec2.run_instances(ImageId=base, InstanceType="t3.micro", MinCount=1, MaxCount=1)
    builder_id = builder["Instances"][0]["InstanceId"]
    image = ec2.create_image(InstanceId=builder_id, Name=name)["ImageId"]
    ec2.create_tags(Resources=[image], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
    ec2.terminate_instances(InstanceIds=[builder_id])
    return str(image)


def runner_ami(server: S3Server, stack: str = "pytorch") -> str:
    """The AMI `job run` and `notebook up` look for: gpubake-stack=STACK, with the runner."""
    return make_ami(
        server, f"gpubake-{stack}", {"gpubake-stack": stack, "gpubake-job-runner": "true"}
    )
