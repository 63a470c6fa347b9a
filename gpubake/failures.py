"""One line, and what to do, for a failure no gpubake code turned into a message: the Docker
Engine refusing or gone, a network request that failed, a file that cannot be read or written
(`--debug` shows the traceback instead)."""

from __future__ import annotations

import os

import docker.errors
import requests

from gpubake import resources
from gpubake.options import one_line


def _docker_request(exc: BaseException) -> bool:
    """Whether a requests error came from docker-py talking to the engine."""
    url = getattr(getattr(exc, "request", None), "url", None) or ""
    return url.startswith("http+docker://") or (
        bool(os.environ.get("DOCKER_HOST")) and url.startswith(_engine_url())
    )


def _engine_url() -> str:
    host = os.environ.get("DOCKER_HOST", "")
    return host.replace("tcp://", "https://" if os.environ.get("DOCKER_TLS_VERIFY") else "http://")


def describe(exc: BaseException) -> str:
    """One line for a failure no gpubake code turned into a message: what failed and what
    to do."""
    if isinstance(exc, docker.errors.APIError):
        return (
            f"the Docker Engine refused a request: {one_line(str(exc.explanation))}: check "
            "`docker info`, then run the command again"
        )
    if isinstance(exc, docker.errors.DockerException) or (
        isinstance(exc, requests.RequestException) and _docker_request(exc)
    ):
        return (
            "the Docker Engine stopped answering in the middle of the command: check that "
            "dockerd runs (`docker info`), then run the command again"
        )
    if isinstance(exc, requests.RequestException):
        url = getattr(getattr(exc, "request", None), "url", None) or "a server"
        host = url.split("/")[2].rpartition("@")[2] if "://" in url else url
        return (
            f"a network request to {host} failed ({type(exc).__name__}): check the network "
            "and the address, then run the command again"
        )
    assert isinstance(exc, OSError)
    where = f"{exc.filename}: " if exc.filename else ""
    what = exc.strerror or one_line(str(exc)) or type(exc).__name__
    hint = "check the path and its permissions"
    if exc.filename and str(exc.filename).startswith(str(resources.cache_dir())):
        hint = (
            f"gpubake keeps its caches in {resources.cache_dir()}: make it writable, "
            "or set XDG_CACHE_HOME to a folder that is"
        )
    return f"{where}{what}: {hint}"
