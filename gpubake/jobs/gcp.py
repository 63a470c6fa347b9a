"""GCP jobs: one Compute Engine VM per job, through google-cloud-compute (REST transport).

Each VM boots a gpubake image (family gpubake-<stack>, or --image) whose runner reads the job's
spec from the metadata attribute `gpubake-job`, runs it, syncs its results to the bucket and
powers the VM off. The VM is Spot by default (deleted when preempted), has no live migration
(GPUs), and with --max-run-duration GCE deletes it after that long; labels gpubake-job,
gpubake-sweep and gpubake-deadline let `job status|stop|gc` find it again.

`Gcp.preflight` checks, before anything is created, everything a VM would otherwise fail on
minutes later and after costing money: credentials, the image (and its runner label), the GPU
and machine type in the zone, the dataset disk, and (last) that the results location is
writable.

The dataset disk is attached READ_ONLY to every job's VM (GCE attaches one disk to several VMs
only when every attachment is read-only). The disk's `users` do not say how each user has it
attached, so preflight asks each user instance (instances.get, its `disks[].mode`) and refuses
a disk any of them has read-write, or whose users it cannot read.

Tests point the client at a stand-in with `api_endpoint=` or $GPUBAKE_COMPUTE_ENDPOINT; a plain
http:// endpoint is never sent credentials (anonymous, unless credentials are passed in).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from gpubake import GpubakeError, one_line, stacks
from gpubake.build.plan import required_disk_gb
from gpubake.clouds import gcp as rules
from gpubake.clouds.gcp import CALL_TIMEOUT_S, GcpSession
from gpubake.jobs import storage
from gpubake.jobs.cloud import (
    DEADLINE_LABEL,
    JOB_LABEL,
    RUNNER_IMAGE_LABEL,
    SWEEP_LABEL,
    Instance,
)
from gpubake.jobs.launch import GCP_DATASET_DEVICE, Job, JobError, JobOptions
from gpubake.jobs.runner_code import job_module

#: What the VM's service account may do: write results to GCS, write logs.
VM_SCOPES = (
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/logging.write",
)
#: Machine families whose GPUs come with the machine type (no guestAccelerators).
BUILTIN_GPU_PREFIXES = ("a2-", "a3-", "a4-", "a4x-", "g2-", "g4-")
#: Machine types that take only Hyperdisk boot disks (the rest get pd-balanced).
HYPERDISK_ONLY_PREFIXES = ("a3-ultragpu-", "a4-", "a4x-", "g4-")
#: G2 machine types by their number of L4 GPUs (the smallest of each).
G2_BY_COUNT = {1: "g2-standard-8", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"}
#: The GPU counts of the A-series machine types named <series>-<N>g.
A_SERIES_COUNTS = {
    "a2-highgpu": (1, 2, 4, 8),
    "a2-ultragpu": (1, 2, 4, 8),
    "a2-megagpu": (16,),
    "a3-highgpu": (1, 2, 4, 8),
    "a3-megagpu": (8,),
    "a3-edgegpu": (8,),
    "a3-ultragpu": (8,),
}
#: Room for checkpoints, logs and the code next to the image's own content.
MIN_BOOT_DISK_GB = 100
NETWORK = "global/networks/default"
CREATE_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 600.0
POLL_S = 5.0
#: Instance states that are not running any more (or are on their way down).
_STOPPED = frozenset({"STOPPING", "STOPPED", "TERMINATED", "SUSPENDING", "SUSPENDED"})
DOWN_STATES = frozenset({"STOPPED", "TERMINATED"})
_IMAGE_PATH = re.compile(
    r"^(?:https://[^/]+/compute/v1/)?projects/(?P<project>[^/]+)/global/images/"
    r"(?:(?P<family>family/))?(?P<name>[^/]+)$"
)

#: The clock for gpubake-deadline labels (a test replaces it).
_now: Callable[[], float] = time.time


def quota_metric(accelerator: str) -> str:
    """The GPU quota metric of an accelerator type: nvidia-tesla-t4 -> NVIDIA_T4_GPUS,
    nvidia-a100-80gb -> NVIDIA_A100_80GB_GPUS (the names regions.get lists)."""
    model = accelerator.removeprefix("nvidia-").removeprefix("tesla-")
    return f"NVIDIA_{model.upper().replace('-', '_')}_GPUS"


def network_interfaces() -> list[Any]:
    """The default network with an external address (SSH, downloads, the bucket)."""
    from google.cloud import compute_v1

    return [
        compute_v1.NetworkInterface(
            network=NETWORK,
            access_configs=[compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")],
        )
    ]


def _short(url: str) -> str:
    """A resource URL's last segment (the name)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def _path(url: str) -> str:
    """A resource URL from `projects/` on (full and partial URLs compare equal)."""
    return url[url.find("projects/") :] if "projects/" in url else url


