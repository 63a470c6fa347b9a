"""`gpubake-job-spec`: the fields of a job spec, as the runner itself defines them: the FIELDS
mapping (name -> meaning) of roles/job_runner/files/gpubake_job.py, loaded the way gpubake's
`job` commands load the runner (gpubake.jobs.runner_code), so the reference cannot drift."""

from __future__ import annotations

from doc_nodes import code, para, table
from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from gpubake.jobs import runner_code
from gpubake.resources import data_root

RUNNER = data_root() / "roles" / "job_runner" / "files" / "gpubake_job.py"


class JobSpecDirective(SphinxDirective):
    def run(self) -> list[nodes.Node]:
        self.env.note_dependency(str(RUNNER))
        fields = runner_code.job_module().FIELDS
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
