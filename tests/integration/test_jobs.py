"""Training jobs for real, with no cloud: gpubake-job in a systemd container made from a gpubake
image (the default stack built with --var job_runner=true, plus systemd), the job spec and the
preemption notices from loopback stand-ins of the GCE metadata server and EC2's IMDSv2
(tests/metadata_standins.py), results synced to real GCS- and S3-protocol servers
(gcp-storage-emulator, moto) on the Docker bridge, and the power-off replaced by a command
that records when it was called (the test machine is never powered off).

The training script is real PyTorch on the CPU: one optimiser step and a `torch.save`
checkpoint a second, resumable, stopping cleanly on SIGINT; with BIG_MIB it also writes a
checkpoint folder step-1/ of that size at its first step, with FINAL_MIB one (step-final/) as
it stops (sparse files with random heads and tails: large to send, fast to write).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    HOST_BUNDLE,
    ROOT,
    bridge_address,
    remove_other_tags,
    run_in,
)
from tests.integration.systemd_helpers import systemd_container
from tests.metadata_standins import metadata_standin
from tests.object_stores import Digest, gcs_server, s3_server

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SYNC = ROOT / "roles" / "job_runner" / "files" / "gpubake_sync.py"
JOB_TAG = "itest-job"
SYSTEMD_REPOSITORY = "gpubake/test-job-systemd"
POWEROFF_LOG = "/run/gpubake-test-poweroff"
DATASET = "/srv/dataset-disk"
WAIT_INACTIVE = (
    "for _ in $(seq 300); do systemctl show -p ActiveState --value gpubake-job | "
    "grep -qxE 'active|activating|deactivating' || break; sleep 0.2; done"
)

TRAIN = r"""
import json, os, signal, sys, time
from pathlib import Path


def big_checkpoint(name, mib):
    # a checkpoint folder of mib MiB, made whole under a temporary name, then renamed
    tmp = ckpt.parent / f".{name}.tmp"
    tmp.mkdir(exist_ok=True)
    with (tmp / "weights.bin").open("wb") as f:
        f.write(os.urandom(1 << 20))
        f.truncate(mib << 20)
        f.seek((mib << 20) - (1 << 20))
        f.write(os.urandom(1 << 20))
    os.replace(tmp, ckpt.parent / name)

import torch

ckpt = Path(os.environ["GPUBAKE_CKPT_DIR"]) / "model.pt"
results = Path(os.environ["GPUBAKE_RESULTS_DIR"])
steps = int(os.environ.get("STEPS", "3"))
stop = {"at": None}
signal.signal(signal.SIGINT, lambda *_: stop.update(at=time.time()))

facts = {"python": sys.executable, "path": os.environ["PATH"], "uid": os.getuid(),
         "pgid_is_own": os.getpgid(0) == os.getpid(), "torch": torch.__version__}
data = os.environ.get("GPUBAKE_DATASET_DIR")
if data:
    facts["dataset"] = (Path(data) / "train.csv").read_text()
    try:
        (Path(data) / "written-by-job").write_text("x")
        facts["dataset_write"] = "allowed"
    except OSError as exc:
        facts["dataset_write"] = exc.strerror
(results / "facts.json").write_text(json.dumps(facts))

torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
step = 0
if ckpt.exists():
    state = torch.load(ckpt)
    model.load_state_dict(state["model"])
    step = state["step"]
    print(f"resumed at step {step}", flush=True)
x, y = torch.randn(64, 4), torch.randn(64, 1)
while step < steps:
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    torch.save({"model": model.state_dict(), "step": step}, ckpt.with_suffix(".tmp"))
    os.replace(ckpt.with_suffix(".tmp"), ckpt)  # a sync never sees half a checkpoint
    (results / "last_step").write_text(str(step))
    if step == 1 and os.environ.get("BIG_MIB"):
        big_checkpoint("step-1", int(os.environ["BIG_MIB"]))
    print(f"step {step} loss {loss.item():.4f}", flush=True)
    if stop["at"] is not None:
        if os.environ.get("FINAL_MIB"):
            big_checkpoint("step-final", int(os.environ["FINAL_MIB"]))
        (results / "sigint_at").write_text(repr(stop["at"]))
        print(f"SIGINT: stopping after step {step}", flush=True)
        # at once: tearing down an interpreter with torch loaded can take longer, on a busy
        # machine, than the 2 s a 10 s EC2 notice leaves the job
        os._exit(130)
    for _ in range(10):  # a second between steps, cut short by SIGINT (a 10 s notice gives
        if stop["at"] is not None:  # the job 2 s to stop: it must not sleep them away)
            break
        time.sleep(0.1)
