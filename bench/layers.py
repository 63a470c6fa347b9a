#!/usr/bin/env python3
"""Measured in one run: what layered, locked container builds cost and save.

    .venv/bin/python bench/layers.py [--skip-fastai] [--json]

In a copy of the checkout, with a fresh download cache, it measures
  (a) the cold build of the default stack (every stage built, nothing downloaded before);
  (b) the rebuild after a one-line change in roles/gpu_smoke_test (the last stage's role);
  (c) b / a                                                       goal <= 0.15
  (d) image size / size of the Python environment in it         goal <= 1.05
  (e) fastai's own layers (what a pull adds on top of pytorch) against its total size;
  (f) a plain Dockerfile with the same lock and gpu-smoke (`docker build`, the peer a user
      would write instead): its cold build and its rebuild after a last-line change, and
      gpubake's ratios to them             goals: cold <= 1.1 x; late-change rebuild <= 1.5 x
  (h) the cold build from an empty wheelhouse: `gpubake build --force --wheelhouse EMPTY`,
      which downloads the lock's files into it while its first stage builds and installs
      from it with no index and no cache, against the Dockerfile's cold build  goal <= 1.0 x
  (g) with --baseline REV: the default build of gpubake at REV (e.g. the one-layer build
      before stages), forced, against gpubake's forced rebuild with its download cache
      warm                                                           goal: not slower
The images are tagged :bench; the base image (gpubake/base:debian-12) is shared by all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpubake import stacks  # noqa: E402 (the checkout's gpubake)
from gpubake.build import docker_engine, locks  # noqa: E402
from tests.checkout import copy_checkout  # noqa: E402 (bench/stages.py takes it from here)

HOST_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
ENV_PREFIX = "/opt/gpubake/env"
TAG = "bench"
GOALS = {
    "rebuild_ratio": 0.15,
    "size_ratio": 1.05,
    "cold_vs_dockerfile": 1.1,
    "rebuild_vs_dockerfile": 1.5,  # issue 30 (was: at most 5 s)
    "wheelhouse_vs_dockerfile": 1.0,
}

DOCKERFILE = """\
FROM {base}
COPY ca-bundle.crt /usr/local/share/bench-ca.crt
ENV SSL_CERT_FILE=/usr/local/share/bench-ca.crt PIP_CERT=/usr/local/share/bench-ca.crt
RUN apt-get update && apt-get install -y --no-install-recommends {apt} python3 python3-venv \\
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir uv=={uv} \\
    && ln -s /opt/uv/bin/uv /usr/local/bin/uv && uv venv --python /usr/bin/python3 {env}
COPY cuda.txt lock.txt /tmp/
RUN uv pip install --no-cache --python {env}/bin/python --require-hashes --no-deps -r /tmp/cuda.txt
RUN uv pip install --no-cache --python {env}/bin/python --require-hashes -r /tmp/lock.txt
COPY gpu_smoke.py gpus.json /usr/local/lib/gpubake/
RUN GPU_SMOKE_GPUS_FILE=/usr/local/lib/gpubake/gpus.json \\
    {env}/bin/python /usr/local/lib/gpubake/gpu_smoke.py  # {marker}
