#!/usr/bin/python
# Copyright: gpubake contributors
# SPDX-License-Identifier: Apache-2.0 (see LICENSE at the collection's root)
"""Ansible module: write several small files in one module call, each only when it differs.

Each module call is a connection round trip and a Python start on the host (about 0.3 s in a
build container, more over SSH), and ansible.builtin.copy makes two or three per file (a stat,
the transfer, the copy); gpubake's stages write a handful of generated files each, so one call
for all of them is a large part of a small stage's time.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: write_files
short_description: Write several small files in one module call
version_added: "1.0.0"
description:
  - Writes each file of O(files) with its content, mode, owner and group, atomically (a
    temporary file in the same directory, renamed into place), and only when the content,
    mode, owner or group differ from what is there.
  - Missing parent directories are created with O(directory_mode), owned by root.
  - One module call for all the files, where M(ansible.builtin.copy) makes two or three per
    file; meant for the generated files of a role (a manifest, a script, a small JSON).
author:
  - gpubake maintainers (@gpubake)
options:
  files:
    description: The files to write.
    type: list
    elements: dict
    required: true
    suboptions:
      path:
        description: Absolute path of the file.
        type: path
        required: true
      content:
        description: The file's whole content (text, written as UTF-8).
        type: str
        required: true
      mode:
        description: The file's permissions, in octal.
        type: str
        default: "0644"
      owner:
        description: The file's owner.
        type: str
        default: root
      group:
        description: The file's group.
        type: str
        default: root
  directory_mode:
    description: The permissions of the parent directories this module creates.
    type: str
    default: "0755"
attributes:
  check_mode:
    support: full
    description: Reports what would change and writes nothing.
  diff_mode:
    support: full
    description: Shows each changed file's content before and after.
requirements: []
seealso:
  - module: ansible.builtin.copy
notes:
  - Each content is held in the module's arguments, so the module is for small files (up to a few
    megabytes).
"""

EXAMPLES = r"""
- name: Write the manifest and the pip constraints
  gpubake.gpu.write_files:
    files:
      - path: /etc/gpubake/manifest.json
        content: "{{ manifest | to_nice_json }}\n"
      - path: /usr/local/bin/hello
        content: "#!/bin/sh\necho hello\n"
        mode: "0755"
"""

RETURN = r"""
changed_files:
  description: The paths written (in check mode, those that would be).
  returned: always
  type: list
  elements: str
  sample: [/etc/gpubake/manifest.json]
"""

import contextlib
import grp
import os
import pwd
import stat
import tempfile
from pathlib import Path

from ansible.module_utils.basic import AnsibleModule


def _ids(module: AnsibleModule, owner: str, group: str) -> tuple[int, int]:
    try:
        uid = pwd.getpwnam(owner).pw_uid
    except KeyError:
        module.fail_json(msg=f"no user {owner!r} on the host")
        raise  # not reached: fail_json exits
    try:
        return uid, grp.getgrnam(group).gr_gid
    except KeyError:
        module.fail_json(msg=f"no group {group!r} on the host")
        raise


def _mode(module: AnsibleModule, text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        module.fail_json(msg=f"mode {text!r} is not an octal number such as '0644'")
        raise


def _current(path: Path) -> tuple[bytes | None, os.stat_result | None]:
    try:
        with path.open("rb") as f:
            return f.read(), os.fstat(f.fileno())
    except FileNotFoundError:
        return None, None


def _make_parents(path: Path, mode: int) -> None:
    missing = [parent for parent in path.parents if not parent.is_dir()]
    for directory in reversed(missing):
        directory.mkdir(mode)
        directory.chmod(mode)  # not narrowed by the umask
        os.chown(directory, 0, 0)


def _write(path: Path, data: bytes, mode: int, uid: int, gid: int) -> None:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".gpubake-write.")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tmp.chmod(mode)
        os.chown(tmp, uid, gid)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "files": {
                "type": "list",
                "elements": "dict",
                "required": True,
                "options": {
                    "path": {"type": "path", "required": True},
                    "content": {"type": "str", "required": True},
                    "mode": {"type": "str", "default": "0644"},
                    "owner": {"type": "str", "default": "root"},
                    "group": {"type": "str", "default": "root"},
                },
            },
            "directory_mode": {"type": "str", "default": "0755"},
        },
        supports_check_mode=True,
    )
    dir_mode = _mode(module, module.params["directory_mode"])
    changed: list[str] = []
    diffs: list[dict[str, str]] = []
    for spec in module.params["files"]:
        path = Path(spec["path"])
        if not path.is_absolute():
            module.fail_json(msg=f"path {spec['path']!r} is not absolute")
        data = spec["content"].encode("utf-8")
        mode = _mode(module, spec["mode"])
        uid, gid = _ids(module, spec["owner"], spec["group"])
        old, st = _current(path)
        if (
            st is not None
            and old == data
            and stat.S_IMODE(st.st_mode) == mode
            and (st.st_uid, st.st_gid) == (uid, gid)
        ):
            continue
        changed.append(str(path))
        if module._diff:
            diffs.append(
                {
                    "before_header": str(path),
                    "after_header": str(path),
                    "before": "" if old is None else old.decode("utf-8", "replace"),
                    "after": spec["content"],
                }
            )
        if not module.check_mode:
            try:
                _make_parents(path, dir_mode)
                _write(path, data, mode, uid, gid)
            except OSError as exc:
                module.fail_json(msg=f"cannot write {path}: {exc.strerror}", changed_files=changed)
    result = {"changed": bool(changed), "changed_files": changed}
    if module._diff:
        result["diff"] = diffs
    module.exit_json(**result)


if __name__ == "__main__":
    main()
