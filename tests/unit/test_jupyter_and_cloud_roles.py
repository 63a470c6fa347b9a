"""Roles jupyter, gcsfuse, logging_agent and nvidia_container_toolkit without an engine.

Expressions and templates are rendered by Ansible's own template engine from the roles'
files (defaults, then vars/main.yml, then the test's values, as a play would), so what is
checked here is what a build writes: apt source lines, keyrings, fingerprint and version
rules, the deny-list, unit files and agent configurations.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template

ROOT = Path(__file__).resolve().parents[2]
ROLES = ROOT / "roles"
FACTS = {
    "distribution": "Debian",
    "distribution_release": "bookworm",
    "architecture": "x86_64",
    "service_mgr": "systemd",
    "getent_passwd": {
        "root": ["x", "0", "0", "root", "/root", "/bin/bash"],
        "gpubake": ["x", "1000", "1000", "", "/home/gpubake", "/bin/bash"],
    },
}
# Cross-checked when pinned (see the roles' READMEs): NVIDIA's libnvidia-container key, and
# the two keys of https://packages.cloud.google.com/apt/doc/apt-key.gpg.
NVIDIA_KEY = "C95B321B61E88C1809C4F759DDCAE044F796ECB0"
GOOGLE_KEYS = [
    "A362B822F6DEDC652817EA46B53DC80D13EDEF05",
    "35BAA0B33E9EB396F59CA838C0BA5CE6DC6315A3",
]


def _trusted(value: Any) -> Any:
    if isinstance(value, str):
        return trust_as_template(value)
    if isinstance(value, dict):
        return {k: _trusted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_trusted(v) for v in value]
    return value


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def templar(role: str, facts: dict | None = None, **values: Any) -> Templar:
    """Ansible's templar over the role's defaults < vars/main.yml < values."""
    variables: dict[str, Any] = {}
    for layer in ("defaults", "vars"):
        path = ROLES / role / layer / "main.yml"
        if path.exists():
            variables.update(_trusted(_yaml(path)))
    variables.update(values)
    variables["ansible_facts"] = {**FACTS, **(facts or {})}
    variables.setdefault("ansible_managed", "Ansible managed")
    variables.setdefault("ansible_check_mode", False)
    return Templar(loader=DataLoader(), variables=variables)


def render(role: str, expression: str, facts: dict | None = None, **values: Any) -> Any:
    return templar(role, facts, **values).template(trust_as_template(expression))


def render_file(role: str, name: str, facts: dict | None = None, **values: Any) -> str:
    text = (ROLES / role / "templates" / name).read_text(encoding="utf-8")
    return render(role, text, facts, **values)


def task_files(role: str) -> list[Path]:
    return [*sorted((ROLES / role / "tasks").glob("*.yml")), ROLES / role / "handlers/main.yml"]


# ---------------------------------------------------------------- one copy of each fingerprint


def test_fingerprints_live_in_the_roles_defaults_only():
    nvidia = _yaml(ROLES / "nvidia_container_toolkit/defaults/main.yml")
    gcsfuse = _yaml(ROLES / "gcsfuse/defaults/main.yml")
    agent = _yaml(ROLES / "logging_agent/defaults/main.yml")
    assert nvidia["nvidia_container_toolkit_key_fingerprints"] == [NVIDIA_KEY]
    assert gcsfuse["gcsfuse_key_fingerprints"] == GOOGLE_KEYS
    # the Ops Agent is served from the same repository host with the same keys
    assert agent["logging_agent_gcp_key_fingerprints"] == gcsfuse["gcsfuse_key_fingerprints"]
    assert agent["logging_agent_gcp_keyring"] == gcsfuse["gcsfuse_keyring"]
    assert agent["logging_agent_gcp_key_url"] == gcsfuse["gcsfuse_key_url"]
    for role in ("nvidia_container_toolkit", "gcsfuse", "logging_agent", "jupyter"):
        for path in [*task_files(role), ROLES / role / "vars/main.yml"]:
            if path.exists():
                text = path.read_text(encoding="utf-8").upper()
                for key in [NVIDIA_KEY, *GOOGLE_KEYS]:
                    assert key not in text, f"{path}: fingerprint outside defaults/main.yml"


@pytest.mark.parametrize(
    ("role", "seen", "trusted"),
    [
        ("nvidia_container_toolkit", [], False),
        ("nvidia_container_toolkit", [NVIDIA_KEY], True),
        ("nvidia_container_toolkit", [NVIDIA_KEY, GOOGLE_KEYS[0]], False),
        ("nvidia_container_toolkit", [GOOGLE_KEYS[0]], False),
        ("gcsfuse", GOOGLE_KEYS, True),
        ("gcsfuse", GOOGLE_KEYS[1:], True),
        ("gcsfuse", [*GOOGLE_KEYS, NVIDIA_KEY], False),
        ("logging_agent", GOOGLE_KEYS, True),
        ("logging_agent", [NVIDIA_KEY], False),
    ],
)
def test_a_key_is_trusted_only_when_every_primary_key_is_pinned(role, seen, trusted):
    """The one trust rule (role common) with each role's own pins."""
    prefix = "logging_agent_gcp" if role == "logging_agent" else role
    pins = _yaml(ROLES / role / "defaults/main.yml")[f"{prefix}_key_fingerprints"]
    result = render(
        "common",
        "{{ __common_repo_key_trusted }}",
        common_repo_key_fingerprints=pins,
        __common_repo_key_seen=seen,
    )
    assert result is trusted


