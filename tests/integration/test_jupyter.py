"""The jupyter role for real: converged in a Debian 12 container that runs systemd, the unit
active, listening on 127.0.0.1:8888 and nowhere else, a token made at the first start (and
made again on a new machine), a password hash accepted, and a second converge changing nothing.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration.helpers import apply, run_in
from tests.integration.systemd_helpers import systemd_container, systemd_image
from tests.integration.test_roles_converge import CA_VARS

pytestmark = pytest.mark.docker
PLAYBOOK = Path(__file__).with_name("role_test.yml")
ROLES = ["build_ca", "base", "python_env", "jupyter"]
ENV_PYTHON = "/opt/gpubake/env/bin/python"
TOKEN_FILE = "/home/gpubake/.jupyter/gpubake-token"  # noqa: S105 (a path, not a secret)
UNIT = "gpubake-jupyter"

# Runs inside the container: HTTP status of each request, without following redirects.
PROBE = textwrap.dedent(
    """
    import http.cookiejar, json, sys, urllib.error, urllib.parse, urllib.request

    class Keep(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(Keep, urllib.request.HTTPCookieProcessor(jar))

    def status(path, headers=None, data=None):
        req = urllib.request.Request("http://127.0.0.1:8888" + path, headers=headers or {},
                                     data=data)
        try:
            with opener.open(req, timeout=10) as resp:
                return resp.status, resp.headers.get("Location", "")
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("Location", "")

    out = {}
    token, password = sys.argv[1], sys.argv[2]
    out["status_anonymous"] = status("/api/status")
    out["lab_anonymous"] = status("/lab")
    out["status_token"] = status("/api/status", {"Authorization": "token " + token})
    if password:
        status("/login")
        xsrf = next(c.value for c in jar if c.name == "_xsrf")
        form = urllib.parse.urlencode({"password": password, "_xsrf": xsrf}).encode()
        out["login"] = status("/login", data=form)
        out["status_after_login"] = status("/api/status")
    print(json.dumps(out))
    """
)


@pytest.fixture(autouse=True)
def _pipelining(monkeypatch):
    """One `docker exec` per task instead of several (same modules, same results)."""
    monkeypatch.setenv("ANSIBLE_PIPELINING", "True")


def probe(box, token: str, password: str = "") -> dict[str, list]:
    """{request: [HTTP status, Location]} for the requests PROBE makes."""
    rc, out = run_in(box, ENV_PYTHON, "-c", PROBE, token, password, user="gpubake")
    assert rc == 0, out
    return json.loads(out.strip().splitlines()[-1])


def wait_listening(box, timeout: float = 60) -> list[str]:
    """The listening TCP sockets of the unit's main process, once it has one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, pid = run_in(box, "systemctl", "show", "-p", "MainPID", "--value", UNIT)
        # as the user: root in a container lacks CAP_SYS_PTRACE, so `ss -p` run as root
        # cannot name the processes of another user
        _, table = run_in(box, "ss", "-ltnpH", user="gpubake")
        mine = [line for line in table.splitlines() if f"pid={pid.strip()}," in line]
        if pid.strip() not in ("", "0") and mine:
            return mine
        time.sleep(0.5)
    _, journal = run_in(box, "journalctl", "-u", UNIT, "--no-pager", "-n", "40")
    raise AssertionError(f"nothing listens for {UNIT} after {timeout} s:\n{journal}")


@pytest.mark.slow
def test_jupyter_under_systemd_localhost_only_with_token_then_password(engine):
    variables = {"roles_under_test": ROLES, **CA_VARS}
    with systemd_container(engine, systemd_image(engine)) as box:
        first, _ = apply(box, PLAYBOOK, variables)
        second, output = apply(box, PLAYBOOK, variables)
        assert first["changed"] > 0
        assert second["changed"] == 0, output[-4000:]

        _, active = run_in(box, "systemctl", "is-active", UNIT)
        _, enabled = run_in(box, "systemctl", "is-enabled", UNIT)
        assert (active.strip(), enabled.strip()) == ("active", "enabled")

        # bound to 127.0.0.1:8888 and to no other address or port
        sockets = wait_listening(box)
        assert {line.split()[3] for line in sockets} == {"127.0.0.1:8888"}, sockets
        _, everything = run_in(box, "ss", "-ltnH")  # every listening TCP socket, IPv4 and IPv6
        assert {line.split()[3] for line in everything.splitlines()} == {"127.0.0.1:8888"}
        _, addr = run_in(box, "hostname", "-I")
        rc, out = run_in(
            box,
            ENV_PYTHON,
            "-c",
            "import socket,sys; socket.create_connection((sys.argv[1], 8888), 3)",
            addr.split()[0],
        )
        assert rc != 0 and "Connection refused" in out, out

        # the notebook dir belongs to the user; the token was made at the first start,
        # only the user can read it, and it is in no file the role wrote
        _, owner = run_in(box, "stat", "-c", "%U %G", "/home/gpubake/notebooks")
        assert owner.split() == ["gpubake", "gpubake"]
        _, mode = run_in(box, "stat", "-c", "%U %a", TOKEN_FILE)
        assert mode.split() == ["gpubake", "600"]
        rc, token = run_in(box, "cat", TOKEN_FILE, user="gpubake")
        token = token.strip()
        assert rc == 0 and len(token) == 48, token
        rc, _ = run_in(box, "grep", "-rqF", token, "/etc/gpubake", "/etc/systemd/system")
        assert rc == 1, "the token must not be in the config or the unit"

        result = probe(box, token)
        assert result["status_anonymous"][0] == 403
        assert result["lab_anonymous"][0] == 302 and "/login" in result["lab_anonymous"][1]
        assert result["status_token"][0] == 200

        # an image booted as a new machine (new machine-id) gets a new token; and the
        # user's own config cannot move the server off 127.0.0.1:8888
        run_in(box, "sh", "-c", "echo 0123456789abcdef0123456789abcdef > /etc/machine-id")
        own = "c.ServerApp.ip = '0.0.0.0'\nc.ServerApp.port = 9999\n"
        user_config = "/home/gpubake/.jupyter/jupyter_server_config.py"
        run_in(box, "sh", "-c", f'printf "{own}" > {user_config}', user="gpubake")
        run_in(box, "systemctl", "restart", UNIT)
        assert {line.split()[3] for line in wait_listening(box)} == {"127.0.0.1:8888"}
        _, new_token = run_in(box, "cat", TOKEN_FILE, user="gpubake")
        assert new_token.strip() != token and len(new_token.strip()) == 48
        assert probe(box, token)["status_token"][0] == 403

        # a password hash instead: the token is off, the password logs in
        rc, hashed = run_in(
            box,
            ENV_PYTHON,
            "-c",
            "from jupyter_server.auth import passwd; print(passwd('correct horse'))",
        )
        assert rc == 0 and hashed.startswith("argon2:"), hashed
        with_password = {**variables, "jupyter_password_hash": hashed.strip()}
        third, output = apply(box, PLAYBOOK, with_password)
        assert third["changed"] > 0, output[-3000:]
        assert hashed.strip() not in output, "the hash must stay out of Ansible's output"
        wait_listening(box)
        result = probe(box, new_token.strip(), "correct horse")
        assert result["status_anonymous"][0] == 403
        assert result["status_token"][0] == 403
        assert result["login"][0] == 302
        assert result["status_after_login"][0] == 200
