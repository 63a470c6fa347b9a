"""Notebook VMs on EC2: the same checks as `job run` (gpubake.jobs.aws), an EC2 key pair of
the user's own public key, an EBS volume for /storage that outlives the instance (made once,
in the availability zone the instance is then placed in, attached after it starts), and the
boot script as user-data.

The instance stops, not terminates, when the watcher powers it off
(InstanceInitiatedShutdownBehavior=stop); a Spot notebook is a persistent request that stops
when interrupted, so `notebook up` starts the same instance again. `down` cancels the Spot
request first (else EC2 would launch a new instance for it), then terminates.
"""

from __future__ import annotations

import dataclasses
import gzip
from typing import Any

from gpubake.clouds import aws as rules
from gpubake.jobs.aws import IMAGE_PLACEHOLDER, Aws
from gpubake.jobs.cloud import wait_until
from gpubake.jobs.launch import JobError
from gpubake.notebooks import boot
from gpubake.notebooks.options import (
    NOTEBOOK_LABEL,
    STORAGE_LABEL,
    NotebookOptions,
    instance_name,
    storage_name,
)

#: Where the volume is attached; on Nitro instances it appears as an NVMe disk whose serial
#: is the volume id, which the boot script looks for first.
STORAGE_ATTACH_AS = "/dev/sdg"
#: The security group that lets SSH in (the default VPC's default group lets nothing in).
SSH_GROUP = "gpubake-notebook-ssh"
#: https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/user-data.html: 16 KB, raw
USER_DATA_LIMIT = 16384
LIVE_STATES = ("pending", "running", "stopping", "stopped")
RUNNING = frozenset({"pending", "running"})
VOLUME_TYPE = "gp3"
WAIT_S = 600.0
POLL_S = 5.0


def user_data(script: str) -> bytes:
    """The boot script as EC2 takes it: gzip-compressed (EC2 takes at most 16 KB of
    user-data; cloud-init unpacks gzip), deterministic (no time in the header)."""
    packed = gzip.compress(script.encode("utf-8"), mtime=0)
    if len(packed) > USER_DATA_LIMIT:
        raise JobError(
            f"the boot script is {len(packed)} bytes compressed, over EC2's {USER_DATA_LIMIT}"
        )
    return packed


def storage_devices(volume_id: str) -> str:
    """The paths the volume may appear at on the instance: NVMe (Nitro), then Xen's name."""
    serial = volume_id.replace("-", "")
    return f"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{serial} /dev/xvdg /dev/sdg"


@dataclasses.dataclass(frozen=True)
class Found:
    """What preflight found in the region: what `up` reuses, and None where it makes it."""

    image_id: str | None = None
    zone: str | None = None
    volume_id: str | None = None
    key_pair: bool = False
    group_id: str | None = None


