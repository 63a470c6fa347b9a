"""gpubake.jobs.gcp through the real google-cloud-compute client (REST transport) against a
loopback stand-in of the Compute Engine API (tests/compute_standin.py), which records every
request; the results-location probe goes to gcp-storage-emulator (tests/object_stores.py).

What is asserted is what GCE would receive: the insert bodies (Spot, deletion at the deadline,
no live migration, the GPU, the read-only dataset disk, the VM's scopes, the job's spec in
metadata, the labels), and that every pre-start check refuses with one line before any insert.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials

from gpubake.clouds.gcp import ENDPOINT_ENV
from gpubake.jobs import gcp, launch
from gpubake.jobs.cloud import Instance
from gpubake.jobs.launch import JobError, JobOptions
from tests.compute_standin import ComputeStandin, compute_standin
from tests.object_stores import GcsServer, gcs_server

PROJECT = "demo-proj"
ZONE = "us-central1-a"
OTHER_ZONE = "us-central1-b"  # a zone the stand-in offers no GPU in
BUCKET = "gpubake-results"
RUNNER = {"gpubake-job-runner": "true"}
VM_SCOPES = [
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/logging.write",
]
FOREIGN_ENV = (
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "CLOUDSDK_CORE_PROJECT",
    "CLOUDSDK_COMPUTE_ZONE",
    ENDPOINT_ENV,
)


@pytest.fixture(scope="module")
def gce() -> Iterator[ComputeStandin]:
    with compute_standin() as standin:
        standin.add_image(PROJECT, "gpubake-pytorch-old", family="gpubake-pytorch", labels=RUNNER)
        standin.add_image(PROJECT, "gpubake-pytorch-new", family="gpubake-pytorch", labels=RUNNER)
        standin.add_image(PROJECT, "plain-debian", family="debian", labels={"os": "debian"})
        t4 = gcp.stacks.gpus_data()["gpus"]["t4"]["gcp"]
        standin.add_accelerator_type(PROJECT, ZONE, t4["accelerators"][0], max_cards=4)
        standin.add_machine_type(PROJECT, ZONE, t4["build_machine_type"])
        standin.add_accelerator_type(PROJECT, ZONE, "nvidia-tesla-a100", max_cards=16)
        standin.add_machine_type(
            PROJECT, ZONE, "a2-highgpu-1g", cpus=12, accelerators=[("nvidia-tesla-a100", 1)]
        )
        standin.add_machine_type(PROJECT, OTHER_ZONE, "n1-standard-8")
        standin.add_disk(PROJECT, ZONE, "imagenet")
        standin.add_disk(PROJECT, ZONE, "busy")
        standin.add_disk(PROJECT, ZONE, "shared")
        standin.add_instance(PROJECT, ZONE, "trainer", disks=[("busy", "READ_WRITE")])
        standin.add_instance(PROJECT, ZONE, "reader", disks=[("shared", "READ_ONLY")])
        yield standin


@pytest.fixture(scope="module")
def gcs() -> Iterator[GcsServer]:
    with gcs_server() as server:
        server.make_bucket(BUCKET)
        yield server


@pytest.fixture
def env(gcs: GcsServer, monkeypatch) -> None:
    """The process pointed at the storage emulator, nothing of the caller's GCP set-up left."""
    for name in FOREIGN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in gcs.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(gcp, "_now", lambda: 1_800_000_000.0)


def options(**changes: Any) -> JobOptions:
    base: dict[str, Any] = {
        "cloud": "gcp",
        "results": f"gs://{BUCKET}/runs",
        "command": ("python", "train.py", "--lr", "{lr}", "--bs", "{bs}"),
        "project": PROJECT,
        "zone": ZONE,
        "max_run_duration": 6 * 3600,
        "dataset_disk": "imagenet",
        "name": "itest",
    }
    base.update(changes)
    return JobOptions(**base)