def settle_location(options: JobOptions) -> tuple[str, str]:
    """The project and zone: the options', else those the gcloud tools read from the
    environment; each checked for form."""
    project = (
        options.project
        or os.environ.get("GOOGLE_CLOUD_PROJECT")
        or os.environ.get("CLOUDSDK_CORE_PROJECT")
    )
    zone = options.zone or os.environ.get("CLOUDSDK_COMPUTE_ZONE")
    if not project:
        raise JobError("--project is required for --cloud gcp (or set GOOGLE_CLOUD_PROJECT)")
    if not zone:
        raise JobError(
            "--zone is required for --cloud gcp: a zone that offers the GPU, e.g. us-central1-a "
            "(or set CLOUDSDK_COMPUTE_ZONE)"
        )
    try:
        rules.check_project(project)
        rules.check_zone(zone)
    except GpubakeError as exc:
        raise JobError(str(exc)) from None
    return project, zone


def default_machine_type(gpu: str, count: int) -> str:
    """The smallest machine type for `count` GPUs of the model: images/gpus.yml's
    build_machine_type, or for machine types with the GPUs built in the one of the same series
    with `count` of them (A series: the count is in the name; G2: a table)."""
    raw = stacks.gpus_data()["gpus"][gpu].get("gcp", {})
    base = raw.get("build_machine_type")
    if not base:
        raise JobError(
            f"--gpu {gpu} has no GCP machine type in images/gpus.yml: pass --machine-type"
        )
    if base.startswith("g2-"):
        if count not in G2_BY_COUNT:
            raise JobError(f"--gpu-count {count}: G2 machines carry 1, 2, 4 or 8 L4 GPUs")
        return G2_BY_COUNT[count] if count > 1 else base
    match = re.match(r"^(a\d+x?-[a-z]+)-(\d+)g$", base)
    if match and base.startswith(BUILTIN_GPU_PREFIXES):
        counts = A_SERIES_COUNTS.get(match[1], (count,))
        if count not in counts:
            listed = ", ".join(map(str, counts))
            raise JobError(
                f"--gpu-count {count}: GCP's {match[1]} machines for --gpu {gpu} carry {listed} "
                f"GPUs: pass --gpu-count {counts[0]}, or a --machine-type"
            )
        return f"{match[1]}-{count}g"
    return base


def boot_disk_gb(stack: str) -> int:
    """The boot disk: what the stack needs (plan.required_disk_gb), at least MIN_BOOT_DISK_GB."""
    try:
        need = required_disk_gb(stacks.resolve(stack, target="gcp-image"))
    except GpubakeError:
        need = 0  # an --image of a stack this checkout does not know: the minimum
    return max(MIN_BOOT_DISK_GB, need)


def check_offline(options: JobOptions, machine_type: str, accelerator: str, builtin: bool) -> None:
    """What the Compute Engine API would refuse in the request, said before it is printed or
    sent (gpubake.clouds.gcp's rules)."""
    if options.results:  # a notebook (gpubake.notebooks) has none
        rules.check_results(options.results)
    rules.check_machine_type(machine_type)
    rules.check_gpus(accelerator, options.gpu_count, machine_type, builtin)
    rules.check_service_account(options.service_account or "default")
    if options.image:
        rules.check_image(options.image)
    if options.dataset_disk:
        rules.check_resource_name(options.dataset_disk, "--dataset-disk")
    if options.max_run_duration:
        rules.check_max_run_duration(options.max_run_duration)


