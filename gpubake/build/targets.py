"""The targets gpubake builds for, defined once: what each one is, where it runs, which
Packer files and source build it, which options it takes and how they are checked.

Everything else (the CLI's choices and option checks, the plan, the Packer render, the cloud
checks) asks this registry instead of naming targets itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gpubake import GpubakeError

#: container: an image in the Docker Engine; vm: a cloud image; disk: a VM disk image made
#: here (qemu); host: a running machine the VM playbook is applied to
Kind = Literal["container", "vm", "disk", "host"]


class TargetError(GpubakeError):
    """An unknown target, an option it does not take, or a malformed option value."""


@dataclass(frozen=True)
class Target:
    name: str
    kind: Kind
    help: str
    #: "gcp" / "aws" for the cloud image targets, None elsewhere.
    cloud: str | None = None
    #: The Packer source ("type.name") and the files under images/ that define it; a target
    #: without a source is applied with ansible-playbook (no Packer).
    packer_source: str | None = None
    packer_files: tuple[str, ...] = ()
    #: The CLI options (by their Python names) that only some targets take, and this one does.
    options: frozenset[str] = frozenset()
    #: The options this target cannot go without.
    required: tuple[str, ...] = ()

    @property
    def uses_packer(self) -> bool:
        return self.packer_source is not None

    @property
    def is_vm(self) -> bool:
        """Has a kernel driver of its own (cloud images and hosts): not a container."""
        return self.kind != "container"

    @property
    def is_image(self) -> bool:
        """Produces an image (container or cloud), as opposed to changing a running host."""
        return self.kind != "host"

    @property
    def is_cloud_image(self) -> bool:
        return self.kind == "vm"

    @property
    def is_vm_image(self) -> bool:
        """A VM image built by Packer with vm.pkr.hcl (a cloud image or a local disk): sealed."""
        return self.kind in ("vm", "disk")

    @property
    def packer_type(self) -> str | None:
        return self.packer_source.split(".", 1)[0] if self.packer_source else None


#: The shared build of the VM image targets (vm.pkr.hcl): one build block for the clouds and
#: qemu, rendered with the target's own source only.
VM_BUILD_FILE = "vm.pkr.hcl"
#: Packer files every target with a source renders.
COMMON_PACKER_FILES = ("variables.pkr.hcl",)
#: Written only for Packer >= 1.7 (1.6 rejects required_plugins).
PLUGINS_FILE = "plugins.pkr.hcl"

_CLOUD_OPTIONS = frozenset({"disk_size", "no_gpu_build", "wheelhouse"})

REGISTRY: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "docker",
            "container",
            "a container image in the local Docker Engine",
            packer_source="docker.gpubake",
            packer_files=("docker.pkr.hcl",),
            options=frozenset({"base_image", "wheelhouse", "offline"}),
        ),
        Target(
            "gcp-image",
            "vm",
            "a GCP image built on a GPU VM",
            cloud="gcp",
            packer_source="googlecompute.gpubake",
            packer_files=(VM_BUILD_FILE, "gcp-image.pkr.hcl"),
            options=_CLOUD_OPTIONS | {"project", "zone"},
        ),
        Target(
            "aws-ami",
            "vm",
            "an AWS AMI built on a GPU instance",
            cloud="aws",
            packer_source="amazon-ebs.gpubake",
            packer_files=(VM_BUILD_FILE, "aws-ami.pkr.hcl"),
            options=_CLOUD_OPTIONS | {"region", "profile"},
        ),
        Target(
            "qemu",
            "disk",
            "a VM disk image (qcow2, raw, GCP's disk.raw tar.gz) built here under QEMU",
            packer_source="qemu.gpubake",
            packer_files=(VM_BUILD_FILE, "qemu.pkr.hcl"),
            options=frozenset({"disk_size", "wheelhouse"}),
        ),
        Target(
            "ssh",
            "host",
            "the VM playbook applied to a running machine over ssh",
            options=frozenset({"host", "ssh_key", "known_hosts", "check_mode", "wheelhouse"}),
            required=("host",),
        ),
        Target(
            "local",
            "host",
            "the VM playbook applied to this machine",
            options=frozenset({"check_mode", "wheelhouse"}),
        ),
    )
}

NAMES: tuple[str, ...] = tuple(REGISTRY)
DEFAULT = "docker"

#: CLI spelling of option names that differ from "--" + name.replace("_", "-").
_FLAGS = {"check_mode": "--check", "host": "--host USER@HOST"}


def get(name: str) -> Target:
    try:
        return REGISTRY[name]
    except KeyError:
        raise TargetError(f"unknown target '{name}': use one of {', '.join(NAMES)}") from None


def names(*, packer: bool | None = None, kind: Kind | None = None) -> tuple[str, ...]:
    """Target names, optionally only those with (or without) Packer, or of one kind."""
    return tuple(
        t.name
        for t in REGISTRY.values()
        if (packer is None or t.uses_packer == packer) and (kind is None or t.kind == kind)
    )


def cloud_of(name: str) -> str | None:
    return get(name).cloud


def flag(option: str) -> str:
    return _FLAGS.get(option, "--" + option.replace("_", "-")).split()[0]


def takers(option: str) -> tuple[str, ...]:
    return tuple(t.name for t in REGISTRY.values() if option in t.options)


def check_options(name: str, given: Mapping[str, Any]) -> Target:
    """Refuse an option the target does not take, or a required one that is missing."""
    target = get(name)
    every = set().union(*(t.options for t in REGISTRY.values()))
    for option in sorted(every - target.options):
        if given.get(option):
            raise TargetError(
                f"{flag(option)} applies to --target {' or '.join(takers(option))} only"
            )
    for option in target.required:
        if not given.get(option):
            raise TargetError(f"--target {name} needs {_FLAGS.get(option, flag(option))}")
    return target
