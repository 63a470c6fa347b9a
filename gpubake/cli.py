"""The gpubake command line: build, stacks, render, smoke.

`python build.py ...` is the same as `gpubake build ...`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from gpubake import GpubakeError, __version__, stacks
from gpubake.plan import (
    ALL_TARGETS,
    BuildPlan,
    CloudOptions,
    check_ca_bundle,
    check_tag,
    make_plan,
    render,
)

TARGETS = ALL_TARGETS
LOG_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpubake" / "logs"


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"gpubake: error: {message}", err=True)
    sys.exit(code)


def _echo(message: str) -> None:
    click.echo(f"gpubake: {message}", err=True)


def _ssh_options(host_help: str, scope: str):  # type: ignore[no-untyped-def]
    """--host, --ssh-key and --known-hosts, for `build --target ssh` and `smoke`."""
    path = click.Path(dir_okay=False, path_type=Path)

    def wrap(func):  # type: ignore[no-untyped-def]
        func = click.option(
            "--known-hosts",
            type=path,
            metavar="FILE",
            help=f"{scope}: known_hosts file to use instead of ~/.ssh/known_hosts (host keys "
            "are accepted on first use and checked after); handy for throwaway VMs.",
        )(func)
        func = click.option(
            "--ssh-key", type=path, metavar="FILE", help=f"{scope}: private key to log in with."
        )(func)
        return click.option("--host", metavar="USER@HOST[:PORT]", help=host_help)(func)

    return wrap


def _stack_options(func):  # type: ignore[no-untyped-def]
    func = click.option(
        "--var",
        "variables",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a stack value: python, cuda, driver_branch, open_kernel_module, "
        "driver_source / cuda_source (nvidia: NVIDIA's CUDA repository, the default; distro: "
        "the OS's own packages) or packages.<name>. Repeatable.",
    )(func)
    func = click.option(
        "--gpu",
        metavar="MODEL",
        help="GPU model the image is for (see images/gpus.yml), e.g. t4, "
        "a100, h100; checked against the stack's CUDA and driver.",
    )(func)
    func = click.option(
        "--os",
        "os_key",
        metavar="OS",
        help="Operating system: debian-12 (default), ubuntu-22.04, ubuntu-24.04.",
    )(func)
    func = click.option(
        "--stack",
        metavar="NAME",
        help="Stack from images/stacks.yml (default: pytorch); `gpubake stacks` lists them.",
    )(func)
    return func


def _resolve(
    stack: str | None, os_key: str | None, gpu: str | None, variables: Sequence[str], target: str
) -> stacks.Stack:
    return stacks.resolve(
        stack, os_key=os_key, gpu=gpu, variables=stacks.parse_vars(list(variables)), target=target
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpubake")
def cli() -> None:
    """gpubake: tested GPU deep-learning images from one set of Ansible roles.

    Every image (Docker container, GCP image, AWS AMI) is built by Packer from the
    same playbooks and passes gpu-smoke before it counts as built.
    """


@cli.command()
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default="docker",
    show_default=True,
    help="docker: a container image in the local Docker Engine. gcp-image / aws-ami: a cloud "
    "image built on a GPU VM. ssh / local: the VM playbook applied to a running machine.",
)
@_stack_options
@click.option(
    "--base-image",
    metavar="REF",
    help="docker: local image to start from. Default: the OS's official image, or a "
    "debootstrap-built Debian when no registry can be reached.",
)
@click.option(
    "--ca-bundle",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="PEM CA bundle to trust during the build only (a TLS-inspecting proxy); "
    "no trace of it is left in the image.",
)
@click.option("--tag", default="latest", show_default=True, help="docker: tag of the image.")
@click.option("--project", metavar="ID", help="gcp-image: GCP project (or GOOGLE_CLOUD_PROJECT).")
@click.option("--zone", metavar="ZONE", help="gcp-image: zone with the GPU, e.g. us-central1-a.")
@click.option("--region", metavar="REGION", help="aws-ami: AWS region (or AWS_REGION).")
@click.option("--profile", metavar="NAME", help="aws-ami: profile from ~/.aws (or AWS_PROFILE).")
@click.option(
    "--disk-size",
    type=click.IntRange(min=10),
    metavar="GB",
    help="gcp-image / aws-ami: boot disk; checked against what the stack needs.",
)
@click.option(
    "--no-gpu-build",
    is_flag=True,
    help="gcp-image / aws-ami: build on a cheap CPU machine; the GPU checks do not run (and "
    "gpubake says so).",
)
@_ssh_options("ssh: the machine to set up.", "ssh")
@click.option(
    "--check",
    "check_mode",
    is_flag=True,
    help="ssh / local: Ansible check mode: report what is present and what would be added, "
    "change nothing, then run gpu-smoke.",
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
    _check_target_options(target, locals())
    if target in ("gcp-image", "aws-ami") and gpu is None and not no_gpu_build:
        gpu = stacks.stacks_data()["default_cloud_gpu"]
    resolved = _resolve(stack, os_key, gpu, variables, target)
    check_tag(tag)
    bundle = check_ca_bundle(ca_bundle)
    args = BuildArgs(resolved, target, tag, bundle, force, dry_run, as_json, verbose)
    if target == "docker":
        _build_docker(args, base_image)
    elif target in ("gcp-image", "aws-ami"):
        cloud = CloudOptions(
            project=project,
            zone=zone,
            region=region,
            profile=profile,
            disk_size_gb=disk_size,
            gpu_build=not no_gpu_build,
        )
        _build_cloud(args, cloud)
    else:
        from gpubake.hosts import SshLogin

        login = SshLogin(host, ssh_key, known_hosts) if host else None
        _apply_host(args, login, check_mode)


#: Options that only some targets take.
_TARGET_OPTIONS = {
    "base_image": ("docker",),
    "project": ("gcp-image",),
    "zone": ("gcp-image",),
    "region": ("aws-ami",),
    "profile": ("aws-ami",),
    "disk_size": ("gcp-image", "aws-ami"),
    "no_gpu_build": ("gcp-image", "aws-ami"),
    "host": ("ssh",),
    "ssh_key": ("ssh",),
    "known_hosts": ("ssh",),
    "check_mode": ("ssh", "local"),
}


def _check_target_options(target: str, given: dict[str, Any]) -> None:
    for name, targets in _TARGET_OPTIONS.items():
        if given.get(name) and target not in targets:
            option = "--" + {"check_mode": "check"}.get(name, name).replace("_", "-")
            raise click.UsageError(f"{option} applies to --target {' or '.join(targets)} only")
    if target == "ssh" and not given.get("host"):
        raise click.UsageError("--target ssh needs --host USER@HOST")


@dataclasses.dataclass(frozen=True)
class BuildArgs:
    stack: stacks.Stack
    target: str
    tag: str
    bundle: Path | None
    force: bool
    dry_run: bool
    as_json: bool
    verbose: int


def _build_docker(args: BuildArgs, base_image: str | None) -> None:
    from gpubake import docker_engine
    from gpubake.packer import Packer

    started = time.monotonic()
    packer = Packer.detect()
    engine = docker_engine.client()
    notes: list[str] = []
    if args.dry_run:
        ref, image_id = _dry_run_base(engine, args.stack.os, base_image, notes)
    else:
        ref, image_id, note = docker_engine.ensure_base_image(
            engine, args.stack.os, base_image, _echo
        )
        if note:
            notes.append(note)
    plan = make_plan(
        args.stack,
        target="docker",
        base_image=ref,
        base_image_id=image_id,
        tag=args.tag,
        ca_bundle=args.bundle,
        verbose=max(args.verbose - 1, 0),
        notes=tuple(notes),
        packer_version=packer.version,
    )
    if args.dry_run:
        _print_plan(plan, packer, args.as_json)
        return

    existing = docker_engine.image_with_hash(
        engine, plan.image_repository, plan.input_hash, plan.image_ref
    )
    if existing is not None and not args.force:
        if plan.image_ref not in existing.tags:
            existing.tag(plan.image_repository, plan.image_tag)
        _echo(
            f"skipped: {plan.image_ref} is already built from identical inputs "
            f"(input hash {plan.input_hash[:12]}, image {existing.short_id}); "
            "use --force to rebuild"
        )
        click.echo(plan.image_ref)
        return

    _echo(
        f"building {plan.image_ref}: stack {args.stack.name} on {args.stack.os.key}, "
        f"base {ref}, Packer {packer.version_text}, input hash {plan.input_hash[:12]}"
    )
    for note in plan.notes:
        _echo(note)
    previous = docker_engine.local_image(engine, plan.image_ref)
    _run_packer(plan, packer, args.verbose)
    image = docker_engine.local_image(engine, plan.image_ref)
    size = f", {image.attrs['Size'] / 1e9:.2f} GB" if image is not None else ""
    _echo(f"built {plan.image_ref}{size} in {_elapsed(started)}; gpu-smoke passed in it")
    dropped = docker_engine.drop_replaced(engine, previous, image)
    if dropped:
        _echo(f"removed {dropped}, the image {plan.image_ref} pointed to before (now untagged)")
    click.echo(plan.image_ref)


def _build_cloud(args: BuildArgs, cloud: CloudOptions) -> None:
    from gpubake import clouds
    from gpubake.packer import Packer

    started = time.monotonic()
    cloud = clouds.settle_options(args.target, cloud, os.environ)
    clouds.check_disk(args.stack, cloud.disk_size_gb)
    notes = []
    if not cloud.gpu_build:
        notes.append("--no-gpu-build: built on a CPU machine; gpu-smoke's GPU checks will not run")
    source = args.stack.os.gcp if args.target == "gcp-image" else args.stack.os.aws
    assert source is not None
    base = "/".join(str(v) for v in source.values())
    if not args.dry_run:
        cli = clouds.check_cli(args.target)
        creds = clouds.check_credentials(args.target, cloud, os.environ)
        notes.append(f"credentials: {creds}")
    packer = Packer.detect()
    plan = make_plan(
        args.stack,
        target=args.target,
        base_image=base,
        base_image_id=f"latest:{base}",
        ca_bundle=args.bundle,
        require_gpu=cloud.gpu_build,
        verbose=max(args.verbose - 1, 0),
        notes=tuple(notes),
        cloud=cloud,
        packer_version=packer.version,
    )
    if args.dry_run:
        _print_plan(plan, packer, args.as_json)
        return
    existing = clouds.find_existing(plan, cloud, cli)
    if existing and not args.force:
        _echo(
            f"skipped: {existing} is already built from identical inputs (input hash "
            f"{plan.input_hash[:12]}); use --force to rebuild"
        )
        click.echo(existing)
        return
    _echo(
        f"building {plan.image_ref}: stack {args.stack.name} on {args.stack.os.key}, "
        f"Packer {packer.version_text}, input hash {plan.input_hash[:12]}"
    )
    for note in plan.notes:
        _echo(note)
    _run_packer(plan, packer, args.verbose)
    _echo(f"built {plan.image_ref} in {_elapsed(started)}; gpu-smoke passed on it")
    click.echo(plan.image_ref)


def _apply_host(args: BuildArgs, login: Any, check: bool) -> None:
    from gpubake import hosts

    host = login.host if login else None
    started = time.monotonic()
    plan = make_plan(
        args.stack,
        target=args.target,
        base_image=host or "localhost",
        base_image_id=f"host:{host or 'localhost'}",
        ca_bundle=args.bundle,
        require_gpu=False,
        verbose=max(args.verbose - 1, 0),
    )
    if args.dry_run:
        _print_plan(plan, None, args.as_json)
        return
    if login is not None:
        hosts.check_ssh(login)
    where = host or "this machine"
    _echo(f"applying the VM playbook{' in check mode' if check else ''} to {where}")

    def on_line(line: str, message: str | None) -> None:
        if args.verbose or check:
            click.echo(line, err=True)
        elif message:
            click.echo(f"  {_elapsed(started):>7}  {message}", err=True)

    def on_done(book: str, progress: Any) -> None:
        verb = "would change" if check else "changed"
        _echo(f"{book} on {where}: {progress.changed_summary().replace('changed', verb, 1)}")

    hosts.apply(plan, login=login, on_line=on_line, check=check, on_done=on_done)
    if check:
        _echo("check mode changed nothing; running gpu-smoke from gpubake itself")
        code = hosts.run_smoke(login, ["--require-gpu"])
        if code != 0:
            raise GpubakeError(f"gpu-smoke failed on {where} (exit {code})")
    _echo(f"done on {where} in {_elapsed(started)}")


def _dry_run_base(
    engine: Any, osinfo: stacks.OsInfo, explicit: str | None, notes: list[str]
) -> tuple[str, str]:
    from gpubake import docker_engine

    candidates = [explicit] if explicit else [osinfo.base_image, docker_engine.base_ref(osinfo)]
    for ref in candidates:
        image = docker_engine.local_image(engine, ref)
        if image is not None:
            return ref, image.id
    if explicit:
        raise docker_engine.EngineError(
            f"--base-image {explicit}: not found locally: load it "
            "first (docker load / docker import)"
        )
    notes.append(
        f"no local base image: a build would pull {osinfo.base_image} or "
        f"debootstrap {docker_engine.base_ref(osinfo)}; the input hash will change then"
    )
    return osinfo.base_image, "not-yet-available"


_SOURCE_NAMES = {"nvidia": "NVIDIA's CUDA repository", "distro": "the OS's packages"}


def _print_plan(plan: BuildPlan, packer: Any, as_json: bool) -> None:
    data = plan.to_dict()
    if packer is not None:
        work = Path("<work dir>")
        data["packer_version"] = packer.version_text
        data["packer_command"] = " ".join(
            packer.command(
                "build", work, work / f"{plan.target}.pkrvars.hcl", only=plan.packer_only
            )
        )
    else:
        data["packer_version"] = None
        data["packer_command"] = "(none: applied with ansible-playbook playbooks/vm.yml)"
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    s = plan.stack
    rows = [
        ("target", plan.target),
        ("image", plan.image_ref),
        ("stack", f"{s.name}: {s.description}"),
        ("os", f"{s.os.key} (python {s.python})"),
        ("environment", f"{s.python_env} at /opt/gpubake/env"),
        ("packages", ", ".join(f"{k}=={v}" for k, v in s.packages)),
        ("cuda", f"{s.cuda} (driver branch {s.driver_branch}+ on the host)"),
    ]
    if plan.target != "docker":
        rows.append(
            (
                "driver",
                f"branch {s.driver_branch}, {'open' if s.open_kernel_module else 'proprietary'} "
                f"module, from {_SOURCE_NAMES[s.driver_source]}; CUDA toolkit "
                f"{s.cuda_toolkit} from {_SOURCE_NAMES[s.cuda_source]}",
            )
        )
    rows += [
        ("gpu", s.gpu.key if s.gpu else "any"),
        ("base image", f"{plan.base_image} ({plan.base_image_id[:19]})"),
        ("input hash", plan.input_hash),
        ("ca bundle", str(plan.ca_bundle) if plan.ca_bundle else "none"),
    ]
    pv = plan.packer_vars
    if plan.target == "gcp-image":
        gpu = f" + {pv['gcp_accelerator_type']}" if pv["gcp_accelerator_type"] else ""
        rows.append(
            (
                "build vm",
                f"{pv['gcp_machine_type']}{gpu} in {pv['gcp_zone']}, "
                f"{pv['disk_size_gb']} GB, preemptible, "
                f"off after {pv['max_run_minutes']} min",
            )
        )
    elif plan.target == "aws-ami":
        rows.append(
            (
                "build vm",
                f"{pv['aws_instance_type']} in {pv['aws_region']}, "
                f"{pv['disk_size_gb']} GB, spot, terminates on shutdown, "
                f"off after {pv['max_run_minutes']} min",
            )
        )
    if packer is not None:
        rows.append(("packer", f"{data['packer_version']}: {data['packer_command']}"))
    else:
        rows.append(("applies", "ansible-playbook playbooks/vm.yml, then playbooks/smoke.yml"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    for note in plan.notes:
        click.echo(f"note: {note}")


def _elapsed(started: float) -> str:
    secs = int(time.monotonic() - started)
    return f"{secs // 60}m{secs % 60:02d}s"


def _run_packer(plan: BuildPlan, packer: Any, verbose: int) -> None:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_path = LOG_DIR / f"{plan.stack.name}-{plan.target}-{stamp}.log"
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="gpubake-build-") as tmp,
        log_path.open("w", encoding="utf-8") as log,
    ):
        work = Path(tmp)
        var_file = render(plan, work, with_plugins=packer.needs_plugins)
        packer.init(work)

        def on_line(line: str, message: str | None) -> None:
            log.write(line + "\n")
            log.flush()
            if verbose:
                click.echo(line, err=True)
            elif message:
                click.echo(f"  {_elapsed(started):>7}  {message}", err=True)

        try:
            packer.build(work, var_file, on_line, only=plan.packer_only)
        except GpubakeError as exc:
            raise GpubakeError(f"{exc} (full log: {log_path})") from None


@cli.command(name="stacks")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--os", "os_key", metavar="OS", help="Resolve for this OS (default debian-12).")
def stacks_cmd(as_json: bool, os_key: str | None) -> None:
    """List the stacks and what each resolves to."""
    resolved = []
    for name in stacks.stack_names():
        try:
            resolved.append(stacks.resolve(name, os_key=os_key).to_dict())
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
        click.echo(f"    {packages}")


@cli.command(name="render")
@click.option("--target", type=click.Choice(TARGETS), default="docker", show_default=True)
@_stack_options
@click.option("--base-image", metavar="REF", help="Base image reference to write.")
@click.option("--tag", default="latest", show_default=True)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write into.",
)
@click.option("--project", metavar="ID", help="gcp-image: GCP project to write.")
@click.option("--zone", metavar="ZONE", help="gcp-image: zone to write.")
@click.option("--region", metavar="REGION", help="aws-ami: region to write.")
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
    """Write the Packer and Ansible inputs, so that `packer build` can be run by hand.

    Cloud values not given are written as REPLACE-ME placeholders.
    """
    from gpubake.packer import Packer

    if target in ("ssh", "local"):
        raise click.UsageError("--target ssh and local use no Packer: nothing to render")
    if target in ("gcp-image", "aws-ami") and gpu is None:
        gpu = stacks.stacks_data()["default_cloud_gpu"]
    resolved = _resolve(stack, os_key, gpu, variables, target)
    packer = Packer.detect()
    if packer_plugins is None:
        packer_plugins = packer.needs_plugins
    ref = base_image or resolved.os.base_image
    cloud = CloudOptions(
        project=project or "REPLACE-ME",
        zone=zone or "REPLACE-ME",
        region=region or "REPLACE-ME",
    )
    plan = make_plan(
        resolved,
        target=target,
        base_image=ref,
        base_image_id=f"ref:{ref}",
        tag=tag,
        cloud=cloud,
        require_gpu=target != "docker",
        packer_version=(1, 7, 0) if packer_plugins else packer.version,
    )
    var_file = render(plan, out_dir, with_plugins=packer_plugins)
    only = f"-only={plan.packer_only} " if plan.packer_only else ""
    click.echo(
        f"wrote {out_dir}; run: cd {out_dir} && "
        f"{'packer init . && ' if packer_plugins else ''}"
        f"packer build {only}-var-file={var_file.name} ."
    )


@cli.command(name="smoke", context_settings={"ignore_unknown_options": True})
@_ssh_options("Run on this host over SSH (python3).", "--host")
@click.argument("smoke_args", nargs=-1, type=click.UNPROCESSED)
def smoke_cmd(
    host: str | None,
    ssh_key: Path | None,
    known_hosts: Path | None,
    smoke_args: tuple[str, ...],
) -> None:
    """Run gpu-smoke here or on --host; other arguments go to gpu-smoke (see its --help)."""
    from gpubake import hosts

    login = None
    if host:
        login = hosts.SshLogin(host, ssh_key, known_hosts)
        hosts.check_ssh(login)
    elif ssh_key or known_hosts:
        raise click.UsageError("--ssh-key and --known-hosts go with --host")
    sys.exit(hosts.run_smoke(login, list(smoke_args)))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: click errors and gpubake errors become one line and a non-zero exit."""
    try:
        cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="gpubake",
            standalone_mode=False,
        )
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `gpubake` alone: show the help
            click.echo(exc.format_message())
            return
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        _fail(exc.format_message().replace("\n", " ") + hint, 2)
    except click.Abort:
        _fail("aborted", 130)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except GpubakeError as exc:
        _fail(str(exc).replace("\n", " "))
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def build_main() -> None:
    """`python build.py ...`: the same as `gpubake build ...`."""
    main(["build", *sys.argv[1:]])
