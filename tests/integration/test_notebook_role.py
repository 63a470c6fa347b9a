"""Role notebook for real, and python_env's locks and cache, in one Debian 12 container.

build_ca, base, python_env and notebook converge (twice: no change the second time) by FQCN;
then gpubake-notebook runs as the image's user: /storage/pre-run.sh ran as its own process
(exiting 0, failing or hanging, Jupyter starts and the log says why), /api 200, /api/status
403 without the token and 200 with it, the login page at /, the health check, Gradient's
options in gradient mode, an unknown mode refused, a small /dev/shm named; the environment
is the image user's and first on a login shell's PATH. python_env_lock_file installs a
`uv pip compile --generate-hashes` lock exactly and refuses a wrong hash or a pin the lock
lacks; python_env_cache_dir uses a bind-mounted cache (the second install downloads nothing)
and refuses a directory that is not a mount point. gpu-check.ipynb is checked with nbformat
(it is run in the full-image test, where torch is installed).
"""

from __future__ import annotations

import json
import re
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.helpers import apply, base_image, play, run_in
from tests.integration.test_roles_converge import CA_VARS

pytestmark = pytest.mark.docker
ROLE_TEST = Path(__file__).with_name("role_test.yml")
ROLES = ["build_ca", "base", "python_env", "notebook"]
# as playbooks/container.yml applies them: the image's user owns the environment
ROLE_VARS = {"roles_under_test": ROLES, "python_env_owner": "gpubake", **CA_VARS}
ENV_PYTHON = "/opt/gpubake/env/bin/python"
CACHE_MOUNT = "/var/cache/gpubake-uv"
TOKEN = "gpubake-test-token-0123456789abcdef"  # noqa: S105 (a test token)
# uv's cache buckets anywhere on the container's own filesystem (-xdev: not in the mount)
FIND_UV_CACHES = [
    "find",
    "/",
    "-xdev",
    "-type",
    "d",
    "(",
    "-name",
    "archive-v*",
    "-o",
    "-name",
    "interpreter-v*",
    "-o",
    "-name",
    "wheels-v*",
    ")",
    "-prune",
    "-print",
]
_RECAP_RE = re.compile(r"ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")

# A stranger's playbook: python_env by FQCN into its own prefix (a fresh environment per case).
LOCK_PLAYBOOK = """\
---
- name: An environment from a lock
  hosts: all
  gather_facts: false
  environment: "{{ build_ca_environment | default({}) }}"
  roles:
    - role: gpubake.gpu.python_env
"""

# Runs inside the container: {request: [HTTP status, body contains login_submit]}.
PROBE = textwrap.dedent(
    """
    import json, sys, urllib.error, urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(path, headers=None):
        req = urllib.request.Request("http://127.0.0.1:8888" + path, headers=headers or {})
        try:
            with opener.open(req, timeout=10) as resp:
                return resp.status, "login_submit" in resp.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            return err.code, False

    auth = {"Authorization": "token " + sys.argv[1]}
    print(json.dumps({
        "api": get("/api"),
        "status_anonymous": get("/api/status"),
        "status_token": get("/api/status", auth),
        "root": get("/"),
    }))
    """
)


@pytest.fixture(autouse=True)
def _pipelining(monkeypatch):
    """One `docker exec` per task instead of several (same modules, same results)."""
    monkeypatch.setenv("ANSIBLE_PIPELINING", "True")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """The host's uv cache, bind-mounted at CACHE_MOUNT."""
    return tmp_path_factory.mktemp("uv-cache")


@pytest.fixture(scope="module")
def box(engine, cache_dir):
    """One container for the module: the roles converged once, the cache mounted."""
    name = f"gpubake-test-{uuid.uuid4().hex[:10]}"
    box = engine.containers.run(
        base_image(engine),
        ["sleep", "infinity"],
        name=name,
        detach=True,
        entrypoint=[],
        volumes={str(cache_dir): {"bind": CACHE_MOUNT, "mode": "rw"}},
    )
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ANSIBLE_PIPELINING", "True")
            first, output = apply(box, ROLE_TEST, ROLE_VARS)
        assert first["changed"] > 0, output[-3000:]
        yield box
    finally:
        box.remove(force=True)


