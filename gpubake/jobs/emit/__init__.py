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

Modules: batch, skypilot and kubernetes, one an engine; common holds what they share.
"""

from gpubake.jobs.emit.batch import batch, validate_batch
from gpubake.jobs.emit.common import RUNNER, RUNNER_CONFIG, WORK_ROOT
from gpubake.jobs.emit.kubernetes import K8S_VERSION, SPECS_MOUNT, k8s, validate_k8s
from gpubake.jobs.emit.skypilot import (
    SKYPILOT_NOTE,
    SKYPILOT_VERSION,
    skypilot,
    skypilot_version,
    validate_skypilot,
)
from gpubake.jobs.launch import JobError

__all__ = [
    "K8S_VERSION",
    "RUNNER",
    "RUNNER_CONFIG",
    "SKYPILOT_NOTE",
    "SKYPILOT_VERSION",
    "SPECS_MOUNT",
    "WORK_ROOT",
    "JobError",
    "batch",
    "k8s",
    "skypilot",
    "skypilot_version",
    "validate_batch",
    "validate_k8s",
    "validate_skypilot",
]
