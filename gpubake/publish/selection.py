"""Which published image fits this machine: its stack, CPU architecture, driver and GPU.

Decided from the labels every gpubake image carries (read from the registry without pulling
layers), so that a user never pulls an image whose CUDA their driver cannot run (CUDA error
804, `unsatisfied condition: cuda>=...`) or whose kernels do not include their GPU.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from gpubake import stacks

# The labels the build side sets (gpubake.build.plan holds their names: the one copy).
from gpubake.build.plan import CC_LABEL as COMPUTE_CAPABILITIES
from gpubake.build.plan import CREATED_LABEL as CREATED
from gpubake.build.plan import MIN_DRIVER_LABEL as MIN_DRIVER
from gpubake.build.plan import SMOKE_CPU_CHECKED, SMOKE_PASSED
from gpubake.build.plan import SMOKE_LABEL as SMOKE
from gpubake.build.plan import STACK_LABEL as STACK
from gpubake.build.plan import VERSION_LABEL as VERSION
from gpubake.publish.machine import CC_RE, GpuInfo, Machine
from gpubake.publish.registry import ImageInfo

_RFC3339_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d)[Tt ](\d\d:\d\d:\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)$"
)


@dataclass(frozen=True)
class Verdict:
    image: ImageInfo
    ok: bool
    reason: str
    aliases: tuple[str, ...] = ()  # other tags of the same digest (rolling tags)


@dataclass(frozen=True)
class Selection:
    chosen: ImageInfo | None
    verdicts: list[Verdict] = field(default_factory=list)
    refusal: str | None = None  # one line when nothing fits


def parse_created(text: str) -> datetime:
    """An RFC 3339 time; Go writes nanoseconds, Python reads microseconds."""
    match = _RFC3339_RE.match(text.strip())
    if not match:
        raise ValueError(text)
    day, clock, fraction, zone = match.groups()
    micro = (fraction or "0")[:6].ljust(6, "0")
    zone = "+00:00" if zone in ("Z", "z") else zone
    return datetime.fromisoformat(f"{day}T{clock}.{micro}{zone}").astimezone(UTC)


def cc_key(cc: str) -> tuple[int, int]:
    major, _, minor = cc.partition(".")
    return int(major), int(minor or 0)


def runs_on(gpu_cc: str, built_for: Iterable[str]) -> bool:
    """CUDA binary compatibility: code built for X.y runs on a GPU of compute capability X.z
    with z >= y (same major). PTX that newer GPUs could JIT is not assumed."""
    major, minor = cc_key(gpu_cc)
    return any(m == major and n <= minor for m, n in map(cc_key, built_for))


def cc_span(built_for: list[str]) -> str:
    ordered = sorted(built_for, key=cc_key)
    return ordered[0] if len(ordered) == 1 else f"{ordered[0]}..{ordered[-1]}"


@dataclass(frozen=True)
class _Labels:
    """The labels selection needs, checked."""

    stack: str
    min_driver: int
    ccs: list[str]
    created: datetime
    smoke: str


class _MalformedError(Exception):
    pass


def _labels(image: ImageInfo) -> _Labels:
    labels = image.labels

    def get(name: str) -> str:
        value = labels.get(name)
        if value is None or not value.strip():
            raise _MalformedError(f"missing label {name}")
        return value.strip()

    def bad(name: str) -> _MalformedError:
        return _MalformedError(f"malformed label {name}={labels.get(name)!r}")

    stack = get(STACK)
    driver = get(MIN_DRIVER)
    if not driver.isdigit():
        raise bad(MIN_DRIVER)
    ccs = [c.strip() for c in get(COMPUTE_CAPABILITIES).split(",")]
    if not all(CC_RE.match(c) for c in ccs):
        raise bad(COMPUTE_CAPABILITIES)
    try:
        created = parse_created(get(CREATED))
    except ValueError:
        raise bad(CREATED) from None
    smoke = get(SMOKE)
    if smoke not in (SMOKE_PASSED, SMOKE_CPU_CHECKED):
        raise bad(SMOKE)
    return _Labels(stack, int(driver), ccs, created, smoke)


def dedupe(candidates: list[ImageInfo]) -> list[tuple[ImageInfo, tuple[str, ...]]]:
    """One entry per digest: a rolling tag (`latest`, `2.15-cu132`) points at the same manifest
    as an immutable one, whose name (the version label) is kept; the others become aliases."""
    groups: dict[str, list[ImageInfo]] = {}
    for image in candidates:
        groups.setdefault(image.digest, []).append(image)
    out = []
    for images in groups.values():
        images = sorted(images, key=lambda i: i.tag)
        keep = next((i for i in images if i.tag == i.labels.get(VERSION)), images[0])
        out.append((keep, tuple(i.tag for i in images if i is not keep)))
    return out


def _gpu_text(gpu: GpuInfo) -> str:
    return f"{gpu.compute_capability} ({gpu.name})"


def _check(image: ImageInfo, labels: _Labels, machine: Machine) -> str | None:
    """Why the image cannot run here, or None."""
    if image.os and image.os != "linux":
        return f"{image.os} image"
    if image.architecture != machine.arch:
        return (
            f"{image.architecture or 'unknown-architecture'} image, this machine is {machine.arch}"
        )
    branch = machine.driver_branch
    if branch is not None and branch < labels.min_driver:
        return f"needs driver {labels.min_driver}+, this machine has {branch}"
    for gpu in machine.gpus:
        if not gpu.compute_capability:
            return f"compute capability of {gpu.name} unknown: give --gpu"
        if not runs_on(gpu.compute_capability, labels.ccs):
            return f"built for compute capabilities {cc_span(labels.ccs)}, not {_gpu_text(gpu)}"
    return None


def _newest_first(item: tuple[ImageInfo, _Labels]) -> tuple[datetime, str]:
    return item[1].created, item[0].tag


def _of_family(image_stack: str, stack: str) -> bool:
    """An image of `stack` or of a stack like it (stacks.yml `like`: fastai-legacy for
    fastai), which `gpubake pull fastai` takes where the fastai image cannot run."""
    return stacks.family_of(image_stack) == stacks.family_of(stack)


def stacks_for_driver(branch: int, *, exclude: str | None = None) -> list[str]:
    """Stacks of images/stacks.yml whose images run on driver `branch` (the minimum of their
    CUDA major: the label images carry), those of `exclude`'s family first."""
    fits = [
        name
        for name in stacks.stack_names()
        if name != exclude
        and stacks.min_driver_branch(str(stacks.raw_stack(name)["cuda"])) <= branch
    ]
    return sorted(fits, key=lambda name: not (exclude and _of_family(name, exclude)))


