"""The notebook VM's idle watcher (gpubake/notebooks/idle_watch.py) for real, on the shared VM
host (vm_host.py: systemd, JupyterLab as gpubake-jupyter on 127.0.0.1:8888 with its token):
installed where the boot script puts it, run as the unit gpubake-notebook-idle with short
limits and a poweroff command that records the time, while a user's session is played through
Jupyter's own REST and websocket API from inside the host:

- a cell that sleeps 90 s, its websocket closed meanwhile: the kernel is busy, no poweroff well
  past the 60 s idle limit;
- then typing in a Jupyter terminal every 10 s: no poweroff 60 s after the cell ended;
- then nothing: the warning goes to the journal and into the terminal (which the watcher must
  not take for activity), and the poweroff comes 60 s after the last keystroke, once.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from gpubake.notebooks import idle_watch
from tests.integration.helpers import run_in

pytestmark = [pytest.mark.docker, pytest.mark.slow]

UNIT = "gpubake-notebook-idle"
WATCHER = "/usr/local/lib/gpubake/notebook_idle.py"  # where the boot script installs it
WORK = "/var/lib/gpubake-test-idle"  # config, driver, logs, poweroff record (not /run: a
# tmpfs, which docker cp / put_archive cannot write to)
RECORD = f"{WORK}/poweroff"
STATE = f"{WORK}/state.json"
ENV_PYTHON = "/opt/gpubake/env/bin/python"
IDLE_S, WARN_S, INTERVAL_S = 60, 20, 2
CELL_S = 90
#: keystrokes, seconds after the cell started: from before it ends to 60 s after
TYPING = tuple(range(80, CELL_S + IDLE_S + 1, 10))

# Runs in the host as the user gpubake, with the environment's tornado: a user's browser
# session, reduced to the requests and websocket messages JupyterLab sends.
DRIVER = textwrap.dedent(
    """
    import asyncio, json, sys, time, urllib.request, uuid
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    BASE = "127.0.0.1:8888"
    TOKEN = open("/home/gpubake/.jupyter/gpubake-token").read().strip()
    AUTH = {"Authorization": "token " + TOKEN}

    def rest(method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request("http://" + BASE + path, data=data, method=method,
                                     headers={**AUTH, "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            text = resp.read()
        return json.loads(text) if text else None

    def setup():
        for _ in range(120):
            try:
                rest("GET", "/api/status")
                break
            except OSError:
                time.sleep(0.5)
        kernel = rest("POST", "/api/kernels", {"name": "python3"})["id"]
        terminal = rest("POST", "/api/terminals", {})["name"]
        print(json.dumps({"kernel": kernel, "terminal": terminal}))

    async def execute(kernel, code):
        # sends the cell, waits until the kernel says busy, and hangs up: the kernel runs on
        url = f"ws://{BASE}/api/kernels/{kernel}/channels?session_id={uuid.uuid4().hex}"
        ws = await websocket_connect(HTTPRequest(url, headers=AUTH))
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": "execute_request", "username": "gpubake",
                  "session": uuid.uuid4().hex, "version": "5.3", "date": ""}
        content = {"code": code, "silent": False, "store_history": True,
                   "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}
        ws.write_message(json.dumps({"header": header, "parent_header": {}, "metadata": {},
                                     "content": content, "channel": "shell", "buffers": []}))
        while True:
            msg = json.loads(await ws.read_message())
            if (msg.get("msg_type") == "status"
                    and msg.get("parent_header", {}).get("msg_id") == msg_id
                    and msg["content"]["execution_state"] == "busy"):
                break
        ws.close()
        print(time.time())

    async def terminal(name, log_path, until, *type_at):
        # connected all along (until the terminal is deleted): logs what the terminal shows,
        # types at the given times
        log = open(log_path, "a", buffering=1)
        closed = asyncio.Event()
        def shown(raw):
            if raw is None:
                closed.set()
            else:
                log.write(json.dumps({"t": time.time(), "msg": json.loads(raw)}) + "\\n")
        async def pause(moment):
            try:
                await asyncio.wait_for(closed.wait(), max(0, moment - time.time()))
            except asyncio.TimeoutError:
                pass
        url = f"ws://{BASE}/terminals/websocket/{name}"
        ws = await websocket_connect(HTTPRequest(url, headers=AUTH), on_message_callback=shown)
        log.write(json.dumps({"t": time.time(), "connected": True}) + "\\n")
        for at in sorted(type_at):
            await pause(at)
            if closed.is_set():
                return
            ws.write_message(json.dumps(["stdin", "echo hi\\r"]))
            log.write(json.dumps({"t": time.time(), "typed": "echo hi"}) + "\\n")
        await pause(until)
        ws.close()

    def cleanup(kernel, terminal):
        for path in (f"/api/kernels/{kernel}", f"/api/terminals/{terminal}"):
            try:
                rest("DELETE", path)
            except OSError as exc:
                print(path, exc)

    command, args = sys.argv[1], sys.argv[2:]
    if command == "setup":
        setup()
    elif command == "execute":
        asyncio.run(asyncio.wait_for(execute(*args), 60))
    elif command == "terminal":
        asyncio.run(terminal(args[0], args[1], *map(float, args[2:])))
    elif command == "cleanup":
        cleanup(*args)
    """
)


def _put(box, files: dict[str, tuple[str, int]]) -> None:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for path, (text, mode) in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    assert box.put_archive("/", archive.getvalue())


def _drive(box, *args: str) -> str:
    rc, out = run_in(box, ENV_PYTHON, f"{WORK}/driver.py", *args, user="gpubake")
    assert rc == 0, out
    return (out.strip().splitlines() or [""])[-1]


def _journal(box, since: float, unit: str = UNIT) -> list[tuple[float, str]]:
    """The journal lines of `unit` (the watcher's) since `since`: (time, message)."""
    _, out = run_in(
        box, "journalctl", "-u", unit, "--since", f"@{int(since) - 1}", "-o", "short-unix",
        "--no-pager", "-q",
    )  # fmt: skip
    lines = []
    for line in out.splitlines():
        stamp, _, rest = line.partition(" ")
        _, _, message = rest.partition(": ")
        try:
            lines.append((float(stamp), message))
        except ValueError:
            continue
    return lines


def _records(box) -> list[float]:
    _, out = run_in(box, "sh", "-c", f"cat {RECORD} 2>/dev/null || true")
    return [float(x) for x in out.split()]


def _state(box) -> dict:
    rc, out = run_in(box, "cat", STATE)
    assert rc == 0, out
    return json.loads(out)


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def _stop_watcher(box) -> None:
    run_in(box, "systemctl", "stop", UNIT)
    run_in(box, "systemctl", "reset-failed", UNIT)


def play_a_session(box) -> None:
    """The whole scenario on `box` (a booted host with gpubake-jupyter), cleaned up after."""
    config = {
        "idle_stop_s": IDLE_S,
        "warn_s": WARN_S,
        "interval_s": INTERVAL_S,
        "poweroff_command": ["sh", "-c", f"date +%s.%N >> {RECORD}"],
        "state_file": STATE,
        "name": "itest",
    }
    _stop_watcher(box)
    run_in(box, "rm", "-rf", WORK)
    run_in(box, "install", "-d", "-m", "0777", WORK)
    _put(
        box,
        {
            WATCHER: (Path(idle_watch.__file__).read_text(encoding="utf-8"), 0o644),
            f"{WORK}/notebook.json": (json.dumps(config), 0o644),
            f"{WORK}/driver.py": (DRIVER, 0o644),
        },
    )
    ids = json.loads(_drive(box, "setup"))
    term_log = f"{WORK}/terminal.log"
    try:
        started = time.time()
        rc, out = run_in(
            box, "systemd-run", "--unit", UNIT, "--property", "Restart=no",
            "/usr/bin/python3", WATCHER, "--config", f"{WORK}/notebook.json",
        )  # fmt: skip
        assert rc == 0, out
        cell = float(_drive(box, "execute", ids["kernel"], f"import time; time.sleep({CELL_S})"))
        until = cell + CELL_S + IDLE_S + 80
        typing = [cell + at for at in TYPING]
        box.exec_run(
            [ENV_PYTHON, f"{WORK}/driver.py", "terminal", ids["terminal"], term_log,
             str(until), *map(str, typing)],
            user="gpubake", detach=True,
        )  # fmt: skip

        # 1. the cell runs with nobody connected: busy, well past the idle limit
        _sleep_until(cell + CELL_S - 5)
        assert _records(box) == [], _journal(box, started)
        state = _state(box)
        assert state["busy_kernels"] == 1 and state["idle_s"] <= INTERVAL_S + 1, state
        assert state["connections"] == 0, state

        # 2. the cell has ended; only the typing keeps the host up, past the idle limit
        _sleep_until(cell + CELL_S + IDLE_S + 4 * INTERVAL_S)
        assert _records(box) == [], _journal(box, started)
        state = _state(box)
        assert state["busy_kernels"] == 0 and state["idle_s"] <= 10 + INTERVAL_S + 1, state

        # 3. the typing stopped: warned, then powered off once, IDLE_S after the last key
        last_key = typing[-1]
        deadline = last_key + IDLE_S + 5 * INTERVAL_S + 5
        while not _records(box) and time.time() < deadline:
            time.sleep(1)
        time.sleep(2 * INTERVAL_S)  # no second poweroff
        records = _records(box)
        journal = _journal(box, started)
        assert len(records) == 1, (records, journal)
        assert last_key + IDLE_S - 1 <= records[0] <= last_key + IDLE_S + 3 * INTERVAL_S + 2, (
            records[0] - last_key,
            journal,
        )
        warnings = [(t, m) for t, m in journal if m.startswith(f"{UNIT}: powering off at ")]
        stops = [(t, m) for t, m in journal if m.startswith(f"{UNIT}: powering off: idle ")]
        assert len(warnings) == 1 and len(stops) == 1, journal
        assert re.search(r"at \d\d:\d\d UTC \(idle 4\d s; limit 60 s\) unless", warnings[0][1])
        assert last_key + IDLE_S - WARN_S - 1 <= warnings[0][0] < stops[0][0] <= records[0] + 1
        # both lines are in the Jupyter server's log too
        jupyter = [m for _, m in _journal(box, started, "gpubake-jupyter")]
        assert warnings[0][1] in jupyter and stops[0][1] in jupyter, jupyter[-10:]
        state = _state(box)
        assert state["idle_s"] >= IDLE_S - 1, state
        assert state["reason"].startswith("powering off: idle"), state

        # the warning reached the user's terminal (and was not counted as their activity)
        _, shown = run_in(box, "cat", term_log)
        events = [json.loads(line) for line in shown.splitlines()]
        output = "".join(
            e["msg"][1] for e in events if "msg" in e and e["msg"][0] == "stdout"
        )  # fmt: skip
        assert "unless there is activity" in output, output[-2000:]
        assert sum(1 for e in events if "typed" in e) == len(TYPING), events
    finally:
        _stop_watcher(box)
        _drive(box, "cleanup", ids["kernel"], ids["terminal"])
        run_in(box, "rm", "-rf", WORK, WATCHER)


def test_idle_watcher_keeps_a_busy_host_up_and_powers_an_idle_one_off(vm_host):
    play_a_session(vm_host.box)
