"""`gpubake sbom IMAGE`: the CycloneDX SBOM a built image carries.

Role manifest writes it (roles/manifest/files/write_sbom.py) at gpubake.build.plan.SBOM_PATH, and
the image's label gpubake.build.plan.SBOM_LABEL names that path. The file is read from a container
that is created and never started (gpubake.build.docker_engine.read_image_file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from gpubake import GpubakeError
from gpubake.build import docker_engine
from gpubake.build.plan import SBOM_LABEL


class SbomError(GpubakeError):
    """An image without an SBOM, or one that cannot be read."""


def image_sbom(engine: Any, ref: str) -> bytes:
    """The SBOM file of the local image `ref`, as stored in it."""
    image = docker_engine.local_image(engine, ref)
    if image is None:
        raise SbomError(f"no local image {ref}: build it (gpubake build) or pull it first")
    path = (image.labels or {}).get(SBOM_LABEL)
    if not path:
        raise SbomError(
            f"{ref} has no SBOM (no label {SBOM_LABEL}): it was built by an older gpubake; "
            "rebuild it with this gpubake (gpubake build --force)"
        )
    try:
        return docker_engine.read_image_file(engine, ref, path)
    except docker_engine.EngineError as exc:
        raise SbomError(f"the SBOM of {ref} (label {SBOM_LABEL}): {exc}") from None


@click.command(name="sbom")
@click.argument("image")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the SBOM to this file instead of stdout.",
)
def sbom_command(image: str, out: Path | None) -> None:
    """Print the CycloneDX SBOM (JSON) of the local image IMAGE: the Python environment's
    packages with their versions and the lock's SHA-256 hashes, and the OS's deb packages.
    It is read from the image without running it, at the path its label io.gpubake.sbom
    names."""
    data = image_sbom(docker_engine.client(), image)
    try:
        json.loads(data)
    except ValueError:
        raise SbomError(f"the SBOM of {image} is not JSON: rebuild it with --force") from None
    if out is not None:
        out.write_bytes(data)
        click.echo(f"wrote the SBOM of {image} to {out}", err=True)
        return
    click.echo(data, nl=False)
