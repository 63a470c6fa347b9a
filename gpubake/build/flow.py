"""The build flow behind `gpubake build` and `gpubake render`: check everything that can be
checked here, gather what the plan takes from this machine, plan, then run Packer (image
targets) or ansible-playbook (host targets), reporting progress on stderr.

gpubake.cli parses the command line into a `BuildRequest`; this module does the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from gpubake import GpubakeError, resources, size_text, stacks
from gpubake.build import (
    ansible,
    disk_image,
    docker_engine,
    guard,
    hosts,
    journal,
    locks,
    stages,
    targets,
    vm_disk,
    wheelhouse,
)
from gpubake.build.packer import Packer
from gpubake.build.plan import (
    SMOKE_CPU_CHECKED,
    SMOKE_LABEL,
    BuildPlan,
    CloudOptions,
    check_ca_bundle,
    check_tag,
    make_plan,
)
from gpubake.build.render import render, var_file_name
from gpubake.build.stages import STAGE_REPOSITORY
from gpubake.clouds import aws as cloud_rules_aws
from gpubake.clouds import build as clouds
from gpubake.clouds import gcp as cloud_rules_gcp
from gpubake.clouds.location import settle_options
from gpubake.notebooks import options as notebook_options
from gpubake.publish import images, scan

LOG_DIR = resources.cache_dir() / "logs"


def echo(message: str) -> None:
    click.echo(f"gpubake: {message}", err=True)


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    """What `gpubake build` was asked for, as parsed from the command line."""

    target: str = targets.DEFAULT
    stack: str | None = None
    os_key: str | None = None
    gpu: str | None = None
    variables: tuple[str, ...] = ()
    base_image: str | None = None
    ca_bundle: Path | None = None
    tag: str = "latest"
    project: str | None = None
    zone: str | None = None
    region: str | None = None
    profile: str | None = None
    disk_size: int | None = None
    no_gpu_build: bool = False
    host: str | None = None
    ssh_key: Path | None = None
    known_hosts: Path | None = None
    check_mode: bool = False
    force: bool = False
    dry_run: bool = False
    as_json: bool = False
    verbose: int = 0
    wheelhouse: Path | None = None
    offline: bool = False


@dataclasses.dataclass
class _Doing:
    """What a build is doing, for the line an interruption ends with."""

    what: str


@dataclasses.dataclass(frozen=True)
class _Run:
    """A request after its stack resolved and its options were checked."""

    stack: stacks.Stack
    target: targets.Target
    request: BuildRequest
    bundle: Path | None
    doing: _Doing = dataclasses.field(default_factory=lambda: _Doing("the build's checks"))

    @property
    def ansible_verbosity(self) -> int:
        return max(self.request.verbose - 1, 0)


def machine_inputs(packer: Any | None) -> dict[str, Any]:
    """What a plan takes from this machine (gpubake.build.plan is pure): the Packer version, the
    ansible-playbook to run, the time, the git revision of gpubake's data, a build id."""
    inputs: dict[str, Any] = {
        "ansible_playbook": ansible.playbook_command(),
        "created": dt.datetime.now(dt.UTC),
        "git_revision": resources.source_revision(),
        "build_id": str(os.getpid()),
    }
    if packer is not None:
        inputs["packer_version"] = packer.version
    return inputs


def resolve_stack(
    stack: str | None,
    os_key: str | None,
    gpu: str | None,
    variables: Sequence[str],
    target: targets.Target,
    *,
    gpu_build: bool = True,
) -> stacks.Stack:
    if target.is_cloud_image and gpu is None and gpu_build:
        gpu = stacks.stacks_data()["default_cloud_gpu"]
    resolved = stacks.resolve(
        stack,
        os_key=os_key,
        gpu=gpu,
        variables=stacks.parse_vars(list(variables)),
        target=target.name,
    )
    for warning in resolved.warnings:
        echo(f"warning: {warning}")
    return resolved


def build(request: BuildRequest) -> None:
    """Build an image (or set up a host) as `request` asks; every local check comes first."""
    target = targets.get(request.target)
    resolved = resolve_stack(
        request.stack,
        request.os_key,
        request.gpu,
        request.variables,
        target,
        gpu_build=not request.no_gpu_build,
    )
    check_tag(request.tag)
    run = _Run(resolved, target, request, check_ca_bundle(request.ca_bundle))
    with guard.sigterm_interrupts():
        try:
            if target.kind == "container":
                _build_container(run)
            elif target.kind == "vm":
                _build_cloud_image(run)
            elif target.kind == "disk":
                _build_disk_image(run)
            else:
                _apply_host(run)
        except KeyboardInterrupt as exc:
            sig = guard.signal_of(exc)
            kept = "no image folder was replaced" if target.kind == "disk" else "no tag was moved"
            raise guard.BuildInterruptedError(
                f"{sig.name} during {run.doing.what}: Packer's build "
                f"{'container' if target.kind == 'container' else 'VM'} and gpubake's work dir "
                f"are removed, and {kept}; run the same command to build again",
                128 + sig.value,
            ) from None


