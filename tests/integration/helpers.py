"""Helpers for the Docker Engine tests: run containers that always go away, apply playbooks."""

from __future__ import annotations

import fcntl
import io
import ipaddress
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import docker

from gpubake import stacks
from gpubake.build import locks

ROOT = Path(__file__).resolve().parents[2]
HOST_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
_RECAP_RE = re.compile(r"ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


@contextmanager
def suite_lock(name: str) -> Iterator[None]:
    """One test process at a time (the suite runs on several workers) for `name`: making
    a shared test image once, not once per worker."""
    path = Path(tempfile.gettempdir()) / f"suite-{name}.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ansible_env(**extra: str) -> dict[str, str]:
    """os.environ plus gpubake's ansible.cfg and the collection gpubake.gpu (the checkout)."""
    from gpubake import resources

    return {**os.environ, **resources.ansible_env(), **extra}


def ansible_playbook() -> str:
    return str(Path(sys.executable).parent / "ansible-playbook")


@contextmanager
def container(
    engine: Any, image: str, *, user: str = "root", volumes: dict[str, Any] | None = None
) -> Iterator[Any]:
    """A long-running container of `image` that is removed whatever happens."""
    name = f"gpubake-test-{uuid.uuid4().hex[:10]}"
    box = engine.containers.run(
        image,
        ["sleep", "infinity"],
        name=name,
        user=user,
        detach=True,
        entrypoint=[],
        volumes=volumes or {},
    )
    try:
        yield box
    finally:
        box.remove(force=True)


def run_output(
    engine: Any,
    image: str,
    command: list[str],
    *,
    user: str | None = None,
    entrypoint: list[str] | None = None,
    volumes: dict[str, Any] | None = None,
) -> bytes:
    """What `docker run --rm IMAGE COMMAND` prints on standard output, taken from an exec in
    a container of IMAGE kept alive meanwhile (as run_in does): docker-py's containers.run,
    which reads the logs after the exit, and an attach to a short-lived container both gave
    b"" at times on this engine. The image's entrypoint and user apply unless given."""
    config = engine.images.get(image).attrs["Config"]
    prefix = config.get("Entrypoint") or [] if entrypoint is None else entrypoint
    user = user if user is not None else config.get("User") or "root"
    with container(engine, image, user=user, volumes=volumes) as box:
        result = box.exec_run([*prefix, *command], user=user, demux=True)
    out, err = result.output
    if result.exit_code != 0:
        tail = (err or b"").decode("utf-8", "replace")[-3000:]
        raise AssertionError(f"{command} in {image} exited {result.exit_code}: {tail}")
    return out or b""


def play(
    box: Any, playbook: Path, extra_vars: Mapping[str, Any], *args: str, timeout: int = 2400
) -> tuple[int, str]:
    """ansible-playbook against a container over the docker connection: (exit status,
    output), failures included."""
    vars_file = Path(f"/tmp/{box.name}-vars.json")
    # sorted like the ansible-vars.json gpubake renders for Packer
    vars_file.write_text(json.dumps(dict(extra_vars), sort_keys=True), encoding="utf-8")
    try:
        proc = subprocess.run(
            [
                ansible_playbook(),
                "-i",
                f"{box.name},",
                "-e",
                "ansible_connection=community.docker.docker",
                "-e",
                f"@{vars_file}",
                *args,
                str(playbook),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=ansible_env(ANSIBLE_FORCE_COLOR="0"),
            cwd=ROOT,
            check=False,
        )
    finally:
        vars_file.unlink(missing_ok=True)
    return proc.returncode, proc.stdout + proc.stderr


def apply(
    box: Any,
    playbook: Path,
    extra_vars: Mapping[str, Any],
    *,
    timeout: int = 2400,
) -> tuple[dict[str, int], str]:
    """`play` that must succeed; return its recap."""
    rc, output = play(box, playbook, extra_vars, timeout=timeout)
    matches = _RECAP_RE.findall(output)
    assert rc == 0 and matches, output[-6000:]
    ok, changed, unreachable, failed = (int(x) for x in matches[-1])
    return {"ok": ok, "changed": changed, "unreachable": unreachable, "failed": failed}, output


def run_in(box: Any, *cmd: str, user: str = "root") -> tuple[int, str]:
    result = box.exec_run(list(cmd), user=user, demux=False)
    return result.exit_code, result.output.decode("utf-8", errors="replace")


_SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address


def bridge_address(engine: Any, network: str = "bridge") -> str:
    """The host's IPv4 address on a Docker bridge network: what its containers reach the host
    by. Engines do not all record it: Debian's dockerd 20.10 on a first start keeps only
    `"Config": [{"Subnet": "172.17.0.0/16"}]`, with no Gateway. So: the recorded gateway, else
    the bridge interface's own address (docker0 for the default bridge), else the subnet's
    first host address, which Docker gives the bridge when none is configured."""
    attrs = engine.networks.get(network).attrs
    configs = [c for c in attrs["IPAM"]["Config"] or [] if ":" not in c.get("Subnet", ":")]
    for config in configs:
        if config.get("Gateway"):
            return config["Gateway"].split("/")[0]
    interface = attrs.get("Options", {}).get("com.docker.network.bridge.name", "docker0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(
                sock.fileno(), _SIOCGIFADDR, struct.pack("256s", interface.encode()[:15])
            )
            return socket.inet_ntoa(packed[20:24])
        except OSError:
            pass  # no such interface in this namespace (a remote engine): the subnet says
    subnets = [ipaddress.ip_network(c["Subnet"]) for c in configs]
    assert subnets, f"Docker network {network!r} has no IPv4 subnet: {attrs['IPAM']}"
    return str(subnets[0].network_address + 1)


def base_image(engine: Any) -> str:
    """The Debian 12 base every build starts from (pulled or debootstrapped as a build would)."""
    from gpubake import stacks
    from gpubake.build import docker_engine

    ref, _image_id, _note = docker_engine.ensure_base_image(
        engine, stacks.get_os("debian-12"), None, lambda _msg: None
    )
    return ref


def build_containers(engine: Any) -> set[str]:
    """The ids of the containers gpubake's builds run (gpubake-build-*, labelled with their
    lock's key; any container of a gpubake image inherits the label, and is not a build's)."""
    from gpubake.build import guard

    boxes = engine.containers.list(all=True, filters={"label": guard.LOCK_LABEL})
    return {c.id for c in boxes if c.name.startswith("gpubake-build-")}


def built_images(engine: Any) -> set[str]:
    """The ids of the images gpubake built (tagged or not), and those made from them: they
    carry its input-hash label."""
    from gpubake.build import plan

    return {i.id for i in engine.images.list(all=True, filters={"label": plan.HASH_LABEL})}


def make_marker_bundle(work: Path) -> tuple[Path, str]:
    """The host's CA bundle plus a freshly made certificate nobody else has, in `work`:
    (bundle, a line of base64 from the middle of the marker, which occurs in no other file)."""
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=gpubake-test-marker",
            "-keyout",
            str(work / "k.pem"),
            "-out",
            str(work / "marker.pem"),
        ],
        capture_output=True,
        check=True,
    )
    marker_pem = (work / "marker.pem").read_text()
    bundle = work / "bundle.pem"
    bundle.write_text(HOST_BUNDLE.read_text() + marker_pem)
    body = [ln for ln in marker_pem.splitlines() if ln and not ln.startswith("-----")]
    return bundle, body[len(body) // 2]


def image_holds(image: Any, text: str) -> bool:
    """Whether `text` occurs anywhere in the image's saved layers and configuration."""
    needle, tail = text.encode(), b""
    for chunk in image.save(chunk_size=8 << 20):
        window = tail + chunk
        if needle in window:
            return True
        tail = window[-len(needle) :]
    return False


def build_in(
    tree: Path, tag: str, *args: str, timeout: int = 1800
) -> subprocess.CompletedProcess[str]:
    """`gpubake build --target docker` of the gpubake in `tree` (a copy made by
    tests.checkout.copy_checkout), with the host's CA bundle."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gpubake",
            "build",
            "--target",
            "docker",
            "--tag",
            tag,
            "--ca-bundle",
            str(HOST_BUNDLE),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        check=False,
    )


def remove_other_tags(engine: Any, repository: str, ref: str) -> None:
    """Drop `repository`'s images other than `ref`: made from older inputs, never used again,
    and large (the snapshot is about 13 GB): before making `ref`, so both never fill the disk."""
    for old in engine.images.list(name=repository):
        if ref not in old.tags:
            with suppress(docker.errors.APIError):  # one still in use stays, until next time
                engine.images.remove(old.id, force=False)


def remove_stack_images(engine: Any, names: tuple[str, ...], tag: str) -> None:
    """Drop the images of stacks only one module uses (gpubake/<name>:<tag> and their stage
    images), once it is done: about 7 GB each, which the disk needs back for the rest of the
    run (the VM host's snapshot takes twice its 13 GB while it is committed)."""
    # by tag, not by id: an image with children is only untagged, and once its last tag
    # goes, the last image of the chain is deleted with its untagged parents
    refs = [f"gpubake/{name}:{tag}" for name in names]
    for name in names:
        # its own tags only: a stage it took from another stack (the os stage) keeps that
        # stack's tag, which a later build of another stack reuses
        own = f"gpubake-stage/{name}:"
        # the plain listing: images.list() inspects each image, and one another worker's
        # test removes in between fails it
        images = engine.api.images(name=own[:-1])
        refs += [t for i in images for t in i.get("RepoTags") or [] if t.startswith(own)]
    for ref in refs:
        with suppress(docker.errors.APIError):  # gone already, or in use by a container
            engine.images.remove(ref)


def smoke_report(engine: Any, image: str) -> dict[str, Any]:
    """`docker run IMAGE gpu-smoke --json` (no GPU passed): its exit 0 and its report."""
    box = engine.containers.run(image, ["gpu-smoke", "--json"], detach=True)
    try:
        assert box.wait(timeout=300)["StatusCode"] == 0, box.logs()[-3000:]
        return json.loads(box.logs(stdout=True, stderr=False))
    finally:
        box.remove(force=True)


def assert_environment_is_the_lock(engine: Any, image: str, stack: str) -> None:
    """`uv pip freeze` in the image is exactly the stack's committed lock."""
    lock = locks.check(stacks.resolve(stack), stacks.machine_arch())
    out = run_output(engine, image, ["uv", "pip", "freeze"]).decode()
    frozen = dict(line.split("==", 1) for line in out.splitlines() if "==" in line)
    frozen = {name.lower().replace("_", "-"): version for name, version in frozen.items()}
    assert frozen == {name: version for name, (version, _) in lock.pins.items()}


def tiny_image(engine: Any, below: str, tag: str, labels: dict[str, str], marker: str) -> Any:
    """`below` plus one layer (a file saying `marker`): no shell needed, so `below` may be
    an image made from scratch."""
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, text in (("Dockerfile", f"FROM {below}\nCOPY marker /\n"), ("marker", marker)):
            member = tarfile.TarInfo(name)
            member.size = len(text.encode())
            tar.addfile(member, io.BytesIO(text.encode()))
    context.seek(0)
    image, _log = engine.images.build(
        fileobj=context, custom_context=True, tag=tag, labels=labels, rm=True
    )
    return image
