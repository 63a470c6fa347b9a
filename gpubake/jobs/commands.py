"""`gpubake job run|sweep|emit|status|logs|fetch|stop|gc`: the click commands (registered on
the `job` group by gpubake.cli), and the flows behind them."""

from __future__ import annotations

import calendar
import contextlib
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from gpubake.build.plan import CloudOptions
from gpubake.clouds import CloudError
from gpubake.clouds.location import settle_options
from gpubake.jobs import emit, launch, storage
from gpubake.jobs.aws import Aws
from gpubake.jobs.cloud import STOPPING_STATES, Instance
from gpubake.jobs.gcp import Gcp
from gpubake.jobs.launch import JobError, JobOptions, Record
from gpubake.resources import data_root

Echo = Callable[[str], None]


def _echo(message: str) -> None:
    click.echo(f"gpubake: {message}", err=True)


def _use_profile(options: JobOptions) -> None:
    """The bucket client (results, logs, code) uses boto3's default session: give it the
    job's --profile, and no other job's."""
    if options.cloud != "aws":
        return
    if options.profile:
        _PROFILE_SET.add(options.profile)
        os.environ["AWS_PROFILE"] = options.profile
    elif os.environ.get("AWS_PROFILE") in _PROFILE_SET:  # set here for an earlier job
        del os.environ["AWS_PROFILE"]


_PROFILE_SET: set[str] = set()


def _cloud_client(options: JobOptions) -> Any:
    """gpubake.jobs.gcp.Gcp or gpubake.jobs.aws.Aws."""
    if options.cloud == "gcp":
        return Gcp(options, service_account=options.service_account)

    _use_profile(options)
    return Aws(options, instance_profile=options.instance_profile)


def settle(options: JobOptions, env: Mapping[str, str], what: str = "the job") -> JobOptions:
    """Project and zone (GCP) or region and profile (AWS), from the options or the variables
    the clouds' CLIs use, checked the way `build` checks them."""
    target = "gcp-image" if options.cloud == "gcp" else "aws-ami"
    if options.cloud == "aws" and not (
        options.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    ):
        options = dataclasses.replace(options, region=_profile_region(options.profile))
    given = CloudOptions(
        project=options.project, zone=options.zone, region=options.region, profile=options.profile
    )
    try:
        settled = settle_options(target, given, env)
    except CloudError as exc:
        raise JobError(str(exc).replace(f"for {target}", f"for {what}")) from None
    return dataclasses.replace(
        options,
        project=settled.project,
        zone=settled.zone,
        region=settled.region,
        profile=settled.profile,
    )


def _profile_region(profile: str | None) -> str | None:
    """The region ~/.aws/config gives the profile, as the AWS CLI would use it."""
    import boto3
    from botocore.exceptions import BotoCoreError

    try:
        return boto3.session.Session(profile_name=profile).region_name
    except BotoCoreError:
        return None  # settle() then says --region is required


def _instances_by_job(client: Any) -> dict[str, Instance]:
    return {i.job: i for i in client.list()}


#: How long a VM this run started counts as running while the cloud's listing does not show
#: it yet (EC2's DescribeInstances is eventually consistent); after that, unlisted is gone.
LISTING_LAG_S = 120


def _wait_for_slot(
    client: Any, sweep: str, max_parallel: int, started: dict[str, float], echo: Echo
) -> None:
    """Block until fewer than max_parallel VMs of the sweep are running (poll every 30 s)."""
    said = False
    while True:
        try:
            listed = {i.job: i for i in client.list(sweep=sweep)}
        except JobError as exc:  # a hiccup of the API during hours of waiting
            echo(f"listing the sweep's VMs failed ({exc}); trying again in 30 s")
            time.sleep(30)
            continue
        active = {job for job, i in listed.items() if not i.stopped}
        recent = time.monotonic() - LISTING_LAG_S
        active |= {job for job, at in started.items() if job not in listed and at > recent}
        if len(active) < max_parallel:
            return
        if not said:
            echo(f"{len(active)} of the sweep's jobs run (--max-parallel {max_parallel}): waiting")
            said = True
        time.sleep(30)


