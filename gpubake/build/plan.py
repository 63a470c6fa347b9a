"""Stack + target + inputs -> BuildPlan: Ansible vars, Packer vars, image name, labels,
input hash.

Pure: no subprocess, clock, PATH or git lookups here. What comes from the machine (the git
revision, the time, the Packer version, the base image id, the ansible-playbook to run, a
build id) is passed in by the caller (gpubake.build.flow); the input files are read from gpubake's
data (gpubake.build.hashing), which does not change while gpubake runs.
`gpubake.build.render` writes a plan out for Packer.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpubake import GpubakeError, __version__, resources, stacks
from gpubake.build import targets, vm_disk
from gpubake.build.hashing import input_hash
from gpubake.build.labels import HASH_LABEL, LABEL_PREFIX
from gpubake.build.locks import Lock
from gpubake.stacks import Stack, stacks_data

ENV_PREFIX = "/opt/gpubake/env"
DEFAULT_USER = "gpubake"
BUILD_CA_DIR = "/run/gpubake-build"
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class PlanError(GpubakeError):
    """A build option that cannot work."""


# Labels a container image carries for the pulling side (gpubake.publish.selection reads them from
# the registry without pulling layers).
STACK_LABEL = f"{LABEL_PREFIX}.stack"
FRAMEWORK_LABEL = f"{LABEL_PREFIX}.framework"
FRAMEWORK_VERSION_LABEL = f"{LABEL_PREFIX}.framework-version"
# the stack's own pins and its parents' ("torch==2.15.0 ... fastai==2.8.12"): what the image is
PACKAGES_LABEL = f"{LABEL_PREFIX}.packages"
CUDA_LABEL = f"{LABEL_PREFIX}.cuda"
PYTHON_LABEL = f"{LABEL_PREFIX}.python"
OS_LABEL = f"{LABEL_PREFIX}.os"
MIN_DRIVER_LABEL = f"{LABEL_PREFIX}.min-driver"  # the driver branch, e.g. 580
CC_LABEL = f"{LABEL_PREFIX}.compute-capabilities"  # e.g. 7.5,8.0,8.6,8.9,9.0
SMOKE_LABEL = f"{LABEL_PREFIX}.smoke"  # SMOKE_PASSED or SMOKE_CPU_CHECKED
SMOKE_DIGEST_LABEL = f"{LABEL_PREFIX}.smoke-digest"  # sha256 of gpu-smoke's JSON report
VERSION_LABEL = "org.opencontainers.image.version"  # the immutable tag
CREATED_LABEL = "org.opencontainers.image.created"
#: Where the build's gpu-smoke writes its report (playbooks/smoke.yml's gpu_smoke_test_report)
SMOKE_REPORT = "/etc/gpubake/smoke-report.json"
#: The image's CycloneDX SBOM (role manifest's manifest_sbom_path), named by its SBOM_LABEL
SBOM_PATH = "/etc/gpubake/sbom.cdx.json"
SBOM_LABEL = f"{LABEL_PREFIX}.sbom"
SMOKE_PASSED = "passed"  # gpu-smoke ran its GPU checks and passed
SMOKE_CPU_CHECKED = "cpu-checked"  # built without a GPU: only the CPU-side checks ran (passed)


def lock_pins(lock: Lock | None) -> dict[str, dict[str, Any]]:
    """A lock's pins as role manifest's manifest_lock_pins, {name: {version, hashes}}: the
    SBOM lists each locked package's hashes (every file the lock allows). None: no lock."""
    if lock is None:
        return {}
    return {
        name: {"version": version, "hashes": list(hashes)}
        for name, (version, hashes) in sorted(lock.pins.items())
    }


def framework_version(stack: Stack) -> str:
    """The first pinned package of a stack is its framework (torch for pytorch's children)."""
    return stack.packages[0][1]


def immutable_tag(stack: Stack, created: str, digest: str) -> str:
    """The tag that names an image's content and is never moved, e.g.
    2.15.0-cu132-py3.11-debian12-20261201-4e5d614f236a (created: an RFC 3339 stamp)."""
    cuda = stack.cuda.replace(".", "")
    os_key = re.sub(r"[^a-z0-9]", "", stack.os.key)
    day = created[:10].replace("-", "")
    return f"{framework_version(stack)}-cu{cuda}-py{stack.python}-{os_key}-{day}-{digest[:12]}"


def rolling_tags(version: str, cuda: str) -> list[str]:
    """Tags moved to each newly published image of a stack, from its framework version and
    CUDA (the image's labels), e.g. [2.15-cu132, latest]."""
    minor = ".".join(version.split(".")[:2])
    return [f"{minor}-cu{cuda.replace('.', '')}", "latest"]


