"""The notebook VM's idle watcher (gpubake/notebooks/idle_watch.py): its decision from what
Jupyter's REST API answers, its config, and its actions on this machine (a real pty, a real
state file, a real poweroff command, the metadata stand-in). The watcher against a real
JupyterLab is tests/integration/test_notebook_idle.py."""

from __future__ import annotations

import ast
import json
import os
import sys
import time
from pathlib import Path

import pytest

from gpubake.notebooks import idle_watch as iw
from tests.metadata_standins import metadata_standin

NOW = 1_750_000_000.0
CONFIG = {**iw.DEFAULTS, "idle_stop_s": 3600, "warn_s": 300}


def _status(last_activity: float, connections: int = 0) -> dict:
    return {"last_activity": iw.iso(last_activity), "connections": connections, "kernels": 1}


def _kernel(state: str, last_activity: float) -> dict:
    return {"id": "k", "execution_state": state, "last_activity": iw.iso(last_activity)}


def _terminal(last_activity: float) -> dict:
    return {"name": "1", "last_activity": iw.iso(last_activity)}


def decide(status, kernels=(), terminals=(), *, since=NOW - 7200, config=CONFIG, **kw):
    return iw.decide(NOW, kw.pop("uptime", 7200.0), since, status, list(kernels),
                     list(terminals), config, **kw)  # fmt: skip


def test_a_busy_kernel_or_an_open_connection_is_activity_now():
    old = NOW - 5000
    busy = decide(_status(old), [_kernel("busy", old), _kernel("idle", old)])
    assert (busy.idle_s, busy.busy_kernels, busy.stop, busy.warn) == (0, 1, False, False)
    assert busy.reason == "busy: 1 kernel(s) running"
    assert busy.stop_at == NOW + 3600
    starting = decide(_status(old), [_kernel("starting", NOW - 30)])
    assert starting.idle_s == 0
    connected = decide(_status(old, connections=2), [_kernel("idle", old)])
    assert (connected.idle_s, connected.connections) == (0, 2)
    assert connected.reason == "busy: 2 kernel connection(s)"


def test_a_kernel_stuck_starting_is_not_busy_for_ever():
    stuck = decide(_status(NOW - 5000), [_kernel("starting", NOW - iw.STARTING_GRACE_S - 1)])
    assert (stuck.busy_kernels, stuck.idle_s) == (0, iw.STARTING_GRACE_S + 1)


def test_idle_since_the_newest_of_server_kernels_terminals_and_the_floor():
    d = decide(
        _status(NOW - 900),
        [_kernel("idle", NOW - 600), _kernel("dead", NOW - 4000)],
        [_terminal(NOW - 120), _terminal(NOW - 3000)],
    )
    assert (d.idle_s, d.last_activity, d.terminals, d.reason) == (120, NOW - 120, 2, "idle")
    assert decide(_status(NOW - 900), since=NOW - 60).idle_s == 60
    # a timestamp ahead of the watcher's clock counts as now, not as a negative idle time
    assert decide(_status(NOW + 30)).idle_s == 0
    # timestamps Jupyter did not give, or gave garbled, are left out
    bad = decide({"last_activity": "yesterday"}, [{"execution_state": "idle"}], [{}])
    assert bad.idle_s == 7200


def test_the_watchers_own_requests_and_notices_are_not_activity():
    """The server's last_activity inside the watcher's own requests (were its polls counted)
    or its notices, and a terminal's after a notice (the notice's echo on the pty), are not
    the user's; a terminal's inside a request is (the requests do not touch terminals), and a
    kernel's always is (it moves on kernel messages only)."""
    requests = [(NOW - 32.02, NOW - 32), (NOW - 2.02, NOW - 2)]
    notices = [(NOW - 41, NOW - 36)]
    own = {"requests": requests, "notices": notices, "since": NOW - 500}
    assert decide(_status(NOW - 2), **own).idle_s == 500
    assert decide(_status(NOW - 40), [], [_terminal(NOW - 40)], **own).idle_s == 500
    assert decide(_status(NOW - 2), [], [_terminal(NOW - 32)], **own).idle_s == 32
    assert decide(_status(NOW - 2), [_kernel("idle", NOW - 2)], **own).idle_s == 2
    # outside the windows (and their slack) they count
    assert decide(_status(NOW - 10), [], [_terminal(NOW - 20)], **own).idle_s == 10
    assert decide(_status(NOW - 3), **own).idle_s == 3


def test_jupyter_not_answering_counts_as_idle_since_the_floor():
    d = decide(None, since=NOW - 3400)
    assert (d.idle_s, d.reason, d.terminals) == (3400, "jupyter not answering", 0)
    assert d.warn and not d.stop
    assert decide(None, since=NOW - 3600).stop


