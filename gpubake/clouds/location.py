"""Where a build or a job runs: the project and zone (GCP) or the region and profile (AWS),
from the options or the environment variables the clouds' own tools read, checked for form
before anything is asked of the cloud."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from gpubake.build import targets
from gpubake.build.plan import CloudOptions
from gpubake.clouds import CloudError, aws, gcp


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
        gcp.check_project(project, where)
        gcp.check_zone(zone, zone_where)
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
        aws.check_region(region, where)
        profile = options.profile or env.get("AWS_PROFILE")
        return dataclasses.replace(options, region=region, profile=profile)
    return options