"""


def run(args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        sys.exit(f"bench: {' '.join(args[:4])} ... failed: {tail}")
    return seconds


def extract_revision(rev: str, dest: Path) -> Path:
    """The files of gpubake at git revision `rev`, written to `dest`."""
    dest.mkdir()
    archive = subprocess.run(
        ["git", "archive", rev], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def append_line(path: Path, line: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")


def gpubake(tree: Path, env: dict[str, str], *args: str) -> float:
    cmd = [sys.executable, "-m", "gpubake", "build", "--target", "docker", "--tag", TAG]
    if HOST_BUNDLE.is_file():
        cmd += ["--ca-bundle", str(HOST_BUNDLE)]
    return run([*cmd, *args], cwd=tree, env=env)


def write_peer(work: Path, base: str, marker: str) -> None:
    """The plain Dockerfile and its context in `work`; `marker` ends its last line."""
    stack = stacks.resolve()
    lock = locks.check(stack, stacks.machine_arch())
    (work / "lock.txt").write_text(lock.text)
    (work / "cuda.txt").write_text(locks.subset(lock, stacks.stacks_data()["cuda_wheels"]))
    shutil.copyfile(HOST_BUNDLE, work / "ca-bundle.crt")
    files = ROOT / "roles" / "gpu_smoke_test" / "files"
    shutil.copyfile(files / "gpu_smoke.py", work / "gpu_smoke.py")
    gpus = yaml.safe_load((files / "gpus.yml").read_text())
    (work / "gpus.json").write_text(json.dumps(gpus))
    uv = stacks.stacks_data()["tools"]["uv"]["version"]
    # the same OS packages as gpubake's container images: role base's (the one copy)
    base_vars = ROOT / "roles" / "base" / "vars" / "Debian.yml"
    apt = " ".join(yaml.safe_load(base_vars.read_text())["__base_packages"])
    text = DOCKERFILE.format(base=base, apt=apt, uv=uv, env=ENV_PREFIX, marker=marker)
    (work / "Dockerfile").write_text(text)


#: the legacy builder: one committed layer per step, as gpubake's stages (and its output
#: shows where each step's command ends and its commit begins, for bench/stages.py)
DOCKER_BUILD = ["docker", "build", "-t", f"bench/dockerfile:{TAG}", "."]
DOCKER_ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}


def dockerfile_peer(engine: docker.DockerClient, work: Path, base: str) -> dict[str, float]:
    """The plain Dockerfile: a cold build (no cache) and a rebuild after its last line changed."""

    def build(marker: str, *flags: str) -> float:
        write_peer(work, base, marker)
        return run([*DOCKER_BUILD[:2], *flags, *DOCKER_BUILD[2:]], cwd=work, env=DOCKER_ENV)

    cold = build("first", "--no-cache")
    rebuild = build("changed")
    image = engine.images.get(f"bench/dockerfile:{TAG}")
    return {"cold_s": cold, "rebuild_s": rebuild, "size_bytes": image.attrs["Size"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-fastai", action="store_true", help="leave (e) out")
    parser.add_argument("--skip-wheelhouse", action="store_true", help="leave (h) out")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--baseline", metavar="REV", help="also time the build of this git revision"
    )
    opts = parser.parse_args()
    engine = docker.from_env(timeout=900)
    base, _id, _note = docker_engine.ensure_base_image(
        engine, stacks.resolve().os, None, lambda m: print(f"bench: {m}", file=sys.stderr)
    )
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="gpubake-bench-") as tmp:
        work = Path(tmp)
        tree = copy_checkout(work / "tree")
        # a fresh cache: the cold build downloads everything, the rebuild reuses it
        env = {**os.environ, "PYTHONPATH": str(tree), "XDG_CACHE_HOME": str(work / "cache")}
        print("bench: (a) cold build of gpubake/pytorch:bench ...", file=sys.stderr)
        results["cold_s"] = gpubake(tree, env, "--force")
        append_line(tree / "roles" / "gpu_smoke_test" / "tasks" / "main.yml", "# bench: changed")
        print("bench: (b) rebuild after a one-line change in gpu_smoke_test ...", file=sys.stderr)
        results["rebuild_s"] = gpubake(tree, env)
        results["rebuild_ratio"] = results["rebuild_s"] / results["cold_s"]

        image = engine.images.get(f"gpubake/pytorch:{TAG}")
        out = engine.containers.run(
            image.id, ["du", "-sb", ENV_PREFIX], remove=True, user="root", entrypoint=[]
        )
        results["image_bytes"] = image.attrs["Size"]
        results["env_bytes"] = int(out.split()[0])
        results["size_ratio"] = results["image_bytes"] / results["env_bytes"]

        if not opts.skip_fastai:
            print("bench: (e) fastai on pytorch ...", file=sys.stderr)
            results["fastai_build_s"] = gpubake(tree, env, "--stack", "fastai")
            fastai = engine.images.get(f"gpubake/fastai:{TAG}")
            results["fastai_bytes"] = fastai.attrs["Size"]
            results["fastai_own_bytes"] = fastai.attrs["Size"] - image.attrs["Size"]
            results["fastai_own_ratio"] = results["fastai_own_bytes"] / results["fastai_bytes"]

        if opts.baseline:
            print(
                f"bench: (g) warm rebuild against the build of {opts.baseline} ...", file=sys.stderr
            )
            results["warm_s"] = gpubake(tree, env, "--force")
            old = extract_revision(opts.baseline, work / "baseline")
            results["baseline_s"] = gpubake(
                old, {**env, "PYTHONPATH": str(old)}, "--force", "--tag", f"{TAG}-baseline"
            )
            results["warm_vs_baseline"] = results["warm_s"] / results["baseline_s"]

        if not opts.skip_wheelhouse:
            print("bench: (h) cold build from an empty wheelhouse ...", file=sys.stderr)
            house = work / "wheelhouse"
            fresh = {**env, "XDG_CACHE_HOME": str(work / "cache-h")}
            results["wheelhouse_cold_s"] = gpubake(
                tree, fresh, "--force", "--wheelhouse", str(house)
            )

        print("bench: (f) the plain Dockerfile peer ...", file=sys.stderr)
        (work / "peer").mkdir()
        peer = dockerfile_peer(engine, work / "peer", base)
    results.update({f"dockerfile_{k}": v for k, v in peer.items()})
    results["cold_vs_dockerfile"] = results["cold_s"] / peer["cold_s"]
    results["rebuild_vs_dockerfile"] = results["rebuild_s"] / peer["rebuild_s"]
    if "wheelhouse_cold_s" in results:
        results["wheelhouse_vs_dockerfile"] = results["wheelhouse_cold_s"] / peer["cold_s"]
    report(results, as_json=opts.json)


def report(r: dict[str, float], *, as_json: bool) -> None:
    met = {
        "rebuild_ratio": r["rebuild_ratio"] <= GOALS["rebuild_ratio"],
        "size_ratio": r["size_ratio"] <= GOALS["size_ratio"],
        "cold_vs_dockerfile": r["cold_vs_dockerfile"] <= GOALS["cold_vs_dockerfile"],
        "rebuild_vs_dockerfile": r["rebuild_vs_dockerfile"] <= GOALS["rebuild_vs_dockerfile"],
    }
    if "wheelhouse_vs_dockerfile" in r:
        met["wheelhouse_vs_dockerfile"] = (
            r["wheelhouse_vs_dockerfile"] <= GOALS["wheelhouse_vs_dockerfile"]
        )
    if as_json:
        print(json.dumps({"results": r, "goals": GOALS, "met": met}, indent=2, sort_keys=True))
        return

    def mark(key: str) -> str:
        return "met" if met[key] else "NOT met"

    gb = 1e9
    print(f"(a) cold build                     {r['cold_s']:8.1f} s")
    print(f"(b) rebuild, one line in gpu_smoke {r['rebuild_s']:8.1f} s")
    print(
        f"(c) b / a                          {r['rebuild_ratio']:8.3f}   goal <= 0.15: "
        f"{mark('rebuild_ratio')}"
    )
    print(
        f"(d) image / env                    {r['size_ratio']:8.3f}   goal <= 1.05: "
        f"{mark('size_ratio')}  ({r['image_bytes'] / gb:.2f} GB / {r['env_bytes'] / gb:.2f} GB)"
    )
    if "fastai_bytes" in r:
        print(
            f"(e) fastai's own layers / total    {r['fastai_own_ratio']:8.3f}   "
            f"({r['fastai_own_bytes'] / gb:.2f} GB of {r['fastai_bytes'] / gb:.2f} GB)"
        )
    print(
        f"(f) Dockerfile cold                {r['dockerfile_cold_s']:8.1f} s; gpubake / it "
        f"{r['cold_vs_dockerfile']:.2f}   goal <= 1.1: {mark('cold_vs_dockerfile')}"
    )
    print(
        f"    Dockerfile late-change rebuild {r['dockerfile_rebuild_s']:8.1f} s; gpubake's "
        f"{r['rebuild_s']:.1f} s ({r['rebuild_vs_dockerfile']:.2f} x)   goal <= 1.5 x: "
        f"{mark('rebuild_vs_dockerfile')}"
    )

    if "wheelhouse_cold_s" in r:
        print(
            f"(h) cold build, empty wheelhouse   {r['wheelhouse_cold_s']:8.1f} s; "
            f"/ Dockerfile cold {r['wheelhouse_vs_dockerfile']:.2f}   "
            f"goal <= 1.0: {mark('wheelhouse_vs_dockerfile')}"
        )


if __name__ == "__main__":
    main()