def one_job(opts: JobOptions) -> list[launch.Job]:
    return launch.make_jobs(opts, launch.parse_params(["lr=1e-3", "bs=32"]))


def client(gce: ComputeStandin, opts: JobOptions) -> gcp.Gcp:
    made = gcp.Gcp(opts, api_endpoint=gce.url, credentials=AnonymousCredentials())
    made.poll_interval = 0.01
    return made


def started(gce: ComputeStandin, opts: JobOptions, params: list[str]) -> list[launch.Job]:
    jobs = launch.make_jobs(opts, launch.parse_params(params))
    cloud = client(gce, opts)
    image = cloud.preflight(jobs)
    for job in jobs:
        assert cloud.create(job, image) == job.id
    return jobs


def metadata(body: dict[str, Any]) -> dict[str, str]:
    return {item["key"]: item["value"] for item in body["metadata"]["items"]}


# ------------------------------------------------------------------------ the insert body


def test_insert_body_is_spot_gpu_read_only_dataset_and_the_spec(gce, env):
    opts = options()
    jobs = one_job(opts)
    cloud = client(gce, opts)
    gce.clear()

    image = cloud.preflight(jobs)
    assert image.endswith(f"/projects/{PROJECT}/global/images/gpubake-pytorch-new")  # newest
    cloud.create(jobs[0], image)

    [body] = gce.inserts()
    assert body == cloud.requests(jobs)[0]  # requests() is exactly what is sent
    scheduling = body["scheduling"]
    assert scheduling["provisioningModel"] == "SPOT"
    assert scheduling["instanceTerminationAction"] == "DELETE"
    assert scheduling["maxRunDuration"] == {"seconds": str(6 * 3600)}
    assert scheduling["onHostMaintenance"] == "TERMINATE"
    assert scheduling["automaticRestart"] is False
    assert body["guestAccelerators"] == [
        {"acceleratorType": f"zones/{ZONE}/acceleratorTypes/nvidia-tesla-t4", "acceleratorCount": 1}
    ]
    assert body["machineType"] == f"zones/{ZONE}/machineTypes/n1-standard-8"
    boot, dataset = body["disks"]
    assert boot["boot"] is True and boot["autoDelete"] is True
    assert boot["initializeParams"]["sourceImage"] == image
    assert int(boot["initializeParams"]["diskSizeGb"]) >= gcp.MIN_BOOT_DISK_GB
    assert dataset["mode"] == "READ_ONLY"
    assert dataset["deviceName"] == launch.GCP_DATASET_DEVICE == "gpubake-dataset"
    assert dataset["autoDelete"] is False
    assert dataset["source"].endswith(f"/zones/{ZONE}/disks/imagenet")
    assert body["serviceAccounts"] == [{"email": "default", "scopes": VM_SCOPES}]
    spec = metadata(body)["gpubake-job"]
    assert spec == jobs[0].spec_text()
    assert json.loads(spec)["dataset"]["device"] == "gpubake-dataset"
    assert body["labels"] == {
        "gpubake-job": jobs[0].id,
        "gpubake-sweep": jobs[0].sweep,
        "gpubake-deadline": str(1_800_000_000 + 6 * 3600),
    }
    assert body["networkInterfaces"][0]["network"] == "global/networks/default"
    assert body["networkInterfaces"][0]["accessConfigs"][0]["type"] == "ONE_TO_ONE_NAT"

    # create waited for the insert's operation, and the VM is there with the disk read-only
    insert = gce.requests("POST", "/instances")[0]
    assert insert.query.get("requestId")
    waits = [r.path for r in gce.requests("POST", "/wait")]
    assert any("-insert/wait" in path for path in waits)
    vm = gce.instance(PROJECT, ZONE, jobs[0].id)
    assert vm is not None and vm["status"] == "RUNNING"

    # a second job on the same disk: it is attached read-only only, so it is accepted
    more = one_job(opts)
    assert cloud.preflight(more) == image
    cloud.delete(cloud.list(job=jobs[0].id))


