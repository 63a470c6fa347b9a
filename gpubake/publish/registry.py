"""A small client for the OCI distribution (Docker Registry HTTP API v2).

It reads what `gpubake pull` / `gpubake images` need (tags, manifest digests, the labels in an
image's config) and moves tags, without ever fetching a layer blob. It trusts what the Docker
Engine trusts: TLS verified against the system CAs plus `/etc/docker/certs.d/<host>/ca.crt`,
and the credentials of `docker login` (the Docker config and its credential helpers).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import docker.auth
import docker.errors
import requests

from gpubake import GpubakeError, __version__, one_line

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
#: Config blobs are the only blobs read: an image's labels live there, layers never matter.
CONFIG_TYPES = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
DEFAULT_CERTS_DIR = Path("/etc/docker/certs.d")
# Docker Hub is addressed as docker.io but served from registry-1.docker.io, and `docker
# login` files its credentials under the old index URL.
_HUB_NAMES = ("docker.io", "index.docker.io", "registry-1.docker.io")
_HUB_API = "registry-1.docker.io"
_HUB_AUTH_KEY = "https://index.docker.io/v1/"

_EXAMPLES = "e.g. 127.0.0.1:5000/gpubake or registry.example.com/team/ml"
_HOST_RE = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)(?::(\d{1,5}))?$"
)
# a path component of a repository name (the distribution spec's grammar)
_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class RegistryError(GpubakeError):
    """A registry cannot be reached, trusted, logged into, or holds something unexpected."""


@dataclass(frozen=True)
class RegistryRef:
    """Where gpubake's images live: `host` (host[:port]) and a `namespace` (may be "")."""

    host: str
    namespace: str

    def repository(self, stack: str) -> str:
        return f"{self.namespace}/{stack}" if self.namespace else stack

    def image(self, stack: str) -> str:
        return f"{self.host}/{self.repository(stack)}"

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}" if self.namespace else self.host


def parse_registry(text: str) -> RegistryRef:
    """Parse `HOST[:PORT]/NAMESPACE` (the namespace may be left out)."""

    def bad(problem: str) -> RegistryError:
        return RegistryError(
            f"--registry '{text}': {problem}; expected HOST[:PORT]/NAMESPACE, {_EXAMPLES}"
        )

    value = text.strip().rstrip("/")
    if not value:
        raise bad("empty")
    if "://" in value:
        raise bad("give no scheme (TLS is the default, --insecure means HTTP)")
    if "@" in value or ":" in value.partition("/")[2]:
        raise bad("give no tag or digest")
    host, _, namespace = value.partition("/")
    match = _HOST_RE.match(host)
    if not match:
        raise bad(f"'{host}' is not a host name or address")
    if match.group(1) is not None and not 0 < int(match.group(1)) < 65536:
        raise bad(f"port {match.group(1)} is out of range")
    # Docker reads a first component without '.' or ':' (other than localhost) as a Docker
    # Hub namespace: `docker push` would send the image somewhere else than this client.
    if "." not in host and ":" not in host and host != "localhost":
        raise bad(f"'{host}' does not look like a registry host (no '.' or ':')")
    for part in namespace.split("/") if namespace else ():
        if not _COMPONENT_RE.match(part):
            raise bad(f"'{part}' is not a valid namespace part (lowercase letters, digits, . _ -)")
    return RegistryRef(host=host.lower(), namespace=namespace)