def container_locks(stack: stacks.Stack, *, verify: bool) -> tuple[dict[str, Any], list[str]]:
    """The lock of each stack of the lineage, checked (and verified against the index
    unless `verify` is false), with the notes of locks re-resolved for --var packages.X."""
    arch = stacks.machine_arch()
    found: dict[str, Any] = {}
    notes: list[str] = []
    for level in stack.lineage:
        lock, note = locks.for_build(level, arch)
        if verify:
            locks.verify(lock)
        found[level.name] = lock
        if note:
            notes.append(note)
    return found, notes


def container_chain(
    run: _Run,
    plan_inputs: dict[str, Any],
    lock_texts: dict[str, Any],
    *,
    gpu_build: bool = False,
    wheels: Path | None = None,
    offline: bool = False,
) -> list:
    def plan_for(level: stacks.Stack) -> BuildPlan:
        return make_plan(level, target=run.target.name, **plan_inputs)

    return stages.plan_chain(
        run.stack,
        plan_for,
        lock_texts,
        uv_cache=None if wheels else locks.uv_cache_dir(),
        gpu_build=gpu_build,
        wheels=wheels,
        offline=offline,
    )


def _wheelhouse(run: _Run, lock_texts: dict[str, Any]) -> tuple[Path | None, Any]:
    """The wheelhouse the build installs from, or None (the index, uv's cache), and the
    download of what it lacks (wheelhouse.Prefetch; None for --offline and dry runs).
    --offline: it must hold every file already; --wheelhouse alone: what it lacks is fetched
    while the first stage builds."""
    req = run.request
    if not (req.offline or req.wheelhouse):
        return None, None
    folder = (req.wheelhouse or wheelhouse.default_dir()).expanduser().resolve()
    arch = stacks.machine_arch()
    if req.offline:
        wheelhouse.check(folder, run.stack, lock_texts.values(), arch)
        return folder, None
    needed = wheelhouse.need(run.stack, lock_texts.values(), arch)  # refuses a conda stack
    return folder, None if req.dry_run else wheelhouse.Prefetch(folder, needed, echo)


def _wait_for_wheels(run: _Run, prefetch: Any, where: str) -> None:
    """Before a stage installs the lock from the wheelhouse: its download, finished."""
    if prefetch is None or prefetch.waited:
        return
    run.doing.what = "the wheelhouse's download"
    if prefetch.running():
        echo(f"{where}: waiting for the wheelhouse's download")
    _fetched(prefetch.folder, *prefetch.wait())


def _fetched(folder: Path, count: int, size: int) -> None:
    if count:
        echo(f"wheelhouse {folder}: fetched {count} file(s), {size_text(size)}")


#: The architecture of VM images and hosts: x86_64 only (stacks refuses Arm GPUs' machines).
VM_ARCH = "x86_64"


def _vm_lock(run: _Run) -> Any:
    """--wheelhouse on a VM or host target: the lock of what the VM playbook installs, which
    the build then installs (hashes required) instead of the pins from the index; None
    without it. A VM also serves JupyterLab (role jupyter): where the stack's packages lack
    its pins, the lock is the stack's re-resolved with them (kept in the lock cache)."""
    if run.request.wheelhouse is None:
        return None
    pins = notebook_options.jupyter()["jupyter_packages"]
    own = dict(run.stack.packages)
    extra = tuple((str(name), str(version)) for name, version in pins.items() if name not in own)
    stack = run.stack
    if extra:
        stack = dataclasses.replace(
            stack,
            packages=stack.packages + extra,
            overrides=stack.overrides + tuple((f"packages.{n}", v) for n, v in extra),
        )
    lock, note = locks.for_build(stack, VM_ARCH)
    if extra:
        added = ", ".join(f"{name}=={version}" for name, version in extra)
        echo(f"the VM's lock: stack {run.stack.name}'s with role jupyter's {added}: {lock.path}")
    elif note:
        echo(note)
    return lock


@contextlib.contextmanager
def _vm_wheelhouse(run: _Run, plan: BuildPlan, lock: Any) -> Iterator[BuildPlan]:
    """The plan, with the lock and an archive of the wheelhouse's files for it (fetched first
    where the wheelhouse lacks them), which python_env uploads to the machine in one transfer
    and installs from with no index; the archive is removed when the block ends. No lock (no
    --wheelhouse): the plan as it is."""
    if lock is None:
        yield plan
        return
    variables = {
        **plan.ansible_vars,
        "python_env_wheelhouse": wheelhouse.MOUNT,  # where a container has it mounted
    }
    if run.request.dry_run:  # nothing fetched, no archive made
        yield dataclasses.replace(plan, python_env_lock=lock.text, ansible_vars=variables)
        return
    assert run.request.wheelhouse is not None
    folder = run.request.wheelhouse.expanduser().resolve()
    run.doing.what = "the wheelhouse's download"
    _fetched(folder, *wheelhouse.fetch_for(folder, run.stack, [lock], VM_ARCH, echo))
    files = wheelhouse.files_for(folder, run.stack, [lock], VM_ARCH)
    work = resources.cache_dir() / "work"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheel-upload-", dir=work) as tmp:
        archive = Path(tmp) / "wheelhouse.tar"
        run.doing.what = "the wheelhouse's archive"
        with tarfile.open(archive, "w") as tar:  # not compressed: wheels are zip files
            for path in files:
                tar.add(path, arcname=path.name)
        size_now = size_text(archive.stat().st_size)
        echo(f"wheelhouse {folder}: {len(files)} file(s), {size_now}, to upload")
        variables["python_env_wheelhouse_archive"] = str(archive)
        yield dataclasses.replace(plan, python_env_lock=lock.text, ansible_vars=variables)


