"""The gpubake command line: build, stacks, render, smoke, push / pull / images, job.

`python build.py ...` is the same as `gpubake build ...`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from gpubake import GpubakeError, __version__, flow, stacks, targets

TARGETS = targets.NAMES


def _only(option: str) -> str:
    """'gcp-image / aws-ami: ', the targets an option is for, from the registry."""
    return " / ".join(targets.takers(option)) + ": "


def _one_line(text: str) -> str:
    """The text with every line break a space: carriage returns and the other breaks
    str.splitlines knows too, which a user's own input (a --var value) may hold."""
    return " ".join(text.splitlines())


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"gpubake: error: {message}", err=True)
    sys.exit(code)


def _not_empty(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """An option given as "" is a mistake (a shell variable that was not set), not a default."""
    if isinstance(value, str) and not value.strip():
        flag = param.opts[0] if param.opts else param.name
        raise click.BadParameter(f"is empty: give a value, or leave {flag} out", ctx, param)
    return value


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
        return click.option(
            "--host", callback=_not_empty, metavar="USER@HOST[:PORT]", help=host_help
        )(func)

    return wrap


def _stack_options(func):  # type: ignore[no-untyped-def]
    func = click.option(
        "--var",
        "variables",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a stack value: python, cuda, driver_branch, open_kernel_module, "
        "driver_source / cuda_source (nvidia: NVIDIA's CUDA repository, the default; distro: "
        "the OS's own packages), job_runner (true/false: gpubake-job, in VM images by "
        "default, in containers on request) or packages.<name>. Repeatable.",
    )(func)
    func = click.option(
        "--gpu",
        callback=_not_empty,
        metavar="MODEL",
        help="GPU model the image is for (see images/gpus.yml), e.g. t4, "
        "a100, h100; checked against the stack's CUDA and driver.",
    )(func)
    func = click.option(
        "--os",
        "os_key",
        callback=_not_empty,
        metavar="OS",
        help="Operating system: debian-12 (default), ubuntu-22.04, ubuntu-24.04.",
    )(func)
    func = click.option(
        "--stack",
        callback=_not_empty,
        metavar="NAME",
        help="Stack from images/stacks.yml (default: pytorch); `gpubake stacks` lists them.",
    )(func)
    return func


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
    default=targets.DEFAULT,
    show_default=True,
    help=" ".join(f"{t.name}: {t.help}." for t in targets.REGISTRY.values()),
)
@_stack_options
@click.option(
    "--base-image",
    callback=_not_empty,
    metavar="REF",
    help=_only("base_image") + "local image to start from. Default: the OS's official image, or a "
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
    "--tag", default="latest", show_default=True, help=_only("base_image") + "tag of the image."
)
@click.option(
    "--project",
    callback=_not_empty,
    metavar="ID",
    help=_only("project") + "GCP project (or GOOGLE_CLOUD_PROJECT).",
)
@click.option(
    "--zone",
    callback=_not_empty,
    metavar="ZONE",
    help=_only("zone") + "zone with the GPU, e.g. us-central1-a.",
)
@click.option(
    "--region",
    callback=_not_empty,
    metavar="REGION",
    help=_only("region") + "AWS region (or AWS_REGION).",
)
@click.option(
    "--profile",
    callback=_not_empty,
    metavar="NAME",
    help=_only("profile") + "profile from ~/.aws (or AWS_PROFILE).",
)
@click.option(
    "--disk-size",
    type=click.IntRange(min=10),
    metavar="GB",
    help=_only("disk_size") + "boot disk; checked against what the stack needs.",
)
@click.option(
    "--no-gpu-build",
    is_flag=True,
    help=_only("no_gpu_build") + "build on a cheap CPU machine; the GPU checks do not run (and "
    "gpubake says so).",
)
@_ssh_options("ssh: the machine to set up.", "ssh")
@click.option(
    "--check",
    "check_mode",
    is_flag=True,
    help=_only("check_mode")
    + "Ansible check mode: report what is present and what would be added, "
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
    given = dict(locals())
    try:
        targets.check_options(target, given)
    except targets.TargetError as exc:
        raise click.UsageError(str(exc)) from None
    fields = {f.name for f in flow.dataclasses.fields(flow.BuildRequest)}
    flow.build(flow.BuildRequest(**{k: v for k, v in given.items() if k in fields}))


@cli.command(name="stacks")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--os", "os_key", metavar="OS", help="Resolve for this OS (default debian-12).")
def stacks_cmd(as_json: bool, os_key: str | None) -> None:
    """List the stacks and what each resolves to."""
    from gpubake import stages

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


@cli.command(name="lock")
@click.option(
    "--stack",
    "stack_names",
    multiple=True,
    metavar="NAME",
    help="Stack to lock (its parents are locked first); repeatable. Default: every stack.",
)
@click.option(
    "--os", "os_key", callback=_not_empty, metavar="OS", help="Lock for this OS. Default: every OS."
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
    from gpubake import locks

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


@cli.command(name="render")
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default=targets.DEFAULT,
    show_default=True,
    help=f"The target whose Packer files to write: {', '.join(targets.names(packer=True))}.",
)
@_stack_options
@click.option(
    "--base-image", callback=_not_empty, metavar="REF", help="Base image reference to write."
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
    "--project", callback=_not_empty, metavar="ID", help=_only("project") + "GCP project to write."
)
@click.option("--zone", callback=_not_empty, metavar="ZONE", help=_only("zone") + "zone to write.")
@click.option(
    "--region", callback=_not_empty, metavar="REGION", help=_only("region") + "region to write."
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

    if not host and (ssh_key or known_hosts):
        raise click.UsageError("--ssh-key and --known-hosts go with --host")
    login = flow.ssh_login(host, ssh_key, known_hosts)
    if login is not None:
        hosts.check_ssh(login)
    sys.exit(hosts.run_smoke(login, list(smoke_args)))


def _registry_options(func):  # type: ignore[no-untyped-def]
    func = click.option(
        "--insecure",
        is_flag=True,
        help="Plain HTTP, for a registry on this machine (127.0.0.1, localhost) only; every "
        "other registry is spoken to over TLS, with its CA from /etc/docker/certs.d/HOST/ca.crt "
        "when it has its own.",
    )(func)
    func = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(func)
    return click.option(
        "--registry",
        "registry_text",
        required=True,
        callback=_not_empty,
        metavar="HOST[:PORT]/NAMESPACE",
        help="The registry and namespace, e.g. registry.example.com/ml or 127.0.0.1:5000/gpubake; "
        "credentials are those of `docker login HOST`.",
    )(func)


def _echo(message: str) -> None:
    click.echo(f"gpubake: {message}", err=True)


@cli.command(name="push")
@_registry_options
@click.option(
    "--stack",
    callback=_not_empty,
    metavar="NAME",
    help="Stack whose image to push (default: pytorch).",
)
@click.option("--tag", default="latest", show_default=True, help="Local tag of gpubake/<stack>.")
@click.option(
    "--allow-cpu-checked",
    is_flag=True,
    help="Also push an image whose gpu-smoke ran without a GPU (its label says so).",
)
def push_cmd(
    registry_text: str,
    as_json: bool,
    insecure: bool,
    stack: str | None,
    tag: str,
    allow_cpu_checked: bool,
) -> None:
    """Publish gpubake/<stack>:<tag> to a registry.

    It is pushed under its immutable tag (framework, CUDA, Python, OS, date and input hash,
    e.g. 2.15.0-cu132-py3.11-debian12-20261201-4e5d614f236a), which is never moved to
    another image; the registry's digest is read back and checked; then the rolling tags
    (e.g. 2.15-cu132, latest) are moved to it. Only images whose gpu-smoke passed are
    pushed; layers the registry holds are not sent again. Prints the pinned reference.
    """
    from gpubake import guard, publish, registry

    reg = registry.parse_registry(registry_text)
    with guard.sigterm_interrupts():
        try:
            done = publish.push(
                reg,
                stack,
                tag,
                allow_cpu_checked=allow_cpu_checked,
                insecure=insecure,
                echo=_echo,
            )
        except KeyboardInterrupt as exc:
            sig = guard.signal_of(exc)
            raise guard.BuildInterruptedError(
                f"{sig.name} during the push of gpubake/{stack or 'pytorch'}:{tag}: the "
                "rolling tags move only once the whole image is in the registry and checked; "
                "push again to finish (layers the registry holds are not sent again)",
                128 + sig.value,
            ) from None
    click.echo(json.dumps(done.to_dict(), indent=2) if as_json else done.pinned)


@cli.command(name="pull")
@click.argument("stack", required=False)
@_registry_options
@click.option(
    "--driver",
    callback=_not_empty,
    metavar="VERSION",
    help="Choose for this NVIDIA driver (e.g. 580 or 580.95.05) instead of this machine's.",
)
@click.option(
    "--gpu",
    callback=_not_empty,
    metavar="MODEL",
    help="Choose for this GPU (images/gpus.yml: t4, a100, h100, ...) instead of this machine's.",
)
@click.option("--explain", is_flag=True, help="Say for each image why it was chosen or not.")
@click.option("--no-smoke", is_flag=True, help="Do not run gpu-smoke in the pulled image.")
def pull_cmd(
    stack: str | None,
    registry_text: str,
    as_json: bool,
    insecure: bool,
    driver: str | None,
    gpu: str | None,
    explain: bool,
    no_smoke: bool,
) -> None:
    """Pull the newest image of STACK (default: pytorch) that this machine can run.

    Reads this machine's NVIDIA driver and GPU (nvidia-smi; --driver / --gpu state them for
    another machine) and the registry's tags and labels, without pulling any layer; picks the
    newest image whose minimum driver and compute capabilities fit; pulls it by digest; runs
    gpu-smoke in it; prints the pinned reference (name@sha256:...).
    """
    from gpubake import publish, registry

    reg = registry.parse_registry(registry_text)
    done = publish.pull(
        reg,
        stack,
        driver=driver,
        gpu=gpu,
        insecure=insecure,
        run_smoke=not no_smoke,
        echo=_echo,
        explain=click.echo if explain and not as_json else None,
    )
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(done), indent=2))
        return
    if done.smoke:
        how = "" if done.gpu else " (no GPU: its CPU-side checks only)"
        _echo(f"gpu-smoke in {done.pinned}: {done.smoke}{how}")
    click.echo(done.pinned)


