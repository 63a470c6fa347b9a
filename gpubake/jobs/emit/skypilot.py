"""`gpubake job emit skypilot`: one SkyPilot task (YAML) for a job or a sweep, and its check
by SkyPilot's own parser (where it is installed) and gpubake's rules."""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

from gpubake.jobs.emit.common import (
    RUNNER,
    RUNNER_PREEMPTED,
    check_cloud,
    check_jobs,
    dump_yaml,
    fill,
    gcp_image,
    load_yaml,
    lookup_gpu,
    one_line,
    parse_specs,
)
from gpubake.jobs.launch import Job, JobError, JobOptions

#: The SkyPilot release the task YAML is written for and checked against (the tests pin it).
SKYPILOT_VERSION = "0.14.1"
SKYPILOT_NOTE = (
    "SkyPilot is not installed here: the task was checked against gpubake's own rules, not "
    f"SkyPilot's schema (pip install skypilot=={SKYPILOT_VERSION} to check with it)"
)
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
    image, family = gcp_image(options)
    if family:
        raise JobError(
            f"SkyPilot looks a GCP image up by name, not by family ({image}): give --image with "
            "the image's name (gcloud compute images describe-from-family gpubake-STACK)"
        )
    return image


def skypilot(options: JobOptions, jobs: list[Job]) -> str:
    """YAML text of one SkyPilot task running `jobs` (a sweep: `sky jobs launch --num-jobs N`)."""
    name = check_jobs(options, jobs, "SkyPilot")
    if options.dataset_disk:
        raise JobError("--dataset-disk is not emitted for SkyPilot: mount the data with a volume")
    scheme = {"gcp": "gs://", "aws": "s3://"}[options.cloud]
    if not options.results.startswith(scheme):
        raise JobError(
            f"--results {options.results}: a SkyPilot task on {options.cloud} writes to {scheme}"
        )
    image = _sky_image(options)
    lookup_gpu(options)
    check_cloud(options)
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
        "run": fill(_SKY_RUN, runner=RUNNER),
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
    return header + dump_yaml(task)


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
    docs = load_yaml(text, "SkyPilot")
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise JobError("the SkyPilot YAML must be one task (one YAML mapping)")
    task = docs[0]
    if skypilot_version() is not None:
        import sky

        try:
            sky.Task.from_yaml_config(copy.deepcopy(task))  # it pops what it reads
        except Exception as exc:  # its schema errors, ValueError from resources
            raise JobError(f"SkyPilot refuses the task: {one_line(exc)}") from None
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
    parse_specs([envs[n] for n in names], "SkyPilot job")
    if not isinstance(task.get("run"), str) or RUNNER not in task["run"]:
        raise JobError(f"run does not start {RUNNER}")