def _reusable(engine: Any, chain: list, force: bool, stack: str) -> dict[str, Any]:
    """Stage hash -> the local image built from identical inputs, for the stages not forced
    (--force rebuilds the requested stack's own stages, not its parents')."""
    found = {}
    below = docker_engine.local_image(engine, chain[0].plan.base_image)
    for stage in chain:
        if force and stage.stack == stack:
            break  # every stage above a rebuilt one is rebuilt too
        image = _identical(engine, stage, below)
        if image is None:
            break
        found[stage.input_hash] = below = image
    return found


def _identical(engine: Any, stage: Any, below: Any) -> Any:
    """The local image of `stage` built from identical inputs and on the very image `below`
    (not on one that a --force build replaced since), so that it shares its layers; or None."""
    plan = stage.plan
    found = docker_engine.images_with_hash(
        engine, plan.image_repository, stage.input_hash, plan.image_ref
    )
    if not stage.final:
        # the same stage of another stack (every stack of an OS has the same os stage)
        found += docker_engine.images_with_hash(engine, f"{STAGE_REPOSITORY}/", stage.input_hash)
    # the first on `below`: an older one may sit on a base image that was made again since
    return next((i for i in found if docker_engine.built_on(i, below)), None)


def _build_container(run: _Run) -> None:
    req = run.request
    doing = run.doing
    started = time.monotonic()
    packer = Packer.detect()
    engine = docker_engine.client()
    notes: list[str] = []
    # the locks first: a stale, edited or unresolvable lock stops the build before anything
    lock_texts, lock_notes = container_locks(run.stack, verify=not (req.dry_run or req.offline))
    house, prefetch = _wheelhouse(run, lock_texts)
    if req.dry_run:
        ref, image_id = _dry_run_base(engine, run.stack.os, req.base_image, notes)
    else:
        guard.remove_leftovers(engine, echo)
        doing.what = "the base image's creation"
        ref, image_id, note = docker_engine.ensure_base_image(
            engine, run.stack.os, req.base_image, echo, offline=req.offline
        )
        if note:
            notes.append(note)
    gpu_build, gpu_note = docker_engine.gpus_for_containers(engine)
    if gpu_note:
        notes.append(gpu_note)
    inputs = {
        "base_image": ref,
        "base_image_id": image_id,
        "tag": req.tag,
        "ca_bundle": run.bundle,
        "verbose": run.ansible_verbosity,
        "notes": tuple(notes + lock_notes),
        **machine_inputs(packer),
    }
    chain = container_chain(
        run, inputs, lock_texts, gpu_build=gpu_build, wheels=house, offline=req.offline
    )
    final = chain[-1]
    if req.dry_run:
        reuse = _reusable(engine, chain, req.force, run.stack.name)
        print_plan(final.plan, packer, req.as_json, chain=chain, reuse=reuse)
        return
    # one build of an output at a time: a second waits, then finds it built (and skips)
    doing.what = "the wait for another build of the same image"
    with guard.held(guard.output_key(final.plan.image_ref), echo, f"{final.plan.image_ref}"):
        reuse = _reusable(engine, chain, req.force, run.stack.name)
        _build_chain(run, engine, packer, chain, reuse, started, prefetch)


