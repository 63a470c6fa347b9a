"""A Debian 12 container with systemd as PID 1, for roles that install and start units.

The image is the build's Debian 12 base with systemd, dbus, iproute2 (for `ss`) and the
Python the playbooks' bootstrap would install, committed once as SYSTEMD_REPOSITORY:<tag>. It
keeps its apt lists, so check mode can simulate installs from Debian; being older than an hour
they are refreshed by any role that installs for real. The tag is taken from the base image id
and the package list, so a new base image gets a new systemd image. Containers are run
unprivileged (this engine cannot give a privileged container its capabilities) with the host's
cgroup hierarchy, which works with cgroup v1 and v2, and are always removed.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from tests.integration.helpers import base_image, run_in, suite_lock

SYSTEMD_REPOSITORY = "gpubake/test-systemd"
_PACKAGES = ("systemd", "systemd-sysv", "dbus", "iproute2", "python3", "python3-apt")


def _install(extra: tuple[str, ...]) -> str:
    return (
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
        f"--no-install-recommends {' '.join(_PACKAGES + extra)} && apt-get clean"
    )


def systemd_image(engine: Any, extra: tuple[str, ...] = ()) -> str:
    """The systemd image (plus `extra` packages) for the current base image, built when
    missing (about 20 s)."""

    with suite_lock("systemd-image"):
        return _systemd_image(engine, extra)


def _systemd_image(engine: Any, extra: tuple[str, ...]) -> str:
    import docker

    base = base_image(engine)
    base_id = engine.images.get(base).id.split(":", 1)[1][:12]
    install = _install(extra)
    packages = hashlib.sha256(install.encode()).hexdigest()[:8]
    ref = f"{SYSTEMD_REPOSITORY}:{base_id}-{packages}"
    try:
        engine.images.get(ref)
        return ref
    except docker.errors.ImageNotFound:
        pass
    builder = engine.containers.run(
        base, ["sh", "-c", install], name=f"gpubake-sdbuild-{uuid.uuid4().hex[:8]}", detach=True
    )
    try:
        status = builder.wait(timeout=600)
        if status.get("StatusCode") != 0:
            tail = builder.logs().decode("utf-8", "replace")[-2000:]
            raise RuntimeError(f"installing systemd into {base} failed:\n{tail}")
        repository, tag = ref.split(":")
        builder.commit(repository=repository, tag=tag, changes=['CMD ["/sbin/init"]'])
    finally:
        builder.remove(force=True)
    for old in engine.images.list(name=SYSTEMD_REPOSITORY):
        if not any(t.startswith(f"{SYSTEMD_REPOSITORY}:{base_id}-") for t in old.tags):
            # one still used by a container stays; the next build tries again
            with suppress(docker.errors.APIError):
                engine.images.remove(old.id, force=False)
    return ref


@contextmanager
def systemd_container(
    engine: Any,
    image: str,
    *,
    boot_timeout: float = 60,
    ports: dict[str, Any] | None = None,
    volumes: dict[str, Any] | None = None,
    **options: Any,
) -> Iterator[Any]:
    """A booted systemd container (`systemctl is-system-running` says running or degraded).
    `volumes` are added to the cgroup mount; `options` go to containers.run (e.g. cap_add)."""
    box = engine.containers.run(
        image,
        ports=ports or {},
        name=f"gpubake-systemd-{uuid.uuid4().hex[:10]}",
        detach=True,
        cgroupns="host",
        tmpfs={"/run": "rw,exec", "/run/lock": "rw"},
        volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}, **(volumes or {})},
        environment={"container": "docker"},
        **options,
    )
    try:
        state = ""
        deadline = time.monotonic() + boot_timeout
        while time.monotonic() < deadline:
            box.reload()
            if box.status != "running":
                logs = box.logs().decode("utf-8", "replace")[-3000:]
                raise RuntimeError(f"the systemd container stopped ({box.status}):\n{logs}")
            _, state = run_in(box, "systemctl", "is-system-running")
            if state.strip() in ("running", "degraded"):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"systemd did not finish booting in {boot_timeout} s: {state!r}")
        yield box
    finally:
        box.remove(force=True)
