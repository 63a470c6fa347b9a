"""`gpubake job emit batch|skypilot|k8s`: the same job or sweep written for an engine that
schedules it, each checked offline by that engine's own types or schema.

Every engine runs the runner the image holds, `gpubake-job local SPEC --work-dir DIR`, with the
job's own spec (the one `job run` would put in the instance metadata): the code is fetched,
earlier checkpoints are restored from the results location, $GPUBAKE_CKPT_DIR and
$GPUBAKE_RESULTS_DIR are synced there, and the markers _SUCCESS / _FAILED / _PREEMPTED are
written. `local` powers nothing off (the engine owns the machine) and does not mount the
dataset disk (Batch mounts it). The runner exits 0 (success), 1 (the job failed), 2 (a bad spec
or an unusable results location) or 3 (preempted): each engine retries 3 and preemptions, and
fails 1 and 2 at once.

- `batch`: a Google Cloud Batch Job (JSON, built with google-cloud-batch's own types): one task
  per job (taskEnvironments hold each task's spec), Spot VMs of the gpubake image, RETRY_TASK on
  exit codes 50001 (Batch's preemption) and 3.
  Submit: `gcloud batch jobs submit NAME --location REGION --config FILE`.
- `skypilot`: one SkyPilot task (YAML). A sweep is still one task: its envs hold every spec
  (GPUBAKE_JOB_SPEC_<i>) and the run picks $GPUBAKE_JOB_INDEX, else $SKYPILOT_JOB_RANK; launch
  it with `sky jobs launch --num-jobs N FILE` (each managed job recovers on its own). Several
  YAML documents would be a pipeline (run one after the other) or, with `execution: parallel`,
  a job group (co-scheduled, cancelled together): neither is a sweep.
- `k8s`: a ConfigMap with the specs and an Indexed batch/v1 Job (YAML); pod i runs spec i
  ($JOB_COMPLETION_INDEX). The image must hold the runner (built with --var job_runner=true).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from typing import Any

import yaml

from gpubake import stacks
from gpubake.jobs.cloud import JOB_LABEL, SWEEP_LABEL
from gpubake.jobs.launch import GCP_DATASET_DEVICE, Job, JobError, JobOptions
from gpubake.jobs.runner_code import job_module

#: Where role job_runner installs the runner, its settings and the jobs' folders.
RUNNER = "/usr/local/bin/gpubake-job"
RUNNER_CONFIG = "/etc/gpubake/job-runner.json"
WORK_ROOT = "/var/lib/gpubake-job"
#: The runner's exit status after a preemption notice, and the ones not worth a retry.
RUNNER_PREEMPTED = 3
RUNNER_NO_RETRY = (1, 2)
#: Google Cloud Batch's exit code for a task whose Spot VM was preempted.
BATCH_PREEMPTED = 50001
#: Retries of one task / index (Batch allows 0-10).
MAX_RETRIES = 3
#: Where Batch mounts the results bucket (gcsfuse, read-only: the runner syncs through the API).
RESULTS_MOUNT = "/mnt/disks/results"
#: The SkyPilot release the task YAML is written for and checked against (the tests pin it).
SKYPILOT_VERSION = "0.14.1"
SKYPILOT_NOTE = (
    "SkyPilot is not installed here: the task was checked against gpubake's own rules, not "
    f"SkyPilot's schema (pip install skypilot=={SKYPILOT_VERSION} to check with it)"
)
#: The Kubernetes version validate_k8s checks against by default.
K8S_VERSION = "1.33.0"
#: The image's non-root user (role base: base_user_uid).
K8S_UID = 1000
SPECS_MOUNT = "/etc/gpubake/specs"

_REGION = re.compile(r"^[a-z]+-[a-z]+\d+$")
#: SkyPilot's accelerator names where they are not gpus.yml's key in capitals.
_SKY_ACCELERATORS = {"h100-pcie": "H100"}
_SKY_STRATEGIES = ("EAGER_NEXT_REGION", "FAILOVER")
# top-level fields of a SkyPilot task and of its resources gpubake's own check accepts
# (SkyPilot 0.14's schema, the parts a training task uses)
_SKY_TASK_KEYS = {
    "name",
    "workdir",
    "num_nodes",
    "resources",
    "file_mounts",
    "setup",
    "run",
    "envs",
    "secrets",
    "config",
    "volumes",
}
_SKY_RESOURCE_KEYS = {
    "infra",
    "cloud",
    "region",
    "zone",
    "cpus",
    "memory",
    "instance_type",
    "use_spot",
    "job_recovery",
    "disk_size",
    "disk_tier",
    "network_tier",
    "ports",
    "labels",
    "accelerators",
    "accelerator_args",
    "image_id",
    "any_of",
    "ordered",
    "priority",
}


# ---------------------------------------------------------------------------- shared


def _check_jobs(options: JobOptions, jobs: list[Job], engine: str) -> str:
    """The engine job's name (the sweep's id, or the one job's id)."""
    if not jobs:
        raise JobError(f"nothing to emit for {engine}: no jobs")
    if len({job.id for job in jobs}) != len(jobs):
        raise JobError(f"the jobs for {engine} have repeated ids")
    if len({job.sweep for job in jobs}) != 1 or (len(jobs) > 1 and jobs[0].sweep is None):
        raise JobError(f"the jobs for {engine} are not one job or one sweep")
    if options.gpu_count < 1:
        raise JobError("--gpu-count must be 1 or more")
    return jobs[0].sweep or jobs[0].id


