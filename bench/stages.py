#!/usr/bin/env python3
"""Measured in one run: where a container stage's fixed cost goes (issue 30, item 3).

    .venv/bin/python bench/stages.py [--stack NAME] [--baseline REV] [--runs N] [--json]

A stage is one Packer build: gpubake's plan and render, Packer's start and the build
container's, ansible-playbook's start, the facts, the roles' tasks, the lock's install, the
commit, then gpubake's layer scan. On a small stack (a uv environment with one package, so
that almost all of a stage is fixed cost; --stack pytorch for the default stack, to set the
fixed cost against the install and the commit) it rebuilds every stage of the stack
(--force) with `gpubake build -v`, stamps each output line as it comes, and splits each
stage's time into those phases, with the number of tasks Ansible ran (skipped ones and the
install excluded) and their mean cost. With --dockerfile it also builds bench/layers.py's
plain Dockerfile (`docker build --no-cache`) and splits each step into its command (to its
last output line) and its commit (to the removal of its container): the peer's fixed cost.

With --baseline REV the same is measured for gpubake at REV (git archive), the two trees
alternating run by run, and the ratio of each phase to the baseline's is printed: the fixed
cost a change saves, measured on the same machine in one run. Each figure is the minimum over
--runs (default 2) builds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
from layers import (
    DOCKER_BUILD,
    DOCKER_ENV,
    HOST_BUNDLE,
    ROOT,
    copy_checkout,
    extract_revision,
    write_peer,
)

from gpubake import stacks
from gpubake.build import docker_engine

OS = "debian-12"
STACK = "tiny"  # tests/small_stacks.yml: a uv environment with one package
STACK_YAML = (ROOT / "tests" / "small_stacks.yml").read_text(encoding="utf-8")
STACK_YAML = STACK_YAML.split("\nstacks:\n", 1)[1]  # the entries, to append to stacks.yml
PHASES = (
    ("gpubake", "gpubake before Packer (plan, render)"),
    ("packer", "Packer and the build container start"),
    ("ansible_start", "ansible-playbook's start"),
    ("facts", "facts (python check, setup, packages)"),
    ("tasks", "the roles' other tasks"),
    ("install", "the lock's install (uv pip install)"),
    ("commit", "Ansible's end to the commit's end"),
    ("cleanup", "Packer's kill and rm, the tag"),
    ("after", "gpubake after Packer (scan, record)"),
)
FACT_TASKS = ("Gather facts", "Gather the installed packages", "Install python3 when the host")
INSTALL_TASK = "Install the lock, hashes required"  # role python_env's
_STAGE = re.compile(r"^gpubake: stage \d+/\d+ \S+:(?P<stage>\w+): (?P<what>building|built in)")
_TASK = re.compile(r"(?:TASK|RUNNING HANDLER) \[(?P<name>[^\]]*)\]")
_RAN = re.compile(r"^(ok|changed): \[")


def stamped_build(tree: Path, env: dict[str, str], stack: str) -> list[tuple[float, str]]:
    cmd = [sys.executable, "-m", "gpubake", "build", "--target", "docker", "--stack", stack]
    cmd += ["--os", OS, "--tag", "bench-stages", "--force", "-v"]
    if HOST_BUNDLE.is_file():
        cmd += ["--ca-bundle", str(HOST_BUNDLE)]
    proc = subprocess.Popen(
        cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = [(time.monotonic(), raw.rstrip("\n")) for raw in proc.stdout]
    if proc.wait() != 0:
        sys.exit(f"bench: the build in {tree} failed: {[text for _, text in lines[-5:]]}")
    return lines


def split(lines: list[tuple[float, str]]) -> dict[str, dict[str, float]]:
    """Each stage's seconds per phase, and its count of tasks that ran."""
    stages: dict[str, dict[str, float]] = {}
    cur: dict[str, float] | None = None
    marks: dict[str, float] = {}
    task_at: float | None = None
    task_name = ""
    ran = False

    def end_task(now: float) -> None:
        nonlocal task_at
        if cur is not None and task_at is not None:
            name = task_name.split(" : ")[-1]
            key = "facts" if name.startswith(FACT_TASKS) else "tasks"
            key = "install" if name == INSTALL_TASK else key
            cur[key] += now - task_at
            cur["ran"] += ran and key == "tasks"
        task_at = None

    for now, raw in lines:
        text = re.sub(r"^\s*(==> )?docker\.gpubake: ", "", raw)
        if m := _STAGE.match(raw):
            if m["what"] == "building":
                cur = stages.setdefault(m["stage"], collections.defaultdict(float))
                marks = {"start": now}
            elif cur is not None:
                cur["after"] = now - marks.get("finished", now)
                cur["total"] = now - marks["start"]
                cur = None
            continue
        if cur is None:
            continue
        if "Creating a temporary directory" in text and "packer_at" not in marks:
            marks["packer_at"] = now
            cur["gpubake"] = now - marks["start"]
        elif text.startswith("Executing Ansible"):
            marks["ansible_at"] = now
            cur["packer"] = now - marks["packer_at"]
        elif m := _TASK.search(text):
            if "first_task" not in marks:
                marks["first_task"] = now
                cur["ansible_start"] = now - marks["ansible_at"]
            end_task(now)
            task_at, task_name, ran = now, m["name"], False
        elif _RAN.match(text):
            ran = True
        elif text.startswith("PLAY RECAP"):
            end_task(now)
            marks["recap"] = now
        elif text.startswith("Killing the container"):
            marks["killing"] = now
            cur["commit"] = now - marks["recap"]
        elif text.startswith("Build 'docker.gpubake' finished"):
            marks["finished"] = now
            cur["cleanup"] = now - marks.get("killing", now)
    return stages


