"""Every resolver rule of gpubake.stacks, against the real images/*.yml."""

from __future__ import annotations

import datetime
import re

import pytest

from gpubake import stacks
from gpubake.publish import selection
from gpubake.stacks import StackError, parse_vars, resolve


def test_default_stack_resolves_to_torch_on_debian():
    s = resolve()
    assert s.name == "pytorch"
    assert s.os.key == "debian-12"
    assert s.python == "3.11"  # Debian 12's python3
    assert dict(s.packages)["torch"] == "2.15.0"
    assert s.python_env == "uv"
    assert s.requirements[0] == "torch==2.15.0"


def test_every_stack_resolves_on_its_default_os():
    for name in stacks.stack_names():
        assert resolve(name).name == name


def test_uv_stack_takes_the_os_python():
    assert resolve("pytorch", os_key="ubuntu-24.04").python == "3.12"
    assert resolve("pytorch", os_key="debian-12").python == "3.11"
    # torch 2.15.0 has no wheels for ubuntu-22.04's Python 3.10; its children inherit that
    for name in ("pytorch", "fastai"):
        with pytest.raises(StackError, match=f"stack '{name}' needs Python 3.11, 3.12"):
            resolve(name, os_key="ubuntu-22.04")


def test_conda_stack_takes_its_own_python_and_override():
    assert resolve("pytorch-conda").python == "3.12"
    assert resolve("pytorch-conda", variables={"python": "3.11"}).python == "3.11"


def test_resolved_stack_is_frozen():
    s = resolve()
    with pytest.raises(AttributeError):
        s.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (
            {"name": "nope"},
            "unknown stack 'nope': choose one of fastai, fastai-legacy, mxnet, pytorch, "
            "pytorch-conda, pytorch-legacy, pytorch-notebook, pytorch-notebook-legacy",
        ),
        ({"os_key": "centos-7"}, "unknown OS 'centos-7'"),
        ({"gpu": "rtx9999"}, "unknown GPU 'rtx9999'"),
        (
            {"gpu": "k80"},
            "GPU k80 (kepler, sm_37) has no kernels in stack 'pytorch' (it carries sm_75 to "
            "sm_120): no stack of gpubake runs there: kepler's last driver branch 470 is past "
            "its end of life (2024-07)",
        ),
        ({"gpu": "v100"}, "GPU v100 (volta, sm_70) has no kernels in stack 'pytorch'"),
        ({"gpu": "m60"}, "use --stack pytorch-legacy"),
        ({"name": "fastai", "gpu": "p5000"}, "use --stack fastai-legacy"),
        ({"name": "fastai-legacy", "gpu": "b200"}, "use --stack fastai"),
        ({"gpu": "gb200"}, "GPU gb200 comes in aarch64 (Arm) machines"),
        (
            {"name": "mxnet", "variables": {"driver_branch": "535"}},
            "driver branch 535 (stack 'mxnet') is past its end of life (2026-06): use "
            "--var driver_branch=580, or --var allow_eol_driver=true to build it anyway",
        ),
        (
            {
                "gpu": "b200",
                "variables": {"driver_branch": "535", "cuda": "12.2", "allow_eol_driver": "true"},
            },
            "GPU b200 (blackwell) needs driver branch 570 or newer",
        ),
        ({"variables": {"driver_branch": "535"}}, "driver branch 535 is too old for CUDA 13.2"),
        ({"variables": {"driver_branch": "999"}}, "driver branch 999 is unknown"),
        ({"variables": {"driver_branch": "abc"}}, "is not a branch number"),
        ({"variables": {"cuda": "9.0"}}, "CUDA 9.0 is not known"),
        ({"variables": {"cuda": "x.y"}}, "is not a version number"),
        ({"variables": {"python": "3.12"}}, "uses the OS's Python (3.11 on debian-12)"),
        ({"variables": {"packages.tensorflow": "2.0"}}, "has no package 'tensorflow'"),
        ({"variables": {"packages.torch": "latest"}}, "is not a version number"),
        ({"name": "mxnet", "os_key": "ubuntu-24.04"}, "stack 'mxnet' needs Python 3.8"),
        ({"name": "mxnet", "gpu": "k80"}, "supported only up to driver branch 470"),
        (
            {"name": "pytorch-legacy", "gpu": "v100", "variables": {"driver_branch": "595"}},
            "up to driver branch 580",
        ),
        ({"gpu": "m60", "variables": {"open_kernel_module": "true"}}, "open kernel module"),
        ({"gpu": "t4", "variables": {"open_kernel_module": "maybe"}}, "is not true or false"),
        ({"gpu": "a10g", "target": "gcp-image"}, "GPU a10g is not offered on GCP"),
        ({"name": "mxnet", "gpu": "p100", "target": "aws-ami"}, "GPU p100 is not offered on AWS"),
        ({"variables": {"driver_source": "runfile"}}, "--var driver_source=runfile: choose nvidia"),
        (
            {"variables": {"driver_source": "distro"}},
            "debian-12's own packages give driver branch 535, too old for CUDA 13.2 of stack "
            "'pytorch' (it needs 580 or newer): use --var driver_source=nvidia",
        ),
        (
            {"variables": {"cuda_source": "distro"}},
            "debian-12's own packages give CUDA toolkit 11.8, but stack 'pytorch' is built for "
            "CUDA 13.2: use --var cuda_source=nvidia",
        ),
        (
            {"name": "mxnet", "variables": {"driver_source": "distro", "open_kernel_module": "1"}},
            "debian-12's own open kernel module packages cannot be installed (their versions "
            "disagree): use --var driver_source=nvidia or --var open_kernel_module=false",
        ),
        (
            {"os_key": "ubuntu-22.04", "variables": {"cuda_source": "distro"}},
            "ubuntu-22.04's own packages give CUDA toolkit 11.5",
        ),
    ],
)
def test_bad_combinations_are_rejected_with_one_line(kwargs, needle):
    with pytest.raises(StackError) as exc:
        resolve(**kwargs)
    message = str(exc.value)
    assert needle in message
    assert "\n" not in message
    assert ":" in message  # "what is wrong: how to fix it"


