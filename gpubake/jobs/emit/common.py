"""What the engines of `gpubake job emit` share: where the image's runner lives and how it
exits, and the checks, image and machine choices, spec parsing and YAML writing every engine
uses."""

from __future__ import annotations

from typing import Any

import yaml

from gpubake import stacks
from gpubake.jobs import aws, gcp
from gpubake.jobs.cloud import JOB_LABEL, SWEEP_LABEL
from gpubake.jobs.gcp import BUILTIN_GPU_PREFIXES, default_machine_type
from gpubake.jobs.launch import Job, JobError, JobOptions
from gpubake.jobs.runner_code import job_module

#: Where role job_runner installs the runner, its settings and the jobs' folders.
RUNNER = "/usr/local/bin/gpubake-job"
RUNNER_CONFIG = "/etc/gpubake/job-runner.json"
WORK_ROOT = "/var/lib/gpubake-job"
#: The runner's exit status after a preemption notice, and the ones not worth a retry.
RUNNER_PREEMPTED = 3
RUNNER_NO_RETRY = (1, 2)
#: Retries of one task / index (Batch allows 0-10).
MAX_RETRIES = 3


def check_jobs(options: JobOptions, jobs: list[Job], engine: str) -> str:
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


def job_labels(jobs: list[Job]) -> dict[str, str]:
    return {SWEEP_LABEL: jobs[0].sweep} if jobs[0].sweep else {JOB_LABEL: jobs[0].id}


def lookup_gpu(options: JobOptions) -> stacks.Gpu:
    try:
        return stacks.get_gpu(options.gpu)
    except stacks.StackError as exc:
        raise JobError(str(exc)) from None


def gcp_accelerator(options: JobOptions) -> str:
    gpu = lookup_gpu(options)
    if not gpu.gcp_accelerators:
        raise JobError(f"--gpu {options.gpu}: GCP offers no {gpu.name}: choose another GPU")
    return gpu.gcp_accelerators[0]


def gcp_machine(options: JobOptions) -> tuple[str, bool]:
    """(machine type, whether its GPUs come with it), as `job run` on GCP picks them."""
    machine = options.machine_type or default_machine_type(options.gpu, options.gpu_count)
    return machine, machine.startswith(BUILTIN_GPU_PREFIXES)


def check_cloud(options: JobOptions) -> None:
    """What the cloud's API would refuse of the VMs the engine starts (gpubake.clouds' rules,
    as `job run` checks them)."""
    if options.cloud == "gcp":
        machine, builtin = gcp_machine(options)
        gcp.check_offline(options, machine, gcp_accelerator(options), builtin)
    else:
        aws.check_offline(options)


def gcp_image(options: JobOptions) -> tuple[str, bool]:
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


def run_deadline(options: JobOptions) -> int | None:
    """One attempt's hard stop: --max-run-duration, as the clouds get it (the runner stops the
    job earlier, at the spec's max_run_time, to sync its last checkpoints)."""
    return options.max_run_duration or None


def parse_specs(texts: list[str], where: str) -> list[dict[str, Any]]:
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


def fill(template: str, **values: str) -> str:
    """A script template's {name}s filled in (str.format would take the shell's ${...})."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def one_line(what: object, limit: int = 300) -> str:
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


def dump_yaml(*docs: dict[str, Any]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=2**16, allow_unicode=True)


def load_yaml(text: str, engine: str) -> list[Any]:
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise JobError(f"the {engine} YAML does not parse: {one_line(exc)}") from None