def test_standard_vm_without_deadline_and_no_spot(gce, env):
    opts = options(spot=False, max_run_duration=None, dataset_disk=None)
    [body] = gcp.Gcp(opts, credentials=AnonymousCredentials()).requests(one_job(opts))
    assert body["scheduling"]["provisioningModel"] == "STANDARD"
    assert "instanceTerminationAction" not in body["scheduling"]
    assert "maxRunDuration" not in body["scheduling"]
    assert "gpubake-deadline" not in body["labels"]
    assert [d.get("boot") for d in body["disks"]] == [True]


def test_requests_need_no_server_and_no_credentials(env, monkeypatch):
    def no_lookup(*args, **kwargs):
        raise AssertionError("requests() looked up credentials")

    monkeypatch.setattr("google.auth.default", no_lookup)
    opts = options()
    jobs = one_job(opts)
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    for cloud in (gcp.Gcp(opts), gcp.Gcp(opts, api_endpoint=dead)):
        [body] = cloud.requests(jobs)
        assert body["name"] == jobs[0].id
        image = body["disks"][0]["initializeParams"]["sourceImage"]
        assert image == f"projects/{PROJECT}/global/images/family/gpubake-pytorch"
        assert metadata(body)["gpubake-job"] == jobs[0].spec_text()
    named = gcp.Gcp(options(image="my-image")).requests(jobs)[0]
    assert named["disks"][0]["initializeParams"]["sourceImage"] == (
        f"projects/{PROJECT}/global/images/my-image"
    )


@pytest.mark.parametrize(
    ("gpu", "count", "machine", "accelerators", "disk_type"),
    [
        ("t4", 2, "n1-standard-8", 2, "pd-balanced"),
        ("a100", 1, "a2-highgpu-1g", 0, "pd-balanced"),
        ("a100", 4, "a2-highgpu-4g", 0, "pd-balanced"),
        ("l4", 2, "g2-standard-24", 0, "pd-balanced"),
        ("h100", 8, "a3-highgpu-8g", 0, "pd-balanced"),
        ("h200", 8, "a3-ultragpu-8g", 0, "hyperdisk-balanced"),
    ],
)
def test_machine_types_with_gpus_built_in_get_no_accelerators(
    env, gpu, count, machine, accelerators, disk_type
):
    opts = options(gpu=gpu, gpu_count=count, stack="pytorch")
    [body] = gcp.Gcp(opts).requests(one_job(opts))
    assert body["machineType"] == f"zones/{ZONE}/machineTypes/{machine}"
    assert sum(a["acceleratorCount"] for a in body.get("guestAccelerators", [])) == accelerators
    assert body["disks"][0]["initializeParams"]["diskType"].endswith(f"/{disk_type}")


def test_gpu_not_offered_on_gcp_is_refused(env):
    with pytest.raises(JobError, match=r"--gpu m60 is not offered on GCP: use one of .*t4"):
        gcp.Gcp(options(gpu="m60"))
    with pytest.raises(JobError, match=r"a3-ultragpu machines for --gpu h200 carry 8 GPUs"):
        gcp.Gcp(options(gpu="h200", gpu_count=1))


def test_insert_refused_by_the_api_is_one_line(gce, env):
    opts = options(dataset_disk=None)
    [job] = started(gce, opts, ["lr=1e-3", "bs=32"])
    cloud = client(gce, opts)
    with pytest.raises(JobError) as caught:
        cloud.create(job, cloud.preflight([job]))  # the same name again
    assert str(caught.value) == (
        f"creating VM {job.id} in {ZONE}: 409 The resource "
        f"'projects/{PROJECT}/zones/{ZONE}/instances/{job.id}' already exists"
    )
    cloud.delete(cloud.list(job=job.id))


# ------------------------------------------------------------------------ sweeps, list, stop


