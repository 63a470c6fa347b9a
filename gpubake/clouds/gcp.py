"""Google Cloud: credentials (google.auth.default()), the Compute Engine clients (REST) and
their errors as one line, and the image lookups, for the build's preflight and for
`gpubake job` (gpubake.jobs.gcp).

Tests point the clients at a stand-in with `endpoint=` or $GPUBAKE_COMPUTE_ENDPOINT; a plain
http:// endpoint is never sent credentials (anonymous, unless credentials are passed in).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

from gpubake import GpubakeError, one_line
from gpubake.clouds import CloudError

#: A Compute Engine API endpoint other than Google's (a test stand-in), like endpoint=.
ENDPOINT_ENV = "GPUBAKE_COMPUTE_ENDPOINT"
#: What gpubake's own calls are authorised for.
CLIENT_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
CALL_TIMEOUT_S = 60.0
_HTTP_PREFIX = re.compile(r"^(?:GET|POST|PUT|PATCH|DELETE) \S+: ")
NO_CREDENTIALS = (
    "no GCP credentials: run `gcloud auth application-default login` (or set "
    "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file)"
)


def api_message(exc: Any) -> str:
    return one_line(_HTTP_PREFIX.sub("", str(getattr(exc, "message", "") or exc)))


def describe(credentials: Any) -> str:
    """Where credentials came from, as the build's notes say it."""
    email = getattr(credentials, "service_account_email", None)
    kind = type(credentials).__module__ + "." + type(credentials).__name__
    if kind.startswith("google.auth.compute_engine"):
        return "the VM's service account (metadata server)"
    if email and "service_account" in kind:
        return f"service account {email}"
    if kind.startswith("google.auth.external_account") or "identity_pool" in kind:
        return "workload identity federation"
    if kind == "google.oauth2.credentials.Credentials":
        return "a user's application default credentials"
    return type(credentials).__name__


