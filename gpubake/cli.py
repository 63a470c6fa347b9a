"""The gpubake command line: the `gpubake` group and what it holds, wired from where each
command lives (gpubake.build.commands, gpubake.publish.commands, gpubake.jobs.commands), and
the entry point that turns every failure into one line.

`python build.py ...` is the same as `gpubake build ...`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click
import docker.errors
import requests

from gpubake import GpubakeError, __version__, failures
from gpubake.build import commands as build_commands
from gpubake.jobs import commands as job_commands
from gpubake.jobs import dataset_commands
from gpubake.notebooks import commands as notebook_commands
from gpubake.options import fail, one_line
from gpubake.publish import commands as publish_commands

#: --debug (or GPUBAKE_DEBUG=1): an unexpected failure shows its traceback, not one line
_debug = bool(os.environ.get("GPUBAKE_DEBUG"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpubake")
@click.option(
    "--debug",
    is_flag=True,
    help="On an unexpected failure (the Docker Engine, the network, a file), show the "
    "traceback instead of one line.",
)
def cli(debug: bool) -> None:
    """gpubake: tested GPU deep-learning images from one set of Ansible roles.

    Every image (Docker container, GCP image, AWS AMI) is built by Packer from the
    same playbooks and passes gpu-smoke before it counts as built.
    """
    global _debug
    _debug = _debug or debug


@cli.group(name="job")
def job_group() -> None:
    """Training jobs on gpubake images (the runner gpubake-job, role job_runner)."""


@cli.group(name="dataset")
def dataset_group() -> None:
    """Dataset disks for training jobs, filled by a short copy job (`job run --dataset-disk`)."""


@cli.group(name="notebook")
def notebook_group() -> None:
    """Interactive GPU notebooks on a cloud VM: up, connect (SSH tunnel), stop when idle."""


build_commands.register(cli)
publish_commands.register(cli)
job_commands.register(job_group)
notebook_commands.register(notebook_group)
dataset_commands.register(dataset_group)


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
        fail(one_line(exc.format_message()) + hint, 2)
    except click.Abort:
        fail("aborted", 130)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except GpubakeError as exc:  # an interrupted build: 130 or 143 (guard.BuildInterruptedError)
        fail(one_line(str(exc)), getattr(exc, "exit_code", 1))
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
        if _debug:
            raise
        fail(failures.describe(exc) + " (--debug shows the traceback)")


def build_main() -> None:
    """`python build.py ...`: the same as `gpubake build ...`."""
    main(["build", *sys.argv[1:]])
