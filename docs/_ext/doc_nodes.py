"""Docutils nodes the reference generators build their pages from: sections, tables, code
and links. Built as nodes, not as generated Markdown, so no text from a data file is read
as markup."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from docutils import nodes

#: what a table cell may hold: text, a node (code, a link), or a list of them (joined by ", ")
Cell = str | nodes.Node | Sequence[str | nodes.Node] | None


def code(text: object) -> nodes.literal:
    return nodes.literal(text=str(text))


def link(url: str, text: str | None = None) -> nodes.reference:
    """A link to `url`, named by its host unless `text` is given."""
    name = text or urlsplit(url).netloc or url
    return nodes.reference(name, name, refuri=url)


def para(*parts: str | nodes.Node) -> nodes.paragraph:
    node = nodes.paragraph()
    for part in parts:
        node += nodes.Text(part) if isinstance(part, str) else part
    return node


def _cell(value: Cell) -> nodes.entry:
    entry = nodes.entry()
    if value is None or value == "":
        entry += nodes.paragraph()
    elif isinstance(value, str | nodes.Node):
        entry += para(value)
    else:
        parts: list[str | nodes.Node] = []
        for item in value:
            parts += [", ", item] if parts else [item]
        entry += para(*parts)
    return entry


def table(header: Sequence[str], rows: Iterable[Sequence[Cell]]) -> nodes.table:
    group = nodes.tgroup(cols=len(header))
    group += [nodes.colspec(colwidth=1) for _ in header]
    head, body = nodes.thead(), nodes.tbody()
    head += _row(header)
    body += [_row(row) for row in rows]
    group += [head, body]
    node = nodes.table(classes=["gpubake-reference"])
    node += group
    return node


def _row(cells: Sequence[Cell]) -> nodes.row:
    row = nodes.row()
    row += [_cell(cell) for cell in cells]
    return row


def section(document: nodes.document, title: str | nodes.Node, ident: str) -> nodes.section:
    """A section with its own anchor (`ident`, e.g. role-cuda) that the page's contents list."""
    node = nodes.section(ids=[nodes.make_id(ident)], names=[nodes.fully_normalize_name(ident)])
    heading = nodes.title()
    heading += nodes.Text(title) if isinstance(title, str) else title
    node += heading
    document.note_implicit_target(node, node)
    return node
