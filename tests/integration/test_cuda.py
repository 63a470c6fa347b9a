"""cuda in Debian 12 containers.

- For real, Debian's non-free nvidia-cuda-toolkit 11.8 on the host `build.py --target ssh` set
  up (vm_host.py, with nvidia_driver's 535): root's login shell finds nvcc through
  /etc/profile.d, nvcc compiles and links a CUDA program against libraries the loader finds,
  and a second run changes nothing.
- NVIDIA's repository (cuda-toolkit-13-2, cuDNN, NCCL) is not reachable from here: check mode.
"""

from __future__ import annotations

import pytest

from tests.integration.helpers import apply, base_image, container, run_in
from tests.integration.nvidia_helpers import (
    PLAYBOOK,
    apply_json,
    apply_json_failing,
    messages,
    results_named,
    stats,
)

pytestmark = pytest.mark.docker
PROGRAM = r"""
#include <cstdio>
#include <cuda_runtime.h>
__global__ void noop() {}
int main() {
    int count = -1;
    cudaError_t err = cudaGetDeviceCount(&count);
    std::printf("runtime %d: %s\n", CUDART_VERSION, cudaGetErrorName(err));
    return 0;
}
"""


@pytest.fixture(scope="module")
def debian(engine) -> str:
    return base_image(engine)


@pytest.fixture(scope="module")
def nvidia_check(engine, debian):
    variables = {"roles_under_test": ["cuda"], "cuda_source": "nvidia", "cuda_version": "13.2"}
    with container(engine, debian) as box:
        apply(box, PLAYBOOK, {"roles_under_test": []})  # Python, for real
        report, _ = apply_json(box, PLAYBOOK, variables, check=True, diff=True)
        written = {
            path: run_in(box, "test", "-e", path)[0] == 0
            for path in ("/etc/profile.d/gpubake-cuda.sh", "/etc/ld.so.conf.d/gpubake-cuda.conf")
        }
        yield report, box.name, written


def _after(result: dict) -> str:
    diffs = result["diff"] if isinstance(result["diff"], list) else [result["diff"]]
    return "".join(d.get("after", "") for d in diffs if isinstance(d.get("after"), str))


def test_check_mode_plans_toolkit_cudnn_and_nccl_from_nvidia(nvidia_check):
    report, host, written = nvidia_check
    assert stats(report, host)["failures"] == 0
    assert (
        "check mode: NVIDIA's package lists are not read, so nothing can be resolved from them; "
        "would install cuda-toolkit-13-2, libcudnn9-cuda-13, libcudnn9-dev-cuda-13, libnccl2, "
        "libnccl-dev (CUDA_HOME /usr/local/cuda-13.2)"
    ) in messages(report, host)
    (profile,) = results_named(
        report, host, "gpubake.gpu.cuda : Put nvcc on login shells' PATH and set CUDA_HOME"
    )
    assert "export CUDA_HOME=/usr/local/cuda-13.2" in _after(profile).splitlines()
    (ld,) = results_named(
        report, host, "gpubake.gpu.cuda : Name the CUDA libraries to the dynamic loader"
    )
    assert _after(ld).splitlines()[1:] == ["/usr/local/cuda-13.2/lib64"]
    assert written == {
        "/etc/profile.d/gpubake-cuda.sh": False,
        "/etc/ld.so.conf.d/gpubake-cuda.conf": False,
    }


def test_a_cuda_debian_does_not_ship_stops_before_installing(engine, debian):
    with container(engine, debian) as box:
        apply(box, PLAYBOOK, {"roles_under_test": []})
        report = apply_json_failing(
            box,
            PLAYBOOK,
            {"roles_under_test": ["cuda"], "cuda_source": "distro", "cuda_version": "13.2"},
        )
        said = " ".join(messages(report, box.name))
        assert "ships CUDA 11.8 (nvidia-cuda-toolkit), not 13.2" in said
        assert run_in(box, "dpkg-query", "-W", "nvidia-cuda-toolkit")[0] != 0