def _stacks_for_gpu(gpu: GpuInfo, branch: int, exclude: str | None) -> list[str]:
    """Stacks with kernels for this GPU (stacks.yml's `kernels`) whose CUDA this machine's
    driver branch runs."""
    out = []
    for name in stacks_for_driver(branch, exclude=exclude):
        raw = stacks.raw_stack(name)
        kernels = stacks.stack_kernels(raw, str(raw["cuda"]))
        if stacks.kernels_run_on(gpu.compute_capability, raw, kernels):
            out.append(name)
    return out


def choose(
    candidates: list[ImageInfo],
    stack: str | None,
    machine: Machine,
    *,
    registry: str = "the registry",
) -> Selection:
    """The newest image of `stack` (any stack when None) that runs on `machine`, with a
    verdict for every distinct image and a one-line refusal when none fits."""
    entries = dedupe(candidates)
    if machine.driver is None:
        refusal = (
            "no NVIDIA driver found on this machine: give --driver and --gpu to choose for "
            "another machine"
        )
        verdicts = [Verdict(i, False, "no NVIDIA driver on this machine", a) for i, a in entries]
        return Selection(None, verdicts, refusal)
    if not machine.gpus:
        refusal = (
            f"no GPU found on this machine: give --gpu ({', '.join(stacks.gpu_names())}) to "
            "choose for another machine"
        )
        verdicts = [Verdict(i, False, "no GPU on this machine", a) for i, a in entries]
        return Selection(None, verdicts, refusal)

    reasons: dict[int, str] = {}
    fitting: list[tuple[ImageInfo, _Labels]] = []
    of_stack: list[tuple[ImageInfo, _Labels]] = []  # well-formed images of the stack
    malformed: list[str] = []
    other_stacks: set[str] = set()
    for index, (image, _aliases) in enumerate(entries):
        try:
            labels = _labels(image)
        except _MalformedError as exc:
            if stack is not None and not _of_family(image.labels.get(STACK, stack), stack):
                other_stacks.add(image.labels[STACK])
                reasons[index] = f"other stack ({image.labels[STACK]})"
            else:
                reasons[index] = str(exc)
                malformed.append(f"{image.tag}: {exc}")
            continue
        if stack is not None and not _of_family(labels.stack, stack):
            other_stacks.add(labels.stack)
            reasons[index] = f"other stack ({labels.stack})"
            continue
        of_stack.append((image, labels))
        why = _check(image, labels, machine)
        if why is None:
            fitting.append((image, labels))
        else:
            reasons[index] = why

    # the stack asked for before its family's (fastai before fastai-legacy), then the newest
    chosen = (
        max(fitting, key=lambda item: (item[1].stack == stack, *_newest_first(item)))[0]
        if fitting
        else None
    )
    verdicts = []
    for index, (image, aliases) in enumerate(entries):
        if image is chosen:
            smoke = image.labels.get(SMOKE)
            note = "" if smoke == SMOKE_PASSED else " (only CPU-checked: gpu-smoke ran no GPU test)"
            verdicts.append(Verdict(image, True, "newest fitting image" + note, aliases))
        elif index in reasons:
            verdicts.append(Verdict(image, False, reasons[index], aliases))
        else:
            assert chosen is not None
            verdicts.append(Verdict(image, True, f"fits, but older than {chosen.tag}", aliases))
    refusal = None
    if chosen is None:
        refusal = _refusal(stack, machine, of_stack, malformed, other_stacks, registry)
    return Selection(chosen, verdicts, refusal)