@dataclass(frozen=True)
class BuildPlan:
    target: str
    stack: Stack
    image_repository: str
    image_tag: str
    base_image: str
    base_image_id: str
    input_hash: str
    labels: Mapping[str, str]
    ansible_vars: Mapping[str, Any]
    packer_vars: Mapping[str, Any]
    ca_bundle: Path | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    image: str = ""
    # the requirements (with hashes) the build installs, written beside ansible-vars.json
    python_env_lock: str = ""

    @property
    def packer_only(self) -> str | None:
        """The source `packer build -only=` selects (None: applied without Packer). A render
        holds this source only; gpubake names it anyway, so its command line says what runs."""
        target = targets.get(self.target)
        return target.packer_source if target.is_vm_image else None

    @property
    def image_ref(self) -> str:
        return self.image or f"{self.image_repository}:{self.image_tag}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "image": self.image_ref,
            "base_image": self.base_image,
            "base_image_id": self.base_image_id,
            "input_hash": self.input_hash,
            "stack": self.stack.to_dict(),
            "labels": dict(self.labels),
            "ansible_vars": dict(self.ansible_vars),
            "packer_vars": dict(self.packer_vars),
            "ca_bundle": str(self.ca_bundle) if self.ca_bundle else None,
            "notes": list(self.notes),
        }


def check_tag(tag: str) -> str:
    if not _TAG_RE.fullmatch(tag):
        raise PlanError(
            f"--tag '{tag}' is not a valid Docker tag: use up to 128 letters, digits, "
            "'_', '.' and '-', not starting with '.' or '-'"
        )
    return tag


def check_ca_bundle(path: str | os.PathLike[str] | None) -> Path | None:
    if path is None:
        return None
    bundle = Path(path)
    if not bundle.is_file():
        raise PlanError(
            f"--ca-bundle {bundle}: no such file; give a PEM bundle such as "
            "/etc/ssl/certs/ca-certificates.crt"
        )
    head = bundle.read_bytes()[:1_000_000]
    if b"-----BEGIN CERTIFICATE-----" not in head:
        raise PlanError(
            f"--ca-bundle {bundle} holds no PEM certificate: give a PEM bundle "
            "(-----BEGIN CERTIFICATE----- ...)"
        )
    return bundle.resolve()


def _core_ansible_vars(stack: Stack, target: str, require_gpu: bool) -> dict[str, Any]:
    """The Ansible variables that shape the image (and so enter the input hash)."""
    tools = stacks_data()["tools"]
    data: dict[str, Any] = {
        "gpubake_stack": stack.to_dict(),
        "gpubake_target": target,
        # for the playbooks: which kind of target (container, vm, host) and cloud (gcp, aws, "")
        "gpubake_target_kind": targets.get(target).kind,
        "gpubake_cloud": targets.cloud_of(target) or "",
        "python_env_kind": stack.python_env,
        "python_env_prefix": ENV_PREFIX,
        "python_env_python": stack.python,
        "python_env_uv_version": tools["uv"]["version"],
        "python_env_uv_sha256": dict(tools["uv"]["sha256"]),
        "base_user_name": DEFAULT_USER,
        "gpu_smoke_test_args": ["--require-gpu"] if require_gpu else [],
        "gpu_smoke_test_report": SMOKE_REPORT,
        "manifest_sbom_path": SBOM_PATH,
    }
    if stack.miniforge:
        data["python_env_miniforge_version"] = stack.miniforge["version"]
        data["python_env_miniforge_sha256"] = dict(stack.miniforge["sha256"])
    data[f"{stack.framework}_packages"] = dict(stack.packages)
    # a role a derived stack adds installs the packages that stack adds (e.g. jupyterlab)
    for level in stack.lineage:
        inherited = dict(level.parent.packages) if level.parent else {}
        own = {k: v for k, v in level.packages if k not in inherited}
        for role in level.roles:
            if level.parent is None or role not in level.parent.roles:
                data[f"{role}_packages"] = own
    return data