def _build_chain(
    run: _Run,
    engine: Any,
    packer: Any,
    chain: list,
    reuse: dict[str, Any],
    started: float,
    prefetch: Any = None,
) -> None:
    """Build the chain's stages that `reuse` lacks. `prefetch` (a wheelhouse's download)
    starts with the first stage built and is waited for by the first that installs the lock."""
    final = chain[-1]
    plan = final.plan
    if final.input_hash in reuse:
        existing = reuse[final.input_hash]
        # the stack's image and its parents' (gpubake/<parent>:<tag>) under the asked tag
        for stage in chain:
            image = reuse[stage.input_hash]
            if stage.final and stage.plan.image_ref not in image.tags:
                image.tag(stage.plan.image_repository, stage.plan.image_tag)
            if stage.final and SMOKE_LABEL not in (image.labels or {}):
                images.label_smoke(engine, stage.plan.image_ref)  # built before it was labelled
        echo(
            f"skipped: {plan.image_ref} is already built from identical inputs "
            f"(input hash {plan.input_hash[:12]}, image {existing.short_id}); "
            "use --force to rebuild"
        )
        click.echo(plan.image_ref)
        return

    echo(
        f"building {plan.image_ref}: stack {run.stack.name} on {run.stack.os.key}, "
        f"base {chain[0].plan.base_image}, Packer {packer.version_text}, "
        f"input hash {plan.input_hash[:12]}, {len(chain)} stages"
    )
    for note in plan.notes:
        echo(note)
    previous = docker_engine.local_image(engine, plan.image_ref)
    ahead: list[threading.Thread] = []  # the layer scans running while later stages build
    try:
        for number, stage in enumerate(chain, 1):
            where = f"stage {number}/{len(chain)} {stage.label}"
            image = reuse.get(stage.input_hash)
            if image is not None:
                if stage.plan.image_ref not in image.tags:
                    image.tag(stage.plan.image_repository, stage.plan.image_tag)
                echo(f"{where}: reused {image.short_id} (input hash {stage.input_hash[:12]})")
                continue
            if prefetch is not None and (stage.lock or "python_env" in stage.roles):
                run.doing.what = "the wheelhouse's download"
                prefetch.start()  # uv now (python_env installs it), the rest while this builds
                if stage.lock:
                    _wait_for_wheels(run, prefetch, where)
            run.doing.what = where
            key = guard.stage_key(stage.input_hash)
            with guard.held(key, echo, f"{where} (input hash {stage.input_hash[:12]})") as waited:
                if waited:  # built meanwhile by the build it waited for?
                    image = _reusable_stage(engine, stage, number, chain)
                    if image is not None:
                        echo(f"{where}: reused {image.short_id}, built meanwhile by another build")
                        continue
                _build_stage(
                    run, engine, packer, stage, where, key, last=stage is final, ahead=ahead
                )
        if prefetch is not None and prefetch.started:  # no stage waited for it: end it whole
            _wait_for_wheels(run, prefetch, plan.image_ref)
    except BaseException:
        if prefetch is not None:
            prefetch.stop()
        raise
    image = docker_engine.local_image(engine, plan.image_ref)
    size = f", {image.attrs['Size'] / 1e9:.2f} GB" if image is not None else ""
    smoke = (image.labels or {}).get(SMOKE_LABEL) if image is not None else None
    how = " (on the CPU only: no GPU here, so its GPU checks did not run)"
    echo(
        f"built {plan.image_ref}{size} in {elapsed(started)}; gpu-smoke passed in it"
        + (how if smoke == SMOKE_CPU_CHECKED else "")
    )
    dropped = docker_engine.drop_replaced(engine, previous, image)
    if dropped:
        echo(f"removed {dropped}, the image {plan.image_ref} pointed to before (now untagged)")
    click.echo(plan.image_ref)


def _reusable_stage(engine: Any, stage: Any, number: int, chain: list) -> Any:
    below_ref = chain[number - 2].plan.image_ref if number > 1 else stage.plan.base_image
    image = _identical(engine, stage, docker_engine.local_image(engine, below_ref))
    if image is None:
        return None
    if stage.plan.image_ref not in image.tags:
        image.tag(stage.plan.image_repository, stage.plan.image_tag)
    return image


def _build_stage(
    run: _Run,
    engine: Any,
    packer: Any,
    stage: Any,
    where: str,
    key: str,
    *,
    last: bool,
    ahead: list[threading.Thread],
) -> None:
    """One stage's Packer build. A stack's last stage is tagged `gpubake-stage/...:output-*`
    first; only once gpu-smoke's labels are on it and its layers scanned clean does the
    asked tag move onto it, so that an interrupted or failed build moves no tag. A stage
    below the last has its layers scanned in `ahead` threads while the next stage builds."""
    echo(f"{where}: building ({', '.join(stage.roles)})")
    stage_started = time.monotonic()
    plan = stage.plan
    staged_tag = f"{guard.STAGED_TAG_PREFIX}{stage.input_hash[:12]}"
    staged = f"{stages.STAGE_REPOSITORY}/{stage.stack}:{staged_tag}"
    packer_vars = {**plan.packer_vars, "container_labels": ["--label", f"{guard.LOCK_LABEL}={key}"]}
    if stage.final:
        packer_vars.update(image_repository=staged.split(":")[0], image_tag=staged_tag)
    before = docker_engine.dangling_volumes(engine)
    was = docker_engine.local_image(engine, plan.image_ref) if stage.final else None
    try:
        try:
            staging = dataclasses.replace(plan, packer_vars=packer_vars)
            run_packer(staging, packer, run.request.verbose, key)
        finally:
            docker_engine.drop_volumes(engine, docker_engine.dangling_volumes(engine) - before)
        if not stage.final:
            built = docker_engine.local_image(engine, plan.image_ref)
            if built is not None:
                ahead.append(scan.scan_ahead(built.id))
        else:  # gpu-smoke's result, known only now: labels; then every layer scanned
            run.doing.what = f"{where}: labelling and scanning"
            built = images.label_smoke(engine, staged)
            if any(thread.is_alive() for thread in ahead):
                echo(f"{where}: waiting for the scans of the earlier stages' layers")
            for thread in ahead:
                thread.join()
            ahead.clear()
            report = scan.scan_image(engine, staged, progress=lambda m: echo(f"{where}: {m}"))
            if report.findings:
                for finding in report.findings:
                    echo(f"secret found: {finding.line()}")
                raise scan.ScanError(
                    f"{where}: {len(report.findings)} secret(s) found in the image's layers "
                    f"(listed above; the first: {report.findings[0].line()}): remove them in "
                    "the role that adds them and build again; nothing was tagged"
                )
            echo(f"{where}: scanned {report.layers} layers, {report.files} files: no secrets")
            built.tag(plan.image_repository, plan.image_tag)
            engine.images.remove(staged, noprune=True)  # the asked tag holds it now
    except BaseException:
        with guard.uninterruptible():
            guard.remove_stage_images(engine, {stage.input_hash})
        raise
    own = docker_engine.own_size(engine, built, plan.base_image) if built else 0
    echo(f"{where}: built in {elapsed(stage_started)}, its layer {size_text(own)}")
    journal.record(
        stack=stage.stack,
        stage=stage.name,
        input_hash=stage.input_hash,
        image=built.id if built else None,
        seconds=round(time.monotonic() - stage_started, 1),
        forced=run.request.force and stage.stack == run.stack.name,
    )
    if stage.final and not last and was is not None:  # a parent's image, replaced
        docker_engine.drop_replaced(engine, was, built)