def _split_port(host: str) -> str:
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host  # a bare IPv6 address, or no port


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (with or without a port): where plain HTTP is acceptable,
    as the Docker Engine also decides."""
    name = _split_port(host.strip()).lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    #: an identity token (`docker login` to a registry with OAuth2, e.g. Azure): exchanged
    #: at the token service for access tokens, never sent to the registry itself
    identity_token: str = ""


def docker_config_path(config_dir: Path | None = None) -> Path:
    if config_dir is not None:
        return Path(config_dir) / "config.json"
    env = os.environ.get("DOCKER_CONFIG")
    if env:
        return Path(env) / "config.json"
    return Path.home() / ".docker" / "config.json"


def docker_credentials(host: str, config_dir: Path | None = None) -> Credentials | None:
    """The credentials `docker login host` stored, read by docker-py's own auth code as the
    Docker CLI reads them: the host's credential helper (credHelpers), else the credsStore,
    else `auths` (user and password, or an identity token)."""
    path = docker_config_path(config_dir)
    if not path.is_file():
        return None
    try:  # docker-py skips a config it cannot parse: say so instead
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RegistryError(
            f"cannot read the Docker config {path} ({exc}): fix or remove it"
        ) from None
    if not isinstance(config, dict):
        raise RegistryError(f"the Docker config {path} is not a JSON object: fix or remove it")
    server = _HUB_AUTH_KEY if host in _HUB_NAMES else host
    try:
        with warnings.catch_warnings():  # docker-py warns of an absent helper: we say it
            warnings.simplefilter("ignore")
            found = docker.auth.load_config(config_dict=config).resolve_authconfig(server)
    except (docker.errors.InvalidConfigFile, ValueError) as exc:  # e.g. an auth without ":"
        raise RegistryError(
            f"the Docker config {path} is malformed for {host} ({exc}): run `docker login "
            f"{host}` again"
        ) from None
    except docker.errors.DockerException as exc:  # a credential helper failed or is absent
        raise RegistryError(
            f"the Docker config {path}: {one_line(str(exc))}: install its credential helper "
            f"(docker-credential-*), or run `docker login {host}` again"
        ) from None
    if not found:
        return None
    if found.get("IdentityToken"):
        return Credentials("", "", identity_token=str(found["IdentityToken"]))
    user = found.get("username") or found.get("Username")
    password = found.get("password") or found.get("Password")
    return Credentials(str(user), str(password)) if user and password else None


@dataclass(frozen=True)
class ImageInfo:
    """An image as the registry describes it, read without pulling it.

    `digest` is what `tag` points at (a platform manifest, or an index whose `arch` entry was
    read): the digest to pull by. `architecture`/`os` come from the image config; when an
    index has no entry for the requested arch, its first platform is described instead (and
    its architecture says so)."""

    repository: str
    tag: str
    digest: str
    labels: Mapping[str, str] = field(hash=False)
    created: str
    architecture: str
    os: str
    size: int  # bytes: the layers (compressed, as pulled) plus the config
    media_type: str = ""
    platform_digest: str = ""  # the platform manifest's digest (== digest unless an index)
    config_digest: str = ""  # the image config's digest: the image id a Docker Engine shows

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"


_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_RE.findall(rest))


def _reason(exc: Exception) -> str:
    """The useful end of a requests/urllib3 error, e.g. 'Connection refused'."""
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] ([^'\"()\]]+)", text)
    if match:
        return match.group(1).strip()
    match = re.search(r"\[SSL: [A-Z_]+\] ([^'\"()]+)", text)
    if match:
        return match.group(1).strip()
    return text.rsplit(": ", 1)[-1].strip(" ')\"")[:160] or type(exc).__name__


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryClient:
    """Talks to one registry. HTTPS with verification unless `insecure` (plain HTTP, for a
    registry on localhost only); credentials are looked up the first time the registry asks."""

    def __init__(
        self,
        host: str,
        *,
        insecure: bool = False,
        docker_config_dir: Path | None = None,
        timeout: float = 30,
        certs_dir: Path = DEFAULT_CERTS_DIR,
    ) -> None:
        if insecure and not is_loopback(host):
            raise RegistryError(
                f"--insecure is only allowed for a registry on localhost (127.0.0.1, ::1), "
                f"not {host}: give the registry a TLS certificate and put its CA in "
                f"{certs_dir}/{host}/ca.crt"
            )
        self.host = host
        self.insecure = insecure
        self.timeout = timeout
        self.certs_dir = Path(certs_dir)
        self.docker_config_dir = docker_config_dir
        api_host = _HUB_API if host in _HUB_NAMES else host
        self.base = f"{'http' if insecure else 'https'}://{api_host}"
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"gpubake/{__version__}"
        self._auth: str | None = None  # the Authorization header that last worked
        self._creds: Credentials | None = None
        self._creds_read = False
        host_certs = self.certs_dir / host
        ca = host_certs / "ca.crt"
        self._ca = str(ca) if ca.is_file() else None
        cert, key = host_certs / "client.cert", host_certs / "client.key"
        self._client_cert = (str(cert), str(key)) if cert.is_file() and key.is_file() else None

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------

    def _is_registry(self, url: str) -> bool:
        return url.startswith(self.base + "/")

    def _send(
        self, method: str, url: str, headers: dict[str, str], data: bytes | None = None
    ) -> requests.Response:
        """One request, following redirects by hand so that the registry's own CA and
        credentials go to the registry only (blob redirects often point at object storage)."""
        for _ in range(6):
            own = self._is_registry(url)
            sent = dict(headers)
            if not own:
                sent.pop("Authorization", None)
            try:
                resp = self._session.request(
                    method,
                    url,
                    headers=sent,
                    data=data,
                    timeout=self.timeout,
                    allow_redirects=False,
                    verify=(self._ca or True) if own else True,
                    cert=self._client_cert if own else None,
                )
            except requests.exceptions.SSLError as exc:
                where = urlparse(url).netloc
                text = str(exc)
                if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
                    raise RegistryError(
                        f"registry {where} certificate not trusted ({_reason(exc)}): put its CA "
                        f"in {self.certs_dir}/{where}/ca.crt"
                    ) from None
                if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
                    raise RegistryError(
                        f"registry {where} does not answer TLS (plain HTTP?): a registry on "
                        "localhost may be used with --insecure; give any other one TLS"
                    ) from None
                raise RegistryError(f"TLS with registry {where} failed: {_reason(exc)}") from None
            except requests.exceptions.Timeout:
                raise RegistryError(
                    f"cannot reach registry {urlparse(url).netloc}: no answer within "
                    f"{self.timeout:g} s"
                ) from None
            except requests.exceptions.RequestException as exc:
                raise RegistryError(
                    f"cannot reach registry {urlparse(url).netloc}: {_reason(exc)}"
                ) from None
            if (
                resp.status_code == 400
                and self.insecure
                and b"HTTP request to an HTTPS server" in resp.content
            ):
                raise RegistryError(f"registry {self.host} speaks TLS: leave out --insecure")
            if resp.is_redirect and "Location" in resp.headers:
                url = urljoin(url, resp.headers["Location"])
                if resp.status_code == 303:
                    method, data = "GET", None
                continue
            return resp
        raise RegistryError(f"registry {self.host} redirected {method} too many times")

    def _credentials(self) -> Credentials | None:
        if not self._creds_read:
            self._creds = docker_credentials(self.host, self.docker_config_dir)
            self._creds_read = True
        return self._creds

    def _needs_login(self) -> RegistryError:
        return RegistryError(
            f"registry {self.host} requires credentials: run `docker login {self.host}`"
        )

    def _refused(self) -> RegistryError:
        return RegistryError(
            f"registry {self.host} refused the credentials of `docker login {self.host}` "
            f"(wrong user or password?): log in again"
        )

    def _basic(self, creds: Credentials) -> str:
        token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        return f"Basic {token}"

    def _bearer(self, params: dict[str, str], creds: Credentials | None) -> str:
        """A token from the registry's token service (the Docker token protocol)."""
        realm = params.get("realm")
        if not realm:
            raise RegistryError(f"registry {self.host} asks for a token but names no realm")
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        verify = (self._ca or True) if self._is_registry(realm) else True
        try:
            if creds and creds.identity_token:  # OAuth2: the identity token is a refresh token
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token}
                form |= {"client_id": "gpubake", **query}
                resp = self._session.post(realm, data=form, timeout=self.timeout, verify=verify)
            else:
                headers = {"Authorization": self._basic(creds)} if creds else {}
                resp = self._session.get(
                    realm, params=query, headers=headers, timeout=self.timeout, verify=verify
                )
        except requests.exceptions.RequestException as exc:
            raise RegistryError(
                f"cannot reach the token service {urlparse(realm).netloc} of registry "
                f"{self.host}: {_reason(exc)}"
            ) from None
        if resp.status_code in (401, 403):
            raise self._refused() if creds else self._needs_login()
        if resp.status_code != 200:
            raise RegistryError(
                f"the token service of registry {self.host} answered {resp.status_code}"
            )
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token:
            raise RegistryError(f"the token service of registry {self.host} gave no token")
        return f"Bearer {token}"

    def _request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> requests.Response:
        """A request to the registry, authenticating on a 401 challenge (Basic, or a Bearer
        token fetched with the Basic credentials) and retrying once."""
        url = urljoin(self.base + "/", path.lstrip("/")) if not path.startswith("http") else path
        sent = dict(headers or {})
        if self._auth:
            sent["Authorization"] = self._auth
        resp = self._send(method, url, sent, data)
        if resp.status_code != 401:
            return resp
        scheme, params = _challenge(resp.headers.get("WWW-Authenticate", ""))
        creds = self._credentials()
        if scheme == "basic":
            if creds is None:
                raise self._needs_login()
            if creds.identity_token:
                raise RegistryError(
                    f"registry {self.host} asks for a user and password, but `docker login "
                    f"{self.host}` stored an identity token: log in with a password"
                )
            auth = self._basic(creds)
        elif scheme == "bearer":
            auth = self._bearer(params, creds)
        else:
            raise RegistryError(
                f"registry {self.host} asks for authentication gpubake does not speak "
                f"('{scheme or 'none'}')"
            )
        self._auth = sent["Authorization"] = auth
        resp = self._send(method, url, sent, data)
        if resp.status_code == 401:
            raise self._refused() if creds else self._needs_login()
        return resp

    def _fail(self, resp: requests.Response, what: str) -> RegistryError:
        detail = ""
        try:
            errors = resp.json().get("errors") or []
            detail = "; ".join(str(e.get("message") or e.get("code")) for e in errors)
        except (ValueError, AttributeError):
            detail = resp.text.strip().splitlines()[0][:160] if resp.text.strip() else ""
        detail = f": {detail}" if detail else ""
        if resp.status_code == 403:
            return RegistryError(
                f"registry {self.host} denied {what}{detail}: check what the user of "
                f"`docker login {self.host}` may do"
            )
        return RegistryError(f"registry {self.host} answered {resp.status_code} to {what}{detail}")

    def _paged(self, path: str, key: str, what: str, *, missing_ok: bool) -> list[str]:
        out: list[str] = []
        url: str | None = path
        while url:
            resp = self._request("GET", url)
            if resp.status_code == 404 and missing_ok:
                return []
            if resp.status_code != 200:
                raise self._fail(resp, what)
            try:
                out.extend(resp.json().get(key) or [])
            except (ValueError, AttributeError):
                raise RegistryError(f"registry {self.host} answered {what} with no JSON") from None
            nxt = resp.links.get("next", {}).get("url")
            url = urljoin(resp.url, nxt) if nxt else None
        return out

    # -- the API ---------------------------------------------------------------------------

    def check(self) -> None:
        """Reachable, trusted, and (if it asks) logged into: GET /v2/."""
        resp = self._request("GET", "/v2/")
        if resp.status_code != 200:
            raise self._fail(resp, "GET /v2/ (is it a Docker registry?)")

    def catalog(self) -> list[str]:
        return sorted(
            set(self._paged("/v2/_catalog", "repositories", "the catalog", missing_ok=False))
        )

    def tags(self, repository: str) -> list[str]:
        """The repository's tags; [] when it does not exist."""
        _check_repository(repository)
        return sorted(
            set(
                self._paged(
                    f"/v2/{repository}/tags/list",
                    "tags",
                    f"the tags of {repository}",
                    missing_ok=True,
                )
            )
        )

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        """The digest `reference` (a tag or digest) points at, or None when there is none."""
        _check_repository(repository)
        _check_reference(reference)
        resp = self._request(
            "HEAD", f"/v2/{repository}/manifests/{reference}", headers={"Accept": ACCEPT}
        )
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._fail(resp, f"HEAD {repository}:{reference}")
        digest = resp.headers.get("Docker-Content-Digest")
        if digest:
            return digest
        found = self._manifest(repository, reference)  # registries may leave the header out
        return found[2] if found else None

    def _manifest(self, repository: str, reference: str) -> tuple[bytes, str, str] | None:
        """(raw bytes, media type, digest) of a manifest, or None on 404. The digest is computed
        from the bytes and must equal a digest asked for."""
        resp = self._request(
            "GET", f"/v2/{repository}/manifests/{reference}", headers={"Accept": ACCEPT}
        )
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._fail(resp, f"GET manifest {repository}:{reference}")
        raw = resp.content
        digest = _sha256(raw)
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(
                f"registry {self.host} sent a manifest for {repository}@{reference} whose "
                f"digest is {digest}: the registry's storage is damaged"
            )
        try:
            doc = json.loads(raw)
        except ValueError:
            raise RegistryError(
                f"{repository}:{reference} has a manifest that is not JSON"
            ) from None
        media_type = (doc.get("mediaType") if isinstance(doc, dict) else None) or resp.headers.get(
            "Content-Type", ""
        ).split(";")[0].strip()
        return raw, media_type, digest

    def _config_blob(self, repository: str, digest: str) -> dict[str, Any]:
        resp = self._request("GET", f"/v2/{repository}/blobs/{digest}")
        if resp.status_code != 200:
            raise self._fail(resp, f"GET the config blob of {repository} ({digest})")
        if _sha256(resp.content) != digest:
            raise RegistryError(
                f"registry {self.host} sent a config blob for {repository} that does not match "
                f"its digest {digest}"
            )
        try:
            config = json.loads(resp.content)
        except ValueError:
            raise RegistryError(f"the config blob {digest} of {repository} is not JSON") from None
        return config if isinstance(config, dict) else {}

    def image_info(self, repository: str, reference: str, arch: str) -> ImageInfo:
        """Describe `repository:reference` from its manifest and config blob only. For an
        index (multi-platform), the linux/`arch` entry is read."""
        _check_repository(repository)
        _check_reference(reference)
        try:
            return self._image_info(repository, reference, arch)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # not what OCI says
            raise RegistryError(
                f"{repository}:{reference} has a malformed manifest or config "
                f"({type(exc).__name__}: {exc})"
            ) from None

    def _image_info(self, repository: str, reference: str, arch: str) -> ImageInfo:
        found = self._manifest(repository, reference)
        if found is None:
            raise RegistryError(f"{repository}:{reference} is not in registry {self.host}")
        raw, media_type, digest = found
        doc = json.loads(raw)
        platform_digest, manifest = digest, doc
        if media_type in INDEX_TYPES:
            entries = [
                m
                for m in doc.get("manifests") or []
                if (m.get("platform") or {}).get("os", "linux") != "unknown"  # attestations
            ]
            if not entries:
                raise RegistryError(f"{repository}:{reference} is an index of no image")
            pick = next(
                (
                    m
                    for m in entries
                    if (m.get("platform") or {}).get("os") == "linux"
                    and (m.get("platform") or {}).get("architecture") == arch
                ),
                entries[0],
            )
            inner = self._manifest(repository, pick["digest"])
            if inner is None:
                raise RegistryError(
                    f"{repository}:{reference} names {pick['digest']}, which registry "
                    f"{self.host} does not hold"
                )
            platform_digest = inner[2]
            manifest = json.loads(inner[0])
            if inner[1] not in MANIFEST_TYPES:
                raise RegistryError(
                    f"{repository}:{reference} holds a manifest of type {inner[1]!r}"
                )
        elif media_type not in MANIFEST_TYPES:
            raise RegistryError(
                f"{repository}:{reference} has a manifest of type {media_type!r}: gpubake reads "
                "OCI and Docker v2 images only"
            )
        config_desc = manifest.get("config") or {}
        if config_desc.get("mediaType") not in CONFIG_TYPES:
            raise RegistryError(
                f"{repository}:{reference} is not a container image (config type "
                f"{config_desc.get('mediaType')!r})"
            )
        config = self._config_blob(repository, config_desc["digest"])
        labels = (config.get("config") or {}).get("Labels") or {}
        size = int(config_desc.get("size", 0)) + sum(
            int(layer.get("size", 0)) for layer in manifest.get("layers") or []
        )
        return ImageInfo(
            repository=repository,
            tag=reference,
            digest=digest,
            labels={str(k): str(v) for k, v in labels.items()},
            created=str(config.get("created") or ""),
            architecture=str(config.get("architecture") or ""),
            os=str(config.get("os") or ""),
            size=size,
            media_type=media_type,
            platform_digest=platform_digest,
            config_digest=str(config_desc["digest"]),
        )

    def put_tag(self, repository: str, digest: str, tag: str) -> None:
        """Point `tag` at the manifest `digest` (PUT of the same manifest bytes): the blobs are
        already there, none is sent."""
        _check_repository(repository)
        if not _DIGEST_RE.match(digest):
            raise RegistryError(f"'{digest}' is not a sha256 digest")
        if not _TAG_RE.match(tag):
            raise RegistryError(f"'{tag}' is not a valid tag (letters, digits, _ . -; 128 at most)")
        found = self._manifest(repository, digest)
        if found is None:
            raise RegistryError(f"{repository}@{digest} is not in registry {self.host}")
        raw, media_type, _ = found
        resp = self._request(
            "PUT",
            f"/v2/{repository}/manifests/{tag}",
            headers={"Content-Type": media_type},
            data=raw,
        )
        if resp.status_code not in (200, 201):
            raise self._fail(resp, f"PUT {repository}:{tag}")
        echoed = resp.headers.get("Docker-Content-Digest")
        if echoed and echoed != digest:
            raise RegistryError(
                f"registry {self.host} stored {repository}:{tag} as {echoed}, not {digest}"
            )


def _check_repository(repository: str) -> None:
    if not repository or not all(_COMPONENT_RE.match(p) for p in repository.split("/")):
        raise RegistryError(f"'{repository}' is not a valid repository name")


def _check_reference(reference: str) -> None:
    if not (_TAG_RE.match(reference) or _DIGEST_RE.match(reference)):
        raise RegistryError(f"'{reference}' is neither a tag nor a sha256 digest")