# ---- Debian's 11.8 for real, on the VM host set up over ssh (vm_host.py) ---------------------


@pytest.mark.slow
def test_cuda_toolkit_installed_first_and_left_as_is_second(vm_host):
    title = "gpubake.gpu.common : Install nvidia-cuda-toolkit"  # role common's one apt install
    assert vm_host.first.statuses(title) == ["changed"]
    assert vm_host.second.statuses(title) in (["ok"], ["skipping"])


@pytest.mark.slow
def test_roots_login_shell_finds_nvcc(vm_host):
    rc, out = run_in(
        vm_host.box, "bash", "-lc", 'command -v nvcc; echo "$CUDA_HOME"; nvcc --version'
    )
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0] == "/usr/lib/nvidia-cuda-toolkit/bin/nvcc"
    assert lines[1] == "/usr/lib/nvidia-cuda-toolkit"
    assert "Cuda compilation tools, release 11.8, V11.8" in out


@pytest.mark.slow
def test_nvcc_builds_a_cuda_program_that_runs(vm_host):
    box = vm_host.box
    rc, out = run_in(box, "sh", "-c", f"cat > /tmp/probe.cu <<'EOF'\n{PROGRAM}\nEOF")
    assert rc == 0, out
    rc, out = run_in(box, "bash", "-lc", "nvcc -o /tmp/probe /tmp/probe.cu && /tmp/probe")
    assert rc == 0, out
    # no GPU and no loaded driver here: the runtime loads and says so, it does not crash
    assert out.startswith("runtime 11080: cuda"), out


@pytest.mark.slow
def test_loader_finds_the_cuda_libraries(vm_host):
    box = vm_host.box
    rc, conf = run_in(box, "cat", "/etc/ld.so.conf.d/gpubake-cuda.conf")
    assert rc == 0 and conf.startswith("# gpubake cuda: CUDA 11.8 libraries (distro)")
    rc, cache = run_in(box, "ldconfig", "-p")
    for soname in ("libcudart.so.11.0", "libcublas.so.11", "libcuda.so.1"):
        assert f"\t{soname} " in cache, soname
    ran = vm_host.first.statuses("gpubake.gpu.cuda : Refresh the dynamic loader's cache for CUDA")
    assert ran and ran[0] == "changed"


@pytest.mark.slow
def test_a_toolkit_not_from_the_sources_packages_is_left_alone(vm_host):
    """A working CUDA 11.8 that cuda-toolkit-11-8 did not install (here Debian's, standing in
    for a runfile install or a CUDA image's): check mode with cuda_source nvidia leaves it
    alone, reports it, and would add only cuDNN and NCCL."""
    box = vm_host.box
    variables = {
        "roles_under_test": ["cuda"],
        "cuda_source": "nvidia",
        "cuda_version": "11.8",
        "cuda_home": "/usr/lib/nvidia-cuda-toolkit",
    }
    _, before = run_in(box, "sh", "-c", "dpkg-query -W | sha256sum; ls /etc/apt/sources.list.d")
    report, _ = apply_json(box, PLAYBOOK, variables, check=True)
    said = messages(report, box.name)
    (found,) = [m for m in said if m.startswith("CUDA 11.8 (nvidia): ")]
    assert "nvcc at /usr/lib/nvidia-cuda-toolkit reports release 11.8, V11.8." in found, found
    assert "installed: none of its packages;" in found, found
    wanted = "libcudnn9-cuda-11, libcudnn9-dev-cuda-11, libnccl2, libnccl-dev"
    assert found.endswith(
        f"the toolkit, not from cuda-toolkit-11-8, is left alone; would add: {wanted}"
    ), found
    assert any(f"would install {wanted} (CUDA_HOME" in m for m in said), said
    assert not any("cuda-toolkit-11-8" in m and "would install" in m for m in said)
    _, after = run_in(box, "sh", "-c", "dpkg-query -W | sha256sum; ls /etc/apt/sources.list.d")
    assert after == before