def _build_cloud_image(run: _Run) -> None:
    req = run.request
    started = time.monotonic()
    cloud = CloudOptions(
        project=req.project,
        zone=req.zone,
        region=req.region,
        profile=req.profile,
        disk_size_gb=req.disk_size,
        gpu_build=not req.no_gpu_build,
    )
    cloud = settle_options(run.target.name, cloud, os.environ)
    clouds.check_disk(run.target.name, run.stack, cloud.disk_size_gb)
    notes = []
    if not cloud.gpu_build:
        notes.append("--no-gpu-build: built on a CPU machine; gpu-smoke's GPU checks will not run")
    assert run.target.cloud is not None
    source = getattr(run.stack.os, run.target.cloud)
    assert source is not None
    base = "/".join(str(v) for v in source.values())
    session = None
    if not req.dry_run:
        session = clouds.session(run.target.name, cloud)
        notes.append(f"credentials: {clouds.check_credentials(session)}")
    packer = Packer.detect()
    lock = _vm_lock(run)
    plan = make_plan(
        run.stack,
        target=run.target.name,
        base_image=base,
        base_image_id=f"latest:{base}",
        ca_bundle=run.bundle,
        require_gpu=cloud.gpu_build,
        verbose=run.ansible_verbosity,
        notes=tuple(notes),
        cloud=cloud,
        lock=lock,
        **machine_inputs(packer),
    )
    if req.dry_run:
        with _vm_wheelhouse(run, plan, lock) as shown:
            print_plan(shown, packer, req.as_json)
        return
    run.doing.what = "the wait for another build of the same image"
    with guard.held(guard.output_key(f"{plan.target}:{plan.image_ref}"), echo, plan.image_ref):
        _build_cloud_image_locked(run, plan, packer, session, started, lock)


def _build_cloud_image_locked(
    run: _Run, plan: BuildPlan, packer: Any, session: Any, started: float, lock: Any
) -> None:
    req = run.request
    existing = clouds.find_existing(session, plan)
    if existing and not req.force:
        _skipped(existing, plan.input_hash)
        return
    with _vm_wheelhouse(run, plan, lock) as plan:
        echo(
            f"building {plan.image_ref}: stack {run.stack.name} on {run.stack.os.key}, "
            f"Packer {packer.version_text}, input hash {plan.input_hash[:12]}"
        )
        for note in plan.notes:
            echo(note)
        run.doing.what = f"the Packer build of {plan.image_ref}"
        run_packer(plan, packer, req.verbose, guard.output_key(f"{plan.target}:{plan.image_ref}"))
    echo(f"built {plan.image_ref} in {elapsed(started)}; gpu-smoke passed on it")
    click.echo(plan.image_ref)


def _skipped(existing: Any, input_hash: str) -> None:
    """Say that a VM image (cloud or disk) of identical inputs exists, and print it."""
    echo(
        f"skipped: {existing} is already built from identical inputs (input hash "
        f"{input_hash[:12]}); use --force to rebuild"
    )
    click.echo(existing)