def docker_changes(container: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """The image config `docker commit` sets: the defaults, then the stack's `container`
    settings (workdir, volumes, ports, healthcheck, cmd), then the labels."""
    path = f"{ENV_PREFIX}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    changes = [
        f"USER {DEFAULT_USER}",
        f"WORKDIR {container.get('workdir', f'/home/{DEFAULT_USER}')}",
        f"ENV PATH={path}",
        f"ENV VIRTUAL_ENV={ENV_PREFIX}",
        "ENV LANG=C.UTF-8",
        "ENV NVIDIA_VISIBLE_DEVICES=all",
        "ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility",
    ]
    changes += (
        [f"VOLUME {json.dumps(list(container['volumes']))}"] if "volumes" in container else []
    )
    changes += [f"EXPOSE {port}" for port in container.get("ports", [])]
    if "healthcheck" in container:
        changes.append(f"HEALTHCHECK {container['healthcheck']}")
    changes.append(f"CMD {json.dumps(list(container.get('cmd', ['/bin/bash'])))}")
    changes += [f"LABEL {key}={json.dumps(value)}" for key, value in sorted(labels.items())]
    return changes


@dataclass(frozen=True)
class CloudOptions:
    """Options of the VM targets; gpubake.cli checks them before anything starts."""

    project: str | None = None
    zone: str | None = None
    region: str | None = None
    profile: str | None = None
    disk_size_gb: int | None = None
    gpu_build: bool = True
    max_run_minutes: int = 120


def required_disk_gb(stack: Stack) -> int:
    """Smallest VM disk the stack fits on: OS + driver + CUDA toolkit + environment, plus margin."""
    disk = stacks_data()["vm_disk"]
    need = disk["os_gib"] + disk["driver_gib"] + disk["cuda_toolkit_gib"] + stack.env_size_gib
    return math.ceil(need * disk["margin"])


def _gcp_label(value: str) -> str:
    """GCP label values: lowercase letters, digits, '_' and '-', at most 63."""
    return re.sub(r"[^a-z0-9_-]", "_", value.lower())[:63]


def _common_labels(stack: Stack, digest: str) -> dict[str, str]:
    return {
        "gpubake-stack": stack.name,
        "gpubake-framework": stack.framework,
        "gpubake-framework-version": stack.packages[0][1],
        "gpubake-cuda": stack.cuda,
        "gpubake-python": stack.python,
        "gpubake-os": stack.os.key,
        # `gpubake job run` starts only images whose runner (role job_runner) is in
        "gpubake-job-runner": "true" if stack.job_runner else "false",
        "gpubake-version": __version__,
        # GCP label values hold 63 characters: 40 hex digits (160 bits) of the hash
        "gpubake-input-hash": digest[:40],
        "gpubake-sbom": SBOM_PATH,
    }


def _vm_ansible_vars(stack: Stack, target: str) -> dict[str, Any]:
    cloud_image = targets.get(target)
    gpu = stack.gpu
    fabric = False
    # the architecture's facts from gpus.yml (their one copy), for the driver role's checks
    arch = stacks.gpus_data()["architectures"][gpu.architecture] if gpu else {}
    if gpu is not None:
        nvswitch = stacks.gpus_data()["gpus"][gpu.key].get("nvswitch", {})
        machine = _build_machine(stack, target)
        fabric = any(
            machine.startswith(m) for m in nvswitch.get("aws", []) + nvswitch.get("gcp", [])
        )
    return {
        "nvidia_driver_branch": stack.driver_branch,
        "nvidia_driver_open": stack.open_kernel_module,
        "nvidia_driver_source": stack.driver_source,
        "nvidia_repo_distro": stack.os.nvidia_repo,
        "nvidia_driver_gpu_architecture": gpu.architecture if gpu else "",
        "nvidia_driver_gpu_open_kernel_module": arch.get("open_kernel_module", ""),
        "nvidia_driver_gpu_last_branch": arch.get("last_driver_branch", 0),
        "nvidia_driver_fabric_manager": fabric,
        "cuda_version": stack.cuda_toolkit or stack.cuda,
        "cuda_source": stack.cuda_source,
        "logging_agent_kind": cloud_image.cloud if cloud_image.is_cloud_image else "none",
        "image_cleanup_vm": cloud_image.is_vm_image,
        # Packer reboots image builds itself (vm.pkr.hcl); a host (ssh, local) is rebooted by
        # the role's handler when the driver changed
        "nvidia_driver_reboot": not cloud_image.is_vm_image,
        # validate.sh fails the bake unless DKMS built the driver for the image's kernel
        "image_cleanup_expect_dkms": (
            ["nvidia"] if cloud_image.is_vm_image and stack.driver_source != "none" else []
        ),
    }


def _build_machine(stack: Stack, target: str) -> str:
    cloud = targets.cloud_of(target)
    if stack.gpu is None or cloud is None:
        return stacks_data()["cpu_build_machines"].get(cloud or "", "")
    raw = stacks.gpus_data()["gpus"][stack.gpu.key][cloud]
    return raw["build_machine_type"] if cloud == "gcp" else raw["build_instance_type"]