def upload_code(options: JobOptions, jobs: list[launch.Job], echo: Echo) -> None:
    """--code DIR, packed, to where the jobs' specs fetch it from (one upload for a sweep)."""
    code = jobs[0].spec.get("code")
    if not (options.code_dir and code):
        return
    tarball = launch.pack_code(options.code_dir)
    try:
        echo(f"uploading {options.code_dir} to {code['url']}")
        storage.upload_code(tarball, code["url"])
    finally:
        tarball.unlink()


def launch_jobs(
    options: JobOptions,
    params: Mapping[str, list[str]] | None,
    *,
    dry_run: bool,
    as_json: bool,
    max_parallel: int | None = None,
    echo: Echo = _echo,
    env: Mapping[str, str] | None = None,
) -> list[Record]:
    """`job run` (params None) and `job sweep`: check, upload the code, create one VM per job."""
    options = settle(options, os.environ if env is None else env)
    jobs = launch.make_jobs(options, params)
    client = _cloud_client(options)
    if dry_run:
        requests = client.requests(jobs)
        out = {
            "cloud": options.cloud,
            "location": options.location(),
            "jobs": [
                {"id": j.id, "results": j.results, "spec": j.spec, "request": r}
                for j, r in zip(jobs, requests, strict=True)
            ],
        }
        if as_json:
            click.echo(json.dumps(out, indent=2, sort_keys=True))
        else:
            for job in out["jobs"]:
                click.echo(f"# job {job['id']}: the request gpubake would send")
                click.echo(json.dumps(job["request"], indent=2, sort_keys=True))
                click.echo(f"# job {job['id']}: its spec")
                click.echo(json.dumps(job["spec"], indent=2, sort_keys=True))
        return []
    if options.cloud == "aws" and not options.instance_profile:
        raise JobError(
            "--instance-profile is required on AWS: the VM writes its results to S3 with that "
            "profile's role (one that may write the results bucket)"
        )
    echo(f"checking the image, GPU, dataset disk and results location for {len(jobs)} job(s)")
    image = client.preflight(jobs)
    upload_code(options, jobs, echo)
    machine = getattr(client, "machine_type", None) or client.instance_type()
    started: list[Record] = []
    started_at: dict[str, float] = {}
    for job in jobs:
        try:
            if max_parallel and job.sweep:
                _wait_for_slot(client, job.sweep, max_parallel, started_at, echo)
            name = client.create(job, image)
            started_at[job.id] = time.monotonic()
        except (JobError, KeyboardInterrupt) as exc:
            if started:  # say what runs and what never started, then the reason
                left = [j.id for j in jobs[len(started) :]]
                echo(f"started: {', '.join(r.id for r in started)}; not started: {', '.join(left)}")
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise JobError(f"starting job {job.id}: {exc}") from None
        record = Record(
            id=job.id,
            cloud=options.cloud,
            results=job.results,
            instance=name,
            location=options.location(),
            profile=options.profile,
            gpu=options.gpu,
            machine_type=machine,
            gpu_count=options.gpu_count,
            sweep=job.sweep,
            index=job.index,
            params=job.params,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        record.save()
        started.append(record)
        echo(f"started job {job.id} on {name} (results: {job.results})")
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) for r in started], indent=2))
    else:
        first = started[0]
        follow = f"--sweep {first.sweep}" if first.sweep else first.id
        click.echo(first.sweep or first.id)
        echo(f"follow it: gpubake job status {follow}; gpubake job logs {first.id} --follow")
    return started


# ------------------------------------------------------------------------- following


def options_for(record: Record) -> JobOptions:
    """The options that reach a recorded job's cloud again."""
    if record.cloud == "gcp":
        project, _, zone = record.location.partition("/")
        where: dict[str, Any] = {"project": project, "zone": zone}
    else:
        where = {"region": record.location, "profile": record.profile}
    return JobOptions(
        cloud=record.cloud,
        results=record.results,
        command=("-",),
        gpu=record.gpu,
        gpu_count=record.gpu_count,
        machine_type=record.machine_type or None,
        **where,
    )


