"""Notebook VMs on Compute Engine: the same checks as `job run` (gpubake.jobs.gcp), one VM
with a persistent /storage disk that outlives it, the user's key in the instance's `ssh-keys`
metadata (or nothing where the project uses OS Login), and the boot script as its
`startup-script`.

A Spot notebook is STOPPED, not deleted, when preempted (instanceTerminationAction STOP), so
`notebook up` starts the same VM again; --max-run is also GCE's own maxRunDuration (STOP),
which holds even if the VM's watcher does not.
"""

from __future__ import annotations

import json
from typing import Any

from gpubake.clouds import gcp as rules
from gpubake.jobs.gcp import VM_SCOPES, Gcp, network_interfaces
from gpubake.jobs.launch import JobError
from gpubake.notebooks import boot
from gpubake.notebooks.options import (
    STORAGE_LABEL,
    NotebookOptions,
    instance_name,
    login_user,
    storage_name,
)

#: The storage disk's device name: /dev/disk/by-id/google-<name> on the VM.
STORAGE_DEVICE_NAME = "gpubake-storage"
STORAGE_DEVICE = f"/dev/disk/by-id/google-{STORAGE_DEVICE_NAME}"
RUNNING = frozenset({"PROVISIONING", "STAGING", "RUNNING"})
#: What `notebook up` starts again (a preempted Spot notebook is TERMINATED, i.e. stopped).
STARTABLE = frozenset({"STOPPED", "TERMINATED", "SUSPENDED"})


def _oslogin(metadata: Any) -> bool:
    items = {i.key: i.value for i in (metadata.items if metadata else [])}
    return str(items.get("enable-oslogin", "")).upper() == "TRUE"


