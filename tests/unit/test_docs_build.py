"""The documentation site (docs/): built from this checkout with warnings as errors (Sphinx
-W -n: MyST's checks of internal links and anchors among them), its generated reference
complete (every command, role variable, job spec field, stack and GPU), and its strictness
real (a broken link fails the build). External links are not checked: the suite is offline."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import click
import pytest
import yaml

from gpubake.cli import cli
from gpubake.jobs import runner_code

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def sphinx_build(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """`sphinx-build -W --keep-going -n -b html`, as the docs are built anywhere."""
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html"]
    cmd += ["-d", str(out / "doctrees"), str(source), str(out / "html")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("docs")
    return sphinx_build(DOCS, out), out / "html"


class _SectionText(HTMLParser):
    """A page's text, whole and per <section id=...> (a section's text holds its children's)."""

    def __init__(self) -> None:
        super().__init__()
        self.whole: list[str] = []
        self.sections: dict[str, list[str]] = {}
        self._open: list[str | None] = []  # one per open <section>; None: one without an id

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "section":
            ident = dict(attrs).get("id")
            self._open.append(ident)
            if ident:
                self.sections[ident] = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "section" and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        self.whole.append(data)
        for ident in filter(None, self._open):
            self.sections[ident].append(data)


def page(html_dir: Path, name: str) -> tuple[str, dict[str, str]]:
    """The text of built page `name` (reference/cli), whole and per section, spaces collapsed."""
    path = html_dir / f"{name}.html"
    if not path.is_file():
        pytest.fail(f"the site has no page {name}: the build did not write {path}")
    parser = _SectionText()
    parser.feed(path.read_text(encoding="utf-8"))

    def squeeze(parts: list[str]) -> str:
        return re.sub(r"\s+", " ", html.unescape("".join(parts)))

    return squeeze(parser.whole), {k: squeeze(v) for k, v in parser.sections.items()}


def commands(group: click.Command, path: tuple[str, ...] = ("gpubake",)):
    """Every command under `group` (itself included) with its path: ("gpubake", "job", "run")."""
    yield path, group
    if isinstance(group, click.Group):
        for name, command in sorted(group.commands.items()):
            if not command.hidden:
                yield from commands(command, (*path, name))


def test_site_builds_with_warnings_as_errors(site):
    result, html_dir = site
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert (html_dir / "index.html").is_file()


def test_cli_reference_holds_every_command_and_option(site):
    _, html_dir = site
    text, sections = page(html_dir, "reference/cli")
    for path, command in commands(cli):
        assert " ".join(path) in text, f"`{' '.join(path)}` is not in reference/cli"
        own = sections.get("-".join(path))
        assert own is not None, f"reference/cli has no section for `{' '.join(path)}`"
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                flag = max(param.opts, key=len)
                assert flag in own, f"`{' '.join(path)} {flag}` is not in reference/cli"


def test_roles_reference_holds_every_variable(site):
    _, html_dir = site
    _, sections = page(html_dir, "reference/roles")
    specs = sorted(ROOT.glob("roles/*/meta/argument_specs.yml"))
    assert specs
    for spec_file in specs:
        role = spec_file.parent.parent.name
        own = sections.get(f"role-{role}".replace("_", "-"))
        assert own is not None, f"reference/roles has no section for role {role}"
        for entry, spec in yaml.safe_load(spec_file.read_text())["argument_specs"].items():
            assert entry in own, f"role {role}'s entry point {entry} is not in reference/roles"
            for option in spec.get("options") or {}:
                assert option in own, f"role {role}'s variable {option} is not in reference/roles"


def test_job_spec_reference_holds_every_field(site):
    _, html_dir = site
    text, _ = page(html_dir, "reference/job-spec")
    fields = runner_code.job_module().FIELDS
    assert fields
    for field, meaning in fields.items():
        assert f"{field} {meaning}" in text, f"job spec field {field} is not in reference/job-spec"


def test_stacks_and_gpus_references_hold_every_entry(site):
    _, html_dir = site
    stacks_text, stacks_sections = page(html_dir, "reference/stacks")
    gpus_text, gpus_sections = page(html_dir, "reference/gpus")
    stacks = yaml.safe_load((ROOT / "images" / "stacks.yml").read_text())
    gpus = yaml.safe_load((ROOT / "images" / "gpus.yml").read_text())
    for name, raw in stacks["stacks"].items():
        assert name in stacks_sections["stacks-table"], f"stack {name} is not in reference/stacks"
        assert raw["description"] in stacks_text
    for key in (*stacks["operating_systems"], *stacks["driver_branches"]):
        assert key in stacks_text, f"{key} is not in reference/stacks"
    for key, raw in gpus["gpus"].items():
        assert f"{key} {raw['name']}" in gpus_sections["gpus-table"], f"GPU {key} is missing"
    for key in (*gpus["architectures"], *gpus["cuda"]):
        assert key in gpus_text, f"{key} is not in reference/gpus"
    # the sources the data files cite are on the pages, as links
    for url in {raw["source"] for raw in gpus["gpus"].values()}:
        assert url in gpus_sections["gpus-sources"]
    for raw in stacks["driver_branches"].values():
        assert raw["source"] in stacks_sections["stacks-sources"]


def test_broken_internal_links_fail_the_build(tmp_path):
    """A link to a page that is not there, or to a heading that is not there, is an error."""
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(DOCS / "conf.py", docs)
    shutil.copytree(DOCS / "_ext", docs / "_ext", ignore=shutil.ignore_patterns("__pycache__"))
    (docs / "index.md").write_text(
        "# Home\n\nSee [a guide](how-to/missing.md) and [a section](other.md#nowhere).\n\n"
        "```{toctree}\nother\n```\n"
    )
    (docs / "other.md").write_text("# Other\n\n## Somewhere\n\n[Back](index.md#home)\n")
    result = sphinx_build(docs, tmp_path / "out")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "'how-to/missing.md'" in output, output
    assert "'nowhere'" in output, output
    assert output.count("WARNING") == 2, output  # the good link (index.md#home) passed
