"""Which image fits a machine: nvidia-smi parsing (gpubake.publish.machine) and the choice among a
registry's images by their labels (gpubake.publish.selection), against the real images/*.yml.

nvidia-smi cannot run here (no GPU): its output is replayed from tests/unit/data/nvidia_smi,
whose files say where each shape comes from.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from pathlib import Path

import pytest

from gpubake import GpubakeError, stacks
from gpubake.build import plan
from gpubake.publish import machine, selection
from gpubake.publish.machine import GpuInfo, Machine, MachineError, detect, parse_nvidia_smi
from gpubake.publish.registry import ImageInfo
from gpubake.publish.selection import choose

DATA = Path(__file__).parent / "data" / "nvidia_smi"
REGISTRY = "127.0.0.1:5000/gpubake"
CCS_CU13 = "7.5,8.0,8.6,8.9,9.0,10.0,12.0"  # torch 2.15 cu132 wheels' architectures
CCS_CU11 = "3.5,3.7,5.0,6.0,7.0,7.5,8.0,8.6"


def recorded(name: str) -> str:
    text = (DATA / f"{name}.csv").read_text(encoding="utf-8")
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


def on(name: str, arch: str = "amd64") -> Machine:
    driver, gpus = parse_nvidia_smi(recorded(name), stacks.gpus_data())
    return Machine(driver, gpus, arch)


class Replay:
    """Plays nvidia-smi's recorded answers in order, keeping the command lines it was run
    with (there is no nvidia-smi to run here)."""

    def __init__(self, *answers: tuple[int, str, str] | type[Exception]) -> None:
        self.answers = list(answers)
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **_kwargs: object) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        answer = self.answers.pop(0)
        if isinstance(answer, type):
            raise answer(argv[0])
        rc, out, err = answer
        return subprocess.CompletedProcess(argv, rc, out, err)


# -- nvidia-smi ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "driver", "branch", "count", "key", "cc"),
    [
        ("t4", "580.95.05", 580, 1, "t4", "7.5"),
        ("a100_80gb", "580.95.05", 580, 1, "a100-80gb", "8.0"),
        ("h100", "580.159.04", 580, 1, "h100", "9.0"),
        ("h100x8", "580.159.04", 580, 8, "h100", "9.0"),
        ("a10g_535", "535.261.03", 535, 1, "a10g", "8.6"),
        # no compute_cap column: the figure comes from images/gpus.yml's k80
        ("k80_470_no_cc", "470.256.02", 470, 2, "k80", "3.7"),
    ],
)
def test_recorded_nvidia_smi_outputs_parse(name, driver, branch, count, key, cc):
    m = on(name)
    assert m.driver == driver
    assert m.driver_branch == branch
    assert len(m.gpus) == count
    assert {(g.key, g.compute_capability) for g in m.gpus} == {(key, cc)}


def test_compute_cap_not_available_falls_back_to_gpus_yml():
    driver, gpus = parse_nvidia_smi("Tesla V100-SXM2-16GB, 535.261.03, [N/A]\n", stacks.gpus_data())
    assert driver == "535.261.03"
    assert gpus == (GpuInfo("Tesla V100-SXM2-16GB", "7.0", "v100"),)


def test_gpu_names_match_whole_words_and_the_longest_pattern():
    data = stacks.gpus_data()
    # "NVIDIA L4" must not claim an L40; its own compute capability still counts
    _, (l40,) = parse_nvidia_smi("NVIDIA L40, 580.95.05, 8.9\n", data)
    assert l40 == GpuInfo("NVIDIA L40", "8.9", None)
    assert machine.gpu_key("NVIDIA L40S", data) == "l40s"
    # "H100 PCIe" is h100-pcie, not h100
    assert machine.gpu_key("NVIDIA H100 PCIe", data) == "h100-pcie"
    assert machine.gpu_key("NVIDIA A100-SXM4-40GB", data) == "a100"
    # unknown model, old driver: the capability is unknown, not guessed
    _, (odd,) = parse_nvidia_smi("Quadro K2200, 470.256.02\n", data)
    assert odd == GpuInfo("Quadro K2200", "", None)


def test_unreadable_nvidia_smi_line_is_one_line_error():
    with pytest.raises(MachineError) as exc:
        parse_nvidia_smi("No devices were found\n", stacks.gpus_data())
    assert str(exc.value) == (
        "cannot read nvidia-smi's line 'No devices were found': state the machine with "
        "--driver and --gpu"
    )


def test_driver_branch():
    assert Machine("580.95.05", (), "amd64").driver_branch == 580
    assert Machine("580", (), "amd64").driver_branch == 580
    assert Machine(None, (), "amd64").driver_branch is None


def test_detect_reads_nvidia_smi():
    smi = Replay((0, recorded("t4"), ""))
    m = detect(runner=smi)
    assert smi.calls == [
        ["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"]
    ]
    assert m.driver == "580.95.05"
    assert m.gpus == (GpuInfo("Tesla T4", "7.5", "t4"),)


def test_detect_asks_an_old_driver_again_without_compute_cap():
    smi = Replay(
        (2, 'Field "compute_cap" is not a valid field to query.\n', ""),
        (0, recorded("k80_470_no_cc"), ""),
    )
    m = detect(runner=smi)
    assert smi.calls[1][1] == "--query-gpu=name,driver_version"
    assert m.driver_branch == 470
    assert [g.compute_capability for g in m.gpus] == ["3.7", "3.7"]


@pytest.mark.parametrize(
    "answer",
    [
        FileNotFoundError,  # no nvidia-smi at all
        (9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", ""),
    ],
)
def test_detect_without_a_driver(answer):
    m = detect(runner=Replay(answer))
    assert (m.driver, m.gpus) == (None, ())


def test_stated_driver_and_gpu_do_not_run_nvidia_smi():
    smi = Replay()  # any call would fail: no answer left
    m = detect("580", "h100", runner=smi)
    assert smi.calls == []
    assert m.driver == "580"
    assert m.gpus == (GpuInfo("NVIDIA H100 80GB HBM3", "9.0", "h100"),)


def test_stated_driver_overrides_only_the_driver():
    m = detect("595.12.01", None, runner=Replay((0, recorded("a10g_535"), "")))
    assert m.driver_branch == 595
    assert [g.key for g in m.gpus] == ["a10g"]


@pytest.mark.parametrize(
    ("driver", "gpu", "needle"),
    [
        ("abc", None, "--driver 'abc' is not a driver version: give a branch such as 580"),
        ("58", None, "--driver '58' is not a driver version"),
        (None, "rtx9999", "--gpu 'rtx9999' is unknown: choose one of a10, a100, a100-80gb"),
    ],
)
def test_bad_statements_are_one_line_errors(driver, gpu, needle):
    with pytest.raises(MachineError) as exc:
        detect(driver, gpu, runner=Replay())
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)
    assert isinstance(exc.value, GpubakeError)


def test_arch_names_are_oci_names(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert detect("580", "h100").arch == "arm64"
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert detect("580", "h100").arch == "amd64"


# -- selection -------------------------------------------------------------------------------


def image(
    tag: str,
    *,
    stack: str = "pytorch",
    min_driver: str = "580",
    ccs: str = CCS_CU13,
    created: str = "2026-12-01T10:00:00Z",
    arch: str = "amd64",
    version: str | None = None,
    digest_of: str | None = None,
    smoke: str = "passed",
    **extra: str,
) -> ImageInfo:
    """An image as RegistryClient.image_info describes it; `digest_of` gives a rolling tag
    the digest of the immutable tag it points at."""
    labels = {
        plan.STACK_LABEL: stack,
        plan.MIN_DRIVER_LABEL: min_driver,
        plan.CC_LABEL: ccs,
        plan.SMOKE_LABEL: smoke,
        plan.CREATED_LABEL: created,
        plan.VERSION_LABEL: version or tag,
        **{k.replace("__", "."): v for k, v in extra.items()},
    }
    digest = "sha256:" + hashlib.sha256((digest_of or tag).encode()).hexdigest()
    return ImageInfo(
        repository=f"gpubake/{stack}",
        tag=tag,
        digest=digest,
        labels=labels,
        created=created,
        architecture=arch,
        os="linux",
        size=6_000_000_000,
    )


NEW = "2.15.0-cu132-py3.11-debian12-20261201-4e5d614f236a"
OLD = "2.14.1-cu130-py3.11-debian12-20261001-0a1b2c3d4e5f"
MX = "1.9.1-cu117-py3.11-debian12-20261115-99aa88bb77cc"
ARM = "2.15.0-cu132-py3.11-debian12-20261205-arm64aaaaaaa"
BAD = "2.15.0-cu132-py3.11-debian12-20261210-badbadbadbad"


def registry_images() -> list[ImageInfo]:
    """A registry holding two stacks, rolling tags, an arm64-only build and a bad label."""
    return [
        image(OLD, created="2026-10-01T09:00:00Z"),
        image(NEW),
        image("latest", version=NEW, digest_of=NEW),
        image("2.15-cu132", version=NEW, digest_of=NEW),
        image(MX, stack="mxnet", min_driver="535", ccs=CCS_CU11, created="2026-11-15T08:00:00Z"),
        image(ARM, arch="arm64", created="2026-12-05T10:00:00Z"),
        image(BAD, min_driver="abc", created="2026-12-10T10:00:00Z"),
    ]


def reasons(sel: selection.Selection) -> dict[str, str]:
    return {v.image.tag: v.reason for v in sel.verdicts}


@pytest.mark.parametrize("host", ["h100", "h100x8", "t4", "a100_80gb"])
def test_newest_fitting_image_is_chosen_with_a_verdict_for_each(host):
    sel = choose(registry_images(), "pytorch", on(host), registry=REGISTRY)
    assert sel.refusal is None
    assert sel.chosen is not None and sel.chosen.tag == NEW
    assert reasons(sel) == {
        OLD: f"fits, but older than {NEW}",
        NEW: "newest fitting image",
        MX: "other stack (mxnet)",
        ARM: "arm64 image, this machine is amd64",
        BAD: "malformed label io.gpubake.min-driver='abc'",
    }
    assert [v.ok for v in sel.verdicts if v.image.tag in (NEW, OLD)] == [True, True]


def test_rolling_tags_are_one_candidate_under_the_immutable_name():
    sel = choose(registry_images(), "pytorch", on("h100"), registry=REGISTRY)
    new = [v for v in sel.verdicts if v.image.digest == sel.chosen.digest]
    assert len(new) == 1  # not three: latest and 2.15-cu132 are the same manifest
    assert new[0].image.tag == NEW
    assert new[0].aliases == ("2.15-cu132", "latest")
    assert len(sel.verdicts) == 5


def test_driver_535_refuses_pytorch_and_names_the_stack_that_runs():
    sel = choose(registry_images(), "pytorch", on("a10g_535"), registry=REGISTRY)
    assert sel.chosen is None
    assert sel.refusal == (
        "driver 535 is older than every pytorch image's minimum (580): update the driver, "
        "or pull a stack that runs on 535 (pytorch-legacy, fastai-legacy, mxnet, "
        "pytorch-notebook-legacy, tensorflow)"
    )
    assert reasons(sel)[NEW] == "needs driver 580+, this machine has 535"
    assert not any(v.ok for v in sel.verdicts)


def test_driver_535_gets_the_mxnet_image():
    sel = choose(registry_images(), "mxnet", on("a10g_535"), registry=REGISTRY)
    assert sel.chosen is not None and sel.chosen.tag == MX
    assert reasons(sel)[NEW] == "other stack (pytorch)"


def test_gpu_the_image_is_not_built_for():
    k80 = on("k80_470_no_cc")
    # an R470 host: the driver is the first thing to fix, or a CUDA 11 stack (450+) runs
    sel = choose(registry_images(), "pytorch", k80, registry=REGISTRY)
    assert sel.refusal == (
        "driver 470 is older than every pytorch image's minimum (580): update the driver, "
        "or pull a stack that runs on 470 (mxnet)"
    )
    # stated as a K80 with driver 580: the compute capability rejects it
    stated = Machine("580", k80.gpus[:1], "amd64")
    sel = choose(registry_images(), "pytorch", stated, registry=REGISTRY)
    assert sel.chosen is None
    assert reasons(sel)[NEW] == "built for compute capabilities 7.5..12.0, not 3.7 (Tesla K80)"
    assert sel.refusal.startswith(
        "GPU Tesla K80 (compute capability 3.7) is not among those stack pytorch's images "
        "for driver 580 are built for (7.5..12.0): pull a stack built for it (mxnet)"
    )


def test_every_gpu_of_the_machine_must_fit():
    mixed = Machine("580.95.05", (*on("h100").gpus, *on("k80_470_no_cc").gpus[:1]), "amd64")
    sel = choose(registry_images(), "pytorch", mixed, registry=REGISTRY)
    assert sel.chosen is None
    assert "not 3.7 (Tesla K80)" in reasons(sel)[NEW]


@pytest.mark.parametrize(
    ("gpu_cc", "built_for", "runs"),
    [
        ("8.9", "8.0,8.6,9.0", True),  # L4 runs sm_86 code (same major, newer minor)
        ("12.1", "9.0,10.0,12.0", True),
        ("9.0", "8.0,8.6", False),  # no sm_9x code, and PTX is not assumed
        ("8.0", "8.6,9.0", False),  # sm_86 code does not run on 8.0
        ("7.5", CCS_CU13, True),
    ],
)
def test_binary_compatibility_of_compute_capabilities(gpu_cc, built_for, runs):
    gpu = GpuInfo("some GPU", gpu_cc, None)
    sel = choose([image(NEW, ccs=built_for)], "pytorch", Machine("580", (gpu,), "amd64"))
    assert (sel.chosen is not None) is runs


def test_newest_is_by_created_label_not_by_tag_name():
    later = "2.9.0-cu132-py3.11-debian12-20261220-aaaaaaaaaaaa"  # sorts before 2.15 as text
    images = [image(NEW), image(later, created="2026-12-20T10:00:00.123456789Z")]
    sel = choose(images, "pytorch", on("h100"))
    assert sel.chosen.tag == later
    assert reasons(sel)[NEW] == f"fits, but older than {later}"
    # same instant (another zone spelling): the tag name decides, deterministically
    tie = [image("b-tag", created="2026-12-01T11:00:00+01:00"), image("a-tag")]
    assert choose(tie, "pytorch", on("h100")).chosen.tag == "b-tag"


def test_cpu_checked_image_is_chosen_and_says_so():
    sel = choose([image(NEW, smoke="cpu-checked")], "pytorch", on("h100"))
    assert sel.chosen.tag == NEW
    assert sel.verdicts[0].reason.startswith("newest fitting image (only CPU-checked")


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"min_driver": "580.95"}, "malformed label io.gpubake.min-driver='580.95'"),
        ({"ccs": "sm_90"}, "malformed label io.gpubake.compute-capabilities='sm_90'"),
        ({"created": "yesterday"}, "malformed label org.opencontainers.image.created='yesterday'"),
        ({"smoke": "maybe"}, "malformed label io.gpubake.smoke='maybe'"),
        ({"min_driver": ""}, "missing label io.gpubake.min-driver"),
    ],
)
def test_malformed_labels_reject_the_image(override, reason):
    sel = choose([image(BAD, **override), image(OLD)], "pytorch", on("h100"))
    assert reasons(sel)[BAD] == reason
    assert sel.chosen.tag == OLD


def test_refusals_say_what_is_missing():
    mx_only = [image(MX, stack="mxnet", min_driver="535", ccs=CCS_CU11)]
    sel = choose(mx_only, "pytorch", on("h100"), registry=REGISTRY)
    assert sel.refusal == f"no image of stack pytorch in {REGISTRY} (it holds mxnet)"
    assert choose([], "pytorch", on("h100"), registry=REGISTRY).refusal == (
        f"no image of stack pytorch in {REGISTRY}"
    )
    arm_only = [image(ARM, arch="arm64")]
    assert choose(arm_only, "pytorch", on("h100"), registry=REGISTRY).refusal == (
        f"no amd64 image of stack pytorch in {REGISTRY} (only arm64): build one on an amd64 machine"
    )
    # the same arm64 image fits an arm64 machine (GH200-like host)
    assert choose(arm_only, "pytorch", on("h100", arch="arm64")).chosen.tag == ARM
    bad_only = [image(BAD, min_driver="abc")]
    assert choose(bad_only, "pytorch", on("h100"), registry=REGISTRY).refusal == (
        f"no readable image of stack pytorch in {REGISTRY}: {BAD}: malformed label "
        "io.gpubake.min-driver='abc'"
    )


def test_no_driver_refuses_before_looking():
    sel = choose(registry_images(), "pytorch", Machine(None, (), "amd64"))
    assert sel.chosen is None
    assert sel.refusal == (
        "no NVIDIA driver found on this machine: give --driver and --gpu to choose for "
        "another machine"
    )
    sel = choose(registry_images(), "pytorch", Machine("580", (), "amd64"))
    assert sel.refusal.startswith("no GPU found on this machine: give --gpu (a10, a100, ")


def test_any_stack_when_none_is_named():
    sel = choose(registry_images(), None, on("a10g_535"), registry=REGISTRY)
    assert sel.chosen.tag == MX
    sel = choose(registry_images(), None, on("k80_470_no_cc"), registry=REGISTRY)
    assert sel.refusal.startswith("driver 470 is older than every image's minimum (535)")


def test_stacks_for_a_driver_come_from_stacks_yml():
    # CUDA 11 and 12 stacks run on 535 (minor-version compatibility), CUDA 13 ones do not
    assert selection.stacks_for_driver(535) == [
        "fastai-legacy",
        "mxnet",
        "pytorch-legacy",
        "pytorch-notebook-legacy",
        "tensorflow",
    ]
    assert selection.stacks_for_driver(535, exclude="fastai")[0] == "fastai-legacy"
    assert set(selection.stacks_for_driver(580)) == set(stacks.stack_names())


def test_pull_fastai_on_a_p5000_takes_the_legacy_familys_image_by_its_label():
    """`gpubake pull fastai --gpu p5000`: the fastai image (sm_75 on) cannot run on a
    Pascal card; the fastai-legacy image (like: fastai) carries sm_61's kernels and is taken.
    Where both run, the stack asked for wins over its family, however new."""
    legacy_ccs = ",".join(stacks.resolve("fastai-legacy").kernels)
    fast = "2.8.12-cu132-py3.11-debian12-20261201-aaaaaaaaaaaa"
    legacy = "2.8.12-cu126-py3.11-debian12-20261202-bbbbbbbbbbbb"
    images = [
        image(fast, stack="fastai"),
        image(
            legacy,
            stack="fastai-legacy",
            min_driver="525",
            ccs=legacy_ccs,
            created="2026-12-02T10:00:00Z",
        ),
        image(MX, stack="mxnet", min_driver="535", ccs=CCS_CU11),
    ]
    for gpu in ("p5000", "m4000", "p100", "v100"):
        sel = choose(images, "fastai", detect("580", gpu), registry=REGISTRY)
        assert sel.chosen is not None and sel.chosen.tag == legacy, gpu
        assert reasons(sel)[fast].startswith("built for compute capabilities 7.5")
        assert reasons(sel)[MX] == "other stack (mxnet)"
    sel = choose(images, "fastai", detect("580", "t4"), registry=REGISTRY)
    assert sel.chosen is not None and sel.chosen.tag == fast
    # and the legacy family alone is what a 535 host can take
    sel = choose(images, "fastai", detect("535", "p5000"), registry=REGISTRY)
    assert sel.chosen is not None and sel.chosen.tag == legacy
