"""`gpubake job emit batch`: a Google Cloud Batch Job (JSON, built with google-cloud-batch's
own types) and its offline check."""

from __future__ import annotations

import json
import re

from gpubake.jobs.emit.common import (
    MAX_RETRIES,
    RUNNER,
    RUNNER_CONFIG,
    RUNNER_PREEMPTED,
    WORK_ROOT,
    check_cloud,
    check_jobs,
    fill,
    gcp_accelerator,
    gcp_image,
    gcp_machine,
    job_labels,
    one_line,
    parse_specs,
    run_deadline,
)
from gpubake.jobs.gcp import BUILTIN_GPU_PREFIXES, boot_disk_gb
from gpubake.jobs.launch import GCP_DATASET_DEVICE, Job, JobError, JobOptions

#: Google Cloud Batch's exit code for a task whose Spot VM was preempted.
BATCH_PREEMPTED = 50001
#: Where Batch mounts the results bucket (gcsfuse, read-only: the runner syncs through the API).
RESULTS_MOUNT = "/mnt/disks/results"

_REGION = re.compile(r"^[a-z]+-[a-z]+\d+$")

_BATCH_SCRIPT = """\
#!/bin/bash
# gpubake: this task's spec ($GPUBAKE_JOB_SPEC, from its task environment) run by the image's
# runner as the image's job user. `local`: no power-off, Batch owns the VM; exit 3 after a
# preemption notice (retried), 1 or 2 when the job failed (not retried).
set -euo pipefail
work="{work_root}/$GPUBAKE_JOB_ID"
user="$(python3 -c 'import json; print(json.load(open("{config}"))["user"])')"
install -d -o "$user" -g "$(id -g "$user")" -m 0750 "$work"
printf '%s\\n' "$GPUBAKE_JOB_SPEC" > "$work.json"
chmod 0644 "$work.json"
exec runuser -u "$user" -- {runner} local "$work.json" --work-dir "$work"
"""


def batch(
    options: JobOptions, jobs: list[Job], *, region: str, max_parallel: int | None = None
) -> str:
    """JSON text of a Google Cloud Batch Job running `jobs`, one task each."""
    from google.cloud import batch_v1
    from google.protobuf import duration_pb2

    check_jobs(options, jobs, "Batch")  # Batch takes the name at submission
    if options.cloud != "gcp":
        raise JobError("Google Cloud Batch runs on GCP: use --cloud gcp")
    if not _REGION.match(region or ""):
        raise JobError(f"--region {region!r} is not a GCP region (e.g. us-central1)")
    if not options.results.startswith("gs://"):
        raise JobError(
            f"Batch jobs write to Cloud Storage: --results {options.results} is not gs://"
        )
    if max_parallel is not None and max_parallel < 1:
        raise JobError("--max-parallel must be 1 or more")
    if options.zone and not options.zone.startswith(f"{region}-"):
        raise JobError(f"--zone {options.zone} is not in region {region}")
    if options.dataset_disk and not options.zone:
        raise JobError("a --dataset-disk needs --zone: the job's VMs must be in the disk's zone")
    image, _family = gcp_image(options)
    check_cloud(options)
    machine_type, builtin_gpus = gcp_machine(options)
    policy = batch_v1.AllocationPolicy.InstancePolicy(
        machine_type=machine_type,
        provisioning_model=(
            batch_v1.AllocationPolicy.ProvisioningModel.SPOT
            if options.spot
            else batch_v1.AllocationPolicy.ProvisioningModel.STANDARD
        ),
        boot_disk=batch_v1.AllocationPolicy.Disk(image=image, size_gb=boot_disk_gb(options.stack)),
    )
    if not builtin_gpus:
        policy.accelerators = [
            batch_v1.AllocationPolicy.Accelerator(
                type_=gcp_accelerator(options), count=options.gpu_count
            )
        ]
    volumes = [
        batch_v1.Volume(
            gcs=batch_v1.GCS(remote_path=options.results.removeprefix("gs://").rstrip("/")),
            mount_path=RESULTS_MOUNT,
            mount_options=["-o ro"],
        )
    ]
    if options.dataset_disk:
        policy.disks = [
            batch_v1.AllocationPolicy.AttachedDisk(
                existing_disk=(
                    f"projects/{options.project}/zones/{options.zone}/disks/{options.dataset_disk}"
                ),
                device_name=GCP_DATASET_DEVICE,
            )
        ]
        volumes.append(
            batch_v1.Volume(
                device_name=GCP_DATASET_DEVICE,
                mount_path=jobs[0].spec["dataset"]["mount"],
                mount_options=["ro"],
            )
        )
    script = fill(_BATCH_SCRIPT, work_root=WORK_ROOT, config=RUNNER_CONFIG, runner=RUNNER)
    task = batch_v1.TaskSpec(
        runnables=[
            batch_v1.Runnable(
                display_name="gpubake-job", script=batch_v1.Runnable.Script(text=script)
            )
        ],
        max_retry_count=MAX_RETRIES,
        lifecycle_policies=[
            batch_v1.LifecyclePolicy(
                # Batch keeps one policy: RETRY_TASK retries on these codes, fails on any other
                action=batch_v1.LifecyclePolicy.Action.RETRY_TASK,
                action_condition=batch_v1.LifecyclePolicy.ActionCondition(
                    exit_codes=[BATCH_PREEMPTED, RUNNER_PREEMPTED]
                ),
            )
        ],
        volumes=volumes,
    )
    deadline = run_deadline(options)
    if deadline:
        task.max_run_duration = duration_pb2.Duration(seconds=deadline)
    group = batch_v1.TaskGroup(
        task_spec=task,
        task_count=len(jobs),
        task_count_per_node=1,  # one job per VM: its GPUs are the job's
        task_environments=[
            batch_v1.Environment(
                variables={
                    "GPUBAKE_JOB_ID": job.id,
                    "GPUBAKE_JOB_SPEC": job.spec_text(),
                    **{f"GPUBAKE_PARAM_{k.upper()}": v for k, v in job.params.items()},
                }
            )
            for job in jobs
        ],
    )
    if max_parallel is not None:
        group.parallelism = min(max_parallel, len(jobs))
    locations = [f"zones/{options.zone}"] if options.zone else [f"regions/{region}"]
    allocation = batch_v1.AllocationPolicy(
        location=batch_v1.AllocationPolicy.LocationPolicy(allowed_locations=locations),
        instances=[
            batch_v1.AllocationPolicy.InstancePolicyOrTemplate(
                policy=policy,
                install_gpu_drivers=False,  # the image holds the driver
            )
        ],
    )
    job = batch_v1.Job(
        task_groups=[group],
        allocation_policy=allocation,
        labels=job_labels(jobs),
        logs_policy=batch_v1.LogsPolicy(destination=batch_v1.LogsPolicy.Destination.CLOUD_LOGGING),
    )
    text = batch_v1.Job.to_json(
        job, use_integers_for_enums=False, always_print_fields_with_no_presence=False, indent=2
    )
    data = json.loads(text)
    # proto3 leaves a false bool out; said explicitly, it documents that the image's driver is used
    data["allocationPolicy"]["instances"][0]["installGpuDrivers"] = False
    return json.dumps(data, indent=2) + "\n"