class GcpSession:
    """One project's Compute Engine API: `error_type` is what its failures raise (one line)."""

    def __init__(
        self,
        project: str,
        *,
        endpoint: str | None = None,
        credentials: Any = None,
        error_type: type[GpubakeError] = CloudError,
        forbidden_hint: str = "the account needs roles/compute.imageUser",
    ) -> None:
        self.project = project
        self.endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or None
        self.error_type, self.forbidden_hint = error_type, forbidden_hint
        self._given_credentials = credentials
        self._credentials = credentials
        self._clients: dict[type, Any] = {}

    @property
    def _anonymous(self) -> bool:
        """A plain-http endpoint (a stand-in on loopback) gets no credentials."""
        return bool(self.endpoint and self.endpoint.startswith("http://"))

    def check_credentials(self) -> str:
        """Where the credentials come from (Packer's and gpubake's own: Application Default
        Credentials, no CLI needed); refuses when there are none."""
        if self._given_credentials is not None:
            return "the credentials given"
        import google.auth
        from google.auth import exceptions as aexc

        try:
            credentials, _ = google.auth.default(scopes=list(CLIENT_SCOPES))
        except aexc.DefaultCredentialsError:
            if self._anonymous:  # a stand-in needs none
                return f"none: {self.endpoint} is answered anonymously"
            raise self.error_type(NO_CREDENTIALS) from None
        except aexc.GoogleAuthError as exc:
            raise self.error_type(f"reading the GCP credentials: {one_line(str(exc))}") from None
        if not self._anonymous:
            self._credentials = credentials
        return describe(credentials)

    def _creds(self) -> Any:
        if self._credentials is None:
            if self._anonymous:
                from google.auth.credentials import AnonymousCredentials

                self._credentials = AnonymousCredentials()
            else:
                import google.auth

                with self._api("looking up GCP credentials"):
                    self._credentials, _ = google.auth.default(scopes=list(CLIENT_SCOPES))
        return self._credentials

    def _client(self, kind: str) -> Any:
        from google.cloud import compute_v1

        cls = getattr(compute_v1, kind)
        if cls not in self._clients:
            from google.api_core.client_options import ClientOptions

            opts = ClientOptions(api_endpoint=self.endpoint) if self.endpoint else None
            self._clients[cls] = cls(
                credentials=self._creds(), client_options=opts, transport="rest"
            )
        return self._clients[cls]

    @contextlib.contextmanager
    def _api(self, what: str) -> Iterator[None]:
        """google.api_core / google.auth failures as one line of error_type."""
        import requests
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as aexc

        where = self.endpoint or "compute.googleapis.com"
        error = self.error_type
        try:
            yield
        except aexc.DefaultCredentialsError:
            raise error(NO_CREDENTIALS) from None
        except (aexc.RefreshError, gexc.Unauthorized) as exc:
            raise error(
                f"{what}: GCP refused the credentials ({api_message(exc)}): run "
                "`gcloud auth application-default login`"
            ) from None
        except gexc.Forbidden as exc:
            raise error(
                f"{what}: permission denied in project {self.project} ({api_message(exc)}): "
                f"{self.forbidden_hint}"
            ) from None
        except gexc.GoogleAPICallError as exc:
            raise error(f"{what}: {exc.code} {api_message(exc)}") from None
        except (gexc.RetryError, aexc.TransportError, requests.RequestException) as exc:
            raise error(
                f"{what}: the Compute Engine API at {where} could not be reached "
                f"({one_line(str(exc))[:200]}): check the network"
            ) from None
        except gexc.GoogleAPIError as exc:
            raise error(f"{what}: {one_line(str(exc))}") from None

    def _get(
        self, kind: str, method: str, what: str, *, missing: bool = False, **kwargs: Any
    ) -> Any:
        """One call; with missing=True a 404 gives None instead of an error."""
        from google.api_core.exceptions import NotFound

        with self._api(what):
            try:
                return getattr(self._client(kind), method)(timeout=CALL_TIMEOUT_S, **kwargs)
            except NotFound:
                if missing:
                    return None
                raise

    def find_labelled_image(self, key: str, value: str) -> str | None:
        """The newest image of the project labelled key=value, or None."""
        from google.cloud import compute_v1

        request = compute_v1.ListImagesRequest(
            project=self.project, filter=f'labels.{key} = "{value}"'
        )
        with self._api(f"looking up images labelled {key}={value[:12]}..."):
            found = list(self._client("ImagesClient").list(request=request, timeout=CALL_TIMEOUT_S))
        newest = sorted(found, key=lambda image: image.creation_timestamp or "")
        return newest[-1].name if newest else None


# -- what the Compute Engine API refuses, known offline -------------------------------------
# Each rule from Google's own documentation (the page beside it); a value that breaks one is
# refused in one line naming the value and the rule, before any request is printed or sent.