def dockerfile_steps(work: Path) -> list[tuple[str, float, float]]:
    """The plain Dockerfile built cold: each step's (instruction, command s, commit s)."""
    engine = docker.from_env(timeout=900)
    base, _id, _note = docker_engine.ensure_base_image(
        engine, stacks.resolve().os, None, lambda m: print(f"bench: {m}", file=sys.stderr)
    )
    write_peer(work, base, "stages")
    proc = subprocess.Popen(
        [*DOCKER_BUILD[:2], "--no-cache", *DOCKER_BUILD[2:]],
        cwd=work, env=DOCKER_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    steps: list[tuple[str, float, float]] = []
    step, started, last = "", 0.0, 0.0
    for raw in proc.stdout:
        now, text = time.monotonic(), re.sub(r"\x1b\[[0-9;]*m", "", raw).strip()  # uv's colours
        if m := re.match(r"Step \d+/\d+ : (.*)", text):
            step, started, last = m[1][:60], now, now
        elif text.startswith("---> Running in"):
            started = last = now
        elif text.startswith("Removing intermediate container"):
            steps.append((step, last - started, now - last))
        elif text.startswith("---> "):
            continue
        elif text:
            last = now
    if proc.wait() != 0:
        sys.exit("bench: the Dockerfile's build failed")
    return steps


def best(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per stage and phase, the minimum over the runs (the least disturbed measurement)."""
    out: dict[str, dict[str, float]] = {}
    for stage in runs[0]:
        out[stage] = {
            key: min(run[stage].get(key, 0.0) for run in runs)
            for key in {k for run in runs for k in run[stage]}
        }
    return out


def prepare(tree: Path, stack: str) -> dict[str, str]:
    if stack != STACK:  # a stack of the checkout, locked there
        return {**os.environ, "PYTHONPATH": str(tree)}
    stacks = tree / "images" / "stacks.yml"
    stacks.write_text(stacks.read_text(encoding="utf-8").rstrip("\n") + "\n" + STACK_YAML)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    lock = [sys.executable, "-m", "gpubake", "lock", "--stack", STACK, "--os", OS]
    if subprocess.run(lock, cwd=tree, env=env, capture_output=True, check=False).returncode:
        sys.exit(f"bench: gpubake lock failed in {tree}")
    return env


def report(
    results: dict[str, dict[str, dict[str, float]]],
    *,
    as_json: bool,
    steps: list[tuple[str, float, float]],
) -> None:
    if as_json:
        print(json.dumps({"stages": results, "dockerfile_steps": steps}, indent=2, sort_keys=True))
        return
    names = list(results)
    for stage in results[names[0]]:
        print(f"stage {stage}:")
        for key, label in (*PHASES, ("total", "total")):
            cells = [f"{results[n][stage].get(key, 0.0):6.2f} s" for n in names]
            ratio = ""
            now, then = (results[n][stage].get(key, 0.0) for n in (names[0], names[-1]))
            if len(names) == 2 and then:
                ratio = f"  {now / then:.2f} x"
            print(f"  {label:<40} {'  '.join(cells)}{ratio}")
        ran = [int(results[n][stage].get("ran", 0)) for n in names]
        per = [results[n][stage]["tasks"] / max(1, r) for n, r in zip(names, ran, strict=True)]
        print(
            "  tasks that ran (not counting facts)      "
            + "  ".join(f"{r:3d}, {p:.2f} s each" for r, p in zip(ran, per, strict=True))
        )
    totals = [sum(s["total"] for s in results[n].values()) for n in names]
    line = "  ".join(f"{t:6.2f} s" for t in totals)
    ratio = f"  {totals[0] / totals[1]:.2f} x" if len(totals) == 2 else ""
    print(f"all stages ({', '.join(names)}): {line}{ratio}")
    if steps:
        print("the plain Dockerfile, built cold (command, then commit and removal):")
        for step, command, commit in steps:
            print(f"  {command:6.2f} s + {commit:6.2f} s  {step}")
        total = sum(c + k for _, c, k in steps)
        print(f"  {total:6.2f} s in all, of which commits {sum(k for _, _, k in steps):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="a git revision to measure against")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--stack", default=STACK, help=f"the stack to build (default {STACK})")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dockerfile", action="store_true", help="split the Dockerfile's too")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpubake-bench-stages-") as tmp:
        work = Path(tmp)
        trees = {"this tree": copy_checkout(work / "tree")}
        if opts.baseline:
            trees[opts.baseline] = extract_revision(opts.baseline, work / "baseline")
        envs = {name: prepare(tree, opts.stack) for name, tree in trees.items()}
        runs: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in trees}
        for n in range(opts.runs + 1):  # the first round builds what --force does not rebuild
            for name, tree in trees.items():
                print(f"bench: {name}, run {n} ...", file=sys.stderr)
                stages = split(stamped_build(tree, envs[name], opts.stack))
                if n:
                    runs[name].append(stages)
        results = {name: best(r) for name, r in runs.items()}
        steps = []
        if opts.dockerfile:
            print("bench: the plain Dockerfile ...", file=sys.stderr)
            (work / "peer").mkdir()
            steps = dockerfile_steps(work / "peer")
        report(results, as_json=opts.json, steps=steps)


if __name__ == "__main__":
    main()
