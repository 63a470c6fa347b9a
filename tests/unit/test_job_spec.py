"""gpubake-job's spec checks and its metadata clients (against the loopback stand-ins)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.metadata_standins import metadata_standin
from tests.modules import load_file

RUNNER = Path(__file__).resolve().parents[2] / "roles" / "job_runner" / "files" / "gpubake_job.py"


job = load_file(RUNNER, "gpubake_job")
GOOD = {"gpubake_job": 1, "command": ["python", "train.py"], "results": "gs://bucket/runs/a"}


def parse(**changes):
    data = {**GOOD, **changes}
    return job.parse_spec(json.dumps({k: v for k, v in data.items() if v is not None}))


def test_defaults_are_filled_in():
    spec = parse()
    assert spec["preempt_signal"] == "SIGINT"
    assert spec["sync_interval"] == 300
    assert spec["on_end"] == "poweroff"
    assert spec["max_run_time"] is None
    assert spec["id"].startswith("job-")
    assert spec["results"] == "gs://bucket/runs/a"


def test_durations_and_shapes():
    spec = parse(
        sync_interval="5m",
        max_run_time="2h",
        grace_period=10,
        command="python train.py --epochs 3",
        code={"url": "https://example.org/repo.git", "commit": "0123abcd"},
        dataset={"device": "imagenet"},
        preempt_signal="SIGTERM",
        results="s3://my-bucket/x/",
    )
    assert (spec["sync_interval"], spec["max_run_time"], spec["grace_period"]) == (300, 7200, 10)
    assert spec["command"] == "python train.py --epochs 3"
    assert spec["dataset"] == {
        "device": "imagenet",
        "mount": "/mnt/dataset",
        "read_only": True,
        "format": False,
    }
    assert spec["results"] == "s3://my-bucket/x"
    assert spec["preempt_signal"] == "SIGTERM"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"command": None}, "command is missing or empty"),
        ({"command": []}, "command is missing or empty"),
        ({"results": None}, "results is missing"),
        ({"results": "http://bucket/x"}, "is not a bucket URL"),
        ({"results": "gs://"}, "is not a bucket URL"),
        ({"epochs": 3}, "unknown field 'epochs'"),
        ({"gpubake_job": 2}, "gpubake_job must be 1"),
        ({"sync_interval": 5}, "shorter than 10 s"),
        ({"sync_interval": "soon"}, "is not a duration"),
        ({"preempt_signal": "SIGKILL"}, "is not SIGINT or SIGTERM"),
        ({"code": {"url": "https://x.org/r.git"}}, "code.commit is missing"),
        ({"code": {"url": "ftp://x"}}, "neither a bucket URL"),
        ({"dataset": {"device": "d", "size": 3}}, "unknown field dataset.size"),
        ({"dataset": {"device": "d", "format": True}}, "dataset.format needs read_only false"),
        ({"dataset": {"device": "d", "read_only": False, "format": "yes"}}, "must be true or"),
        ({"env": {"GPUBAKE_CKPT_DIR": "/x"}}, "is reserved"),
        ({"user": "root"}, "name a non-root user"),
        ({"id": "Bad_ID"}, "is not a job id"),
        ({"on_end": "reboot"}, "is not poweroff or stay"),
        ({"checkpoint_dir": "/"}, "is a system directory"),
        ({"checkpoint_dir": "/opt/gpubake"}, "is a system directory"),
        ({"checkpoint_dir": "/mnt/../etc"}, "is a system directory"),
        ({"checkpoint_dir": "ckpt"}, "is not an absolute path"),
        ({"params": {"LR": "1"}}, "params must map names"),
        ({"params": {"lr": 1}}, "params must map names"),
        ({"params": ["lr"]}, "params must map names"),
    ],
)
def test_bad_specs_are_one_line(changes, message):
    with pytest.raises(job.SpecError) as err:
        parse(**changes)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_sweep_params_are_kept():
    assert parse()["params"] == {}
    assert parse(params={"lr": "1e-3", "batch_size": "32"})["params"] == {
        "lr": "1e-3",
        "batch_size": "32",
    }


def test_not_json_and_not_an_object():
    for text, message in (("{", "is not JSON"), ("[1]", "not a JSON object")):
        with pytest.raises(job.SpecError, match=message):
            job.parse_spec(text)


def test_cloud_detection_follows_the_overrides(monkeypatch):
    for key in ("GPUBAKE_CLOUD", "GCE_METADATA_HOST", "AWS_EC2_METADATA_SERVICE_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    assert job.detect_cloud() == "gce"
    monkeypatch.setenv("GPUBAKE_CLOUD", "none")
    assert job.detect_cloud() == "none"


def test_gce_spec_and_long_poll(monkeypatch):
    with metadata_standin() as md:
        monkeypatch.setenv("GCE_METADATA_HOST", md.host_port)
        assert job.find_spec("gce") is None  # no attribute: no job
        md.set_gce("instance/attributes/gpubake-job", json.dumps(GOOD))
        assert json.loads(job.find_spec("gce")) == GOOD
        notice, stop = job.Notice(), threading.Event()
        watcher = threading.Thread(
            target=job.watch_gce,
            args=("instance/preempted", ("TRUE",), notice, stop, lambda _l: None),
        )
        watcher.start()
        time.sleep(1.0)
        assert not notice.event.is_set()
        given = md.preempt()
        assert notice.event.wait(5)
        assert notice.seen_at - given < 1.0  # the long-poll answered the change at once
        assert notice.window == job.WINDOWS["gce"]
        watcher.join(5)
        # it long-polled with the ETag it was given, never a busy loop
        polls = [r for r in md.state.gce_requests if "instance/preempted" in r]
        assert any("wait_for_change=true" in r and "last_etag=" in r for r in polls)
        assert len(polls) <= 3


def test_gce_refuses_requests_without_the_header():
    with metadata_standin() as md:
        status, _body, _ = job._http(
            "GET", f"{md.url}/computeMetadata/v1/instance/preempted", {}, 5
        )
        assert status == 403


def test_ec2_user_data_and_spot_notice(monkeypatch):
    monkeypatch.setenv("GPUBAKE_EC2_POLL_SECONDS", "0.2")
    with metadata_standin() as md:
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", md.url)
        assert job.find_spec("ec2") is None
        md.set_ec2("user-data", "#!/bin/bash\necho cloud-init script\n")
        assert job.find_spec("ec2") is None  # a cloud-init script is not a job
        md.set_ec2("user-data", json.dumps(GOOD))
        assert json.loads(job.find_spec("ec2")) == GOOD
        notice, stop = job.Notice(), threading.Event()
        rebalanced = threading.Event()
        watcher = threading.Thread(
            target=job.watch_ec2, args=(notice, stop, lambda _l: None, rebalanced.set)
        )
        watcher.start()
        md.set_ec2("meta-data/events/recommendations/rebalance", '{"noticeTime": "x"}')
        assert rebalanced.wait(5)
        assert not notice.event.is_set()  # a rebalance hint is not an interruption
        md.spot_notice(seconds=90)
        assert notice.event.wait(5)
        assert 80 <= notice.window <= 90  # the notice's own time, not the default 120 s
        watcher.join(5)


def test_gce_host_maintenance_counts_as_a_notice(monkeypatch):
    with metadata_standin() as md:
        monkeypatch.setenv("GCE_METADATA_HOST", md.host_port)
        notice, stop = job.Notice(), threading.Event()
        bad = ("TERMINATE_ON_HOST_MAINTENANCE",)
        watcher = threading.Thread(
            target=job.watch_gce,
            args=("instance/maintenance-event", bad, notice, stop, lambda _l: None),
        )
        watcher.start()
        md.set_gce("instance/maintenance-event", "MIGRATE_ON_HOST_MAINTENANCE")
        time.sleep(0.5)
        assert not notice.event.is_set()  # a live migration is no reason to stop
        md.set_gce("instance/maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE")
        assert notice.event.wait(5)
        assert "TERMINATE_ON_HOST_MAINTENANCE" in notice.reason
        watcher.join(5)


def test_an_ec2_dataset_volume_is_found_as_the_one_nvme_disk_beside_the_root(tmp_path):
    dev, by_id = tmp_path / "dev", tmp_path / "by-id"
    dev.mkdir()
    by_id.mkdir()
    for name in ("nvme0n1", "nvme0n1p1", "nvme1n1"):
        (dev / name).write_text("")
    (by_id / "nvme-Amazon_Elastic_Block_Store_vol0root").symlink_to(dev / "nvme0n1")
    (by_id / "nvme-Amazon_Elastic_Block_Store_vol0root-part1").symlink_to(dev / "nvme0n1p1")
    (by_id / "nvme-Amazon_Elastic_Block_Store_vol0data").symlink_to(dev / "nvme1n1")
    root = str(dev / "nvme0n1p1")
    assert job.ec2_nvme_volume("/dev/sdf", by_id, root) == str(dev / "nvme1n1")
    # two candidates: no guess
    (dev / "nvme2n1").write_text("")
    (by_id / "nvme-Amazon_Elastic_Block_Store_vol0more").symlink_to(dev / "nvme2n1")
    assert job.ec2_nvme_volume("/dev/sdf", by_id, root) is None


@pytest.mark.parametrize("name", ["findmnt", "blkid", "mount", "umount", "systemctl"])
def test_a_hung_system_tool_is_given_up_on(tmp_path, monkeypatch, name):
    """Every tool on the runner's way to power-off is bounded (test_jobs.py hangs them on the
    machine); findmnt, for one, through ec2_nvme_volume's own lookup of the root disk."""
    stub = tmp_path / name
    stub.write_text("#!/bin/sh\nexec sleep 600\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setenv("GPUBAKE_TOOL_TIMEOUT", "0.5")
    started = time.monotonic()
    proc = job.tool([name, "--version"])
    assert time.monotonic() - started < 5
    assert (proc.returncode, proc.stderr) == (124, f"{name} hung: gave up after 0.5 s")
    if name == "findmnt":
        by_id = tmp_path / "by-id"
        by_id.mkdir()
        assert job.ec2_nvme_volume("/dev/sdf", by_id) is None  # and it returned


def test_a_missing_system_tool_is_said(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    proc = job.tool(["blkid", "-o", "value"])
    assert proc.returncode == 127 and proc.stderr.startswith("blkid: ")
