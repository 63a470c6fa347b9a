"""`gpubake-roles`: every role of the collection gpubake.gpu with its entry points and their
options, read from roles/*/meta/argument_specs.yml (the specs Ansible checks a role's
variables against, so the reference says what the roles accept)."""

from __future__ import annotations

import json
from typing import Any

import yaml
from doc_nodes import code, para, section, table
from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from gpubake.resources import data_root

ROLES = data_root() / "roles"  # the collection's roles, where gpubake finds them


def role_specs() -> dict[str, dict[str, Any]]:
    """Each role's argument_specs (entry point -> spec), by role name."""
    return {
        path.parent.parent.name: yaml.safe_load(path.read_text(encoding="utf-8"))["argument_specs"]
        for path in sorted(ROLES.glob("*/meta/argument_specs.yml"))
    }


def _text(value: str | list[str] | None) -> list[str]:
    """A description: one string or a list of paragraphs (Ansible accepts both)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _type(option: dict[str, Any]) -> str:
    kind = option.get("type", "str")
    return f"{kind} of {option['elements']}" if "elements" in option else kind


def _default(option: dict[str, Any]) -> nodes.Node | str:
    if "default" not in option:
        return ""
    value = option["default"]
    return code(value if isinstance(value, str) and value else json.dumps(value))


def _options(options: dict[str, Any]) -> nodes.table:
    rows = [
        (
            code(name),
            _type(option),
            _default(option),
            "yes" if option.get("required") else "",
            [code(c) for c in option.get("choices", [])],
            " ".join(_text(option.get("description"))),
        )
        for name, option in options.items()
    ]
    return table(("Variable", "Type", "Default", "Required", "Choices", "Description"), rows)


class RolesDirective(SphinxDirective):
    def run(self) -> list[nodes.Node]:
        for path in ROLES.glob("*/meta/argument_specs.yml"):
            self.env.note_dependency(str(path))
        out: list[nodes.Node] = []
        for role, entry_points in role_specs().items():
            role_section = section(self.state.document, code(role), f"role-{role}")
            for entry, spec in entry_points.items():
                target = role_section
                if len(entry_points) > 1:
                    target = section(
                        self.state.document, f"Entry point {entry}", f"role-{role}-{entry}"
                    )
                    role_section += target
                else:
                    target += para("Entry point ", code(entry), ".")
                target += [para(text) for text in _text(spec.get("short_description"))]
                target += [para(text) for text in _text(spec.get("description"))]
                options = spec.get("options") or {}
                target += _options(options) if options else para("No variables.")
            out.append(role_section)
        return out


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("gpubake-roles", RolesDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
