"""gpubake.jobs.launch: sweep values, job ids, results prefixes and the runner's specs."""

from __future__ import annotations

import datetime
import json

import pytest

from gpubake.jobs import launch
from gpubake.jobs.launch import JobError, JobOptions

NOW = datetime.datetime(2026, 12, 3, 15, 0, 0, tzinfo=datetime.UTC)


def _options(**kw) -> JobOptions:
    base = {
        "cloud": "aws",
        "results": "s3://my-bucket/runs/",
        "command": ("python", "train.py", "--lr", "{lr}", "--batch-size", "{bs}"),
        "region": "us-east-1",
    }
    return JobOptions(**{**base, **kw})


def test_a_2x2_sweep_makes_4_jobs_with_distinct_specs_and_prefixes():
    params = launch.parse_params(["lr=1e-3,1e-4", "bs=32,64"])
    jobs = launch.make_jobs(_options(), params, now=NOW)
    assert len(jobs) == 4
    sweep = jobs[0].sweep
    assert sweep and sweep.startswith("job-sweep-20261203-150000-")
    assert [j.results for j in jobs] == [f"s3://my-bucket/runs/{sweep}/{i}" for i in range(4)]
    assert [j.id for j in jobs] == [f"{sweep}-{i}" for i in range(4)]
    assert [j.spec["command"][3::2] for j in jobs] == [
        ["1e-3", "32"],
        ["1e-3", "64"],
        ["1e-4", "32"],
        ["1e-4", "64"],
    ]
    assert [j.spec["params"] for j in jobs][1] == {"lr": "1e-3", "bs": "64"}
    assert len({j.spec_text() for j in jobs}) == 4
    # each spec is what the runner itself accepts, unchanged
    runner = launch.job_module()
    assert all(runner.parse_spec(j.spec_text()) == j.spec for j in jobs)


def test_one_job_writes_under_its_own_id():
    options = _options(command=("python", "train.py"), max_run_duration=6 * 3600)
    (job,) = launch.make_jobs(options, now=NOW)
    assert job.id.startswith("job-20261203-150000-") and job.sweep is None
    assert job.results == f"s3://my-bucket/runs/{job.id}"
    # the runner stops the job before the cloud deletes the VM
    assert job.spec["max_run_time"] == 6 * 3600 - 600
    assert launch.runner_deadline(600) == 540


def test_code_and_dataset_go_into_the_spec(tmp_path):
    gcp = _options(
        cloud="gcp",
        results="gs://my-bucket/runs",
        command=("python", "x.py"),
        code_dir=str(tmp_path),
        dataset_disk="imagenet",
    )
    (job,) = launch.make_jobs(gcp)
    assert job.spec["code"] == {"url": f"{job.results}/code.tar.gz"}
    assert job.spec["dataset"]["device"] == launch.GCP_DATASET_DEVICE
    assert job.spec["dataset"]["read_only"] is True
    git = _options(command=("python", "x.py"), git="https://example.com/me/train.git@3f2a9c1")
    assert launch.make_jobs(git)[0].spec["code"] == {
        "url": "https://example.com/me/train.git",
        "commit": "3f2a9c1",
    }


@pytest.mark.parametrize(
    ("params", "command", "message"),
    [
        (["lr"], ("x",), "is not NAME=V1,V2"),
        (["LR=1"], ("x",), "is not NAME=V1,V2"),
        (["lr=1,,2"], ("x",), "empty or repeated"),
        (["lr=1,1"], ("x",), "empty or repeated"),
        (["lr=1", "lr=2"], ("x",), "given twice"),
        (["lr=1"], ("train", "--bs", "{bs}"), "uses {bs} but no --param bs"),
    ],
)
def test_bad_sweeps_are_refused_in_one_line(params, command, message):
    with pytest.raises(JobError, match=message.replace("{", r"\{").replace("}", r"\}")) as exc:
        launch.make_jobs(_options(command=command), launch.parse_params(params))
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"cloud": "azure"}, "use gcp or aws"),
        ({"command": ()}, "no command"),
        ({"gpu": "z80"}, "--gpu 'z80' is unknown"),
        ({"results": "ftp://x/y"}, "is not a bucket URL"),
        ({"git": "https://example.com/x.git"}, "is not URL@COMMIT"),
        ({"git": "https://example.com/x.git@main"}, "is not URL@COMMIT"),
        ({"name": "Bad_Name"}, "--name 'Bad_Name'"),
        ({"env": (("GPUBAKE_X", "1"),)}, "reserved"),
        ({"code_dir": "/nonexistent-dir"}, "no such directory"),
    ],
)
def test_bad_options_are_refused_in_one_line(kw, message):
    with pytest.raises(JobError, match=message):
        launch.make_jobs(_options(**{"command": ("python", "x.py"), **kw}))


