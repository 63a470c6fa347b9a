"""Prebuilt containers: the smoke result as labels, `gpubake push`, `gpubake pull` and
`gpubake images`.

A built image carries what the pulling side needs as labels (gpubake.build.plan: stack, CUDA,
minimum driver branch, compute capabilities, the immutable tag; here: the gpu-smoke result
and its digest), so a registry's tag list and image configs say which image fits a machine
without pulling a layer. Layers go through the Docker Engine (it pushes each layer once and
pulls by digest); tags and labels are read and moved through the registry's own API
(gpubake.publish.registry), so a rolling tag moves only after the immutable one is pushed and read
back, and moving it sends no layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import docker
import docker.errors
import docker.types
import requests
from docker.models.images import Image

from gpubake import GpubakeError, stacks
from gpubake.build import docker_engine
from gpubake.build.plan import (
    CC_LABEL,
    CREATED_LABEL,
    CUDA_LABEL,
    FRAMEWORK_LABEL,
    FRAMEWORK_VERSION_LABEL,
    HASH_LABEL,
    MIN_DRIVER_LABEL,
    OS_LABEL,
    PYTHON_LABEL,
    SMOKE_CPU_CHECKED,
    SMOKE_DIGEST_LABEL,
    SMOKE_LABEL,
    SMOKE_PASSED,
    SMOKE_REPORT,
    STACK_LABEL,
    VERSION_LABEL,
    rolling_tags,
)
from gpubake.publish import machine, registry, selection

Echo = Callable[[str], None]


class PublishError(GpubakeError):
    """A push or pull that cannot or must not go ahead."""


# --------------------------------------------------------------------------- smoke labels


def smoke_result(report: dict[str, Any]) -> str:
    """passed: gpu-smoke ran its GPU checks and passed; cpu-checked: no GPU was visible, only
    the CPU-side checks ran (and passed)."""
    if not report.get("ok"):
        raise PublishError("gpu-smoke's report says it failed: the image does not count as built")
    return SMOKE_PASSED if report.get("gpu_visible") else SMOKE_CPU_CHECKED


def label_smoke(engine: docker.DockerClient, ref: str) -> Image:
    """Re-tag `ref` as the same layers with the gpu-smoke result and the report's digest as
    labels (a LABEL-only image: no layer is added), and the compute capabilities with the
    framework's own list where gpu-smoke read one (torch's arch list): Packer commits the
    image before gpubake can know them, so they are set here."""
    try:
        report = docker_engine.read_image_file(engine, ref, SMOKE_REPORT)
    except docker_engine.MissingFileError as exc:
        raise PublishError(f"{exc}: did gpu-smoke run in it?") from None
    try:
        parsed = json.loads(report)
    except ValueError:
        raise PublishError(f"{SMOKE_REPORT} of {ref} is not JSON: rebuild with --force") from None
    labels = {
        SMOKE_LABEL: smoke_result(parsed),
        SMOKE_DIGEST_LABEL: "sha256:" + hashlib.sha256(report).hexdigest(),
    }
    archs = (parsed.get("versions") or {}).get("torch_archs")
    if archs:
        labels[CC_LABEL] = archs
    base = engine.images.get(ref)
    dockerfile = f"FROM {base.id}\nLABEL " + " ".join(
        f"{key}={json.dumps(value)}" for key, value in labels.items()
    )
    try:
        image, _ = engine.images.build(
            fileobj=io.BytesIO(dockerfile.encode()), tag=ref, rm=True, pull=False
        )
    except (docker.errors.BuildError, docker.errors.APIError) as exc:
        raise PublishError(f"could not label {ref} with its gpu-smoke result: {exc}") from None
    return image


# --------------------------------------------------------------------------- push


@dataclasses.dataclass(frozen=True)
class Pushed:
    image: str  # host/namespace/stack
    digest: str
    immutable: str
    rolling: tuple[str, ...]
    smoke: str

    @property
    def pinned(self) -> str:
        return f"{self.image}@{self.digest}"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "pinned": self.pinned}


def _local(engine: docker.DockerClient, stack: str, tag: str) -> Image:
    ref = f"gpubake/{stack}:{tag}"
    image = docker_engine.local_image(engine, ref)
    if image is None:
        raise PublishError(
            f"no local image {ref}: build it first (gpubake build --stack {stack} --tag {tag})"
        )
    return image


def _check_pushable(image: Image, ref: str, allow_cpu_checked: bool) -> str:
    labels = image.labels or {}
    smoke = labels.get(SMOKE_LABEL)
    if smoke is None or VERSION_LABEL not in labels or HASH_LABEL not in labels:
        raise PublishError(
            f"{ref} carries no gpu-smoke result or immutable tag label (built by an older "
            "gpubake?): rebuild it with `gpubake build --force`"
        )
    if smoke == SMOKE_CPU_CHECKED and not allow_cpu_checked:
        raise PublishError(
            f"{ref} was checked on a CPU only (no GPU, so gpu-smoke's GPU checks did not "
            "run): push it with --allow-cpu-checked, or build it on a GPU machine"
        )
    if smoke not in (SMOKE_CPU_CHECKED, SMOKE_PASSED):
        raise PublishError(f"{ref}: gpu-smoke did not pass ({SMOKE_LABEL}={smoke}): not pushed")
    return smoke


def _engine_push(
    engine: docker.DockerClient, repository: str, tag: str, echo: Echo
) -> tuple[str, int]:
    """docker push; returns (manifest digest, layers sent). Each layer the registry already
    holds is only checked, never sent again."""
    digest, sent, said = "", 0, set()
    try:
        for event in engine.api.push(repository, tag=tag, stream=True, decode=True):
            if "error" in event:
                detail = event.get("errorDetail", {}).get("message") or event["error"]
                raise PublishError(f"push of {repository}:{tag} failed: {detail}")
            status, layer = event.get("status", ""), event.get("id", "")
            if status in ("Pushed", "Layer already exists", "Mounted from") and layer not in said:
                said.add(layer)
                sent += status == "Pushed"
                echo(f"  layer {layer}: {status.lower()}")
            digest = event.get("aux", {}).get("Digest", digest)
    except docker.errors.APIError as exc:
        raise PublishError(f"push of {repository}:{tag} failed: {exc.explanation}") from None
    if not digest:
        raise PublishError(f"push of {repository}:{tag} reported no manifest digest")
    return digest, sent


def push(
    reg: registry.RegistryRef,
    stack_name: str | None,
    tag: str,
    *,
    allow_cpu_checked: bool,
    insecure: bool,
    echo: Echo,
) -> Pushed:
    """Push gpubake/<stack>:<tag> as <registry>/<stack>:<immutable tag>, check the registry
    holds the very digest pushed, then move the rolling tags to it."""
    stack = stacks.resolve(stack_name)
    client = registry.RegistryClient(reg.host, insecure=insecure)
    engine = docker_engine.client()
    local_ref = f"gpubake/{stack.name}:{tag}"
    image = _local(engine, stack.name, tag)
    smoke = _check_pushable(image, local_ref, allow_cpu_checked)
    labels = image.labels
    if labels.get(STACK_LABEL) != stack.name:
        raise PublishError(
            f"{local_ref} is an image of stack {labels.get(STACK_LABEL)!r}, not {stack.name}: "
            "retag it, or push it with its own --stack"
        )
    immutable = labels[VERSION_LABEL]
    repository = reg.repository(stack.name)
    remote = reg.image(stack.name)
    client.check()  # credentials and TLS first: nothing is sent to a registry that refuses
    held = client.manifest_digest(repository, immutable)
    if held is not None:
        digest, sent = _already_there(client, repository, remote, immutable, held, image), 0
        echo(f"{remote}:{immutable} already holds this image ({held[:19]}): nothing to send")
    else:
        if smoke == SMOKE_CPU_CHECKED:
            echo(
                f"--allow-cpu-checked: pushing {local_ref}, whose gpu-smoke ran without a GPU; "
                f"its label {SMOKE_LABEL}={SMOKE_CPU_CHECKED} says so to everyone who pulls it"
            )
        echo(f"pushing {local_ref} as {remote}:{immutable}")
        image.tag(remote, immutable)
        try:
            digest, sent = _engine_push(engine, remote, immutable, echo)
        finally:
            with contextlib.suppress(docker.errors.APIError):  # the name was for pushing only
                engine.images.remove(f"{remote}:{immutable}", noprune=True)
        remote_digest = client.manifest_digest(repository, immutable)
        if remote_digest != digest:
            raise PublishError(
                f"{remote}:{immutable} reads back as {remote_digest} after pushing {digest}: "
                "the registry does not hold what was pushed; rolling tags not moved"
            )
        echo(f"{remote}:{immutable} is {digest} ({sent} layer(s) sent)")
    # last: only once the immutable tag is there and verified
    moved = _move_rolling(client, repository, remote, image, digest, echo)
    return Pushed(remote, digest, immutable, tuple(moved), smoke)


def _already_there(
    client: registry.RegistryClient,
    repository: str,
    remote: str,
    immutable: str,
    held: str,
    image: Image,
) -> str:
    """The digest the registry holds under `immutable` when it is this very image (the same
    config: the same image id); a refusal when it is another."""
    there = client.image_info(repository, held, machine.this_arch())
    if there.config_digest == image.id:
        return held  # pushed before: not pushed again, so the tag keeps its manifest
    if there.labels.get(HASH_LABEL) == image.labels.get(HASH_LABEL):
        raise PublishError(
            f"{remote}:{immutable} already holds another build from identical inputs "
            f"({held[:19]}): it stays published, as an immutable tag is never moved; pull that "
            "one, or push after a change of inputs"
        )
    raise PublishError(
        f"{remote}:{immutable} already holds another image ({held[:19]}): an immutable tag is "
        "never moved; build anew (a new date or input hash gives a new tag)"
    )


def _move_rolling(
    client: registry.RegistryClient,
    repository: str,
    remote: str,
    image: Image,
    digest: str,
    echo: Echo,
) -> list[str]:
    """Point the image's rolling tags (from its own labels) at `digest`, except one that
    names a newer image or one of another architecture, which stays (and is said)."""
    labels = image.labels
    moved = []
    for name in rolling_tags(labels[FRAMEWORK_VERSION_LABEL], labels[CUDA_LABEL]):
        current = client.manifest_digest(repository, name)
        if current is not None and current != digest:
            there = client.image_info(repository, name, machine.this_arch())
            if there.architecture != image.attrs.get("Architecture"):
                echo(f"kept {remote}:{name}: it names a {there.architecture} image")
                continue
            if there.labels.get(CREATED_LABEL, "") > labels.get(CREATED_LABEL, ""):
                newer = there.labels.get(VERSION_LABEL, current[:19])
                echo(f"kept {remote}:{name}: it names a newer image ({newer})")
                continue
        if current != digest:
            client.put_tag(repository, digest, name)
        moved.append(name)
        echo(f"{remote}:{name} -> {digest[:19]}")
    return moved


# --------------------------------------------------------------------------- pull and images


def candidates(
    client: registry.RegistryClient, repositories: list[str], arch: str, echo: Echo
) -> Iterator[registry.ImageInfo]:
    """Every tag of the repositories, as the registry describes it (no layer is pulled); a
    tag the registry cannot describe as an image (a signature, an artifact) is passed over
    with a word."""
    for repository in repositories:
        for tag in client.tags(repository):
            try:
                yield client.image_info(repository, tag, arch)
            except registry.RegistryError as exc:
                echo(f"passed over {repository}:{tag}: {exc}")


def explain_lines(chosen: selection.Selection) -> list[str]:
    lines = []
    for verdict in chosen.verdicts:
        mark = "chosen" if verdict.image is chosen.chosen else ("fits" if verdict.ok else "no")
        aliases = f" (also {', '.join(verdict.aliases)})" if verdict.aliases else ""
        lines.append(f"{mark:<6}  {verdict.image.reference}{aliases}: {verdict.reason}")
    return lines


@dataclasses.dataclass(frozen=True)
class Pulled:
    pinned: str
    tag: str
    smoke: str  # gpu-smoke's last line in the pulled image
    gpu: bool  # whether the GPU checks ran (a GPU was passed to the container)
    explain: tuple[str, ...]


def pull(
    reg: registry.RegistryRef,
    stack_name: str | None,
    *,
    driver: str | None,
    gpu: str | None,
    insecure: bool,
    run_smoke: bool,
    echo: Echo,
    explain: Echo | None = None,
) -> Pulled:
    """Choose the newest image of the stack this machine can run, pull it by digest and run
    gpu-smoke in it."""
    stack = stacks.resolve(stack_name)
    here = machine.detect(driver, gpu)
    client = registry.RegistryClient(reg.host, insecure=insecure)
    # the family's repositories too: where fastai cannot run, fastai-legacy may
    repositories = [reg.repository(name) for name in stacks.family(stack.name)]
    found = list(candidates(client, repositories, here.arch, echo))
    chosen = selection.choose(found, stack.name, here, registry=str(reg))
    lines = tuple(explain_lines(chosen))
    for line in lines if explain else ():
        explain(line)
    if chosen.chosen is None:
        raise PublishError(chosen.refusal or f"no image of {stack.name} fits this machine")
    image = chosen.chosen
    pinned = f"{reg.host}/{image.repository}@{image.digest}"
    engine = docker_engine.client()
    echo(f"pulling {pinned} ({image.tag})")
    try:
        engine.images.pull(f"{reg.host}/{image.repository}", tag=image.digest)
    except docker.errors.APIError as exc:
        raise PublishError(f"pull of {pinned} failed: {exc.explanation}") from None
    smoke, with_gpu = "", False
    if run_smoke:
        smoke, with_gpu = _smoke_in(engine, pinned, gpu_here=bool(here.gpus) and gpu is None)
    return Pulled(pinned, image.tag, smoke, with_gpu, lines)


def _smoke_in(engine: docker.DockerClient, ref: str, *, gpu_here: bool) -> tuple[str, bool]:
    """gpu-smoke in a container of `ref`, with this machine's GPUs when it has them (then
    the GPU checks must run: --require-gpu). Returns its summary line."""
    args = ["gpu-smoke"] + (["--require-gpu"] if gpu_here else [])
    gpus = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])] if gpu_here else None
    box = None
    try:
        box = engine.containers.create(ref, args, device_requests=gpus)
        box.start()
        code = box.wait(timeout=600)["StatusCode"]
        output = box.logs().decode(errors="replace")
    except docker.errors.APIError as exc:
        hint = " (is the NVIDIA container toolkit installed?)" if gpu_here else ""
        raise PublishError(
            f"cannot run gpu-smoke in {ref}: {exc.explanation}{hint}; --no-smoke skips it"
        ) from None
    except requests.RequestException as exc:
        raise PublishError(f"gpu-smoke in {ref} did not finish: {exc}") from None
    finally:
        if box is not None:
            box.remove(force=True)
    summary = next(
        (line for line in output.splitlines() if line.startswith("gpu-smoke:")), "no summary"
    )
    if code != 0:
        raise PublishError(f"gpu-smoke failed in {ref} (exit {code}): {summary}")
    return summary, gpu_here


@dataclasses.dataclass(frozen=True)
class IndexRow:
    repository: str
    tag: str
    aliases: tuple[str, ...]
    stack: str
    versions: str
    min_driver: str
    gpus: str
    size: int
    created: str
    digest: str
    smoke: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def index(reg: registry.RegistryRef, *, insecure: bool, echo: Echo) -> list[IndexRow]:
    """What the registry holds under its namespace, one row per image (rolling tags folded
    into the immutable one)."""
    client = registry.RegistryClient(reg.host, insecure=insecure)
    # each stack's repository; the catalog adds others where the registry serves one (the
    # hosted ones mostly do not)
    repositories = {reg.repository(name) for name in stacks.stack_names()}
    prefix = f"{reg.namespace}/" if reg.namespace else ""
    with contextlib.suppress(registry.RegistryError):
        repositories |= {r for r in client.catalog() if r.startswith(prefix)}
    found = list(candidates(client, sorted(repositories), machine.this_arch(), echo))
    rows = []
    for image, aliases in selection.dedupe(found):
        labels = image.labels
        cuda, python = labels.get(CUDA_LABEL, "?"), labels.get(PYTHON_LABEL, "?")
        ccs = [c for c in labels.get(CC_LABEL, "").split(",") if c]
        rows.append(
            IndexRow(
                repository=image.repository,
                tag=image.tag,
                aliases=tuple(aliases),
                stack=labels.get(STACK_LABEL, "?"),
                versions=(
                    f"{labels.get(FRAMEWORK_LABEL, '?')} "
                    f"{labels.get(FRAMEWORK_VERSION_LABEL, '?')}, CUDA {cuda}, "
                    f"Python {python}, {labels.get(OS_LABEL, '?')}"
                ),
                min_driver=labels.get(MIN_DRIVER_LABEL, "?"),
                gpus=gpu_names_for(ccs),
                size=image.size,
                created=image.created,
                digest=image.digest,
                smoke=labels.get(SMOKE_LABEL, "?"),
            )
        )
    return sorted(rows, key=lambda r: (r.stack, r.created), reverse=False)


def gpu_names_for(ccs: list[str]) -> str:
    """The GPU models of images/gpus.yml an image runs on (its kernels built for their
    compute capability, or an older one of the same major)."""
    runs = [
        k
        for k in stacks.gpu_names()
        if selection.runs_on(stacks.get_gpu(k).compute_capability, ccs)
    ]
    return ", ".join(runs) if runs else "?"


def table(rows: list[IndexRow]) -> str:
    head = ("STACK", "TAG", "VERSIONS", "DRIVER", "GPUS", "SIZE", "CREATED", "DIGEST")
    body = [
        (
            r.stack,
            r.tag + (f" ({', '.join(r.aliases)})" if r.aliases else ""),
            r.versions,
            f"{r.min_driver}+",
            r.gpus,
            f"{r.size / 1e9:.2f} GB",
            r.created[:10],
            r.digest[:19],
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [head, *body]
    )
