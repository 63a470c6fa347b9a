"""images/stacks.yml and images/gpus.yml, read and checked as a whole when they are loaded.

Each file is checked against its JSON Schema (images/schema/*.schema.json, draft 2020-12,
shipped with the data), then for what a schema cannot say: that the names it uses refer to
entries that exist (a stack's parent, framework and roles; the default stack, OS and GPU;
driver branches; CUDA majors; each GPU's architecture) and that a GPU's compute capability
is its architecture's (images/gpus.yml `architectures:`, the one copy of that fact).

The first problem found is raised as `DataFileError`: one line naming the file, the key
(a dotted path) and the problem, e.g. `images/stacks.yml: stacks.pytorch.cuda: 13.2 is a
number, not a string: quote it ("13.2")`.
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import json
import math
import re
import sys
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from packaging.version import InvalidVersion, Version

from gpubake import GpubakeError, one_line, resources

# jsonschema imports rfc3987_syntax where it is installed (Jupyter's extras bring it), and that
# builds a Lark parser at import: a second added to every gpubake command. No format checker
# runs here, so it is kept out while jsonschema loads (bench/startup.py measures it).
_UNUSED_FORMATS = "rfc3987_syntax"
_kept_out = _UNUSED_FORMATS not in sys.modules
if _kept_out:
    sys.modules[_UNUSED_FORMATS] = None  # type: ignore[assignment]  # makes its import fail
try:
    import jsonschema
finally:
    if _kept_out:
        del sys.modules[_UNUSED_FORMATS]

SCHEMA_DIR = Path("images") / "schema"


class DataFileError(GpubakeError):
    """A data file that is not what gpubake reads (one line: the file, the key, the problem)."""


# --- reading ------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML keeps the last)."""


def _no_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable: SafeLoader says so itself
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


def _timestamp(loader: _Loader, node: yaml.ScalarNode) -> Any:
    """A date-like scalar that is no date (2024-02-30) is an error with its line."""
    try:
        return loader.construct_yaml_timestamp(node)
    except (ValueError, OverflowError) as exc:
        raise yaml.constructor.ConstructorError(
            None, None, f"{node.value!r} is no date ({exc}): quote it", node.start_mark
        ) from None


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp)


def _yaml_problem(exc: BaseException, text: str) -> str:
    """`line L, column C: PROBLEM` (1-based) for a YAML error, as one line."""
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f"line {line}, column {column}: {one_line(exc.reason)} (character U+{char:04X})"
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = one_line(exc.problem or exc.context or "not valid YAML")
        if exc.context and exc.problem:
            problem = f"{problem} ({one_line(exc.context)})"
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return where + problem
    return one_line(str(exc)) or type(exc).__name__