def validate_batch(text: str) -> None:
    """google-cloud-batch's own parser (unknown fields and enum values refused), then the rules
    gpubake's Batch jobs keep; JobError (one line) otherwise."""
    from google.cloud import batch_v1

    try:
        data = json.loads(text)
    except ValueError as exc:
        raise JobError(f"the Batch job is not JSON: {one_line(exc)}") from None
    if not isinstance(data, dict):
        raise JobError("the Batch job is not a JSON object")
    try:
        job = batch_v1.Job.from_json(text, ignore_unknown_fields=False)
    except Exception as exc:  # google.protobuf.json_format.ParseError and its kin
        raise JobError(f"not a Google Cloud Batch job: {one_line(exc)}") from None
    if len(job.task_groups) != 1:
        raise JobError("the Batch job must have exactly one task group")
    group = job.task_groups[0]
    count = len(group.task_environments)
    if count == 0 or group.task_count != count:
        raise JobError(f"taskCount {group.task_count} does not match the {count} taskEnvironments")
    if group.parallelism and group.parallelism > count:
        raise JobError(f"parallelism {group.parallelism} is more than the {count} tasks")
    specs = [env.variables.get("GPUBAKE_JOB_SPEC") for env in group.task_environments]
    if not all(specs):
        raise JobError("a task environment has no GPUBAKE_JOB_SPEC")
    parse_specs(specs, "Batch task")
    task = group.task_spec
    if not task.runnables or not any(RUNNER in r.script.text for r in task.runnables):
        raise JobError(f"no runnable runs {RUNNER}")
    retry = [
        p
        for p in task.lifecycle_policies
        if p.action == batch_v1.LifecyclePolicy.Action.RETRY_TASK
        and BATCH_PREEMPTED in p.action_condition.exit_codes
    ]
    if not retry or not 1 <= task.max_retry_count <= 10:
        raise JobError(
            f"preempted tasks are not retried: give lifecyclePolicies RETRY_TASK on exit code "
            f"{BATCH_PREEMPTED} and maxRetryCount 1-10"
        )
    instances = job.allocation_policy.instances
    if len(instances) != 1:
        raise JobError("allocationPolicy.instances must hold one instance policy")
    policy = instances[0].policy
    models = batch_v1.AllocationPolicy.ProvisioningModel
    if policy.provisioning_model not in (models.SPOT, models.STANDARD):
        raise JobError("provisioningModel must be SPOT (or STANDARD): say which VMs to pay for")
    if not policy.boot_disk.image:
        raise JobError("bootDisk.image is missing: the gpubake image runs the tasks")
    if not policy.accelerators and not policy.machine_type.startswith(BUILTIN_GPU_PREFIXES):
        raise JobError(f"machine type {policy.machine_type!r} gets no GPU: give accelerators")
