"""`gpubake job emit batch|skypilot|k8s`: what each engine gets, checked by that engine's own
types or schema (google-cloud-batch, SkyPilot's task parser in a venv of its own,
kubernetes-validate), and each validator refusing one wrong field."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from gpubake.jobs import emit, launch
from gpubake.jobs.launch import JobError, JobOptions

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {"lr": ["1e-3", "1e-4"], "bs": ["32", "64"]}
COMMAND = ("python", "train.py", "--lr", "{lr}", "--bs", "{bs}")
AMI = "ami-0123456789abcdef0"
IMAGE = "registry.example/gpubake/pytorch:2026.01"


@pytest.fixture(scope="module")
def gcp() -> JobOptions:
    return JobOptions(
        cloud="gcp",
        results="gs://bucket-name/runs",
        command=COMMAND,
        project="my-proj",
        zone="us-central1-a",
        max_run_duration=6 * 3600,
    )


@pytest.fixture(scope="module")
def aws() -> JobOptions:
    return JobOptions(
        cloud="aws", results="s3://bucket-name/runs", command=COMMAND, region="us-east-1", image=AMI
    )


@pytest.fixture(scope="module")
def sweep(gcp: JobOptions) -> list[launch.Job]:
    return launch.make_jobs(gcp, PARAMS)


def one_job(options: JobOptions) -> list[launch.Job]:
    """A single job (`job run`): a command without sweep placeholders."""
    return launch.make_jobs(dataclasses.replace(options, command=("python", "train.py")))


def spec_texts(jobs: list[launch.Job]) -> list[str]:
    return [job.spec_text() for job in jobs]


def refused(validate: Callable[[str], None], text: str, match: str) -> str:
    with pytest.raises(JobError, match=match) as info:
        validate(text)
    assert "\n" not in str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------ Batch


@pytest.fixture(scope="module")
def batch_text(gcp: JobOptions, sweep: list[launch.Job]) -> str:
    return emit.batch(gcp, sweep, region="us-central1", max_parallel=2)


def test_batch_job(batch_text: str, sweep: list[launch.Job]) -> None:
    emit.validate_batch(batch_text)
    data = json.loads(batch_text)
    (group,) = data["taskGroups"]
    assert int(group["taskCount"]) == 4 and int(group["parallelism"]) == 2
    assert int(group["taskCountPerNode"]) == 1
    envs = [env["variables"] for env in group["taskEnvironments"]]
    assert [env["GPUBAKE_JOB_SPEC"] for env in envs] == spec_texts(sweep)
    assert len(set(spec_texts(sweep))) == 4
    assert envs[3]["GPUBAKE_PARAM_LR"] == "1e-4" and envs[3]["GPUBAKE_PARAM_BS"] == "64"
    task = group["taskSpec"]
    assert task["lifecyclePolicies"] == [
        {"action": "RETRY_TASK", "actionCondition": {"exitCodes": [50001, 3]}}
    ]
    assert task["maxRetryCount"] == 3 and task["maxRunDuration"] == "21600s"
    script = task["runnables"][0]["script"]["text"]
    assert "/usr/local/bin/gpubake-job local" in script and "--work-dir" in script
    assert "$GPUBAKE_JOB_SPEC" in script and "runuser" in script
    assert task["volumes"] == [
        {
            "gcs": {"remotePath": "bucket-name/runs"},
            "mountPath": "/mnt/disks/results",
            "mountOptions": ["-o ro"],
        }
    ]
    (instance,) = data["allocationPolicy"]["instances"]
    assert instance["installGpuDrivers"] is False
    policy = instance["policy"]
    assert policy["provisioningModel"] == "SPOT"
    assert policy["machineType"] == "n1-standard-8"
    assert policy["accelerators"] == [{"type": "nvidia-tesla-t4", "count": "1"}]
    assert policy["bootDisk"]["image"] == "projects/my-proj/global/images/family/gpubake-pytorch"
    assert data["allocationPolicy"]["location"]["allowedLocations"] == ["zones/us-central1-a"]
    assert data["logsPolicy"] == {"destination": "CLOUD_LOGGING"}
    assert data["labels"] == {"gpubake-sweep": sweep[0].sweep}


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("runuser"), reason="Batch runs the script as root"
)
def test_batch_script_runs_the_runner_as_the_job_user(batch_text: str) -> None:
    """The task's script, with the runner and its settings replaced: spec written, work dir
    the job user's, the runner's exit status (3: preempted, retried) passed on to Batch."""
    with tempfile.TemporaryDirectory() as tmp:  # pytest's tmp_path is closed to other users
        _run_batch_script(batch_text, Path(tmp))


def _run_batch_script(batch_text: str, tmp_path: Path) -> None:
    runner, config = tmp_path / "runner", tmp_path / "job-runner.json"
    runner.write_text('#!/bin/bash\necho "$(id -un) $*"; cat "$2"; stat -c %U "$4"; exit 3\n')
    runner.chmod(0o755)
    config.write_text('{"user": "nobody"}')
    tmp_path.chmod(0o755)
    data = json.loads(batch_text)
    script = data["taskGroups"][0]["taskSpec"]["runnables"][0]["script"]["text"]
    script = script.replace(emit.RUNNER, str(runner)).replace(emit.RUNNER_CONFIG, str(config))
    script = script.replace(emit.WORK_ROOT, str(tmp_path))
    env = data["taskGroups"][0]["taskEnvironments"][2]["variables"]
    proc = subprocess.run(
        ["bash", "-c", script], env={"PATH": os.environ["PATH"], **env},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    work = tmp_path / env["GPUBAKE_JOB_ID"]
    assert proc.stdout.splitlines() == [
        f"nobody local {work}.json --work-dir {work}",
        env["GPUBAKE_JOB_SPEC"],
        "nobody",
    ]


def test_batch_single_job_and_options(gcp: JobOptions) -> None:
    options = dataclasses.replace(gcp, zone=None, image="gpubake-pytorch-20260101", spot=False)
    (job,) = one_job(options)
    data = json.loads(emit.batch(options, [job], region="europe-west4"))
    emit.validate_batch(json.dumps(data))
    group = data["taskGroups"][0]
    assert int(group["taskCount"]) == 1 and "parallelism" not in group
    policy = data["allocationPolicy"]["instances"][0]["policy"]
    assert policy["provisioningModel"] == "STANDARD"
    assert policy["bootDisk"]["image"] == "projects/my-proj/global/images/gpubake-pytorch-20260101"
    assert data["allocationPolicy"]["location"]["allowedLocations"] == ["regions/europe-west4"]
    # accelerator-optimized machines bring their GPUs: no accelerators[]
    a100 = dataclasses.replace(options, gpu="a100", gpu_count=2)
    policy = json.loads(emit.batch(a100, [job], region="europe-west4"))["allocationPolicy"]
    assert policy["instances"][0]["policy"]["machineType"] == "a2-highgpu-2g"
    assert "accelerators" not in policy["instances"][0]["policy"]


def test_batch_refuses_what_it_cannot_run(gcp: JobOptions, aws: JobOptions) -> None:
    jobs = one_job(gcp)
    with pytest.raises(JobError, match="runs on GCP"):
        emit.batch(aws, one_job(aws), region="us-central1")
    with pytest.raises(JobError, match="is not in region"):
        emit.batch(gcp, jobs, region="europe-west4")
    with pytest.raises(JobError, match="not a GCP region"):
        emit.batch(gcp, jobs, region="")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d["allocationPolicy"]["instances"][0]["policy"].update(
            provisioningModel="CHEAP"), "Invalid enum value CHEAP"),
        (lambda d: d["taskGroups"][0]["taskSpec"].update(maxRetryCounts=3), "maxRetryCounts"),
        (lambda d: d["taskGroups"][0].update(taskCount="x"), "taskCount"),
        (lambda d: d["taskGroups"][0]["taskEnvironments"].pop(), "does not match the 3"),
        (lambda d: d["taskGroups"][0]["taskSpec"].pop("lifecyclePolicies"), "not retried"),
        (lambda d: d["taskGroups"][0]["taskEnvironments"][1]["variables"].update(
            GPUBAKE_JOB_SPEC='{"gpubake_job": 1}'), "would refuse its spec"),
    ],
)  # fmt: skip
def test_batch_validator_refuses(batch_text: str, change: Callable, match: str) -> None:
    data = json.loads(batch_text)
    change(data)
    refused(emit.validate_batch, json.dumps(data), match)


# --------------------------------------------------------------------------- SkyPilot


@pytest.fixture(scope="module")
def sky_gcp(gcp: JobOptions, sweep: list[launch.Job]) -> str:
    return emit.skypilot(dataclasses.replace(gcp, image="gpubake-pytorch-20260101"), sweep)


@pytest.fixture(scope="module")
def sky_aws(aws: JobOptions) -> str:
    return emit.skypilot(aws, launch.make_jobs(aws, PARAMS))


def test_skypilot_task(sky_gcp: str, sweep: list[launch.Job]) -> None:
    emit.validate_skypilot(sky_gcp)
    (task,) = yaml.safe_load_all(sky_gcp)
    assert task["name"] == sweep[0].sweep
    assert task["resources"] == {
        "infra": "gcp/us-central1/us-central1-a",
        "accelerators": "T4:1",
        "use_spot": True,
        "image_id": "projects/my-proj/global/images/gpubake-pytorch-20260101",
        "job_recovery": {
            "strategy": "FAILOVER",
            "max_restarts_on_errors": 0,
            "recover_on_exit_codes": [3],
        },
    }
    envs = task["envs"]
    assert envs["GPUBAKE_JOB_COUNT"] == "4"
    assert [envs[f"GPUBAKE_JOB_SPEC_{i}"] for i in range(4)] == spec_texts(sweep)
    assert "SKYPILOT_JOB_RANK" in task["run"] and "gpubake-job local" in task["run"]
    assert "--num-jobs 4" in sky_gcp.splitlines()[1]


def test_skypilot_run_picks_the_index(sky_gcp: str, tmp_path: Path) -> None:
    """The run script, with the runner replaced by `cat`: each rank gets its own spec."""
    (task,) = yaml.safe_load_all(sky_gcp)
    script = task["run"].replace("exec /usr/local/bin/gpubake-job local", "exec cat")
    script = script.replace('--work-dir "$work"', "")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **task["envs"]}
    for rank in ("0", "3"):
        out = subprocess.run(
            ["bash", "-c", script], env={**env, "SKYPILOT_JOB_RANK": rank},
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert out.stdout.strip() == task["envs"][f"GPUBAKE_JOB_SPEC_{rank}"]
    bad = subprocess.run(
        ["bash", "-c", script], env={**env, "GPUBAKE_JOB_INDEX": "4"},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "not one of 0..3" in bad.stderr


def test_skypilot_aws_and_refusals(sky_aws: str, gcp: JobOptions, aws: JobOptions) -> None:
    emit.validate_skypilot(sky_aws)
    (task,) = yaml.safe_load_all(sky_aws)
    assert task["resources"]["infra"] == "aws/us-east-1"
    assert task["resources"]["image_id"] == AMI
    with pytest.raises(JobError, match="not by family"):
        emit.skypilot(gcp, one_job(gcp))  # no --image: family gpubake-pytorch
    with pytest.raises(JobError, match="needs the AMI"):
        emit.skypilot(dataclasses.replace(aws, image=None), one_job(aws))


SKY_BREAKS = {
    "use_spot": lambda t: t["resources"].update(use_spot="maybe"),
    "unknown_key": lambda t: t.update(retries=3),
    "unknown_resource": lambda t: t["resources"].update(spot_price=1),
    "strategy": lambda t: t["resources"]["job_recovery"].update(strategy="WHENEVER"),
    "spec": lambda t: t["envs"].update(GPUBAKE_JOB_SPEC_2='{"gpubake_job": 2}'),
}


def broken_sky(text: str) -> dict[str, str]:
    out = {}
    for name, change in SKY_BREAKS.items():
        (task,) = yaml.safe_load_all(text)
        change(task)
        out[name] = yaml.safe_dump(task)
    return out


def test_skypilot_validator_refuses(sky_gcp: str) -> None:
    """gpubake's own rules (SkyPilot is not installable beside gpubake: it pins click)."""
    assert emit.skypilot_version() is None
    broken = broken_sky(sky_gcp)
    refused(emit.validate_skypilot, broken["use_spot"], "use_spot 'maybe'")
    refused(emit.validate_skypilot, broken["unknown_key"], "unknown SkyPilot task field 'retries'")
    refused(emit.validate_skypilot, broken["unknown_resource"], "'spot_price'")
    refused(emit.validate_skypilot, broken["strategy"], "strategy must be one of")
    refused(emit.validate_skypilot, broken["spec"], "job 2: the runner would refuse")
    refused(emit.validate_skypilot, sky_gcp + "---\nname: two\n", "one task")


