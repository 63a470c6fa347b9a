"""Property-based tests of what users and editors feed gpubake: --var values, tags, hosts,
and edited images/*.yml. Whatever the input, the answer is a result or one line of
GpubakeError, never a traceback."""

from __future__ import annotations

import contextlib
import copy
import io
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gpubake import GpubakeError, cli, stacks
from gpubake.build import targets
from gpubake.build.hosts import split_host
from gpubake.build.plan import check_tag
from gpubake.stacks import StackError

ROOT = Path(__file__).resolve().parents[2]
ROLES = frozenset(p.name for p in (ROOT / "roles").iterdir() if p.is_dir())
REAL_STACKS = yaml.safe_load((ROOT / "images" / "stacks.yml").read_text(encoding="utf-8"))
REAL_GPUS = yaml.safe_load((ROOT / "images" / "gpus.yml").read_text(encoding="utf-8"))
DOCKER_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

FEW = settings(max_examples=60, deadline=None)
SOME = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_one_line(exc: BaseException | str, prefix: str = "", echoed: Any = ()) -> None:
    """One line, but for line breaks in the user's own input, which it may quote (gpubake's
    main turns those into spaces)."""
    message = str(exc)
    assert message.startswith(prefix), message
    for text in sorted(echoed, key=len, reverse=True):
        message = message.replace(text, "")
    assert message and "\n" not in message and "Traceback" not in message, message


# --- --var ----------------------------------------------------------------------------------

SETTABLE = [k for k in stacks.VAR_KEYS if not k.startswith("packages.")]
SETTABLE += ["packages.torch", "packages.numpy", "packages.fastai", "packages.", "packages.nope"]
VALUES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            *("true", "false", "yes", "0", "580", "535", "470", "999", "13.2", "12.4", "11.7"),
            *("3.11", "3.12", "nvidia", "distro", "2.15.0", "1!2.0", "١٣.٢", "²", " 580 "),
        ]
    ),
    st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,3}){0,3}", fullmatch=True),
)
ITEM = st.one_of(
    st.text(max_size=24),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(SETTABLE), VALUES),
)


@FEW
@given(
    items=st.lists(ITEM, max_size=4),
    name=st.sampled_from([None, *stacks.stack_names()]),
    os_key=st.sampled_from([None, *stacks.os_names()]),
    gpu=st.sampled_from([None, "t4", "h100", "k80", "v100", "b200"]),
    target=st.sampled_from(targets.NAMES),
)
def test_vars_resolve_or_refuse_in_one_line(items, name, os_key, gpu, target):
    try:
        variables = stacks.parse_vars(items)
        stack = stacks.resolve(name, os_key=os_key, gpu=gpu, variables=variables, target=target)
    except StackError as exc:
        parts = [part.strip() for item in items for part in item.partition("=")[::2]]
        assert_one_line(exc, echoed=[*items, *parts])
        return
    assert all("=" in item for item in items)  # an item that is not KEY=VALUE is refused
    assert dict(stack.overrides) == variables
    for key, value in variables.items():
        if key == "cuda":
            assert stack.cuda == value
        elif key == "driver_branch":
            assert stack.driver_branch == value and value.isdigit()
        elif key.startswith("packages."):
            assert dict(stack.packages)[key.split(".", 1)[1]] == value
        elif key in ("driver_source", "cuda_source"):
            assert getattr(stack, key) == value in stacks.SOURCES


def run_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(args)
        except SystemExit as exc:
            code = exc.code
    assert isinstance(code, int), code
    return code, out.getvalue(), err.getvalue()


@settings(max_examples=30, deadline=None)
@given(items=st.lists(ITEM, min_size=1, max_size=3), gpu=st.sampled_from([None, "t4", "a100"]))
def test_build_dry_run_with_any_var_is_a_plan_or_one_line(items, gpu):
    """A gcp-image dry run needs no cloud: it resolves, plans and prints."""
    args = ["build", "--dry-run", "--target", "gcp-image", "--project", "my-proj"]
    args += ["--zone", "us-central1-a", *(["--gpu", gpu] if gpu else [])]
    for item in items:
        args += ["--var", item]
    code, out, err = run_cli(args)
    assert "Traceback" not in out + err
    assert code in (0, 1, 2), (code, err)
    if code == 0:
        assert "input hash" in out and err == ""
    else:
        # one line as a terminal shows it ends at "\n" (a "\r" in the user's own --var is
        # echoed back as given)
        lines = err.rstrip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("gpubake: error: "), err
        assert out == ""


# --- tags and hosts -------------------------------------------------------------------------


@FEW
@example(tag="latest\n")  # `$` matches before a final newline
@given(
    tag=st.one_of(
        st.text(max_size=140),
        st.from_regex(DOCKER_TAG, fullmatch=True),
        st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\n", fullmatch=True),
        st.text(alphabet="aZ09_.-", min_size=120, max_size=135),
    )
)
def test_a_tag_is_accepted_only_when_docker_takes_it(tag):
    try:
        accepted = check_tag(tag)
    except GpubakeError as exc:
        assert_one_line(exc, "--tag '", echoed=[tag])
        assert not DOCKER_TAG.fullmatch(tag), tag
    else:
        assert accepted == tag
        assert DOCKER_TAG.fullmatch(tag), tag