def _refusal(
    stack: str | None,
    machine: Machine,
    of_stack: list[tuple[ImageInfo, _Labels]],
    malformed: list[str],
    other_stacks: set[str],
    registry: str,
) -> str:
    """The most useful reason first: nothing there, wrong architecture, driver too old (the
    user can update it), GPU not built for, and last labels gpubake cannot read."""
    what = f"stack {stack}" if stack else "any stack"
    whose = f"every {stack} image's" if stack else "every image's"
    branch = machine.driver_branch
    assert branch is not None
    if not of_stack:
        if malformed:
            return f"no readable image of {what} in {registry}: {malformed[0]}"
        others = f" (it holds {', '.join(sorted(other_stacks))})" if other_stacks else ""
        return f"no image of {what} in {registry}{others}"
    native = [(i, lb) for i, lb in of_stack if i.architecture == machine.arch]
    if not native:
        found = sorted({i.architecture or "unknown" for i, _ in of_stack})
        return (
            f"no {machine.arch} image of {what} in {registry} (only {', '.join(found)}): "
            f"build one on an {machine.arch} machine"
        )
    runnable = [(i, lb) for i, lb in native if lb.min_driver <= branch]
    if not runnable:
        lowest = min(lb.min_driver for _, lb in native)
        fit = stacks_for_driver(branch, exclude=stack)
        alternative = f", or pull a stack that runs on {branch} ({', '.join(fit)})" if fit else ""
        return (
            f"driver {branch} is older than {whose} minimum ({lowest}): update the driver"
            f"{alternative}"
        )
    for gpu in machine.gpus:
        if not gpu.compute_capability:
            return (
                f"the compute capability of {gpu.name} is unknown (not in images/gpus.yml): "
                "give --gpu"
            )
        if not any(runs_on(gpu.compute_capability, lb.ccs) for _, lb in runnable):
            built = sorted({c for _, lb in runnable for c in lb.ccs}, key=cc_key)
            fit = _stacks_for_gpu(gpu, branch, stack)
            alternative = f": pull a stack built for it ({', '.join(fit)})" if fit else ""
            return (
                f"GPU {gpu.name} (compute capability {gpu.compute_capability}) is not among "
                f"those {what}'s images for driver {branch} are built for "
                f"({cc_span(built)}){alternative}"
            )
    return f"no image of {what} in {registry} fits this machine"