def test_pins_written_in_lower_case_or_with_spaces_still_match():
    spaced = " ".join(NVIDIA_KEY[i : i + 4] for i in range(0, 40, 4)).lower()
    result = render(
        "common",
        "{{ __common_repo_key_trusted }}",
        common_repo_key_fingerprints=[spaced],
        __common_repo_key_seen=[NVIDIA_KEY],
    )
    assert result is True


@pytest.mark.parametrize(
    ("keyring", "armored"),
    [
        ("/usr/share/keyrings/cloud.google.asc", True),
        ("/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg", False),
    ],
)
def test_keyring_is_armored_only_when_named_asc(keyring, armored):
    assert render("common", "{{ __common_repo_armored }}", common_repo_keyring=keyring) is armored


def test_the_three_repositories_pin_their_keys_through_the_one_copy():
    for role, tasks in (
        ("gcsfuse", "install.yml"),
        ("logging_agent", "gcp.yml"),
        ("nvidia_container_toolkit", "install.yml"),
    ):
        steps = _yaml(ROLES / role / "tasks" / tasks)
        uses = [
            t["vars"]
            for t in steps
            if t.get("ansible.builtin.include_role", {}).get("tasks_from") == "signed_repo.yml"
        ]
        assert len(uses) == 1, role
        prefix = "logging_agent_gcp" if role == "logging_agent" else role
        assert uses[0]["common_repo_key_fingerprints"] == f"{{{{ {prefix}_key_fingerprints }}}}"
        assert uses[0]["common_repo_key_variable"] == f"{prefix}_key_fingerprints"


@pytest.fixture(scope="module")
def test_key(tmp_path_factory) -> dict[str, str]:
    """An armored test key with a signing primary key and an encryption subkey."""
    gpg = shutil.which("gpg")
    if gpg is None:
        pytest.skip("gpg is not installed")
    tmp = tmp_path_factory.mktemp("gpg")
    home = tmp / "home"
    home.mkdir(mode=0o700)
    base = [gpg, "--batch", "--homedir", str(home), "--passphrase", ""]
    try:
        subprocess.run(
            [*base, "--quick-gen-key", "gpubake test <t@example.org>", "ed25519", "sign", "never"],
            check=True,
            capture_output=True,
        )
        listing = subprocess.run(
            [*base, "--with-colons", "--list-keys"], check=True, capture_output=True, text=True
        ).stdout
        primary = next(line.split(":")[9] for line in listing.splitlines() if line[:4] == "fpr:")
        subprocess.run(
            [*base, "--quick-add-key", primary, "cv25519", "encr", "never"],
            check=True,
            capture_output=True,
        )
        armored = subprocess.run(
            [*base, "--armor", "--export"], check=True, capture_output=True
        ).stdout
    finally:
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "all"], check=False, capture_output=True
        )
    key = tmp / "key.asc"
    key.write_bytes(armored)
    return {"primary": primary, "path": str(key)}