def make_plan(
    stack: Stack,
    *,
    target: str = targets.DEFAULT,
    base_image: str,
    base_image_id: str,
    tag: str = "latest",
    ca_bundle: Path | None = None,
    require_gpu: bool = False,
    verbose: int = 0,
    notes: tuple[str, ...] = (),
    cloud: CloudOptions | None = None,
    packer_version: tuple[int, int, int] = (1, 6, 6),
    ansible_playbook: str = "ansible-playbook",
    created: dt.datetime | None = None,
    git_revision: str | None = None,
    build_id: str = "",
    lock: Lock | None = None,
) -> BuildPlan:
    """The plan of one build. The machine's part comes in as arguments: `packer_version`
    (Packer 1.6 needs ssh-rsa for its proxy), `ansible_playbook` (the command Packer runs),
    `created` (image creation label, AMI name stamp; None: left out), `git_revision` (image
    label; None: left out) and `build_id` (makes the build container's name unique).
    `lock`: the lock the build installs, whose hashes the SBOM lists (manifest_lock_pins;
    a container's stages get their stack's lock from gpubake.build.stages.plan_chain)."""
    try:
        kind = targets.get(target)
    except targets.TargetError as exc:
        raise PlanError(str(exc)) from None
    check_tag(tag)
    cloud = cloud or CloudOptions()
    vm = kind.is_vm
    core = _core_ansible_vars(stack, target, require_gpu)
    core["manifest_lock_pins"] = lock_pins(lock)
    if vm:
        core.update(_vm_ansible_vars(stack, target))
    digest = input_hash({"target": target, "ansible": core}, base_image_id=base_image_id)

    labels, packer_vars, image_ref = _target_specifics(
        stack,
        target,
        digest,
        base_image,
        tag,
        cloud,
        packer_version,
        base_image_id=base_image_id,
        created=created,
        git_revision=git_revision,
        build_id=build_id,
    )
    repository = f"gpubake/{stack.name}"

    ansible_vars = dict(core)
    ansible_vars["manifest_build"] = {
        "gpubake_version": __version__,
        "stack": stack.name,
        "target": target,
        "input_hash": digest,
        "cuda": stack.cuda,
        "driver_branch": stack.driver_branch,
        "base_image": base_image,
    }
    if vm:
        ansible_vars["manifest_build"].update(
            driver_source=stack.driver_source,
            cuda_source=stack.cuda_source,
            cuda_toolkit=stack.cuda_toolkit,
        )
    ansible_vars["build_ca_bundle"] = str(ca_bundle) if ca_bundle else ""
    if ca_bundle:
        bundle = f"{BUILD_CA_DIR}/ca-bundle.crt"
        ansible_vars["build_ca_environment"] = dict.fromkeys(
            (
                "SSL_CERT_FILE",
                "REQUESTS_CA_BUNDLE",
                "PIP_CERT",
                "CURL_CA_BUNDLE",
                "CONDA_SSL_VERIFY",
            ),
            bundle,
        )
    common = {
        "stack": stack.name,
        "input_hash": digest,
        "ansible_playbook_command": ansible_playbook,
        "ansible_extra_arguments": ["-" + "v" * verbose] if verbose else [],
    }
    return BuildPlan(
        target=target,
        stack=stack,
        image_repository=repository,
        image_tag=tag,
        base_image=base_image,
        base_image_id=base_image_id,
        input_hash=digest,
        labels=labels,
        ansible_vars=ansible_vars,
        packer_vars={**common, **packer_vars} if kind.uses_packer else {},
        ca_bundle=ca_bundle,
        notes=notes,
        image=image_ref,
    )


