#!/usr/bin/python
# Copyright: gpubake contributors
# SPDX-License-Identifier: Apache-2.0 (see LICENSE at the collection's root)
"""Ansible module: the installed Debian packages as ansible_facts.packages, read with dpkg-query.

The same shape as ansible.builtin.package_facts (manager apt) gives, without python3-apt: hosts
that lack the bindings (many container images, a GPU host in check mode, where nothing may be
installed) still get their package facts.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: dpkg_facts
short_description: The installed Debian packages as package facts, read with dpkg-query
version_added: "1.0.0"
description:
  - Sets C(ansible_facts.packages) in the shape M(ansible.builtin.package_facts) with
    C(manager=apt) gives (package name to a list of its installed instances, each with
    C(name), C(version), C(arch) and C(source)), read from dpkg's database with C(dpkg-query).
  - Needs no python3-apt, so hosts that lack the bindings (many container images, any host
    in check mode, where nothing may be installed) still get their package facts.
  - A package counts as installed unless dpkg records it as not installed or with its
    configuration files only (C(rc)); held and half-configured packages count.
author:
  - gpubake maintainers (@gpubake)
options: {}
attributes:
  check_mode:
    support: full
    description: Reads the package database in check mode too; it changes nothing in any mode.
  diff_mode:
    support: none
    description: Changes nothing, so it has no diff to show.
  facts:
    support: full
    description: Sets C(ansible_facts.packages).
requirements:
  - dpkg-query on the managed host (Debian, Ubuntu)
seealso:
  - module: ansible.builtin.package_facts
notes:
  - gpubake's roles gather these facts themselves (role C(gpubake.gpu.common)) when
    C(ansible_facts.packages) is undefined, and again after installing a package.
"""

EXAMPLES = r"""
- name: Gather the installed packages
  gpubake.gpu.dpkg_facts:

- name: Say which git is installed
  ansible.builtin.debug:
    msg: "git {{ ansible_facts['packages']['git'][0]['version'] }}"
  when: "'git' in ansible_facts['packages']"
"""

RETURN = r"""
ansible_facts:
  description: Facts set on the host.
  returned: always
  type: complex
  contains:
    packages:
      description: Package name to a list of its installed instances (one per architecture).
      returned: always
      type: dict
      sample:
        git:
          - name: git
            version: "1:2.39.5-0+deb12u2"
            arch: amd64
            source: apt
"""

from ansible.module_utils.basic import AnsibleModule

# ${db:Status-Abbrev}: want, current state, error ("ii ", "hi ", "rc "). A package is installed
# unless its current state is not-installed (n) or config-files only (c).
FORMAT = "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"


def parse(text: str) -> dict[str, list[dict[str, str]]]:
    packages: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) != 4 or len(fields[0]) < 2 or fields[0][1] in "nc":
            continue
        _status, name, version, arch = fields
        entry = {"name": name, "version": version, "arch": arch, "source": "apt"}
        packages.setdefault(name, []).append(entry)
    return packages


def main() -> None:
    module = AnsibleModule(argument_spec={}, supports_check_mode=True)
    dpkg_query = module.get_bin_path("dpkg-query", required=True)
    rc, out, err = module.run_command([dpkg_query, "--show", f"--showformat={FORMAT}"])
    if rc != 0:
        module.fail_json(msg=f"dpkg-query failed: {err.strip() or out.strip()}")
    module.exit_json(changed=False, ansible_facts={"packages": parse(out)})


if __name__ == "__main__":
    main()