def changed_tasks(output: str) -> list[str]:
    """The TASK lines of the tasks that reported a change."""
    tasks, task = [], ""
    for line in output.splitlines():
        if line.startswith("TASK ["):
            task = line
        elif line.startswith("changed:") and task not in tasks:
            tasks.append(task)
    return tasks


def recap(output: str) -> dict[str, int]:
    ok, changed, unreachable, failed = (int(x) for x in _RECAP_RE.findall(output)[-1])
    return {"ok": ok, "changed": changed, "unreachable": unreachable, "failed": failed}


def freeze(box, prefix: str) -> list[str]:
    # --quiet: no "Using Python ... at: <prefix>" on stderr, which run_in's output interleaves
    # with stdout (once seen joined to the first package: "/opt/lock-asix==1.17.0")
    rc, out = run_in(
        box, "/usr/local/bin/uv", "pip", "freeze", "--quiet", "--no-cache", "--python",
        f"{prefix}/bin/python",
    )  # fmt: skip
    assert rc == 0, out
    return [line for line in out.split() if "==" in line]


@pytest.fixture(scope="module")
def locks(box, tmp_path_factory) -> dict[str, Path]:
    """A lock of six==1.17.0 made by uv pip compile --generate-hashes (in the container, with
    the build-time CA), the same lock with wrong hashes, and the lock playbook."""
    work = tmp_path_factory.mktemp("locks")
    rc, lock = run_in(
        box,
        "sh",
        "-c",
        "echo six==1.17.0 | SSL_CERT_FILE=/run/gpubake-build/ca-bundle.crt /usr/local/bin/uv"
        f" pip compile --quiet --no-cache --generate-hashes --python {ENV_PYTHON} -",
    )
    assert rc == 0 and "six==1.17.0" in lock and "--hash=sha256:" in lock, lock
    good = work / "six.lock"
    good.write_text(lock, encoding="utf-8")
    bad = work / "six-bad.lock"
    bad.write_text(re.sub(r"sha256:[0-9a-f]{64}", "sha256:" + "0" * 64, lock), encoding="utf-8")
    playbook = work / "lock.yml"
    playbook.write_text(LOCK_PLAYBOOK, encoding="utf-8")
    return {"good": good, "bad": bad, "playbook": playbook}


def lock_vars(prefix: str, lock: Path, **extra) -> dict:
    return {
        **CA_VARS,
        "python_env_prefix": prefix,
        "python_env_lock_file": str(lock),
        "python_env_install": {"six": "1.17.0"},
        **extra,
    }


# --- role notebook ---------------------------------------------------------------------


def test_the_build_leaves_no_caches_and_no_jupyter_state(box):
    for path in (
        "/root/.cache",
        "/root/.jupyter",
        "/root/.local",
        "/home/gpubake/.cache",
        "/home/gpubake/.jupyter",
        "/home/gpubake/.local",
    ):
        rc, _ = run_in(box, "test", "-e", path)
        assert rc != 0, f"{path} is left in the image"
    rc, out = run_in(box, *FIND_UV_CACHES)
    assert rc == 0 and out.strip() == "", out
    rc, out = run_in(box, "sh", "-c", "ls -A /tmp")
    assert rc == 0 and "gpubake-lock" not in out, out


def test_directories_tools_and_the_check_notebook(box):
    for path in ("/notebooks", "/storage", "/notebooks/gpu-check.ipynb"):
        _, owner = run_in(box, "stat", "-c", "%U %G", path)
        assert owner.split() == ["gpubake", "gpubake"], (path, owner)
    for tool in ("git", "ssh"):
        rc, out = run_in(box, "sh", "-c", f"command -v {tool}")
        assert rc == 0, (tool, out)
    check = (
        "import nbformat, sys; nb = nbformat.read(sys.argv[1], as_version=4);"
        " nbformat.validate(nb); code = [c for c in nb.cells if c.cell_type == 'code'];"
        " assert len(code) == 1, code; src = code[0].source;"
        " assert 'import torch' in src and 'torch.cuda.is_available()' in src, src;"
        " compile(src, 'gpu-check', 'exec'); print(nb.nbformat)"
    )
    # as the image's user: root's imports would leave root's .pyc files in the user's env
    rc, out = run_in(box, ENV_PYTHON, "-c", check, "/notebooks/gpu-check.ipynb", user="gpubake")
    assert rc == 0 and out.strip().endswith("4"), out
    rc, out = run_in(
        box, "/usr/local/bin/uv", "pip", "show", "--no-cache", "--python", ENV_PYTHON, "jupyterlab"
    )
    assert rc == 0 and "Version: 4.6.6" in out, out