def read_yaml(path: Path, label: str) -> Any:
    """The YAML document in `path`; `label` names the file in the error."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataFileError(f"{label}: cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFileError(
            f"{label}: is not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})"
        ) from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, ValueError, RecursionError, OverflowError) as exc:
        # ValueError: a timestamp such as 2024-02-30 that is no date
        raise DataFileError(f"{label}: not valid YAML: {_yaml_problem(exc, text)}") from None


# --- messages -----------------------------------------------------------------------------


def dotted(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "empty (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dt.date | dt.datetime):
        return "a date"
    return f"a {type(value).__name__}"


_JSON_KINDS = {
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "empty",
}


def _short(value: Any, limit: int = 60) -> str:
    text = one_line(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(error: jsonschema.ValidationError) -> tuple[list[Any], str]:
    """(the dotted key's parts, the problem) for one schema error, readable by a person."""
    path = list(error.absolute_path)
    value, rule, schema = error.instance, error.validator, error.schema
    hint = schema.get("description") if isinstance(schema, Mapping) else None
    if "propertyNames" in error.absolute_schema_path:  # a key, not a value, is wrong
        choices = schema.get("enum") if isinstance(schema, Mapping) else None
        what = f"one of {', '.join(map(str, choices))}" if choices else hint or "valid"
        return [*path, value], f"the key is not {what}"
    if rule == "required":
        missing = [k for k in error.validator_value if k not in value]
        return [*path, missing[0]], "is missing (a required key)"
    if rule in ("additionalProperties", "unevaluatedProperties"):
        allowed = list(schema.get("properties", {}))
        extra = [k for k in value if k not in allowed]
        key = extra[0] if extra else "?"
        close = difflib.get_close_matches(str(key), allowed, n=1)
        fix = f": did you mean '{close[0]}'?" if close else ""
        known = f" (known keys: {', '.join(allowed)})" if allowed and not close else ""
        return [*path, key], f"is not a key gpubake knows here{fix}{known}"
    if rule == "type":
        wanted = error.validator_value
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        need = " or ".join(_JSON_KINDS.get(w, w) for w in wanted)
        problem = f"{_short(value)} is {_kind(value)}, not {need}"
        if "string" in wanted and isinstance(value, int | float) and not isinstance(value, bool):
            problem += f': quote it ("{value}")'
        return path, problem
    if rule in ("enum", "const"):
        choices = error.validator_value if rule == "enum" else [error.validator_value]
        return path, f"{_short(value)} is not one of {', '.join(map(str, choices))}"
    if rule == "pattern":
        return path, f"{_short(value)} is not {hint or 'valid: ' + error.message}"
    if rule in ("minItems", "minProperties", "minLength") and error.validator_value == 1:
        return path, "is empty: give at least one"
    if rule == "uniqueItems":
        return path, f"lists an entry twice: {_short(value)}"
    return path, one_line(error.message)


_RELEVANCE = jsonschema.exceptions.by_relevance(strong=frozenset({"additionalProperties"}))


# --- checks -------------------------------------------------------------------------------


@functools.cache
def _validator(path: Path) -> jsonschema.Draft202012Validator:
    schema = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_path(name: str) -> Path:
    """images/schema/NAME.schema.json in gpubake's data (a checkout or an installed wheel)."""
    return resources.data_root() / SCHEMA_DIR / f"{name}.schema.json"


def _walk(value: Any, path: tuple[Any, ...] = ()) -> Iterable[tuple[tuple[Any, ...], str]]:
    """Problems no JSON Schema sees: keys that are not text, numbers that are not finite."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                yield (*path, str(key)), f"the key {key!r} is {_kind(key)}: quote it"
            yield from _walk(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, (*path, index))
    elif isinstance(value, float) and not math.isfinite(value):
        yield path, f"{value} is not a finite number"


def check_schema(data: Any, name: str, label: str) -> None:
    """Check `data` (file `label`) against images/schema/NAME.schema.json."""
    if data is None:
        raise DataFileError(f"{label}: is empty: gpubake needs its {name} data")
    if not isinstance(data, Mapping):
        raise DataFileError(f"{label}: holds {_kind(data)}, not a mapping of keys")
    for path, problem in _walk(data):
        raise DataFileError(f"{label}: {dotted(path)}: {problem}")
    errors = _validator(schema_path(name)).iter_errors(data)
    # a key spelt wrong is the cause of the required key "missing" beside it: say that first
    error = jsonschema.exceptions.best_match(errors, key=_RELEVANCE)
    if error is not None:
        path, problem = _describe(error)
        raise DataFileError(f"{label}: {dotted(path) or '(top level)'}: {problem}")


def _fail(label: str, path: Iterable[Any], problem: str) -> DataFileError:
    return DataFileError(f"{label}: {dotted(path)}: {problem}")


def _cc(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def check_gpus(data: Mapping[str, Any], label: str) -> None:
    """images/gpus.yml: its schema, then each GPU's architecture and compute capability."""
    check_schema(data, "gpus", label)
    arches = data["architectures"]
    by_cc = sorted(arches, key=lambda a: _cc(arches[a]["min_cc"]))
    for key, gpu in data["gpus"].items():
        arch = gpu["architecture"]
        if arch not in arches:
            raise _fail(
                label,
                ("gpus", key, "architecture"),
                f"'{arch}' is not an architecture under `architectures` ({', '.join(by_cc)})",
            )
        cc = _cc(gpu["compute_capability"])
        own = [a for a in by_cc if _cc(arches[a]["min_cc"]) <= cc]
        if not own or own[-1] != arch:
            lowest = arches[by_cc[0]]["min_cc"]
            found = f"{own[-1]}'s" if own else f"below the oldest architecture's ({lowest})"
            raise _fail(
                label,
                ("gpus", key, "compute_capability"),
                f"{gpu['compute_capability']} is {found}, not {arch}'s (its min_cc is "
                f"{arches[arch]['min_cc']}): fix the architecture or the compute capability",
            )


def _one_of(names: Collection[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def _version(label: str, path: tuple[Any, ...], text: str) -> None:
    try:
        Version(text)
    except InvalidVersion:
        raise _fail(label, path, f"'{text}' is not a version number, e.g. 2.15.0") from None


def check_stacks(
    data: Mapping[str, Any],
    label: str,
    *,
    gpus: Mapping[str, Any],
    gpus_label: str = "images/gpus.yml",
    roles: Collection[str] | None = None,
) -> None:
    """images/stacks.yml: its schema, then every name it uses against what exists (`gpus`:
    images/gpus.yml's data; `roles`: the collection's role names, None to leave them be)."""
    check_schema(data, "stacks", label)
    stacks, oses = data["stacks"], data["operating_systems"]
    branches, majors = data["driver_branches"], gpus["cuda"]
    for arch, facts in gpus["architectures"].items():
        for key in ("first_driver_branch", "last_driver_branch"):
            if key in facts and str(facts[key]) not in branches:
                raise _fail(
                    label,
                    ("driver_branches",),
                    f"has no branch {facts[key]}, which {gpus_label}'s "
                    f"architectures.{arch}.{key} names ({_one_of(branches)})",
                )
    for key, names, what in (
        ("default_stack", stacks, "a stack under `stacks`"),
        ("default_os", oses, "an OS under `operating_systems`"),
        ("default_cloud_gpu", gpus["gpus"], f"a GPU in {gpus_label}"),
    ):
        if data[key] not in names:
            raise _fail(label, (key,), f"'{data[key]}' is not {what} ({_one_of(names)})")
    try:
        re.compile(data["cuda_wheels"])
    except re.error as exc:
        raise _fail(label, ("cuda_wheels",), f"is not a regular expression: {exc}") from None

    spec = data["container_stages"]
    for part in ("root", "derived"):
        for index, stage in enumerate(spec[part]):
            if stage not in spec["stages"]:
                raise _fail(
                    label,
                    ("container_stages", part, index),
                    f"'{stage}' is not a stage under container_stages.stages "
                    f"({_one_of(spec['stages'])})",
                )

    def role(path: tuple[Any, ...], name: str, *, also: tuple[str, ...] = ()) -> None:
        if roles is not None and name not in roles and name not in also:
            raise _fail(label, path, f"'{name}' is not a role of the collection (roles/)")

    for stage, entry in spec["stages"].items():
        for index, name in enumerate(entry["roles"]):
            role(("container_stages", "stages", stage, "roles", index), name, also=("framework",))
    for index, name in enumerate(spec["on_request"]["job_runner"]):
        role(("container_stages", "on_request", "job_runner", index), name)

    for name, stack in stacks.items():
        at = ("stacks", name)
        parent, seen = stack.get("from"), [name]
        while parent is not None:
            if parent not in stacks:
                raise _fail(label, (*at, "from"), f"'{parent}' is not a stack ({_one_of(stacks)})")
            if parent in seen:
                raise _fail(
                    label,
                    (*at, "from"),
                    f"stacks {' -> '.join([*seen, parent])} derive from each other",
                )
            seen.append(parent)
            parent = stacks[parent].get("from")
        like = stack.get("like")
        if like is not None and (
            like not in stacks or ("from" in stack) != ("from" in stacks[like]) or like == name
        ):
            kind = "a derived stack (with `from:`)" if "from" in stack else "a root stack"
            raise _fail(label, (*at, "like"), f"'{like}' is not {kind} like this one")
        if "framework" in stack and stack["framework"] != "none":
            role((*at, "framework"), stack["framework"])
        for index, name_ in enumerate(stack.get("roles", [])):
            role((*at, "roles", index), name_)
        if "driver_branch" in stack and stack["driver_branch"] not in branches:
            raise _fail(
                label,
                (*at, "driver_branch"),
                f"'{stack['driver_branch']}' is not a branch under `driver_branches` "
                f"({_one_of(branches)})",
            )
        if "cuda" in stack and stack["cuda"].split(".")[0] not in majors:
            raise _fail(
                label,
                (*at, "cuda"),
                f"'{stack['cuda']}' is of no CUDA major in {gpus_label} `cuda` ({_one_of(majors)})",
            )
        for package, version in stack.get("packages", {}).items():
            _version(label, (*at, "packages", package), version)
