"""`gpubake push`, `pull`, `images`, `scan` and `sbom`: the click commands (registered by
gpubake.cli); the work is gpubake.publish.images', scan's and sbom's."""

from __future__ import annotations

import dataclasses
import json

import click

from gpubake.build import guard
from gpubake.options import echo, not_empty
from gpubake.publish import images, registry
from gpubake.publish.sbom import sbom_command
from gpubake.publish.scan import scan_command


def registry_options(func):  # type: ignore[no-untyped-def]
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
        callback=not_empty,
        metavar="HOST[:PORT]/NAMESPACE",
        help="The registry and namespace, e.g. registry.example.com/ml or 127.0.0.1:5000/gpubake; "
        "credentials are those of `docker login HOST`.",
    )(func)


@click.command(name="push")
@registry_options
@click.option(
    "--stack",
    callback=not_empty,
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

    reg = registry.parse_registry(registry_text)
    with guard.sigterm_interrupts():
        try:
            done = images.push(
                reg,
                stack,
                tag,
                allow_cpu_checked=allow_cpu_checked,
                insecure=insecure,
                echo=echo,
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


@click.command(name="pull")
@click.argument("stack", required=False)
@registry_options
@click.option(
    "--driver",
    callback=not_empty,
    metavar="VERSION",
    help="Choose for this NVIDIA driver (e.g. 580 or 580.95.05) instead of this machine's.",
)
@click.option(
    "--gpu",
    callback=not_empty,
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

    reg = registry.parse_registry(registry_text)
    done = images.pull(
        reg,
        stack,
        driver=driver,
        gpu=gpu,
        insecure=insecure,
        run_smoke=not no_smoke,
        echo=echo,
        explain=click.echo if explain and not as_json else None,
    )
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(done), indent=2))
        return
    if done.smoke:
        how = "" if done.gpu else " (no GPU: its CPU-side checks only)"
        echo(f"gpu-smoke in {done.pinned}: {done.smoke}{how}")
    click.echo(done.pinned)


@click.command(name="images")
@registry_options
def images_cmd(registry_text: str, as_json: bool, insecure: bool) -> None:
    """List the gpubake images a registry holds: stack, versions, minimum driver, GPUs,
    size, date and digest (read from the registry's labels; nothing is pulled)."""

    rows = images.index(registry.parse_registry(registry_text), insecure=insecure, echo=echo)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows], indent=2))
    elif not rows:
        echo(f"no gpubake images in {registry_text}")
    else:
        click.echo(images.table(rows))


def register(group: click.Group) -> None:
    for command in (push_cmd, pull_cmd, images_cmd, scan_command, sbom_command):
        group.add_command(command)