def test_warning_then_stop_at_the_idle_limit():
    assert not decide(_status(NOW - 3299)).warn
    warn = decide(_status(NOW - 3300))
    assert (warn.warn, warn.stop, warn.limit, warn.stop_at) == (True, False, "idle", NOW + 300)
    assert warn.warn_at == NOW
    stop = decide(_status(NOW - 3600))
    assert (stop.warn, stop.stop) == (False, True)
    # the warning comes at most half the limit ahead
    short = {**CONFIG, "idle_stop_s": 60, "warn_s": 300}
    assert not decide(_status(NOW - 29), config=short).warn
    assert decide(_status(NOW - 30), config=short).warn


def test_no_idle_stop_and_the_max_run_limit():
    for off in (0, None):
        d = decide(_status(NOW - 99999), config={**CONFIG, "idle_stop_s": off})
        assert (d.stop_at, d.stop, d.warn) == (None, False, False)
    capped = {**CONFIG, "max_run_s": 8 * 3600}
    # busy all along, but the max run is reached: 8 h after boot
    d = decide(_status(NOW), [_kernel("busy", NOW)], config=capped, uptime=8 * 3600)
    assert (d.stop, d.limit, d.stop_at) == (True, "max_run", NOW)
    d = decide(_status(NOW), [_kernel("busy", NOW)], config=capped, uptime=8 * 3600 - 200)
    assert (d.warn, d.limit) == (True, "max_run")
    assert "activity does not extend it" in iw.warning_text(d)
    assert iw.stop_text(d) == "powering off: max run reached (480 min since boot)"
    # whichever comes first
    d = decide(_status(NOW - 3600), config=capped, uptime=100)
    assert (d.stop, d.limit) == (True, "idle")
    # uptime unknown: no max-run stop
    assert decide(_status(NOW), config=capped, uptime=None).stop_at == NOW + 3600


def test_the_texts():
    d = decide(_status(NOW - 3300))
    at = time.strftime("%H:%M", time.gmtime(NOW + 300))
    assert iw.warning_text(d) == (
        f"gpubake-notebook-idle: powering off at {at} UTC (idle 55 min; limit 60 min) "
        "unless there is activity"
    )
    assert iw.stop_text(decide(_status(NOW - 3610))) == "powering off: idle 60 min (limit 60 min)"
    short = decide(_status(NOW - 61), config={**CONFIG, "idle_stop_s": 60})
    assert iw.stop_text(short) == "powering off: idle 61 s (limit 60 s)"
    assert iw.preemption_text("lab") == (
        "gpubake-notebook-idle: spot VM preempted: /storage is kept; start it again with "
        "`gpubake notebook up lab`"
    )


def test_jupyter_timestamps():
    assert iw.parse_time("2025-06-15T15:06:40.123456Z") == pytest.approx(1750000000.123456)
    assert iw.parse_time("2025-06-15T15:06:40+00:00") == 1750000000
    assert iw.parse_time("2025-06-15T15:06:40") == 1750000000  # naive: UTC
    assert [iw.parse_time(x) for x in (None, "", "soon", 5)] == [None] * 4
    assert iw.iso(1750000000.7) == "2025-06-15T15:06:40Z"


def test_config_keys_defaults_and_bad_values(tmp_path, capsys):
    assert iw.load_config(str(tmp_path / "missing.json")) == iw.DEFAULTS
    path = tmp_path / "notebook.json"
    path.write_text(
        json.dumps({
            "idle_stop_s": 600, "max_run_s": 7200, "cloud": "gcp", "name": "lab",
            "interval_s": 0, "warn_s": "soon", "poweroff_command": "reboot",
            "preemption_urls": {"aws": "http://127.0.0.1:9/x"},
        }),
        encoding="utf-8",
    )  # fmt: skip
    config = iw.load_config(str(path))
    assert (config["idle_stop_s"], config["max_run_s"], config["cloud"]) == (600, 7200, "gcp")
    assert (config["interval_s"], config["warn_s"]) == (30, 300)
    assert config["poweroff_command"] == ["systemctl", "poweroff"]
    assert config["preemption_urls"] == {
        "gcp": iw.PREEMPTION_URLS["gcp"],
        "aws": "http://127.0.0.1:9/x",
    }
    said = capsys.readouterr().out
    assert "interval_s=0" in said and "warn_s='soon'" in said and "poweroff_command" in said
    path.write_text(json.dumps({"idle_stop_s": None, "cloud": "azure"}), encoding="utf-8")
    config = iw.load_config(str(path))
    assert (config["idle_stop_s"], config["cloud"]) == (None, None)
    path.write_text("[1]", encoding="utf-8")
    assert iw.load_config(str(path)) == iw.DEFAULTS


@pytest.fixture
def terminal(tmp_path):
    """A real pty, found in a /dev/pts-like folder (the machine's own terminals stay out of
    a unit test): (that folder, the pty's master end)."""
    master, slave = os.openpty()
    pts = tmp_path / "pts"
    pts.mkdir()
    (pts / "7").symlink_to(os.ttyname(slave))
    try:
        yield pts, master
    finally:
        os.close(master)
        os.close(slave)


