"""Sphinx configuration of gpubake's documentation site (built by tests/unit/test_docs_build.py).

Why Sphinx, not MkDocs: MkDocs 1.x has had no active maintainer since 2025 and Material for
MkDocs is in maintenance mode (security fixes only) while its successor, Zensical, is young and
has no plugin interface yet; Sphinx is maintained, MyST keeps the pages Markdown, Furo is a
maintained theme, and Sphinx's extension interface generates the reference from the code
(sphinx-click for the commands, docs/_ext/ for the roles, the job spec and the data files).
`-W -n` turns every broken internal link, anchor or reference into a build error.

Build (into build/, which git ignores): sphinx-build -W --keep-going -n -b html docs build/docs
External (http) links are not checked: the suite runs offline. Where the network is reachable,
`sphinx-build -b linkcheck docs build/linkcheck` checks them.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# docs/_ext: the extensions that generate the reference; ROOT: this checkout's gpubake (a
# copy of docs/ elsewhere takes the installed one)
sys.path[:0] = [str(DOCS / "_ext"), *([str(ROOT)] if (ROOT / "gpubake").is_dir() else [])]

from gpubake import __version__  # noqa: E402  (after the path above)

project = "gpubake"
author = "the gpubake authors"
copyright = "the gpubake authors"
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx_click",
    "optional_toctree",  # index.md's sections: a folder without pages yet is left out
    "role_reference",  # reference/roles.md: roles/*/meta/argument_specs.yml
    "job_spec_reference",  # reference/job-spec.md: gpubake_job.py's FIELDS
    "data_tables",  # reference/stacks.md, reference/gpus.md: images/*.yml
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_ext"]

# every warning is an error (-W); nitpicky (-n): a reference to nothing is one too
nitpicky = True
# `page.md#heading` links: MyST checks the anchor (headings down to ####)
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence", "deflist"]
# text as written: descriptions from the data files and the code hold quotes that are code
smartquotes = False

html_theme = "furo"
html_title = f"gpubake {release}"
