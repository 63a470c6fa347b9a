"""`gpubake dataset create|list|delete`: the dataset disk the training tutorial makes by hand
(a disk, a cheap VM that copies the data in, detach), made by a short gpubake job.

The copy is an ordinary job of the runner on a CPU VM from the gpubake image: its code is
the data (a local folder, packed and uploaded under --results like `job run --code`, or a
gs:// / s3:// folder the runner fetches), its command copies the code folder onto the
dataset disk, which the runner mounts read-write and, blank as it is, makes ext4 first
(spec `dataset.format`). `job logs ID` follows it like any job. Then:

- GCP: the disk (made by the instance insert, not deleted with the VM) is the dataset; the
  stopped VM is deleted. `job run --dataset-disk NAME` attaches it read-only.
- AWS: the volume (not deleted on termination) is snapshotted, then deleted; the snapshot
  (tag gpubake-dataset=NAME) is what `job run --dataset-disk snap-...` takes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpubake.jobs import storage
from gpubake.jobs.aws import Aws
from gpubake.jobs.cloud import wait_until
from gpubake.jobs.gcp import DOWN_STATES, Gcp
from gpubake.jobs.launch import (
    AWS_DATASET_DEVICE,
    DEFAULT_STACK,
    GCP_DATASET_DEVICE,
    Job,
    JobError,
    JobOptions,
    make_jobs,
)
from gpubake.jobs.runner_code import job_module

DATASET_LABEL = "gpubake-dataset"
GCP_MACHINE = "e2-standard-4"
AWS_MACHINE = "m6i.large"
#: cp from the job's code folder (the data) onto the disk, then say how much there is.
COPY = (
    "bash",
    "-c",
    'cp -a --no-preserve=ownership . "$GPUBAKE_DATASET_DIR"/ && sync && '
    'du -sh "$GPUBAKE_DATASET_DIR"',
)
#: Room on the disk beyond a local folder's size (ext4's own share, later additions).
HEADROOM = 1.2
MIN_GB = 10
WAIT_S = 6 * 3600.0
POLL_S = 15.0
Echo = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class DatasetOptions:
    name: str
    cloud: str
    source: str  # a local folder, gs://BUCKET/PREFIX/ or s3://BUCKET/PREFIX/
    results: str  # where the copy job's logs (and a local folder's tarball) go
    size_gb: int | None = None
    machine_type: str | None = None
    stack: str = DEFAULT_STACK
    image: str | None = None
    project: str | None = None
    zone: str | None = None
    region: str | None = None
    profile: str | None = None
    instance_profile: str | None = None

    def job_options(self) -> JobOptions:
        local = not self.source.startswith(("gs://", "s3://"))
        return JobOptions(
            cloud=self.cloud,
            results=self.results,
            command=COPY,
            spot=False,  # a copy cut short by a preemption is a disk to throw away
            stack=self.stack,
            image=self.image,
            project=self.project,
            zone=self.zone,
            region=self.region,
            profile=self.profile,
            # GCP: the disk's place in the request (copy_job and request() make it blank)
            dataset_disk=(self.name or None) if self.cloud == "gcp" else None,
            code_dir=self.source if local else None,
            name="dataset",
            instance_profile=self.instance_profile,
        )


def check(options: DatasetOptions) -> int:
    """The source and the disk's size (GB), checked before any cloud call."""
    source = options.source
    if source.startswith(("gs://", "s3://")):
        wanted = "gs://" if options.cloud == "gcp" else "s3://"
        if not source.startswith(wanted):
            raise JobError(f"--from {source}: a {options.cloud} dataset copies from {wanted}...")
        if not options.size_gb:
            raise JobError(f"--from {source}: give --size GB (the bucket folder is not measured)")
        return options.size_gb
    folder = Path(source)
    if not folder.is_dir():
        raise JobError(f"--from {source}: no such folder (or give gs://... / s3://...)")
    used = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    need = max(MIN_GB, int(used * HEADROOM / 1e9) + 1)
    if options.size_gb and options.size_gb < need:
        raise JobError(
            f"--size {options.size_gb}: {source} holds {used / 1e9:.1f} GB: give --size {need} "
            "or more"
        )
    return options.size_gb or need