def _target_specifics(
    stack: Stack,
    target: str,
    digest: str,
    base_image: str,
    tag: str,
    cloud: CloudOptions,
    packer_version: tuple[int, int, int],
    *,
    base_image_id: str,
    created: dt.datetime | None,
    git_revision: str | None,
    build_id: str,
) -> tuple[dict[str, str], dict[str, Any], str]:
    """(labels, target packer vars, image reference) for one target."""
    kind = targets.get(target)
    if kind.kind == "container":
        repository = f"gpubake/{stack.name}"
        labels = {
            "org.opencontainers.image.title": repository,
            "org.opencontainers.image.description": stack.description,
            "org.opencontainers.image.vendor": "gpubake",
            "org.opencontainers.image.base.name": base_image,
            "org.opencontainers.image.source": resources.project_url(),
            STACK_LABEL: stack.name,
            FRAMEWORK_LABEL: stack.framework,
            FRAMEWORK_VERSION_LABEL: framework_version(stack),
            PACKAGES_LABEL: " ".join(f"{name}=={version}" for name, version in stack.packages),
            CUDA_LABEL: stack.cuda,
            MIN_DRIVER_LABEL: str(stacks.min_driver_branch(stack.cuda)),
            CC_LABEL: ",".join(stack.kernels),
            PYTHON_LABEL: stack.python,
            OS_LABEL: stack.os.key,
            f"{LABEL_PREFIX}.version": __version__,
            HASH_LABEL: digest,
            SBOM_LABEL: SBOM_PATH,
        }
        if base_image_id.startswith("sha256:"):
            labels["org.opencontainers.image.base.digest"] = base_image_id
        if created is not None:
            stamp = created.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            labels[CREATED_LABEL] = stamp  # the immutable tag: gpubake.build.stages, last stage
        if git_revision:
            labels["org.opencontainers.image.revision"] = git_revision
        packer_vars = {
            "base_image": base_image,
            "image_repository": repository,
            "image_tag": tag,
            "container_name": "-".join(
                part for part in ("gpubake-build", digest[:12], build_id) if part
            ),
            "docker_changes": docker_changes(stack.container, labels),
        }
        return labels, packer_vars, f"{repository}:{tag}"
    if not kind.uses_packer:
        return _common_labels(stack, digest), {}, target
    ssh_args = (
        ["--ssh-extra-args", "-o HostKeyAlgorithms=+ssh-rsa -o PubkeyAcceptedKeyTypes=+ssh-rsa"]
        if packer_version < (1, 7, 0)
        else []
    )
    disk = cloud.disk_size_gb or max(
        stacks_data()["vm_disk"]["default_gib"], required_disk_gb(stack)
    )
    if kind.kind == "disk":  # Packer grows the base disk's copy, never shrinks it
        disk = max(disk, vm_disk.DISK_SIZE_GIB)
    gpu = stack.gpu
    machine = _build_machine(stack, target) if cloud.gpu_build else ""
    common = {
        "disk_size_gb": disk,
        "ansible_ssh_extra_args": ssh_args,
        "max_run_minutes": cloud.max_run_minutes,
    }
    if kind.kind == "disk":
        labels = _common_labels(stack, digest)
        name = f"gpubake-{stack.name}-{digest[:12]}"
        # the base disk, the accelerator and the build's login key are the machine's: gpubake
        # adds them when it builds (gpubake.build.disk_image)
        packer_vars = {
            "image_name": name,
            "image_labels": labels,
            "ssh_username": vm_disk.USER,
            **common,
        }
        return labels, packer_vars, name
    if kind.cloud == "gcp":
        labels = {k: _gcp_label(v) for k, v in _common_labels(stack, digest).items()}
        name = f"gpubake-{stack.name}-{digest[:12]}"
        attach = cloud.gpu_build and gpu is not None and machine.startswith("n1-")
        packer_vars = {
            "gcp_project": cloud.project or "",
            "gcp_zone": cloud.zone or "",
            "gcp_source_image_family": stack.os.gcp["image_family"],
            "gcp_source_image_project": stack.os.gcp["image_project"],
            "gcp_machine_type": machine or stacks_data()["cpu_build_machines"]["gcp"],
            "gcp_accelerator_type": gpu.gcp_accelerators[0] if attach and gpu else "",
            "gcp_accelerator_count": 1,
            "gcp_gpu": bool(cloud.gpu_build and gpu is not None),
            "image_name": name,
            "image_family": f"gpubake-{stack.name}",
            "image_labels": labels,
            "ssh_username": "packer",
            "preemptible": True,
            **common,
        }
        return labels, packer_vars, name
    labels = _common_labels(stack, digest)
    labels["gpubake-input-hash"] = digest  # AWS tags hold 256 characters
    # AMI names are unique per region: a rebuild (--force) gets a new one by its time
    stamp = created.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S") if created else ""
    name = "-".join(part for part in ("gpubake", stack.name, digest[:12], stamp) if part)
    packer_vars = {
        "aws_region": cloud.region or "",
        "aws_profile": cloud.profile or "",
        "aws_instance_type": machine or stacks_data()["cpu_build_machines"]["aws"],
        "aws_source_ami_name": stack.os.aws["ami_name"],
        "aws_source_ami_owner": stack.os.aws["owner"],
        "aws_root_device": stack.os.aws["root_device"],
        "ssh_username": stack.os.aws["ssh_username"],
        "image_name": name,
        "image_labels": {**labels, "Name": name},
        "spot": True,
        **common,
    }
    return labels, packer_vars, name
