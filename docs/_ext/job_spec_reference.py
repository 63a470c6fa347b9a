"""`gpubake-job-spec`: the fields of a job spec, as the runner itself defines them: the FIELDS
mapping (name -> meaning) of roles/job_runner/files/gpubake_job.py, read from its source
(ast, nothing of the script runs) so the reference cannot drift from the runner."""

from __future__ import annotations

import ast
from pathlib import Path

from doc_nodes import code, para, table
from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from gpubake.resources import data_root

RUNNER = data_root() / "roles" / "job_runner" / "files" / "gpubake_job.py"


def job_spec_fields(path: Path = RUNNER) -> dict[str, str]:
    """gpubake_job.py's FIELDS, the one list of the fields a spec may have."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "FIELDS" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise LookupError(f"{path} has no FIELDS assignment")


class JobSpecDirective(SphinxDirective):
    def run(self) -> list[nodes.Node]:
        self.env.note_dependency(str(RUNNER))
        fields = job_spec_fields()
        return [
            para(
                "A job spec is a JSON object; gpubake-job refuses a field not listed "
                "here. From the runner's own list, ",
                code("FIELDS"),
                " in ",
                code("roles/job_runner/files/gpubake_job.py"),
                ".",
            ),
            table(("Field", "Meaning"), [(code(k), v) for k, v in fields.items()]),
        ]


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("gpubake-job-spec", JobSpecDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
