"""Stacks and GPUs as data: load images/stacks.yml + images/gpus.yml, resolve, check.

`resolve()` turns a stack name plus overrides into a frozen `Stack`, or raises
`StackError` with one line naming the conflict and a fix.
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime
import functools
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from packaging.version import InvalidVersion, Version

from gpubake import GpubakeError, data_schema
from gpubake.build import targets
from gpubake.resources import data_root

#: Keys --var may set, with a parser for each value.
_BOOL = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class StackError(GpubakeError):
    """A stack, GPU or OS choice that cannot work."""


@functools.cache
def _load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _label(path: Path) -> str:
    """A data file as messages name it: images/stacks.yml, else its whole path."""
    try:
        return path.relative_to(data_root()).as_posix()
    except ValueError:
        return str(path)


def _roles_beside(path: Path) -> frozenset[str] | None:
    """The collection's roles next to images/ (None where there are none to check against)."""
    roles = path.parent.parent / "roles"
    return frozenset(p.name for p in roles.iterdir() if p.is_dir()) if roles.is_dir() else None


def load_gpus(path: Path) -> dict[str, Any]:
    """images/gpus.yml as the file `path` holds it, checked whole (gpubake.data_schema); a
    malformed file is a StackError naming the file, the key and the problem."""
    label = _label(path)
    try:
        data = data_schema.read_yaml(path, label)
        data_schema.check_gpus(data, label)
    except data_schema.DataFileError as exc:
        raise StackError(str(exc)) from None
    return data


def load_stacks(
    path: Path,
    gpus: Mapping[str, Any],
    *,
    gpus_path: Path | None = None,
    roles: frozenset[str] | None = None,
) -> dict[str, Any]:
    """images/stacks.yml as the file `path` holds it, checked whole against its schema and
    against `gpus` (images/gpus.yml's checked data, read from `gpus_path`) and `roles` (the
    collection's role names; default: the roles/ beside the file's images/, if any)."""
    label = _label(path)
    try:
        data = data_schema.read_yaml(path, label)
        data_schema.check_stacks(
            data,
            label,
            gpus=gpus,
            gpus_label=_label(gpus_path) if gpus_path else "images/gpus.yml",
            roles=_roles_beside(path) if roles is None else roles,
        )
    except data_schema.DataFileError as exc:
        raise StackError(str(exc)) from None
    return data


@functools.cache
def _gpus_at(path: Path) -> dict[str, Any]:
    return load_gpus(path)


@functools.cache
def _stacks_at(path: Path, gpus_path: Path) -> dict[str, Any]:
    return load_stacks(path, _gpus_at(gpus_path), gpus_path=gpus_path)


def stacks_data() -> dict[str, Any]:
    """images/stacks.yml, read and checked once (a malformed file: StackError)."""
    images = data_root() / "images"
    return _stacks_at(images / "stacks.yml", images / "gpus.yml")


def gpus_data() -> dict[str, Any]:
    """images/gpus.yml, read and checked once (a malformed file: StackError)."""
    return _gpus_at(data_root() / "images" / "gpus.yml")


def _ver(text: str) -> Version:
    return Version(str(text))


def _major_minor(text: str) -> tuple[int, int]:
    release = _ver(text).release
    return release[0], release[1] if len(release) > 1 else 0


def machine_arch() -> str:
    arch = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


@dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    architecture: str
    compute_capability: str
    memory_gib: float
    open_kernel_module: str  # unsupported | recommended | required
    last_driver_branch: int | None
    gcp_accelerators: tuple[str, ...]
    aws_instance_families: tuple[str, ...]
    end_of_life: bool = False
    first_driver_branch: int | None = None
    host_arch: str = "x86_64"

    @property
    def sm(self) -> str:
        return "sm_" + self.compute_capability.replace(".", "")