def _labels(jobs: list[Job]) -> dict[str, str]:
    return {SWEEP_LABEL: jobs[0].sweep} if jobs[0].sweep else {JOB_LABEL: jobs[0].id}


def _gpu(options: JobOptions) -> stacks.Gpu:
    try:
        return stacks.get_gpu(options.gpu)
    except stacks.StackError as exc:
        raise JobError(str(exc)) from None


def _gcp_accelerator(options: JobOptions) -> str:
    gpu = _gpu(options)
    if not gpu.gcp_accelerators:
        raise JobError(f"--gpu {options.gpu}: GCP offers no {gpu.name}: choose another GPU")
    return gpu.gcp_accelerators[0]


def _gcp_machine(options: JobOptions) -> tuple[str, bool]:
    """(machine type, whether its GPUs come with it), as `job run` on GCP picks them."""
    from gpubake.jobs.gcp import BUILTIN_GPU_PREFIXES, default_machine_type

    machine = options.machine_type or default_machine_type(options.gpu, options.gpu_count)
    return machine, machine.startswith(BUILTIN_GPU_PREFIXES)


def _gcp_image(options: JobOptions) -> tuple[str, bool]:
    """(the image's path, whether it names a family): --image as a path, a family
    (gpubake-<stack> or family/NAME) or an image name; else family gpubake-<stack>."""
    image = options.image or f"family/gpubake-{options.stack}"
    if image.startswith(("projects/", "https://")) and "projects/" in image:
        path = image[image.find("projects/") :]  # a URL as a path: Batch and SkyPilot take those
        return path, "/images/family/" in path
    if "/" in image and not image.startswith("family/"):
        raise JobError(
            f"--image {image!r}: give an image name, family/NAME or "
            "projects/PROJECT/global/images/[family/]NAME"
        )
    if not options.project:
        raise JobError("--project is needed: the gpubake image is found in the project's images")
    family = image.startswith("family/") or image in {f"gpubake-{s}" for s in stacks.stack_names()}
    name = image.removeprefix("family/")
    path = f"projects/{options.project}/global/images/" + (f"family/{name}" if family else name)
    return path, family


def _deadline(options: JobOptions) -> int | None:
    """One attempt's hard stop: --max-run-duration, as the clouds get it (the runner stops the
    job earlier, at the spec's max_run_time, to sync its last checkpoints)."""
    return options.max_run_duration or None


def _parse_specs(texts: list[str], where: str) -> list[dict[str, Any]]:
    """Every spec through the runner's own parse_spec; ids distinct."""
    specs = []
    for i, text in enumerate(texts):
        try:
            specs.append(job_module().parse_spec(text))
        except job_module().SpecError as exc:
            raise JobError(f"{where} {i}: the runner would refuse its spec: {exc}") from None
    ids = [spec["id"] for spec in specs]
    if len(set(ids)) != len(ids):
        raise JobError(f"{where}: two tasks run the same job id")
    return specs


def _fill(template: str, **values: str) -> str:
    """A script template's {name}s filled in (str.format would take the shell's ${...})."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def _one_line(what: object, limit: int = 300) -> str:
    text = " ".join(str(what).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Dumper(yaml.SafeDumper):
    """Block scalars for multi-line strings (the scripts stay readable), no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    plain = "\n" not in value or any(ln != ln.rstrip() for ln in value.splitlines())
    style = None if plain else "|"
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _yaml(*docs: dict[str, Any]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=2**16, allow_unicode=True)


