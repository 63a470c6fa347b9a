"""Every command a user copies from the README or the site's pages (docs/**/*.md) is run by a
test or says why it cannot run here.

Each fenced block of type sh, bash, shell or console has, on the line right before its fence,
one marker comment (docs/development.md, "The documentation's commands"):

- `<!-- tested: tests/<path>.py::<test> -->`: that test exists and its module names the page
  (it takes the commands from it); the blocks naming test_quick_commands are run below;
- `<!-- not-run: <reason> -->`: why not (a cloud, a registry, a build of many minutes).

Every `gpubake` command in those blocks, run or not, names a sub-command that exists and only
options that command has. And the README stays a README: at most 10 KB.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from gpubake.cli import cli
from tests.doc_blocks import MARKER_RE, ROOT, Block, command_lines, fenced_blocks

README = ROOT / "README.md"
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()
QUICK = f"{THIS}::test_quick_commands"
#: the pages whose commands a user copies (this module reads every one of them)
PAGES = [
    README,
    *sorted(
        p
        for p in (ROOT / "docs").rglob("*.md")
        if not {"_build", "_ext"} & set(p.relative_to(ROOT).parts)
    ),
]
COMMAND_TYPES = {"sh", "bash", "shell", "console"}
#: what a command block run here must not hold: a placeholder to fill in, or an elision
_PLACEHOLDER_RE = re.compile(r"<[A-Za-z][^<>]*>|\.\.\.|\[--")
MAX_README = 10 * 1024


def command_blocks() -> list[Block]:
    return [b for page in PAGES for b in fenced_blocks(page) if b.kind in COMMAND_TYPES]


def quick_blocks() -> list[Block]:
    return [
        b
        for b in command_blocks()
        if b.marker and MARKER_RE.match(b.marker).groups() == ("tested", QUICK)
    ]


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        names |= {f"{cls.name}::{n.name}" for n in cls.body if isinstance(n, ast.FunctionDef)}
    return names


def marker_problems(block: Block) -> list[str]:
    if block.marker is None:
        return [f"{block.where}: a {block.kind} block without a tested:/not-run: marker"]
    if block.markers_before != 1:
        return [f"{block.where}: {block.markers_before} markers before the block, not one"]
    kind, value = MARKER_RE.match(block.marker).groups()
    if kind == "not-run":
        if len(value) < 20:
            return [f"{block.where}: not-run needs a real reason"]
        # the tests a reason names as checking the same path instead exist
        named = re.findall(r"(tests/[\w/]+\.py|test_\w+\.py)", value)
        return [
            f"{block.where}: not-run names {name}, which does not exist"
            for name in named
            if not (ROOT / name).is_file()
            and not list((ROOT / "tests").rglob(name.rsplit("/", 1)[-1]))
        ]
    path, _, name = value.partition("::")
    test_file = ROOT / path
    if not (path.startswith("tests/") and path.endswith(".py") and name):
        return [f"{block.where}: tested: wants tests/<path>.py::<test>, not {value!r}"]
    if not test_file.is_file():
        return [f"{block.where}: {path} does not exist"]
    if name not in _test_names(test_file):
        return [f"{block.where}: {path} has no test {name}"]
    page = block.page.relative_to(ROOT).as_posix()
    if path != THIS and page not in test_file.read_text(encoding="utf-8"):
        return [f"{block.where}: {path} does not name {page}, so it cannot read its commands"]
    return []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_command_block_is_tested_or_says_why_not(page):
    blocks = fenced_blocks(page)
    problems = [p for b in blocks if b.kind in COMMAND_TYPES for p in marker_problems(b)]
    # a marker before anything but a command block marks nothing
    problems += [
        f"{b.where}: a marker before a {b.kind or 'plain'} block"
        for b in blocks
        if b.marker and b.kind not in COMMAND_TYPES
    ]
    assert not problems, "\n".join(problems)


def test_the_parser_reads_fences_as_commonmark_does(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- not-run: a reason that is long enough -->\n"
        "~~~~ console title\n```sh\nnot a fence\n~~~\n~~~~~\n\n"
        "````sh\n```\n````\n"
        "  ```bash\n  echo indented\n  ```\n"
        "<!-- not-run: a reason that is long enough -->\n"
        "<!-- not-run: a reason that is long enough -->\n"
        "```shell\nunclosed\n",
        encoding="utf-8",
    )
    blocks = fenced_blocks(page)
    assert [(b.line, b.kind, b.markers_before) for b in blocks] == [
        (2, "console", 1),
        (8, "sh", 0),
        (11, "bash", 0),
        (16, "shell", 2),
    ]
    assert blocks[0].text == "```sh\nnot a fence\n~~~\n"
    assert blocks[1].text == "```\n"
    assert blocks[2].text == "echo indented\n"
    assert blocks[3].text == "unclosed\n"


def test_readme_is_at_most_10_kb():
    size = len(README.read_bytes())
    assert size <= MAX_README, f"README.md is {size} bytes: move the details into docs/"


def test_ci_runs_the_readme_test_command():
    """.ci/run runs the README's second set-up command (the test suite), exactly."""
    first = fenced_blocks(README)[0]
    commands = [line for line in first.text.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert ci[-1] == commands[1], (ci[-1], commands[1])


def gpubake_commands(text: str) -> list[list[str]]:
    """The argv of every `gpubake ...` in a block (split at ;, &&, ||, | and redirections)."""
    found = []
    for line in command_lines(text):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.commenters = "#"
        lexer.wordchars += "{}[]@:,+%^$"
        try:
            tokens = list(lexer)
        except ValueError:  # an unbalanced quote: nothing to check in it
            continue
        argv: list[str] = []
        for token in [*tokens, ";"]:
            if token and set(token) <= set(";&|<>()"):
                if argv and argv[0] == "gpubake":
                    found.append(argv)
                argv = []
            else:
                argv.append(token)
    return found


def option_problems(argv: list[str]) -> list[str]:
    """What in `argv` is not a gpubake sub-command or an option of the command it names."""
    command: click.Command = cli
    args = argv[1:]
    path = ["gpubake"]
    while isinstance(command, click.Group):
        args = [a for a in args if a != "--debug"] if command is cli else args
        if not args or args[0].startswith("-"):
            break
        if args[0] not in command.commands:
            return [f"{' '.join(path)} has no command {args[0]!r}"]
        command = command.commands[args[0]]
        path.append(args[0])
        args = args[1:]
    known = {"--help", "-h"}
    for param in command.params:
        known |= set(param.opts) | set(param.secondary_opts)
    problems = []
    for arg in args:
        if arg == "--":  # the training command's own arguments follow
            break
        name = arg.split("=", 1)[0]
        if re.fullmatch(r"--[a-z][a-z0-9-]*|-[a-zA-Z]", name) and name not in known:
            problems.append(f"{' '.join(path)} has no option {name}")
    return problems


def test_every_gpubake_command_shown_exists():
    problems = []
    checked = 0
    for block in command_blocks():
        for argv in gpubake_commands(block.text):
            checked += 1
            problems += [f"{block.where}: {p}: {shlex.join(argv)}" for p in option_problems(argv)]
    assert checked > 50, checked  # the parser finds the commands
    assert not problems, "\n".join(problems)


def test_option_check_catches_what_does_not_exist():
    assert option_problems(["gpubake", "job", "emit", "skypilot", "--cloud", "aws"]) == []
    assert option_problems(["gpubake", "job", "lunch"]) == ["gpubake job has no command 'lunch'"]
    assert option_problems(["gpubake", "lock", "--check"]) == ["gpubake lock has no option --check"]
    assert option_problems(["gpubake", "job", "run", "--gpu=t4", "--", "x", "--lr"]) == []
    text = "a && gpubake stacks; gpubake build \\\n  --dry-run > out  # gpubake nope\n"
    assert gpubake_commands(text) == [["gpubake", "stacks"], ["gpubake", "build", "--dry-run"]]


@pytest.fixture
def user_home(tmp_path):
    """A user's fresh home: HOME and the XDG folders in tmp_path (nothing of this machine's
    user is read or written), with an SSH key, as `gpubake notebook up` expects one."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("ssh-keygen is not installed (openssh-client)")
    subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(home / ".ssh" / "id_ed25519")],
        check=True,
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("XDG_", "GPUBAKE_", "GOOGLE_", "AWS_", "CLOUDSDK_"))
    }
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_STATE_HOME=str(home / ".local" / "state"),
        # this checkout's gpubake, from the environment the tests run in
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


@pytest.mark.parametrize("block", quick_blocks(), ids=lambda b: b.where)
def test_quick_commands(block, user_home, tmp_path):
    """A cheap block, run as a user runs it: in a fresh folder, as one bash script that stops
    at the first command failing."""
    assert not _PLACEHOLDER_RE.search(block.text), f"{block.where}: a placeholder to fill in"
    tools = {line.split()[0] for line in command_lines(block.text)} | {
        word for word in ("packer", "docker") if re.search(rf"\b{word}\b", block.text)
    }
    for tool in sorted(tools & {"packer", "docker"}):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    work = tmp_path / "work"
    work.mkdir()
    script = tmp_path / "block.sh"
    script.write_text("set -euo pipefail\n" + block.text, encoding="utf-8")
    ran = subprocess.run(
        ["bash", str(script)],
        cwd=work,
        env=user_home,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if ran.returncode != 0 and "Docker Engine not reachable" in ran.stderr:
        pytest.skip("this block needs a Docker Engine (prune, build --dry-run)")
    assert ran.returncode == 0, (
        f"{block.where} failed ({ran.returncode}):\n{block.text}\n"
        f"stdout: {ran.stdout[-2000:]}\nstderr: {ran.stderr[-3000:]}"
    )


def test_there_are_quick_blocks():
    assert len(quick_blocks()) >= 5