def test_fix_suggested_for_old_driver_names_a_working_branch():
    with pytest.raises(StackError) as exc:
        resolve(variables={"driver_branch": "535"})
    assert "--var driver_branch=580" in str(exc.value)
    # and that suggestion does resolve
    assert resolve(variables={"driver_branch": "580"}).driver_branch == "580"


def test_mxnet_fix_names_oses_that_work():
    with pytest.raises(StackError) as exc:
        resolve("mxnet", os_key="ubuntu-24.04")
    message = str(exc.value)
    for os_key in ("debian-12", "ubuntu-22.04"):
        assert os_key in message
        assert resolve("mxnet", os_key=os_key).python in ("3.11", "3.10")


def test_kepler_on_legacy_stack_works_only_past_its_end_of_life_on_request():
    # CUDA 11.7 runs on branch 470 through minor-version compatibility (470 >= 450.80.02),
    # but 470's support ended: it builds only when asked, and says so
    with pytest.raises(StackError, match=r"driver branch 470 \(stack 'mxnet'\) is past its end"):
        resolve("mxnet", gpu="k80", variables={"driver_branch": "470"})
    s = resolve("mxnet", gpu="k80", variables={"driver_branch": "470", "allow_eol_driver": "true"})
    assert s.driver_branch == "470" and s.open_kernel_module is False
    assert s.warnings == (
        "driver branch 470 (stack 'mxnet') is past its end of life (2024-07): built anyway "
        "(--var allow_eol_driver=true)",
    )


def test_minor_version_compatibility_within_a_major():
    # 12.8 on 570 (native 12.8) and on 535 (12.2, past its end of life) run; 13.x on 535 not
    assert (
        resolve(
            "mxnet",
            variables={"cuda": "12.8", "driver_branch": "570"},
            today=datetime.date(2026, 1, 1),
        ).cuda
        == "12.8"
    )
    with pytest.raises(StackError, match=r"CUDA 13.x needs driver 580.65.06 or newer"):
        resolve(variables={"driver_branch": "535"})