def copy_job(options: DatasetOptions) -> Job:
    """The runner's job: its code is the data, its dataset the blank disk, made ext4."""
    (job,) = make_jobs(options.job_options(), None)
    spec = dict(job.spec)
    if options.source.startswith(("gs://", "s3://")):
        spec["code"] = {"url": options.source}
    device = GCP_DATASET_DEVICE if options.cloud == "gcp" else AWS_DATASET_DEVICE
    spec["dataset"] = {"device": device, "read_only": False, "format": True}
    try:
        spec = job_module().parse_spec(json.dumps(spec))
    except job_module().SpecError as exc:
        raise JobError(f"the copy job's spec would be refused by the runner: {exc}") from None
    return dataclasses.replace(job, spec=spec)


class DatasetGcp:
    """The disk NAME in the zone, filled by a copy job on a CPU VM."""

    def __init__(self, options: DatasetOptions) -> None:
        self.options = options
        self.cloud = Gcp(options.job_options())
        self.project, self.zone = self.cloud.project, self.cloud.zone
        self.machine_type = options.machine_type or GCP_MACHINE
        self.poll_interval = POLL_S

    def request(self, job: Job, size_gb: int, image: str | None = None) -> dict[str, Any]:
        """The job's instances.insert body, made a CPU VM whose dataset disk is made blank."""
        (body,) = self.cloud.requests([job], image=image)
        zone = self.zone
        body["machineType"] = f"zones/{zone}/machineTypes/{self.machine_type}"
        body.pop("guestAccelerators", None)
        body["scheduling"] = {"provisioningModel": "STANDARD", "automaticRestart": False}
        body["labels"][DATASET_LABEL] = self.options.name
        disk = body["disks"][1]
        disk.pop("source")
        disk["mode"] = "READ_WRITE"
        disk["initializeParams"] = {
            "diskName": self.options.name,
            "diskSizeGb": str(size_gb),
            "diskType": f"zones/{zone}/diskTypes/pd-balanced",
            "labels": {DATASET_LABEL: self.options.name},
        }
        return body

    def _get(self, kind: str, method: str, what: str, **kwargs: Any) -> Any:
        return self.cloud._get(kind, method, what, missing=True, project=self.project, **kwargs)

    def preflight(self) -> str:
        cloud, name = self.cloud, self.options.name
        cloud.check_credentials()
        image = cloud.resolve_image()
        machine = self._get(
            "MachineTypesClient",
            "get",
            f"looking up machine type {self.machine_type}",
            zone=self.zone,
            machine_type=self.machine_type,
        )
        if machine is None:
            raise JobError(
                f"machine type {self.machine_type} is not offered in zone {self.zone}: pass "
                "another --machine-type"
            )
        if self._get("DisksClient", "get", f"looking up disk {name}", zone=self.zone, disk=name):
            raise JobError(
                f"disk {name} exists in {self.zone}: use it (`job run --dataset-disk {name}`), "
                f"or delete it first (`gpubake dataset delete {name} ...`)"
            )
        storage.probe(self.options.results)
        return str(image)

    def run(self, job: Job, body: dict[str, Any], echo: Echo) -> str:
        """Start the copy, wait for the runner to power the VM off, delete the VM; the disk."""
        from google.cloud import compute_v1

        instance = compute_v1.Instance.from_json(json.dumps(body))
        self.cloud.operate(
            "InstancesClient", "insert_unary", f"starting the copy VM {job.id}",
            self.cloud.create_timeout, zone=self.zone, instance_resource=instance,
        )  # fmt: skip
        echo(f"copying on {job.id} (follow it: gpubake job logs {job.id} --follow)")

        def down() -> bool:
            inst = self._get(
                "InstancesClient",
                "get",
                f"looking up VM {job.id}",
                zone=self.zone,
                instance=job.id,
            )
            return inst is None or inst.status in DOWN_STATES

        wait_until(f"copy job {job.id}", down, timeout=WAIT_S, poll=self.poll_interval, echo=echo)
        result = storage.outcome(job.results)
        self.cloud.operate(
            "InstancesClient", "delete_unary", f"deleting the copy VM {job.id}",
            self.cloud.stop_timeout, zone=self.zone, instance=job.id,
        )  # fmt: skip
        if not result or result.get("state") != "succeeded":
            self.delete()
            state = result.get("state", "no outcome") if result else "no outcome"
            raise JobError(
                f"the copy job {job.id} ended {state}: disk {self.options.name} was removed; "
                f"see `gpubake job logs {job.id}`"
            )
        return self.options.name

    def delete(self) -> bool:
        return self.cloud.operate(
            "DisksClient", "delete_unary", f"deleting disk {self.options.name}",
            self.cloud.stop_timeout, zone=self.zone, disk=self.options.name,
        )  # fmt: skip

    def list(self) -> list[dict[str, Any]]:
        from google.cloud import compute_v1

        request = compute_v1.ListDisksRequest(
            project=self.project, zone=self.zone, filter=f"labels.{DATASET_LABEL}:*"
        )
        with self.cloud._api(f"listing the dataset disks in {self.zone}"):
            found = list(self.cloud._client("DisksClient").list(request=request))
        return [
            {
                "name": d.name,
                "id": d.name,
                "size_gb": d.size_gb,
                "created": d.creation_timestamp,
                "users": len(d.users),
            }
            for d in found
        ]


