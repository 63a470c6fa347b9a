"""`optional-toctree`: a toctree whose entries may match no page yet (a section of the site
whose folder is still empty). Such entries are left out instead of warned about, and a
toctree left with none is left out whole; everything else is Sphinx's own toctree."""

from __future__ import annotations

from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.directives.other import TocTree
from sphinx.util import docname_join
from sphinx.util.matching import patfilter


class OptionalTocTree(TocTree):
    def run(self):
        current = self.env.current_document.docname
        left = self.env.found_docs - {current}  # pages no earlier entry took (as Sphinx)
        keep = []
        for index, line in enumerate(self.content):
            entry = line.strip()
            if not entry:
                continue
            name = docname_join(current, entry.removesuffix(".md"))
            matched = patfilter(left, name) if "glob" in self.options else {name} & left
            if matched:
                keep.append(index)
                left -= set(matched)
        if not keep:
            return []
        self.content = StringList(
            [self.content[i] for i in keep], items=[self.content.items[i] for i in keep]
        )
        return super().run()


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("optional-toctree", OptionalTocTree)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