def test_a_stack_naming_a_branch_past_its_end_of_life_is_refused():
    """Every stack resolves today; on the day after its branch's end of life it is refused
    in one line naming a supported branch, or built with a warning when allowed."""
    for name in stacks.stack_names():
        stack = resolve(name)
        assert stack.warnings == ()
        eol = stacks.branch_eol(stack.driver_branch)
        assert eol is not None and eol >= datetime.date.today()
        assert resolve(name, today=eol).warnings == ()
        after = eol + datetime.timedelta(days=1)
        with pytest.raises(StackError) as exc:
            resolve(name, today=after)
        message = str(exc.value)
        assert (
            f"driver branch {stack.driver_branch} (stack '{name}') is past its end of life ("
            in message
        )
        newer = [b for b in stacks.supported_branches(after) if int(b) > int(stack.driver_branch)]
        assert f"--var driver_branch={newer[0]}" in message and "\n" not in message
        allowed = resolve(name, today=after, variables={"allow_eol_driver": "true"})
        assert len(allowed.warnings) == 1 and "built anyway" in allowed.warnings[0]


def test_distro_driver_takes_the_os_branch_and_says_it_is_past_its_end_of_life():
    s = resolve("mxnet", target="ssh", variables={"driver_source": "distro"})
    assert s.driver_branch == "535"
    assert s.warnings == (
        "driver branch 535 (stack 'mxnet') is past its end of life (2026-06): the OS's own "
        "packages give it; NVIDIA fixes it no more",
    )


def _named_stack(message: str) -> str | None:
    found = re.search(r"use --stack (\S+)$", message)
    return found[1] if found else None


def test_every_gpu_against_every_stack_runs_or_names_one_that_does():
    """Each GPU of gpus.yml with each stack: the stack's kernels cover it (a kernel for X.Y
    runs on X.Z, Z >= Y), or the refusal is one line naming a stack that resolves for that
    GPU and covers it, or saying why none can."""
    for gpu in stacks.gpu_names():
        info = stacks.get_gpu(gpu)
        for name in stacks.stack_names():
            try:
                stack = resolve(name, gpu=gpu)
            except StackError as exc:
                message = str(exc)
                assert "\n" not in message, message
                assert message.startswith(f"GPU {gpu} "), message
                other = _named_stack(message)
                listed = re.search(r"use a stack that runs there: (.+)$", message)
                if other is not None:
                    names = [other]
                elif listed is not None:
                    names = listed[1].split(", ")
                else:
                    assert "no stack of gpubake runs there" in message or "Arm" in message
                    assert stacks.stacks_for_gpu(info) == []
                    continue
                for fit in names:
                    assert fit != name
                    assert stacks.family_of(fit) == stacks.family_of(name) or listed
                    resolve(fit, gpu=gpu)  # the stack named does run there
                continue
            assert info.host_arch == "x86_64"
            raw = stacks.raw_stack(name)
            assert stacks.kernels_run_on(info.compute_capability, raw, stack.kernels), (gpu, name)


def test_the_legacy_family_covers_the_cards_cuda_13_dropped():
    stack = resolve("fastai-legacy")
    for gpu, cc in (("m4000", "5.2"), ("p100", "6.0"), ("p5000", "6.1"), ("v100", "7.0")):
        assert stacks.get_gpu(gpu).compute_capability == cc
        assert selection.runs_on(cc, list(stack.kernels)), gpu
        assert resolve("fastai-legacy", gpu=gpu).driver_branch == "580"
    assert stacks.family_of("fastai-legacy") == "fastai"
    assert stacks.family_of("pytorch-legacy") == "pytorch"
    # the repositories `gpubake pull fastai` reads: the asked stack's first
    assert stacks.family("fastai") == ["fastai", "fastai-legacy"]
    assert stacks.family("pytorch-notebook") == ["pytorch-notebook", "pytorch-notebook-legacy"]
    assert stacks.family("mxnet") == ["mxnet"]
    # `like` takes fastai's own pins onto the legacy notebook stack: one copy of each
    fastai = dict(resolve("fastai").packages)
    legacy = dict(stack.packages)
    assert legacy["fastai"] == fastai["fastai"] and legacy["jupyterlab"] == fastai["jupyterlab"]
    assert legacy["torch"] != fastai["torch"]
    assert stack.container == resolve("fastai").container


