"""What the two clouds' job modules (gcp, aws) share: the Instance rows `job status` and
`job gc` show, the labels / tags every gpubake job VM carries, and waiting on a cloud."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpubake.jobs.launch import JobError

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


def wait_until(
    what: str,
    done: Callable[[], Any],
    *,
    timeout: float,
    poll: float,
    echo: Callable[[str], None] | None = None,
) -> Any:
    """Ask `done()` every `poll` seconds until it gives something true (returned); past
    `timeout`, one line. With `echo`, a progress line each minute."""
    start = said = time.monotonic()
    while True:
        value = done()
        if value:
            return value
        now = time.monotonic()
        if now - start > timeout:
            raise JobError(f"{what}: not done after {timeout / 60:.0f} min")
        if echo and now - said > 60:
            echo(f"{what} ...")
            said = now
        time.sleep(poll)