(results / "metrics.json").write_text(json.dumps({"steps": step, "loss": loss.item()}))
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
"""


@pytest.fixture(scope="module")
def job_image(engine) -> str:
    """gpubake/pytorch:itest-job (the runner on request) with systemd added on top."""
    proc = subprocess.run(
        [sys.executable, "-m", "gpubake", "build", "--target", "docker", "--tag", JOB_TAG,
         "--var", "job_runner=true", "--ca-bundle", str(HOST_BUNDLE)],
        capture_output=True, text=True, timeout=3600, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    image = engine.images.get(f"gpubake/pytorch:{JOB_TAG}")
    tag = image.id.split(":", 1)[1][:12]
    ref = f"{SYSTEMD_REPOSITORY}:{tag}"
    if engine.images.list(ref):
        return ref
    remove_other_tags(engine, SYSTEMD_REPOSITORY, ref)
    install = (
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
        "--no-install-recommends systemd systemd-sysv dbus && apt-get clean && "
        "rm -rf /var/lib/apt/lists/*"
    )
    box = engine.containers.run(
        image.id, ["sh", "-c", install], user="root", detach=True, entrypoint=[],
        name=f"gpubake-jobsd-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    try:
        status = box.wait(timeout=900)
        assert status["StatusCode"] == 0, box.logs().decode()[-3000:]
        box.commit(SYSTEMD_REPOSITORY, tag, changes=["USER root", 'CMD ["/sbin/init"]'])
    finally:
        box.remove(force=True)
    return ref


@pytest.fixture(scope="module")
def stores(engine) -> Iterator[dict[str, Any]]:
    gateway = bridge_address(engine)  # what the job's container reaches the host by
    with (
        s3_server(host=gateway) as s3,
        gcs_server(host=gateway) as gcs,
        metadata_standin(host=gateway) as md,
    ):
        yield {"s3": s3, "gs": gcs, "md": md}


@pytest.fixture(scope="module")
def machine(engine, job_image, stores, tmp_path_factory) -> Iterator[Any]:
    """The booted "instance": its dataset disk is a host directory bind-mounted where an
    attached disk's device would be; the runner mounts it read-only itself."""
    disk = tmp_path_factory.mktemp("dataset-disk")
    (disk / "train.csv").write_text("x,y\n1,2\n")
    disk.chmod(0o755)  # readable by the job's user, as a dataset disk's files are
    (disk / "train.csv").chmod(0o644)
    md, s3, gcs = stores["md"], stores["s3"], stores["gs"]
    environment = {
        **s3.env,
        **gcs.env,
        "GCE_METADATA_HOST": md.host_port,
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": md.url,
        "GPUBAKE_POWEROFF_COMMAND": "/usr/local/bin/test-poweroff",
        "GPUBAKE_EC2_POLL_SECONDS": "1",
    }
    with systemd_container(
        engine,
        job_image,
        volumes={str(disk): {"bind": DATASET, "mode": "rw"}},
        cap_add=["SYS_ADMIN"],  # mount(8) for the dataset disk, as on a VM
        security_opt=["apparmor=unconfined", "seccomp=unconfined"],
    ) as box:
        # at boot, with no cloud and no spec, the unit ran and did nothing
        _, said = run_in(box, "journalctl", "-u", "gpubake-job", "--no-pager", "-o", "cat")
        assert "no job spec on this instance" in said, said
        _write(box, "/usr/local/bin/test-poweroff", f"#!/bin/sh\ndate +%s.%N >> {POWEROFF_LOG}\n")
        dropin = "".join(f'Environment="{k}={v}"\n' for k, v in environment.items())
        _write(box, "/etc/systemd/system/gpubake-job.service.d/test.conf", f"[Service]\n{dropin}")
        _exec(box, "systemctl daemon-reload")
        yield box