@dataclass(frozen=True)
class OsInfo:
    key: str
    family: str
    codename: str
    python: str
    base_image: str
    nvidia_repo: str
    glibc: str = ""
    debootstrap: Mapping[str, str] | None = None
    gcp: Mapping[str, str] | None = None
    aws: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Stack:
    """A resolved, checked stack: everything a build needs to know about its software."""

    name: str
    description: str
    framework: str
    python_env: str
    python: str
    cuda: str
    driver_branch: str
    packages: tuple[tuple[str, str], ...]
    imports: tuple[str, ...]
    os: OsInfo
    gpu: Gpu | None
    env_size_gib: float
    open_kernel_module: bool
    legacy: bool = False
    miniforge: Mapping[str, Any] | None = None
    overrides: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    driver_source: str = "nvidia"
    cuda_source: str = "nvidia"
    cuda_toolkit: str = ""  # the toolkit the cuda role installs (the OS's with cuda_source=distro)
    # derived stacks (`from:`): the resolved parent, the roles added, the container settings
    parent: Stack | None = None
    roles: tuple[str, ...] = ()
    container: Mapping[str, Any] = field(default_factory=dict)
    # role job_runner (gpubake-job): in VM images and hosts by default, in containers on request
    job_runner: bool = False
    # the compute capabilities the framework carries kernels for (stacks.yml `kernels`)
    kernels: tuple[str, ...] = ()
    # what the build says before it starts (a driver branch past its end of life, allowed)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(dataclasses.replace(self, parent=None))
        data["parent"] = self.parent.name if self.parent else None
        data["roles"] = list(self.roles)
        data["container"] = dict(self.container)
        data["packages"] = dict(self.packages)
        data["overrides"] = dict(self.overrides)
        data["imports"] = list(self.imports)
        data["kernels"] = list(self.kernels)
        data["warnings"] = list(self.warnings)
        if self.gpu is not None:
            data["gpu"]["gcp_accelerators"] = list(self.gpu.gcp_accelerators)
            data["gpu"]["aws_instance_families"] = list(self.gpu.aws_instance_families)
        data["os"] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data["os"].items()}
        if self.miniforge is not None:
            data["miniforge"] = dict(self.miniforge)
        return data

    @property
    def requirements(self) -> list[str]:
        return [f"{name}=={version}" for name, version in self.packages]

    @property
    def lineage(self) -> tuple[Stack, ...]:
        """The stacks this one is built on, from the root to itself."""
        return (*self.parent.lineage, self) if self.parent else (self,)


#: Keys a derived stack adds to its parent's (lists and mappings) instead of replacing.
_ADDED_KEYS = ("packages", "imports", "roles", "container")


def raw_stack(name: str) -> dict[str, Any]:
    """A stack's entry of stacks.yml with its `from:` parents merged in: `packages`,
    `imports` and `roles` add to the parent's, `container` merges over it, the rest is the
    stack's own or else the parent's. `parent` names the parent (None for a root stack)."""
    entries = stacks_data()["stacks"]
    raw = entries.get(name)
    if raw is None:
        raise StackError(f"unknown stack '{name}': choose one of {', '.join(stack_names())}")
    parent_name = raw.get("from")
    if parent_name is None:
        return {"roles": [], "container": {}, **raw, "parent": None, "like": None}
    if parent_name not in entries:
        raise StackError(
            f"stack '{name}' derives from unknown stack '{parent_name}': fix `from:` in "
            "images/stacks.yml"
        )
    merged = raw_stack(parent_name)
    for own in (*_like_additions(raw.get("like")), raw):
        for key, value in own.items():
            if key in ("from", "like"):
                continue
            if key in ("imports", "roles"):
                merged[key] = [*merged[key], *(v for v in value if v not in merged[key])]
            elif key in ("packages", "container"):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    merged["parent"] = parent_name
    merged["like"] = raw.get("like")
    return merged


def _like_additions(name: str | None) -> list[dict[str, Any]]:
    """What stack `name` adds to its parent (`like:`): its own packages, imports, roles and
    container settings, after those of the stack it is like in turn."""
    raw = stacks_data()["stacks"].get(name or "", {})
    if "from" not in raw:
        return []  # a root stack's `like` names its family only
    own = {key: raw[key] for key in _ADDED_KEYS if key in raw}
    return [*_like_additions(raw.get("like")), own]