def test_sweep_makes_four_vms_found_by_label_and_deleted(gce, env):
    gce.state.page_size = 3  # the four come in two pages
    try:
        opts = options()
        gce.clear()
        jobs = started(gce, opts, ["lr=1e-3,1e-4", "bs=32,64"])
        bodies = gce.inserts()
        assert len(bodies) == 4
        specs = [json.loads(metadata(b)["gpubake-job"]) for b in bodies]
        assert len({json.dumps(s, sort_keys=True) for s in specs}) == 4
        assert len({s["results"] for s in specs}) == 4
        assert {s["results"] for s in specs} == {j.results for j in jobs}
        assert [s["command"][3:] for s in specs] == [
            ["1e-3", "--bs", "32"],
            ["1e-3", "--bs", "64"],
            ["1e-4", "--bs", "32"],
            ["1e-4", "--bs", "64"],
        ]
        assert {b["labels"]["gpubake-sweep"] for b in bodies} == {jobs[0].sweep}

        cloud = client(gce, opts)
        gce.clear()
        found = cloud.list(sweep=jobs[0].sweep)
        assert [i.name for i in found] == sorted(j.id for j in jobs)
        assert len(gce.requests("GET", "/instances")) == 2  # both pages read
        row = found[0]
        assert (row.sweep, row.state, row.stopped) == (jobs[0].sweep, "RUNNING", False)
        assert (row.machine_type, row.gpu, row.hourly_price) == (
            "n1-standard-8",
            "nvidia-tesla-t4",
            None,
        )
        assert row.deadline == 1_800_000_000 + 6 * 3600
        assert [i.name for i in cloud.list(job=jobs[1].id)] == [jobs[1].id]
        assert cloud.list(sweep="itest-sweep-none") == []

        cloud.delete(found)
        assert len(gce.requests("DELETE")) == 4
        assert not set(gce.instance_names(PROJECT, ZONE)) & {j.id for j in jobs}
        assert cloud.list(sweep=jobs[0].sweep) == []
    finally:
        gce.state.page_size = 500


def test_stop_shuts_down_waits_until_terminated_then_deletes(gce, env):
    opts = options()
    [job] = started(gce, opts, ["lr=1e-3", "bs=32"])
    cloud = client(gce, opts)
    [vm] = cloud.list(job=job.id)
    gce.state.stop_lag = 2  # STOPPING for two more looks after the stop's operation is DONE
    gce.clear()
    try:
        cloud.stop(vm)
    finally:
        gce.state.stop_lag = 0
    calls = [(r.method, r.path.rsplit("/", 1)[-1]) for r in gce.requests()]
    stop_at = calls.index(("POST", "stop"))
    delete_at = calls.index(("DELETE", job.id))
    looks = [c for c in calls[stop_at:delete_at] if c == ("GET", job.id)]
    assert len(looks) == 3  # STOPPING, STOPPING, TERMINATED
    assert gce.instance(PROJECT, ZONE, job.id) is None
    cloud.stop(vm)  # gone already: nothing to do, no error


def test_failed_insert_operation_is_one_line_with_a_hint(gce, env):
    opts = options(dataset_disk=None)
    jobs = one_job(opts)
    cloud = client(gce, opts)
    image = cloud.preflight(jobs)
    gce.fail_next_insert(
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        f"The zone 'projects/{PROJECT}/zones/{ZONE}' does not have enough resources available "
        "to fulfill the request.  Try a different zone, or try again later.",
    )
    with pytest.raises(JobError) as caught:
        cloud.create(jobs[0], image)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"creating VM {jobs[0].id} in {ZONE}: ZONE_RESOURCE_POOL_EXHAUSTED: ")
    assert "try another zone" in text
    assert gce.instance(PROJECT, ZONE, jobs[0].id) is None


def test_endpoint_from_the_environment_is_anonymous(gce, env, monkeypatch):
    monkeypatch.setenv(ENDPOINT_ENV, gce.url)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
    gce.clear()
    assert gcp.Gcp(options()).list(sweep="itest-sweep-nothing") == []
    [request] = gce.requests("GET", "/instances")
    assert request.query["filter"] == (
        '(labels.gpubake-job:*) (labels.gpubake-sweep = "itest-sweep-nothing")'
    )