def _write(box: Any, path: str, text: str) -> None:
    data = text.encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(Path(path).name)
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    _exec(box, f"mkdir -p {Path(path).parent}")
    assert box.put_archive(str(Path(path).parent), buf.getvalue())


def _exec(box: Any, script: str) -> str:
    code, out = run_in(box, "bash", "-c", script)
    assert code == 0, out
    return out


def _put_code(store: Any, bucket: str, tmp_path: Path) -> str:
    """The training code as a tarball in the bucket; returns its URL."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = TRAIN.encode()
        info = tarfile.TarInfo("train.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    folder = tmp_path / f"code-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "train.tar.gz").write_bytes(buf.getvalue())
    scheme = "s3" if "AWS_ENDPOINT_URL" in store.env else "gs"
    _sync(store, "upload", str(folder), f"{scheme}://{bucket}/code")
    return f"{scheme}://{bucket}/code/train.tar.gz"


def _sync(store: Any, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(SYNC), *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **store.env}, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc


class Objects(dict):
    """{relative path: bytes, or the Digest of a large object} of the objects under a URL;
    [] reads one as text."""

    def __getitem__(self, key: str) -> str:
        value = super().__getitem__(key)
        return value if isinstance(value, Digest) else value.decode("utf-8", "replace")

    def sha256(self, key: str) -> str:
        value = super().__getitem__(key)
        return value if isinstance(value, Digest) else hashlib.sha256(value).hexdigest()


def _fetch(store: Any, url: str) -> Objects:
    """Every object under url, read with the store's own client (test_job_sync.py tests
    the images' client's downloads)."""
    bucket, _, prefix = url.split("://", 1)[1].partition("/")
    prefix = prefix.rstrip("/") + "/"
    return Objects({key[len(prefix) :]: v for key, v in store.read(bucket, prefix).items()})


class Job:
    """One job on the machine: its spec, its bucket, what came out."""

    def __init__(self, box, stores, tmp_path, scheme: str, **spec: Any) -> None:
        self.box, self.md, self.store = box, stores["md"], stores[scheme]
        self.bucket = f"jobs-{uuid.uuid4().hex[:10]}"
        self.store.make_bucket(self.bucket)
        self.id = f"t-{uuid.uuid4().hex[:8]}"
        self.results = f"{scheme}://{self.bucket}/runs/{self.id}"
        self.tmp = tmp_path
        self.spec = {
            "gpubake_job": 1,
            "id": self.id,
            "command": ["python", "train.py"],
            "code": {"url": _put_code(self.store, self.bucket, tmp_path)},
            "results": self.results,
            "sync_interval": 10,
            **spec,
        }
        # the last job's unit (its backstop included) is done before this one starts
        _exec(
            box,
            f"{WAIT_INACTIVE}; rm -f {POWEROFF_LOG}; systemctl reset-failed gpubake-job || true",
        )
        self.md.set_gce("instance/preempted", "FALSE")
        self.md.set_ec2("meta-data/spot/instance-action", None)

    def start(self, cloud: str) -> None:
        # where the journal stands before this job: its lines are the ones after
        shown = _exec(self.box, "journalctl --show-cursor -n 0 -q --no-pager")
        self.cursor = shown.strip().rsplit("cursor: ", 1)[-1]
        if cloud == "gce":
            self.md.set_gce("instance/attributes/gpubake-job", json.dumps(self.spec))
            self.md.set_ec2("user-data", None)
        else:
            self.md.set_ec2("user-data", json.dumps(self.spec))
            self.md.set_gce("instance/attributes/gpubake-job", None)
        _write(
            self.box,
            "/etc/systemd/system/gpubake-job.service.d/cloud.conf",
            f'[Service]\nEnvironment="GPUBAKE_CLOUD={cloud}"\n',
        )
        _exec(self.box, "systemctl daemon-reload && systemctl start --no-block gpubake-job")

    def local(self, name: str) -> str:
        return f"/var/lib/gpubake-job/{self.id}/{name}"

    def wait_step(self, step: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, out = run_in(self.box, "cat", self.local("results/last_step"))
            if code == 0 and out.strip().isdigit() and int(out) >= step:
                return
            time.sleep(0.3)
        pytest.fail(f"the job did not reach step {step}: {self.journal()[-3000:]}")

    def wait_poweroff(self, timeout: float = 120) -> float:
        """When the power-off command ran (epoch seconds); fails if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, out = run_in(self.box, "cat", POWEROFF_LOG)
            if code == 0 and out.strip():
                return float(out.split()[0])
            time.sleep(0.3)
        pytest.fail(f"the machine was not powered off: {self.journal()[-3000:]}")

    def journal(self) -> str:
        """The unit's journal since this job started (the container runs one job a test)."""
        return run_in(
            self.box, "journalctl", "-u", "gpubake-job", f"--after-cursor={self.cursor}",
            "--no-pager", "-o", "cat",
        )[1]  # fmt: skip

    def outputs(self) -> Objects:
        return _fetch(self.store, self.results)