def runtime_text(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"


def status_rows(records: list[Record], *, now: float | None = None) -> list[dict[str, Any]]:
    """One row per recorded job: the cloud's state of its VM and the runner's marker."""
    now = time.time() if now is None else now
    # one listing per cloud, location and profile; a cloud that cannot be asked (credentials
    # gone, ...) gives its rows "?" and the reason, and the others still show
    clouds: dict[tuple[str, str, str | None], dict[str, Instance] | str] = {}
    rows = []
    for record in records:
        options = options_for(record)
        key = (record.cloud, record.location, record.profile)
        if key not in clouds:
            try:
                clouds[key] = _instances_by_job(_cloud_client(options))
            except JobError as exc:
                clouds[key] = str(exc)
        listed = clouds[key]
        _use_profile(options)
        try:
            marker = storage.outcome(record.results)
        except JobError as exc:
            marker = {"state": "?", "error": str(exc)}
        instance = listed.get(record.id) if isinstance(listed, dict) else None
        created = calendar.timegm(time.strptime(record.created, "%Y-%m-%dT%H:%M:%SZ"))
        end = now
        if marker and marker.get("time"):
            with contextlib.suppress(ValueError):
                end = datetime.datetime.fromisoformat(str(marker["time"])).timestamp()
        running = instance is not None and not instance.stopped
        runtime = max(0.0, end - (instance.created if instance else created))
        price = instance.hourly_price if instance else None
        vm = instance.state if instance else "gone" if isinstance(listed, dict) else "?"
        if marker:
            outcome = marker["state"]
        else:
            outcome = "running" if running else "stopped" if instance else "unknown"
        row = {
            "job": record.id,
            "vm": vm,
            "outcome": outcome,
            "gpu": (instance.gpu if instance else "") or record.gpu,
            # a VM that stopped without a marker: its runtime is not known any more
            "runtime": runtime_text(runtime) if running or marker else "-",
            "runtime_seconds": round(runtime) if running or marker else None,
            "cost": f"${price * runtime / 3600:.2f}" if price is not None else "unknown",
            "results": record.results,
        }
        errors = [
            e
            for e in (listed if isinstance(listed, str) else None, (marker or {}).get("error"))
            if e
        ]
        if errors:
            row["error"] = "; ".join(errors)
        rows.append(row)
    return rows


JOB_COLUMNS = ("job", "vm", "outcome", "gpu", "runtime", "cost")


def table(rows: list[dict[str, Any]], columns: tuple[str, ...] = JOB_COLUMNS) -> str:
    """`columns` of the rows, aligned, under an upper-case header."""
    widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _results_of(job_or_url: str) -> str:
    """A job's results prefix: from its record, or the URL itself."""
    if job_or_url.startswith(("gs://", "s3://")):
        return job_or_url.rstrip("/")
    return launch.find_record(job_or_url).results


def follow_log(
    results: str,
    *,
    follow: bool,
    interval: float = 10,
    out=sys.stdout,
    vm_alive: Callable[[], bool] | None = None,
) -> None:
    """Print the job's log from the results location; with follow, keep printing what is new
    until the runner writes a marker (then once more: the marker comes after the last sync),
    or until the VM is gone without one."""
    shown, polls, ended = 0, 0, False
    while True:
        text = storage.log_text(results) or ""
        if len(text) > shown:
            out.write(text[shown:])
            out.flush()
            shown = len(text)
        if not follow or ended:
            if not text and not follow:
                _echo(f"no log yet at {results}/logs/job.log (the runner syncs it)")
            return
        polls += 1
        if storage.outcome(results):
            ended = True
            continue
        if vm_alive is not None and polls % 6 == 0 and not vm_alive():
            _echo("the job's VM is gone and wrote no marker: see gpubake job status")
            return
        time.sleep(interval)


def gc_candidates(instances: list[Instance], *, now: float | None = None) -> list[Instance]:
    """Job VMs past their deadline, or stopped (a stopped VM still costs its disks)."""
    now = time.time() if now is None else now
    return [
        i
        for i in instances
        if i.state not in STOPPING_STATES
        and (i.stopped or (i.deadline is not None and i.deadline < now))
    ]


# ----------------------------------------------------------------------------- click


def _launch_options(func):  # type: ignore[no-untyped-def]
    func = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(func)
    func = click.option(
        "--dry-run",
        is_flag=True,
        help="Print the exact request(s) and job spec(s); needs no cloud access.",
    )(func)
    return _job_options(func)


def _job_options(func):  # type: ignore[no-untyped-def]
    """What `job run`, `job sweep` and `job emit` share."""
    opts = [
        click.option("--name", default="job", show_default=True, help="The job ids' prefix."),
        click.option(
            "--sync-interval", metavar="DURATION", help="Sync results every (default 5m)."
        ),
        click.option(
            "--env", "env_pairs", multiple=True, metavar="KEY=VALUE", help="Job env. Repeatable."
        ),
        click.option("--git", metavar="URL@COMMIT", help="Code from git, at a pinned commit."),
        click.option(
            "--code",
            "code_dir",
            type=click.Path(exists=True, file_okay=False),
            help="A folder, packed and uploaded under the results location.",
        ),
        click.option(
            "--results",
            required=True,
            metavar="URL",
            help="gs://BUCKET/PREFIX or s3://BUCKET/PREFIX: each job writes under "
            "<URL>/<job id>/ (a sweep: <URL>/<sweep>/<index>/).",
        ),
        click.option(
            "--dataset-disk",
            metavar="NAME",
            help="GCP: a disk in the zone, attached read-only; AWS: a snapshot id, a fresh "
            "volume per job. Mounted at /mnt/dataset.",
        ),
        click.option(
            "--max-run-duration",
            metavar="DURATION",
            help="e.g. 6h: GCE deletes the VM after it (EC2: job gc does, by the "
            "gpubake-deadline tag); the runner stops the job a tenth earlier and syncs.",
        ),
        click.option("--spot/--no-spot", default=True, show_default=True, help="Spot capacity."),
        click.option("--machine-type", metavar="TYPE", help="Default: the GPU's smallest."),
        click.option("--gpu-count", type=click.IntRange(1, 16), default=1, show_default=True),
        click.option(
            "--gpu", default=launch.DEFAULT_GPU, show_default=True, help="GPU model (gpus.yml)."
        ),
        click.option(
            "--image",
            help="GCP: image or family name; AWS: AMI id (default: the "
            "newest gpubake image of --stack).",
        ),
        click.option("--stack", default=launch.DEFAULT_STACK, show_default=True),
        click.option("--profile", metavar="NAME", help="AWS: credentials profile."),
        click.option(
            "--instance-profile",
            metavar="NAME",
            help="AWS (required): the instance profile whose role writes the results bucket.",
        ),
        click.option(
            "--service-account",
            metavar="EMAIL",
            default="default",
            show_default=True,
            help="GCP: the VM's service account (scopes: storage read-write, logging write).",
        ),
        click.option(
            "--region", metavar="REGION", help="AWS: region (or AWS_REGION); emit batch: region."
        ),
        click.option(
            "--zone",
            metavar="ZONE",
            help="GCP: zone (or CLOUDSDK_COMPUTE_ZONE); AWS: an availability zone to pin.",
        ),
        click.option("--project", metavar="ID", help="GCP: project (or GOOGLE_CLOUD_PROJECT)."),
        click.option(
            "--cloud", type=click.Choice(launch.CLOUDS), required=True, help="Where to run."
        ),
        click.argument("command", nargs=-1, required=True),
    ]
    for opt in opts:
        func = opt(func)
    return func


def _options(kw: dict[str, Any]) -> JobOptions:
    env = []
    for pair in kw.pop("env_pairs"):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise JobError(f"--env {pair!r} is not KEY=VALUE")
        env.append((key, value))
    duration = kw.pop("max_run_duration")
    return JobOptions(
        cloud=kw.pop("cloud"),
        results=kw.pop("results"),
        command=tuple(kw.pop("command")),
        gpu=kw.pop("gpu"),
        gpu_count=kw.pop("gpu_count"),
        spot=kw.pop("spot"),
        max_run_duration=launch.parse_duration(duration, "--max-run-duration")
        if duration
        else None,
        stack=kw.pop("stack"),
        image=kw.pop("image"),
        machine_type=kw.pop("machine_type"),
        project=kw.pop("project"),
        zone=kw.pop("zone"),
        region=kw.pop("region"),
        profile=kw.pop("profile"),
        dataset_disk=kw.pop("dataset_disk"),
        code_dir=kw.pop("code_dir"),
        git=kw.pop("git"),
        env=tuple(env),
        sync_interval=kw.pop("sync_interval"),
        name=kw.pop("name"),
        instance_profile=kw.pop("instance_profile"),
        service_account=kw.pop("service_account"),
    )


def _param_option(func):  # type: ignore[no-untyped-def]
    func = click.option(
        "--max-parallel",
        type=click.IntRange(1),
        help="Run at most N jobs at a time (gpubake waits for a slot before the next).",
    )(func)
    return click.option(
        "--param",
        "param_texts",
        multiple=True,
        metavar="NAME=V1,V2",
        help="A swept value; the command's {NAME} is replaced, and the job sees "
        "$GPUBAKE_PARAM_NAME. Repeatable: every combination runs.",
    )(func)


def _job_runner(*args: str) -> int:
    """Run the runner the images hold (roles/job_runner/files/gpubake_job.py) with this
    Python, whose boto3 / google-cloud-storage the sync client then uses."""
    files = data_root() / "roles" / "job_runner" / "files"
    env = {**os.environ, "GPUBAKE_JOB_CONFIG": os.environ.get("GPUBAKE_JOB_CONFIG", os.devnull)}
    return subprocess.call([sys.executable, str(files / "gpubake_job.py"), *args], env=env)


@click.command(name="local")
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False),
    help="Where the job's code, checkpoints, results and logs go "
    "(default: ~/.cache/gpubake/jobs/<id>).",
)
def job_local_cmd(spec: str, work_dir: str | None) -> None:
    """Run the job SPEC (a JSON file) on this machine, as an instance would, to try it
    before paying for one.

    The same runner as in the images: the code is fetched, earlier checkpoints restored,
    the command run with $GPUBAKE_CKPT_DIR, $GPUBAKE_RESULTS_DIR and $GPUBAKE_PREEMPT_FILE
    set, and they are synced to the spec's results location (gs:// or s3://, with this
    machine's credentials) every sync_interval and at the end, with _SUCCESS, _FAILED or
    _PREEMPTED. Unlike an instance, the dataset disk is not mounted, the command runs as
    you, and nothing is powered off. Exit status: 0 success, 1 the job failed, 2 a bad spec
    or an unusable results location, 3 preempted.

    \b
    Example spec:
      {"gpubake_job": 1, "command": ["python", "train.py"],
       "code": {"url": "gs://my-bucket/code/train.tar.gz"},
       "results": "gs://my-bucket/runs/first", "sync_interval": "5m",
       "max_run_time": "6h"}
    """
    code = _job_runner("local", spec, *(["--work-dir", work_dir] if work_dir else []))
    if code:
        sys.exit(code)


