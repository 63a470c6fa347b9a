"""images/stacks.yml and images/gpus.yml checked whole when read: a malformed file is one
line naming the file, the key and the problem, for every command that reads it."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from gpubake import cli, data_schema, stacks
from gpubake.build import locks
from gpubake.stacks import StackError

ROOT = Path(__file__).resolve().parents[2]
STACKS = (ROOT / "images" / "stacks.yml").read_text(encoding="utf-8")
GPUS = (ROOT / "images" / "gpus.yml").read_text(encoding="utf-8")
ROLES = frozenset(p.name for p in (ROOT / "roles").iterdir() if p.is_dir())


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """A data root whose images/stacks.yml and gpus.yml the test edits (the roles are the
    checkout's); gpubake reads its stacks and GPUs from there."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "stacks.yml").write_text(STACKS, encoding="utf-8")
    (tmp_path / "images" / "gpus.yml").write_text(GPUS, encoding="utf-8")
    (tmp_path / "roles").symlink_to(ROOT / "roles", target_is_directory=True)
    monkeypatch.setattr(stacks, "data_root", lambda: tmp_path)
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_the_real_files_pass_their_schemas_and_cross_checks():
    gpus = stacks.load_gpus(ROOT / "images" / "gpus.yml")
    data = stacks.load_stacks(ROOT / "images" / "stacks.yml", gpus, roles=ROLES)
    assert data == stacks.stacks_data() and gpus == stacks.gpus_data()
    assert "pytorch" in data["stacks"] and "h100" in gpus["gpus"]


@pytest.mark.parametrize("name", ["stacks", "gpus"])
def test_schemas_are_draft_2020_12_and_ship_with_the_data(name):
    path = data_schema.schema_path(name)
    assert path.parent == stacks.data_root() / "images" / "schema"  # in the wheel's _data too
    schema = json.loads(path.read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_schema_machine_architectures_are_the_lock_architectures():
    schema = json.loads(data_schema.schema_path("stacks").read_text(encoding="utf-8"))
    assert tuple(schema["$defs"]["machine_arch"]["enum"]) == locks.ARCHES


STACK_EDITS = [
    # (old, new, the message after "images/stacks.yml: ")
    (
        'cuda: "13.2"\n    driver_branch: "580"\n    # the compute',
        'cuda: 13.2\n    driver_branch: "580"\n    # the compute',
        'stacks.pytorch.cuda: 13.2 is a number, not a string: quote it ("13.2")',
    ),
    ("    framework: mxnet\n", "", "stacks.mxnet.framework: is missing (a required key)"),
    (
        "    env_size_gib: 5.6",
        "    env_sise_gib: 5.6",
        "stacks.pytorch.env_sise_gib: is not a key gpubake knows here: did you mean "
        "'env_size_gib'?",
    ),
    ("default_stack: pytorch", "", "default_stack: is missing (a required key)"),
    (
        "from: pytorch-notebook",
        "from: pytorch-notbook",
        "stacks.fastai.from: 'pytorch-notbook' is not a stack (fastai, fastai-legacy, mxnet, ",
    ),
    (
        "from: pytorch\n",
        "from: fastai\n",
        "stacks.pytorch-notebook.from: stacks pytorch-notebook -> fastai -> pytorch-notebook "
        "derive from each other",
    ),
    (
        "default_os: debian-12",
        "default_os: centos-7",
        "default_os: 'centos-7' is not an OS under `operating_systems` (debian-12, ",
    ),
    (
        "default_cloud_gpu: t4",
        "default_cloud_gpu: t5",
        "default_cloud_gpu: 't5' is not a GPU in images/gpus.yml (a10, a100, ",
    ),
    (
        'driver_branch: "580"\n    legacy',
        'driver_branch: "536"\n    legacy',
        "stacks.mxnet.driver_branch: '536' is not a branch under `driver_branches` (470, ",
    ),
    (
        'cuda: "11.7"',
        'cuda: "10.2"',
        "stacks.mxnet.cuda: '10.2' is of no CUDA major in images/gpus.yml `cuda` (11, 12, 13)",
    ),
    ("framework: mxnet", "framework: mxnett", "stacks.mxnet.framework: 'mxnett' is not a role"),
    ("roles: [notebook]", "roles: [notebok]", "stacks.pytorch-notebook.roles[0]: 'notebok' is"),
    ("python_env: conda", "python_env: mamba", "python_env: 'mamba' is not one of uv, conda"),
    ("ports: [8888]", "ports: 8888", "container.ports: 8888 is a number, not a list"),
    ('  "470":\n    kind', "  470:\n    kind", "driver_branches.470: the key 470 is a number"),
    (
        "    source: &branches https://docs.nvidia.com/",
        "    source: &branches http://docs.nvidia.com/",
        "source: 'http://docs.nvidia.com/datacenter/tesla/drivers/supporte... is not the https:// "
        "address of the page the fact was taken from",
    ),
    (
        '    eol: "2029-09"\n    source: *branches\n',
        '    eol: "2029-09"\n',
        "driver_branches.620.source: is missing (a required key)",
    ),
    (
        "    cuda_source: https://developer.download.nvidia.com/",
        "    cuda_source: developer.download.nvidia.com/",
        "driver_branches.620.cuda_source: 'developer.download.nvidia.com/compute/nvidia-driver/"
        "redi... is not the https:// address",
    ),
    (
        '  "595": {kind: production, max_cuda: "13.2", min_driver: "595.45.04", eol: "2027-03",',
        '  "595": {kind: production, max_cuda: "13.2", min_driver: "595.45.04",',
        "driver_branches.595.eol: is missing (a required key)",
    ),
    (
        '  "595": {kind: production,',
        '  "595": {kind: stable,',
        "driver_branches.595.kind: 'stable' is not one of ltsb, production, nfb",
    ),
    (
        "    like: fastai\n",
        "    like: pytorch\n",
        "stacks.fastai-legacy.like: 'pytorch' is not a derived stack (with `from:`) like this",
    ),
    (
        "      source: *torch_arch_lists\n",
        "",
        "stacks.pytorch-legacy.kernels.source: is missing (a required key)",
    ),
    ("  pytorch-conda:", "  Pytorch-Conda:", "stacks.Pytorch-Conda: the key is not a stack name"),
    ('torch: "2.15.0"', 'torch: "2.15.0"\n      torch: "2.15.1"', "duplicate key 'torch'"),
    ('torch: "2.15.0"', 'torch: "two"', "stacks.pytorch.packages.torch: 'two' is not a version"),
    ('cuda_wheels: "^nvidia-"', 'cuda_wheels: "^(nvidia-"', "cuda_wheels: is not a regular"),
    ("root: [os, cuda, env, finish]", "root: [os, cuda, env, fnish]", "'fnish' is not a stage"),
    ('    python: "3.12"\n    cuda', "    cuda", "stacks.pytorch-conda.python: is missing"),
    ('eol: "2024-07"', "eol: 2024-02-30", "'2024-02-30' is no date (day is out of range"),
    ("vm_disk:\n", "vm_disk: [\n", "not valid YAML: line 14, column 13: expected ',' or ']'"),
    ("  margin: 1.25", "  margin: .nan", "vm_disk.margin: nan is not a finite number"),
]


@pytest.mark.parametrize(
    ("old", "new", "needle"), STACK_EDITS, ids=[e[2][:40] for e in STACK_EDITS]
)
def test_malformed_stacks_yml_is_one_line_naming_file_and_key(root, old, new, needle):
    edit(root / "images" / "stacks.yml", old, new)
    with pytest.raises(StackError) as exc:
        stacks.stacks_data()
    message = one_line(exc)
    assert message.startswith("images/stacks.yml: "), message
    assert needle in message, message


GPU_EDITS = [
    ("architecture: turing", "architecture: turring", "gpus.t4.architecture: 'turring' is not"),
    (
        "architecture: turing",
        "architecture: ampere",
        "gpus.t4.compute_capability: 7.5 is turing's, not ampere's (its min_cc is 8.0)",
    ),
    ('compute_capability: "7.5"', "compute_capability: 7.5", "gpus.t4.compute_capability: 7.5"),
    ("matmul_dtype: bf16", "matmul_dtype: int8", "'int8' is not one of bf16, fp16, fp32"),
    ("open_kernel_module: required", "open_kernel_module: maybe", "architectures.blackwell."),
    (
        "gcp: {accelerators: [nvidia-l4], build_machine_type: g2-standard-4, source: *gcp_gpus}",
        "gcp: {accelerators: [nvidia-l4], source: *gcp_gpus}",
        "gpus.l4.gcp.build_machine_type: is missing (a required key)",
    ),
    # every fact names the page it was taken from
    (
        "    source: &ccs https://developer.nvidia.com/cuda-gpus\n",
        "    source: &ccs https://developer.nvidia.com/cuda-gpus\n    peak: {fp16_tflops: 1}\n",
        "duplicate key 'peak'",
    ),
    (
        'peak: {fp16_tflops: 65, bandwidth_gbps: 320, source: "https://www.nvidia.com/en-us/data-center/tesla-t4/"}',
        "peak: {fp16_tflops: 65, bandwidth_gbps: 320}",
        "gpus.t4.peak.source: is missing (a required key)",
    ),
    (
        '    match: ["Tesla T4"]\n    architecture: turing\n    compute_capability: "7.5"\n'
        "    memory_gib: 15\n    source: &ccs https://developer.nvidia.com/cuda-gpus\n",
        '    match: ["Tesla T4"]\n    architecture: turing\n    compute_capability: "7.5"\n'
        "    memory_gib: 15\n    source: &ccs not-an-address\n",
        "gpus.t4.source: 'not-an-address' is not the https:// address of the page",
    ),
    (
        "    aws: {instance_families: [g4dn], build_instance_type: g4dn.xlarge, "
        "source: *aws_accel}",
        "    aws: {instance_families: [g4dn], build_instance_type: g4dn.xlarge}",
        "gpus.t4.aws.source: is missing (a required key)",
    ),
    (
        '  hopper: {min_cc: "9.0", open_kernel_module: recommended, source: *open_modules}',
        '  hopper: {min_cc: "9.0", open_kernel_module: recommended}',
        "architectures.hopper.source: is missing (a required key)",
    ),
    (
        '    min_driver: "525.60.13"\n    source: *minor_compat\n',
        '    min_driver: "525.60.13"\n',
        "cuda.12.source: is missing (a required key)",
    ),
    (
        "expected: {basis: datasheet, matmul_dtype: fp16, matmul_tflops: 28",
        "expected: {matmul_dtype: fp16, matmul_tflops: 28",
        "gpus.t4.expected.basis: is missing (a required key)",
    ),
    ("  h200:", "  H200:", "gpus.H200: the key is not a GPU key of lowercase letters"),
    ("    memory_gib: 15", "    memory_gb: 15", "gpus.t4.memory_gb: is not a key gpubake knows"),
    ('min_driver: "580.65.06"', "min_driver: 580.65", "cuda.13.min_driver: 580.65 is a number"),
]


@pytest.mark.parametrize(("old", "new", "needle"), GPU_EDITS, ids=[e[2][:40] for e in GPU_EDITS])
def test_malformed_gpus_yml_is_one_line_naming_file_and_key(root, old, new, needle):
    edit(root / "images" / "gpus.yml", old, new)
    for read in (stacks.gpus_data, stacks.stacks_data):  # stacks.yml is read with gpus.yml
        with pytest.raises(StackError) as exc:
            read()
        message = one_line(exc)
        assert message.startswith("images/gpus.yml: "), message
        assert needle in message, message


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "images/stacks.yml: is empty"),
        (b"# nothing but a comment\n", "images/stacks.yml: is empty"),
        (b"- a\n- b\n", "images/stacks.yml: holds a list, not a mapping"),
        (b"just text", "images/stacks.yml: holds a string, not a mapping"),
        (b"\xff\xfe", "images/stacks.yml: is not UTF-8 text (byte 0"),
        (b"a: b\n\x01", "images/stacks.yml: not valid YAML: line 2, column 1: special char"),
        (b"a: [b\n", "images/stacks.yml: not valid YAML: line 2, column 1: "),
        (b"a:\n  b: 1\n c: 2\n", "images/stacks.yml: not valid YAML: line 3, column 2: "),
    ],
)
def test_unreadable_stacks_yml_is_one_line(root, content, needle):
    (root / "images" / "stacks.yml").write_bytes(content)
    with pytest.raises(StackError) as exc:
        stacks.resolve()
    assert one_line(exc).startswith(needle), str(exc.value)


