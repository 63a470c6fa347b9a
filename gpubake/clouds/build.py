"""The checks a cloud build target makes before Packer starts (options, disk size, the
credentials Packer will use) and the lookup of an image already built from the same inputs,
through the cloud's session (gpubake.clouds.gcp / aws: its SDK, no CLI)."""

from __future__ import annotations

from gpubake.build import targets
from gpubake.build.plan import BuildPlan, CloudOptions, required_disk_gb
from gpubake.clouds import CloudError, aws, gcp
from gpubake.clouds.aws import AwsSession
from gpubake.clouds.gcp import GcpSession
from gpubake.stacks import Stack

#: the label (GCP, values up to 63 characters) / tag (AWS) images/*.pkr.hcl set on an image
INPUT_HASH_KEY = "gpubake-input-hash"
GCP_LABEL_CHARS = 40

Session = GcpSession | AwsSession


def check_disk(target: str, stack: Stack, disk_size_gb: int | None) -> None:
    """--disk-size: within what the cloud's disk takes, and large enough for the stack."""
    if disk_size_gb is not None:
        (gcp if targets.cloud_of(target) == "gcp" else aws).check_disk_size(disk_size_gb)
    need = required_disk_gb(stack)
    if disk_size_gb is not None and disk_size_gb < need:
        raise CloudError(
            f"--disk-size {disk_size_gb} GB is too small for stack '{stack.name}': it needs at "
            f"least {need} GB (OS, driver, CUDA toolkit and a {stack.env_size_gib} GiB "
            f"environment): use --disk-size {need} or more"
        )


def session(target: str, options: CloudOptions) -> Session:
    """The session of the target's cloud, for its settled options."""
    if targets.cloud_of(target) == "gcp":
        return GcpSession(str(options.project))
    return AwsSession(options.region, options.profile, purpose=target)


def check_credentials(cloud: Session) -> str:
    """Where Packer's credentials come from (the ones gpubake's own calls use), or why
    there are none: Application Default Credentials on GCP, boto3's chain on AWS."""
    return cloud.check_credentials()


def find_existing(cloud: Session, plan: BuildPlan) -> str | None:
    """An image (GCP image name, AMI id) of this account built from the same inputs."""
    if isinstance(cloud, GcpSession):
        return cloud.find_labelled_image(INPUT_HASH_KEY, plan.input_hash[:GCP_LABEL_CHARS])
    return cloud.find_tagged_image(INPUT_HASH_KEY, plan.input_hash)
