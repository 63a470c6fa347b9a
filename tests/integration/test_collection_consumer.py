"""gpubake's roles used from a stranger's playbook: the collection tarball installed with
--offline into a consumer project outside the repository, whose ansible.cfg has no roles_path
or library, converging a Debian 12 container with roles called by FQCN."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.collection import BIN, ROOT, build_tarball, install_offline
from tests.integration.helpers import HOST_BUNDLE, base_image, container, run_in

pytestmark = pytest.mark.docker
CA_ENV_NAMES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE")
_RECAP_RE = re.compile(r"ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")

PLAYBOOK = """\
---
# A consumer's own playbook: gpubake's roles by FQCN, nothing gathered beforehand.
- name: A GPU workstation userland from gpubake's roles
  hosts: all
  gather_facts: false
  environment: "{{ build_ca_environment | default({}) }}"
  roles:
    - role: gpubake.gpu.build_ca
    - role: gpubake.gpu.base
    - role: gpubake.gpu.python_env
    - role: gpubake.gpu.gpu_smoke_test
    - role: gpubake.gpu.manifest
      vars:
        manifest_build: {stack: consumer}
"""


@pytest.fixture(scope="module")
def consumer(tmp_path_factory) -> Path:
    """A project outside the checkout: ansible.cfg, requirements.yml, group_vars, playbook."""
    project = tmp_path_factory.mktemp("consumer")
    assert not project.resolve().is_relative_to(ROOT)
    tarball = build_tarball(tmp_path_factory.mktemp("dist"))
    (project / "ansible.cfg").write_text(
        "[defaults]\ncollections_path = ./collections\nretry_files_enabled = False\n"
    )
    (project / "requirements.yml").write_text(
        f"---\ncollections:\n  - name: {tarball}\n    type: file\n"
    )
    (project / "site.yml").write_text(PLAYBOOK)
    # this machine reaches PyPI through a TLS-inspecting proxy: trust its CA during the run
    (project / "group_vars").mkdir()
    ca_env = dict.fromkeys(CA_ENV_NAMES, "/run/gpubake-build/ca-bundle.crt")
    (project / "group_vars" / "all.yml").write_text(
        yaml.safe_dump({"build_ca_bundle": str(HOST_BUNDLE), "build_ca_environment": ca_env})
    )
    install_offline(project / "requirements.yml", project / "collections", cwd=project)
    return project


def play(project: Path, box, *extra: str) -> tuple[dict[str, int], str]:
    """ansible-playbook as the consumer runs it: their directory, their config, no gpubake env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env["ANSIBLE_FORCE_COLOR"] = "0"
    proc = subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            f"{box.name},",
            "-e",
            "ansible_connection=community.docker.docker",
            *extra,
            "site.yml",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
        cwd=project,
        check=False,
    )
    output = proc.stdout + proc.stderr
    matches = _RECAP_RE.findall(output)
    assert proc.returncode == 0 and matches, output[-6000:]
    ok, changed, unreachable, failed = (int(x) for x in matches[-1])
    return {"ok": ok, "changed": changed, "unreachable": unreachable, "failed": failed}, output


def test_consumer_config_knows_nothing_of_gpubake(consumer):
    cfg = (consumer / "ansible.cfg").read_text()
    assert "roles_path" not in cfg and "library" not in cfg
    installed = consumer / "collections" / "ansible_collections" / "gpubake" / "gpu"
    assert (installed / "roles" / "gpu_smoke_test" / "files" / "gpu_smoke.py").is_file()


def test_consumer_playbook_converges_twice(engine, consumer):
    with container(engine, base_image(engine)) as box:
        first, _ = play(consumer, box)
        second, output = play(consumer, box)
        assert first["changed"] > 0
        assert second["changed"] == 0 and second["failed"] == 0, output[-4000:]
        rc, out = run_in(box, "/opt/gpubake/env/bin/python", "-c", "import sys; print(sys.prefix)")
        assert rc == 0 and out.strip() == "/opt/gpubake/env", out
        rc, out = run_in(box, "/usr/local/bin/uv", "--version")
        uv = yaml.safe_load((ROOT / "roles/python_env/defaults/main.yml").read_text())
        assert rc == 0 and out.startswith(f"uv {uv['python_env_uv_version']}"), out
        rc, out = run_in(box, "cat", "/etc/gpubake/manifest.json")
        manifest = json.loads(out)
        assert manifest["stack"] == "consumer"
        assert manifest["python"].startswith("3.11")
        assert manifest["python_prefix"] == "/opt/gpubake/env"
        rc, out = run_in(box, "/usr/local/bin/gpu-smoke", "--json", "--framework", "none")
        assert rc == 0, out
        assert json.loads(out)["gpu_visible"] is False, out


def test_consumer_check_mode_on_a_fresh_host_reports_what_it_would_add(engine, consumer):
    with container(engine, base_image(engine)) as box:
        # a fresh host with python3 (check mode can install nothing, Python included) and
        # without python3-apt or apt lists, as many cloud images come
        rc, out = run_in(
            box,
            "sh",
            "-c",
            "apt-get update -q && apt-get install -y -q --no-install-recommends python3"
            " && rm -rf /var/lib/apt/lists/*",
        )
        assert rc == 0, out
        recap, output = play(consumer, box, "--check")
        assert recap["failed"] == 0 and recap["changed"] > 0
        would = [line for line in output.splitlines() if "check mode: would install" in line]
        assert any("tmux" in line and "git" in line for line in would), output[-6000:]
        rc, _ = run_in(box, "test", "-e", "/opt/gpubake/env")
        assert rc != 0, "check mode must not create the environment"
        rc, _ = run_in(box, "test", "-e", "/usr/local/bin/gpu-smoke")
        assert rc != 0, "check mode must not install gpu-smoke"