def test_normal_end_syncs_results_and_powers_off(machine, stores, tmp_path):
    job = Job(
        machine, stores, tmp_path, "gs",
        env={"STEPS": "3"}, dataset={"device": DATASET, "mount": "/mnt/dataset"},
    )  # fmt: skip
    job.start("gce")
    job.wait_poweroff()
    out = job.outputs()
    assert json.loads(out["_SUCCESS"])["exit_code"] == 0
    assert json.loads(out["results/metrics.json"])["steps"] == 3
    assert "checkpoints/model.pt" in out
    assert "step 3 loss" in out["logs/job.log"]
    facts = json.loads(out["results/facts.json"])
    # the environment's Python, with CUDA's profile.d on PATH, as the non-root user, own group
    assert facts["python"].startswith("/opt/gpubake/env/bin/python"), facts
    assert facts["path"].split(":")[0] == "/opt/gpubake/env/bin"
    assert facts["uid"] == 1000 and facts["pgid_is_own"]
    # the dataset disk was there, read-only
    assert facts["dataset"] == "x,y\n1,2\n"
    assert facts["dataset_write"] == "Read-only file system"
    # the job's lines are in journald, tagged with the job id
    _, tagged = run_in(machine, "journalctl", f"GPUBAKE_JOB_ID={job.id}", "-o", "cat")
    assert "step 3 loss" in tagged


def _synced_step_1(job: Job, timeout: float = 90) -> None:
    """The checkpoint watcher sent step-1/ (1 GiB) as soon as it settled (an object exists
    only once all of it arrived)."""
    bucket, _, prefix = job.results.split("://", 1)[1].partition("/")
    deadline = time.monotonic() + timeout
    while not job.store.keys(bucket, f"{prefix}/checkpoints/step-1/"):
        if time.monotonic() > deadline:
            pytest.fail(f"step-1 was not synced: {job.journal()[-3000:]}")
        time.sleep(0.5)


def _same_as_local(job: Job, out: Objects, rel: str) -> None:
    _, local = run_in(job.box, "sha256sum", job.local(f"checkpoints/{rel}"))
    synced = out.sha256(f"checkpoints/{rel}")
    assert local.split()[0] == synced, rel


