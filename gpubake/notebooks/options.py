"""What `notebook up` takes (NotebookOptions), the names of what it makes in the cloud, the
user's SSH key, and the local record `connect|status|stop|down` find a notebook by."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from gpubake.jobs.launch import DEFAULT_GPU, DEFAULT_STACK, JobError, JobOptions, state_dir
from gpubake.resources import data_root

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")
#: Label / tag keys on a notebook's VM and disk.
NOTEBOOK_LABEL = "gpubake-notebook"  # the notebook's name, on the VM
STORAGE_LABEL = "gpubake-notebook-storage"  # the notebook's name, on its /storage disk
IDLE_LABEL = "gpubake-idle-stop"  # seconds; 0: none
MAX_RUN_LABEL = "gpubake-max-run"  # seconds; absent: none
DEFAULT_STORAGE_GB = 100
DEFAULT_IDLE_STOP_S = 3600
#: The user's keys tried in this order when --ssh-key is not given (ssh's own defaults).
DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")


@functools.cache
def jupyter() -> dict[str, Any]:
    """The jupyter role's defaults (roles/jupyter/defaults/main.yml), templates rendered:
    the VM's JupyterLab user (`connect`'s login), port, token file and notebook root."""
    path = data_root() / "roles" / "jupyter" / "defaults" / "main.yml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)  # noqa: S701
    return {k: env.from_string(v).render(raw) if isinstance(v, str) else v for k, v in raw.items()}


def login_user(ssh_user: str | None) -> str:
    """--ssh-user, else the user JupyterLab runs as."""
    return ssh_user or str(jupyter()["jupyter_user"])


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise JobError(
            f"notebook name {name!r}: use 1-32 lowercase letters, digits and '-', starting with "
            "a letter (it names the VM and its disk)"
        )
    return name


def instance_name(name: str) -> str:
    """The VM's name (GCE) / Name tag (EC2)."""
    return f"gpubake-nb-{name}"


def storage_name(name: str) -> str:
    """The /storage disk's name (GCE) / Name tag (EBS volume)."""
    return f"gpubake-nb-{name}-storage"


@dataclass(frozen=True)
class NotebookOptions:
    """What the user asked `notebook up` for."""

    name: str
    cloud: str  # gcp | aws
    gpu: str = DEFAULT_GPU
    gpu_count: int = 1
    spot: bool = True
    stack: str = DEFAULT_STACK
    image: str | None = None
    machine_type: str | None = None
    project: str | None = None
    zone: str | None = None
    region: str | None = None
    profile: str | None = None
    storage_gb: int = DEFAULT_STORAGE_GB
    idle_stop_s: int = DEFAULT_IDLE_STOP_S  # 0: never stops for idleness
    max_run_s: int | None = None
    ssh_key: str = ""  # the private key; its public half is SSH_KEY.pub
    ssh_user: str | None = None  # None: JupyterLab's user; GCP with OS Login: the OS Login one
    ssh_from: str = "0.0.0.0/0"  # AWS: the addresses the SSH security group lets in
    service_account: str = "default"

    def job_options(self) -> JobOptions:
        """The same choices as a job's, for the checks `job run` makes (image, GPU, machine)."""
        return JobOptions(
            cloud=self.cloud,
            results="",
            command=("jupyter",),
            gpu=self.gpu,
            gpu_count=self.gpu_count,
            spot=self.spot,
            stack=self.stack,
            image=self.image,
            machine_type=self.machine_type,
            project=self.project,
            zone=self.zone,
            region=self.region,
            profile=self.profile,
            name=self.name,
            service_account=self.service_account,
        )

    def settled(self, job: JobOptions) -> NotebookOptions:
        """With the location the job options were settled to."""
        return dataclasses.replace(
            self, project=job.project, zone=job.zone, region=job.region, profile=job.profile
        )

    def watcher_config(self) -> dict[str, Any]:
        """The idle watcher's settings (idle_watch.py reads them from /etc/gpubake)."""
        return {
            "name": self.name,
            "cloud": self.cloud,
            "jupyter_url": f"http://127.0.0.1:{jupyter()['jupyter_port']}",
            "token_file": jupyter()["jupyter_token_file"],
            "idle_stop_s": self.idle_stop_s,
            "max_run_s": self.max_run_s,
        }

    def labels(self) -> dict[str, str]:
        labels = {NOTEBOOK_LABEL: self.name, IDLE_LABEL: str(self.idle_stop_s)}
        if self.max_run_s:
            labels[MAX_RUN_LABEL] = str(self.max_run_s)
        return labels