def _load_yaml(text: str, engine: str) -> list[Any]:
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise JobError(f"the {engine} YAML does not parse: {_one_line(exc)}") from None


# ---------------------------------------------------------------------- Google Cloud Batch

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

    from gpubake.jobs.gcp import boot_disk_gb

    _check_jobs(options, jobs, "Batch")  # Batch takes the name at submission
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
    image, _family = _gcp_image(options)
    machine_type, builtin_gpus = _gcp_machine(options)
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
                type_=_gcp_accelerator(options), count=options.gpu_count
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
    script = _fill(_BATCH_SCRIPT, work_root=WORK_ROOT, config=RUNNER_CONFIG, runner=RUNNER)
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
    deadline = _deadline(options)
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
        labels=_labels(jobs),
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
        raise JobError(f"the Batch job is not JSON: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise JobError("the Batch job is not a JSON object")
    try:
        job = batch_v1.Job.from_json(text, ignore_unknown_fields=False)
    except Exception as exc:  # google.protobuf.json_format.ParseError and its kin
        raise JobError(f"not a Google Cloud Batch job: {_one_line(exc)}") from None
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
    _parse_specs(specs, "Batch task")
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
    from gpubake.jobs.gcp import BUILTIN_GPU_PREFIXES

    if not policy.accelerators and not policy.machine_type.startswith(BUILTIN_GPU_PREFIXES):
        raise JobError(f"machine type {policy.machine_type!r} gets no GPU: give accelerators")


# -------------------------------------------------------------------------------- SkyPilot

_SKY_RUN = """\
# gpubake: job $GPUBAKE_JOB_INDEX (else SkyPilot's $SKYPILOT_JOB_RANK) of the sweep, run by the
# image's runner: checkpoints restored from and synced to the results location; exit 3 after
# a preemption notice (recovered), 1 or 2 when the job failed.
set -euo pipefail
i="${GPUBAKE_JOB_INDEX:-${SKYPILOT_JOB_RANK:-0}}"
if ! [[ "$i" =~ ^[0-9]+$ ]] || (( i >= GPUBAKE_JOB_COUNT )); then
  echo "gpubake: job index $i is not one of 0..$((GPUBAKE_JOB_COUNT - 1))" >&2
  exit 2
fi
var="GPUBAKE_JOB_SPEC_$i"
work="$HOME/gpubake-job/$i"
mkdir -p "$work"
printf '%s\\n' "${!var}" > "$work.json"
exec {runner} local "$work.json" --work-dir "$work"
"""


def _sky_image(options: JobOptions) -> str:
    if options.cloud == "aws":
        if not options.image or not options.image.startswith("ami-"):
            raise JobError(
                "SkyPilot on AWS needs the AMI: give --image ami-... (the region's gpubake AMI)"
            )
        if not options.region:
            raise JobError("SkyPilot on AWS needs --region: an AMI belongs to one region")
        return options.image
    image, family = _gcp_image(options)
    if family:
        raise JobError(
            f"SkyPilot looks a GCP image up by name, not by family ({image}): give --image with "
            "the image's name (gcloud compute images describe-from-family gpubake-STACK)"
        )
    return image


def skypilot(options: JobOptions, jobs: list[Job]) -> str:
    """YAML text of one SkyPilot task running `jobs` (a sweep: `sky jobs launch --num-jobs N`)."""
    name = _check_jobs(options, jobs, "SkyPilot")
    if options.dataset_disk:
        raise JobError("--dataset-disk is not emitted for SkyPilot: mount the data with a volume")
    scheme = {"gcp": "gs://", "aws": "s3://"}[options.cloud]
    if not options.results.startswith(scheme):
        raise JobError(
            f"--results {options.results}: a SkyPilot task on {options.cloud} writes to {scheme}"
        )
    image = _sky_image(options)
    _gpu(options)
    accelerator = _SKY_ACCELERATORS.get(options.gpu, options.gpu.upper())
    location = options.region or ""
    if options.cloud == "gcp" and options.zone:
        location = f"{options.region or options.zone.rsplit('-', 1)[0]}/{options.zone}"
    resources: dict[str, Any] = {
        # infra (cloud[/region[/zone]]): cloud, region and zone are deprecated in SkyPilot 0.14
        "infra": f"{options.cloud}/{location}" if location else options.cloud,
        "accelerators": f"{accelerator}:{options.gpu_count}",
        "use_spot": options.spot,
        "image_id": image,
        "job_recovery": {
            # pinned to a region (AWS: the AMI's), a recovery may only move between its zones
            "strategy": "FAILOVER" if location else "EAGER_NEXT_REGION",
            # preemptions are recovered without limit; a failed command is not rerun, as on
            # Batch and Kubernetes; the runner's 3 (a preemption notice) is recovered
            "max_restarts_on_errors": 0,
            "recover_on_exit_codes": [RUNNER_PREEMPTED],
        },
    }
    if options.machine_type:
        resources["instance_type"] = options.machine_type
    envs = {"GPUBAKE_JOB_COUNT": str(len(jobs))}
    envs.update({f"GPUBAKE_JOB_SPEC_{i}": job.spec_text() for i, job in enumerate(jobs)})
    task = {
        "name": name,
        "resources": resources,
        "envs": envs,
        "run": _fill(_SKY_RUN, runner=RUNNER),
    }
    launch = (
        f"sky jobs launch --num-jobs {len(jobs)} FILE  (or, one at a time: "
        "sky jobs launch --env GPUBAKE_JOB_INDEX=I FILE)"
        if len(jobs) > 1
        else "sky jobs launch FILE"
    )
    header = (
        f"# gpubake job emit skypilot: {name}, {len(jobs)} job(s), "
        f"for SkyPilot {SKYPILOT_VERSION}\n"
        f"# launch: {launch}\n"
    )
    return header + _yaml(task)


@functools.cache
def skypilot_version() -> str | None:
    """The SkyPilot validate_skypilot checks with, None when it is not importable here (then
    only gpubake's own rules are checked: SKYPILOT_NOTE says so)."""
    try:
        import sky
    except Exception:  # not installed, or a broken install: gpubake's own rules still hold
        return None
    return str(getattr(sky, "__version__", "unknown"))


def validate_skypilot(text: str) -> None:
    """SkyPilot's own task parser (its task and resources schemas) where SkyPilot is
    importable, then gpubake's rules for the task; JobError (one line) otherwise."""
    docs = _load_yaml(text, "SkyPilot")
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise JobError("the SkyPilot YAML must be one task (one YAML mapping)")
    task = docs[0]
    if skypilot_version() is not None:
        import sky

        try:
            sky.Task.from_yaml_config(copy.deepcopy(task))  # it pops what it reads
        except Exception as exc:  # its schema errors, ValueError from resources
            raise JobError(f"SkyPilot refuses the task: {_one_line(exc)}") from None
    unknown = sorted(set(task) - _SKY_TASK_KEYS)
    if unknown:
        raise JobError(f"unknown SkyPilot task field {unknown[0]!r}")
    resources = task.get("resources")
    if not isinstance(resources, dict):
        raise JobError("the SkyPilot task has no resources mapping")
    unknown = sorted(set(resources) - _SKY_RESOURCE_KEYS)
    if unknown:
        raise JobError(f"unknown SkyPilot resources field {unknown[0]!r}")
    if not isinstance(resources.get("use_spot"), bool):
        raise JobError(f"resources.use_spot {resources.get('use_spot')!r} is not true or false")
    accelerators = resources.get("accelerators")
    if not isinstance(accelerators, str) or not re.match(r"^[A-Za-z0-9-]+:[1-9]\d*$", accelerators):
        raise JobError(f"resources.accelerators {accelerators!r} is not NAME:COUNT (e.g. T4:1)")
    infra = resources.get("infra") or resources.get("cloud")
    if not isinstance(infra, str) or infra.split("/")[0].lower() not in ("gcp", "aws"):
        raise JobError(f"resources.infra {infra!r} is not gcp[/REGION[/ZONE]] or aws[/REGION]")
    if not isinstance(resources.get("image_id"), str) or not resources["image_id"]:
        raise JobError("resources.image_id is missing: the gpubake image runs the task")
    recovery = resources.get("job_recovery")
    if not isinstance(recovery, dict) or recovery.get("strategy") not in _SKY_STRATEGIES:
        raise JobError(
            f"resources.job_recovery.strategy must be one of {', '.join(_SKY_STRATEGIES)}"
        )
    restarts = recovery.get("max_restarts_on_errors", 0)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise JobError(f"job_recovery.max_restarts_on_errors {restarts!r} is not a count")
    codes = recovery.get("recover_on_exit_codes", [])
    codes = [codes] if isinstance(codes, int) and not isinstance(codes, bool) else codes
    if not isinstance(codes, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in codes
    ):
        raise JobError(f"job_recovery.recover_on_exit_codes {codes!r} are not exit codes")
    envs = task.get("envs") or {}
    if not isinstance(envs, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in envs.items()
    ):
        raise JobError("envs must map names to strings")
    count = envs.get("GPUBAKE_JOB_COUNT", "")
    if not count.isdigit() or int(count) < 1:
        raise JobError(f"envs.GPUBAKE_JOB_COUNT {count!r} is not a job count")
    names = [f"GPUBAKE_JOB_SPEC_{i}" for i in range(int(count))]
    missing = [n for n in names if n not in envs]
    extra = sorted(k for k in envs if k.startswith("GPUBAKE_JOB_SPEC_") and k not in names)
    if missing or extra:
        raise JobError(f"envs GPUBAKE_JOB_SPEC_<i> do not match GPUBAKE_JOB_COUNT {count}")
    _parse_specs([envs[n] for n in names], "SkyPilot job")
    if not isinstance(task.get("run"), str) or RUNNER not in task["run"]:
        raise JobError(f"run does not start {RUNNER}")


# ------------------------------------------------------------------------------ Kubernetes

_K8S_SCRIPT = """\
# gpubake: spec $JOB_COMPLETION_INDEX of the ConfigMap, run by the image's runner (no power-off;
# exit 3 after a preemption notice, 1 or 2 when the job failed: that index is not retried)
set -euo pipefail
exec {runner} local "{specs}/$JOB_COMPLETION_INDEX.json" --work-dir "{work}/job"
"""


def _k8s_node(options: JobOptions) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The pod's nodeSelector and tolerations: spot nodes (GKE, EKS) with the GPU."""
    selector: dict[str, str] = {}
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if options.cloud == "gcp":
        accelerators = _gpu(options).gcp_accelerators
        if accelerators:
            selector["cloud.google.com/gke-accelerator"] = accelerators[0]
        if options.spot:
            selector["cloud.google.com/gke-spot"] = "true"
            tolerations.append(
                {
                    "key": "cloud.google.com/gke-spot",
                    "operator": "Equal",
                    "value": "true",
                    "effect": "NoSchedule",
                }
            )
    elif options.spot:
        selector["eks.amazonaws.com/capacityType"] = "SPOT"
    return selector, tolerations


def k8s(
    options: JobOptions, jobs: list[Job], *, image: str, max_parallel: int | None = None
) -> str:
    """YAML text: a ConfigMap with the specs and an Indexed batch/v1 Job, pod i running spec i."""
    name = _check_jobs(options, jobs, "Kubernetes")
    if not image or any(c.isspace() for c in image):
        raise JobError(
            f"--container {image!r} is not a container image: REGISTRY/gpubake/STACK:TAG"
        )
    if options.dataset_disk:
        raise JobError("--dataset-disk is not emitted for Kubernetes: mount the data with a volume")
    if max_parallel is not None and max_parallel < 1:
        raise JobError("--max-parallel must be 1 or more")
    labels = _labels(jobs)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-specs", "labels": labels},
        "data": {f"{i}.json": job.spec_text() for i, job in enumerate(jobs)},
    }
    selector, tolerations = _k8s_node(options)
    grace = int(jobs[0].spec.get("grace_period") or 0)
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # the Job makes a new pod: podFailurePolicy decides
        "terminationGracePeriodSeconds": grace + 15,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": K8S_UID,
            "runAsGroup": K8S_UID,
            "fsGroup": K8S_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "job",
                "image": image,
                "command": [
                    "/bin/bash",
                    "-c",
                    _fill(_K8S_SCRIPT, runner=RUNNER, specs=SPECS_MOUNT, work=WORK_ROOT),
                ],
                "resources": {"limits": {"nvidia.com/gpu": options.gpu_count}},
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [
                    {"name": "specs", "mountPath": SPECS_MOUNT, "readOnly": True},
                    {"name": "work", "mountPath": WORK_ROOT},
                ],
            }
        ],
        "volumes": [
            {"name": "specs", "configMap": {"name": f"{name}-specs"}},
            {"name": "work", "emptyDir": {}},
        ],
    }
    if selector:
        pod["nodeSelector"] = selector
    pod["tolerations"] = tolerations
    deadline = _deadline(options)
    if deadline:
        pod["activeDeadlineSeconds"] = deadline  # one pod's backstop; the runner stops first
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": len(jobs),
            "parallelism": min(max_parallel or len(jobs), len(jobs)),
            "backoffLimitPerIndex": MAX_RETRIES,
            "podFailurePolicy": {
                "rules": [
                    # a spot node taken away, a drain, a preemption: a new pod, not a failure
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                    # the job failed or its spec is bad: rerunning it would fail again
                    {
                        "action": "FailIndex",
                        "onExitCodes": {
                            "containerName": "job",
                            "operator": "In",
                            "values": list(RUNNER_NO_RETRY),
                        },
                    },
                ]
            },
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
    header = (
        f"# gpubake job emit k8s: {name}, {len(jobs)} job(s); kubectl apply -f FILE\n"
        "# the image holds gpubake-job (built with --var job_runner=true); the pods need\n"
        f"# credentials for {options.results} (Workload Identity, IRSA)\n"
    )
    return header + _yaml(config_map, job)