class NotebookGcp:
    """One notebook in one project and zone."""

    def __init__(self, options: NotebookOptions) -> None:
        self.options = options
        self.cloud = Gcp(options.job_options(), service_account=options.service_account)
        self.project, self.zone = self.cloud.project, self.cloud.zone
        rules.check_disk_size(options.storage_gb)
        if options.max_run_s:
            rules.check_max_run_duration(options.max_run_s)
        self.instance = instance_name(options.name)
        self.disk = storage_name(options.name)

    # ------------------------------------------------------------------ offline

    def request(
        self,
        public_key: str,
        *,
        image: str | None = None,
        disk_exists: bool = False,
        os_login: bool = False,
    ) -> dict[str, Any]:
        """The instances.insert body (JSON as the API takes it)."""
        from google.cloud import compute_v1

        options, zone, cloud = self.options, self.zone, self.cloud
        source = image or cloud.image_reference()
        scheduling = compute_v1.Scheduling(
            provisioning_model="SPOT" if options.spot else "STANDARD",
            on_host_maintenance="TERMINATE",
            automatic_restart=False,
        )
        if options.spot or options.max_run_s:
            scheduling.instance_termination_action = "STOP"
        if options.max_run_s:
            scheduling.max_run_duration = compute_v1.Duration(seconds=options.max_run_s)
        storage = compute_v1.AttachedDisk(
            boot=False,
            auto_delete=False,
            type_="PERSISTENT",
            mode="READ_WRITE",
            device_name=STORAGE_DEVICE_NAME,
        )
        if disk_exists:
            storage.source = f"projects/{self.project}/zones/{zone}/disks/{self.disk}"
        else:
            storage.initialize_params = compute_v1.AttachedDiskInitializeParams(
                disk_name=self.disk,
                disk_size_gb=options.storage_gb,
                disk_type=f"zones/{zone}/diskTypes/pd-balanced",
                labels={STORAGE_LABEL: options.name},
            )
        script = boot.script(options.name, public_key, STORAGE_DEVICE, options.watcher_config())
        items = [compute_v1.Items(key="startup-script", value=script)]
        if not os_login:
            items.append(
                compute_v1.Items(
                    key="ssh-keys", value=f"{login_user(options.ssh_user)}:{public_key}"
                )
            )
        instance = compute_v1.Instance(
            name=self.instance,
            machine_type=f"zones/{zone}/machineTypes/{cloud.machine_type}",
            guest_accelerators=cloud.accelerators(),
            scheduling=scheduling,
            disks=[cloud.boot_disk(source), storage],
            service_accounts=[
                compute_v1.ServiceAccount(email=cloud.service_account, scopes=list(VM_SCOPES))
            ],
            metadata=compute_v1.Metadata(items=items),
            labels=options.labels(),
            network_interfaces=network_interfaces(),
        )
        return json.loads(
            compute_v1.Instance.to_json(
                instance, use_integers_for_enums=False, always_print_fields_with_no_presence=False
            )
        )

    # ------------------------------------------------------------------ the cloud

    def _get(self, kind: str, method: str, what: str, **kwargs: Any) -> Any:
        return self.cloud._get(kind, method, what, missing=True, project=self.project, **kwargs)

    def _operate(self, method: str, what: str, timeout: float, **kwargs: Any) -> bool:
        return self.cloud.operate(
            "InstancesClient", method, what, timeout, zone=self.zone, **kwargs
        )

    def find(self) -> Any:
        """The VM as GCE reports it, or None."""
        return self._get(
            "InstancesClient",
            "get",
            f"looking up VM {self.instance}",
            zone=self.zone,
            instance=self.instance,
        )

    def disk_exists(self) -> bool:
        what = f"looking up disk {self.disk}"
        return self._get("DisksClient", "get", what, zone=self.zone, disk=self.disk) is not None

    def os_login(self) -> bool:
        """Whether the project's metadata turns OS Login on."""
        project = self._get("ProjectsClient", "get", f"looking up project {self.project}")
        return bool(project and _oslogin(project.common_instance_metadata))

    def preflight(self) -> tuple[str, bool, bool]:
        """`job run`'s checks (credentials, image, GPU and machine type in the zone, quota);
        the image's URL, whether the storage disk exists, whether the project uses OS Login."""
        cloud = self.cloud
        cloud.check_credentials()
        image = cloud.resolve_image()
        cloud.check_gpu()
        os_login = self.os_login()
        if os_login and not self.options.ssh_user:
            raise JobError(
                f"project {self.project} logs in with OS Login: add your key (`gcloud compute "
                "os-login ssh-keys add --key-file KEY.pub`) and pass --ssh-user with your OS "
                "Login user name (`gcloud compute os-login describe-profile`)"
            )
        return image, self.disk_exists(), os_login

    def create(self, body: dict[str, Any]) -> None:
        from google.cloud import compute_v1

        instance = compute_v1.Instance.from_json(json.dumps(body))
        what = f"creating VM {self.instance}"
        self._operate("insert_unary", what, self.cloud.create_timeout, instance_resource=instance)

    def start(self) -> None:
        what = f"starting VM {self.instance}"
        if not self._operate(
            "start_unary", what, self.cloud.create_timeout, instance=self.instance
        ):
            raise JobError(f"{what}: it is gone: run `gpubake notebook up` again to make it")

    def stop(self) -> None:
        what = f"stopping VM {self.instance}"
        self._operate("stop_unary", what, self.cloud.stop_timeout, instance=self.instance)

    def delete(self, *, storage: bool) -> bool:
        """Delete the VM (and with storage=True its disk, once the VM is gone); whether the
        VM existed."""
        what = f"deleting VM {self.instance}"
        existed = self._operate(
            "delete_unary", what, self.cloud.stop_timeout, instance=self.instance
        )
        if storage:
            self.cloud.operate(
                "DisksClient", "delete_unary", f"deleting disk {self.disk}",
                self.cloud.stop_timeout, zone=self.zone, disk=self.disk,
            )  # fmt: skip
        return existed

    def describe(self, inst: Any) -> dict[str, Any]:
        """The status row of the VM."""
        address = ""
        for nic in inst.network_interfaces:
            for config in nic.access_configs:
                address = address or config.nat_i_p
        gpus = [
            f"{a.accelerator_count}x {a.accelerator_type.rsplit('/', 1)[-1]}"
            for a in inst.guest_accelerators
        ]
        started = inst.last_start_timestamp or inst.creation_timestamp
        return {
            "state": inst.status,
            "running": inst.status in RUNNING,
            "address": address,
            "machine_type": inst.machine_type.rsplit("/", 1)[-1],
            "gpu": ", ".join(gpus) or self.options.gpu,
            "started": started,
            "hourly_price": None,  # the Compute API gives no price
        }
