"""Training jobs on EC2 through boto3: one instance per job, the checks before any is started,
and the listing, stopping and deleting `job status|stop|gc` do.

The instance is a one-time Spot instance (or on-demand with spot=False) that terminates when
the runner powers it off (InstanceInitiatedShutdownBehavior=terminate), IMDSv2 only, with the
job's spec as its user-data (the runner's find_spec reads it) and the tags gpubake-job,
gpubake-sweep, gpubake-deadline and gpubake-results on the instance and its volumes. The
dataset is a fresh volume from a snapshot at /dev/sdf, deleted with the instance: EBS volumes
cannot be attached read-only to many instances.

Every botocore error becomes a one-line JobError that says what failed and how to fix it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Iterator
from typing import Any

from gpubake import stacks
from gpubake.clouds import aws as rules
from gpubake.clouds.aws import AwsSession
from gpubake.jobs import storage
from gpubake.jobs.cloud import DEADLINE_LABEL, JOB_LABEL, RUNNER_IMAGE_LABEL, SWEEP_LABEL, Instance
from gpubake.jobs.launch import AWS_DATASET_DEVICE, Job, JobError, JobOptions

#: The tag with the job's results prefix (where `job status` finds its markers).
RESULTS_TAG = "gpubake-results"
STACK_TAG = "gpubake-stack"
#: What requests() puts as ImageId when the AMI is only known after looking it up.
IMAGE_PLACEHOLDER = "<newest AMI tagged gpubake-stack={stack}, gpubake-job-runner=true>"
#: Instance states listed (terminated ones are gone; shutting-down is on its way there).
LISTED_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")
STOPPED_STATES = frozenset({"shutting-down", "stopping", "stopped"})
TERMINATE_BATCH = 100


def check_offline(options: JobOptions) -> None:
    """What the EC2 and IAM APIs would refuse in the request, said before it is printed or
    sent (gpubake.clouds.aws's rules)."""
    if options.results:  # a notebook (gpubake.notebooks) has none
        rules.check_results(options.results)
    rules.check_gpu_count(options.gpu_count, options.machine_type)
    if options.image:
        rules.check_ami(options.image)
    if options.dataset_disk:
        rules.check_snapshot(options.dataset_disk)
    if options.instance_profile:
        rules.check_instance_profile(options.instance_profile)
    if options.zone and options.region:
        rules.check_zone(options.zone, options.region)


class Aws(AwsSession):
    """EC2 for `gpubake job`: requests() offline, preflight() then create() per job, list(),
    stop() and delete(); the session, its clients and errors are gpubake.clouds.aws's."""

    def __init__(
        self,
        options: JobOptions,
        *,
        endpoint_url: str | None = None,
        instance_profile: str | None = None,
    ) -> None:
        super().__init__(
            options.region,
            options.profile,
            endpoint_url=endpoint_url,
            error_type=JobError,
            agent="gpubake-job",
            purpose="AWS jobs",
        )
        check_offline(options)
        self.options = options
        self.instance_profile = instance_profile
        self._type_info: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ offline: the requests

    def instance_type(self) -> str:
        """--machine-type, or the GPU's build_instance_type (images/gpus.yml); a machine type
        of another GPU's family is refused (on EC2 the instance type decides the GPU)."""
        gpu = self.options.gpu
        aws = stacks.gpus_data()["gpus"].get(gpu, {}).get("aws", {})
        families = list(aws.get("instance_families", []))
        wanted = self.options.machine_type
        if wanted:
            family = wanted.split(".", 1)[0]
            if families and family not in families:
                raise JobError(
                    f"--machine-type {wanted} carries no {gpu} GPU (on EC2 the instance type "
                    f"decides the GPU): use a {'/'.join(families)} instance type, or change --gpu"
                )
            return wanted
        default = aws.get("build_instance_type")
        if not default:
            raise JobError(
                f"--gpu {gpu} is not offered on EC2 (images/gpus.yml lists no instance type "
                "for it): choose another --gpu, or give --machine-type"
            )
        return str(default)

    def requests(self, jobs: list[Job], image_id: str | None = None) -> list[dict[str, Any]]:
        """The RunInstances keyword arguments of each job, built without asking the cloud."""
        if image_id is None:
            image = self.options.image
            image_id = (
                image
                if image and image.startswith("ami-")
                else IMAGE_PLACEHOLDER.format(stack=self.options.stack)
            )
        return [self._request(job, image_id, time.time()) for job in jobs]

    def _tags(self, job: Job, now: float) -> list[dict[str, str]]:
        tags = {"Name": job.id, JOB_LABEL: job.id}
        if job.sweep:
            tags[SWEEP_LABEL] = job.sweep
        if self.options.max_run_duration:
            tags[DEADLINE_LABEL] = str(int(now + self.options.max_run_duration))
        tags[RESULTS_TAG] = job.results
        return [{"Key": k, "Value": v} for k, v in tags.items()]

    def _request(self, job: Job, image_id: str, now: float) -> dict[str, Any]:
        tags = self._tags(job, now)
        request: dict[str, Any] = {
            "ImageId": image_id,
            "InstanceType": self.instance_type(),
            "MinCount": 1,
            "MaxCount": 1,
            # RunInstances is idempotent per token: a retried call starts no second instance
            "ClientToken": job.id,
            "UserData": job.spec_text(),
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
        }
        if self.options.spot:
            request["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        if self.instance_profile:
            request["IamInstanceProfile"] = {"Name": self.instance_profile}
        if self.options.dataset_disk:
            request["BlockDeviceMappings"] = [
                {
                    "DeviceName": AWS_DATASET_DEVICE,
                    "Ebs": {
                        "SnapshotId": self.options.dataset_disk,
                        "DeleteOnTermination": True,
                        "VolumeType": "gp3",
                    },
                }
            ]
        if self.options.zone:
            request["Placement"] = {"AvailabilityZone": self.options.zone}
        return request

    def find_image(self) -> dict[str, Any]:
        """The AMI the jobs boot: --image, or the newest of this account tagged
        gpubake-stack=STACK; it must be available and carry gpubake-job-runner=true."""
        stack, image_id = self.options.stack, self.options.image

        def build(stack: str) -> str:
            return (
                f"gpubake build --target aws-ami --region {self.region} --stack {stack} "
                "--var job_runner=true"
            )

        if image_id:
            if not image_id.startswith("ami-"):
                raise JobError(
                    f"--image {image_id} is not an AMI id: give ami-..., or leave --image out to "
                    f"start the newest AMI tagged {STACK_TAG}={stack}"
                )
            found = self._try(
                f"looking up AMI {image_id}",
                lambda: self.client("ec2").describe_images(ImageIds=[image_id])["Images"],
                missing=lambda code: code.startswith("InvalidAMIID"),
            )
            if not found:
                raise JobError(
                    f"--image {image_id}: no such AMI in {self.region}: check the id and "
                    f"--region, or build one with `{build(stack)}`"
                )
            image = found[0]
        else:
            found = self._call(
                f"looking up the AMIs of stack {stack}",
                "ec2",
                "describe_images",
                Owners=["self"],
                Filters=[{"Name": f"tag:{STACK_TAG}", "Values": [stack]}],
            )["Images"]
            if not found:
                raise JobError(
                    f"no AMI of stack {stack} in {self.region} (owned by this account, tagged "
                    f"{STACK_TAG}={stack}): build one with `{build(stack)}`, or pass "
                    "--image ami-..."
                )
            image = max(found, key=lambda i: str(i.get("CreationDate", "")))
        name = image["ImageId"]
        state = image.get("State", "available")
        if state != "available":
            raise JobError(
                f"AMI {name} is {state}, not available: wait for it, or pass another --image"
            )
        tags = {t["Key"]: t["Value"] for t in image.get("Tags", [])}
        if tags.get(RUNNER_IMAGE_LABEL) != "true":
            older = ""
            if not image_id:
                runners = [
                    i["ImageId"]
                    for i in found
                    if {t["Key"]: t["Value"] for t in i.get("Tags", [])}.get(RUNNER_IMAGE_LABEL)
                    == "true"
                ]
                older = f", or pass --image {runners[0]} (an older one with it)" if runners else ""
            rebuild = build(tags.get(STACK_TAG, stack))
            raise JobError(
                f"AMI {name} has no job runner (tag {RUNNER_IMAGE_LABEL}=true; tags of an AMI "
                f"shared from another account are not visible): rebuild it with `{rebuild}`{older}"
            )
        return image

    def _instance_type_info(self, names: list[str]) -> dict[str, dict[str, Any]]:
        wanted = sorted(set(names) - set(self._type_info))
        if wanted:
            found = self._call(
                f"looking up instance type {', '.join(wanted)}",
                "ec2",
                "describe_instance_types",
                InstanceTypes=wanted,
            )["InstanceTypes"]
            self._type_info.update({t["InstanceType"]: t for t in found})
        return {n: self._type_info[n] for n in names if n in self._type_info}

    def check_instance_type(self, name: str, image: dict[str, Any] | None = None) -> None:
        """Offered in the region (or --zone), has the GPUs asked for, runs the AMI's arch."""
        where = self.options.zone or self.region
        location = (
            {"LocationType": "availability-zone"}
            if self.options.zone
            else {"LocationType": "region"}
        )
        offers = self._call(
            f"looking up where {name} is offered",
            "ec2",
            "describe_instance_type_offerings",
            Filters=[
                {"Name": "instance-type", "Values": [name]},
                {"Name": "location", "Values": [where]},
            ],
            **location,
        )["InstanceTypeOfferings"]
        if not offers:
            raise JobError(
                f"instance type {name} is not offered in {where}: choose another --region "
                "(or --machine-type / --gpu)"
            )
        info = self._instance_type_info([name]).get(name, {})
        gpus = sum(int(g.get("Count", 0)) for g in info.get("GpuInfo", {}).get("Gpus", []))
        if info and gpus < self.options.gpu_count:
            raise JobError(
                f"instance type {name} has {gpus} GPU(s), fewer than --gpu-count "
                f"{self.options.gpu_count}: give --machine-type with "
                f"{self.options.gpu_count} GPUs"
            )
        arches = info.get("ProcessorInfo", {}).get("SupportedArchitectures", [])
        arch = (image or {}).get("Architecture")
        if arch and arches and arch not in arches:
            raise JobError(
                f"AMI {image['ImageId']} is {arch} but {name} runs {'/'.join(arches)}: build "
                f"the AMI for {arches[0]}, or choose a {arch} --machine-type"
            )

    def check_snapshot(self, snapshot: str) -> None:
        if not snapshot.startswith("snap-"):
            raise JobError(
                f"--dataset-disk {snapshot} is not an EBS snapshot id: on AWS give snap-... (each "
                "job gets a fresh volume from it)"
            )
        found = self._try(
            f"looking up snapshot {snapshot}",
            lambda: self.client("ec2").describe_snapshots(SnapshotIds=[snapshot])["Snapshots"],
            missing=lambda code: code.startswith("InvalidSnapshot"),
        )
        if not found:
            raise JobError(
                f"--dataset-disk {snapshot}: no such snapshot in {self.region} (or not shared "
                "with this account): check the id and --region"
            )
        state = found[0].get("State", "completed")
        if state != "completed":
            raise JobError(f"--dataset-disk {snapshot} is {state}: wait until it is completed")

    def check_instance_profile(self, name: str) -> None:
        """The instance profile exists: its role is what the VM writes the results with."""
        found = self._try(
            f"looking up instance profile {name}",
            lambda: self.client("iam").get_instance_profile(InstanceProfileName=name),
            missing=lambda code: code == "NoSuchEntity",
        )
        if not found:
            raise JobError(
                f"--instance-profile {name}: no such instance profile: create one whose role may "
                "write the results bucket (aws iam create-instance-profile), or name another"
            )

    @contextlib.contextmanager
    def _storage_profile(self) -> Iterator[None]:
        """The runner's bucket client uses boto3's default session: give it --profile."""
        if not self.options.profile:
            yield
            return
        saved = os.environ.get("AWS_PROFILE")
        os.environ["AWS_PROFILE"] = self.options.profile
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("AWS_PROFILE", None)
            else:
                os.environ["AWS_PROFILE"] = saved

    def preflight(self, jobs: list[Job]) -> str:
        """Everything checkable before an instance costs money; the AMI id the jobs boot.
        Nothing is created (the results probe, last, removes its object)."""
        if not self.options.results.startswith("s3://"):
            raise JobError(
                f"--results {self.options.results}: AWS jobs write to S3: give s3://BUCKET/PREFIX"
            )
        name = self.instance_type()
        self.check_credentials()
        image = self.find_image()
        self.check_instance_type(name, image)
        if self.options.dataset_disk:
            self.check_snapshot(self.options.dataset_disk)
        if self.instance_profile:
            self.check_instance_profile(self.instance_profile)
        with self._storage_profile():
            storage.probe(self.options.results)
        return str(image["ImageId"])

    # ------------------------------------------------------------------ create, list, stop

    def create(self, job: Job, image_id: str) -> str:
        """RunInstances for one job; the instance id."""
        request = self._request(job, image_id, time.time())
        reply = self._call(
            f"starting the instance of job {job.id}", "ec2", "run_instances", **request
        )
        return str(reply["Instances"][0]["InstanceId"])

    def _gpu_names(self, types: set[str]) -> dict[str, str]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            infos = self._instance_type_info(sorted(types))
        except JobError:
            return {}  # the GPU column is a courtesy: the listing does not fail for it
        except (BotoCoreError, ClientError):
            return {}
        names = {}
        for name, info in infos.items():
            gpus = info.get("GpuInfo", {}).get("Gpus", [])
            parts = []
            for gpu in gpus:
                label = f"{gpu.get('Manufacturer', '')} {gpu.get('Name', '')}".strip()
                count = int(gpu.get("Count", 1))
                parts.append(f"{count}x {label}" if count > 1 else label)
            names[name] = ", ".join(parts)
        return names

    def _spot_price(self, instance_type: str, zone: str, cache: dict[Any, float | None]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        key = (instance_type, zone)
        if key not in cache:
            now = datetime.datetime.now(datetime.UTC)
            try:
                history = self.client("ec2").describe_spot_price_history(
                    InstanceTypes=[instance_type],
                    ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
                    Filters=[{"Name": "availability-zone", "Values": [zone]}],
                    StartTime=now,
                    EndTime=now,
                )["SpotPriceHistory"]
            except (BotoCoreError, ClientError):
                history = []  # no price is shown rather than no listing
            history = [
                h
                for h in history
                if h.get("AvailabilityZone") == zone and h.get("InstanceType") == instance_type
            ]
            newest = max(history, key=lambda h: str(h.get("Timestamp", "")), default=None)
            try:
                cache[key] = float(newest["SpotPrice"]) if newest else None
            except (KeyError, ValueError):
                cache[key] = None
        return cache[key]

    def list(self, *, job: str | None = None, sweep: str | None = None) -> list[Instance]:
        """The gpubake job instances (of one job or sweep) that are not terminated."""
        filters = [{"Name": "instance-state-name", "Values": list(LISTED_STATES)}]
        if job:
            filters.append({"Name": f"tag:{JOB_LABEL}", "Values": [job]})
        if sweep:
            filters.append({"Name": f"tag:{SWEEP_LABEL}", "Values": [sweep]})
        if not job and not sweep:
            filters.append({"Name": "tag-key", "Values": [JOB_LABEL]})
        what = f"listing the job instances in {self.region}"
        from botocore.exceptions import BotoCoreError, ClientError

        raw = []
        try:
            pages = self.client("ec2").get_paginator("describe_instances").paginate(Filters=filters)
            for page in pages:
                for reservation in page.get("Reservations", []):
                    raw.extend(reservation.get("Instances", []))
        except (BotoCoreError, ClientError) as exc:
            raise self._error(what, exc) from None
        gpu_names = self._gpu_names({i["InstanceType"] for i in raw}) if raw else {}
        prices: dict[Any, float | None] = {}
        found = []
        for item in raw:
            tags = {t["Key"]: t["Value"] for t in item.get("Tags", [])}
            state = str(item.get("State", {}).get("Name", ""))
            zone = str(item.get("Placement", {}).get("AvailabilityZone", ""))
            price = None
            if item.get("InstanceLifecycle") == "spot" and zone:
                price = self._spot_price(item["InstanceType"], zone, prices)
            try:
                deadline = float(tags[DEADLINE_LABEL]) if DEADLINE_LABEL in tags else None
            except ValueError:
                deadline = None
            launched = item.get("LaunchTime")
            found.append(
                Instance(
                    name=str(item["InstanceId"]),
                    job=tags.get(JOB_LABEL, ""),
                    sweep=tags.get(SWEEP_LABEL),
                    state=state,
                    machine_type=str(item["InstanceType"]),
                    gpu=gpu_names.get(item["InstanceType"], ""),
                    created=launched.timestamp() if launched else 0.0,
                    deadline=deadline,
                    hourly_price=price,
                    stopped=state in STOPPED_STATES,
                )
            )
        return sorted(found, key=lambda i: (i.created, i.job))

    def _terminate(self, ids: list[str], what: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client("ec2")
        try:
            client.terminate_instances(InstanceIds=ids)
        except ClientError as exc:
            if not self._code(exc).startswith("InvalidInstanceID") or len(ids) == 1:
                if self._code(exc) == "InvalidInstanceID.NotFound":
                    return  # gone already
                raise self._error(what, exc) from None
            for one in ids:  # one of them is gone already: the others, one by one
                self._terminate([one], what)
        except BotoCoreError as exc:
            raise self._error(what, exc) from None

    def stop(self, instance: Instance) -> None:
        """Terminate it: EC2 first sends an ACPI shutdown, which stops gpubake-job's unit; the
        runner takes that as a preemption notice (signal, final sync, _PREEMPTED)."""
        self._terminate([instance.name], f"stopping instance {instance.name} ({instance.job})")

    def delete(self, instances: list[Instance]) -> None:
        """Terminate them (`job gc`)."""
        ids = [i.name for i in instances]
        for start in range(0, len(ids), TERMINATE_BATCH):
            batch = ids[start : start + TERMINATE_BATCH]
            self._terminate(batch, f"terminating {len(batch)} job instance(s)")


__all__ = ["IMAGE_PLACEHOLDER", "RESULTS_TAG", "Aws"]
