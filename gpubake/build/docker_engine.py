"""Docker Engine helpers (Docker SDK): base images, the build cache by input hash.

When the base image can be neither found locally nor pulled, a Debian base is
made with debootstrap and imported, as these machines reach no registry.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors
import requests
from docker.models.images import Image

from gpubake import GpubakeError
from gpubake.build import guard
from gpubake.build.plan import HASH_LABEL
from gpubake.publish import machine
from gpubake.stacks import OsInfo

Echo = Callable[[str], None]
BASE_REPOSITORY = "gpubake/base"


#: the name the engine gives an anonymous volume (a VOLUME of an image, unnamed)
_ANONYMOUS_VOLUME = re.compile(r"[0-9a-f]{64}")


class EngineError(GpubakeError):
    """The Docker Engine is unreachable or refused something."""


class MissingFileError(EngineError):
    """An image without the file asked for."""


def client() -> docker.DockerClient:
    try:
        engine = docker.from_env(timeout=600)
        engine.ping()
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise EngineError(
            "Docker Engine not reachable: start dockerd (e.g. `dockerd &` or "
            f"`systemctl start docker`) and check DOCKER_HOST ({str(exc).splitlines()[0][:120]})"
        ) from None
    return engine


def local_image(engine: docker.DockerClient, ref: str) -> Image | None:
    try:
        return engine.images.get(ref)
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.APIError as exc:
        raise EngineError(f"cannot inspect image {ref}: {exc.explanation}") from None


def images_with_hash(
    engine: docker.DockerClient, repository: str, digest: str, ref: str | None = None
) -> list[Image]:
    """The images of `repository` (or, for "NAMESPACE/", of any repository in it) built from
    identical inputs; the one tagged `ref` first, so that a skipped build never moves a tag
    off an image that is already up to date. Several may match (one built on a base image
    that was made again since): the caller picks the one on the image it builds on."""

    def of(tag: str) -> bool:
        name = tag.rsplit(":", 1)[0]
        return name.startswith(repository) if repository.endswith("/") else name == repository

    found = [
        image
        for image in engine.images.list(filters={"label": f"{HASH_LABEL}={digest}"})
        if any(of(tag) for tag in image.tags)
    ]
    return sorted(found, key=lambda i: ref not in i.tags)


def drop_replaced(engine: docker.DockerClient, previous: Image | None, now: Image | None) -> str:
    """Remove `previous`, the image a build moved its tag off, when gpubake built it and
    nothing else uses it (no tag left, no container): a replaced image is several GB.
    Returns its short id when removed, else ''."""
    if previous is None or now is None or previous.id == now.id:
        return ""
    try:
        previous.reload()
    except docker.errors.ImageNotFound:
        return ""
    if previous.tags or HASH_LABEL not in (previous.labels or {}):
        return ""
    if engine.containers.list(all=True, filters={"ancestor": previous.id}):
        return ""
    try:
        engine.images.remove(previous.id, noprune=False)
    except docker.errors.APIError:  # in use after all (a child image): leave it
        return ""
    return previous.short_id


def _pull(engine: docker.DockerClient, ref: str) -> Image | None:
    try:
        return engine.images.pull(ref)
    except docker.errors.APIError:
        return None


def base_ref(osinfo: OsInfo) -> str:
    return f"{BASE_REPOSITORY}:{osinfo.key}"


def ensure_base_image(
    engine: docker.DockerClient,
    osinfo: OsInfo,
    explicit: str | None,
    echo: Echo,
    *,
    offline: bool = False,
) -> tuple[str, str, str | None]:
    """Find or make the base image; return (ref, image id, note for the user). `offline`:
    only a local one (no pull, no debootstrap: both need the network)."""
    if offline:
        for ref in (explicit,) if explicit else (osinfo.base_image, base_ref(osinfo)):
            image = local_image(engine, ref)
            if image is not None:
                return ref, image.id, None
        raise EngineError(
            f"--offline: the base image {explicit or osinfo.base_image} is not in the local "
            "engine: build once online, or load it (docker load) and pass --base-image"
        )
    if explicit:
        image = local_image(engine, explicit) or _pull(engine, explicit)
        if image is None:
            raise EngineError(
                f"--base-image {explicit}: not found locally and cannot be pulled: "
                "load it first (docker load / docker import) or leave --base-image out"
            )
        return explicit, image.id, None
    for ref in (osinfo.base_image, base_ref(osinfo)):
        image = local_image(engine, ref)
        if image is not None:
            return ref, image.id, None
    echo(f"pulling {osinfo.base_image} ...")
    image = _pull(engine, osinfo.base_image)
    if image is not None:
        return osinfo.base_image, image.id, None
    if not osinfo.debootstrap:
        raise EngineError(
            f"cannot pull {osinfo.base_image} and gpubake bootstraps only Debian locally: "
            f"load {osinfo.base_image} (docker load) or pass --base-image with a local image"
        )
    ref = base_ref(osinfo)
    with guard.held(guard.base_key(ref), echo, f"the base image {ref}"):
        image = local_image(engine, ref)  # made meanwhile by the build this one waited for
        if image is not None:
            return ref, image.id, None
        return _bootstrap_base(engine, osinfo, ref, echo)


def _bootstrap_base(
    engine: docker.DockerClient, osinfo: OsInfo, ref: str, echo: Echo
) -> tuple[str, str, str]:
    note = (
        f"{osinfo.base_image} cannot be pulled (no registry reachable): built {ref} "
        "with debootstrap instead"
    )
    echo(f"{osinfo.base_image} cannot be pulled; building {ref} with debootstrap ...")
    image_id = debootstrap_image(engine, osinfo, ref, echo)
    return ref, image_id, note


def debootstrap_image(engine: docker.DockerClient, osinfo: OsInfo, ref: str, echo: Echo) -> str:
    """debootstrap a minimal Debian into a temporary directory and import it as `ref`."""
    assert osinfo.debootstrap is not None
    tool = shutil.which("debootstrap")
    if not tool:
        raise EngineError(
            "debootstrap not found: install it (apt-get install debootstrap) "
            "or load a base image and pass --base-image"
        )
    suite = osinfo.debootstrap["suite"]
    mirror = osinfo.debootstrap["mirror"]
    # under the cache, named after the base image's lock: the next build removes the root
    # a killed build left (unmounting what debootstrap had mounted in it)
    with guard.work_dir(guard.base_key(ref)) as work:
        rootfs = work / "rootfs"
        cmd = [tool, "--variant=minbase", suite, str(rootfs), mirror]
        _debootstrap(cmd, suite)
        _finish_rootfs(rootfs, suite, mirror)
        echo(f"importing {ref} ...")
        tar = subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
        )
        assert tar.stdout is not None
        try:
            response = engine.api.import_image_from_stream(
                tar.stdout,
                repository=ref.split(":")[0],
                tag=ref.split(":")[1],
                changes=['CMD ["/bin/bash"]', "ENV LANG=C.UTF-8"],
            )
        finally:
            tar.stdout.close()
            tar.wait()
        if tar.returncode != 0:
            raise EngineError(f"could not archive the debootstrap root for {ref}")
        del response
    image = local_image(engine, ref)
    if image is None:
        raise EngineError(f"docker import of {ref} produced no image")
    return image.id


def _debootstrap(cmd: list[str], suite: str) -> None:
    """Run debootstrap in a process group of its own: on Ctrl-C or SIGTERM the whole group
    (dpkg, wget, chroot) is stopped before its root is removed."""
    guard.run_step(f"debootstrap {suite}", cmd, EngineError, timeout=1800)


def _finish_rootfs(rootfs: Path, suite: str, mirror: str) -> None:
    """Security and updates sources like the official image; no caches, no machine id."""
    security = mirror.replace("/debian", "/debian-security")
    (rootfs / "etc/apt/sources.list").write_text(
        f"deb {mirror} {suite} main\n"
        f"deb {mirror} {suite}-updates main\n"
        f"deb {security} {suite}-security main\n",
        encoding="utf-8",
    )
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (rootfs / sub).glob("*"):
            if path.is_file():
                path.unlink()
    for path in ("etc/machine-id", "var/lib/dbus/machine-id"):
        target = rootfs / path
        if target.exists():
            target.write_text("", encoding="utf-8")


def read_image_file(engine: docker.DockerClient, image: str, path: str) -> bytes:
    """A file of an image, read from a container that is created and never started (nothing
    in the image runs)."""
    try:
        box = engine.containers.create(image, entrypoint=["/bin/true"], user="root")
    except docker.errors.APIError as exc:
        raise EngineError(f"cannot read {path} of {image}: {exc.explanation}") from None
    try:
        stream, _ = box.get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.extractfile(tar.getmembers()[0])
            if member is None:
                raise EngineError(f"{path} of {image} is not a file")
            return member.read()
    except docker.errors.NotFound:
        raise MissingFileError(f"{image} has no {path}") from None
    finally:
        box.remove(force=True)


def built_on(image: Image, below: Image | None) -> bool:
    """Whether `image` is `below` plus layers of its own."""
    if below is None:
        return False
    under = below.attrs["RootFS"]["Layers"]
    return image.attrs["RootFS"]["Layers"][: len(under)] == under


def own_size(engine: docker.DockerClient, image: Image, below: str) -> int:
    """Bytes `image` adds on top of the image `below` (its own layers)."""
    parent = local_image(engine, below)
    return int(image.attrs["Size"]) - (int(parent.attrs["Size"]) if parent is not None else 0)


def dangling_volumes(engine: docker.DockerClient) -> set[str]:
    """Anonymous volumes no container uses. Named ones are never a build's: a volume someone
    created meanwhile (for a container yet to start) is not dropped with the build's."""
    return {
        v.name
        for v in engine.volumes.list(filters={"dangling": True})
        if _ANONYMOUS_VOLUME.fullmatch(v.name)
    }