def family_of(name: str) -> str:
    """The stack a `like:` chain ends at (fastai-legacy: fastai), the stack itself where
    it is like none or is unknown: `gpubake pull fastai` takes any stack of fastai's family."""
    like = stacks_data()["stacks"].get(name, {}).get("like")
    return family_of(like) if like else name


def family(name: str) -> list[str]:
    """The stacks of `name`'s family (fastai: fastai and fastai-legacy), `name` first: the
    repositories `gpubake pull` reads."""
    head = family_of(name)
    return [name, *(n for n in stack_names() if n != name and family_of(n) == head)]


def stack_names() -> list[str]:
    return sorted(stacks_data()["stacks"])


def os_names() -> list[str]:
    return sorted(stacks_data()["operating_systems"])


def gpu_names() -> list[str]:
    return sorted(gpus_data()["gpus"])


def get_gpu(key: str) -> Gpu:
    gpus = gpus_data()
    raw = gpus["gpus"].get(key.lower())
    if raw is None:
        raise StackError(f"unknown GPU '{key}': choose one of {', '.join(gpu_names())}")
    arch = gpus["architectures"][raw["architecture"]]
    return Gpu(
        key=key.lower(),
        name=raw["name"],
        architecture=raw["architecture"],
        compute_capability=str(raw["compute_capability"]),
        memory_gib=float(raw["memory_gib"]),
        open_kernel_module=arch["open_kernel_module"],
        last_driver_branch=arch.get("last_driver_branch"),
        gcp_accelerators=tuple(raw.get("gcp", {}).get("accelerators", [])),
        aws_instance_families=tuple(raw.get("aws", {}).get("instance_families", [])),
        end_of_life=bool(raw.get("end_of_life", False)),
        first_driver_branch=arch.get("first_driver_branch"),
        host_arch=raw.get("host_arch", "x86_64"),
    )


def get_os(key: str) -> OsInfo:
    raw = stacks_data()["operating_systems"].get(key)
    if raw is None:
        raise StackError(f"unknown OS '{key}': choose one of {', '.join(os_names())}")
    return OsInfo(
        key=key,
        family=raw["family"],
        codename=raw["codename"],
        python=str(raw["python"]),
        base_image=raw["base_image"],
        nvidia_repo=raw["nvidia_repo"],
        glibc=str(raw["glibc"]),
        debootstrap=raw.get("debootstrap"),
        gcp=raw.get("gcp"),
        aws=raw.get("aws"),
    )


#: --var keys and what they accept.
VAR_KEYS = (
    "python",
    "cuda",
    "driver_branch",
    "open_kernel_module",
    "driver_source",
    "cuda_source",
    "job_runner",
    "packages.<name>",
)
#: Where the driver and the CUDA toolkit come from: NVIDIA's CUDA repository or the OS's own
#: packages (Debian non-free, Ubuntu's -server branches and multiverse).
#: where the driver / the CUDA toolkit of a VM image or host come from; none: not installed
#: (a CPU-only image, or a machine whose driver and toolkit are there already)
SOURCES = ("nvidia", "distro", "none")


@dataclass(frozen=True)
class DistroPackages:
    """What an OS's own packages give; read from the roles' per-OS variables, which the roles
    install from, so the fact lives in one place."""

    driver_branches: tuple[str, ...]  # empty: any branch the archive has (Ubuntu)
    cuda: str
    open_module: bool  # its open kernel module flavour can be installed


def distro_packages(osinfo: OsInfo) -> DistroPackages:
    distribution, _, version = osinfo.key.partition("-")
    name = f"{distribution.capitalize()}-{version}.yml"
    driver = _load(data_root() / "roles" / "nvidia_driver" / "vars" / name)
    cuda = _load(data_root() / "roles" / "cuda" / "vars" / name)
    return DistroPackages(
        tuple(str(b) for b in driver["__nvidia_driver_distro_branches"]),
        str(cuda["__cuda_distro_version"]),
        bool(driver["__nvidia_driver_distro_open"]),
    )