def _preempted(job: Job, notify, window: float = 30.0, *, all_synced: bool = True) -> Any:
    """The notice, then: SIGINT at once, power-off inside the window, _PREEMPTED, and the
    checkpoints in the results location byte for byte the job's (the 1 GiB one, and the last
    one it wrote when it stopped). `all_synced`: the window was long enough for the results
    and logs too (a too-short one sends the checkpoints first)."""
    big = "BIG_MIB" in job.spec.get("env", {})
    job.wait_step(3)
    if big:
        _synced_step_1(job)  # the final sync has only what changed since left
    notified = time.time()
    notify()
    powered_off = job.wait_poweroff(timeout=60)
    out = job.outputs()
    assert powered_off - notified < window, f"powered off {powered_off - notified:.1f} s after"
    marker = json.loads(out["_PREEMPTED"])
    assert marker["exit_code"] == 130 and "_SUCCESS" not in out
    if big:
        _same_as_local(job, out, "step-1/weights.bin")
    _same_as_local(job, out, "model.pt")
    code, _ = run_in(job.box, "test", "-e", job.local("PREEMPTED"))
    assert code == 0  # $GPUBAKE_PREEMPT_FILE was touched
    _, sigint = run_in(job.box, "cat", job.local("results/sigint_at"))
    assert float(sigint) - notified < 2.0, f"SIGINT came {float(sigint) - notified:.1f} s after"
    if all_synced:
        assert out["results/sigint_at"] == sigint
        last = int(out["results/last_step"])
        assert last >= 3
        assert f"SIGINT: stopping after step {last}" in out["logs/job.log"]
    return out, marker


def test_gce_preemption_signals_the_job_and_keeps_its_checkpoint(machine, stores, tmp_path):
    job = Job(machine, stores, tmp_path, "gs", env={"STEPS": "1000", "BIG_MIB": "1024"})
    job.start("gce")
    _, marker = _preempted(job, stores["md"].preempt)
    assert "instance/preempted = TRUE" in job.journal()
    assert (marker["checkpoint"], marker["newest_checkpoint_synced"]) == ("model.pt", True)


def test_ec2_spot_notice_signals_the_job_and_keeps_its_checkpoint(machine, stores, tmp_path):
    job = Job(machine, stores, tmp_path, "s3", env={"STEPS": "1000", "BIG_MIB": "1024"})
    job.start("ec2")
    _, marker = _preempted(job, stores["md"].spot_notice)
    assert "EC2 spot/instance-action" in job.journal()
    assert (marker["checkpoint"], marker["newest_checkpoint_synced"]) == ("model.pt", True)


def test_a_window_too_short_for_the_newest_checkpoint_keeps_the_previous(machine, stores, tmp_path):
    """A 10 s EC2 notice and a 2 GiB checkpoint written as the job stops: it cannot go up in
    time; the power-off still comes inside the window, no part of it replaced anything, and
    _PREEMPTED names the previous checkpoint, complete and byte-identical in the bucket."""
    job = Job(
        machine, stores, tmp_path, "s3",
        env={"STEPS": "1000", "BIG_MIB": "1024", "FINAL_MIB": "2048"},
    )  # fmt: skip
    job.start("ec2")
    notice = lambda: stores["md"].spot_notice(seconds=10)  # noqa: E731
    # step-final could not go up in time at the rate step-1 went: it is not started, and the
    # window's time goes to the results and logs instead
    out, marker = _preempted(job, notice, window=10.0)
    assert "file(s) of checkpoints left: no time to send them" in job.journal()
    assert marker["checkpoint"] == "model.pt"  # written before step-final, and synced
    assert marker["newest_checkpoint_synced"] is False
    assert marker["checkpoints_left"] == ["step-final"]
    assert not any(rel.startswith("checkpoints/step-final") for rel in out)


def test_system_shutdown_is_a_notice_too(machine, stores, tmp_path):
    """A Spot VM's soft-off: systemd stops the unit (SIGTERM to the runner) as the notice
    comes; the job still gets SIGINT, its checkpoint is synced, _PREEMPTED is written."""
    job = Job(machine, stores, tmp_path, "gs", env={"STEPS": "1000"})
    job.start("gce")
    _preempted(job, lambda: _exec(machine, "systemctl stop --no-block gpubake-job"))
    assert "SIGTERM: the system is shutting down" in job.journal()
    assert "powering off (backstop)" not in job.journal()


def test_failing_command_writes_failed_and_powers_off(machine, stores, tmp_path):
    job = Job(machine, stores, tmp_path, "s3", env={"STEPS": "1", "EXIT_CODE": "3"})
    job.start("gce")
    job.wait_poweroff()
    out = job.outputs()
    assert json.loads(out["_FAILED"])["exit_code"] == 3
    assert "step 1 loss" in out["logs/job.log"]
    assert "_SUCCESS" not in out