@cli.command(name="images")
@_registry_options
def images_cmd(registry_text: str, as_json: bool, insecure: bool) -> None:
    """List the gpubake images a registry holds: stack, versions, minimum driver, GPUs,
    size, date and digest (read from the registry's labels; nothing is pulled)."""
    from gpubake import publish, registry

    rows = publish.index(registry.parse_registry(registry_text), insecure=insecure, echo=_echo)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows], indent=2))
    elif not rows:
        _echo(f"no gpubake images in {registry_text}")
    else:
        click.echo(publish.table(rows))


@cli.group(name="job")
def job_group() -> None:
    """Training jobs on gpubake images (the runner gpubake-job, role job_runner)."""


def _job_runner(*args: str) -> int:
    """Run the runner the images hold (roles/job_runner/files/gpubake_job.py) with this
    Python, whose boto3 / google-cloud-storage the sync client then uses."""
    from gpubake.resources import data_root

    files = data_root() / "roles" / "job_runner" / "files"
    env = {**os.environ, "GPUBAKE_JOB_CONFIG": os.environ.get("GPUBAKE_JOB_CONFIG", os.devnull)}
    return subprocess.call([sys.executable, str(files / "gpubake_job.py"), *args], env=env)


@job_group.command(name="local")
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False),
    help="Where the job's code, checkpoints, results and logs go "
    "(default: ~/.cache/gpubake/jobs/<id>).",
)
def job_local_cmd(spec: str, work_dir: str | None) -> None:
    """Run the job SPEC (a JSON file) on this machine, as an instance would, to try it
    before paying for one.

    The same runner as in the images: the code is fetched, earlier checkpoints restored,
    the command run with $GPUBAKE_CKPT_DIR, $GPUBAKE_RESULTS_DIR and $GPUBAKE_PREEMPT_FILE
    set, and they are synced to the spec's results location (gs:// or s3://, with this
    machine's credentials) every sync_interval and at the end, with _SUCCESS, _FAILED or
    _PREEMPTED. Unlike an instance, the dataset disk is not mounted, the command runs as
    you, and nothing is powered off. Exit status: 0 success, 1 the job failed, 2 a bad spec
    or an unusable results location, 3 preempted.

    \b
    Example spec:
      {"gpubake_job": 1, "command": ["python", "train.py"],
       "code": {"url": "gs://my-bucket/code/train.tar.gz"},
       "results": "gs://my-bucket/runs/first", "sync_interval": "5m",
       "max_run_time": "6h"}
    """
    code = _job_runner("local", spec, *(["--work-dir", work_dir] if work_dir else []))
    if code:
        sys.exit(code)


@job_group.command(name="validate")
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
def job_validate_cmd(spec: str) -> None:
    """Check the job SPEC and print it with every default filled in (one-line error if bad)."""
    code = _job_runner("validate", spec)
    if code:
        sys.exit(code)


def _register_job_commands() -> None:
    from gpubake.jobs import commands

    commands.register(job_group)


_register_job_commands()


def _register_image_commands() -> None:
    """`gpubake scan` and `gpubake sbom`: what an image holds, read from its layers."""
    from gpubake.sbom import sbom_command
    from gpubake.scan import scan_command

    cli.add_command(scan_command)
    cli.add_command(sbom_command)


_register_image_commands()


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
        _fail(_one_line(exc.format_message()) + hint, 2)
    except click.Abort:
        _fail("aborted", 130)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except GpubakeError as exc:  # an interrupted build: 130 or 143 (guard.BuildInterruptedError)
        _fail(_one_line(str(exc)), getattr(exc, "exit_code", 1))
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def build_main() -> None:
    """`python build.py ...`: the same as `gpubake build ...`."""
    main(["build", *sys.argv[1:]])