def test_converges_again_with_no_change(box):
    rc, output = play(box, ROLE_TEST, ROLE_VARS)
    assert rc == 0, output[-4000:]
    assert recap(output)["changed"] == 0, changed_tasks(output)


def wait_up(box, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc, _ = run_in(box, "/usr/local/bin/gpubake-notebook-health", user="gpubake")
        if rc == 0:
            return
        time.sleep(0.5)
    _, log = run_in(box, "cat", "/tmp/notebook.log")
    raise AssertionError(f"JupyterLab did not answer on /api after {timeout} s:\n{log}")


def stop_server(box) -> None:
    run_in(box, "pkill", "-u", "gpubake", "-f", "jupyter-lab")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rc, _ = run_in(box, "pgrep", "-u", "gpubake", "-f", "jupyter-lab")
        if rc != 0:
            return
        time.sleep(0.3)
    raise AssertionError("JupyterLab did not stop")


def test_lab_mode_needs_the_token_and_runs_pre_run(box):
    # lab mode refuses root (the image runs as gpubake)
    rc, out = run_in(box, "/usr/local/bin/gpubake-notebook")
    assert rc == 2 and "not root" in out, out
    # not up yet: the health check fails
    rc, _ = run_in(box, "/usr/local/bin/gpubake-notebook-health", user="gpubake")
    assert rc == 1
    pre_run = "id -un > /storage/pre-run.ran\nexport GPUBAKE_PRE_RUN=yes\n"
    rc, out = run_in(box, "sh", "-c", f"printf '{pre_run}' > /storage/pre-run.sh")
    assert rc == 0, out
    box.exec_run(
        ["bash", "-c", "exec /usr/local/bin/gpubake-notebook > /tmp/notebook.log 2>&1"],
        user="gpubake",
        environment={"JUPYTER_TOKEN": TOKEN},
        detach=True,
    )
    try:
        wait_up(box)
        rc, out = run_in(box, ENV_PYTHON, "-c", PROBE, TOKEN, user="gpubake")
        assert rc == 0, out
        result = json.loads(out.strip().splitlines()[-1])
        assert result["api"][0] == 200
        assert result["status_anonymous"][0] == 403
        assert result["status_token"][0] == 200
        assert result["root"] == [200, True], result  # redirected to the login page
        _, ran = run_in(box, "cat", "/storage/pre-run.ran")
        assert ran.strip() == "gpubake"
        # pre-run.sh is its own process: what it exports does not reach Jupyter, whose
        # terminals are bash; Jupyter serves /notebooks
        _, pid = run_in(box, "pgrep", "-u", "gpubake", "-f", "jupyter-lab")
        pid = pid.split()[0]
        _, environ = run_in(box, "cat", f"/proc/{pid}/environ", user="gpubake")
        assert "GPUBAKE_PRE_RUN=yes" not in environ.split("\0")
        assert "SHELL=/bin/bash" in environ.split("\0")
        _, cmdline = run_in(box, "cat", f"/proc/{pid}/cmdline")
        assert "--ServerApp.root_dir=/notebooks" in cmdline.split("\0"), cmdline
        assert "--allow-root" not in cmdline
    finally:
        stop_server(box)


def test_lab_mode_without_a_token_makes_one_and_logs_it(box):
    box.exec_run(
        ["bash", "-c", "exec /usr/local/bin/gpubake-notebook lab > /tmp/notebook.log 2>&1"],
        user="gpubake",
        detach=True,
    )
    try:
        wait_up(box)
        _, log = run_in(box, "cat", "/tmp/notebook.log")
        tokens = set(re.findall(r"[?&]token=([0-9a-f]{32,})", log))
        assert len(tokens) == 1, log
        _, out = run_in(box, ENV_PYTHON, "-c", PROBE, tokens.pop(), user="gpubake")
        result = json.loads(out.strip().splitlines()[-1])
        assert result["status_anonymous"][0] == 403 and result["status_token"][0] == 200
    finally:
        stop_server(box)


def start(box, *args: str, **environment: str) -> None:
    box.exec_run(
        [
            "bash",
            "-c",
            'exec /usr/local/bin/gpubake-notebook "$@" > /tmp/notebook.log 2>&1',
            "-",
            *args,
        ],
        user="gpubake",
        environment={"JUPYTER_TOKEN": TOKEN, **environment},
        detach=True,
    )


@pytest.mark.parametrize(
    ("hook", "said"),
    [
        ("exit 0", "pre-run.sh finished"),
        (
            "set -e\nfalse\necho never",
            "pre-run.sh failed with exit status 1; starting Jupyter anyway",
        ),
        ("sleep 600", "pre-run.sh did not finish in 3 s and was stopped; starting Jupyter anyway"),
    ],
    ids=["exits-0", "fails", "hangs"],
)
def test_pre_run_cannot_keep_jupyter_from_starting(box, hook, said):
    script = f"echo hook says hello\n{hook}\n"
    rc, out = run_in(box, "sh", "-c", f"printf '{script}' > /storage/pre-run.sh")
    assert rc == 0, out
    start(box, GPUBAKE_PRE_RUN_TIMEOUT="3")
    try:
        wait_up(box)
        _, log = run_in(box, "cat", "/tmp/notebook.log")
        lines = log.splitlines()
        assert "hook says hello" in lines, log  # the hook's output is in the log
        assert [line for line in lines if line.endswith(said)] == [
            f"gpubake-notebook: /storage/{said}"
        ], log
        assert "never" not in lines
        rc, _ = run_in(box, "pgrep", "-f", "sleep 600")
        assert rc != 0, "the hung hook was left running"
        # the box's /dev/shm is Docker's 64 MiB: the start says what to pass
        assert (
            "gpubake-notebook: /dev/shm is 64 MiB: PyTorch DataLoader workers (num_workers > 0)"
            " fail with 'unable to allocate shared memory'; start the container with"
            " --shm-size=2g (or --ipc=host)"
        ) in lines, log
    finally:
        stop_server(box)
        run_in(box, "rm", "-f", "/storage/pre-run.sh")


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_an_unknown_mode_is_refused_in_one_line(box, how):
    if how == "argument":
        result = box.exec_run(["/usr/local/bin/gpubake-notebook", "bogus"], user="gpubake")
    else:
        result = box.exec_run(
            ["/usr/local/bin/gpubake-notebook"],
            user="gpubake",
            environment={"GPUBAKE_NOTEBOOK_MODE": "bogus"},
        )
    out = result.output.decode()
    assert result.exit_code == 2, out
    assert out.splitlines() == [
        "gpubake-notebook: unknown mode 'bogus': give lab or gradient"
        " (Jupyter's own options start with --)"
    ]


def test_the_environment_is_the_users_and_first_on_a_login_shells_path(box):
    rc, out = run_in(box, "find", "/opt/gpubake/env", "!", "-user", "gpubake", "-print")
    assert rc == 0 and out.strip() == "", out  # all of it, the installs' files included
    rc, out = run_in(
        box, "bash", "-lc", 'command -v python jupyter; echo "$VIRTUAL_ENV"', user="gpubake"
    )
    assert out.split() == [
        "/opt/gpubake/env/bin/python",
        "/opt/gpubake/env/bin/jupyter",
        "/opt/gpubake/env",
    ], out
    # the user writes into it without sudo (the notebook image test pip installs there)
    purelib = "$(python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')"
    rc, out = run_in(
        box, "bash", "-lc", f"touch {purelib}/probe.pth && rm {purelib}/probe.pth", user="gpubake"
    )
    assert rc == 0, out


def test_gradient_mode_starts_with_gradients_options(box):
    box.exec_run(
        ["bash", "-c", "exec /usr/local/bin/gpubake-notebook > /tmp/notebook.log 2>&1"],
        user="gpubake",
        environment={"JUPYTER_TOKEN": TOKEN, "GPUBAKE_NOTEBOOK_MODE": "gradient"},
        detach=True,
    )
    try:
        wait_up(box)
        _, pid = run_in(box, "pgrep", "-u", "gpubake", "-f", "jupyter-lab")
        _, cmdline = run_in(box, "cat", f"/proc/{pid.split()[0]}/cmdline")
        assert cmdline.split("\0")[2:-1] == [
            "--allow-root",
            "--ip=0.0.0.0",
            "--no-browser",
            "--ServerApp.trust_xheaders=True",
            "--ServerApp.disable_check_xsrf=False",
            "--ServerApp.allow_remote_access=True",
            "--ServerApp.allow_origin=*",
            "--ServerApp.allow_credentials=True",
        ], cmdline
        _, out = run_in(box, ENV_PYTHON, "-c", PROBE, TOKEN, user="gpubake")
        result = json.loads(out.strip().splitlines()[-1])
        assert result["status_anonymous"][0] == 403 and result["status_token"][0] == 200
    finally:
        stop_server(box)


# --- python_env: locks and the cache ---------------------------------------------------


def cache_archives(cache_dir: Path) -> set[str]:
    """The unpacked distributions in uv's cache (one new entry per download)."""
    return {p.name for p in cache_dir.glob("archive-v*/*")}


def test_lock_installs_exactly_with_the_mounted_cache(box, locks, cache_dir):
    variables = lock_vars("/opt/lock-a", locks["good"], python_env_cache_dir=CACHE_MOUNT)
    rc, output = play(box, locks["playbook"], variables)
    assert rc == 0, output[-4000:]
    assert freeze(box, "/opt/lock-a") == ["six==1.17.0"]
    assert cache_archives(cache_dir), "uv kept nothing in the mounted cache"
    rc, output = play(box, locks["playbook"], variables)
    assert rc == 0 and recap(output)["changed"] == 0, output[-4000:]
    rc, out = run_in(box, "sh", "-c", "ls -A /tmp")
    assert "gpubake-lock" not in out, out  # the copied lock is removed


def test_the_cache_is_reused_and_stays_out_of_the_image(box, locks, cache_dir):
    before = cache_archives(cache_dir)
    assert before, "run after test_lock_installs_exactly_with_the_mounted_cache"
    variables = lock_vars("/opt/lock-b", locks["good"], python_env_cache_dir=CACHE_MOUNT)
    rc, output = play(box, locks["playbook"], variables)
    assert rc == 0, output[-4000:]
    assert freeze(box, "/opt/lock-b") == ["six==1.17.0"]
    assert cache_archives(cache_dir) == before, "the second install downloaded again"
    rc, out = run_in(box, *FIND_UV_CACHES)
    assert rc == 0 and out.strip() == "", f"a uv cache outside the mount: {out}"
    rc, _ = run_in(box, "test", "-e", "/root/.cache")
    assert rc != 0


def test_check_mode_reports_what_the_lock_would_install(box, locks):
    rc, output = play(box, locks["playbook"], lock_vars("/opt/lock-d", locks["good"]), "--check")
    assert rc == 0, output[-4000:]
    assert "would install six==1.17.0 from the lock" in output, output[-4000:]


def test_a_wrong_hash_fails_the_play(box, locks):
    rc, output = play(box, locks["playbook"], lock_vars("/opt/lock-c", locks["bad"]))
    assert rc != 0 and recap(output)["failed"] == 1, output[-4000:]
    assert "hash" in output.lower(), output[-4000:]
    rc, out = run_in(
        box,
        "/usr/local/bin/uv",
        "pip",
        "freeze",
        "--no-cache",
        "--python",
        "/opt/lock-c/bin/python",
    )
    assert "six" not in out


def test_a_pin_the_lock_lacks_fails_naming_it(box, locks):
    variables = lock_vars("/opt/lock-e", locks["good"], python_env_install={"six": "1.16.0"})
    rc, output = play(box, locks["playbook"], variables)
    assert rc != 0, output[-4000:]
    assert "lacks six==1.16.0 (it pins six==1.17.0)" in output, output[-4000:]
    rc, _ = run_in(box, "test", "-e", "/opt/lock-e/lib/python3.11/site-packages/six.py")
    assert rc != 0, "nothing may be installed when a pin is missing"


def test_a_cache_dir_that_is_not_a_mount_point_fails(box, locks):
    variables = lock_vars("/opt/lock-f", locks["good"], python_env_cache_dir="/var/tmp")
    rc, output = play(box, locks["playbook"], variables)
    assert rc != 0, output[-4000:]
    assert "python_env_cache_dir /var/tmp is not a mount point" in output, output[-4000:]