def test_killed_runner_still_powers_off(machine, stores, tmp_path):
    job = Job(machine, stores, tmp_path, "gs", env={"STEPS": "1000"})
    job.start("gce")
    job.wait_step(1)
    _exec(machine, "systemctl kill --signal=SIGKILL --kill-whom=main gpubake-job")
    job.wait_poweroff(timeout=60)
    assert "powering off (backstop)" in job.journal()
    assert "the runner died" in job.outputs()["_FAILED"]


def test_job_past_max_run_time_is_stopped(machine, stores, tmp_path):
    job = Job(machine, stores, tmp_path, "gs", env={"STEPS": "1000"}, max_run_time=12)
    job.start("gce")
    job.wait_poweroff(timeout=90)
    out = job.outputs()
    assert "max_run_time 12 s exceeded" in out["_FAILED"]
    assert int(out["results/last_step"]) >= 1
    # the backstop timer for a hung runner was armed, and disarmed by the runner's own end
    assert "armed the deadline: power-off in 152 s" in job.journal()
    code, _ = run_in(machine, "systemctl", "is-active", "gpubake-job-deadline.timer")
    assert code != 0


def test_hung_runner_is_powered_off_by_the_deadline_timer(machine, stores, tmp_path):
    """The runner itself stops (SIGSTOP): the transient timer armed at the start powers off
    at max_run_time + grace_period + the slack (here 3 s instead of 120 s)."""
    job = Job(machine, stores, tmp_path, "gs", command="sleep 600", max_run_time=4, grace_period=1)
    _write(
        machine,
        "/etc/systemd/system/gpubake-job.service.d/slack.conf",
        '[Service]\nEnvironment="GPUBAKE_DEADLINE_SLACK_SECONDS=3"\n',
    )
    try:
        job.start("gce")
        deadline = time.monotonic() + 60
        while "armed the deadline" not in job.journal() and time.monotonic() < deadline:
            time.sleep(0.2)
        _exec(machine, "systemctl kill --signal=SIGSTOP --kill-whom=main gpubake-job")
        armed = time.time()
        powered_off = job.wait_poweroff(timeout=60)
        assert 3 < powered_off - armed < 20, powered_off - armed
    finally:  # end the stopped runner; its backstop must be done before the next test
        _exec(
            machine,
            "systemctl kill --signal=SIGKILL gpubake-job; rm -f "
            "/etc/systemd/system/gpubake-job.service.d/slack.conf; systemctl daemon-reload; "
            + WAIT_INACTIVE,
        )
    assert "armed the deadline: power-off in 8 s" in job.journal()
    assert "max_run_time" not in job.outputs().get("_FAILED", b"").decode()  # not the runner


@pytest.mark.parametrize(
    ("hung", "marker", "said"),
    [
        # the end: the dataset's umount, the timers' systemctl stop, systemd-run arming them
        (("umount", "systemctl", "systemd-run"), "_SUCCESS", "unmounting /mnt/dataset failed"),
        # the start: the dataset's mount (the job fails, the machine still goes off)
        (("mount",), "_FAILED", "mount hung: gave up after 2 s"),
    ],
    ids=["at-the-end", "at-the-start"],
)
def test_hung_system_tools_do_not_keep_it_up(machine, stores, tmp_path, hung, marker, said):
    """Each system tool the runner calls on its way to power-off, replaced by one that never
    returns (a stuck disk, a busy systemd): it is given up on after GPUBAKE_TOOL_TIMEOUT, said,
    and the machine is powered off all the same."""
    job = Job(
        machine, stores, tmp_path, "gs", env={"STEPS": "2"}, max_run_time=600,
        dataset={"device": DATASET, "mount": "/mnt/dataset"},
    )  # fmt: skip
    for name in hung:
        _write(machine, f"/opt/hung-tools/{name}", "#!/bin/sh\nexec sleep 600\n")
    path = "/opt/hung-tools:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    dropin = "/etc/systemd/system/gpubake-job.service.d/hung.conf"
    _write(
        machine,
        dropin,
        f'[Service]\nEnvironment="PATH={path}" "GPUBAKE_TOOL_TIMEOUT=2"\n',
    )
    try:
        started = time.time()
        job.start("gce")
        powered_off = job.wait_poweroff(timeout=90)
        assert powered_off - started < 45, powered_off - started
    finally:
        _exec(
            machine,
            f"rm -rf /opt/hung-tools {dropin}; systemctl daemon-reload; {WAIT_INACTIVE}; "
            "umount /mnt/dataset 2>/dev/null; true",
        )
    journal = job.journal()
    assert said in journal, journal[-3000:]
    assert marker in job.outputs()
    if "systemd-run" in hung:
        assert "deadline timer: systemd-run hung: gave up after 2 s" in journal


