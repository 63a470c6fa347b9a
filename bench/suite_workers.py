#!/usr/bin/env python3
"""Measured in one run: a part of the test suite on one worker, then on N (pytest-xdist, as
pyproject's addopts run the whole suite), and the ratio of their wall times.

    .venv/bin/python bench/suite_workers.py [--workers 2] [PATH_OR_NODE ...]

The default part is the unit tests and three integration modules that build nothing
(containers, a registry, stand-ins): minutes, not the hour the whole suite takes on one
worker. Both runs use the same selection, one after the other; the second worker count is
kept in pyproject only while this prints a speed-up (ratio > 1).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = [
    "tests/unit",
    "tests/integration/test_registry_client.py",
    "tests/integration/test_job_gcp.py",
    "tests/integration/test_roles_converge.py",
]
_SUMMARY = re.compile(r"=+ (.*\d+ passed.*) in [\d.]+s")


def run(workers: int, selection: list[str]) -> tuple[float, str]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers),
         *selection],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - started
    summary = _SUMMARY.search(proc.stdout)
    if proc.returncode != 0 or summary is None:
        sys.exit(f"bench: the run on {workers} worker(s) failed:\n{proc.stdout[-3000:]}")
    return seconds, summary[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("selection", nargs="*", default=DEFAULT)
    args = parser.parse_args()
    serial, said = run(0, args.selection)
    print(f"1 worker:  {serial:7.1f} s  ({said})")
    parallel, said = run(args.workers, args.selection)
    print(f"{args.workers} workers: {parallel:7.1f} s  ({said})")
    print(f"speed-up (1 worker / {args.workers}): {serial / parallel:.2f}")


if __name__ == "__main__":
    main()