def _bash(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script],
        env={"PATH": os.environ["PATH"], "HOME": "/nonexistent", **env},
        capture_output=True,
        text=True,
        check=False,
    )


SCRIPT = ROLES / "common" / "files" / "key_fingerprints.sh"


def test_fingerprint_script_prints_primary_keys_only(test_key, tmp_path):
    out = _bash(f'sh {SCRIPT} "$GPUBAKE_KEY"', GPUBAKE_KEY=test_key["path"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [test_key["primary"]], "the subkey must not be listed"
    missing = _bash(f'sh {SCRIPT} "$GPUBAKE_KEY"', GPUBAKE_KEY=str(tmp_path / "none.gpg"))
    assert (missing.returncode, missing.stdout) == (0, "")
    assert not (tmp_path / ".gnupg").exists()


def test_dearmor_step_writes_a_binary_keyring_with_the_same_key(test_key, tmp_path):
    tasks = _yaml(ROLES / "common/tasks/signed_repo.yml")
    block = next(t for t in tasks if "block" in t)["block"]
    dearmor = next(t for t in block if t["name"].startswith("Dearmor"))
    keyring = tmp_path / "nvidia-container-toolkit-keyring.gpg"
    out = _bash(
        dearmor["ansible.builtin.shell"]["cmd"],
        GPUBAKE_KEY=test_key["path"],
        GPUBAKE_KEYRING=str(keyring),
    )
    assert out.returncode == 0, out.stderr
    assert not keyring.read_bytes().startswith(b"-----BEGIN")
    assert oct(keyring.stat().st_mode & 0o777) == "0o644"
    assert _bash(f"sh {SCRIPT} {keyring}").stdout.split() == [test_key["primary"]]


# ---------------------------------------------------------------- nvidia_container_toolkit


def test_nvidia_source_line_keyring_and_list_file():
    role = "nvidia_container_toolkit"
    assert render(role, "{{ __nvidia_container_toolkit_apt_source }}") == (
        "deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] "
        "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH) /"
    )
    assert render(role, "{{ __nvidia_container_toolkit_list }}") == (
        "/etc/apt/sources.list.d/nvidia-container-toolkit.list"
    )
    assert render(role, "{{ nvidia_container_toolkit_key_url }}") == (
        "https://nvidia.github.io/libnvidia-container/gpgkey"
    )


def test_nvidia_packages_unpinned_and_pinned_together():
    role = "nvidia_container_toolkit"
    expr = "{{ __nvidia_container_toolkit_packages }}"
    assert render(role, expr) == ["nvidia-container-toolkit"]
    assert render(role, expr, nvidia_container_toolkit_version="1.17.8-1") == [
        "nvidia-container-toolkit=1.17.8-1",
        "nvidia-container-toolkit-base=1.17.8-1",
        "libnvidia-container-tools=1.17.8-1",
        "libnvidia-container1=1.17.8-1",
    ]


@pytest.mark.parametrize(
    ("daemon_json", "has_runtime"),
    [
        ("", False),
        ("{}", False),
        ('{"runtimes": null}', False),
        ('{"log-driver": "json-file", "runtimes": {"runc": {"path": "runc"}}}', False),
        ('{"runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}}}', True),
    ],
)
def test_docker_is_configured_only_when_daemon_json_lacks_the_runtime(daemon_json, has_runtime):
    result = render(
        "nvidia_container_toolkit",
        "{{ __nvidia_container_toolkit_docker_has_runtime }}",
        __nvidia_container_toolkit_daemon_json_text=daemon_json,
    )
    assert result is has_runtime


# ---------------------------------------------------------------- gcsfuse


@pytest.mark.parametrize("codename", ["bookworm", "jammy", "noble"])
def test_gcsfuse_source_line(codename):
    line = render("gcsfuse", "{{ __gcsfuse_apt_source }}", {"distribution_release": codename})
    assert line == (
        "deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
        f"https://packages.cloud.google.com/apt gcsfuse-{codename} main"
    )
    assert render("gcsfuse", "{{ gcsfuse_key_url }}") == (
        "https://packages.cloud.google.com/apt/doc/apt-key.gpg"
    )


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("0.41.10", False),
        ("0.41.9", False),
        ("0.9.1", False),
        ("1:0.41.10", False),
        ("0.41.11", True),
        ("0.41.12", True),
        ("1.0.0", True),
        ("3.4.0", True),
        ("3.4.0-1", True),
    ],
)
def test_gcsfuse_minimum_version(version, ok):
    result = render("gcsfuse", "{{ __gcsfuse_version_ok }}", __gcsfuse_checked_version=version)
    assert result is ok