def _build_disk_image(run: _Run) -> None:
    """Target qemu: the VM playbook, gpu-smoke and the seal on a VM booted from gpubake's
    base disk; the image is a folder of disk files (gpubake.build.disk_image)."""
    req = run.request
    started = time.monotonic()
    packer = Packer.detect()
    base_id = vm_disk.base_image_id(run.stack.os.key)
    lock = _vm_lock(run)
    plan = make_plan(
        run.stack,
        target=run.target.name,
        base_image=vm_disk.base_image_name(run.stack.os.key),
        base_image_id=base_id,
        ca_bundle=run.bundle,
        verbose=run.ansible_verbosity,
        cloud=CloudOptions(disk_size_gb=req.disk_size),
        lock=lock,
        **machine_inputs(packer),
    )
    if req.dry_run:
        with _vm_wheelhouse(run, plan, lock) as shown:
            print_plan(shown, packer, req.as_json)
        return
    name = plan.image_ref
    run.doing.what = "the wait for another build of the same image"
    key = disk_image.lock_key(name)
    with guard.held(key, echo, name):
        folder = disk_image.built(name, plan.input_hash)
        if folder is not None and not req.force:
            _skipped(folder, plan.input_hash)
            return
        with _vm_wheelhouse(run, plan, lock) as plan:
            run.doing.what = "the base disk's build"
            machine = disk_image.machine_vars(run.stack.os.key, echo)
            plan = dataclasses.replace(plan, packer_vars={**plan.packer_vars, **machine})
            echo(
                f"building {name}: stack {run.stack.name} on {run.stack.os.key}, Packer "
                f"{packer.version_text}, QEMU with {machine['qemu_accelerator']}, input hash "
                f"{plan.input_hash[:12]}"
            )
            if machine["qemu_accelerator"] == "tcg":
                echo("no usable KVM here: the VM runs under software emulation (TCG), slowly")
            record = {
                "image": name,
                "input_hash": plan.input_hash,
                "stack": run.stack.name,
                "os": run.stack.os.key,
                "base_disk": machine["qemu_base_disk"],
                "base_disk_sha256": machine["qemu_base_disk_sha256"],
                "labels": dict(plan.labels),
            }
            done: list[Path] = []
            run.doing.what = f"the Packer build of {name}"
            run_packer(
                plan,
                packer,
                req.verbose,
                key,
                before=disk_image.prepare,
                after=lambda scratch: done.append(disk_image.finish(scratch, name, record, echo)),
            )
    echo(f"built {name} in {elapsed(started)}; gpu-smoke passed on it: {done[0]}")
    click.echo(done[0])


def ssh_login(host: str | None, ssh_key: Path | None, known_hosts: Path | None) -> Any:
    """The SshLogin for --host (checked for form here: nothing is contacted), or None."""
    if host is None:
        return None
    hosts.split_host(host)
    return hosts.SshLogin(host, ssh_key, known_hosts)


def _apply_host(run: _Run) -> None:
    req = run.request
    login = ssh_login(req.host, req.ssh_key, req.known_hosts)
    host = login.host if login else None
    started = time.monotonic()
    inputs = machine_inputs(None)
    lock = _vm_lock(run)
    plan = make_plan(
        run.stack,
        target=run.target.name,
        base_image=host or "localhost",
        base_image_id=f"host:{host or 'localhost'}",
        ca_bundle=run.bundle,
        require_gpu=False,
        verbose=run.ansible_verbosity,
        lock=lock,
        **inputs,
    )
    if req.dry_run:
        with _vm_wheelhouse(run, plan, lock) as shown:
            print_plan(shown, None, req.as_json)
        return
    if login is not None:
        hosts.check_ssh(login)
    where = host or "this machine"
    check = req.check_mode
    echo(f"applying the VM playbook{' in check mode' if check else ''} to {where}")

    def on_line(line: str, message: str | None) -> None:
        if req.verbose or check:
            click.echo(line, err=True)
        elif message:
            click.echo(f"  {elapsed(started):>7}  {message}", err=True)

    def on_done(book: str, progress: Any) -> None:
        verb = "would change" if check else "changed"
        echo(f"{book} on {where}: {progress.changed_summary().replace('changed', verb, 1)}")

    with _vm_wheelhouse(run, plan, lock) as applied:
        hosts.apply(applied, login=login, on_line=on_line, check=check, on_done=on_done)
    if check:
        echo("check mode changed nothing; running gpu-smoke from gpubake itself")
        code = hosts.run_smoke(login, ["--require-gpu"])
        if code != 0:
            raise GpubakeError(f"gpu-smoke failed on {where} (exit {code})")
    echo(f"done on {where} in {elapsed(started)}")


def _dry_run_base(
    engine: Any, osinfo: stacks.OsInfo, explicit: str | None, notes: list[str]
) -> tuple[str, str]:
    candidates = [explicit] if explicit else [osinfo.base_image, docker_engine.base_ref(osinfo)]
    for ref in candidates:
        image = docker_engine.local_image(engine, ref)
        if image is not None:
            return ref, image.id
    if explicit:
        raise docker_engine.EngineError(
            f"--base-image {explicit}: not found locally: load it "
            "first (docker load / docker import)"
        )
    notes.append(
        f"no local base image: a build would pull {osinfo.base_image} or "
        f"debootstrap {docker_engine.base_ref(osinfo)}; the input hash will change then"
    )
    return osinfo.base_image, "not-yet-available"


