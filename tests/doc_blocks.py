"""The fenced code blocks of the README and the site's pages, as CommonMark reads them, and
the command lines in them: one reader for the tests that take their commands from the docs
(tests/unit/test_docs_commands.py, test_collection_readme.py, the notebook tutorial's tests)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the marker comment right before a command block (docs/development.md)
MARKER_RE = re.compile(r"^<!--\s*(tested|not-run):\s*(.*?)\s*-->$")
_OPEN_RE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    kind: str  # the info string's first word
    text: str
    marker: str | None  # the line right before the fence, when it is a marker comment
    markers_before: int  # marker comments in a row right before the fence

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, as CommonMark reads them: ``` or ~~~
    fences of three or more, an info string (backtick fences: without backticks), closed by
    a fence of the same character at least as long; an unclosed fence runs to the end."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _OPEN_RE.match(lines[i])
        if not match or (match.group(2)[0] == "`" and "`" in match.group(3)):
            i += 1
            continue
        indent, fence, info = len(match.group(1)), match.group(2), match.group(3).strip()
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            line = lines[j]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            j += 1
        count = 0
        while i - 1 - count >= 0 and MARKER_RE.match(lines[i - 1 - count].strip()):
            count += 1
        before = lines[i - 1].strip() if i > 0 else ""
        blocks.append(
            Block(
                page=page,
                line=i + 1,
                kind=info.split()[0].lower() if info else "",
                text="\n".join(body) + "\n",
                marker=before if MARKER_RE.match(before) else None,
                markers_before=count,
            )
        )
        i = j + 1
    return blocks


def command_lines(text: str) -> list[str]:
    """Lines with `\\` continuations joined, comment-only lines and heredoc bodies left out,
    a console prompt (`$ `) taken off."""
    out: list[str] = []
    pending = ""
    heredoc: str | None = None
    for raw in text.splitlines():
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        line = pending + raw.removeprefix("$ ")
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if match := re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line):
            heredoc = match.group(1)
        out.append(line)
    return out


def section_blocks(page: Path, heading: str) -> list[Block]:
    """The fenced blocks of the `## heading` section of `page` (up to the next `## `)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"## {heading}") + 1  # ValueError: the page has no such section
    end = next(
        (i + 1 for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines) + 1
    )
    return [b for b in fenced_blocks(page) if start < b.line < end]