def _sky_python() -> Path:
    """SkyPilot SKYPILOT_VERSION in a venv of its own, made once with uv and kept under
    ~/.cache/gpubake/test-skypilot/<version>; skips when the package index is out of reach."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    venv = cache / "gpubake" / "test-skypilot" / emit.SKYPILOT_VERSION
    python, done = venv / "bin" / "python", venv / ".gpubake-complete"
    if done.is_file() and python.is_file():
        return python
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if not uv:
        pytest.skip("uv is not installed: cannot make SkyPilot's venv")
    shutil.rmtree(venv, ignore_errors=True)
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    for argv in (
        [uv, "venv", "--quiet", "--python", sys.executable, str(venv)],
        [uv, "pip", "install", "--quiet", "--python", str(python),
         f"skypilot=={emit.SKYPILOT_VERSION}"],
    ):  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            err = " ".join(proc.stderr.split())
            network = ("connect", "dns", "timed out", "network", "resolve", "offline", "fetch")
            if any(word in err.lower() for word in network):
                pytest.skip(f"the package index is out of reach: {err[:200]}")
            pytest.fail(f"{' '.join(argv[:3])} failed: {err[:500]}")
    done.write_text(emit.SKYPILOT_VERSION, encoding="utf-8")
    return python


_SKY_SCRIPT = """
import json, sys
from gpubake.jobs import emit
out = {"version": emit.skypilot_version()}
for name, text in json.load(sys.stdin).items():
    try:
        emit.validate_skypilot(text)
        out[name] = None
    except emit.JobError as exc:
        out[name] = str(exc)
