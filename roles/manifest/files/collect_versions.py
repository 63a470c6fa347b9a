"""Print the exact versions in this environment as JSON (run by the manifest role)."""

import importlib.metadata
import importlib.util
import json
import platform
import sys
from pathlib import Path

FRAMEWORKS = ("torch", "torchvision", "mxnet-cu117", "mxnet", "numpy")


def os_release():
    info = {}
    try:
        for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines():
            key, sep, value = line.strip().partition("=")
            if sep:
                info[key] = value.strip('"')
    except OSError:
        return {}
    return {
        "id": info.get("ID"),
        "version_id": info.get("VERSION_ID"),
        "name": info.get("PRETTY_NAME"),
    }


def torch_build(packages):
    """CUDA and cuDNN torch was built for, read from torch/version.py and the cuDNN wheel
    without importing torch (seconds on a CPU, and gpu-smoke imports it next anyway)."""
    if "torch" not in packages:
        return None
    try:
        version_py = importlib.util.find_spec("torch").submodule_search_locations[0]
        spec = importlib.util.spec_from_file_location("_torch_version", f"{version_py}/version.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (AttributeError, ImportError, OSError, TypeError):
        return None
    # torch.backends.cudnn.version() is major * 10000 + minor * 100 + patch (cuDNN 9)
    cudnn = None
    for name, version in packages.items():
        if name.startswith("nvidia-cudnn-cu"):
            major, minor, patch = (int(part) for part in version.split(".")[:3])
            cudnn = major * 10000 + minor * 100 + patch
    return {"cuda": getattr(module, "cuda", None), "cudnn": cudnn}


def main():
    packages = {
        dist.metadata["Name"].lower(): dist.version for dist in importlib.metadata.distributions()
    }
    cuda_libs = {n: v for n, v in packages.items() if n.startswith(("nvidia-", "cuda-"))}
    report = {
        "os": os_release(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "python_prefix": sys.prefix,
        "frameworks": {n: packages[n] for n in FRAMEWORKS if n in packages},
        "cuda_libraries": dict(sorted(cuda_libs.items())),
        "torch_build": torch_build(packages),
        "packages": dict(sorted(packages.items())),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