class NotebookAws:
    """One notebook in one region."""

    def __init__(self, options: NotebookOptions) -> None:
        self.options = options
        self.cloud = Aws(options.job_options())
        rules.check_disk_size(options.storage_gb)
        self.key_name = instance_name(options.name)
        self.poll_interval = POLL_S

    @property
    def region(self) -> str:
        return self.cloud.region

    def _call(self, what: str, operation: str, **kwargs: Any) -> Any:
        return self.cloud._call(what, "ec2", operation, **kwargs)

    # ------------------------------------------------------------------ offline

    def requests(self, public_key: str, found: Found | None = None) -> dict[str, dict[str, Any]]:
        """The calls `up` makes, keyword arguments as boto3 takes them, for what is not
        `found` already; ids only known once made are placeholders."""
        options = self.options
        found = found or Found()
        image_id, volume_id, key_exists = found.image_id, found.volume_id, found.key_pair
        zone = found.zone or options.zone or "<an availability zone that offers the instance type>"
        volume = volume_id or "<the new volume's id>"
        group = found.group_id or "<the new security group's id>"
        name = instance_name(options.name)
        calls: dict[str, dict[str, Any]] = {}
        if not key_exists:
            calls["ImportKeyPair"] = {
                "KeyName": self.key_name,
                "PublicKeyMaterial": public_key,
                "TagSpecifications": [
                    {
                        "ResourceType": "key-pair",
                        "Tags": [{"Key": NOTEBOOK_LABEL, "Value": options.name}],
                    }
                ],
            }
        if found.group_id is None:
            calls["CreateSecurityGroup"] = {
                "GroupName": SSH_GROUP,
                "Description": "SSH to gpubake notebooks (gpubake notebook connect)",
                "TagSpecifications": [
                    {
                        "ResourceType": "security-group",
                        "Tags": [{"Key": NOTEBOOK_LABEL, "Value": "ssh"}],
                    }
                ],
            }
            calls["AuthorizeSecurityGroupIngress"] = {
                "GroupId": group,
                "IpPermissions": [
                    {
                        "IpProtocol": "tcp",
                        "FromPort": 22,
                        "ToPort": 22,
                        "IpRanges": [{"CidrIp": options.ssh_from, "Description": "ssh"}],
                    }
                ],
            }
        if volume_id is None:
            calls["CreateVolume"] = {
                "AvailabilityZone": zone,
                "Size": options.storage_gb,
                "VolumeType": VOLUME_TYPE,
                "Encrypted": True,
                "TagSpecifications": [
                    {
                        "ResourceType": "volume",
                        "Tags": [
                            {"Key": "Name", "Value": storage_name(options.name)},
                            {"Key": STORAGE_LABEL, "Value": options.name},
                        ],
                    }
                ],
            }
        image = image_id or options.image or IMAGE_PLACEHOLDER.format(stack=options.stack)
        tags = [{"Key": "Name", "Value": name}] + [
            {"Key": k, "Value": v} for k, v in options.labels().items()
        ]
        run: dict[str, Any] = {
            "ImageId": image,
            "InstanceType": self.cloud.instance_type(),
            "MinCount": 1,
            "MaxCount": 1,
            "KeyName": self.key_name,
            "SecurityGroupIds": [group],
            "UserData": boot.script(
                options.name, public_key, storage_devices(volume), options.watcher_config()
            ),
            "InstanceInitiatedShutdownBehavior": "stop",
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "Placement": {"AvailabilityZone": zone},
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
        }
        if options.spot:
            run["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "persistent",
                    "InstanceInterruptionBehavior": "stop",
                },
            }
        calls["RunInstances"] = run
        calls["AttachVolume"] = {
            "Device": STORAGE_ATTACH_AS,
            "VolumeId": volume,
            "InstanceId": "<the new instance's id>",
        }
        return calls

    # ------------------------------------------------------------------ the cloud

    def find(self) -> dict[str, Any] | None:
        """The notebook's instance (not terminated), or None."""
        found = self._call(
            f"looking up notebook {self.options.name}",
            "describe_instances",
            Filters=[
                {"Name": f"tag:{NOTEBOOK_LABEL}", "Values": [self.options.name]},
                {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
            ],
        )
        instances = [i for r in found.get("Reservations", []) for i in r.get("Instances", [])]
        return max(instances, key=lambda i: str(i.get("LaunchTime", "")), default=None)

    def volume(self) -> dict[str, Any] | None:
        found = self._call(
            f"looking up the storage volume of {self.options.name}",
            "describe_volumes",
            Filters=[{"Name": f"tag:{STORAGE_LABEL}", "Values": [self.options.name]}],
        )["Volumes"]
        return found[0] if found else None

    def key_exists(self) -> bool:
        found = self.cloud._try(
            f"looking up key pair {self.key_name}",
            lambda: self.cloud.client("ec2").describe_key_pairs(KeyNames=[self.key_name]),
            missing=lambda code: code == "InvalidKeyPair.NotFound",
        )
        return bool(found and found.get("KeyPairs"))

    def _zone(self) -> str:
        """--zone, else the first availability zone that offers the instance type."""
        if self.options.zone:
            return self.options.zone
        name = self.cloud.instance_type()
        offers = self._call(
            f"looking up the zones that offer {name}",
            "describe_instance_type_offerings",
            LocationType="availability-zone",
            Filters=[{"Name": "instance-type", "Values": [name]}],
        )["InstanceTypeOfferings"]
        zones = sorted(o["Location"] for o in offers)
        if not zones:
            raise JobError(
                f"instance type {name} is not offered in {self.region}: choose another --region "
                "(or --machine-type / --gpu)"
            )
        return zones[0]

    def ssh_group(self) -> str | None:
        found = self._call(
            f"looking up security group {SSH_GROUP}",
            "describe_security_groups",
            Filters=[{"Name": "group-name", "Values": [SSH_GROUP]}],
        )["SecurityGroups"]
        return str(found[0]["GroupId"]) if found else None

    def preflight(self) -> Found:
        """`job run`'s checks, then what exists already: the storage volume (and so the
        zone), the key pair, the SSH security group."""
        cloud = self.cloud
        name = cloud.instance_type()
        cloud.check_credentials()
        image = cloud.find_image()
        cloud.check_instance_type(name, image)
        volume = self.volume()
        zone = volume["AvailabilityZone"] if volume else self._zone()
        if volume and self.options.zone and self.options.zone != zone:
            raise JobError(
                f"the storage of {self.options.name} is in {zone}, not --zone "
                f"{self.options.zone}: leave --zone out (the notebook goes where its disk is)"
            )
        return Found(
            image_id=str(image["ImageId"]),
            zone=zone,
            volume_id=str(volume["VolumeId"]) if volume else None,
            key_pair=self.key_exists(),
            group_id=self.ssh_group(),
        )

    def _wait(self, what: str, done: Any) -> Any:
        return wait_until(what, done, timeout=WAIT_S, poll=self.poll_interval)

    def _volume_state(self, volume_id: str) -> str:
        found = self._call(
            f"looking up volume {volume_id}", "describe_volumes", VolumeIds=[volume_id]
        )["Volumes"]
        return str(found[0]["State"]) if found else "gone"

    def _instance_state(self, instance_id: str) -> str:
        found = self._call(
            f"looking up instance {instance_id}", "describe_instances", InstanceIds=[instance_id]
        )
        items = [i for r in found.get("Reservations", []) for i in r.get("Instances", [])]
        return str(items[0]["State"]["Name"]) if items else "gone"

    def create(self, public_key: str, found: Found, echo: Any) -> str:
        """Make what requests() lists, in order; the instance id."""
        calls = self.requests(public_key, found)
        if "ImportKeyPair" in calls:
            self._call("importing your SSH key", "import_key_pair", **calls["ImportKeyPair"])
            found = dataclasses.replace(found, key_pair=True)
        if "CreateSecurityGroup" in calls:
            made = self._call(
                f"making security group {SSH_GROUP}",
                "create_security_group",
                **calls["CreateSecurityGroup"],
            )
            found = dataclasses.replace(found, group_id=str(made["GroupId"]))
            rule = {**calls["AuthorizeSecurityGroupIngress"], "GroupId": found.group_id}
            self._call("letting SSH in", "authorize_security_group_ingress", **rule)
        if "CreateVolume" in calls:
            echo(f"making the {self.options.storage_gb} GB storage volume in {found.zone}")
            made = self._call("making the storage volume", "create_volume", **calls["CreateVolume"])
            volume_id = str(made["VolumeId"])
            self._wait(f"volume {volume_id}", lambda: self._volume_state(volume_id) == "available")
            found = dataclasses.replace(found, volume_id=volume_id)
        calls = self.requests(public_key, found)
        run = {**calls["RunInstances"], "UserData": user_data(calls["RunInstances"]["UserData"])}
        reply = self._call(
            f"starting the instance of notebook {self.options.name}", "run_instances", **run
        )
        instance_id = str(reply["Instances"][0]["InstanceId"])
        echo(f"instance {instance_id} is starting")
        self._wait(
            f"instance {instance_id}", lambda: self._instance_state(instance_id) == "running"
        )
        attach = {**calls["AttachVolume"], "InstanceId": instance_id}
        self._call(f"attaching volume {found.volume_id}", "attach_volume", **attach)
        return instance_id

    def start(self, instance_id: str) -> None:
        self._call(f"starting instance {instance_id}", "start_instances", InstanceIds=[instance_id])

    def stop(self) -> None:
        inst = self.find()
        if inst is not None:
            instance_id = inst["InstanceId"]
            what = f"stopping instance {instance_id}"
            self._call(what, "stop_instances", InstanceIds=[instance_id])

    def delete(self, *, storage: bool) -> bool:
        """Cancel the Spot request, terminate the instance, drop the key pair; with
        storage=True the volume too, once it is detached. Whether an instance existed."""
        inst = self.find()
        if inst is not None:
            request = inst.get("SpotInstanceRequestId")
            if request:
                self._call(
                    f"cancelling Spot request {request}",
                    "cancel_spot_instance_requests",
                    SpotInstanceRequestIds=[request],
                )
            instance_id = inst["InstanceId"]
            self._call(
                f"terminating instance {instance_id}",
                "terminate_instances",
                InstanceIds=[instance_id],
            )
            self._wait(
                f"terminating {instance_id}",
                lambda: self._instance_state(instance_id) in ("terminated", "gone"),
            )
        if self.key_exists():
            self._call(
                f"deleting key pair {self.key_name}", "delete_key_pair", KeyName=self.key_name
            )
        if storage:
            volume = self.volume()
            if volume is not None:
                volume_id = volume["VolumeId"]
                self._wait(
                    f"detaching volume {volume_id}",
                    lambda: self._volume_state(volume_id) in ("available", "gone"),
                )
                self._call(f"deleting volume {volume_id}", "delete_volume", VolumeId=volume_id)
        return inst is not None

    def describe(self, inst: dict[str, Any]) -> dict[str, Any]:
        state = str(inst.get("State", {}).get("Name", ""))
        zone = str(inst.get("Placement", {}).get("AvailabilityZone", ""))
        price = None
        if inst.get("InstanceLifecycle") == "spot" and zone:
            price = self.cloud._spot_price(inst["InstanceType"], zone, {})
        launched = inst.get("LaunchTime")
        gpu = self.cloud._gpu_names({inst["InstanceType"]}).get(inst["InstanceType"], "")
        return {
            "state": state,
            "running": state in RUNNING,
            "address": str(inst.get("PublicIpAddress", "")),
            "machine_type": str(inst["InstanceType"]),
            "gpu": gpu or self.options.gpu,
            "started": launched.isoformat() if launched else "",
            "hourly_price": price,
        }
