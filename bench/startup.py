#!/usr/bin/env python3
"""Measured in one run: how long a gpubake command takes to start, with and without
rfc3987_syntax loaded (gpubake.data_schema keeps it out while jsonschema loads).

    .venv/bin/python bench/startup.py [--runs 7] [--json]

Where rfc3987_syntax is installed (Jupyter's extras bring it; CI's venv has it), jsonschema
imports it, and it builds a Lark parser at import. Each command runs --runs times both ways,
alternating (this machine is noisy): "before" imports rfc3987_syntax first, as jsonschema did,
"now" is the command as users run it. The suite runs the command line several hundred times,
so each second here is minutes of CI. Prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], ["stacks", "--json"], ["build", "--dry-run"])
NOW = "import sys; from gpubake.cli import main; main(sys.argv[1:])"
BEFORE = "import rfc3987_syntax; " + NOW


def timed(code: str, args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    if importlib.util.find_spec("rfc3987_syntax") is None:
        sys.exit("rfc3987_syntax is not installed here: nothing to compare (pip install it)")
    rows = []
    for args in COMMANDS:
        before, now = [], []
        for _ in range(opts.runs):
            before.append(timed(BEFORE, args))
            now.append(timed(NOW, args))
        b, n = statistics.median(before), statistics.median(now)
        rows.append({"command": " ".join(["gpubake", *args]), "before_s": b, "now_s": n})
    if opts.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'command':<26} {'before':>8} {'now':>8} {'ratio':>7}")
    for row in rows:
        ratio = row["before_s"] / row["now_s"]
        print(f"{row['command']:<26} {row['before_s']:7.2f}s {row['now_s']:7.2f}s {ratio:6.1f}x")


if __name__ == "__main__":
    main()
