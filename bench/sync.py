#!/usr/bin/env python3
"""Measured in one run: the job runner's final sync, today's code against the new.

    .venv/bin/python bench/sync.py [--big-mib 2048] [--files 500] [--json]

Against the local S3 (moto) and GCS (gcp-storage-emulator) servers the tests start, each code
makes the final sync of
  (a) one 2 GiB checkpoint file                                        goal (new) < 10 s
  (b) 500 files of 1 MiB                                               goal (new) < 10 s
  (c) the same 500 files again, unchanged (nothing to send)            goal (new) < 1 s
timed from the "notice" (the call) to the last byte acknowledged (the call's return), with
its throughput; and the server's floor: the same bytes as one bare PUT a file, one after
another, from a client made before the timing (what the server itself takes). Both codes
run in this process with their clients made inside the timing, as the old runner's one-shot
`gpubake-sync upload` did (without its interpreter start and SDK import, ~1 s more a folder,
three folders a sync: the old code's figures are a lower bound); the new runner's
`gpubake-sync serve` has its clients loaded before the notice, which the new code's figures
do not count either. "Today's code" is the sync client of OLD_REV. Each case gets a fresh
bucket and the same --state file use as the runner (case (c) is the second sync with the
state of (b)). The servers are single-process Python on this machine, so the figures are
theirs as much as the client's: the floor column says how much.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.modules import load_file  # noqa: E402 (the checkout's tests)
from tests.object_stores import gcs_server, s3_server  # noqa: E402

SYNC = "roles/job_runner/files/gpubake_sync.py"
#: the last commit with the one-file-at-a-time sync client ("today's code" of issue 27)
OLD_REV = "b72bd12"
GOALS = {"a": 10.0, "b": 10.0, "c": 1.0}


def old_module(tmp: Path):
    text = subprocess.run(
        ["git", "show", f"{OLD_REV}:{SYNC}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = tmp / "gpubake_sync_old.py"
    path.write_text(text, encoding="utf-8")
    return load_file(path, "gpubake_sync_old")


def write_files(root: Path, big_mib: int, files: int) -> tuple[Path, Path]:
    big, many = root / "big", root / "many"
    big.mkdir()
    many.mkdir()
    block = os.urandom(1 << 20)
    with (big / "model.pt").open("wb") as f:
        for i in range(big_mib):  # distinct blocks, written fast
            f.write(i.to_bytes(8, "big") + block[8:])
    for i in range(files):
        (many / f"shard-{i:04d}.bin").write_bytes(i.to_bytes(8, "big") + block[8:])
    return big, many


def timed(fn) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def measure(server, code: str, module, big: Path, many: Path, tmp: Path) -> dict[str, float]:
    def final_sync(folder: Path, url: str, state: Path) -> None:
        if code == "old":
            module.upload(folder, url, state=state)
        else:
            module.sync_folder(folder, url, state, checkpoints=True)

    out: dict[str, float] = {}
    bucket = f"bench-{code}-{uuid.uuid4().hex[:8]}"
    server.make_bucket(bucket)
    url = f"{server.kind}://{bucket}"
    out["a"] = timed(lambda: final_sync(big, f"{url}/a", tmp / f"{code}-a.json"))
    module.remove(f"{url}/a/model.pt")  # the servers keep objects in memory
    out["b"] = timed(lambda: final_sync(many, f"{url}/b", tmp / f"{code}-b.json"))
    out["c"] = timed(lambda: final_sync(many, f"{url}/b", tmp / f"{code}-b.json"))
    return out


def floor(server, big: Path, many: Path) -> dict[str, float]:
    """Bare PUTs, one after another, with a client made before the timing."""
    bucket = f"bench-floor-{uuid.uuid4().hex[:8]}"
    server.make_bucket(bucket)
    client = server.client()
    if server.kind == "s3":

        def put(path: Path, key: str) -> None:
            with path.open("rb") as body:
                client.put_object(Bucket=bucket, Key=key, Body=body)

    else:
        store = client.bucket(bucket)

        def put(path: Path, key: str) -> None:
            store.blob(key).upload_from_filename(str(path))

    return {
        "a": timed(lambda: put(big / "model.pt", "a/model.pt")),
        "b": timed(lambda: [put(p, f"b/{p.name}") for p in sorted(many.iterdir())]),
        "c": 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=2048, help="size of (a) in MiB")
    parser.add_argument("--files", type=int, default=500, help="files of 1 MiB in (b), (c)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    opts = parser.parse_args()
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="gpubake-bench-sync-") as name:
        tmp = Path(name)
        codes = {"old": old_module(tmp), "new": load_file(ROOT / SYNC, "gpubake_sync_new")}
        big, many = write_files(tmp, opts.big_mib, opts.files)
        sizes = {"a": opts.big_mib << 20, "b": opts.files << 20, "c": 0}
        for start in (s3_server, gcs_server):
            with start() as server:
                saved = {k: os.environ.get(k) for k in server.env}
                os.environ.update(server.env)
                try:
                    print(f"bench: {server.kind} floor ...", file=sys.stderr)
                    results.setdefault(server.kind, {})["floor"] = floor(server, big, many)
                    for code, module in codes.items():
                        print(f"bench: {server.kind} {code} ...", file=sys.stderr)
                        results.setdefault(server.kind, {})[code] = measure(
                            server, code, module, big, many, tmp
                        )
                finally:
                    for key, value in saved.items():
                        if value is None:
                            os.environ.pop(key, None)
                        else:
                            os.environ[key] = value
    if opts.json:
        print(json.dumps(results, indent=2))
        return
    labels = {
        "a": f"(a) one {opts.big_mib} MiB file",
        "b": f"(b) {opts.files} x 1 MiB",
        "c": "(c) same set, unchanged",
    }
    print(f"{'store':5} {'case':26} {'old s':>7} {'new s':>7} {'floor s':>7} {'old MB/s':>9} "
          f"{'new MB/s':>9} {'old/new':>8} {'new/floor':>9}  goal (new)")  # fmt: skip
    for kind, by_code in results.items():
        for case, label in labels.items():
            old, new, bare = (by_code[code][case] for code in ("old", "new", "floor"))
            rate = [
                f"{sizes[case] / t / 1e6:9.0f}" if sizes[case] else f"{'-':>9}" for t in (old, new)
            ]
            verdict = "met" if new < GOALS[case] else "NOT met"
            if new >= GOALS[case] and bare >= GOALS[case]:
                verdict += " (the server's own floor is over it)"
            versus = f"{new / bare:9.2f}" if bare else f"{'-':>9}"
            print(f"{kind:5} {label:26} {old:7.2f} {new:7.2f} {bare:7.2f} {rate[0]} {rate[1]} "
                  f"{old / new:8.1f} {versus}  < {GOALS[case]:.0f} s: {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
