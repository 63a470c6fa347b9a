"""`gpubake build`, `stacks`, `lock`, `render`, `smoke`, `prune` and `fetch`: the click
commands (registered by gpubake.cli); the work is gpubake.build.flow's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from gpubake import size_text, stacks
from gpubake.build import (
    docker_engine,
    flow,
    hosts,
    locks,
    prune,
    stages,
    targets,
    wheelhouse,
)
from gpubake.options import echo, not_empty, only, ssh_options, stack_options

TARGETS = targets.NAMES


@click.command()
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default=targets.DEFAULT,
    show_default=True,
    help=" ".join(f"{t.name}: {t.help}." for t in targets.REGISTRY.values()),
)
@stack_options
@click.option(
    "--base-image",
    callback=not_empty,
    metavar="REF",
    help=only("base_image") + "local image to start from. Default: the OS's official image, or a "
    "debootstrap-built Debian when no registry can be reached.",
)
@click.option(
    "--ca-bundle",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="PEM CA bundle to trust during the build only (a TLS-inspecting proxy); "
    "no trace of it is left in the image.",
)
@click.option(
    "--tag", default="latest", show_default=True, help=only("base_image") + "tag of the image."
)
@click.option(
    "--project",
    callback=not_empty,
    metavar="ID",
    help=only("project") + "GCP project (or GOOGLE_CLOUD_PROJECT).",
)
@click.option(
    "--zone",
    callback=not_empty,
    metavar="ZONE",
    help=only("zone") + "zone with the GPU, e.g. us-central1-a.",
)
@click.option(
    "--region",
    callback=not_empty,
    metavar="REGION",
    help=only("region") + "AWS region (or AWS_REGION).",
)
@click.option(
    "--profile",
    callback=not_empty,
    metavar="NAME",
    help=only("profile") + "profile from ~/.aws (or AWS_PROFILE).",
)
@click.option(
    "--disk-size",
    type=click.IntRange(min=10),
    metavar="GB",
    help=only("disk_size") + "boot disk; checked against what the stack needs.",
)
@click.option(
    "--no-gpu-build",
    is_flag=True,
    help=only("no_gpu_build") + "build on a cheap CPU machine; the GPU checks do not run (and "
    "gpubake says so).",
)
@ssh_options("ssh: the machine to set up.", "ssh")
@click.option(
    "--check",
    "check_mode",
    is_flag=True,
    help=only("check_mode") + "Ansible check mode: report what is present and what would be added, "
    "change nothing, then run gpu-smoke.",
)
@click.option(
    "--wheelhouse",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help=only("wheelhouse") + "install every Python package from this folder of hash-checked "
    "files (gpubake fetch; what it lacks is fetched, for containers while the first stage "
    "builds), with no package index. Default "
    "with --offline: ~/.cache/gpubake/wheels. VM and host targets install the stack's lock "
    "from the files it needs, uploaded to the machine and removed after the install.",
)
@click.option(
    "--offline",
    is_flag=True,
    help=only("offline") + "build with no network: Python packages from the wheelhouse only "
    "(it must hold them all), the base image and the stages that install OS packages from "
    "the local engine (built before, online).",
)
@click.option(
    "--force", is_flag=True, help="Build even if an image with the same input hash exists."
)
@click.option("--dry-run", is_flag=True, help="Print the resolved plan; start nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as JSON.")
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Show Packer's and Ansible's full output (-vv: Ansible -vv).",
)
def build(
    target: str,
    stack: str | None,
    os_key: str | None,
    gpu: str | None,
    variables: tuple[str, ...],
    base_image: str | None,
    ca_bundle: Path | None,
    tag: str,
    project: str | None,
    zone: str | None,
    region: str | None,
    profile: str | None,
    disk_size: int | None,
    no_gpu_build: bool,
    host: str | None,
    ssh_key: Path | None,
    known_hosts: Path | None,
    check_mode: bool,
    wheelhouse: Path | None,
    offline: bool,
    force: bool,
    dry_run: bool,
    as_json: bool,
    verbose: int,
) -> None:
    """Build an image: resolve the stack, render Packer + Ansible inputs, run Packer.

    Every check that can be done here (stack compatibility, options, tools, credentials,
    disk size, ssh login) runs before anything starts. An identical build (same input
    hash) is skipped unless --force.
    """
    given = dict(locals())
    try:
        targets.check_options(target, given)
    except targets.TargetError as exc:
        raise click.UsageError(str(exc)) from None
    fields = {f.name for f in flow.dataclasses.fields(flow.BuildRequest)}
    flow.build(flow.BuildRequest(**{k: v for k, v in given.items() if k in fields}))


@click.command(name="stacks")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--os", "os_key", metavar="OS", help="Resolve for this OS (default debian-12).")
def stacks_cmd(as_json: bool, os_key: str | None) -> None:
    """List the stacks and what each resolves to."""

    resolved = []
    for name in stacks.stack_names():
        try:
            stack = stacks.resolve(name, os_key=os_key)
            resolved.append({**stack.to_dict(), "stages": stages.chain_text(stack)})
        except stacks.StackError as exc:
            resolved.append({"name": name, "error": str(exc)})
    if as_json:
        click.echo(json.dumps(resolved, indent=2, sort_keys=True))
        return
    default = stacks.stacks_data()["default_stack"]
    for item in resolved:
        mark = " (default)" if item["name"] == default else ""
        if "error" in item:
            click.echo(f"{item['name']}{mark}: not available: {item['error']}")
            continue
        packages = ", ".join(f"{k}=={v}" for k, v in item["packages"].items())
        click.echo(f"{item['name']}{mark}: {item['description']}")
        click.echo(
            f"    {item['python_env']} env, python {item['python']} on {item['os']['key']}, "
            f"CUDA {item['cuda']}, driver branch {item['driver_branch']}+"
            f"{', legacy' if item['legacy'] else ''}"
        )
        click.echo(f"    kernels for {stacks.sm_span(item['kernels'])}")
        click.echo(f"    {packages}")
        if item["parent"]:
            click.echo(f"    from {item['parent']}: built on its image, sharing its layers")
        click.echo(f"    container stages: {item['stages']}")


@click.command(name="lock")
@click.option(
    "--stack",
    "stack_names",
    multiple=True,
    metavar="NAME",
    help="Stack to lock (its parents are locked first); repeatable. Default: every stack.",
)
@click.option(
    "--os", "os_key", callback=not_empty, metavar="OS", help="Lock for this OS. Default: every OS."
)
@click.option(
    "--arch",
    type=click.Choice(["x86_64", "aarch64"]),
    help="Architecture to lock for. Default: this machine's.",
)
@click.option("--upgrade", is_flag=True, help="Resolve anew to the newest versions the pins allow.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def lock_cmd(
    stack_names: tuple[str, ...], os_key: str | None, arch: str | None, upgrade: bool, as_json: bool
) -> None:
    """Write images/locks/<stack>/<os>-<arch>.txt: every Python package a stack installs,
    pinned with hashes (uv pip compile --generate-hashes). A derived stack keeps its parent's
    versions. A lock that is current is left as it is; stack and OS pairs that cannot go
    together are skipped with a note.
    """

    records = locks.lock_stacks(
        stack_names,
        [os_key] if os_key else [],
        arch=arch,
        upgrade=upgrade,
        progress=lambda message: click.echo(message, err=True),
    )
    if as_json:
        click.echo(json.dumps(records, indent=2, sort_keys=True))
    for item in [] if as_json else records:
        if item["status"] in ("skipped", "failed"):
            click.echo(f"{item['status']} {item['stack']} on {item['os']}: {item['note']}")
        else:
            click.echo(f"{item['status']}: {item['path']} ({item['packages']} packages)")
    failed = [item for item in records if item["status"] == "failed"]
    if failed:
        raise locks.LockError(
            f"{len(failed)} lock(s) could not be made; the first: {failed[0]['note']}"
        )


@click.command(name="render")
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default=targets.DEFAULT,
    show_default=True,
    help=f"The target whose Packer files to write: {', '.join(targets.names(packer=True))}.",
)
@stack_options
@click.option(
    "--base-image", callback=not_empty, metavar="REF", help="Base image reference to write."
)
@click.option("--tag", default="latest", show_default=True)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write into.",
)
@click.option(
    "--project", callback=not_empty, metavar="ID", help=only("project") + "GCP project to write."
)
@click.option("--zone", callback=not_empty, metavar="ZONE", help=only("zone") + "zone to write.")
@click.option(
    "--region", callback=not_empty, metavar="REGION", help=only("region") + "region to write."
)
@click.option(
    "--packer-plugins/--no-packer-plugins",
    default=None,
    help="Write required_plugins (Packer >= 1.7). Default: by the installed Packer.",
)
def render_cmd(
    target: str,
    stack: str | None,
    os_key: str | None,
    gpu: str | None,
    variables: tuple[str, ...],
    base_image: str | None,
    tag: str,
    out_dir: Path,
    project: str | None,
    zone: str | None,
    region: str | None,
    packer_plugins: bool | None,
) -> None:
    """Write the target's Packer and Ansible inputs into a folder in which `packer validate .`
    and `packer build .` work with no flags: its Packer files, its variables as
    TARGET.auto.pkrvars.hcl, ansible-vars.json, an ansible.cfg and the collection gpubake.gpu.

    Cloud values not given are written as REPLACE-ME placeholders.
    """
    flow.render_only(
        flow.RenderRequest(
            out_dir=out_dir,
            target=target,
            stack=stack,
            os_key=os_key,
            gpu=gpu,
            variables=variables,
            base_image=base_image,
            tag=tag,
            project=project,
            zone=zone,
            region=region,
            packer_plugins=packer_plugins,
        )
    )


@click.command(name="smoke", context_settings={"ignore_unknown_options": True})
@ssh_options("Run on this host over SSH (python3).", "--host")
@click.argument("smoke_args", nargs=-1, type=click.UNPROCESSED)
def smoke_cmd(
    host: str | None,
    ssh_key: Path | None,
    known_hosts: Path | None,
    smoke_args: tuple[str, ...],
) -> None:
    """Run gpu-smoke here or on --host; other arguments go to gpu-smoke (see its --help)."""

    if not host and (ssh_key or known_hosts):
        raise click.UsageError("--ssh-key and --known-hosts go with --host")
    login = flow.ssh_login(host, ssh_key, known_hosts)
    if login is not None:
        hosts.check_ssh(login)
    sys.exit(hosts.run_smoke(login, list(smoke_args)))


@click.command(name="prune")
@click.option(
    "--keep",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    metavar="N",
    help="Stage images to keep of each stack's stage, and VM disk images of each stack, "
    "newest first, besides those in use.",
)
@click.option(
    "--stack",
    "stack_names",
    multiple=True,
    metavar="NAME",
    help="Only this stack's stage images and VM disk images (repeatable); caches and base "
    "disks are pruned all the same.",
)
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def prune_cmd(keep: int, stack_names: tuple[str, ...], dry_run: bool, as_json: bool) -> None:
    """Remove what old builds left: stage images of inputs that changed (never one that a
    tagged image or a container is built on), the lock files of finished builds, scan
    results of layers no image has, what uv's cache no longer uses, the wheelhouse's
    files no lock names, VM disk images (--target qemu) beyond the --keep newest of each
    stack and base disks of old inputs (never one that a build or a process uses). Says
    what it removed and the bytes freed.
    """
    done = prune.prune(
        docker_engine.client(), keep=keep, dry_run=dry_run, stacks=stack_names, say=echo
    )
    if as_json:
        click.echo(json.dumps(done.to_dict(), indent=2))
        return
    for line in done.kept_in_use:
        echo(f"kept {line}")
    verb = "would free" if dry_run else "freed"
    freed = ", ".join(
        f"{size_text(n)} of {what.replace('_', ' ')}" for what, n in done.freed.items()
    )
    click.echo(
        f"{len(done.images)} stage image(s), {done.lock_files} lock file(s), "
        f"{done.scan_entries} scan result(s), {len(done.wheels)} wheelhouse file(s), "
        f"{len(done.vm_images)} VM disk image(s), {len(done.base_disks)} base disk file(s): "
        f"{verb} {freed}"
    )


@click.command(name="fetch")
@click.option(
    "--stack",
    "stack_names",
    multiple=True,
    metavar="NAME",
    help="Stack whose locks to fetch (its parents' too); repeatable. Default: pytorch.",
)
@click.option(
    "--os", "os_key", callback=not_empty, metavar="OS", help="For this OS (default debian-12)."
)
@click.option(
    "--wheelhouse",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Folder to fetch into. Default: ~/.cache/gpubake/wheels.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def fetch_cmd(
    stack_names: tuple[str, ...], os_key: str | None, folder: Path | None, as_json: bool
) -> None:
    """Download every file the stacks' locks install (and uv), hash-checked, into a
    wheelhouse: `gpubake build --wheelhouse DIR` then installs from it with no index, and
    `gpubake build --offline` needs nothing else from the network for Python packages. The
    folder can be copied to a machine with no network. Files already there are not fetched
    again.
    """
    folder = (folder or wheelhouse.default_dir()).expanduser().resolve()
    arch = stacks.machine_arch()
    records = []
    for name in stack_names or (None,):
        stack = stacks.resolve(name, os_key=os_key)
        found, _notes = flow.container_locks(stack, verify=False)
        count, size = wheelhouse.fetch_for(folder, stack, found.values(), arch, echo)
        records.append({"stack": stack.name, "os": stack.os.key, "fetched": count, "bytes": size})
    total = wheelhouse.folder_bytes(folder)
    if as_json:
        click.echo(json.dumps({"wheelhouse": str(folder), "bytes": total, "stacks": records}))
        return
    for item in records:
        click.echo(
            f"{item['stack']} on {item['os']}: {item['fetched']} file(s) fetched "
            f"({size_text(item['bytes'])})"
        )
    click.echo(f"wheelhouse {folder}: {size_text(total)}")


def register(group: click.Group) -> None:
    for command in (build, stacks_cmd, lock_cmd, render_cmd, smoke_cmd, prune_cmd, fetch_cmd):
        group.add_command(command)
