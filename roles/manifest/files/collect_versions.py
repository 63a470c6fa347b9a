"""Print the exact versions in this environment as JSON (run by the manifest role)."""

import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

FRAMEWORKS = ("torch", "torchvision", "mxnet-cu117", "mxnet", "numpy")
TORCH_BUILD = (
    "import json, torch; "
    "print(json.dumps({'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version()}))"
)


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
    """CUDA and cuDNN torch was built for (read without a GPU)."""
    if "torch" not in packages:
        return None
    try:
        out = subprocess.run(
            [sys.executable, "-c", TORCH_BUILD],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
    except (subprocess.SubprocessError, OSError):
        return None
    return json.loads(out.stdout)


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