#: https://cloud.google.com/compute/docs/naming-resources (RFC 1035)
_RESOURCE_NAME = re.compile(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$")
#: https://cloud.google.com/compute/docs/machine-resource (predefined and custom types)
_MACHINE_TYPE = re.compile(
    r"^(?:[a-z][a-z0-9]*-(?:standard|highmem|highcpu|megamem|ultramem|hypermem|highgpu|"
    r"megagpu|ultragpu|edgegpu|highlssd|standardlssd)-\d+g?(?:-[a-z]+)?|"
    r"(?:[a-z][a-z0-9]*-)?custom-\d+-\d+(?:-ext)?|[a-z]\d-(?:micro|small|medium))$"
)
#: https://cloud.google.com/compute/docs/gpus#n1-gpus: GPUs attached to N1 machine types,
#: and how many one VM may have
N1_GPU_COUNTS = {
    "nvidia-tesla-t4": (1, 2, 4),
    "nvidia-tesla-v100": (1, 2, 4, 8),
    "nvidia-tesla-p100": (1, 2, 4),
    "nvidia-tesla-p4": (1, 2, 4),
}
#: https://cloud.google.com/compute/docs/access/service-accounts (an email, or "default")
_SERVICE_ACCOUNT = re.compile(r"^[a-z0-9][a-z0-9._+-]*@[a-z0-9-]+(?:\.[a-z0-9-]+)+$")
#: https://cloud.google.com/compute/docs/instances/limit-vm-runtime
MAX_RUN_DURATION_S = (30, 120 * 24 * 3600)
#: https://cloud.google.com/compute/docs/disks#pdspecs: a balanced persistent disk
DISK_GB = (10, 65536)


#: https://cloud.google.com/resource-manager/docs/creating-managing-projects (6-30 characters;
#: a domain-scoped project has its domain and a colon before)
_PROJECT = re.compile(r"^(?:[a-z][a-z0-9.-]*[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
#: https://cloud.google.com/compute/docs/regions-zones: a zone is its region and a letter
_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")


def check_project(value: str, source: str = "--project") -> str:
    if not _PROJECT.match(value):
        raise CloudError(
            f"{source} '{value}' is not a GCP project id: 6 to 30 lowercase letters, digits "
            "and hyphens, starting with a letter and not ending with a hyphen, e.g. my-project-123"
        )
    return value


def check_zone(value: str, source: str = "--zone") -> str:
    if not _ZONE.match(value):
        raise CloudError(
            f"{source} '{value}' is not a GCP zone: write region and zone letter, "
            "e.g. us-central1-a"
        )
    return value


def check_resource_name(value: str, option: str) -> None:
    if not _RESOURCE_NAME.match(value):
        raise CloudError(
            f"{option} {value!r}: GCP names are 1-63 characters of a-z, 0-9 and '-', starting "
            "with a letter and not ending with '-'"
        )


def check_image(value: str) -> None:
    """An image name, family/NAME, or projects/PROJECT/global/images/[family/]NAME."""
    path = value[value.find("projects/") :] if "projects/" in value else value
    match = re.match(r"^projects/([^/]+)/global/images/(?:family/)?([^/]+)$", path)
    name = match[2] if match else value.removeprefix("family/")
    if not match and "/" in name:
        raise CloudError(
            f"--image {value!r}: give an image name, family/NAME or "
            "projects/PROJECT/global/images/[family/]NAME"
        )
    check_resource_name(name, "--image")


def check_machine_type(value: str) -> None:
    if not _MACHINE_TYPE.match(value):
        raise CloudError(
            f"--machine-type {value!r} is no Compute Engine machine type: SERIES-TYPE-CPUS "
            "(n1-standard-8, a2-highgpu-1g, g2-standard-4) or [SERIES-]custom-CPUS-MEMORY_MB"
        )


def check_gpus(accelerator: str, count: int, machine_type: str, builtin: bool) -> None:
    """GPUs attached to a machine type (not built in): N1 only, in the counts allowed."""
    if builtin:
        return
    counts = N1_GPU_COUNTS.get(accelerator)
    if counts is None:
        return  # comes built into its own machine types (A2, A3, A4, G2, G4)
    if not machine_type.startswith(("n1-", "custom-")):
        raise CloudError(
            f"--machine-type {machine_type}: {accelerator} GPUs attach to N1 machine types only "
            "(n1-standard-8, n1-highmem-16, ...)"
        )
    if count not in counts:
        allowed = ", ".join(map(str, counts))
        raise CloudError(
            f"--gpu-count {count}: a VM takes {allowed} {accelerator} GPUs, no other number"
        )


def check_service_account(value: str) -> None:
    if value != "default" and not _SERVICE_ACCOUNT.match(value):
        raise CloudError(
            f"--service-account {value!r} is no service account: give its email "
            "(NAME@PROJECT.iam.gserviceaccount.com) or default"
        )


def check_max_run_duration(seconds: int) -> None:
    low, high = MAX_RUN_DURATION_S
    if not low <= seconds <= high:
        raise CloudError(
            f"--max-run-duration {seconds} s: Compute Engine takes 30 s to 120 days "
            f"({low} to {high} s)"
        )


def check_disk_size(gb: int) -> None:
    low, high = DISK_GB
    if not low <= gb <= high:
        raise CloudError(f"--disk-size {gb} GB: a balanced persistent disk is {low} to {high} GB")


def check_results(url: str) -> None:
    if not url.startswith("gs://"):
        raise CloudError(
            f"--results {url}: GCP jobs write to Cloud Storage: give gs://BUCKET/PREFIX"
        )
