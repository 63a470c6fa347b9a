"""Checks for the cloud targets that run before anything starts, and the lookup of an
image already published with the same input hash (through the cloud's own CLI)."""

from __future__ import annotations

import configparser
import dataclasses
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from gpubake import GpubakeError, targets
from gpubake.plan import BuildPlan, CloudOptions, required_disk_gb
from gpubake.stacks import Stack

INSTALL_HINT = {
    "gcloud": "install the Google Cloud CLI (it looks up images already built)",
    "aws": "install the AWS CLI v2 (it looks up AMIs already built)",
}


class CloudError(GpubakeError):
    """A cloud option, tool or credential is missing or wrong."""


def _first(options: list[tuple[str, str | None]]) -> tuple[str, str | None]:
    """The first value given, and where it came from (an option or an environment variable)."""
    for source, value in options:
        if value is not None:
            return source, value
    return options[0][0], None


def settle_options(target: str, options: CloudOptions, env: Mapping[str, str]) -> CloudOptions:
    """Fill project/zone/region from the environment the cloud CLIs use; reject what is missing
    or malformed (one line naming the option or variable it came from)."""
    cloud = targets.cloud_of(target)
    if cloud == "gcp":
        where, project = _first(
            [
                ("--project", options.project),
                ("GOOGLE_CLOUD_PROJECT", env.get("GOOGLE_CLOUD_PROJECT") or None),
                ("CLOUDSDK_CORE_PROJECT", env.get("CLOUDSDK_CORE_PROJECT") or None),
            ]
        )
        zone_where, zone = _first(
            [
                ("--zone", options.zone),
                ("CLOUDSDK_COMPUTE_ZONE", env.get("CLOUDSDK_COMPUTE_ZONE") or None),
            ]
        )
        if not project:
            raise CloudError(f"--project is required for {target} (or set GOOGLE_CLOUD_PROJECT)")
        if not zone:
            raise CloudError(
                f"--zone is required for {target}: a zone that offers the GPU, e.g. "
                "us-central1-a (or set CLOUDSDK_COMPUTE_ZONE)"
            )
        targets.check_gcp_project(project, where)
        targets.check_gcp_zone(zone, zone_where)
        return dataclasses.replace(options, project=project, zone=zone)
    if cloud == "aws":
        where, region = _first(
            [
                ("--region", options.region),
                ("AWS_REGION", env.get("AWS_REGION") or None),
                ("AWS_DEFAULT_REGION", env.get("AWS_DEFAULT_REGION") or None),
            ]
        )
        if not region:
            raise CloudError(f"--region is required for {target} (or set AWS_REGION)")
        targets.check_aws_region(region, where)
        profile = options.profile or env.get("AWS_PROFILE")
        return dataclasses.replace(options, region=region, profile=profile)
    return options


def check_disk(stack: Stack, disk_size_gb: int | None) -> None:
    need = required_disk_gb(stack)
    if disk_size_gb is not None and disk_size_gb < need:
        raise CloudError(
            f"--disk-size {disk_size_gb} GB is too small for stack '{stack.name}': it needs at "
            f"least {need} GB (OS, driver, CUDA toolkit and a {stack.env_size_gib} GiB "
            f"environment): use --disk-size {need} or more"
        )


def check_cli(target: str) -> str:
    name = targets.get(target).lookup_cli
    assert name is not None, f"{target} looks up no images"
    path = shutil.which(name)
    if not path:
        raise CloudError(f"{name} not found on PATH: {INSTALL_HINT[name]}")
    return path


def check_credentials(target: str, options: CloudOptions, env: Mapping[str, str]) -> str:
    """Say where Packer's credentials will come from, or why there are none."""
    home = Path(env.get("HOME", str(Path.home())))
    if targets.cloud_of(target) == "gcp":
        key = env.get("GOOGLE_APPLICATION_CREDENTIALS")
        if key:
            if not Path(key).is_file():
                raise CloudError(f"GOOGLE_APPLICATION_CREDENTIALS={key}: no such file")
            return f"service-account key {key}"
        config = Path(env.get("CLOUDSDK_CONFIG", str(home / ".config" / "gcloud")))
        adc = config / "application_default_credentials.json"
        if adc.is_file():
            return f"application default credentials {adc}"
        raise CloudError(
            "no GCP credentials for Packer: run `gcloud auth application-default login` or set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file"
        )
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return "AWS_ACCESS_KEY_ID from the environment"
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return "web identity token"
    profile = options.profile or "default"
    for name, section in (
        (env.get("AWS_SHARED_CREDENTIALS_FILE", str(home / ".aws" / "credentials")), profile),
        (
            env.get("AWS_CONFIG_FILE", str(home / ".aws" / "config")),
            profile if profile == "default" else f"profile {profile}",
        ),
    ):
        parser = configparser.ConfigParser()
        if parser.read(name) and parser.has_section(section):
            keys = dict(parser.items(section))
            if (
                keys.get("aws_access_key_id")
                or keys.get("sso_session")
                or keys.get("sso_start_url")
                or keys.get("credential_process")
                or keys.get("role_arn")
            ):
                return f"profile {profile} ({name})"
    raise CloudError(
        f"no AWS credentials for profile '{profile}': set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, or pass --profile with a profile from ~/.aws/credentials"
    )


def lookup_command(plan: BuildPlan, options: CloudOptions, cli: str) -> list[str]:
    """The cloud CLI command that lists images built from the same inputs."""
    if targets.cloud_of(plan.target) == "gcp":
        return [
            cli,
            "compute",
            "images",
            "list",
            f"--project={options.project}",
            f"--filter=labels.gpubake-input-hash={plan.input_hash[:40]}",
            "--format=value(name)",
        ]
    cmd = [
        cli,
        "ec2",
        "describe-images",
        "--owners",
        "self",
        "--region",
        str(options.region),
        "--filters",
        f"Name=tag:gpubake-input-hash,Values={plan.input_hash}",
        "--query",
        "Images[].ImageId",
        "--output",
        "text",
    ]
    if options.profile:
        cmd += ["--profile", options.profile]
    return cmd


def find_existing(plan: BuildPlan, options: CloudOptions, cli: str) -> str | None:
    cmd = lookup_command(plan, options, cli)
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, check=False, env=dict(os.environ)
        )
    except subprocess.TimeoutExpired:
        raise CloudError(f"{cmd[0]} did not answer in 120 s while looking up images") from None
    if out.returncode != 0:
        last = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CloudError(f"looking up existing images with {Path(cmd[0]).name} failed: {last[0]}")
    names = out.stdout.split()
    return names[0] if names else None
