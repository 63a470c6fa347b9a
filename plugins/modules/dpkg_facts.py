#!/usr/bin/python
"""Ansible module: the installed Debian packages as ansible_facts.packages, read with dpkg-query.

The same shape as ansible.builtin.package_facts (manager apt) gives, without python3-apt: hosts
that lack the bindings (many container images, a GPU host in check mode, where nothing may be
installed) still get their package facts.
"""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: gpubake_dpkg_facts
short_description: The installed Debian packages, read with dpkg-query
description:
  - Sets C(ansible_facts.packages) as M(ansible.builtin.package_facts) with C(manager=apt)
    does (name to a list of name, version, arch, source), from dpkg's database. Needs no
    python3-apt.
options: {}
"""

EXAMPLES = r"""
- name: Gather the installed packages
  gpubake_dpkg_facts:
"""

RETURN = r"""
ansible_facts:
  description: C(packages), package name to a list of installed instances.
  returned: always
  type: dict
"""


# ${db:Status-Abbrev}: want, current state, error ("ii ", "hi ", "rc "). A package is installed
# unless its current state is not-installed (n) or config-files only (c).
FORMAT = "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"


def parse(text: str) -> dict[str, list[dict[str, str]]]:
    packages: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) != 4 or len(fields[0]) < 2 or fields[0][1] in "nc":
            continue
        _, name, version, arch = fields
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
