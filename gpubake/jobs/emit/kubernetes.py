"""`gpubake job emit k8s`: a ConfigMap with the specs and an Indexed batch/v1 Job (YAML), and
its check against Kubernetes' schema (kubernetes-validate) and gpubake's rules."""

from __future__ import annotations

from typing import Any

from gpubake.jobs.emit.common import (
    MAX_RETRIES,
    RUNNER,
    RUNNER_NO_RETRY,
    WORK_ROOT,
    check_jobs,
    dump_yaml,
    fill,
    job_labels,
    load_yaml,
    lookup_gpu,
    one_line,
    parse_specs,
    run_deadline,
)
from gpubake.jobs.launch import Job, JobError, JobOptions

#: The Kubernetes version validate_k8s checks against by default.
K8S_VERSION = "1.33.0"
#: The image's non-root user (role base: base_user_uid).
K8S_UID = 1000
SPECS_MOUNT = "/etc/gpubake/specs"

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
        accelerators = lookup_gpu(options).gcp_accelerators
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
    name = check_jobs(options, jobs, "Kubernetes")
    if not image or any(c.isspace() for c in image):
        raise JobError(
            f"--container {image!r} is not a container image: REGISTRY/gpubake/STACK:TAG"
        )
    if options.dataset_disk:
        raise JobError("--dataset-disk is not emitted for Kubernetes: mount the data with a volume")
    if max_parallel is not None and max_parallel < 1:
        raise JobError("--max-parallel must be 1 or more")
    labels = job_labels(jobs)
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
                    fill(_K8S_SCRIPT, runner=RUNNER, specs=SPECS_MOUNT, work=WORK_ROOT),
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
    deadline = run_deadline(options)
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
    return header + dump_yaml(config_map, job)


def validate_k8s(text: str, version: str = K8S_VERSION) -> None:
    """Each document against Kubernetes `version`'s schema (kubernetes-validate, strict: unknown
    fields refused), then the rules gpubake's Indexed Jobs keep; JobError (one line) otherwise."""
    import kubernetes_validate

    docs = load_yaml(text, "Kubernetes")
    if not all(isinstance(doc, dict) for doc in docs):
        raise JobError("a Kubernetes document is not a mapping")
    for doc in docs:
        what = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path) or "(top)"
            raise JobError(f"{what}: {path}: {one_line(exc.message)}") from None
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
    parse_specs([data[f"{i}.json"] for i in range(count)], "Kubernetes index")
    containers = pod.get("containers", [])
    if not any("JOB_COMPLETION_INDEX" in " ".join(c.get("command", [])) for c in containers):
        raise JobError("no container picks its spec by $JOB_COMPLETION_INDEX")
    if not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers):
        raise JobError("no container asks for a GPU (resources.limits nvidia.com/gpu)")
    if not (pod.get("securityContext") or {}).get("runAsNonRoot"):
        raise JobError("the pod must run as non-root (securityContext.runAsNonRoot)")