def test_gcsfuse_package_pin():
    assert render("gcsfuse", "{{ __gcsfuse_package }}") == "gcsfuse"
    assert render("gcsfuse", "{{ __gcsfuse_package }}", gcsfuse_version="3.4.0") == "gcsfuse=3.4.0"


@pytest.mark.parametrize(
    ("path", "unit"),
    [
        ("/mnt/result", "mnt-result.mount"),
        ("/mnt/dataset", "mnt-dataset.mount"),
        ("/mnt/my-data", "mnt-my\\x2ddata.mount"),
        ("/data", "data.mount"),
    ],
)
def test_gcsfuse_unit_names_are_systemd_escaped_paths(path, unit):
    assert render("gcsfuse", "{{ __gcsfuse_unit }}", item={"path": path}) == unit


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/mnt/result", True),
        ("/mnt/my_data.v2", True),
        ("mnt/result", False),
        ("/mnt/result/", False),
        ("/mnt/../etc", False),
        ("/mnt/a b", False),
        ("/", False),
    ],
)
def test_gcsfuse_mount_paths(path, ok):
    assert render("gcsfuse", "{{ p is match(__gcsfuse_path_pattern) }}", p=path) is ok


def test_gcsfuse_mount_unit():
    item = {"bucket": "my-results", "path": "/mnt/result", "owner": "gpubake"}
    unit = render_file("gcsfuse", "gcsfuse.mount.j2", item=item)
    assert "What=my-results\n" in unit
    assert "Where=/mnt/result\n" in unit
    assert "Type=gcsfuse\n" in unit
    assert "Options=rw,_netdev,allow_other,implicit_dirs,uid=1000,gid=1000\n" in unit
    assert "WantedBy=remote-fs.target" in unit
    item = {
        "bucket": "my-datasets",
        "path": "/mnt/dataset",
        "read_only": True,
        "implicit_dirs": False,
        "options": ["only_dir=imagenet"],
    }
    unit = render_file("gcsfuse", "gcsfuse.mount.j2", item=item)
    assert "Options=ro,_netdev,allow_other,uid=0,gid=0,only_dir=imagenet\n" in unit


# ---------------------------------------------------------------- logging_agent


@pytest.mark.parametrize(
    ("version", "denied"),
    [
        ("2.39.0", True),
        ("2.40.0", True),
        ("2.39.0~debian12", True),
        ("2.40.0~ubuntu22.04", True),
        ("1:2.39.0-1", True),
        ("2.39.1", False),
        ("2.41.0", False),
        ("2.58.0~debian12", False),
        ("2.3.9", False),
    ],
)
def test_ops_agent_deny_list(version, denied):
    result = render(
        "logging_agent",
        "{{ __logging_agent_gcp_version_denied }}",
        __logging_agent_gcp_checked_version=version,
    )
    assert result is denied


def test_ops_agent_source_line_package_and_apt_pins():
    role = "logging_agent"
    assert render(role, "{{ __logging_agent_gcp_apt_source }}") == (
        "deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
        "https://packages.cloud.google.com/apt google-cloud-ops-agent-bookworm-all main"
    )
    assert render(role, "{{ __logging_agent_gcp_package }}") == "google-cloud-ops-agent"
    pinned = render(role, "{{ __logging_agent_gcp_package }}", logging_agent_gcp_version="2.58.0")
    assert pinned == "google-cloud-ops-agent=2.58.0*"
    prefs = render_file(role, "ops-agent-denylist.pref.j2")
    stanzas = [s for s in prefs.split("\n\n") if "Package:" in s]
    assert len(stanzas) == 2
    for stanza, version in zip(stanzas, ["2.39.0", "2.40.0"], strict=True):
        assert "Package: google-cloud-ops-agent\n" in stanza
        assert f"Pin: version {version}*\n" in stanza
        assert "Pin-Priority: -1" in stanza


