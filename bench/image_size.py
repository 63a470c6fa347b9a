#!/usr/bin/env python3
"""Measured in one run: the default image's size over the size of the Python
environment inside it, and the wall time of a no-change rebuild.

    .venv/bin/python bench/image_size.py [--image gpubake/pytorch:latest] [--build-args ...]

Builds the image first if it is missing (with the host's CA bundle when present).
Goal (issue: foundation): ratio <= 1.15; a no-change rebuild in seconds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parent.parent
HOST_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
ENV_PREFIX = "/opt/gpubake/env"
RATIO_GOAL = 1.15


def build(extra: list[str]) -> float:
    args = [sys.executable, str(ROOT / "build.py"), "--target", "docker", *extra]
    if HOST_BUNDLE.is_file() and "--ca-bundle" not in extra:
        args += ["--ca-bundle", str(HOST_BUNDLE)]
    started = time.monotonic()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"bench: build failed: {proc.stderr.strip().splitlines()[-1:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="gpubake/pytorch:latest")
    parser.add_argument("--build-args", nargs=argparse.REMAINDER, default=[])
    opts = parser.parse_args()
    engine = docker.from_env(timeout=600)

    tag = opts.image.rsplit(":", 1)[1]
    extra = ["--tag", tag, *opts.build_args]
    try:
        engine.images.get(opts.image)
        first = None
    except docker.errors.ImageNotFound:
        first = build(extra)

    image_bytes = engine.images.get(opts.image).attrs["Size"]
    out = engine.containers.run(
        opts.image, ["du", "-sb", ENV_PREFIX], remove=True, user="root", entrypoint=[]
    )
    env_bytes = int(out.split()[0])
    rebuild = build(extra)

    ratio = image_bytes / env_bytes
    print(f"image {opts.image}: {image_bytes / 1e9:.3f} GB")
    print(f"python environment {ENV_PREFIX}: {env_bytes / 1e9:.3f} GB")
    print(
        f"image / environment = {ratio:.3f}  (goal <= {RATIO_GOAL}: "
        f"{'met' if ratio <= RATIO_GOAL else 'NOT met'})"
    )
    if first is not None:
        print(f"first build: {first:.1f} s")
        print(f"no-change rebuild: {rebuild:.2f} s = {rebuild / first:.4f} x the first build")
    else:
        print(f"no-change rebuild: {rebuild:.2f} s")


if __name__ == "__main__":
    main()