@click.command(name="validate")
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
def job_validate_cmd(spec: str) -> None:
    """Check the job SPEC and print it with every default filled in (one-line error if bad)."""
    code = _job_runner("validate", spec)
    if code:
        sys.exit(code)


def register(group: click.Group) -> None:
    """Add the commands of `gpubake job`: local and validate, then launch and follow."""
    group.add_command(job_local_cmd)
    group.add_command(job_validate_cmd)

    @group.command(name="run", context_settings={"ignore_unknown_options": False})
    @_launch_options
    def run_cmd(dry_run: bool, as_json: bool, **kw: Any) -> None:
        """Start one VM that runs COMMAND (after --) on a gpubake image, syncs its results and
        checkpoints, and powers off at the end: an EC2 instance is then terminated; a GCE VM
        stops (only its disk costs) until `gpubake job gc` deletes it, and is deleted by GCE
        itself when preempted or at --max-run-duration.

        \b
        Example:
          gpubake job run --cloud gcp --project my-proj --zone us-central1-a --gpu t4 \\
            --results gs://my-bucket/runs --code . --max-run-duration 6h -- python train.py
        """
        launch_jobs(_options(kw), None, dry_run=dry_run, as_json=as_json)

    @group.command(name="sweep")
    @_param_option
    @_launch_options
    def sweep_cmd(
        dry_run: bool,
        as_json: bool,
        param_texts: tuple[str, ...],
        max_parallel: int | None,
        **kw: Any,
    ) -> None:
        """One VM per combination of the --param values, each with its own results prefix.

        \b
        Example:
          gpubake job sweep --cloud aws --region us-east-1 --results s3://my-bucket/runs \\
            --param lr=1e-3,1e-4 --param bs=32,64 --code . \\
            -- python train.py --lr {lr} --batch-size {bs}
        """
        params = launch.parse_params(param_texts)
        if not params:
            raise JobError("job sweep needs at least one --param NAME=V1,V2")
        launch_jobs(
            _options(kw), params, dry_run=dry_run, as_json=as_json, max_parallel=max_parallel
        )

    @group.command(name="status")
    @click.argument("job_id", required=False)
    @click.option("--sweep", help="The jobs of one sweep.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
    def status_cmd(job_id: str | None, sweep: str | None, as_json: bool) -> None:
        """Jobs launched from this machine: the VM's state from the cloud, the outcome from
        the results location (_SUCCESS/_FAILED/_PREEMPTED), GPU, runtime and cost so far
        (from the spot price where the cloud's API gives one, else "unknown")."""
        found = [launch.find_record(job_id)] if job_id else launch.records(sweep=sweep)
        if not found:
            raise JobError(
                f"no jobs of sweep {sweep!r} were launched from this machine"
                if sweep
                else "no jobs were launched from this machine yet: see gpubake job run --help"
            )
        rows = status_rows(found)
        click.echo(json.dumps(rows, indent=2) if as_json else table(rows))
        for error in dict.fromkeys(r["error"] for r in rows if "error" in r):
            _echo(f"could not read everything: {error}")

    @group.command(name="logs")
    @click.argument("job_id")
    @click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
    def logs_cmd(job_id: str, follow: bool) -> None:
        """The log of JOB_ID (or of the job whose results URL is given), as the runner synced
        it to <results>/logs/job.log."""
        vm_alive = None
        if not job_id.startswith(("gs://", "s3://")):
            record = launch.find_record(job_id)
            client = _cloud_client(options_for(record))
            vm_alive = lambda: any(not i.stopped for i in client.list(job=job_id))  # noqa: E731
        follow_log(_results_of(job_id), follow=follow, vm_alive=vm_alive)

    @group.command(name="fetch")
    @click.argument("job_id")
    @click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
    def fetch_cmd(job_id: str, dest: Path) -> None:
        """Download the results, checkpoints, logs and markers of JOB_ID (or of the job whose
        results URL, gs://... or s3://..., is given: a job launched elsewhere) into DEST."""
        results = _results_of(job_id)
        names = storage.fetch(results, dest, log=lambda line: None)
        if not names:
            raise JobError(f"nothing under {results} yet: see gpubake job status {job_id}")
        _echo(f"fetched {len(names)} file(s) from {results} into {dest}")

    @group.command(name="stop")
    @click.argument("job_id")
    def stop_cmd(job_id: str) -> None:
        """Stop a job: the VM's shutdown reaches the runner, which signals the job, syncs a
        last time and writes _PREEMPTED; then the VM is deleted."""
        record = launch.find_record(job_id)
        client = _cloud_client(options_for(record))
        instances = client.list(job=job_id)
        if not instances:
            raise JobError(f"job {job_id} has no VM any more: see gpubake job status {job_id}")
        for instance in instances:
            _echo(f"stopping {instance.name} (job {job_id})")
            client.stop(instance)
        _echo(f"stopped job {job_id}; its results stay at {record.results}")

    @group.command(name="gc")
    @click.option("--cloud", type=click.Choice(launch.CLOUDS), required=True)
    @click.option("--project", metavar="ID")
    @click.option("--zone", metavar="ZONE")
    @click.option("--region", metavar="REGION")
    @click.option("--profile", metavar="NAME")
    @click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
    def gc_cmd(dry_run: bool, as_json: bool, **kw: Any) -> None:
        """Delete gpubake job VMs past their deadline (--max-run-duration) or stopped."""
        unused = "gs://unused-bucket" if kw.get("cloud") == "gcp" else "s3://unused-bucket"
        options = settle(JobOptions(results=unused, command=("-",), **kw), os.environ)
        client = _cloud_client(options)
        doomed = gc_candidates(client.list())
        if as_json:
            click.echo(json.dumps([dataclasses.asdict(i) for i in doomed], indent=2))
        for instance in doomed:
            why = "stopped" if instance.stopped else "past its deadline"
            _echo(
                f"{'would delete' if dry_run else 'deleting'} {instance.name} "
                f"(job {instance.job}, {why})"
            )
        if not doomed:
            _echo("no gpubake job VMs to delete")
        elif not dry_run:
            client.delete(doomed)

    @group.command(name="emit")
    @click.argument("engine", type=click.Choice(["batch", "skypilot", "k8s"]))
    @click.option(
        "--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here, not stdout."
    )
    @click.option(
        "--container",
        metavar="REF",
        help="k8s: the gpubake container image (default gpubake/<stack>:latest).",
    )
    @_param_option
    @_job_options
    def emit_cmd(
        engine: str,
        out: Path | None,
        container: str | None,
        param_texts: tuple[str, ...],
        max_parallel: int | None,
        **kw: Any,
    ) -> None:
        """Write the job (or sweep, with --param) for an existing engine, checked offline by
        the engine's own types or schema: a Google Cloud Batch job (JSON; SPOT, the gpubake
        image, one task per combination, retried on preemption), a SkyPilot task (YAML) or a
        Kubernetes Indexed Job (YAML, the gpubake container)."""
        options = _options(kw)
        # the project and zone the clouds' CLIs would use; nothing is looked up
        env = os.environ
        options = dataclasses.replace(
            options,
            project=options.project
            or env.get("GOOGLE_CLOUD_PROJECT")
            or env.get("CLOUDSDK_CORE_PROJECT")
            or None,
            zone=options.zone or env.get("CLOUDSDK_COMPUTE_ZONE") or None,
        )
        _use_profile(options)
        jobs = launch.make_jobs(options, launch.parse_params(param_texts) or None)
        if engine == "batch":
            if options.cloud != "gcp":
                raise JobError("job emit batch is Google Cloud Batch: use --cloud gcp")
            region = options.region or (options.zone or "").rpartition("-")[0]
            if not region:
                raise JobError("job emit batch needs --region (or --zone) for the Batch job")
            text = emit.batch(options, jobs, region=region, max_parallel=max_parallel)
            emit.validate_batch(text)
        elif engine == "skypilot":
            text = emit.skypilot(options, jobs)
            emit.validate_skypilot(text)
            if emit.skypilot_version() is None:
                _echo(emit.SKYPILOT_NOTE)
        else:
            image = container or f"gpubake/{options.stack}:latest"
            text = emit.k8s(options, jobs, image=image, max_parallel=max_parallel)
            emit.validate_k8s(text)
        upload_code(options, jobs, _echo)  # the engine's tasks fetch it as a VM's runner would
        if out:
            out.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
            _echo(f"wrote the {engine} job for {len(jobs)} task(s) to {out}")
        else:
            click.echo(text.rstrip("\n"))