def test_ops_agent_config_collects_journal_syslog_and_gpu_metrics():
    config = yaml.safe_load(render_file("logging_agent", "ops-agent-config.yaml.j2"))
    receivers = config["logging"]["receivers"]
    assert receivers["journald"]["type"] == "systemd_journald"
    assert receivers["syslog"] == {
        "type": "files",
        "include_paths": ["/var/log/messages", "/var/log/syslog"],
    }
    assert config["logging"]["service"]["pipelines"]["default_pipeline"]["receivers"] == [
        "syslog",
        "journald",
    ]
    assert config["metrics"]["receivers"] == {
        "hostmetrics": {"type": "hostmetrics", "collection_interval": "60s"}
    }
    more = yaml.safe_load(
        render_file(
            "logging_agent",
            "ops-agent-config.yaml.j2",
            logging_agent_gcp_dcgm=True,
            logging_agent_gcp_log_paths=["/var/log/train.log"],
        )
    )
    logs = more["logging"]
    assert logs["receivers"]["gpubake_files"]["include_paths"] == ["/var/log/train.log"]
    assert "gpubake_files" in logs["service"]["pipelines"]["default_pipeline"]["receivers"]
    assert more["metrics"]["receivers"]["dcgm"]["type"] == "dcgm"
    assert more["metrics"]["service"]["pipelines"]["default_pipeline"]["receivers"] == [
        "hostmetrics",
        "dcgm",
    ]


@pytest.mark.parametrize(("arch", "deb_arch"), [("x86_64", "amd64"), ("aarch64", "arm64")])
def test_cloudwatch_download_is_versioned_and_pinned(arch, deb_arch):
    role = "logging_agent"
    facts = {"architecture": arch}
    url = render(role, "{{ logging_agent_aws_url }}", facts)
    assert url == (
        f"https://amazoncloudwatch-agent.s3.amazonaws.com/ubuntu/{deb_arch}/1.300072.0b1766/"
        "amazon-cloudwatch-agent.deb"
    )
    sha = render(role, "{{ logging_agent_aws_sha256[__logging_agent_aws_arch] }}", facts)
    assert len(sha) == 64 and int(sha, 16) >= 0


def test_cloudwatch_installed_only_at_the_pinned_version():
    expr = "{{ __logging_agent_aws_installed }}"

    def installed(version: str | None) -> bool:
        packages = {} if version is None else {"amazon-cloudwatch-agent": [{"version": version}]}
        return render("logging_agent", expr, {"packages": packages})

    assert installed(None) is False
    assert installed("1.300072.0b1766-1") is True
    assert installed("1.300049.1b929-1") is False


def test_cloudwatch_config_json():
    text = render_file(
        "logging_agent",
        "cloudwatch-agent.json.j2",
        logging_agent_aws_log_paths=["/var/log/cloud-init-output.log", "/var/log/train.log"],
    )
    config = json.loads(text)
    assert config["logs"]["logs_collected"]["files"]["collect_list"] == [
        {
            "file_path": "/var/log/cloud-init-output.log",
            "log_group_name": "/gpubake/cloud-init-output.log",
            "log_stream_name": "{instance_id}",
        },
        {
            "file_path": "/var/log/train.log",
            "log_group_name": "/gpubake/train.log",
            "log_stream_name": "{instance_id}",
        },
    ]
    metrics = config["metrics"]
    assert metrics["append_dimensions"]["InstanceId"] == "${aws:InstanceId}"
    assert "utilization_gpu" in metrics["metrics_collected"]["nvidia_gpu"]["measurement"]
    assert config["agent"]["metrics_collection_interval"] == 60