def parse_vars(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Parse KEY=VALUE strings; reject malformed or unknown keys."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise StackError(f"--var '{item}' is not KEY=VALUE: write e.g. --var driver_branch=580")
        if key not in VAR_KEYS[:-1] and not key.startswith("packages."):
            raise StackError(f"--var key '{key}' is unknown: use one of {', '.join(VAR_KEYS)}")
        out[key] = value
    return out


def _check_version(label: str, value: str) -> str:
    try:
        _ver(value)
    except InvalidVersion:
        raise StackError(f"{label} '{value}' is not a version number: write e.g. 2.15.0") from None
    return value


def resolve(
    name: str | None = None,
    *,
    os_key: str | None = None,
    gpu: str | None = None,
    variables: Mapping[str, str] | None = None,
    target: str = targets.DEFAULT,
    today: datetime.date | None = None,
) -> Stack:
    """Resolve a stack and its overrides into a checked `Stack` (`today`: the date end-of-life
    checks use, today's by default)."""
    data = stacks_data()
    for flag, value, what in (
        ("--stack", name, f"a stack name ({', '.join(stack_names())})"),
        ("--os", os_key, f"an OS ({', '.join(os_names())})"),
        ("--gpu", gpu, "a GPU model such as t4 or h100"),
    ):
        if value is not None and not value.strip():
            raise StackError(f"{flag} is empty: give {what}, or leave {flag} out for the default")
    name = name or data["default_stack"]
    raw = raw_stack(name)
    variables = dict(variables or {})
    osinfo = get_os(os_key or data["default_os"])
    gpu_info = get_gpu(gpu) if gpu else None

    packages = {k: str(v) for k, v in raw["packages"].items()}
    for key, value in variables.items():
        if key.startswith("packages."):
            pkg = key.split(".", 1)[1]
            if pkg not in packages:
                raise StackError(
                    f"--var {key}: stack '{name}' has no package '{pkg}' "
                    f"(it pins {', '.join(packages)})"
                )
            packages[pkg] = _check_version(f"--var {key}", value)

    cuda = _check_version("--var cuda", variables.get("cuda", str(raw["cuda"])))
    branch = variables.get("driver_branch", str(raw["driver_branch"]))
    if not branch.isdigit():
        raise StackError(f"--var driver_branch '{branch}' is not a branch number: write e.g. 580")
    driver_source, cuda_source = (
        variables.get(key, "nvidia") for key in ("driver_source", "cuda_source")
    )
    for key, value in (("driver_source", driver_source), ("cuda_source", cuda_source)):
        if value not in SOURCES:
            raise StackError(f"--var {key}={value}: choose {' or '.join(SOURCES)}")
    if driver_source == "distro" and "driver_branch" not in variables:
        branch = _distro_branch(osinfo, cuda, branch)
    toolkit = _check_sources(name, osinfo, cuda, branch, driver_source, cuda_source)

    # Python: uv environments use the OS's python3; conda brings its own.
    if raw["python_env"] == "uv":
        python = osinfo.python
        if "python" in variables and variables["python"] != python:
            raise StackError(
                f"stack '{name}' uses the OS's Python ({python} on {osinfo.key}): "
                f"--var python works only with a conda stack such as pytorch-conda"
            )
    else:
        python = _check_version("--var python", variables.get("python", str(raw["python"])))

    allowed_pythons = raw.get("pythons")
    if allowed_pythons and python not in allowed_pythons:
        oses = [
            k for k, v in data["operating_systems"].items() if str(v["python"]) in allowed_pythons
        ]
        raise StackError(
            f"stack '{name}' needs Python {', '.join(allowed_pythons)} (its wheels have none "
            f"for {python}), but {osinfo.key} gives {python}: use --os {' or --os '.join(oses)}"
        )

    _check_cuda_driver(name, cuda, branch)
    warnings = _check_eol(name, branch, driver_source, variables, today)

    open_module = _open_module(gpu_info, variables.get("open_kernel_module"))
    job_runner = _flag("job_runner", variables, default=targets.get(target).kind != "container")
    if driver_source == "distro" and open_module and not distro_packages(osinfo).open_module:
        required = gpu_info is not None and gpu_info.open_kernel_module == "required"
        if required or "open_kernel_module" in variables:
            fix = "use --var driver_source=nvidia"
            if not required:
                fix += " or --var open_kernel_module=false"
            raise StackError(
                f"{osinfo.key}'s own open kernel module packages cannot be installed (their "
                f"versions disagree): {fix}"
            )
        open_module = False  # Turing to Hopper work with the proprietary module too
    kernels = stack_kernels(raw, cuda)
    if gpu_info is not None:
        _check_gpu(name, raw, gpu_info, kernels, branch, target, today)

    if raw["python_env"] == "conda":
        arch = machine_arch()
        if arch not in raw.get("miniforge", {}).get("sha256", {}):
            raise StackError(
                f"stack '{name}' has no pinned Miniforge checksum for {arch}: "
                f"add miniforge.sha256.{arch} to images/stacks.yml"
            )

    parent = None
    if raw["parent"]:
        # the parent with the same OS, GPU and target, and the overrides that concern it
        parent_packages = raw_stack(raw["parent"])["packages"]
        parent = resolve(
            raw["parent"],
            os_key=osinfo.key,
            gpu=gpu,
            target=target,
            today=today,
            variables={
                key: value
                for key, value in variables.items()
                if not key.startswith("packages.") or key.split(".", 1)[1] in parent_packages
            },
        )

    return Stack(
        name=name,
        description=raw["description"],
        framework=raw["framework"],
        python_env=raw["python_env"],
        python=python,
        cuda=cuda,
        driver_branch=branch,
        packages=tuple(packages.items()),
        imports=tuple(raw["imports"]),
        os=osinfo,
        gpu=gpu_info,
        env_size_gib=float(raw["env_size_gib"]),
        open_kernel_module=open_module,
        legacy=bool(raw.get("legacy", False)),
        miniforge=raw.get("miniforge"),
        overrides=tuple(sorted(variables.items())),
        driver_source=driver_source,
        cuda_source=cuda_source,
        cuda_toolkit=toolkit,
        parent=parent,
        roles=tuple(raw["roles"]),
        container=dict(raw["container"]),
        job_runner=job_runner,
        kernels=kernels,
        warnings=warnings,
    )


def _flag(key: str, variables: Mapping[str, str], *, default: bool) -> bool:
    value = variables.get(key)
    if value is None:
        return default
    if value.lower() not in ("true", "false"):
        raise StackError(f"--var {key} '{value}' is not true or false: write e.g. --var {key}=true")
    return value.lower() == "true"


def _distro_branch(osinfo: OsInfo, cuda: str, branch: str) -> str:
    """The branch the OS's own driver packages give, where it runs the stack's CUDA (Debian
    12: 535 for a CUDA 11 stack); else `branch`, which _check_sources refuses."""
    given = distro_packages(osinfo).driver_branches
    if given and branch not in given and int(given[-1]) >= min_driver_branch(cuda):
        return given[-1]
    return branch


def _check_sources(
    name: str, osinfo: OsInfo, cuda: str, branch: str, driver_source: str, cuda_source: str
) -> str:
    """Check what the OS's packages give against the stack; return the CUDA toolkit version
    the cuda role installs (the stack's own from NVIDIA, the OS's from distro)."""
    if cuda_source == "none":
        return ""
    if driver_source in ("nvidia", "none") and cuda_source == "nvidia":
        return cuda
    distro = distro_packages(osinfo)
    given = distro.driver_branches
    if driver_source == "distro" and given and int(given[-1]) < min_driver_branch(cuda):
        raise StackError(
            f"{osinfo.key}'s own packages give driver branch {' or '.join(given)}, too old "
            f"for CUDA {cuda} of stack '{name}' (it needs {min_driver_branch(cuda)} or newer): "
            "use --var driver_source=nvidia"
        )
    if driver_source == "distro" and given and branch not in given:
        raise StackError(
            f"{osinfo.key}'s own packages give driver branch "
            f"{' or '.join(given)}, not {branch} (stack '{name}'): use "
            f"--var driver_branch={given[-1]} or --var driver_source=nvidia"
        )
    if cuda_source == "nvidia":
        return cuda
    if _major_minor(distro.cuda)[0] != _major_minor(cuda)[0]:
        raise StackError(
            f"{osinfo.key}'s own packages give CUDA toolkit {distro.cuda}, but stack '{name}' "
            f"is built for CUDA {cuda}: use --var cuda_source=nvidia"
        )
    return distro.cuda


def _check_cuda_driver(name: str, cuda: str, branch: str) -> None:
    """The branch must reach the CUDA major's minimum driver (minor-version compatibility)."""
    branches = stacks_data()["driver_branches"]
    cuda_table = gpus_data()["cuda"]
    cuda_major = str(_major_minor(cuda)[0])
    cuda_info = cuda_table.get(cuda_major)
    if cuda_info is None:
        raise StackError(
            f"CUDA {cuda} is not known to gpubake: use CUDA {', '.join(sorted(cuda_table))}.x"
        )
    if branch not in branches:
        raise StackError(
            f"driver branch {branch} is unknown: choose one of {', '.join(sorted(branches))}"
        )
    min_driver = str(cuda_info["min_driver"])
    if int(branch) < _ver(min_driver).release[0]:
        newer = sorted((b for b in branches if int(b) >= _ver(min_driver).release[0]), key=int)
        fix = f"use --var driver_branch={newer[0]} or newer" if newer else "use an older CUDA"
        raise StackError(
            f"driver branch {branch} is too old for CUDA {cuda} of stack '{name}' "
            f"(CUDA {cuda_major}.x needs driver {min_driver} or newer): {fix}"
        )


def _open_module(gpu: Gpu | None, forced: str | None) -> bool:
    if forced is not None:
        value = _BOOL.get(forced.lower())
        if value is None:
            raise StackError(
                f"--var open_kernel_module '{forced}' is not true or false: write e.g. "
                "--var open_kernel_module=false"
            )
        if value and gpu is not None and gpu.open_kernel_module == "unsupported":
            raise StackError(
                f"the open kernel module does not support {gpu.key} ({gpu.architecture}, "
                f"{gpu.sm}): drop --var open_kernel_module=true (Turing and newer only)"
            )
        if not value and gpu is not None and gpu.open_kernel_module == "required":
            raise StackError(
                f"{gpu.key} ({gpu.architecture}) needs the open kernel module: "
                "drop --var open_kernel_module=false"
            )
        return value
    if gpu is None:
        return True  # R560+ default; every GPU CUDA 13 supports is Turing or newer
    return gpu.open_kernel_module != "unsupported"


def cuda_major_facts(cuda: str) -> Mapping[str, Any]:
    """images/gpus.yml's facts of CUDA `cuda`'s major version: min_cc, min_driver."""
    return gpus_data()["cuda"][str(_major_minor(cuda)[0])]


def min_driver_branch(cuda: str) -> int:
    """The oldest driver branch that runs CUDA `cuda`: its major's min_driver in
    images/gpus.yml (minor-version compatibility), e.g. 580 for 13.x, 450 for 11.x."""
    return _ver(str(cuda_major_facts(cuda)["min_driver"])).release[0]


def compute_capabilities(cuda: str) -> tuple[str, ...]:
    """The compute capabilities CUDA `cuda` builds for, as images/gpus.yml knows them (each
    known GPU's and each architecture's first, from the CUDA major's min_cc on), sorted: the
    label a plan writes; a build replaces it with the framework's own list where the
    framework reports one (gpu-smoke: torch's arch list)."""
    data = gpus_data()
    lowest = _major_minor(str(cuda_major_facts(cuda)["min_cc"]))
    known = {str(g["compute_capability"]) for g in data["gpus"].values()}
    known |= {str(a["min_cc"]) for a in data["architectures"].values()}
    return tuple(sorted((c for c in known if _major_minor(c) >= lowest), key=_major_minor))


def stack_kernels(raw: Mapping[str, Any], cuda: str) -> tuple[str, ...]:
    """The compute capabilities a stack's framework carries kernels for: stacks.yml's
    `kernels` list (its PTX target, `ptx`, is read by kernels_run_on), else every one CUDA
    `cuda` builds for (compute_capabilities)."""
    kernels = raw.get("kernels")
    if not kernels:
        return compute_capabilities(cuda)
    return tuple(kernels["list"])


def kernels_run_on(cc_text: str, raw: Mapping[str, Any], kernels: tuple[str, ...]) -> bool:
    """Whether compute capability `cc_text` runs a stack (`raw`) carrying `kernels`: a kernel
    for X.Y runs on X.Z (Z >= Y); PTX for X.Y JITs on any newer GPU."""
    cc = _major_minor(cc_text)
    ptx = (raw.get("kernels") or {}).get("ptx")
    if ptx is not None and cc >= _major_minor(str(ptx)):
        return True
    return any(k[0] == cc[0] and k[1] <= cc[1] for k in map(_major_minor, kernels))


def sm_span(kernels: tuple[str, ...] | list[str]) -> str:
    """'sm_75 to sm_120' for kernels 7.5 ... 12.0, as messages and `gpubake stacks` say it."""
    return f"sm_{kernels[0].replace('.', '')} to sm_{kernels[-1].replace('.', '')}"


def branch_eol(branch: str) -> datetime.date | None:
    """The last day NVIDIA supports driver branch `branch` (stacks.yml's eol month)."""
    eol = stacks_data()["driver_branches"][branch].get("eol")
    if eol is None:
        return None
    year, month = (int(part) for part in eol.split("-"))
    return datetime.date(year, month, calendar.monthrange(year, month)[1])


def _check_eol(
    name: str,
    branch: str,
    driver_source: str,
    variables: Mapping[str, str],
    today: datetime.date | None,
) -> tuple[str, ...]:
    """Refuse a branch past its end of life (or say it, where the user allowed it or took the
    OS's own driver packages)."""
    if branch_supported(branch, today):
        return ()
    eol = branch_eol(branch)
    said = f"driver branch {branch} (stack '{name}') is past its end of life ({eol:%Y-%m})"
    if driver_source == "distro":
        return (f"{said}: the OS's own packages give it; NVIDIA fixes it no more",)
    if _flag("allow_eol_driver", variables, default=False):
        return (f"{said}: built anyway (--var allow_eol_driver=true)",)
    newer = [b for b in supported_branches(today) if int(b) > int(branch)]
    fix = f"--var driver_branch={newer[0]}" if newer else "a newer driver branch"
    raise StackError(f"{said}: use {fix}, or --var allow_eol_driver=true to build it anyway")


def branch_supported(branch: str, today: datetime.date | None = None) -> bool:
    """Whether NVIDIA still supports driver branch `branch` on `today` (default: today); a
    branch without an end of life is."""
    eol = branch_eol(branch)
    return eol is None or (today or datetime.date.today()) <= eol


def supported_branches(today: datetime.date | None = None) -> list[str]:
    """Driver branches NVIDIA still supports on `today`, oldest first."""
    return sorted(
        (b for b in stacks_data()["driver_branches"] if branch_supported(b, today)), key=int
    )


def _branch_fits(gpu: Gpu, branch: str) -> bool:
    first, last = gpu.first_driver_branch, gpu.last_driver_branch
    return (first is None or int(branch) >= first) and (last is None or int(branch) <= last)


def stacks_for_gpu(
    gpu: Gpu, like: str | None = None, today: datetime.date | None = None
) -> list[str]:
    """Stacks whose images run on `gpu` (kernels for it, a driver branch it can use and NVIDIA
    still supports, its CPU's architecture), those of `like`'s family first."""
    if gpu.host_arch != "x86_64":
        return []
    fits = []
    for other in stack_names():
        raw = raw_stack(other)
        branch, cuda = str(raw["driver_branch"]), str(raw["cuda"])
        if (
            kernels_run_on(gpu.compute_capability, raw, stack_kernels(raw, cuda))
            and _branch_fits(gpu, branch)
            and branch_supported(branch, today)
        ):
            fits.append(other)
    family = family_of(like) if like else None
    return sorted(fits, key=lambda s: (family_of(s) != family, s != family, s))


def _no_stack_why(gpu: Gpu, today: datetime.date | None) -> str:
    """Why no stack runs on `gpu`."""
    last = gpu.last_driver_branch
    if last is not None and not branch_supported(str(last), today):
        return (
            f"no stack of gpubake runs there: {gpu.architecture}'s last driver branch "
            f"{last} is past its end of life ({branch_eol(str(last)):%Y-%m})"
        )
    return f"no stack of gpubake carries kernels for {gpu.sm} on a driver branch it can use"


def _use_instead(gpu: Gpu, name: str, today: datetime.date | None) -> str:
    fits = stacks_for_gpu(gpu, like=name, today=today)
    if not fits:
        return _no_stack_why(gpu, today)
    if family_of(fits[0]) == family_of(name):
        return f"use --stack {fits[0]}"
    return f"use a stack that runs there: {', '.join(fits)}"


def _check_gpu(
    name: str,
    raw: Mapping[str, Any],
    gpu: Gpu,
    kernels: tuple[str, ...],
    branch: str,
    target: str,
    today: datetime.date | None = None,
) -> None:
    if gpu.host_arch != "x86_64":
        raise StackError(
            f"GPU {gpu.key} comes in {gpu.host_arch} (Arm) machines: gpubake builds "
            f"x86_64 images only, Arm images are not built yet"
        )
    if not kernels_run_on(gpu.compute_capability, raw, kernels):
        raise StackError(
            f"GPU {gpu.key} ({gpu.architecture}, {gpu.sm}) has no kernels in stack '{name}' "
            f"(it carries {sm_span(kernels)}): {_use_instead(gpu, name, today)}"
        )
    if gpu.last_driver_branch is not None and int(branch) > gpu.last_driver_branch:
        raise StackError(
            f"GPU {gpu.key} ({gpu.architecture}) is supported only up to driver branch "
            f"{gpu.last_driver_branch}, but stack '{name}' uses {branch}: "
            f"{_use_instead(gpu, name, today)}"
        )
    if gpu.first_driver_branch is not None and int(branch) < gpu.first_driver_branch:
        raise StackError(
            f"GPU {gpu.key} ({gpu.architecture}) needs driver branch {gpu.first_driver_branch} "
            f"or newer, but stack '{name}' uses {branch}: "
            f"use --var driver_branch={gpu.first_driver_branch} or newer"
        )
    cloud = targets.cloud_of(target)
    if cloud == "gcp" and not gpu.gcp_accelerators:
        offered = [
            k for k in gpu_names() if gpus_data()["gpus"][k].get("gcp", {}).get("accelerators")
        ]
        raise StackError(f"GPU {gpu.key} is not offered on GCP: choose one of {', '.join(offered)}")
    if cloud == "aws" and not gpu.aws_instance_families:
        offered = [
            k for k in gpu_names() if gpus_data()["gpus"][k].get("aws", {}).get("instance_families")
        ]
        raise StackError(f"GPU {gpu.key} is not offered on AWS: choose one of {', '.join(offered)}")