def test_missing_file_is_one_line(root):
    (root / "images" / "gpus.yml").unlink()
    with pytest.raises(StackError) as exc:
        stacks.gpus_data()
    assert one_line(exc) == "images/gpus.yml: cannot be read: No such file or directory"


def test_roles_are_checked_only_where_the_collection_is(tmp_path):
    """A data root with images/ only (the lock tests' copy) has no roles to check against."""
    (tmp_path / "images").mkdir()
    path = tmp_path / "images" / "stacks.yml"
    path.write_text(STACKS.replace("roles: [notebook]", "roles: [notebok]"), encoding="utf-8")
    gpus = stacks.load_gpus(ROOT / "images" / "gpus.yml")
    assert stacks.load_stacks(path, gpus)["stacks"]["pytorch-notebook"]["roles"] == ["notebok"]
    with pytest.raises(StackError, match="'notebok' is not a role"):
        stacks.load_stacks(path, gpus, roles=ROLES)
    (tmp_path / "roles" / "notebook").mkdir(parents=True)  # a roles/ beside images/: checked
    with pytest.raises(StackError) as exc:
        stacks.load_stacks(path, gpus)
    assert one_line(exc).startswith(f"{path}: container_stages.stages.os.roles[0]: 'build_ca'")


@pytest.mark.parametrize(
    "args",
    [
        ["stacks"],
        ["stacks", "--json"],
        ["build", "--dry-run", "--target", "gcp-image", "--project", "p", "--zone", "z-a"],
        ["render", "--out", "{out}"],
    ],
)
def test_every_command_reading_the_data_says_one_line(root, tmp_path, args):
    edit(root / "images" / "stacks.yml", "    env_size_gib: 4.5", "    env_size_gib: big")
    out, err = io.StringIO(), io.StringIO()
    args = [a.replace("{out}", str(tmp_path / "out")) for a in args]
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        pytest.raises(SystemExit) as exc,
    ):
        cli.main(args)
    assert exc.value.code == 1
    assert out.getvalue() == ""
    assert err.getvalue() == (
        "gpubake: error: images/stacks.yml: stacks.mxnet.env_size_gib: 'big' is a string, "
        "not a number\n"
    )


def test_jsonschema_loads_without_the_slow_rfc3987_parser_and_leaves_it_importable():
    """rfc3987_syntax (where installed) builds a Lark parser at import, a second a command;
    gpubake keeps it out of jsonschema's import (bench/startup.py), not out of the process."""
    code = (
        "import sys, gpubake.cli, jsonschema; "
        "print('rfc3987_syntax' in sys.modules, sys.modules.get('rfc3987_syntax', 1) is None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    if importlib.util.find_spec("rfc3987_syntax") is not None:  # and a later import works
        code += "; import rfc3987_syntax; print(rfc3987_syntax.__name__)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.stdout.split()[-1] == "rfc3987_syntax", out.stderr