def test_cloudwatch_handler_loads_the_json_with_fetch_config():
    handlers = _yaml(ROLES / "logging_agent/handlers/main.yml")
    load = next(h for h in handlers if h["name"] == "Load the CloudWatch agent configuration")
    argv = [render("logging_agent", a) for a in load["ansible.builtin.command"]["argv"]]
    assert argv == [
        "/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl",
        "-a",
        "fetch-config",
        "-m",
        "ec2",
        "-s",
        "-c",
        "file:/opt/aws/amazon-cloudwatch-agent/etc/gpubake.json",
    ]


# ---------------------------------------------------------------- jupyter


def test_jupyter_defaults_hold_no_secret():
    defaults = _yaml(ROLES / "jupyter/defaults/main.yml")
    assert defaults["jupyter_token"] == ""
    assert defaults["jupyter_password_hash"] == ""


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (
            "argon2:$argon2id$v=19$m=10240,t=10,p=8$RWR+xfHWEdy90J3ewwQbQw$"
            "rWGPsEJAvg7HRr0lX8hviOj2NmBlN032TPgXdZBX9gc",
            True,
        ),
        ("sha1:a58051cdbd6c:8ed4e4f4bbfa4a5bd31a0b1a1c1b3c9b7ea1a5ff", True),
        ("correct horse", False),
        ("argon2:", False),
        ('sha1:aa:bb"; import os', False),
    ],
)
def test_jupyter_password_hash_forms(value, ok):
    assert render("jupyter", "{{ v is match(__jupyter_password_hash_pattern) }}", v=value) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [("a" * 32, True), ("0123abcd" * 6, True), ("short", False), ("x" * 31 + '"', False)],
)
def test_jupyter_token_form(value, ok):
    assert render("jupyter", "{{ v is match(__jupyter_token_pattern) }}", v=value) is ok


class _Section:
    def __getattr__(self, name: str) -> _Section:
        section = _Section()
        object.__setattr__(self, name, section)
        return section


def _load_config(text: str) -> _Section:
    c = _Section()
    exec(compile(text, "jupyter_server_config.py", "exec"), {"get_config": lambda: c})  # noqa: S102
    return c


def test_jupyter_config_generates_a_token_per_machine(tmp_path):
    token_file = tmp_path / "gpubake-token"
    text = render_file("jupyter", "jupyter_server_config.py.j2", jupyter_token_file=str(token_file))
    first = _load_config(text)
    assert (first.ServerApp.ip, first.ServerApp.port) == ("127.0.0.1", 8888)
    assert first.ServerApp.port_retries == 0
    assert first.ServerApp.root_dir == "/home/gpubake/notebooks"
    token = first.IdentityProvider.token
    assert len(token) == 48 and token_file.read_text().strip() == token
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert _load_config(text).IdentityProvider.token == token, "the same machine keeps its token"
    Path(f"{token_file}.machine-id").write_text("another machine\n")
    assert _load_config(text).IdentityProvider.token != token, "a new machine gets a new one"


def test_jupyter_config_with_a_token_or_a_password_hash():
    token = "t" * 40
    text = render_file("jupyter", "jupyter_server_config.py.j2", jupyter_token=token)
    with_token = _load_config(text)
    assert with_token.IdentityProvider.token == token
    hashed = "sha1:a58051cdbd6c:8ed4e4f4bbfa4a5bd31a0b1a1c1b3c9b7ea1a5ff"
    text = render_file("jupyter", "jupyter_server_config.py.j2", jupyter_password_hash=hashed)
    with_password = _load_config(text)
    assert with_password.PasswordIdentityProvider.hashed_password == hashed
    assert with_password.IdentityProvider.token == ""
    assert "machine_token" not in text


def test_jupyter_unit_runs_the_env_as_the_user_with_the_config():
    unit = render_file("jupyter", "jupyter.service.j2", python_env_prefix="/opt/gpubake/env")
    assert "User=gpubake\n" in unit
    assert (
        "ExecStart=/opt/gpubake/env/bin/jupyter-lab "
        "--config=/etc/gpubake/jupyter/jupyter_server_config.py\n"
    ) in unit
    assert "WorkingDirectory=/home/gpubake/notebooks\n" in unit
    assert "WantedBy=multi-user.target" in unit