def test_the_notice_reaches_a_terminal(tmp_path, terminal):
    pts, master = terminal
    (pts / "8").write_text("not a terminal")
    (pts / "ptmx").symlink_to(pts / "7")
    assert iw.write_terminals("hello there", str(pts)) == 1  # 7 only
    assert b"hello there" in os.read(master, 4096)
    assert iw.write_terminals("x", str(tmp_path / "none")) == 0


def _watcher(tmp_path, **config) -> iw.Watcher:
    (tmp_path / "pts").mkdir(exist_ok=True)
    settings = {
        **iw.DEFAULTS,
        "token_file": str(tmp_path / "no-token"),  # Jupyter "not answering"
        "state_file": str(tmp_path / "run" / "state.json"),
        "poweroff_command": ["sh", "-c", f"date +%s.%N >> {tmp_path / 'poweroff'}"],
        **config,
    }
    return iw.Watcher(settings, pts_dir=str(tmp_path / "pts"))


def test_the_watcher_powers_off_once_when_jupyter_does_not_answer(tmp_path, capsys):
    watcher = _watcher(tmp_path, idle_stop_s=0.6, warn_s=0.3)
    decision = watcher.poll()
    state = json.loads((tmp_path / "run" / "state.json").read_text(encoding="utf-8"))
    assert state["jupyter"] is False and state["reason"].startswith("jupyter not answering: ")
    assert state["stop_at"] == iw.iso(decision.stop_at) and state["idle_s"] == 0
    time.sleep(0.35)
    watcher.poll()
    watcher.poll()  # warned once
    time.sleep(0.3)
    watcher.poll()
    watcher.poll()  # powered off once
    assert len((tmp_path / "poweroff").read_text().split()) == 1
    out = capsys.readouterr().out.splitlines()
    assert sum("is not answering" in line for line in out) == 1, out
    assert sum("unless there is activity" in line for line in out) == 1, out
    assert sum("powering off: idle" in line for line in out) == 1, out
    state = json.loads((tmp_path / "run" / "state.json").read_text(encoding="utf-8"))
    assert state["reason"].startswith("powering off: idle")
    # a restarted watcher resumes the idle clock from the state file (to the second)
    assert _watcher(tmp_path).since == int(watcher.started)


def test_a_failed_poweroff_is_tried_again(tmp_path, capsys):
    watcher = _watcher(tmp_path, idle_stop_s=0.1, poweroff_command=["false"])
    time.sleep(0.15)
    watcher.poll()
    watcher.poll()
    assert not watcher.powered_off
    assert capsys.readouterr().out.count("false exited 1; trying again") == 2


@pytest.mark.parametrize("cloud", ["gcp", "aws"])
def test_preemption_notices(tmp_path, capsys, terminal, cloud):
    _, master = terminal
    with metadata_standin() as standin:
        urls = {
            "gcp": f"{standin.url}/computeMetadata/v1/instance/preempted",
            "aws": f"{standin.url}/latest/meta-data/spot/instance-action",
        }
        watcher = _watcher(tmp_path, cloud=cloud, name="lab", preemption_urls=urls)
        assert watcher.preemption_notice() is None
        assert not watcher.check_preemption()
        if cloud == "gcp":
            standin.preempt()
        else:
            standin.spot_notice()
        assert watcher.check_preemption() and watcher.preempted
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"gpubake-notebook-idle: spot VM preempted ({cloud}")
    shown = os.read(master, 4096).decode()
    assert (
        "spot VM preempted: /storage is kept; start it again with `gpubake notebook up lab`"
        in shown
    )
    # the metadata server unreachable: no notice, no error
    dead = _watcher(tmp_path, cloud=cloud, preemption_urls={cloud: "http://127.0.0.1:9/x"})
    assert dead.preemption_notice() is None


def test_one_file_of_python_39_and_the_standard_library():
    """The VM's system python runs it as a copied file: no gpubake imports, no syntax newer
    than 3.9, an entry point."""
    source = Path(iw.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported
    assert 'if __name__ == "__main__":\n    sys.exit(main())' in source
    assert source.endswith("\n") and "GPUBAKE_WATCHER_EOF" not in source  # the boot script's


def test_terminal_input_counts_even_where_jupyter_does_not_see_it(tmp_path):
    """An SSH login's typing (its tty's access time) is activity; output (the watcher's own
    notices) is not."""
    assert decide(_status(NOW - 900), tty_input=[NOW - 120, NOW - 3000]).idle_s == 120
    pts = tmp_path / "pts"
    pts.mkdir()
    (pts / "0").write_text("")
    (pts / "ptmx").write_text("")
    os.utime(pts / "0", (NOW - 42, NOW - 1))  # read 42 s ago, written 1 s ago
    assert iw.tty_input_times(str(pts)) == [NOW - 42]
