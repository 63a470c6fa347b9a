"""The image's CycloneDX SBOM: role manifest's write_sbom.py on a fake root (dpkg status,
os-release, site-packages, the lock's pins), the plans that pass its path and the lock, and
`gpubake sbom`. Pure: no engine."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL

from gpubake import cli
from gpubake.build import plan, stages
from gpubake.build.locks import Lock
from gpubake.publish import sbom as sbom_mod
from gpubake.stacks import resolve

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "roles" / "manifest" / "files" / "write_sbom.py"
TORCH_HASHES = ["sha256:" + "a" * 64, "sha256:" + "b" * 64]
PINS = {
    "torch": {"version": "2.15.0+cu132", "hashes": TORCH_HASHES},
    "typing-extensions": {"version": "4.15.0", "hashes": ["sha256:" + "c" * 64]},
    "numpy": {"version": "2.3.4", "hashes": ["sha256:" + "d" * 64]},  # installed: 2.3.3
}
DPKG_STATUS = """\
Package: python3
Status: install ok installed
Priority: optional
Architecture: amd64
Multi-Arch: allowed
Version: 3.11.2-1+b1
Description: interactive high-level object-oriented language (default version)
 Python, the high-level, interactive object oriented language,
 Package: not-a-package
 Version: 0

Package: libc6
Status: install ok installed
Architecture: amd64
Version: 2.36-9+deb12u13
Conffiles:
 /etc/ld.so.conf.d/x86_64-linux-gnu.conf abc

Package: libc6
Status: install ok installed
Architecture: i386
Version: 2.36-9+deb12u13

Package: tzdata
Status: install ok installed
Architecture: all
Version: 2025b-0+deb12u2

Package: removed-one
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1