def check_cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise JobError(
            f"--ssh-from {text!r} is not an address range: write e.g. 203.0.113.7/32"
        ) from None


def find_key(given: str | None) -> tuple[Path, str]:
    """The private key and the text of its public half (one line)."""
    if given:
        candidates = [Path(given).expanduser()]
    else:
        ssh = Path.home() / ".ssh"
        candidates = [ssh / n for n in DEFAULT_KEYS if (ssh / n).is_file()]
        if not candidates:
            raise JobError(
                "no SSH key in ~/.ssh (id_ed25519, id_ecdsa, id_rsa): make one with "
                "`ssh-keygen -t ed25519`, or pass --ssh-key PATH"
            )
    key = candidates[0]
    public = key.with_name(key.name + ".pub")
    if not key.is_file():
        raise JobError(f"--ssh-key {key}: no such file: give the private key's path")
    if not public.is_file():
        raise JobError(
            f"--ssh-key {key}: its public half {public} is missing: write it with "
            f"`ssh-keygen -y -f {key} > {public}`"
        )
    text = " ".join(public.read_text(encoding="utf-8").split())
    if not text.startswith(("ssh-", "ecdsa-", "sk-")):
        raise JobError(f"{public} is not an OpenSSH public key (ssh-ed25519 AAAA...)")
    return key, text


# ------------------------------------------------------------------------------- records


def notebooks_dir() -> Path:
    """Where notebooks started from this machine are recorded, beside the jobs."""
    return state_dir().parent / "notebooks"


def known_hosts() -> Path:
    """The host keys `connect` learned (one per notebook, under its HostKeyAlias)."""
    return notebooks_dir() / "known_hosts"


@dataclass(frozen=True)
class Record:
    """What `notebook connect|status|stop|down` need to find a notebook again."""

    name: str
    cloud: str
    location: str  # project/zone | region
    instance: str  # GCE instance name | EC2 instance id
    storage: str  # GCE disk name | EBS volume id
    ssh_key: str
    ssh_user: str | None = None  # as NotebookOptions.ssh_user
    profile: str | None = None
    gpu: str = DEFAULT_GPU
    created: str = ""

    def save(self) -> Path:
        path = notebooks_dir() / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    def forget(self) -> None:
        (notebooks_dir() / f"{self.name}.json").unlink(missing_ok=True)
        forget_host_key(self.name)

    def options(self) -> NotebookOptions:
        project, _, zone = self.location.partition("/")
        if self.cloud == "gcp":
            where = {"project": project, "zone": zone}
        else:
            where = {"region": self.location}
        return NotebookOptions(
            name=self.name,
            cloud=self.cloud,
            gpu=self.gpu,
            profile=self.profile,
            ssh_key=self.ssh_key,
            ssh_user=self.ssh_user,
            **where,
        )


def records() -> list[Record]:
    found = []
    for path in sorted(notebooks_dir().glob("*.json")):
        try:
            found.append(Record(**json.loads(path.read_text(encoding="utf-8"))))
        except (ValueError, TypeError):
            continue
    return found


def find_record(name: str) -> Record:
    path = notebooks_dir() / f"{name}.json"
    if not path.is_file():
        known = ", ".join(r.name for r in records()) or "none"
        raise JobError(
            f"no notebook {name!r} was started from this machine (known: {known}): start it "
            f"with `gpubake notebook up {name} --cloud ...`"
        )
    return Record(**json.loads(path.read_text(encoding="utf-8")))


def host_alias(name: str) -> str:
    return f"gpubake-notebook-{name}"


def forget_host_key(name: str) -> None:
    """A VM made again has a new host key: drop the old one (`down` deletes the VM)."""
    path = known_hosts()
    if not path.is_file():
        return
    alias = host_alias(name)
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.split(" ", 1)[0] != alias
    ]
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    path.chmod(0o600)