print(json.dumps(out))
"""


def test_skypilot_own_parser_accepts_and_refuses(
    sky_gcp: str, sky_aws: str, tmp_path: Path
) -> None:
    """validate_skypilot where SkyPilot is importable: sky.Task.from_yaml_config (its task
    and resources schemas) on what emit writes, and on the broken variants."""
    python = _sky_python()
    texts = {"gcp": sky_gcp, "aws": sky_aws, **broken_sky(sky_gcp)}
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),  # SkyPilot writes ~/.sky
        "PYTHONPATH": str(ROOT),
        "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
    }
    proc = subprocess.run(
        [str(python), "-c", _SKY_SCRIPT], input=json.dumps(texts), env=env,
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("version") == emit.SKYPILOT_VERSION
    assert out.pop("gcp") is None and out.pop("aws") is None
    assert all(out.values()), out
    # SkyPilot's own parser, not only gpubake's rules, turned these away
    assert out["use_spot"].startswith("SkyPilot refuses the task") and "use_spot" in out["use_spot"]
    assert out["unknown_key"].startswith("SkyPilot refuses") and "retries" in out["unknown_key"]
    assert out["unknown_resource"].startswith("SkyPilot refuses")


# ------------------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def k8s_text(gcp: JobOptions, sweep: list[launch.Job]) -> str:
    return emit.k8s(gcp, sweep, image=IMAGE, max_parallel=2)


def test_k8s_indexed_job(k8s_text: str, sweep: list[launch.Job]) -> None:
    emit.validate_k8s(k8s_text)
    config_map, job = yaml.safe_load_all(k8s_text)
    assert config_map["kind"] == "ConfigMap"
    assert [config_map["data"][f"{i}.json"] for i in range(4)] == spec_texts(sweep)
    assert job["apiVersion"] == "batch/v1" and job["metadata"]["name"] == sweep[0].sweep
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == 4 and spec["parallelism"] == 2
    assert spec["backoffLimitPerIndex"] == 3
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert rules[1]["action"] == "FailIndex" and rules[1]["onExitCodes"]["values"] == [1, 2]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-spot": "true",
        "cloud.google.com/gke-accelerator": "nvidia-tesla-t4",
    }
    assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
            "effect": "NoSchedule"} in pod["tolerations"]  # fmt: skip
    assert pod["activeDeadlineSeconds"] == 6 * 3600
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    script = container["command"][-1]
    assert '"/etc/gpubake/specs/$JOB_COMPLETION_INDEX.json"' in script
    assert "/usr/local/bin/gpubake-job local" in script
    assert {"name": "specs", "configMap": {"name": config_map["metadata"]["name"]}} in pod[
        "volumes"
    ]


def test_k8s_script_picks_the_index(k8s_text: str, tmp_path: Path) -> None:
    config_map, job = yaml.safe_load_all(k8s_text)
    for name, text in config_map["data"].items():
        (tmp_path / name).write_text(text)
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    script = script.replace(emit.SPECS_MOUNT, str(tmp_path))
    script = script.replace(f"exec {emit.RUNNER} local", "exec cat").split(" --work-dir")[0]
    out = subprocess.run(
        ["bash", "-c", script], env={"PATH": os.environ["PATH"], "JOB_COMPLETION_INDEX": "2"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout == config_map["data"]["2.json"]


def test_k8s_aws_single_job(aws: JobOptions) -> None:
    options = dataclasses.replace(aws, gpu_count=4)
    text = emit.k8s(options, one_job(options), image=IMAGE)
    emit.validate_k8s(text, "1.35.0")
    _, job = yaml.safe_load_all(text)
    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["completions"] == 1 and job["spec"]["parallelism"] == 1
    assert pod["nodeSelector"] == {"eks.amazonaws.com/capacityType": "SPOT"}
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 4}
    assert "activeDeadlineSeconds" not in pod


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c, j: j["spec"].update(completionMode="Sometimes"), "must be Indexed"),
        (lambda c, j: j["spec"].update(parallelism="x"), r"spec\.parallelism: 'x' is not"),
        (lambda c, j: j["spec"]["template"]["spec"].update(restartPolicy="Always"), "Never"),
        (lambda c, j: j["spec"]["template"]["spec"]["containers"][0].update(gpus=1),
         "'gpus' was unexpected"),
        (lambda c, j: j["spec"].pop("podFailurePolicy"), "DisruptionTarget"),
        (lambda c, j: c["data"].pop("3.json"), "0.json..3.json"),
        (lambda c, j: j["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot"),
         "non-root"),
    ],
)  # fmt: skip
def test_k8s_validator_refuses(k8s_text: str, change: Callable, match: str) -> None:
    config_map, job = yaml.safe_load_all(k8s_text)
    change(config_map, job)
    refused(emit.validate_k8s, yaml.safe_dump_all([config_map, job]), match)


def test_k8s_validator_version() -> None:
    refused(lambda t: emit.validate_k8s(t, "1.99.0"), "kind: Namespace\napiVersion: v1\n",
            "knows no Kubernetes 1.99.0")  # fmt: skip


def test_emitters_refuse_no_jobs(gcp: JobOptions) -> None:
    for call in (
        lambda: emit.batch(gcp, [], region="us-central1"),
        lambda: emit.skypilot(gcp, []),
        lambda: emit.k8s(gcp, [], image=IMAGE),
    ):
        with pytest.raises(JobError, match="no jobs"):
            call()