def drop_volumes(engine: docker.DockerClient, names: set[str]) -> None:
    """Remove volumes a build container left behind: an image that declares a VOLUME gives
    each container started from it an anonymous one, which Packer does not remove."""
    for name in names:
        with contextlib.suppress(docker.errors.APIError):  # in use or gone meanwhile
            engine.volumes.get(name).remove()


def gpus_for_containers(engine: docker.DockerClient) -> tuple[bool, str | None]:
    """(whether a build container can be given this machine's GPUs, a note for the user).
    Needs an NVIDIA GPU (nvidia-smi) and the NVIDIA container toolkit (the engine's nvidia
    runtime or the hook `docker run --gpus` calls)."""
    try:
        gpus = machine.detect().gpus
    except GpubakeError as exc:  # an nvidia-smi gpubake cannot read: build, say so
        return False, f"{exc}: gpu-smoke will run its CPU-side checks only"
    if not gpus:
        return False, None
    runtimes = engine.info().get("Runtimes") or {}
    if "nvidia" in runtimes or shutil.which("nvidia-container-runtime-hook"):
        return True, None
    return False, (
        "this machine has an NVIDIA GPU but Docker cannot give it to containers (no NVIDIA "
        "container toolkit): gpu-smoke will run its CPU-side checks only"
    )