def validate_k8s(text: str, version: str = K8S_VERSION) -> None:
    """Each document against Kubernetes `version`'s schema (kubernetes-validate, strict: unknown
    fields refused), then the rules gpubake's Indexed Jobs keep; JobError (one line) otherwise."""
    import kubernetes_validate

    docs = _load_yaml(text, "Kubernetes")
    if not all(isinstance(doc, dict) for doc in docs):
        raise JobError("a Kubernetes document is not a mapping")
    for doc in docs:
        what = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path) or "(top)"
            raise JobError(f"{what}: {path}: {_one_line(exc.message)}") from None
        except kubernetes_validate.SchemaNotFoundError:
            raise JobError(
                f"{what}: Kubernetes {version} has no {doc.get('apiVersion')} {doc.get('kind')}"
            ) from None
        except kubernetes_validate.utils.VersionNotSupportedError:
            raise JobError(f"kubernetes-validate knows no Kubernetes {version}") from None
    jobs = [d for d in docs if d.get("kind") == "Job"]
    maps = {(d.get("metadata") or {}).get("name"): d for d in docs if d.get("kind") == "ConfigMap"}
    if len(jobs) != 1 or jobs[0].get("apiVersion") != "batch/v1":
        raise JobError("the YAML must hold exactly one batch/v1 Job")
    spec = jobs[0].get("spec") or {}
    if spec.get("completionMode") != "Indexed":
        raise JobError(f"completionMode {spec.get('completionMode')!r}: must be Indexed")
    count = spec.get("completions")
    if not isinstance(count, int) or count < 1:
        raise JobError(f"completions {count!r}: must be the number of jobs")
    pod = (spec.get("template") or {}).get("spec") or {}
    if pod.get("restartPolicy") != "Never":
        raise JobError("the pod's restartPolicy must be Never (podFailurePolicy needs it)")
    rules = (spec.get("podFailurePolicy") or {}).get("rules", [])
    if not any(
        r.get("action") == "Ignore"
        and any(c.get("type") == "DisruptionTarget" for c in r.get("onPodConditions", []))
        for r in rules
    ):
        raise JobError("podFailurePolicy does not Ignore DisruptionTarget: preemptions would count")
    spec_maps = [v["configMap"].get("name") for v in pod.get("volumes", []) if "configMap" in v]
    if len(spec_maps) != 1 or spec_maps[0] not in maps:
        raise JobError("the Job's specs ConfigMap is not in the YAML")
    data = maps[spec_maps[0]].get("data") or {}
    if sorted(data) != sorted(f"{i}.json" for i in range(count)):
        raise JobError(f"the ConfigMap's specs are not 0.json..{count - 1}.json")
    _parse_specs([data[f"{i}.json"] for i in range(count)], "Kubernetes index")
    containers = pod.get("containers", [])
    if not any("JOB_COMPLETION_INDEX" in " ".join(c.get("command", [])) for c in containers):
        raise JobError("no container picks its spec by $JOB_COMPLETION_INDEX")
    if not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers):
        raise JobError("no container asks for a GPU (resources.limits nvidia.com/gpu)")
    if not (pod.get("securityContext") or {}).get("runAsNonRoot"):
        raise JobError("the pod must run as non-root (securityContext.runAsNonRoot)")