def test_durations():
    assert launch.parse_duration("90m", "--x") == 5400
    assert launch.parse_duration("2h", "--x") == 7200
    with pytest.raises(JobError, match="--max-run-duration '0'"):
        launch.parse_duration("0", "--max-run-duration")


def test_packed_code_leaves_out_vcs_and_caches(tmp_path):
    import tarfile

    (tmp_path / "train.py").write_text("print(1)\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref\n")
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "__pycache__" / "m.pyc").write_bytes(b"x")
    (tmp_path / "pkg" / "m.py").write_text("x = 1\n")
    tarball = launch.pack_code(tmp_path)
    try:
        with tarfile.open(tarball) as tar:
            names = sorted(tar.getnames())
            owners = {(m.uid, m.gid) for m in tar.getmembers()}
    finally:
        tarball.unlink()
    assert names == ["pkg", "pkg/m.py", "train.py"]
    assert owners == {(0, 0)}


def test_records_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    record = launch.Record(
        id="job-1", cloud="aws", results="s3://my-bucket/r/job-1", instance="i-1",
        location="us-east-1", sweep="s1", params={"lr": "1"},
    )  # fmt: skip
    record.save()
    assert launch.find_record("job-1") == record
    assert launch.records(sweep="s1") == [record] and launch.records(sweep="s2") == []
    with pytest.raises(JobError, match="no job 'job-2' was launched from this machine"):
        launch.find_record("job-2")
    assert (
        json.loads((tmp_path / "gpubake" / "jobs" / "job-1.json").read_text())["instance"] == "i-1"
    )


def test_packed_code_refuses_links_out_of_the_folder(tmp_path):
    (tmp_path / "train.py").write_text("print(1)\n")
    (tmp_path / "inside").symlink_to("train.py")
    tarball = launch.pack_code(tmp_path)  # a link within the folder is fine
    tarball.unlink()
    (tmp_path / "data").symlink_to("/etc")
    with pytest.raises(JobError, match=r"data links outside the folder \(/etc\)"):
        launch.pack_code(tmp_path)


def _instance(job: str, state: str, *, stopped: bool, deadline: float | None = None):
    from gpubake.jobs.cloud import Instance

    return Instance(job, job, "s", state, "m", "g", 0.0, deadline, stopped=stopped)


def test_gc_takes_stopped_and_overdue_vms_but_not_those_still_stopping():
    from gpubake.jobs.commands import gc_candidates

    vms = [
        _instance("running", "RUNNING", stopped=False, deadline=2000.0),
        _instance("overdue", "running", stopped=False, deadline=500.0),
        _instance("done", "TERMINATED", stopped=True),
        _instance("syncing", "STOPPING", stopped=True),
        _instance("ec2-going", "shutting-down", stopped=True, deadline=500.0),
        _instance("ec2-stopped", "stopped", stopped=True),
    ]
    assert [i.job for i in gc_candidates(vms, now=1000.0)] == ["overdue", "done", "ec2-stopped"]


class _Sweep:
    """The listing a cloud gives, one answer per call (gpubake.jobs.commands' view of it)."""

    def __init__(self, *answers):
        self.answers = list(answers)

    def list(self, *, sweep=None, job=None):
        return self.answers.pop(0)


def test_max_parallel_counts_a_vm_the_listing_does_not_show_yet(monkeypatch):
    from gpubake.jobs import commands

    naps = []
    monkeypatch.setattr(commands.time, "sleep", naps.append)
    now = commands.time.monotonic()
    # the VM started a moment ago is not listed yet: it counts; once listed stopped, a slot
    client = _Sweep([], [_instance("a", "TERMINATED", stopped=True)])
    commands._wait_for_slot(client, "s", 1, {"a": now}, lambda _m: None)
    assert naps == [30] and client.answers == []
    # a VM started long ago that is not listed any more (EC2 lists no terminated ones): gone
    naps.clear()
    commands._wait_for_slot(_Sweep([]), "s", 1, {"a": now - 3600}, lambda _m: None)
    assert naps == []