# ------------------------------------------------------------------------ preflight refusals


REFUSALS = {
    "family missing": (
        {"stack": "fastai"},
        f"no image in family gpubake-fastai in project {PROJECT}: build one with "
        "`gpubake build --target gcp-image --stack fastai",
    ),
    "image without the runner label": (
        {"image": "plain-debian"},
        "image plain-debian has no label gpubake-job-runner=true",
    ),
    "image unknown": ({"image": "no-such-image"}, "--image no-such-image: no such image"),
    "GPU not offered in the zone": (
        {"zone": OTHER_ZONE},
        f"GPU t4 (nvidia-tesla-t4) is not offered in zone {OTHER_ZONE} (or the zone is unknown): "
        "pick a zone that offers it",
    ),
    "machine type not in the zone": (
        {"machine_type": "n1-standard-96"},
        f"machine type n1-standard-96 is not offered in zone {ZONE}",
    ),
    "built-in GPU count differs": (
        {"gpu": "a100", "gpu_count": 2, "machine_type": "a2-highgpu-1g"},
        "machine type a2-highgpu-1g comes with 1 nvidia-tesla-a100, not 2",
    ),
    "dataset disk missing": (
        {"dataset_disk": "nope"},
        f"--dataset-disk nope: no such disk in zone {ZONE}",
    ),
    "dataset disk attached read-write": (
        {"dataset_disk": "busy"},
        "--dataset-disk busy is attached read-write to trainer: detach it",
    ),
    "results bucket missing": (
        {"results": "gs://no-such-bucket-here/runs"},
        "the results location gs://no-such-bucket-here/runs is not writable",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_preflight_refuses_with_one_line_and_creates_nothing(gce, env, case):
    changes, expected = REFUSALS[case]
    opts = options(**changes)
    jobs = one_job(opts)
    cloud = client(gce, opts)
    gce.clear()
    with pytest.raises(JobError) as caught:
        cloud.preflight(jobs)
    text = str(caught.value)
    assert "\n" not in text
    assert expected in text
    assert gce.requests("POST") == []  # no insert, nothing else written
    if case == "results bucket missing":  # the probe is the last check
        assert gce.requests("GET", "/disks/imagenet")


def test_read_only_users_of_the_dataset_disk_are_accepted(gce, env):
    opts = options(dataset_disk="shared")
    assert client(gce, opts).preflight(one_job(opts)).endswith("/gpubake-pytorch-new")
    assert gce.requests("GET", "/instances/reader")  # the user's attachment mode was read


def test_no_credentials_is_one_line_naming_the_login(env, monkeypatch, tmp_path):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    opts = options()
    with pytest.raises(JobError) as caught:
        gcp.Gcp(opts).preflight(one_job(opts))
    assert str(caught.value).startswith(
        "no GCP credentials: run `gcloud auth application-default login`"
    )


def test_unreachable_api_is_one_line(env):
    opts = options()
    cloud = gcp.Gcp(opts, api_endpoint="http://127.0.0.1:9", credentials=AnonymousCredentials())
    with pytest.raises(JobError) as caught:
        cloud.preflight(one_job(opts))
    text = str(caught.value)
    assert "\n" not in text
    assert "could not be reached" in text and "127.0.0.1:9" in text


def test_missing_project_or_zone_is_refused(env):
    with pytest.raises(JobError, match=r"^--project is required for --cloud gcp"):
        gcp.Gcp(options(project=None))
    with pytest.raises(JobError, match=r"^--zone is required for --cloud gcp"):
        gcp.Gcp(options(zone=None))
    with pytest.raises(JobError, match=r"is not a GCP zone"):
        gcp.Gcp(options(zone="central"))


def test_instance_rows_say_stopped_for_terminated(gce, env):
    name = f"itest-{uuid.uuid4().hex[:8]}"
    gce.add_instance(
        PROJECT,
        ZONE,
        name,
        labels={"gpubake-job": name, "gpubake-deadline": "12"},
        status="TERMINATED",
    )
    [row] = client(gce, options()).list(job=name)
    assert isinstance(row, Instance)
    assert (row.state, row.stopped, row.deadline, row.sweep) == ("TERMINATED", True, 12.0, None)
    client(gce, options()).delete([row])
    assert gce.instance(PROJECT, ZONE, name) is None


# ---------------------------------------------------------------------- the command line


def _gpubake(*args: str, tmp_path, gce: ComputeStandin) -> Any:
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "gpubake", "job", *args],
        capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"),
             ENDPOINT_ENV: gce.url},
    )  # fmt: skip