_SOURCE_NAMES = {"nvidia": "NVIDIA's CUDA repository", "distro": "the OS's packages"}


def print_plan(
    plan: BuildPlan,
    packer: Any,
    as_json: bool,
    *,
    chain: Sequence[Any] = (),
    reuse: Mapping[str, Any] | None = None,
) -> None:
    reuse = reuse or {}
    data = plan.to_dict()
    if chain:
        data["stages"] = [
            {
                **stage.to_dict(),
                "reused": reuse[stage.input_hash].id if stage.input_hash in reuse else None,
            }
            for stage in chain
        ]
    if packer is not None:
        work = Path("<work dir>")
        data["packer_version"] = packer.version_text
        data["packer_command"] = " ".join(
            packer.command("build", work, work / var_file_name(plan.target), only=plan.packer_only)
        )
    else:
        data["packer_version"] = None
        data["packer_command"] = "(none: applied with ansible-playbook playbooks/vm.yml)"
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    s = plan.stack
    target = targets.get(plan.target)
    first = chain[0].plan if chain else plan  # a chain starts from the OS's base image
    rows = [
        ("target", plan.target),
        ("image", plan.image_ref),
        ("stack", f"{s.name}: {s.description}"),
        ("os", f"{s.os.key} (python {s.python})"),
        ("environment", f"{s.python_env} at /opt/gpubake/env"),
        ("packages", ", ".join(f"{k}=={v}" for k, v in s.packages)),
        ("cuda", f"{s.cuda} (driver branch {s.driver_branch}+ on the host)"),
    ]
    if target.is_vm:
        driver = (
            "none installed"
            if s.driver_source == "none"
            else f"branch {s.driver_branch}, {'open' if s.open_kernel_module else 'proprietary'} "
            f"module, from {_SOURCE_NAMES[s.driver_source]}"
        )
        toolkit = (
            "none installed"
            if s.cuda_source == "none"
            else f"{s.cuda_toolkit} from {_SOURCE_NAMES[s.cuda_source]}"
        )
        rows.append(("driver", f"{driver}; CUDA toolkit {toolkit}"))
    rows += [
        ("gpu", s.gpu.key if s.gpu else "any"),
        ("base image", f"{first.base_image} ({first.base_image_id[:19]})"),
        ("input hash", plan.input_hash),
        ("ca bundle", str(plan.ca_bundle) if plan.ca_bundle else "none"),
    ]
    pv = plan.packer_vars
    if target.cloud == "gcp":
        gpu = f" + {pv['gcp_accelerator_type']}" if pv["gcp_accelerator_type"] else ""
        rows.append(
            (
                "build vm",
                f"{pv['gcp_machine_type']}{gpu} in {pv['gcp_zone']}, "
                f"{pv['disk_size_gb']} GB, preemptible, "
                f"off after {pv['max_run_minutes']} min",
            )
        )
    elif target.cloud == "aws":
        rows.append(
            (
                "build vm",
                f"{pv['aws_instance_type']} in {pv['aws_region']}, "
                f"{pv['disk_size_gb']} GB, spot, terminates on shutdown, "
                f"off after {pv['max_run_minutes']} min",
            )
        )
    for stage in chain:
        image = reuse.get(stage.input_hash)
        what = f"reuse {image.short_id}" if image is not None else "build"
        rows.append(
            (
                f"stage {stage.label}",
                f"{what}, input hash {stage.input_hash[:12]}: {', '.join(stage.roles)}",
            )
        )
    if packer is not None:
        rows.append(("packer", f"{data['packer_version']}: {data['packer_command']}"))
    else:
        rows.append(("applies", "ansible-playbook playbooks/vm.yml, then playbooks/smoke.yml"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    for note in plan.notes:
        click.echo(f"note: {note}")


def elapsed(started: float) -> str:
    secs = int(time.monotonic() - started)
    return f"{secs // 60}m{secs % 60:02d}s"


def run_packer(
    plan: BuildPlan,
    packer: Any,
    verbose: int,
    key: str,
    *,
    before: Callable[[Path], None] | None = None,
    after: Callable[[Path], None] | None = None,
) -> None:
    """Packer on `plan`, in a work dir under gpubake's cache named after the lock on `key`
    (which the caller holds): Packer's and Ansible's temporary files go there too, so that
    nothing of a build (its variables, its CA bundle's path) is left elsewhere. `before` and
    `after` get the work dir before Packer starts and after it succeeded."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_path = LOG_DIR / f"{plan.stack.name}-{plan.target}-{stamp}.log"
    started = time.monotonic()
    with guard.work_dir(key) as scratch, log_path.open("w", encoding="utf-8") as log:
        work = scratch / "packer"
        (scratch / "tmp").mkdir()
        env = {"TMPDIR": str(scratch / "tmp"), "ANSIBLE_LOCAL_TEMP": str(scratch / "ansible")}
        var_file = render(plan, work, with_plugins=packer.needs_plugins)
        packer.init(work)
        if before is not None:
            before(scratch)

        def on_line(line: str, message: str | None) -> None:
            log.write(line + "\n")
            log.flush()
            if verbose:
                click.echo(line, err=True)
            elif message:
                click.echo(f"  {elapsed(started):>7}  {message}", err=True)

        try:
            packer.build(work, var_file, on_line, only=plan.packer_only, env=env)
        except GpubakeError as exc:
            raise GpubakeError(f"{exc} (full log: {log_path})") from None
        if after is not None:
            after(scratch)


@dataclasses.dataclass(frozen=True)
class RenderRequest:
    """What `gpubake render` was asked for."""

    out_dir: Path
    target: str = targets.DEFAULT
    stack: str | None = None
    os_key: str | None = None
    gpu: str | None = None
    variables: tuple[str, ...] = ()
    base_image: str | None = None
    tag: str = "latest"
    project: str | None = None
    zone: str | None = None
    region: str | None = None
    packer_plugins: bool | None = None


PLACEHOLDER = "REPLACE-ME"


def render_only(request: RenderRequest, say: Callable[[str], None] = click.echo) -> Path:
    """Write the target's Packer and Ansible inputs into request.out_dir, for `packer build .`
    by hand; cloud values not given are written as REPLACE-ME placeholders."""
    target = targets.get(request.target)
    if not target.uses_packer:
        raise targets.TargetError(
            f"--target {target.name} uses no Packer (it is applied with ansible-playbook): "
            f"nothing to render; use one of {', '.join(targets.names(packer=True))}"
        )
    for value, check in (
        (request.project, cloud_rules_gcp.check_project),
        (request.zone, cloud_rules_gcp.check_zone),
        (request.region, cloud_rules_aws.check_region),
    ):
        if value is not None:
            check(value)
    resolved = resolve_stack(request.stack, request.os_key, request.gpu, request.variables, target)
    check_tag(request.tag)
    packer = Packer.detect()
    plugins = packer.needs_plugins if request.packer_plugins is None else request.packer_plugins
    ref = request.base_image or resolved.os.base_image
    base_id = f"ref:{ref}"
    if target.kind == "disk":
        ref, base_id = (
            vm_disk.base_image_name(resolved.os.key),
            vm_disk.base_image_id(resolved.os.key),
        )
    cloud = CloudOptions(
        project=request.project or PLACEHOLDER,
        zone=request.zone or PLACEHOLDER,
        region=request.region or PLACEHOLDER,
    )
    inputs = machine_inputs(packer)
    if plugins:
        inputs["packer_version"] = max(packer.version, (1, 7, 0))
    plan = make_plan(
        resolved,
        target=target.name,
        base_image=ref,
        base_image_id=base_id,
        tag=request.tag,
        cloud=cloud,
        require_gpu=target.is_cloud_image,
        **inputs,
    )
    out = request.out_dir
    init = "packer init . && " if plugins else ""
    if target.kind == "container":
        chain_inputs = {
            **inputs,
            "base_image": ref,
            "base_image_id": f"ref:{ref}",
            "tag": request.tag,
        }
        return _render_chain(resolved, target, chain_inputs, plugins, out, say)
    if target.kind == "disk":
        disk = disk_image.render_vars(resolved.os.key, PLACEHOLDER)
        plan = dataclasses.replace(plan, packer_vars={**plan.packer_vars, **disk})
    render(plan, out, with_plugins=plugins)
    if target.kind == "disk":
        disk_image.prepare(out)
    say(f"wrote {out}; run: cd {out} && {init}packer build .")
    return out


def _render_chain(
    stack: stacks.Stack,
    target: targets.Target,
    inputs: dict[str, Any],
    plugins: bool,
    out: Path,
    say: Callable[[str], None],
) -> Path:
    """A container image's stages, one folder each (NN-stack-stage), and build.sh, which
    builds them in order: each stage starts from the image the one before tagged."""
    lock_objects, notes = container_locks(stack, verify=False)
    run = _Run(stack, target, BuildRequest(target=target.name), None)
    chain = container_chain(run, {**inputs, "notes": tuple(notes)}, lock_objects)
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    for number, stage in enumerate(chain, 1):
        folder = f"{number:02d}-{stage.stack}-{stage.name}"
        render(stage.plan, out / folder, with_plugins=plugins)
        folders.append(folder)
    init = "packer init . && " if plugins else ""
    script = out / "build.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"# Written by gpubake: the {len(chain)} stages of {chain[-1].plan.image_ref}, in order.\n"
        "set -eu\n"
        'cd "$(dirname "$0")"\n'
        f"for stage in {' '.join(folders)}; do\n"
        f'  (cd "$stage" && {init}packer build .)\n'
        "done\n",
        encoding="utf-8",
    )
    script.chmod(0o755)
    say(f"wrote {out}: {len(chain)} stages; run: {script}")
    return out