class Gcp(GcpSession):
    """Jobs as Compute Engine VMs in one project and zone; the credentials, clients and their
    errors are gpubake.clouds.gcp's."""

    def __init__(
        self,
        options: JobOptions,
        *,
        api_endpoint: str | None = None,
        credentials: Any = None,
        service_account: str | None = "default",
    ) -> None:
        if options.cloud != "gcp":
            raise JobError(f"--cloud {options.cloud}: this is the GCP module")
        self.options = options
        project, self.zone = settle_location(options)
        super().__init__(
            project,
            endpoint=api_endpoint,
            credentials=credentials,
            error_type=JobError,
            forbidden_hint=(
                "the account needs roles/compute.instanceAdmin.v1 and roles/iam.serviceAccountUser"
            ),
        )
        gcp = stacks.gpus_data()["gpus"].get(options.gpu, {}).get("gcp", {})
        accelerators = list(gcp.get("accelerators") or [])
        if not accelerators:
            offered = sorted(
                k
                for k, v in stacks.gpus_data()["gpus"].items()
                if v.get("gcp", {}).get("accelerators")
            )
            raise JobError(
                f"--gpu {options.gpu} is not offered on GCP: use one of {', '.join(offered)}"
            )
        self.gpu_types = accelerators  # the first is attached; any may come built in
        self.accelerator = accelerators[0]
        self.machine_type = options.machine_type or default_machine_type(
            options.gpu, options.gpu_count
        )
        self.builtin_gpus = self.machine_type.startswith(BUILTIN_GPU_PREFIXES)
        check_offline(options, self.machine_type, self.accelerator, self.builtin_gpus)
        self.boot_disk_gb = boot_disk_gb(options.stack)
        self.service_account = service_account or "default"  # the project's default account
        self.poll_interval = POLL_S
        self.create_timeout = CREATE_TIMEOUT_S
        self.stop_timeout = STOP_TIMEOUT_S
        self._image: str | None = None  # what preflight resolved

    def wait(self, operation: Any, what: str, timeout: float) -> None:
        """Until the zonal operation is DONE (zoneOperations.wait, bounded); its error, if
        any, as a JobError."""
        import requests
        from google.api_core.exceptions import DeadlineExceeded
        from google.cloud import compute_v1

        done = compute_v1.Operation.Status.DONE
        deadline = time.monotonic() + timeout
        while operation.status != done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobError(
                    f"{what}: operation {operation.name} is still {operation.status.name} after "
                    f"{timeout:.0f} s: see `gcloud compute operations describe {operation.name} "
                    f"--zone {self.zone}`"
                )
            with self._api(what):
                try:
                    operation = self._client("ZoneOperationsClient").wait(
                        project=self.project,
                        zone=self.zone,
                        operation=operation.name,
                        timeout=min(left, 150.0),
                    )
                except (DeadlineExceeded, requests.Timeout):
                    continue  # the server holds a wait up to 2 minutes: ask again
        errors = list(operation.error.errors) if operation.error else []
        if errors or operation.http_error_status_code >= 400:
            codes = ", ".join(e.code for e in errors if e.code) or str(
                operation.http_error_status_code
            )
            text = "; ".join(one_line(e.message) for e in errors if e.message)
            text = text or one_line(operation.http_error_message)
            raise JobError(f"{what}: {codes}: {text}{_hint(codes)}")

    def operate(self, kind: str, method: str, what: str, timeout: float, **kwargs: Any) -> bool:
        """One write (insert, start, stop, delete) of the project, waited for; False where
        its resource is not there (404)."""
        operation = self._get(kind, method, what, missing=True, project=self.project, **kwargs)
        if operation is None:
            return False
        self.wait(operation, what, timeout)
        return True

    # ------------------------------------------------------------------ the VM

    def image_reference(self) -> str:
        """The image as given, without asking the cloud (before preflight resolves it)."""
        image = self.options.image
        if image is None:
            return f"projects/{self.project}/global/images/family/gpubake-{self.options.stack}"
        if image.startswith(("projects/", "https://")):
            return image
        return f"projects/{self.project}/global/images/{image}"

    def boot_disk(self, image: str) -> Any:
        """The boot disk from `image`, deleted with the VM."""
        from google.cloud import compute_v1

        disk_type = (
            "hyperdisk-balanced"
            if self.machine_type.startswith(HYPERDISK_ONLY_PREFIXES)
            else "pd-balanced"
        )
        return compute_v1.AttachedDisk(
            boot=True,
            auto_delete=True,
            type_="PERSISTENT",
            mode="READ_WRITE",
            initialize_params=compute_v1.AttachedDiskInitializeParams(
                source_image=image,
                disk_size_gb=self.boot_disk_gb,
                disk_type=f"zones/{self.zone}/diskTypes/{disk_type}",
            ),
        )

    def accelerators(self) -> list[Any]:
        """The GPUs to attach (none where the machine type has them built in)."""
        from google.cloud import compute_v1

        if self.builtin_gpus:
            return []
        return [
            compute_v1.AcceleratorConfig(
                accelerator_type=f"zones/{self.zone}/acceleratorTypes/{self.accelerator}",
                accelerator_count=self.options.gpu_count,
            )
        ]

    def _instance(self, job: Job, image: str, now: float) -> Any:
        from google.cloud import compute_v1

        options, zone = self.options, self.zone
        labels = {JOB_LABEL: job.id}
        if job.sweep:
            labels[SWEEP_LABEL] = job.sweep
        scheduling = compute_v1.Scheduling(
            provisioning_model="SPOT" if options.spot else "STANDARD",
            on_host_maintenance="TERMINATE",
            automatic_restart=False,
        )
        if options.spot:
            scheduling.instance_termination_action = "DELETE"
        if options.max_run_duration:
            scheduling.max_run_duration = compute_v1.Duration(seconds=options.max_run_duration)
            scheduling.instance_termination_action = "DELETE"
            labels[DEADLINE_LABEL] = str(int(now + options.max_run_duration))
        disks = [self.boot_disk(image)]
        if options.dataset_disk:
            disks.append(
                compute_v1.AttachedDisk(
                    boot=False,
                    auto_delete=False,
                    type_="PERSISTENT",
                    mode="READ_ONLY",
                    device_name=GCP_DATASET_DEVICE,
                    source=f"projects/{self.project}/zones/{zone}/disks/{options.dataset_disk}",
                )
            )
        return compute_v1.Instance(
            name=job.id,
            machine_type=f"zones/{zone}/machineTypes/{self.machine_type}",
            guest_accelerators=self.accelerators(),
            scheduling=scheduling,
            disks=disks,
            service_accounts=[
                compute_v1.ServiceAccount(email=self.service_account, scopes=list(VM_SCOPES))
            ],
            metadata=compute_v1.Metadata(
                items=[compute_v1.Items(key=job_module().GCE_ATTRIBUTE, value=job.spec_text())]
            ),
            labels=labels,
            network_interfaces=network_interfaces(),
        )

    def requests(self, jobs: list[Job], *, image: str | None = None) -> list[dict[str, Any]]:
        """The instances.insert bodies, one per job, as the API receives them (JSON, camelCase);
        no cloud access. The image: `image`, else what preflight resolved, else as given
        (--image, or the family gpubake-<stack>: GCE takes a family URL as sourceImage)."""
        from google.cloud import compute_v1

        source = image or self._image or self.image_reference()
        now = _now()
        return [
            json.loads(
                compute_v1.Instance.to_json(
                    self._instance(job, source, now),
                    use_integers_for_enums=False,
                    always_print_fields_with_no_presence=False,
                )
            )
            for job in jobs
        ]

    # ------------------------------------------------------------------ preflight

    def preflight(self, jobs: list[Job]) -> str:
        """Check what the jobs need before anything is created; returns the source image's URL.
        Raises JobError (one line with the fix) on the first thing missing."""
        if not jobs:
            raise JobError("no jobs to start")
        if not self.options.results.startswith("gs://"):
            raise JobError(
                f"--results {self.options.results}: GCP jobs write to Cloud Storage: give "
                "gs://BUCKET/PREFIX"
            )
        self.check_credentials()
        image = self.resolve_image()
        self.check_gpu()
        if self.options.dataset_disk:
            self._check_dataset_disk(self.options.dataset_disk)
        storage.probe(self.options.results)
        self._image = image
        return image

    def resolve_image(self) -> str:
        options, project = self.options, self.project
        if options.image is None:
            family = f"gpubake-{options.stack}"
            image = self._get(
                "ImagesClient",
                "get_from_family",
                f"looking up image family {family}",
                missing=True,
                project=project,
                family=family,
            )
            if image is None:
                raise JobError(
                    f"no image in family {family} in project {project}: build one with "
                    f"`gpubake build --target gcp-image --stack {options.stack} --project "
                    f"{project} --zone {self.zone}`, or pass --image"
                )
        else:
            image = self._named_image(options.image)
        if image.status and image.status != "READY":
            raise JobError(
                f"image {image.name} is {image.status}, not READY: wait for it, or pass another "
                "--image"
            )
        if image.deprecated and image.deprecated.state in ("OBSOLETE", "DELETED"):
            raise JobError(
                f"image {image.name} is {image.deprecated.state}: pass a current --image"
            )
        if image.labels.get(RUNNER_IMAGE_LABEL) != "true":
            raise JobError(
                f"image {image.name} has no label {RUNNER_IMAGE_LABEL}=true (it has no job "
                f"runner): rebuild it with `gpubake build --target gcp-image --stack "
                f"{options.stack}` (VM images include the runner), or pass an --image that has it"
            )
        if image.disk_size_gb > self.boot_disk_gb:
            self.boot_disk_gb = image.disk_size_gb  # a boot disk is never smaller than its image
        return image.self_link or self.image_reference()

    def _named_image(self, ref: str) -> Any:
        match = _IMAGE_PATH.match(ref)
        project, name = (match["project"], match["name"]) if match else (self.project, ref)
        if match and match["family"]:
            found = self._get(
                "ImagesClient",
                "get_from_family",
                f"looking up --image {ref}",
                missing=True,
                project=project,
                family=name,
            )
        else:
            found = self._get(
                "ImagesClient",
                "get",
                f"looking up --image {ref}",
                missing=True,
                project=project,
                image=name,
            )
            if found is None and not match:  # a bare name may be a family
                found = self._get(
                    "ImagesClient",
                    "get_from_family",
                    f"looking up --image {ref}",
                    missing=True,
                    project=project,
                    family=name,
                )
        if found is None:
            raise JobError(
                f"--image {ref}: no such image or image family in project {project}: see "
                f"`gcloud compute images list --project {project} --no-standard-images`"
            )
        return found

    def check_gpu(self) -> None:
        options, zone = self.options, self.zone
        accelerator = self._get(
            "AcceleratorTypesClient",
            "get",
            f"looking up GPU {self.accelerator} in zone {zone}",
            missing=True,
            project=self.project,
            zone=zone,
            accelerator_type=self.accelerator,
        )
        if accelerator is None:
            raise JobError(
                f"GPU {options.gpu} ({self.accelerator}) is not offered in zone {zone} (or the "
                f"zone is unknown): pick a zone that offers it, see `gcloud compute "
                f"accelerator-types list --filter=name={self.accelerator}`"
            )
        machine = self._get(
            "MachineTypesClient",
            "get",
            f"looking up machine type {self.machine_type} in zone {zone}",
            missing=True,
            project=self.project,
            zone=zone,
            machine_type=self.machine_type,
        )
        if machine is None:
            raise JobError(
                f"machine type {self.machine_type} is not offered in zone {zone}: pick another "
                f"--machine-type (`gcloud compute machine-types list --zones {zone}`) or zone"
            )
        built_in = [
            (a.guest_accelerator_type, a.guest_accelerator_count) for a in machine.accelerators
        ]
        if built_in:
            self.builtin_gpus = True
            kind, count = built_in[0]
            if kind not in self.gpu_types or count != options.gpu_count:
                raise JobError(
                    f"machine type {self.machine_type} comes with {count} {kind}, not "
                    f"{options.gpu_count} {self.accelerator} (--gpu {options.gpu} --gpu-count "
                    f"{options.gpu_count}): pass a --machine-type with those GPUs built in"
                )
        elif self.builtin_gpus:
            self.builtin_gpus = False  # the API says it has none: attach them
        most = accelerator.maximum_cards_per_instance
        if not self.builtin_gpus and most and options.gpu_count > most:
            raise JobError(
                f"--gpu-count {options.gpu_count}: zone {zone} attaches at most {most} "
                f"{self.accelerator} to a VM"
            )
        self.check_gpu_quota()

    def check_gpu_quota(self) -> None:
        """The region's GPU quota (regions.get), where the API lists one for the model: Spot
        VMs count against the PREEMPTIBLE_ metric where the region has it, else the standard
        one (https://cloud.google.com/compute/resource-usage#gpu_quota)."""
        region = self.zone.rsplit("-", 1)[0]
        found = self._get(
            "RegionsClient", "get", f"looking up the quotas of region {region}", missing=True,
            project=self.project, region=region,
        )  # fmt: skip
        if found is None:
            return
        quotas = {q.metric: q for q in found.quotas}
        metric = quota_metric(self.accelerator)
        spot = f"PREEMPTIBLE_{metric}"
        name = spot if self.options.spot and spot in quotas else metric
        quota = quotas.get(name)
        if quota is None:
            return  # the API does not say: the insert will
        free = int(quota.limit - quota.usage)
        if free < self.options.gpu_count:
            raise JobError(
                f"quota {name} in {region}: {free:d} of {int(quota.limit):d} free, "
                f"{self.options.gpu_count} needed: ask for more at "
                "console.cloud.google.com/iam-admin/quotas, or pick another region"
            )

    def _check_dataset_disk(self, name: str) -> None:
        zone = self.zone
        disk = self._get(
            "DisksClient",
            "get",
            f"looking up dataset disk {name}",
            missing=True,
            project=self.project,
            zone=zone,
            disk=name,
        )
        if disk is None:
            raise JobError(
                f"--dataset-disk {name}: no such disk in zone {zone} of project {self.project}: "
                "create it in that zone (e.g. from a snapshot) first"
            )
        for user in disk.users:
            mode = self._attachment_mode(user, disk.self_link or name)
            if mode != "READ_ONLY":
                how = "read-write" if mode else "in a way that cannot be read"
                raise JobError(
                    f"--dataset-disk {name} is attached {how} to {_short(user)}: detach it "
                    f"(`gcloud compute instances detach-disk {_short(user)} --disk {name} --zone "
                    f"{zone}`); jobs attach it read-only, which GCE allows only when every "
                    "attachment is read-only"
                )

    def _attachment_mode(self, user: str, disk: str) -> str | None:
        """How the instance at URL `user` has the disk attached (None: cannot tell)."""
        match = re.search(r"projects/([^/]+)/zones/([^/]+)/instances/([^/]+)$", user)
        if not match:
            return None
        instance = self._get(
            "InstancesClient",
            "get",
            f"looking up {match[3]}, a user of the dataset disk",
            missing=True,
            project=match[1],
            zone=match[2],
            instance=match[3],
        )
        if instance is None:
            return None
        for attached in instance.disks:
            if _path(attached.source) == _path(disk):
                return attached.mode or "READ_WRITE"
        return None

    # ------------------------------------------------------------------ lifecycle

    def create(self, job: Job, image: str) -> str:
        """instances.insert of the job's VM, waiting for the operation; returns its name."""
        from google.cloud import compute_v1

        what = f"creating VM {job.id} in {self.zone}"
        operation = self._get(
            "InstancesClient",
            "insert_unary",
            what,
            request=compute_v1.InsertInstanceRequest(
                project=self.project,
                zone=self.zone,
                instance_resource=self._instance(job, image, _now()),
                request_id=str(uuid.uuid4()),  # a retried insert creates one VM
            ),
        )
        self.wait(operation, what, self.create_timeout)
        return job.id

    def list(self, *, job: str | None = None, sweep: str | None = None) -> list[Instance]:
        """The job VMs in the zone (all, one job's, or one sweep's), by their labels."""
        from google.cloud import compute_v1

        exprs = [f"labels.{JOB_LABEL}:*"]
        if job:
            exprs.append(f'labels.{JOB_LABEL} = "{job}"')
        if sweep:
            exprs.append(f'labels.{SWEEP_LABEL} = "{sweep}"')
        request = compute_v1.ListInstancesRequest(
            project=self.project, zone=self.zone, filter=" ".join(f"({e})" for e in exprs)
        )
        found = []
        with self._api(f"listing job VMs in {self.zone}"):
            pager = self._client("InstancesClient").list(request=request, timeout=CALL_TIMEOUT_S)
            for inst in pager:
                row = _row(inst)
                if (
                    row
                    and (job is None or row.job == job)
                    and (sweep is None or row.sweep == sweep)
                ):
                    found.append(row)
        return sorted(found, key=lambda r: r.name)

    def stop(self, instance: Instance) -> None:
        """Stop the VM (an ACPI shutdown: the runner's unit stops as on a preemption notice,
        syncs a last time and writes _PREEMPTED), wait until it is down (bounded: past
        stop_timeout it is deleted all the same), then delete it."""
        from google.api_core.exceptions import NotFound

        name = instance.name
        what = f"stopping VM {name}"
        deadline = time.monotonic() + self.stop_timeout
        state = instance.state
        if state not in _STOPPED:
            operation = self._get(
                "InstancesClient",
                "stop_unary",
                what,
                missing=True,
                project=self.project,
                zone=self.zone,
                instance=name,
            )
            if operation is None:
                return  # gone already (a Spot VM preempted and deleted)
            self.wait(operation, what, self.stop_timeout)
        while time.monotonic() < deadline:
            with self._api(what):
                try:
                    current = self._client("InstancesClient").get(
                        project=self.project, zone=self.zone, instance=name, timeout=CALL_TIMEOUT_S
                    )
                except NotFound:
                    return
            if current.status in DOWN_STATES:
                break
            time.sleep(self.poll_interval)
        self.delete([instance])

    def delete(self, instances: list[Instance]) -> None:
        """instances.delete of each (for `job gc` and after a stop); one already gone is no
        error. The deletes are sent first, then waited for."""
        pending = []
        for instance in instances:
            what = f"deleting VM {instance.name}"
            operation = self._get(
                "InstancesClient",
                "delete_unary",
                what,
                missing=True,
                project=self.project,
                zone=self.zone,
                instance=instance.name,
            )
            if operation is not None:
                pending.append((operation, what))
        for operation, what in pending:
            self.wait(operation, what, self.stop_timeout)


def _hint(codes: str) -> str:
    if "ZONE_RESOURCE_POOL_EXHAUSTED" in codes or "STOCKOUT" in codes:
        return " (no capacity for it now: try another zone, later, or without Spot)"
    if "QUOTA" in codes:
        return " (ask for more quota: console.cloud.google.com/iam-admin/quotas)"
    return ""


def _timestamp(text: str) -> float:
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0


def _row(inst: Any) -> Instance | None:
    labels = dict(inst.labels)
    if JOB_LABEL not in labels:
        return None
    deadline = labels.get(DEADLINE_LABEL)
    return Instance(
        name=inst.name,
        job=labels[JOB_LABEL],
        sweep=labels.get(SWEEP_LABEL),
        state=inst.status,
        machine_type=_short(inst.machine_type),
        gpu=_short(inst.guest_accelerators[0].accelerator_type) if inst.guest_accelerators else "",
        created=_timestamp(inst.creation_timestamp),
        deadline=float(deadline) if deadline and deadline.isdigit() else None,
        hourly_price=None,  # the Compute API gives no prices
        stopped=inst.status in _STOPPED,
    )