def test_run_dry_run_status_and_stop_from_the_command_line(gce, env, tmp_path):
    """`gpubake job run --dry-run --json` prints the body `job run` then sends; `job status`
    reads the VM, `job stop` stops and deletes it."""
    where = ("--cloud", "gcp", "--project", PROJECT, "--zone", ZONE)
    args = (
        "run", *where, "--results", f"gs://{BUCKET}/cli", "--dataset-disk", "imagenet",
        "--max-run-duration", "2h",
    )  # fmt: skip
    command = ("--", "python", "train.py")
    dry = _gpubake(*args, "--dry-run", "--json", *command, tmp_path=tmp_path, gce=gce)
    assert dry.returncode == 0, dry.stderr
    (planned,) = json.loads(dry.stdout)["jobs"]
    body = planned["request"]
    assert body["scheduling"]["provisioningModel"] == "SPOT"
    assert body["scheduling"]["maxRunDuration"]["seconds"] in (7200, "7200")
    items = {i["key"]: i["value"] for i in body["metadata"]["items"]}
    assert json.loads(items["gpubake-job"]) == planned["spec"]
    gce.clear()

    ran = _gpubake(*args, *command, tmp_path=tmp_path, gce=gce)
    assert ran.returncode == 0, ran.stderr
    job_id = ran.stdout.strip()
    (sent,) = gce.inserts()
    # what was sent is what the dry run showed, but for the job's own id and deadline
    assert sent["name"] == job_id
    assert sent["scheduling"] == body["scheduling"]
    assert [d.get("mode") for d in sent["disks"]] == [d.get("mode") for d in body["disks"]]

    status = _gpubake("status", job_id, "--json", tmp_path=tmp_path, gce=gce)
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)
    assert row["vm"] == "RUNNING" and row["cost"] == "unknown" and row["outcome"] == "running"

    # a job of a cloud that cannot be asked (here: a profile that does not exist) shows "?"
    # and why, and does not hide the others
    unreachable = launch.Record(
        id="job-elsewhere", cloud="aws", results="s3://other-bucket/r/job-elsewhere",
        instance="i-0123456789abcdef0", location="us-east-1", profile="nowhere",
        created="2026-12-03T10:00:00Z",
    )  # fmt: skip
    (tmp_path / "state" / "gpubake" / "jobs" / "job-elsewhere.json").write_text(
        json.dumps(dataclasses.asdict(unreachable))
    )
    both = _gpubake("status", "--json", tmp_path=tmp_path, gce=gce)
    assert both.returncode == 0, both.stderr
    by_job = {r["job"]: r for r in json.loads(both.stdout)}
    assert by_job[job_id]["vm"] == "RUNNING"
    assert by_job["job-elsewhere"]["vm"] == "?" and "nowhere" in by_job["job-elsewhere"]["error"]
    assert "could not read everything" in both.stderr and "Traceback" not in both.stderr

    stopped = _gpubake("stop", job_id, tmp_path=tmp_path, gce=gce)
    assert stopped.returncode == 0, stopped.stderr
    assert gce.requests("POST", f"/instances/{job_id}/stop")
    assert gce.requests("DELETE", f"/instances/{job_id}")
