"""Container images as chains of stages: each stage is one Packer build on the image of
the stage before, committed as one layer and labelled with its own input hash, so that an
unchanged stage is reused and only a changed stage and those after it are rebuilt.

The stages and their roles are data (images/stacks.yml `container_stages`). A stage's hash
covers what it uses and nothing else: the files of its roles and of the roles and modules
they name (gpubake.build.hashing.stage_files), the variables of those roles, the part of the lock
it installs, its container settings when it is a stack's last stage, and the hash of the
stage below it (or the base image's id). A stack that derives from another adds its
`derived` stages on its parent's last image, whose layers it shares unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpubake.build import hashing
from gpubake.build.locks import Lock, subset
from gpubake.build.plan import (
    CREATED_LABEL,
    HASH_LABEL,
    LABEL_PREFIX,
    VERSION_LABEL,
    BuildPlan,
    docker_changes,
    immutable_tag,
    lock_pins,
)
from gpubake.build.wheelhouse import MOUNT as WHEELHOUSE_MOUNT
from gpubake.stacks import Stack, stacks_data

STAGE_REPOSITORY = "gpubake-stage"
STAGE_LABEL = f"{LABEL_PREFIX}.stage"
#: Where the host's download cache is mounted in a build container (not committed: a mount).
UV_CACHE_MOUNT = "/run/gpubake-uv-cache"
#: Variables every stage's hash covers besides its roles' own (role prefix) variables.
_SHARED_VARS = ("base_user_name",)


@dataclass(frozen=True)
class Stage:
    stack: str
    name: str
    roles: tuple[str, ...]
    lock: str  # "", "cuda" or "all": the part of the stack's lock the stage installs
    input_hash: str
    plan: (
        BuildPlan  # what gpubake.build.render and Packer take; plan.image_ref is the stage's image
    )
    final: bool  # the stack's last stage, tagged gpubake/<stack>:<tag>
    smoke: bool

    @property
    def label(self) -> str:
        return f"{self.stack}:{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "stage": self.name,
            "roles": list(self.roles),
            "lock": self.lock,
            "input_hash": self.input_hash,
            "image": self.plan.image_ref,
            "base_image": self.plan.base_image,
        }


def stage_names(stack: Stack) -> list[str]:
    """The stages a stack adds: all of them for a root stack, the `derived` ones otherwise."""
    spec = stacks_data()["container_stages"]
    return list(spec["derived" if stack.parent else "root"])


def _own_roles(stack: Stack) -> list[str]:
    inherited = stack.parent.roles if stack.parent else ()
    return [role for role in stack.roles if role not in inherited]


def stage_roles(stack: Stack, name: str) -> tuple[str, ...]:
    """The roles stage `name` of `stack` applies (`framework`: the stack's framework role and
    the roles the stack itself adds)."""
    roles: list[str] = []
    for role in stacks_data()["container_stages"]["stages"][name]["roles"]:
        if role == "framework":
            # no framework: python_env itself installs the stack's lock (its `packages`)
            roles += [stack.framework] if stack.framework != "none" else ["python_env"]
            roles += _own_roles(stack)
        else:
            roles.append(role)
    if stack.job_runner and name == stage_names(stack)[-1]:
        added = stacks_data()["container_stages"]["on_request"]["job_runner"]
        roles = [r for r in added if r not in roles] + roles
    return tuple(roles)


def chain_text(stack: Stack) -> str:
    """e.g. `pytorch: os -> cuda -> env -> finish`, `fastai: pytorch-notebook + env -> finish`."""
    own = " -> ".join(stage_names(stack))
    return f"{stack.parent.name} + {own}" if stack.parent else own


def _hashed_vars(variables: Mapping[str, Any], roles: tuple[str, ...]) -> dict[str, Any]:
    closure, _ = hashing.role_closure(roles)
    prefixes = tuple(f"{role}_" for role in closure)
    kept = {
        key: value
        for key, value in variables.items()
        if (key.startswith(prefixes) or key in _SHARED_VARS or key.startswith("gpubake_stage"))
        # the build-time CA bundle is gone from the image; where it was read from is not hashed
        and not key.startswith("build_ca_")
    }
    # a path on this machine (the lock's text is hashed), where the download cache or the
    # wheelhouse is mounted (a mount is not committed: the image is the same with or
    # without it, the files installed are the lock's either way), and
    # whether gpu-smoke had a GPU to check (the same image, checked more or less fully)
    kept.pop("python_env_lock_file", None)
    kept.pop("python_env_cache_dir", None)
    kept.pop("python_env_wheelhouse", None)
    kept.pop("gpu_smoke_test_args", None)
    if "manifest_build" in kept:  # holds the final hash itself
        kept["manifest_build"] = {
            k: v for k, v in kept["manifest_build"].items() if k != "input_hash"
        }
    return kept


def stage_hash(
    name: str,
    roles: tuple[str, ...],
    variables: Mapping[str, Any],
    *,
    below: str,
    lock_text: str,
    container: Mapping[str, Any] | None,
) -> str:
    digest = hashlib.sha256()
    files = hashing.files_digest(files=hashing.stage_files(roles))
    for key, value in (
        ("stage", name),
        ("files", files),
        ("vars", hashing.canonical_json(_hashed_vars(variables, roles))),
        ("lock", hashlib.sha256(lock_text.encode()).hexdigest()),
        ("container", hashing.canonical_json(container) if container is not None else "-"),
        ("below", below),
    ):
        digest.update(f"{key} {value}\n".encode())
    return digest.hexdigest()


def plan_chain(
    stack: Stack,
    plan_for: Callable[[Stack], BuildPlan],
    locks: Mapping[str, Lock],
    *,
    uv_cache: Path | None,
    gpu_build: bool = False,
    wheels: Path | None = None,
    offline: bool = False,
) -> list[Stage]:
    """The stages that build `stack`'s image, its parents' first. `plan_for(s)` is the whole
    plan of stack s (gpubake.build.plan.make_plan); `locks[s.name]` is s's checked lock. With
    `gpu_build` (this machine's GPUs can be given to a container) the stages that run
    gpu-smoke get them, and gpu-smoke must then run its GPU checks (--require-gpu). `wheels`:
    every stage installs from this wheelhouse (mounted read-only) with no index; `offline`:
    the build containers have no network at all. Neither changes a stage's hash: the files
    installed are the lock's either way."""
    spec = stacks_data()["container_stages"]["stages"]
    cuda_pattern = stacks_data()["cuda_wheels"]
    chain: list[Stage] = []
    below_ref = below_id = ""
    for level in stack.lineage:
        whole = plan_for(level)
        names = stage_names(level)
        if not chain:
            below_ref, below_id = whole.base_image, whole.base_image_id
        for index, name in enumerate(names):
            final = index == len(names) - 1
            roles = stage_roles(level, name)
            lock_part = spec[name].get("lock", "")
            lock = locks[level.name] if lock_part else None
            lock_text = ""
            if lock is not None:
                lock_text = lock.text if lock_part == "all" else subset(lock, cuda_pattern)
            variables = dict(whole.ansible_vars)
            variables["gpubake_stage_roles"] = list(roles)
            if "build_ca" not in roles:  # a stage that downloads nothing needs no CA bundle
                variables["build_ca_bundle"] = ""
                variables.pop("build_ca_environment", None)
            variables["gpubake_smoke"] = bool(spec[name].get("smoke", False))
            if "manifest" in roles:  # the SBOM lists the hashes of the lock the env stage installed
                variables["manifest_lock_pins"] = lock_pins(locks.get(level.name))
            packer_vars = dict(whole.packer_vars)
            if wheels is not None:
                variables["python_env_wheelhouse"] = WHEELHOUSE_MOUNT
                packer_vars["cache_volumes"] = {str(wheels): f"{WHEELHOUSE_MOUNT}:ro"}
            if offline:
                packer_vars["container_network"] = ["--network", "none"]
            if gpu_build and variables["gpubake_smoke"]:
                variables["gpu_smoke_test_args"] = ["--require-gpu"]
                packer_vars["container_gpus"] = ["--gpus", "all"]
            if lock_text:
                variables["python_env_lock_no_deps"] = lock_part == "cuda"
                if lock_part == "cuda":
                    # python_env installs the pins it is given: here the CUDA wheels alone
                    variables["python_env_install"] = {
                        name: version
                        for name, (version, _) in lock.pins.items()
                        if re.search(cuda_pattern, name)
                    }
                if uv_cache is not None:
                    variables["python_env_cache_dir"] = UV_CACHE_MOUNT
                    packer_vars["cache_volumes"] = {str(uv_cache): UV_CACHE_MOUNT}
            digest = stage_hash(
                name,
                roles,
                variables,
                below=below_id,
                lock_text=lock_text,
                container=level.container if final else None,
            )
            if final:
                # the stage label too: else the image inherits the stage below's ("env")
                labels = {**whole.labels, HASH_LABEL: digest, STAGE_LABEL: name}
                if CREATED_LABEL in labels:  # the immutable tag names the last stage's hash
                    labels[VERSION_LABEL] = immutable_tag(level, labels[CREATED_LABEL], digest)
                repository, tag = whole.image_repository, whole.image_tag
                variables["manifest_build"] = {**variables["manifest_build"], "input_hash": digest}
            else:
                labels = {
                    HASH_LABEL: digest,
                    STAGE_LABEL: name,
                    f"{LABEL_PREFIX}.stack": level.name,
                }
                repository, tag = f"{STAGE_REPOSITORY}/{level.name}", f"{name}-{digest[:12]}"
            packer_vars.update(
                base_image=below_ref,
                image_repository=repository,
                image_tag=tag,
                input_hash=digest,
                container_name=f"{whole.packer_vars['container_name']}-{level.name}-{name}",
                docker_changes=docker_changes(level.container if final else {}, labels),
            )
            stage_plan = dataclasses.replace(
                whole,
                base_image=below_ref,
                base_image_id=below_id,
                input_hash=digest,
                labels=labels,
                ansible_vars=variables,
                packer_vars=packer_vars,
                image_repository=repository,
                image_tag=tag,
                image=f"{repository}:{tag}",
                python_env_lock=lock_text,
            )
            chain.append(
                Stage(
                    stack=level.name,
                    name=name,
                    roles=roles,
                    lock=lock_part,
                    input_hash=digest,
                    plan=stage_plan,
                    final=final,
                    smoke=bool(spec[name].get("smoke", False)),
                )
            )
            below_ref, below_id = stage_plan.image_ref, digest
    return chain