class DatasetAws:
    """A snapshot tagged gpubake-dataset=NAME, of a volume a copy job filled."""

    def __init__(self, options: DatasetOptions) -> None:
        self.options = options
        self.cloud = Aws(options.job_options(), instance_profile=options.instance_profile)
        self.machine_type = options.machine_type or AWS_MACHINE
        self.poll_interval = POLL_S

    def request(self, job: Job, size_gb: int, image_id: str | None = None) -> dict[str, Any]:
        (run,) = self.cloud.requests([job], image_id)
        tags = [{"Key": DATASET_LABEL, "Value": self.options.name}]
        run["InstanceType"] = self.machine_type
        run.pop("InstanceMarketOptions", None)
        for spec in run["TagSpecifications"]:
            spec["Tags"] = spec["Tags"] + tags
        run["BlockDeviceMappings"] = [
            {
                "DeviceName": AWS_DATASET_DEVICE,
                "Ebs": {
                    "VolumeSize": size_gb,
                    "VolumeType": "gp3",
                    "Encrypted": True,
                    "DeleteOnTermination": False,  # snapshotted after the copy, then deleted
                },
            }
        ]
        return run

    def _call(self, what: str, operation: str, **kwargs: Any) -> Any:
        return self.cloud._call(what, "ec2", operation, **kwargs)

    def preflight(self) -> str:
        if not self.options.instance_profile:
            raise JobError(
                "--instance-profile is required on AWS: the copy VM reads the source and writes "
                "its logs with that profile's role"
            )
        cloud = self.cloud
        cloud.check_credentials()
        image = cloud.find_image()
        offers = self._call(
            f"looking up where {self.machine_type} is offered",
            "describe_instance_type_offerings",
            Filters=[{"Name": "instance-type", "Values": [self.machine_type]}],
        )["InstanceTypeOfferings"]
        if not offers:
            raise JobError(
                f"instance type {self.machine_type} is not offered in {cloud.region}: pass "
                "another --machine-type"
            )
        if self.snapshots():
            raise JobError(
                f"a dataset {self.options.name} exists in {cloud.region}: delete it first "
                f"(`gpubake dataset delete {self.options.name} ...`) or pick another name"
            )
        cloud.check_instance_profile(str(self.options.instance_profile))
        storage.probe(self.options.results)
        return str(image["ImageId"])

    def _instance(self, instance_id: str) -> dict[str, Any] | None:
        found = self._call(
            f"looking up instance {instance_id}", "describe_instances", InstanceIds=[instance_id]
        )
        items = [i for r in found.get("Reservations", []) for i in r.get("Instances", [])]
        return items[0] if items else None

    def run(self, job: Job, request: dict[str, Any], echo: Echo) -> str:
        reply = self._call(f"starting the copy instance {job.id}", "run_instances", **request)
        instance_id = str(reply["Instances"][0]["InstanceId"])
        echo(f"copying on {instance_id} (follow it: gpubake job logs {job.id} --follow)")
        volume_id = ""

        def down() -> bool:
            nonlocal volume_id
            inst = self._instance(instance_id)
            for mapping in (inst or {}).get("BlockDeviceMappings", []):
                if mapping.get("DeviceName") == AWS_DATASET_DEVICE:
                    volume_id = mapping["Ebs"]["VolumeId"]
            return inst is None or inst["State"]["Name"] in ("terminated", "stopped")

        wait_until(f"copy job {job.id}", down, timeout=WAIT_S, poll=self.poll_interval, echo=echo)
        result = storage.outcome(job.results)
        self._call(f"terminating {instance_id}", "terminate_instances", InstanceIds=[instance_id])
        if not volume_id:
            raise JobError(f"the copy instance {instance_id} had no volume at {AWS_DATASET_DEVICE}")
        ok = bool(result and result.get("state") == "succeeded")
        snapshot = ""
        if ok:
            echo(f"snapshotting volume {volume_id}")
            snapshot = self._call(
                f"snapshotting volume {volume_id}",
                "create_snapshot",
                VolumeId=volume_id,
                Description=f"gpubake dataset {self.options.name} from {self.options.source}",
                TagSpecifications=[
                    {
                        "ResourceType": "snapshot",
                        "Tags": [{"Key": DATASET_LABEL, "Value": self.options.name}],
                    }
                ],
            )["SnapshotId"]
            wait_until(
                f"snapshot {snapshot}",
                lambda: self._snapshot_state(snapshot) == "completed",
                timeout=WAIT_S,
                poll=self.poll_interval,
                echo=echo,
            )

        def detached() -> bool:
            found = self._call(
                f"looking up volume {volume_id}", "describe_volumes", VolumeIds=[volume_id]
            )["Volumes"]
            return not found or found[0]["State"] == "available"

        wait_until(
            f"volume {volume_id} detaching", detached, timeout=WAIT_S, poll=self.poll_interval
        )
        self._call(f"deleting volume {volume_id}", "delete_volume", VolumeId=volume_id)
        if not ok:
            state = result.get("state", "no outcome") if result else "no outcome"
            raise JobError(
                f"the copy job {job.id} ended {state}: no snapshot was made; see "
                f"`gpubake job logs {job.id}`"
            )
        return str(snapshot)

    def _snapshot_state(self, snapshot: str) -> str:
        found = self._call(
            f"looking up snapshot {snapshot}", "describe_snapshots", SnapshotIds=[snapshot]
        )["Snapshots"]
        return str(found[0]["State"]) if found else "gone"

    def snapshots(self, name: str | None = None) -> list[dict[str, Any]]:
        values = [name or self.options.name] if (name or self.options.name) else ["*"]
        return self._call(
            "listing the dataset snapshots",
            "describe_snapshots",
            OwnerIds=["self"],
            Filters=[{"Name": f"tag:{DATASET_LABEL}", "Values": values}],
        )["Snapshots"]

    def delete(self) -> bool:
        found = self.snapshots()
        for snap in found:
            self._call(
                f"deleting snapshot {snap['SnapshotId']}",
                "delete_snapshot",
                SnapshotId=snap["SnapshotId"],
            )
        return bool(found)

    def list(self) -> list[dict[str, Any]]:
        rows = []
        for snap in self.snapshots("*"):
            tags = {t["Key"]: t["Value"] for t in snap.get("Tags", [])}
            started = snap.get("StartTime")
            rows.append(
                {
                    "name": tags.get(DATASET_LABEL, ""),
                    "id": snap["SnapshotId"],
                    "size_gb": snap.get("VolumeSize"),
                    "state": snap.get("State"),
                    "created": started.isoformat() if started else "",
                }
            )
        return rows
