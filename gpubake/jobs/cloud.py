"""What the two clouds' job modules (gcp, aws) share: the Instance rows `job status` and
`job gc` show, and the labels / tags every gpubake job VM carries."""

from __future__ import annotations

from dataclasses import dataclass

#: Label / tag keys on every job VM (GCE labels: lowercase, digits, '-', '_').
JOB_LABEL = "gpubake-job"  # the job id
SWEEP_LABEL = "gpubake-sweep"  # the sweep id, where there is one
DEADLINE_LABEL = "gpubake-deadline"  # unix seconds after which `job gc` deletes it
#: The image label (GCP) / AMI tag (AWS) a gpubake image with the runner carries.
RUNNER_IMAGE_LABEL = "gpubake-job-runner"
#: On their way down (the runner's final sync may still run): `job gc` leaves them alone.
STOPPING_STATES = frozenset({"STOPPING", "SUSPENDING", "stopping", "shutting-down"})


@dataclass(frozen=True)
class Instance:
    """One job VM as the cloud reports it."""

    name: str  # GCE instance name / EC2 instance id
    job: str  # JOB_LABEL's value
    sweep: str | None
    state: str  # the cloud's own word: RUNNING, TERMINATED, running, stopped, ...
    machine_type: str
    gpu: str  # accelerator type / instance type's GPU, as the cloud names it
    created: float  # unix seconds
    deadline: float | None  # unix seconds (DEADLINE_LABEL), None without one
    hourly_price: float | None = None  # USD, where the cloud's API gives it (EC2 spot price)
    stopped: bool = False  # not running any more (TERMINATED / stopped / stopping)