def test_on_end_stay_keeps_the_machine_up_for_a_while(machine, stores, tmp_path):
    job = Job(machine, stores, tmp_path, "gs", command="true", on_end="stay", stay_minutes=5)
    job.start("gce")
    deadline = time.monotonic() + 60
    while "powers off in 5 min" not in job.journal() and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        assert "on_end stay: the machine powers off in 5 min" in job.journal()
        assert "_SUCCESS" in job.outputs()
        _, out = run_in(machine, "systemctl", "show", "-p", "ActiveState", "gpubake-job-stay.timer")
        assert out.strip() == "ActiveState=active"
        assert run_in(machine, "test", "-e", POWEROFF_LOG)[0] != 0  # not powered off (yet)
    finally:  # its power-off must not land in a later test
        _exec(machine, "systemctl stop gpubake-job-stay.timer || true")


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"epochs": 3}, "unknown field 'epochs'"),
        ({"command": []}, "command is missing or empty"),
    ],
)
def test_bad_spec_writes_failed_and_powers_off(machine, stores, tmp_path, change, expect):
    job = Job(machine, stores, tmp_path, "gs")
    job.spec.update(change)
    job.start("gce")
    job.wait_poweroff(timeout=60)
    assert expect in job.journal()
    assert expect in job.outputs()["_FAILED"]


@pytest.mark.parametrize(
    ("results", "expect"),
    [
        (f"gs://no-such-bucket-{uuid.uuid4().hex[:6]}/x", "the results location cannot be used"),
        ("gs://Bad_Bucket/x", "is not a bucket URL"),
    ],
    ids=["unreachable", "bad-url"],
)
def test_unusable_results_still_powers_off(machine, stores, tmp_path, results, expect):
    job = Job(machine, stores, tmp_path, "gs")
    job.spec["results"] = results
    job.start("gce")
    job.wait_poweroff(timeout=60)
    assert expect in job.journal()


def _job_local(
    store: Any, spec: Path, *args: str, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """`gpubake job local SPEC` on this machine (no cloud), with the store's endpoint."""
    return subprocess.run(
        [sys.executable, "-m", "gpubake", "job", "local", str(spec), *args],
        capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, **store.env, "GPUBAKE_CLOUD": "none"},
    )  # fmt: skip


