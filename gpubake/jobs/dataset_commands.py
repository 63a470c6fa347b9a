"""`gpubake dataset create|list|delete`: the click commands (registered on the `dataset`
group by gpubake.cli) and the flow of `create` (gpubake.jobs.datasets holds the clouds)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import click

from gpubake import GpubakeError
from gpubake.clouds.gcp import check_resource_name
from gpubake.jobs import launch
from gpubake.jobs.commands import settle, upload_code
from gpubake.jobs.datasets import (
    AWS_MACHINE,
    GCP_MACHINE,
    DatasetAws,
    DatasetGcp,
    DatasetOptions,
    check,
    copy_job,
)
from gpubake.jobs.launch import JobError, Record


def _echo(message: str) -> None:
    click.echo(f"gpubake: {message}", err=True)


def _client(options: DatasetOptions) -> DatasetGcp | DatasetAws:
    settled = settle(options.job_options(), os.environ, "a dataset")
    options = dataclasses.replace(
        options,
        project=settled.project,
        zone=settled.zone,
        region=settled.region,
        profile=settled.profile,
    )
    if options.cloud == "gcp":
        return DatasetGcp(options)
    if options.profile:
        os.environ["AWS_PROFILE"] = options.profile
    return DatasetAws(options)


def create(options: DatasetOptions, *, dry_run: bool, as_json: bool) -> None:
    size = check(options)
    client = _client(options)
    options = client.options
    job = copy_job(options)
    if dry_run:
        out = {
            "cloud": options.cloud,
            "size_gb": size,
            "spec": job.spec,
            "request": client.request(job, size),
        }
        click.echo(json.dumps(out, indent=2, sort_keys=True))
        return
    _echo(f"checking the image, machine type and results location for dataset {options.name}")
    image = client.preflight()
    upload_code(options.job_options(), [job], _echo)
    request = client.request(job, size, image)
    Record(
        id=job.id,
        cloud=options.cloud,
        results=job.results,
        instance=job.id,
        location=client.cloud.options.location(),
        profile=options.profile,
        machine_type=client.machine_type,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    ).save()
    made = client.run(job, request, _echo)
    use = f"gpubake job run ... --dataset-disk {made}"
    if as_json:
        click.echo(
            json.dumps(
                {"name": options.name, "dataset": made, "size_gb": size, "job": job.id, "use": use}
            )
        )
    else:
        click.echo(made)
        _echo(f"dataset {options.name} is ready ({size} GB): {use}")


def _location_options(func):  # type: ignore[no-untyped-def]
    for opt in (
        click.option("--profile", metavar="NAME", help="AWS: credentials profile."),
        click.option("--region", metavar="REGION", help="AWS: region (or AWS_REGION)."),
        click.option("--zone", metavar="ZONE", help="GCP: zone (or CLOUDSDK_COMPUTE_ZONE)."),
        click.option("--project", metavar="ID", help="GCP: project (or GOOGLE_CLOUD_PROJECT)."),
        click.option("--cloud", type=click.Choice(launch.CLOUDS), required=True),
    ):
        func = opt(func)
    return func


def _bare(name: str, kw: dict[str, Any]) -> DatasetOptions:
    """Options enough to find (list, delete) datasets."""
    return DatasetOptions(
        name=name,
        cloud=kw["cloud"],
        source=".",
        results="",
        project=kw["project"],
        zone=kw["zone"],
        region=kw["region"],
        profile=kw["profile"],
    )


def register(group: click.Group) -> None:
    """Add the commands of `gpubake dataset`."""

    @group.command(name="create")
    @click.argument("name")
    @click.option(
        "--from",
        "source",
        required=True,
        metavar="DIR|gs://...|s3://...",
        help="The data: a local folder (uploaded under --results), or a bucket folder.",
    )
    @click.option(
        "--results",
        required=True,
        metavar="URL",
        help="gs://BUCKET/PREFIX or s3://...: the copy job's logs (and a folder's upload).",
    )
    @click.option(
        "--size",
        "size_gb",
        type=click.IntRange(10, 65536),
        metavar="GB",
        help="The disk's size (default: a local folder's size and a fifth more).",
    )
    @click.option(
        "--machine-type",
        metavar="TYPE",
        help=f"The copy VM (default GCP {GCP_MACHINE}, AWS {AWS_MACHINE}).",
    )
    @click.option(
        "--stack",
        default=launch.DEFAULT_STACK,
        show_default=True,
        help="The gpubake image the copy VM boots.",
    )
    @click.option("--image", help="GCP: image or family; AWS: AMI id.")
    @click.option(
        "--instance-profile",
        metavar="NAME",
        help="AWS (required): the role that reads the source and writes the logs.",
    )
    @_location_options
    @click.option("--dry-run", is_flag=True, help="Print the request and spec; no cloud access.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
    def create_cmd(dry_run: bool, as_json: bool, name: str, **kw: Any) -> None:
        """Make dataset NAME: a disk (GCP) or an EBS snapshot (AWS) holding the data, filled
        by a short copy job on a CPU VM from the gpubake image, which is then deleted. Use it
        with `gpubake job run --dataset-disk` (the disk's name / the snapshot's id).

        \b
        Examples:
          gpubake dataset create imagenet --cloud gcp --project my-proj --zone us-central1-a \\
            --from gs://my-bucket/imagenet/ --size 200 --results gs://my-bucket/datasets
          gpubake dataset create pets --cloud aws --region us-east-1 --from ./pets \\
            --results s3://my-bucket/datasets --instance-profile data-copier
        """
        try:
            check_resource_name(name, "the dataset name")
        except GpubakeError as exc:
            raise JobError(str(exc)) from None
        options = DatasetOptions(name=name, **kw)
        create(options, dry_run=dry_run, as_json=as_json)

    @group.command(name="list")
    @_location_options
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
    def list_cmd(as_json: bool, **kw: Any) -> None:
        """The datasets gpubake made in the zone (GCP disks) or region (AWS snapshots)."""
        rows = _client(_bare("", kw)).list()
        if as_json:
            click.echo(json.dumps(rows))
            return
        for row in rows:
            click.echo(f"{row['name']}\t{row['id']}\t{row['size_gb']} GB\t{row['created']}")

    @group.command(name="delete")
    @click.argument("name")
    @_location_options
    def delete_cmd(name: str, **kw: Any) -> None:
        """Delete dataset NAME (the GCP disk / the AWS snapshots tagged with it)."""
        if not _client(_bare(name, kw)).delete():
            raise JobError(f"no dataset {name} there: see `gpubake dataset list`")
        _echo(f"dataset {name} deleted")
