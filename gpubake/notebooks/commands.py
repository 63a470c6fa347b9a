"""`gpubake notebook up|connect|status|list|stop|down`: the click commands (registered on
the `notebook` group by gpubake.cli) and the flows behind them."""

from __future__ import annotations

import datetime
import json
import os
import webbrowser
from pathlib import Path
from typing import Any

import click

from gpubake.jobs import launch
from gpubake.jobs.commands import runtime_text, settle, table
from gpubake.jobs.launch import JobError
from gpubake.notebooks import connect as tunnel
from gpubake.notebooks.aws import NotebookAws
from gpubake.notebooks.gcp import STARTABLE, NotebookGcp
from gpubake.notebooks.options import (
    DEFAULT_STORAGE_GB,
    NotebookOptions,
    Record,
    check_cidr,
    check_name,
    find_key,
    find_record,
    login_user,
    records,
    storage_name,
)

NEXT = "gpubake notebook connect {name}"


def _echo(message: str) -> None:
    click.echo(f"gpubake: {message}", err=True)


def _client(options: NotebookOptions) -> NotebookGcp | NotebookAws:
    if options.cloud == "gcp":
        return NotebookGcp(options)
    if options.profile:
        os.environ["AWS_PROFILE"] = options.profile
    return NotebookAws(options)


def _duration(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    if text.strip().lower() in ("0", "off", "never"):
        return 0
    return launch.parse_duration(text, option)


def _utc(text: str) -> datetime.datetime | None:
    try:
        stamp = datetime.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.UTC)


