"""The command line's shared pieces: the options several commands take (--stack / --os /
--gpu / --var, --host / --ssh-key / --known-hosts), the check that refuses an empty value, the
one-line messages, and the `gpubake: ...` progress line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from gpubake.build import targets


def only(option: str) -> str:
    """'gcp-image / aws-ami: ', the targets an option is for, from the registry."""
    return " / ".join(targets.takers(option)) + ": "


def one_line(text: str) -> str:
    """The text with every line break a space: carriage returns and the other breaks
    str.splitlines knows too, which a user's own input (a --var value) may hold."""
    return " ".join(text.splitlines())


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"gpubake: error: {message}", err=True)
    sys.exit(code)


def not_empty(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """An option given as "" is a mistake (a shell variable that was not set), not a default."""
    if isinstance(value, str) and not value.strip():
        flag = param.opts[0] if param.opts else param.name
        raise click.BadParameter(f"is empty: give a value, or leave {flag} out", ctx, param)
    return value


def ssh_options(host_help: str, scope: str):  # type: ignore[no-untyped-def]
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
            "--host", callback=not_empty, metavar="USER@HOST[:PORT]", help=host_help
        )(func)

    return wrap


def stack_options(func):  # type: ignore[no-untyped-def]
    func = click.option(
        "--var",
        "variables",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a stack value: python, cuda, driver_branch, open_kernel_module, "
        "driver_source / cuda_source (nvidia: NVIDIA's CUDA repository, the default; distro: "
        "the OS's own packages; none: not installed, for a CPU-only image or a machine that "
        "has them), job_runner (true/false: gpubake-job, in VM images by "
        "default, in containers on request) or packages.<name>. Repeatable.",
    )(func)
    func = click.option(
        "--gpu",
        callback=not_empty,
        metavar="MODEL",
        help="GPU model the image is for (see images/gpus.yml), e.g. t4, "
        "a100, h100; checked against the stack's CUDA and driver.",
    )(func)
    func = click.option(
        "--os",
        "os_key",
        callback=not_empty,
        metavar="OS",
        help="Operating system: debian-12 (default), ubuntu-22.04, ubuntu-24.04.",
    )(func)
    func = click.option(
        "--stack",
        callback=not_empty,
        metavar="NAME",
        help="Stack from images/stacks.yml (default: pytorch); `gpubake stacks` lists them.",
    )(func)
    return func


def echo(message: str) -> None:
    click.echo(f"gpubake: {message}", err=True)