NAMES = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"[a-z0-9.-]{1,12}", fullmatch=True),
    st.builds(lambda s: f"[{s}]", st.text(alphabet="0123456789abcdef:", max_size=12)),
)
HOSTS = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda user, name, port: f"{user}{name}{port}",
        st.one_of(st.just(""), st.builds(lambda u: f"{u}@", st.text(max_size=6))),
        NAMES,
        st.one_of(
            st.just(""),
            st.builds(lambda p: f":{p}", st.integers(-5, 70000)),
            st.builds(lambda p: f":{p}", st.text(max_size=4)),
        ),
    ),
)


@FEW
@example(host="root@h:²")  # a digit to str.isdigit, not to int()
@example(host="[::1]:٢٢")
@given(host=HOSTS)
def test_a_host_is_split_sanely_or_refused_in_one_line(host):
    try:
        user, name, port = split_host(host)
    except GpubakeError as exc:
        assert_one_line(exc, "--host '", echoed=[host])
        return
    assert name and not any(c.isspace() for c in name) and "@" not in name
    assert user is None or (user and not any(c.isspace() for c in user))
    assert port is None or (isinstance(port, int) and 1 <= port <= 65535)
    assert host.endswith(f":{port}") if port else True
    assert ":" not in name or host[len(host) - len(host.lstrip()) :].count("[") == 1


# --- edited data files ----------------------------------------------------------------------


def paths_of(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key and list index in `value`, as paths from the top."""
    out = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            out += paths_of(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += paths_of(item, (*path, index))
    return out


def kind(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value) if value is None else "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


OTHER_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(0, 9), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(0, 9), max_size=2),
)
#: Fits no key pattern of either schema (a space, an uppercase letter): refused anywhere.
UNKNOWN_KEY = "Zz unknown key"


def mutate(data: Any, draw: Any) -> tuple[Any, str]:
    """One edit of a copy of `data`: delete a key or list entry, give a value another type,
    or add an unknown key to a mapping. Returns the edited copy and the kind of edit."""
    data = copy.deepcopy(data)
    how = draw(st.sampled_from(["delete", "retype", "add"]))
    if how == "add":
        maps = [p for p in paths_of(data) if isinstance(get(data, p), dict)]
        target = get(data, draw(st.sampled_from(maps)))
        target[UNKNOWN_KEY] = draw(OTHER_VALUES)
        return data, how
    path = draw(st.sampled_from([p for p in paths_of(data) if p]))
    parent, last = get(data, path[:-1]), path[-1]
    if how == "delete":
        del parent[last]
        return data, how
    old = parent[last]
    parent[last] = draw(OTHER_VALUES.filter(lambda v: kind(v) != kind(old)))
    return data, how


def get(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


@contextlib.contextmanager
def data_of(stacks_data: Any, gpus_data: Any):  # type: ignore[no-untyped-def]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stacks, "stacks_data", lambda: stacks_data)
        mp.setattr(stacks, "gpus_data", lambda: gpus_data)
        yield


def use(stacks_data: Any, gpus_data: Any) -> None:
    """What commands do with checked data: resolve every stack, with and without a GPU."""
    with data_of(stacks_data, gpus_data):
        for name in [None, *stacks.stack_names()]:
            for gpu, target in ((None, "docker"), (stacks_data["default_cloud_gpu"], "gcp-image")):
                try:
                    stack = stacks.resolve(name, gpu=gpu, target=target)
                except StackError as exc:
                    assert_one_line(exc)
                    continue
                stack.to_dict()
                stacks.compute_capabilities(stack.cuda)


def write(folder: Path, name: str, data: Any) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


@SOME
@given(draw=st.data())
def test_an_edited_stacks_yml_is_checked_or_works(draw):
    edited, how = mutate(REAL_STACKS, draw.draw)
    gpus = stacks.load_gpus(ROOT / "images" / "gpus.yml")
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder), "stacks.yml", edited)
        try:
            data = stacks.load_stacks(path, gpus, roles=ROLES)
        except StackError as exc:
            assert_one_line(exc, f"{path}: ")
            return
    # a value of another type, or a key no schema allows, never passes
    assert how == "delete", f"{how} passed the schema"
    use(data, gpus)


@SOME
@given(draw=st.data())
def test_an_edited_gpus_yml_is_checked_or_works(draw):
    edited, how = mutate(REAL_GPUS, draw.draw)
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder), "gpus.yml", edited)
        try:
            gpus = stacks.load_gpus(path)
            data = stacks.load_stacks(ROOT / "images" / "stacks.yml", gpus, roles=ROLES)
        except StackError as exc:
            assert_one_line(exc)
            assert str(exc).startswith((f"{path}: ", "images/stacks.yml: ")), str(exc)
            return
    assert how == "delete", f"{how} passed the schema"
    use(data, gpus)


@FEW
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_any_bytes_as_stacks_yml_are_one_line_naming_the_file(content):
    gpus = stacks.load_gpus(ROOT / "images" / "gpus.yml")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "stacks.yml"
        path.write_bytes(content)
        for load in (lambda: stacks.load_stacks(path, gpus), lambda: stacks.load_gpus(path)):
            with pytest.raises(StackError) as exc:
                load()
            assert_one_line(exc.value, f"{path}: ")