def _record(
    options: NotebookOptions, client: Any, instance: str, storage: str, key: Path
) -> Record:
    location = f"{client.project}/{client.zone}" if options.cloud == "gcp" else str(client.region)
    return Record(
        name=options.name,
        cloud=options.cloud,
        location=location,
        instance=instance,
        storage=storage,
        ssh_key=str(key),
        ssh_user=options.ssh_user,
        profile=options.profile,
        gpu=options.gpu,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


def up(options: NotebookOptions, *, dry_run: bool, as_json: bool) -> None:
    key, public = find_key(options.ssh_key or None)
    job_options = settle(options.job_options(), os.environ, "a notebook")
    options = options.settled(job_options)
    client = _client(options)
    if dry_run:
        if isinstance(client, NotebookGcp):
            calls: dict[str, Any] = {"instances.insert": client.request(public)}
        else:
            calls = client.requests(public)
        click.echo(json.dumps({"cloud": options.cloud, "requests": calls}, indent=2))
        return
    state = "created"
    inst = client.find()
    if isinstance(client, NotebookGcp):
        if inst is None:
            image, disk_exists, os_login = client.preflight()
            _echo(
                f"creating VM {client.instance} in {client.zone} with "
                + (f"disk {client.disk}" if disk_exists else f"a new {options.storage_gb} GB disk")
            )
            client.create(
                client.request(public, image=image, disk_exists=disk_exists, os_login=os_login)
            )
        elif inst.status in STARTABLE:
            _echo(f"starting the stopped VM {client.instance}")
            client.start()
            state = "started"
        else:
            state = "running"
        instance, storage = client.instance, client.disk
    else:
        if inst is None:
            instance = client.create(public, client.preflight(), _echo)
        else:
            instance = str(inst["InstanceId"])
            if inst["State"]["Name"] in ("stopped", "stopping"):
                _echo(f"starting the stopped instance {instance}")
                client.start(instance)
                state = "started"
            else:
                state = "running"
        volume = client.volume()
        storage = volume["VolumeId"] if volume else storage_name(options.name)
    _record(options, client, instance, storage, key).save()
    if state == "running":
        _echo(f"notebook {options.name} is already running (its settings are kept)")
    if as_json:
        click.echo(
            json.dumps(
                {
                    "name": options.name,
                    "instance": instance,
                    "storage": storage,
                    "state": state,
                    "next": NEXT.format(name=options.name),
                }
            )
        )
    else:
        _echo(f"notebook {options.name} is up; next: {NEXT.format(name=options.name)}")


def _live(record: Record) -> dict[str, Any] | None:
    """The notebook's VM as its cloud describes it (NotebookGcp/Aws.describe), or None."""
    client = _client(record.options())
    inst = client.find()
    return client.describe(inst) if inst is not None else None


def connect(name: str, *, port: int, open_browser: bool, as_json: bool) -> None:
    record = find_record(name)
    live = _live(record)
    if live is None:
        raise JobError(f"notebook {name} has no VM: start it with `gpubake notebook up {name} ...`")
    if not live["running"]:
        raise JobError(
            f"notebook {name} is {live['state']}: start it with `gpubake notebook up {name} "
            f"--cloud {record.cloud}`"
        )
    if not live["address"]:
        raise JobError(f"notebook {name} has no external address yet: try again in a minute")
    key = Path(record.ssh_key)
    login = f"{login_user(record.ssh_user)}@{live['address']}"
    tunnel.wait_for_port(live["address"], tunnel.SSH_PORT, tunnel.ANSWER_TIMEOUT_S, _echo)
    token = tunnel.read_token(name, key, login, _echo)
    local = tunnel.free_port(port)
    proc = tunnel.open_tunnel(name, key, login, local)
    url = f"http://127.0.0.1:{local}/lab?token={token}"
    if as_json:
        click.echo(json.dumps({"name": name, "url": url, "port": local, "host": live["address"]}))
    else:
        click.echo(url)
    _echo(
        f"tunnel open to {live['address']}; Ctrl-C closes it (the VM keeps running: "
        f"`gpubake notebook stop {name}`)"
    )
    if open_browser:
        webbrowser.open(url)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        tunnel.close(proc)
        _echo("tunnel closed")
        return
    err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
    raise JobError(f"the tunnel closed (ssh exit {code}): {' '.join(err.split())[-200:]}")


def status_row(record: Record, *, idle: bool) -> dict[str, Any]:
    live = _live(record)
    row: dict[str, Any] = {
        "name": record.name,
        "cloud": record.cloud,
        "location": record.location,
        "storage": record.storage,
    }
    if live is None:
        return {**row, "state": "DELETED", "running": False}
    row.update(live)
    started = _utc(live["started"])
    if live["running"] and started:
        uptime = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
        row["uptime_s"] = int(uptime)
        if live["hourly_price"] is not None:
            row["cost_usd"] = round(live["hourly_price"] * uptime / 3600, 2)
        if idle and live["address"]:
            seen = tunnel.idle_state(
                record.name,
                Path(record.ssh_key),
                f"{login_user(record.ssh_user)}@{live['address']}",
            )
            if seen:
                row["idle_s"] = seen.get("idle_s")
                row["stop_at"] = seen.get("stop_at")
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    shown = [
        {
            "name": r["name"],
            "cloud": r["cloud"],
            "state": r["state"],
            "gpu": r.get("gpu", "-"),
            "machine": r.get("machine_type", "-"),
            "uptime": runtime_text(r["uptime_s"]) if "uptime_s" in r else "-",
            "idle": runtime_text(r["idle_s"]) if r.get("idle_s") is not None else "-",
            "cost": f"${r['cost_usd']:.2f}" if r.get("cost_usd") is not None else "-",
        }
        for r in rows
    ]
    return table(shown, ("name", "cloud", "state", "gpu", "machine", "uptime", "idle", "cost"))


def _notebook_options(kw: dict[str, Any]) -> NotebookOptions:
    idle = _duration(kw["idle_stop"], "--idle-stop")
    return NotebookOptions(
        name=check_name(kw["name"]),
        cloud=kw["cloud"],
        gpu=kw["gpu"],
        gpu_count=kw["gpu_count"],
        spot=kw["spot"],
        stack=kw["stack"],
        image=kw["image"],
        machine_type=kw["machine_type"],
        project=kw["project"],
        zone=kw["zone"],
        region=kw["region"],
        profile=kw["profile"],
        storage_gb=kw["storage_size"],
        idle_stop_s=idle if idle is not None else 3600,
        max_run_s=_duration(kw["max_run"], "--max-run") or None,
        ssh_key=kw["ssh_key"] or "",
        ssh_user=kw["ssh_user"],
        ssh_from=check_cidr(kw["ssh_from"]),
        service_account=kw["service_account"],
    )


def register(group: click.Group) -> None:
    """Add the commands of `gpubake notebook`."""

    @group.command(name="up")
    @click.argument("name")
    @click.option("--cloud", type=click.Choice(launch.CLOUDS), required=True)
    @click.option("--project", metavar="ID", help="GCP: project (or GOOGLE_CLOUD_PROJECT).")
    @click.option("--zone", metavar="ZONE", help="GCP: zone; AWS: availability zone to pin.")
    @click.option("--region", metavar="REGION", help="AWS: region (or AWS_REGION).")
    @click.option("--profile", metavar="NAME", help="AWS: credentials profile.")
    @click.option(
        "--gpu", default=launch.DEFAULT_GPU, show_default=True, help="GPU model (gpus.yml)."
    )
    @click.option("--gpu-count", type=click.IntRange(1, 16), default=1, show_default=True)
    @click.option("--machine-type", metavar="TYPE", help="Default: the GPU's smallest.")
    @click.option("--spot/--no-spot", default=True, show_default=True, help="Spot capacity.")
    @click.option("--stack", default=launch.DEFAULT_STACK, show_default=True)
    @click.option("--image", help="GCP: image or family; AWS: AMI id (default: newest of --stack).")
    @click.option(
        "--storage-size",
        type=click.IntRange(10, 65536),
        default=DEFAULT_STORAGE_GB,
        show_default=True,
        metavar="GB",
        help="The /storage disk, made on the first `up` and kept by `down`.",
    )
    @click.option(
        "--idle-stop",
        metavar="DURATION",
        default="60m",
        show_default=True,
        help="Power off after this long with no kernel busy, no terminal input and no open "
        "browser tab; `off` never.",
    )
    @click.option("--max-run", metavar="DURATION", help="Power off this long after each start.")
    @click.option(
        "--ssh-key",
        metavar="PATH",
        type=click.Path(dir_okay=False),
        help="Your private key (its .pub beside it). Default: ~/.ssh/id_ed25519, id_ecdsa, id_rsa.",
    )
    @click.option(
        "--ssh-user",
        help="The login (default: the user JupyterLab runs as); GCP with OS Login: your OS "
        "Login user name.",
    )
    @click.option(
        "--ssh-from",
        metavar="CIDR",
        default="0.0.0.0/0",
        show_default=True,
        help="AWS: who may reach SSH (the security group gpubake-notebook-ssh, made once).",
    )
    @click.option(
        "--service-account",
        metavar="EMAIL",
        default="default",
        show_default=True,
        help="GCP: the VM's service account.",
    )
    @click.option("--dry-run", is_flag=True, help="Print the exact requests; no cloud access.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
    def up_cmd(dry_run: bool, as_json: bool, **kw: Any) -> None:
        """Start notebook NAME: a GPU VM from the gpubake image with JupyterLab (127.0.0.1 only,
        with a token), a persistent disk at /storage (shown as `storage` in the notebook
        root), your SSH key, and a watcher that powers it off when idle. A stopped notebook is
        started again; its disk is the same.

        \b
        Examples:
          gpubake notebook up fastai --cloud gcp --project my-proj --zone us-central1-a --gpu t4
          gpubake notebook up d2l --cloud aws --region us-east-1 --gpu a10g --idle-stop 30m
        """
        up(_notebook_options(kw), dry_run=dry_run, as_json=as_json)

    @group.command(name="connect")
    @click.argument("name")
    @click.option(
        "--port",
        type=click.IntRange(0, 65535),
        default=8888,
        show_default=True,
        help="The local port (another free one if it is taken).",
    )
    @click.option("--open", "open_browser", is_flag=True, help="Open the URL in the browser.")
    @click.option("--json", "as_json", is_flag=True, help="Print the URL as JSON.")
    def connect_cmd(name: str, port: int, open_browser: bool, as_json: bool) -> None:
        """Open an SSH tunnel to notebook NAME's JupyterLab and print its URL with the token;
        Ctrl-C closes the tunnel (not the VM). The VM's host key is learned on the first
        connection and checked on every later one."""
        connect(name, port=port, open_browser=open_browser, as_json=as_json)

    @group.command(name="status")
    @click.argument("name")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
    def status_cmd(name: str, as_json: bool) -> None:
        """State, GPU, uptime, idle time (from the VM's watcher) and cost so far (where the
        cloud gives a price) of notebook NAME."""
        row = status_row(find_record(name), idle=True)
        click.echo(json.dumps(row) if as_json else _table([row]))

    @group.command(name="list")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
    def list_cmd(as_json: bool) -> None:
        """The notebooks started from this machine, with their state."""
        rows = [status_row(r, idle=False) for r in records()]
        click.echo(json.dumps(rows) if as_json else _table(rows))

    @group.command(name="stop")
    @click.argument("name")
    def stop_cmd(name: str) -> None:
        """Stop notebook NAME's VM (its disks are kept; `notebook up NAME` starts it again)."""
        _client(find_record(name).options()).stop()
        _echo(f"notebook {name} stopped: only its disks cost now")

    @group.command(name="down")
    @click.argument("name")
    @click.option("--delete-storage", is_flag=True, help="Delete the /storage disk too.")
    def down_cmd(name: str, delete_storage: bool) -> None:
        """Delete notebook NAME's VM; its /storage disk is kept (the next `up` mounts it)
        unless --delete-storage."""
        record = find_record(name)
        client = _client(record.options())
        existed = client.delete(storage=delete_storage)
        record.forget()
        kept = "deleted" if delete_storage else f"kept ({record.storage})"
        _echo(f"notebook {name}: VM {'deleted' if existed else 'was gone'}; storage {kept}")