def test_open_module_follows_architecture():
    assert resolve(gpu="t4").open_kernel_module is True
    assert resolve(gpu="h100").open_kernel_module is True
    assert resolve("mxnet", gpu="v100").open_kernel_module is False
    assert resolve(gpu="t4", variables={"open_kernel_module": "false"}).open_kernel_module is False


def test_gpus_on_their_clouds():
    assert resolve(gpu="t4", target="gcp-image").gpu.gcp_accelerators == ("nvidia-tesla-t4",)
    assert resolve(gpu="a10g", target="aws-ami").gpu.aws_instance_families == ("g5",)


def test_parse_vars():
    assert parse_vars(["python=3.11", "packages.torch=2.14.1"]) == {
        "python": "3.11",
        "packages.torch": "2.14.1",
    }
    for bad in ("novalue", "=x", "python=", "colour=blue"):
        with pytest.raises(StackError):
            parse_vars([bad])


def test_package_override_changes_the_pin():
    s = resolve(variables={"packages.torch": "2.14.1"})
    assert dict(s.packages)["torch"] == "2.14.1"
    assert ("packages.torch", "2.14.1") in s.overrides


def test_gpu_data_is_complete():
    gpus = stacks.gpus_data()["gpus"]
    for key in ("k80", "m60", "p100", "v100", "t4", "a10g", "l4", "a100", "h100", "h200"):
        assert key in gpus, key
        g = gpus[key]
        assert g["architecture"] in stacks.gpus_data()["architectures"]
        assert g["expected"]["matmul_tflops"] > 0
        assert g["expected"]["copy_gbps"] > 0
        assert g["memory_gib"] > 0
        # an expected figure is what a card reaches, never more than its datasheet peak
        peak = g["peak"]
        peak_flops = peak.get("bf16_tflops") or peak.get("fp16_tflops") or peak["fp32_tflops"]
        assert g["expected"]["matmul_tflops"] < peak_flops
        assert g["expected"]["copy_gbps"] < peak["bandwidth_gbps"]


def test_to_dict_is_json_ready():
    import json

    data = resolve(gpu="t4").to_dict()
    assert json.loads(json.dumps(data))["gpu"]["key"] == "t4"
    assert data["packages"]["torch"] == "2.15.0"
    assert data["cuda"] == "13.2"


def test_sources_default_to_nvidias_repository():
    s = resolve()
    assert (s.driver_source, s.cuda_source, s.cuda_toolkit) == ("nvidia", "nvidia", "13.2")


def test_distro_sources_take_the_oss_toolkit_from_the_roles_own_data():
    s = resolve("mxnet", variables={"driver_source": "distro", "cuda_source": "distro"})
    assert (s.driver_source, s.cuda_source) == ("distro", "distro")
    assert s.cuda == "11.7"  # what the framework was built for: labels, driver checks
    assert s.cuda_toolkit == "11.8"  # what Debian 12 ships, and the cuda role installs
    # the same fact the cuda role installs from
    assert stacks.distro_packages(s.os).cuda == "11.8"
    assert stacks.distro_packages(stacks.get_os("ubuntu-24.04")).cuda == "12.0"
    # Ubuntu publishes several -server branches: any branch goes
    ubuntu = resolve(os_key="ubuntu-24.04", variables={"driver_source": "distro"})
    assert ubuntu.driver_branch == "580"


def test_distro_driver_falls_back_to_the_proprietary_module_where_open_cannot_install():
    distro = {"driver_source": "distro"}
    assert resolve("mxnet", variables=distro).open_kernel_module is False
    assert resolve("mxnet", gpu="t4", variables=distro).open_kernel_module is False
    assert resolve("mxnet", gpu="t4").open_kernel_module is True  # NVIDIA's repository
    # Ubuntu's open -server packages install
    ubuntu = resolve(os_key="ubuntu-24.04", gpu="h100", variables=distro)
    assert ubuntu.open_kernel_module is True