def test_job_local_runs_the_same_runner(stores, tmp_path):
    """`gpubake job local`: the same runner on this machine, nothing mounted or powered off."""
    store = stores["s3"]
    bucket = f"local-{uuid.uuid4().hex[:8]}"
    store.make_bucket(bucket)
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "train.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['GPUBAKE_RESULTS_DIR'], 'done').write_text('yes')\n"
        "pathlib.Path(os.environ['GPUBAKE_CKPT_DIR'], 'ckpt').write_text('1')\n"
    )
    _sync(store, "upload", str(code_dir), f"s3://{bucket}/code")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "gpubake_job": 1, "id": "local-try", "command": [sys.executable, "train.py"],
        "code": {"url": f"s3://{bucket}/code"}, "results": f"s3://{bucket}/run",
    }))  # fmt: skip
    proc = _job_local(store, spec, "--work-dir", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = _fetch(store, f"s3://{bucket}/run")
    assert out["results/done"] == "yes" and out["checkpoints/ckpt"] == "1"
    assert json.loads(out["_SUCCESS"])["job"] == "local-try"
    assert "powered off" not in proc.stdout and "power-off" not in proc.stdout

    spec.write_text(json.dumps({"gpubake_job": 1, "command": "true", "results": "ftp://x"}))
    proc = _job_local(store, spec, timeout=60)
    assert proc.returncode == 2
    assert "is not a bucket URL" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_job_local_fetches_code_from_git_at_a_commit(stores, tmp_path):
    """code: a git URL pinned to a commit; a later commit on the branch is not what runs."""
    store = stores["gs"]
    bucket = f"git-{uuid.uuid4().hex[:8]}"
    store.make_bucket(bucket)
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip

    git("init", "-q")
    script = (
        "import os, pathlib\n"
        "pathlib.Path(os.environ['GPUBAKE_RESULTS_DIR'], 'v').write_text('{}')\n"
    )
    (repo / "train.py").write_text(script.format("pinned"))
    git("add", "train.py")
    git("commit", "-qm", "pinned")
    pinned = git("rev-parse", "HEAD")
    (repo / "train.py").write_text(script.format("later"))
    git("commit", "-qam", "later")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "gpubake_job": 1, "id": "git-try", "command": [sys.executable, "train.py"],
        "code": {"url": f"file://{repo}", "commit": pinned}, "results": f"gs://{bucket}/run",
    }))  # fmt: skip
    proc = _job_local(store, spec, "--work-dir", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _fetch(store, f"gs://{bucket}/run")["results/v"] == "pinned"


def test_the_spec_job_run_dry_run_prints_runs_here_and_job_fetch_finds_it(
    machine, stores, tmp_path, monkeypatch
):
    """End to end without a cloud: the spec `gpubake job run --dry-run --json` prints (and
    the request's user-data carries) runs with the image's `gpubake-job local` in the
    container; `gpubake job fetch` then finds its results in the S3 server."""
    store = stores["s3"]
    bucket = f"e2e-{uuid.uuid4().hex[:8]}"
    store.make_bucket(bucket)
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text(
        "import json, os, pathlib, sys\n"
        "out = pathlib.Path(os.environ['GPUBAKE_RESULTS_DIR'])\n"
        "(out / 'seen.json').write_text(json.dumps({'argv': sys.argv[1:],"
        " 'epochs': os.environ['EPOCHS']}))\n"
    )
    env = {**os.environ, **store.env, "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.run(
        [sys.executable, "-m", "gpubake", "job", "run", "--cloud", "aws",
         "--region", "us-east-1", "--image", "ami-0123456789abcdef0", "--dry-run", "--json",
         "--results", f"s3://{bucket}/runs", "--code", str(code), "--env", "EPOCHS=2",
         "--", "python", "train.py", "--lr", "0.5"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (job,) = json.loads(proc.stdout)["jobs"]
    spec = job["spec"]
    user_data = job["request"]["UserData"]
    assert json.loads(user_data) == spec
    assert not (tmp_path / "state" / "gpubake" / "jobs").exists()  # a dry run records nothing
    # the code goes where the spec says, as `job run` would put it
    from gpubake.jobs import launch, storage

    for key, value in store.env.items():
        monkeypatch.setenv(key, value)
    tarball = launch.pack_code(code)
    try:
        storage.upload_code(tarball, spec["code"]["url"])
    finally:
        tarball.unlink()
    _write(machine, "/root/e2e-spec.json", json.dumps(spec))
    exports = " ".join(f"{k}={v}" for k, v in store.env.items())
    said = _exec(
        machine,
        f"env {exports} GPUBAKE_CLOUD=none gpubake-job local /root/e2e-spec.json "
        "--work-dir /root/e2e-work 2>&1",
    )
    assert "_SUCCESS" in said, said
    fetched = subprocess.run(
        [sys.executable, "-m", "gpubake", "job", "fetch", spec["results"], str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    seen = json.loads((tmp_path / "out" / "results" / "seen.json").read_text())
    assert seen == {"argv": ["--lr", "0.5"], "epochs": "2"}
    assert json.loads((tmp_path / "out" / "_SUCCESS").read_text())["job"] == spec["id"]
