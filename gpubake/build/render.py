"""Write a BuildPlan out for Packer: one folder in which `packer validate .` and
`packer build .` work with no flags, by gpubake or by hand.

    DIR/
      variables.pkr.hcl + the target's own Packer files (+ plugins.pkr.hcl for Packer >= 1.7)
      <target>.auto.pkrvars.hcl        the plan's Packer variables (Packer loads *.auto.pkrvars.hcl)
      ansible-vars.json                the plan's Ansible variables (-e @ansible-vars.json)
      python-env.lock                  the locked requirements a container stage installs
      ansible.cfg                      gpubake's, with collections_path = collections
      collections/ansible_collections/gpubake/gpu/   a copy of the collection (roles, playbooks,
                                       plugins, meta, galaxy.yml)

Only what the target needs is written; Packer files of another target left in DIR by an
earlier render are removed (Packer reads every *.pkr.hcl in the folder).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from gpubake import __version__, resources
from gpubake.build import targets
from gpubake.build.plan import BuildPlan, PlanError

#: The collection inside a render, relative to DIR (images/variables.pkr.hcl's local.collection).
COLLECTIONS_DIR = "collections"
COLLECTION_DIR = Path(
    COLLECTIONS_DIR, "ansible_collections", resources.NAMESPACE, resources.COLLECTION
)
#: The requirements with hashes a container stage installs (python_env_lock_file).
LOCK_FILE = "python-env.lock"
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
# the build block's list of builder sources (a file provisioner's `sources` lists paths)
_SOURCES_RE = re.compile(
    r'^(?P<indent>\s*)sources\s*=\s*\[(?P<list>\s*"source\.[^\]]*)\]\s*$', re.MULTILINE
)


def hcl_value(value: Any, indent: str = "") -> str:
    """A Python value as an HCL2 expression, laid out as `packer fmt` writes it (template
    sequences escaped, so values are taken literally)."""
    if isinstance(value, dict):
        if not value:
            return "{}"
        inner = indent + "  "
        body = _attributes([(json.dumps(str(k)), v) for k, v in value.items()], inner)
        return "{\n" + body + "\n" + indent + "}"
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        inner = indent + "  "
        items = [inner + hcl_value(item, inner) for item in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return json.dumps(value).replace("${", "$${").replace("%{", "%%{")


def _attributes(pairs: list[tuple[str, Any]], indent: str = "") -> str:
    """`key = value` lines; runs of one-line values have their `=` aligned (packer fmt)."""
    rendered = [(key, hcl_value(value, indent)) for key, value in pairs]
    lines: list[str] = []
    run: list[tuple[str, str]] = []

    def flush() -> None:
        width = max((len(k) for k, _ in run), default=0)
        lines.extend(f"{indent}{k:<{width}} = {v}" for k, v in run)
        run.clear()

    for key, text in rendered:
        if "\n" in text:
            flush()
            lines.append(f"{indent}{key} = {text}")
        else:
            run.append((key, text))
    flush()
    return "\n".join(lines)


def var_file_name(target: str) -> str:
    return f"{target}.auto.pkrvars.hcl"


def packer_files(target: targets.Target, *, with_plugins: bool) -> list[str]:
    names = [*targets.COMMON_PACKER_FILES, *target.packer_files]
    if with_plugins:
        names.append(targets.PLUGINS_FILE)
    return names


def _every_packer_file() -> set[str]:
    names = {*targets.COMMON_PACKER_FILES, targets.PLUGINS_FILE}
    for target in targets.REGISTRY.values():
        names.update(target.packer_files)
        names.update({var_file_name(target.name), f"{target.name}.pkrvars.hcl"})
    return names


def one_source(hcl: str, source: str, name: str = targets.VM_BUILD_FILE) -> str:
    """The shared build block with its `sources` list cut down to `source`."""
    matches = list(_SOURCES_RE.finditer(hcl))
    listed = [s.strip().strip('"') for s in matches[0]["list"].split(",")] if matches else []
    if len(matches) != 1 or f"source.{source}" not in listed:
        raise PlanError(f"images/{name} must have one `sources = [...]` line naming {source}")
    m = matches[0]
    return f'{hcl[: m.start()]}{m["indent"]}sources = ["source.{source}"]{hcl[m.end() :]}'


def ansible_cfg(text: str) -> str:
    """gpubake's ansible.cfg with `collections_path = collections` in [defaults] (a relative
    path in ansible.cfg is resolved against the file's own folder)."""
    line = f"collections_path = {COLLECTIONS_DIR}"
    kept = [ln for ln in text.splitlines() if not re.match(r"\s*collections_paths?\s*=", ln)]
    if "[defaults]" not in (ln.strip() for ln in kept):
        return "\n".join(["[defaults]", line, *kept]) + "\n"
    out: list[str] = []
    for ln in kept:
        out.append(ln)
        if ln.strip() == "[defaults]":
            out += [
                "# gpubake render: the collection gpubake.gpu is in collections/ beside this file",
                line,
            ]
    return "\n".join(out) + "\n"


def copy_collection(dest: Path) -> None:
    """resources.COLLECTION_ITEMS from gpubake's data into `dest` (symlinks followed)."""
    root = resources.data_root()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for item in resources.COLLECTION_ITEMS:
        src = root / item
        if src.is_dir():
            shutil.copytree(src, dest / item, symlinks=False, ignore=_IGNORE)
        elif src.is_file():
            shutil.copyfile(src, dest / item)


def ansible_variables(plan: BuildPlan, folder: Path) -> dict[str, Any]:
    """The plan's Ansible variables, with the lock python_env installs (when the plan has one)
    written into `folder` as LOCK_FILE and named by python_env_lock_file."""
    variables = dict(plan.ansible_vars)
    lock = folder / LOCK_FILE
    lock.unlink(missing_ok=True)
    if plan.python_env_lock:
        lock.write_text(plan.python_env_lock, encoding="utf-8")
        variables["python_env_lock_file"] = str(lock.resolve())
    return variables


def render(plan: BuildPlan, out_dir: Path, *, with_plugins: bool) -> Path:
    """Write the Packer and Ansible inputs of `plan` into `out_dir`; return the var file."""
    target = targets.get(plan.target)
    if not target.uses_packer or target.packer_source is None:
        raise PlanError(f"target '{plan.target}' is applied with ansible-playbook, not Packer")
    out_dir.mkdir(parents=True, exist_ok=True)
    root = resources.data_root()
    names = packer_files(target, with_plugins=with_plugins)
    var_file = out_dir / var_file_name(target.name)
    for stale in sorted(_every_packer_file() - {*names, var_file.name}):
        (out_dir / stale).unlink(missing_ok=True)
    for name in names:
        text = (root / "images" / name).read_text(encoding="utf-8")
        if name == targets.VM_BUILD_FILE:
            text = one_source(text, target.packer_source)
        (out_dir / name).write_text(text, encoding="utf-8")
    copy_collection(out_dir / COLLECTION_DIR)
    (out_dir / "ansible.cfg").write_text(
        ansible_cfg((root / "ansible.cfg").read_text(encoding="utf-8")), encoding="utf-8"
    )
    variables = ansible_variables(plan, out_dir)
    (out_dir / "ansible-vars.json").write_text(
        json.dumps(variables, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    lines = [f"# Written by gpubake {__version__}: {plan.image_ref}, input hash {plan.input_hash}"]
    lines.append(_attributes(list(plan.packer_vars.items())))
    var_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return var_file
