"""gcsfuse, logging_agent and nvidia_container_toolkit in a Debian 12 container running systemd.

Google's and NVIDIA's repositories and Amazon's bucket cannot be reached from here, so the
roles run whole in check mode (with --diff: the exact files they would write), and the parts
that need no such source run for real: FUSE from Debian and the gcsfuse mount units under
systemd. The install from the unreachable repositories runs only where they answer.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.integration.helpers import ROOT, ansible_env, ansible_playbook, apply, run_in
from tests.integration.systemd_helpers import systemd_container, systemd_image
from tests.integration.test_roles_converge import CA_VARS

pytestmark = pytest.mark.docker
PLAYBOOK = Path(__file__).with_name("role_test.yml")
SOURCES = "/etc/apt/sources.list.d"
GCSFUSE_LINE = (
    "deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
    "https://packages.cloud.google.com/apt gcsfuse-bookworm main"
)
OPS_AGENT_LINE = (
    "deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
    "https://packages.cloud.google.com/apt google-cloud-ops-agent-bookworm-all main"
)
NVIDIA_LINE = (
    "deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] "
    "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH) /"
)


def unreachable(*addresses: tuple[str, int]) -> str | None:
    """None when a TCP connection to each (host, port) opens, else why not."""
    for host, port in addresses:
        try:
            socket.create_connection((host, port), timeout=8).close()
        except OSError as exc:
            return f"{host} is not reachable from here ({exc})"
    return None


@pytest.fixture(autouse=True)
def _pipelining(monkeypatch):
    """One `docker exec` per task instead of several (same modules, same results)."""
    monkeypatch.setenv("ANSIBLE_PIPELINING", "True")


@pytest.fixture(scope="module")
def box(engine):
    """A booted systemd container (its image has Python and apt lists)."""
    with systemd_container(engine, systemd_image(engine)) as booted:
        yield booted


def playbook(tmp_path: Path, steps: list[tuple[str, str, dict]]) -> Path:
    """A play that includes (role, tasks_from, vars) by FQCN; the roles bootstrap themselves."""
    tasks = [
        {
            "name": f"{role} {tasks_from} {json.dumps(variables)}",
            "ansible.builtin.include_role": {
                "name": f"gpubake.gpu.{role}",
                "tasks_from": tasks_from,
            },
            "vars": variables,
        }
        for role, tasks_from, variables in steps
    ]
    play = {
        "name": "Roles under test",
        "hosts": "all",
        "gather_facts": False,
        "tasks": tasks,
    }
    path = tmp_path / "play.yml"
    path.write_text(yaml.safe_dump([play], sort_keys=False), encoding="utf-8")
    return path


def check_mode(box, play: Path) -> str:
    proc = subprocess.run(
        [
            ansible_playbook(),
            "--check",
            "--diff",
            "-i",
            f"{box.name},",
            "-e",
            "ansible_connection=community.docker.docker",
            str(play),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
        env=ansible_env(ANSIBLE_FORCE_COLOR="0"),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def test_all_three_roles_in_check_mode(box, tmp_path):
    """Every task of the three roles (both agent kinds) in check mode, with the diffs."""
    mounts = {"gcsfuse_mounts": [{"bucket": "my-results", "path": "/mnt/result"}]}
    out = check_mode(
        box,
        playbook(
            tmp_path,
            [
                ("gcsfuse", "main", mounts),
                ("logging_agent", "main", {"logging_agent_kind": "gcp"}),
                ("logging_agent", "main", {"logging_agent_kind": "aws"}),
                ("nvidia_container_toolkit", "main", {}),
            ],
        ),
    )
    # the files the roles would write, exactly
    for line in (GCSFUSE_LINE, OPS_AGENT_LINE, NVIDIA_LINE):
        assert f"+{line}" in out, line
    assert "+Options=rw,_netdev,allow_other,implicit_dirs,uid=0,gid=0" in out
    assert "+      type: systemd_journald" in out
    assert "+Pin: version 2.39.0*" in out and "+Pin: version 2.40.0*" in out
    assert "+Pin-Priority: -1" in out
    assert re.search(r'^\+ +"log_group_name": "/gpubake/cloud-init-output.log",$', out, re.M)
    # what check mode cannot do, said plainly
    assert "would download https://packages.cloud.google.com/apt/doc/apt-key.gpg" in out
    assert "would download https://nvidia.github.io/libnvidia-container/gpgkey" in out
    assert "C95B321B61E88C1809C4F759DDCAE044F796ECB0" in out
    assert (
        "would download https://amazoncloudwatch-agent.s3.amazonaws.com/ubuntu/amd64/"
        "1.300072.0b1766/amazon-cloudwatch-agent.deb"
    ) in out
    for package in ("gcsfuse", "google-cloud-ops-agent", "nvidia-container-toolkit"):
        assert f"would install {package} from" in out, package
    # Debian packages are simulated from the real lists (role common's one apt install)
    for packages in ("gpg", "fuse3", "docker.io"):
        task = f"gpubake.gpu.common : Install {packages}"
        assert f"changed: [{box.name}]" in out.split(task)[1].split("TASK")[0], task
    # nothing was written
    _, listing = run_in(box, "ls", SOURCES, "/usr/share/keyrings", "/etc/systemd/system")
    for name in ("gcsfuse.list", "google-cloud-ops-agent.list", "nvidia-container-toolkit.list"):
        assert name not in listing
    assert "cloud.google.asc" not in listing and "mnt-result.mount" not in listing


def test_gcsfuse_fuse_and_mount_units_for_real(box, tmp_path):
    """FUSE from Debian and the mount units, converged twice under systemd."""
    variables = {
        "gcsfuse_fuse_user_allow_other": True,
        "gcsfuse_mounts": [
            {"bucket": "my-results", "path": "/mnt/result", "owner": "www-data"},
            {
                "bucket": "my-datasets",
                "path": "/mnt/my-dataset",
                "read_only": True,
                "options": ["only_dir=imagenet"],
            },
        ],
    }
    play = playbook(tmp_path, [("gcsfuse", "fuse.yml", {}), ("gcsfuse", "mounts.yml", {})])
    first, _ = apply(box, play, variables)
    second, output = apply(box, play, variables)
    assert first["changed"] > 0
    assert second["changed"] == 0, output[-4000:]

    rc, conf = run_in(box, "grep", "-x", "user_allow_other", "/etc/fuse.conf")
    assert rc == 0, conf
    expected = {
        "/mnt/result": ("my-results", "rw,_netdev,allow_other,implicit_dirs,uid=33,gid=33"),
        "/mnt/my-dataset": (
            "my-datasets",
            "ro,_netdev,allow_other,implicit_dirs,uid=0,gid=0,only_dir=imagenet",
        ),
    }
    for path, (bucket, options) in expected.items():
        _, unit = run_in(box, "systemd-escape", "--path", "--suffix=mount", path)
        unit = unit.strip()
        rc, out = run_in(box, "systemd-analyze", "verify", f"/etc/systemd/system/{unit}")
        assert rc == 0, out
        _, enabled = run_in(box, "systemctl", "is-enabled", unit)
        assert enabled.strip() == "enabled", unit
        _, shown = run_in(box, "systemctl", "show", "-p", "What,Where,Type,Options", unit)
        props = dict(line.split("=", 1) for line in shown.strip().splitlines())
        assert props == {"What": bucket, "Where": path, "Type": "gcsfuse", "Options": options}
        # enabled for boot, not mounted during the build
        _, active = run_in(box, "systemctl", "is-active", unit)
        assert active.strip() == "inactive"


GOOGLE = ("packages.cloud.google.com", 443)


@pytest.mark.parametrize(
    ("roles", "needs", "variables"),
    [
        (["gcsfuse"], [GOOGLE], {}),
        (["logging_agent"], [GOOGLE], {"logging_agent_kind": "gcp"}),
        # Docker itself does not run in this unprivileged container: the runtime
        # registration is covered by check mode and the unit tests
        (
            ["nvidia_container_toolkit"],
            [("nvidia.github.io", 443)],
            {"nvidia_container_toolkit_configure_docker": False},
        ),
        # fetch-config -m ec2 reads the instance metadata: only on EC2
        (
            ["logging_agent"],
            [("amazoncloudwatch-agent.s3.amazonaws.com", 443), ("169.254.169.254", 80)],
            {"logging_agent_kind": "aws"},
        ),
    ],
    ids=["gcsfuse", "ops-agent", "nvidia-container-toolkit", "cloudwatch-agent"],
)
def test_install_for_real_where_the_source_is_reachable(engine, roles, needs, variables):
    why = unreachable(*needs)
    if why is not None:
        pytest.skip(why)
    variables = {"roles_under_test": ["build_ca", *roles], **CA_VARS, **variables}
    with systemd_container(engine, systemd_image(engine)) as fresh:
        first, _ = apply(fresh, PLAYBOOK, variables)
        second, output = apply(fresh, PLAYBOOK, variables)
    assert first["changed"] > 0
    assert second["changed"] == 0, output[-4000:]