Package: perl-base
Status: install ok installed
Architecture: amd64
Version: 1:5.36.0-7+deb12u3
"""
OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'


def _load_script():
    spec = importlib.util.spec_from_file_location("write_sbom", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dist(site: Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
    )


@pytest.fixture
def fake_root(tmp_path):
    site = tmp_path / "env" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    for name, version in [
        ("torch", "2.15.0+cu132"),
        ("typing_extensions", "4.15.0"),
        ("numpy", "2.3.3"),
        ("Jinja2", "3.1.6"),
    ]:
        _dist(site, name, version)
    (tmp_path / "status").write_text(DPKG_STATUS, encoding="utf-8")
    (tmp_path / "os-release").write_text(OS_RELEASE, encoding="utf-8")
    (tmp_path / "pins.json").write_text(json.dumps(PINS), encoding="utf-8")
    return tmp_path


def _run(root: Path, *extra: str) -> bytes:
    build = {"stack": "pytorch", "target": "docker", "gpubake_version": "0.1.0", "cuda": "13.2"}
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dpkg-status",
            str(root / "status"),
            "--os-release",
            str(root / "os-release"),
            "--site-packages",
            str(root / "env" / "lib" / "python3.11" / "site-packages"),
            "--build",
            json.dumps(build),
            *extra,
        ],
        capture_output=True,
        check=True,
    )
    return proc.stdout


def _by_purl(document):
    return {c["purl"]: c for c in document["components"]}


def test_sbom_lists_locked_python_packages_with_the_locks_hashes(fake_root):
    document = json.loads(_run(fake_root, "--lock-pins", str(fake_root / "pins.json")))
    found = _by_purl(document)
    torch = found["pkg:pypi/torch@2.15.0%2Bcu132"]
    assert torch["name"] == "torch" and torch["version"] == "2.15.0+cu132"
    assert torch["hashes"] == [{"alg": "SHA-256", "content": h[7:]} for h in TORCH_HASHES]
    assert torch["type"] == "library"
    # names normalized as the lock and pypi purls spell them
    assert "hashes" in found["pkg:pypi/typing-extensions@4.15.0"]
    # installed at another version than the lock's: no hash claimed
    assert "hashes" not in found["pkg:pypi/numpy@2.3.3"]
    # not in the lock at all: listed, without hashes
    assert "hashes" not in found["pkg:pypi/jinja2@3.1.6"]
    assert found["pkg:pypi/jinja2@3.1.6"]["name"] == "Jinja2"


def test_sbom_lists_dpkgs_installed_packages_with_purls(fake_root):
    document = json.loads(_run(fake_root))
    debs = {c["purl"]: c for c in document["components"] if c["purl"].startswith("pkg:deb/")}
    python3 = debs["pkg:deb/debian/python3@3.11.2-1%2Bb1?arch=amd64&distro=debian-12"]
    assert python3["name"] == "python3" and python3["version"] == "3.11.2-1+b1"
    names = sorted(c["name"] for c in debs.values())
    # both architectures of libc6; not the removed package, nor description lines
    assert names == ["libc6", "libc6", "perl-base", "python3", "tzdata"]
    for component in debs.values():
        purl = PackageURL.from_string(component["purl"])
        assert purl.version == component["version"] and purl.name == component["name"]
        assert purl.qualifiers["distro"] == "debian-12"
        expected = PackageURL(
            type="deb",
            namespace="debian",
            name=purl.name,
            version=purl.version,
            qualifiers=purl.qualifiers,
        )
        assert component["purl"] == expected.to_string()  # encoded as packageurl encodes
    # an epoch's ':' kept, '+' encoded
    assert "pkg:deb/debian/perl-base@1:5.36.0-7%2Bdeb12u3?arch=amd64&distro=debian-12" in debs
    assert "pkg:deb/debian/tzdata@2025b-0%2Bdeb12u2?arch=all&distro=debian-12" in debs


@pytest.mark.parametrize("schema", [SchemaVersion.V1_6])
def test_sbom_validates_against_the_cyclonedx_schema(fake_root, schema):
    text = _run(fake_root, "--lock-pins", str(fake_root / "pins.json")).decode()
    document = json.loads(text)
    assert document["bomFormat"] == "CycloneDX" and document["specVersion"] == "1.6"
    assert document["metadata"]["component"]["name"] == "gpubake/pytorch"
    assert document["metadata"]["component"]["type"] == "container"
    assert document["metadata"]["tools"]["components"][0]["name"] == "gpubake"
    errors = JsonStrictValidator(schema).validate_str(text)
    assert errors is None, errors
    # the validator does catch a broken document
    broken = {**document, "components": [{"type": "library"}]}
    assert JsonStrictValidator(schema).validate_str(json.dumps(broken)) is not None


def test_sbom_is_the_same_for_the_same_inputs(fake_root, tmp_path):
    pins = str(fake_root / "pins.json")
    first = _run(fake_root, "--lock-pins", pins)
    assert _run(fake_root, "--lock-pins", pins) == first
    out = tmp_path / "sbom.json"
    _run(fake_root, "--lock-pins", pins, "--out", str(out))
    assert out.read_bytes() == first
    # another input, another document and serial number
    other = json.loads(_run(fake_root))
    assert other["serialNumber"] != json.loads(first)["serialNumber"]
    assert json.loads(first)["serialNumber"].startswith("urn:uuid:")


def test_sbom_of_an_image_without_dpkg_or_lock(fake_root):
    """A missing dpkg status (not a Debian-like OS) and no lock: the Python packages only."""
    (fake_root / "status").unlink()
    module = _load_script()
    document = module.sbom(
        dpkg_status=fake_root / "status",
        os_release_path=fake_root / "nowhere",
        site_packages=[fake_root / "env" / "lib" / "python3.11" / "site-packages"],
        pins={},
        build={},
    )
    assert {c["purl"].split("/")[0] for c in document["components"]} == {"pkg:pypi"}
    assert all("hashes" not in c for c in document["components"])
    assert document["metadata"]["component"]["type"] == "operating-system"
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(document)) is None


# --- plans ------------------------------------------------------------------------------------


def _lock():
    text = "torch==2.15.0 \\\n    --hash=sha256:" + "e" * 64 + "\n"
    pins = {"torch": ("2.15.0", ("sha256:" + "e" * 64,))}
    return Lock(Path("x.txt"), text, pins, hashlib.sha256(text.encode()).hexdigest())


def _plan(target="docker", **kwargs):
    return plan.make_plan(
        resolve(),
        target=target,
        base_image="gpubake/base:debian-12",
        base_image_id="sha256:abc",
        **kwargs,
    )


def test_docker_plan_labels_the_sbom_and_passes_its_path():
    docker = _plan()
    assert docker.labels[plan.SBOM_LABEL] == plan.SBOM_PATH == "/etc/gpubake/sbom.cdx.json"
    changes = docker.packer_vars["docker_changes"]
    assert f"LABEL {plan.SBOM_LABEL}={json.dumps(plan.SBOM_PATH)}" in changes
    assert docker.ansible_vars["manifest_sbom_path"] == plan.SBOM_PATH
    assert docker.ansible_vars["manifest_lock_pins"] == {}


@pytest.mark.parametrize("target", ["gcp-image", "aws-ami", "ssh"])
def test_vm_and_host_plans_pass_the_sbom_path_and_the_lock(target):
    kwargs = {"cloud": plan.CloudOptions(project="p", zone="z")} if target == "gcp-image" else {}
    without = _plan(target, **kwargs)
    assert without.ansible_vars["manifest_sbom_path"] == plan.SBOM_PATH
    assert without.ansible_vars["manifest_lock_pins"] == {}
    label = without.labels["gpubake-sbom"]
    assert label == (plan.SBOM_PATH if target != "gcp-image" else "_etc_gpubake_sbom_cdx_json")
    locked = _plan(target, lock=_lock(), **kwargs)
    assert locked.ansible_vars["manifest_lock_pins"] == {
        "torch": {"version": "2.15.0", "hashes": ["sha256:" + "e" * 64]}
    }
    assert locked.input_hash != without.input_hash  # a new lock, a new image


def test_the_finish_stage_gets_its_stacks_lock_and_its_hash_covers_it():
    def chain(lock):
        def plan_for(level):
            return plan.make_plan(
                level, base_image="gpubake/base:debian-12", base_image_id="sha256:abc"
            )

        return stages.plan_chain(resolve(), plan_for, {"pytorch": lock}, uv_cache=None)

    lock = _lock()
    stages_ = chain(lock)
    final = stages_[-1]
    assert "manifest" in final.roles
    assert final.plan.ansible_vars["manifest_lock_pins"] == plan.lock_pins(lock)
    assert final.plan.ansible_vars["manifest_sbom_path"] == plan.SBOM_PATH
    assert final.plan.labels[plan.SBOM_LABEL] == plan.SBOM_PATH
    other_text = lock.text.replace("e" * 64, "f" * 64)
    other = Lock(
        Path("x.txt"),
        other_text,
        {"torch": ("2.15.0", ("sha256:" + "f" * 64,))},
        hashlib.sha256(other_text.encode()).hexdigest(),
    )
    assert chain(other)[-1].input_hash != final.input_hash


# --- gpubake sbom -----------------------------------------------------------------------------


class _Image:
    def __init__(self, labels):
        self.labels = labels
        self.id = "sha256:" + "0" * 64


class _Images:
    def __init__(self, found):
        self.found = found

    def get(self, ref):
        import docker.errors

        if ref not in self.found:
            raise docker.errors.ImageNotFound(ref)
        return self.found[ref]


class _Engine:
    def __init__(self, found):
        self.images = _Images(found)


def _cli(monkeypatch, found, *args):
    from gpubake.build import docker_engine

    monkeypatch.setattr(docker_engine, "client", lambda: _Engine(found))
    return CliRunner().invoke(cli.cli, ["sbom", *args], standalone_mode=False)


def test_sbom_command_prints_the_file_its_label_names(monkeypatch, tmp_path):
    from gpubake.build import docker_engine

    body = b'{"bomFormat": "CycloneDX"}\n'
    read = []

    def fake_read(engine, ref, path):
        read.append((ref, path))
        return body

    monkeypatch.setattr(docker_engine, "read_image_file", fake_read)
    image = _Image({plan.SBOM_LABEL: plan.SBOM_PATH})
    result = _cli(monkeypatch, {"gpubake/pytorch:t": image}, "gpubake/pytorch:t")
    assert result.exception is None, result.output
    assert result.stdout_bytes == body
    assert read == [("gpubake/pytorch:t", plan.SBOM_PATH)]
    out = tmp_path / "sbom.json"
    result = _cli(monkeypatch, {"x:t": image}, "x:t", "--out", str(out))
    assert result.exception is None and out.read_bytes() == body


def test_sbom_command_without_label_or_image_says_so_in_one_line(monkeypatch, capsys):
    result = _cli(monkeypatch, {"old:t": _Image({})}, "old:t")
    assert isinstance(result.exception, sbom_mod.SbomError)
    message = str(result.exception)
    assert "old:t has no SBOM" in message and "rebuild it with this gpubake" in message
    assert "\n" not in message
    result = _cli(monkeypatch, {}, "missing:t")
    assert isinstance(result.exception, sbom_mod.SbomError)
    assert "no local image missing:t" in str(result.exception)
    # through gpubake's main: one line, exit 1
    from gpubake.build import docker_engine

    monkeypatch.setattr(docker_engine, "client", lambda: _Engine({"old:t": _Image(None)}))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sbom", "old:t"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("gpubake: error: old:t has no SBOM") and err.count("\n") == 1
