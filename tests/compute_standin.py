"""A loopback stand-in of the Compute Engine REST API v1 (no emulator of it exists), enough for
gpubake.jobs.gcp, following the documented API (https://cloud.google.com/compute/docs/reference/rest/v1):

- paths under /compute/v1/projects/{project}/: global/images (GET list), global/images/{image},
  global/images/family/{family} (the newest READY, not deprecated image of the family),
  zones/{zone}/acceleratorTypes/{name}, zones/{zone}/machineTypes/{name},
  zones/{zone}/disks/{name}, zones/{zone}/instances (GET list, POST insert),
  zones/{zone}/instances/{name} (GET, DELETE), zones/{zone}/instances/{name}/stop and /start
  (POST), zones/{zone}/disks (GET list), zones/{zone}/disks/{name} (DELETE: refused while
  attached), aggregated/instances,
  the project itself (GET: commonInstanceMetadata, e.g. enable-oslogin), regions/{region}
  (GET: the quotas a test set),
  zones/{zone}/operations/{op} (GET) and .../{op}/wait (POST);
- writes answer with a zonal Operation in status RUNNING; operations.get and .wait answer it
  DONE (with `error` and `httpErrorStatusCode` where a test asked an insert to fail that way);
- a missing resource is 404 and a refused request 400/409, with Google's JSON error shape
  {"error": {"code", "message", "errors": [{"message", "domain", "reason"}]}};
- `filter` takes what the API documents for label filters: one expression or several in
  parentheses (ANDed, an explicit AND allowed), each `FIELD = VALUE`, `FIELD != VALUE` or
  `FIELD:*` (the field is set), FIELD being `labels.KEY`, `name` or `status`; anything else is
  400 "Invalid list filter expression";
- lists page with maxResults (at most `page_size`) and nextPageToken;
- insert checks what GCE checks and gpubake could get wrong: the instance name and labels, the
  machine type, the accelerator type and count, onHostMaintenance TERMINATE with GPUs,
  instanceTerminationAction with maxRunDuration, the boot disk's image, the attached disks
  (a disk in use read-write, or attached read-write while in use, is refused), and makes the
  non-boot disks given by initializeParams.diskName (an existing name is 409);
- a VM with an accessConfig gets a natIP (`nat_ip`, default from 203.0.113.0/24) and a
  lastStartTimestamp at insert and start.

Every request is recorded (method, path, query, JSON body) in `requests`. State is kept in memory,
so an instance inserted is listed, stopped and deleted after. A stop leaves the instance
STOPPING for `stop_lag` GETs of it after its operation is DONE, then TERMINATED.

    with compute_standin() as gce:
        gce.add_image("demo-proj", "gpubake-pytorch-v1", family="gpubake-pytorch", labels={...})
        client = compute_v1.InstancesClient(
            credentials=AnonymousCredentials(), client_options=ClientOptions(api_endpoint=gce.url)
        )
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import itertools
import json
import re
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

API = "https://www.googleapis.com/compute/v1/"
PREFIX = "/compute/v1/projects/"
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
_EXPR = re.compile(r'^\s*([A-Za-z][\w.-]*)\s*(!=|=|:)\s*("(?:[^"\\]|\\.)*"|[^\s()"]+)\s*$')
_STOPPED = ("STOPPING", "TERMINATED")


@dataclass(frozen=True)
class Recorded:
    """One request as it reached the server."""

    method: str
    path: str
    query: dict[str, str]
    body: Any  # the decoded JSON body, None without one

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


class ApiError(Exception):
    def __init__(self, code: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "errors": [{"message": self.message, "domain": "global", "reason": self.reason}],
            }
        }


def _not_found(path: str) -> ApiError:
    return ApiError(404, f"The resource '{path}' was not found", "notFound")


def _invalid(message: str) -> ApiError:
    return ApiError(400, message, "invalid")


def _timestamp() -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "-00:00")


_disk_ids = itertools.count(5000)


def _disk(
    project: str, zone: str, name: str, size_gb: int, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    zone_url = f"{API}projects/{project}/zones/{zone}"
    return {
        "kind": "compute#disk",
        "id": str(next(_disk_ids)),
        "name": name,
        "sizeGb": str(size_gb),
        "zone": zone_url,
        "status": "READY",
        "type": f"{zone_url}/diskTypes/pd-balanced",
        "selfLink": f"{zone_url}/disks/{name}",
        "labels": dict(labels or {}),
    }


def _tail(url: str, kind: str) -> tuple[str | None, str | None, str]:
    """A full or partial URL of a zonal / global resource -> (project, zone, name)."""
    text = url.removeprefix(API)
    match = re.match(
        rf"^(?:projects/(?P<project>[^/]+)/)?(?:zones/(?P<zone>[^/]+)/)?{kind}/(?P<name>[^/]+)$",
        text,
    )
    if not match:
        raise _invalid(f"Invalid value '{url}'. Values must match the pattern of a {kind} URL.")
    return match["project"], match["zone"], match["name"]


class ComputeState:
    """What the server knows; every access under `lock`."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.requests: list[Recorded] = []
        self.images: dict[tuple[str, str], dict[str, Any]] = {}
        self.accelerator_types: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.machine_types: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.disks: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.instances: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.operations: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.attach_modes: dict[tuple[str, str, str], dict[str, str]] = {}  # disk -> user: mode
        self.stopping: dict[tuple[str, str, str], int] = {}  # instance -> GETs left STOPPING
        self.insert_errors: list[dict[str, Any]] = []
        self.stop_lag = 0
        self.page_size = 500
        self.project_metadata: dict[str, list[dict[str, str]]] = {}
        self.quotas: dict[tuple[str, str], list[dict[str, Any]]] = {}  # (project, region)
        self.nat_ip: str | None = None
        self.ids = itertools.count(1000)

    # -- resources -------------------------------------------------------------------

    def image(self, project: str, name: str) -> dict[str, Any]:
        found = self.images.get((project, name))
        if found is None:
            raise _not_found(f"projects/{project}/global/images/{name}")
        return found

    def family(self, project: str, family: str) -> dict[str, Any]:
        usable = [
            i
            for (p, _), i in self.images.items()
            if p == project
            and i.get("family") == family
            and i.get("status") == "READY"
            and "deprecated" not in i
        ]
        if not usable:
            raise _not_found(f"projects/{project}/global/images/family/{family}")
        return max(usable, key=lambda i: (i["creationTimestamp"], int(i["id"])))

    def source_image(self, url: str, project: str) -> dict[str, Any]:
        text = url.removeprefix(API)
        match = re.match(r"^(?:projects/([^/]+)/)?global/images/(family/)?([^/]+)$", text)
        if not match:
            raise _invalid(f"Invalid value for field 'resource.disks[0].initializeParams': '{url}'")
        where = match[1] or project
        return self.family(where, match[3]) if match[2] else self.image(where, match[3])

    def zonal(self, table: dict, kind: str, project: str, zone: str, name: str) -> dict[str, Any]:
        found = table.get((project, zone, name))
        if found is None:
            raise _not_found(f"projects/{project}/zones/{zone}/{kind}/{name}")
        return found

    def instance(self, project: str, zone: str, name: str) -> dict[str, Any]:
        found = self.zonal(self.instances, "instances", project, zone, name)
        key = (project, zone, name)
        if key in self.stopping:  # a stop that completes after a few looks
            if self.stopping[key] <= 0:
                del self.stopping[key]
                found["status"] = "TERMINATED"
            else:
                self.stopping[key] -= 1
        return found

    # -- operations ------------------------------------------------------------------

    def operation(
        self, project: str, zone: str, kind: str, target: str, error: dict | None = None
    ) -> dict[str, Any]:
        number = next(self.ids)
        name = f"operation-{number}-{kind}"
        zone_url = f"{API}projects/{project}/zones/{zone}"
        op = {
            "kind": "compute#operation",
            "id": str(number),
            "name": name,
            "zone": zone_url,
            "operationType": kind,
            "targetLink": f"{zone_url}/instances/{target}",
            "status": "RUNNING",
            "progress": 0,
            "insertTime": _timestamp(),
            "startTime": _timestamp(),
            "selfLink": f"{zone_url}/operations/{name}",
        }
        self.operations[(project, zone, name)] = op
        if error:
            op["_error"] = error
        return copy.deepcopy({k: v for k, v in op.items() if not k.startswith("_")})

    def finish(self, project: str, zone: str, name: str) -> dict[str, Any]:
        op = self.zonal(self.operations, "operations", project, zone, name)
        if op["status"] != "DONE":
            op.update(status="DONE", progress=100, endTime=_timestamp())
            error = op.pop("_error", None)
            if error:
                op["error"] = {"errors": [{"code": error["code"], "message": error["message"]}]}
                op["httpErrorStatusCode"] = error["http_status"]
                op["httpErrorMessage"] = error["http_message"]
                # the failed insert's instance never comes to be
                self.instances.pop((project, zone, op["targetLink"].rsplit("/", 1)[1]), None)
            if op["operationType"] == "stop":
                key = (project, zone, op["targetLink"].rsplit("/", 1)[1])
                if key in self.instances and self.stop_lag == 0:
                    self.instances[key]["status"] = "TERMINATED"
                    self.stopping.pop(key, None)
        return copy.deepcopy(op)

    # -- instances -------------------------------------------------------------------

    def listed(self, project: str, zone: str | None, flt: str) -> list[dict[str, Any]]:
        test = _parse_filter(flt)
        return [
            i
            for (p, z, _), i in sorted(self.instances.items())
            if p == project and (zone is None or z == zone) and test(i)
        ]

    def insert(self, project: str, zone: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name", "")
        if not _NAME.match(name):
            raise _invalid(
                f"Invalid value for field 'resource.name': '{name}'. Must be a match of regex "
                "'(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'"
            )
        key = (project, zone, name)
        if key in self.instances:
            raise ApiError(
                409,
                f"The resource 'projects/{project}/zones/{zone}/instances/{name}' already exists",
                "alreadyExists",
            )
        for label, value in body.get("labels", {}).items():
            if not _LABEL_KEY.match(label) or not _LABEL_VALUE.match(value):
                raise _invalid(f"Invalid value for field 'resource.labels': '{label}={value}'")
        zone_url = f"{API}projects/{project}/zones/{zone}"
        instance = copy.deepcopy(body)

        mt_project, mt_zone, mt_name = _tail(body.get("machineType", ""), "machineTypes")
        same_zone = (mt_project or project, mt_zone or zone) == (project, zone)
        if not same_zone or (project, zone, mt_name) not in self.machine_types:
            raise _invalid(
                f"Invalid value for field 'resource.machineType': '{body.get('machineType')}'. "
                f"Machine type with name '{mt_name}' does not exist in zone '{zone}'."
            )
        instance["machineType"] = f"{zone_url}/machineTypes/{mt_name}"

        scheduling = body.get("scheduling", {})
        for index, acc in enumerate(instance.get("guestAccelerators", [])):
            _, acc_zone, acc_name = _tail(acc.get("acceleratorType", ""), "acceleratorTypes")
            known = self.accelerator_types.get((project, acc_zone or zone, acc_name))
            if known is None or (acc_zone or zone) != zone:
                raise _invalid(
                    f"Invalid value for field 'resource.guestAccelerators[{index}]"
                    f".acceleratorType': '{acc.get('acceleratorType')}'. Accelerator type "
                    f"'{acc_name}' does not "
                    f"exist in zone {zone}."
                )
            count = int(acc.get("acceleratorCount", 0))
            if not 1 <= count <= known["maximumCardsPerInstance"]:
                raise _invalid(
                    f"Invalid value for field 'resource.guestAccelerators[{index}]"
                    f".acceleratorCount': {count}."
                )
            if scheduling.get("onHostMaintenance") != "TERMINATE":
                raise _invalid("Instances with guest accelerators do not support live migration.")
            acc["acceleratorType"] = f"{zone_url}/acceleratorTypes/{acc_name}"
        if scheduling.get("maxRunDuration") and not scheduling.get("instanceTerminationAction"):
            raise _invalid(
                "Invalid value for field 'resource.scheduling.instanceTerminationAction': ''. "
                "Must be set when maxRunDuration is set."
            )

        disks = body.get("disks", [])
        if sum(bool(d.get("boot")) for d in disks) != 1:
            raise _invalid("Invalid value for field 'resource.disks': exactly one boot disk")
        attach: list[tuple[tuple[str, str, str], str]] = []
        for index, disk in enumerate(disks):
            if disk.get("boot"):
                params = disk.get("initializeParams", {})
                image = self.source_image(params.get("sourceImage", ""), project)
                size = int(params.get("diskSizeGb", image["diskSizeGb"]))
                if size < int(image["diskSizeGb"]):
                    raise _invalid(
                        f"Requested disk size cannot be smaller than the image size "
                        f"({image['diskSizeGb']} GB)"
                    )
                instance["disks"][index]["source"] = f"{zone_url}/disks/{name}"
                continue
            params = disk.get("initializeParams")
            if params and not disk.get("source"):
                made = params.get("diskName", "")
                if (project, zone, made) in self.disks:
                    raise ApiError(
                        409,
                        f"The resource 'projects/{project}/zones/{zone}/disks/{made}' already "
                        "exists",
                        "alreadyExists",
                    )
                self.disks[(project, zone, made)] = _disk(
                    project, zone, made, int(params.get("diskSizeGb", 10)), params.get("labels")
                )
                disk = instance["disks"][index] = {
                    k: v for k, v in disk.items() if k != "initializeParams"
                }
                disk["source"] = f"{zone_url}/disks/{made}"
            d_project, d_zone, d_name = _tail(disk.get("source", ""), "disks")
            dkey = (d_project or project, d_zone or zone, d_name)
            self.zonal(self.disks, "disks", *dkey)
            mode = disk.get("mode", "READ_WRITE")
            modes = self.attach_modes.get(dkey, {})
            if modes and (mode != "READ_ONLY" or "READ_WRITE" in modes.values()):
                user = next(iter(modes)).removeprefix(API)
                raise _invalid(
                    f"The disk resource 'projects/{dkey[0]}/zones/{dkey[1]}/disks/{d_name}' is "
                    f"already being used by '{user}'"
                )
            attach.append((dkey, mode))
            instance["disks"][index]["source"] = (
                f"{API}projects/{dkey[0]}/zones/{dkey[1]}/disks/{d_name}"
            )

        error = self.insert_errors.pop(0) if self.insert_errors else None
        number = next(self.ids)
        instance.update(
            kind="compute#instance",
            id=str(number),
            status="RUNNING",
            creationTimestamp=_timestamp(),
            zone=zone_url,
            selfLink=f"{zone_url}/instances/{name}",
            lastStartTimestamp=_timestamp(),
        )
        for nic in instance.get("networkInterfaces", []):
            for config in nic.get("accessConfigs", []):
                config["natIP"] = self.nat_ip or f"203.0.113.{number % 250 + 1}"
        self.instances[key] = instance
        for dkey, mode in attach:
            self.attach(dkey, instance["selfLink"], mode)
        return self.operation(project, zone, "insert", name, error)

    def attach(self, disk: tuple[str, str, str], user: str, mode: str) -> None:
        self.attach_modes.setdefault(disk, {})[user] = mode
        self.disks[disk]["users"] = list(self.attach_modes[disk])

    def detach_all(self, user: str) -> None:
        for disk, modes in self.attach_modes.items():
            if modes.pop(user, None):
                self.disks[disk]["users"] = list(modes)
                if not modes:
                    del self.disks[disk]["users"]

    def stop(self, project: str, zone: str, name: str) -> dict[str, Any]:
        instance = self.zonal(self.instances, "instances", project, zone, name)
        if instance["status"] != "TERMINATED":
            instance["status"] = "STOPPING"
            if self.stop_lag:
                self.stopping[(project, zone, name)] = self.stop_lag
        return self.operation(project, zone, "stop", name)

    def start(self, project: str, zone: str, name: str) -> dict[str, Any]:
        instance = self.zonal(self.instances, "instances", project, zone, name)
        if instance["status"] != "RUNNING":
            instance.update(status="RUNNING", lastStartTimestamp=_timestamp())
            self.stopping.pop((project, zone, name), None)
        return self.operation(project, zone, "start", name)

    def delete_disk(self, project: str, zone: str, name: str) -> dict[str, Any]:
        disk = self.zonal(self.disks, "disks", project, zone, name)
        if disk.get("users"):
            user = disk["users"][0].removeprefix(API)
            raise ApiError(
                400,
                f"The disk resource 'projects/{project}/zones/{zone}/disks/{name}' is already "
                f"being used by '{user}'",
                "resourceInUseByAnotherResource",
            )
        del self.disks[(project, zone, name)]
        return self.operation(project, zone, "delete", name)

    def delete(self, project: str, zone: str, name: str) -> dict[str, Any]:
        instance = self.zonal(self.instances, "instances", project, zone, name)
        del self.instances[(project, zone, name)]
        self.stopping.pop((project, zone, name), None)
        self.detach_all(instance["selfLink"])
        return self.operation(project, zone, "delete", name)


def _parse_filter(text: str):
    """The API's list filter (the subset its docs show for labels) -> a predicate."""
    text = text.strip()
    if not text:
        return lambda _: True
    bad = _invalid(f"Invalid value for field 'filter': '{text}'. Invalid list filter expression.")
    if text.startswith("("):
        parts = re.findall(r"\(([^()]*)\)|(\S+)", text)
        exprs = [inner for inner, word in parts if not word]
        if any(word and word != "AND" for _, word in parts):
            raise bad
    else:
        exprs = [text]
    tests = []
    for expr in exprs:
        match = _EXPR.match(expr)
        if not match:
            raise bad
        field, op, value = match.groups()
        if value.startswith('"'):
            value = json.loads(value)
        if op == ":" and value != "*":
            raise bad
        tests.append((field, op, value))

    def get(instance: dict[str, Any], field: str) -> str | None:
        if field.startswith("labels."):
            return instance.get("labels", {}).get(field[len("labels.") :])
        if field in ("name", "status"):
            return instance.get(field)
        raise bad

    def test(instance: dict[str, Any]) -> bool:
        for field, op, value in tests:
            found = get(instance, field)
            if (op == ":" and found is None) or (op == "=" and found != value):
                return False
            if op == "!=" and found == value:
                return False
        return True

    return test


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    def _handle(self) -> None:
        state = self.server.state
        url = urllib.parse.urlsplit(self.path)
        query = {
            k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()
        }
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self._send(400, _invalid("Invalid JSON payload received.").body())
            return
        with state.lock:
            state.requests.append(Recorded(self.command, url.path, query, body))
            try:
                status, answer = 200, self._route(state, self.command, url.path, query, body)
            except ApiError as exc:
                status, answer = exc.code, exc.body()
        self._send(status, answer)

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    @staticmethod
    def _route(
        state: ComputeState, method: str, path: str, query: dict[str, str], body: Any
    ) -> dict[str, Any]:
        if not path.startswith(PREFIX):
            raise _not_found(path)
        parts = path[len(PREFIX) :].split("/")
        project, rest = parts[0], parts[1:]
        route = (method, *rest)
        match route:
            case ("GET",):
                with state.lock:
                    items = copy.deepcopy(state.project_metadata.get(project, []))
                return {
                    "kind": "compute#project",
                    "name": project,
                    "commonInstanceMetadata": {"kind": "compute#metadata", "items": items},
                }
            case ("GET", "global", "images"):
                test = _parse_filter(query.get("filter", ""))
                with state.lock:
                    found = [
                        copy.deepcopy(image)
                        for (p, _), image in sorted(state.images.items())
                        if p == project and test(image)
                    ]
                return _page(found, query, state.page_size, "compute#imageList", "global")
            case ("GET", "global", "images", "family", family):
                return state.family(project, family)
            case ("GET", "global", "images", name):
                return state.image(project, name)
            case ("GET", "regions", region):
                with state.lock:
                    quotas = copy.deepcopy(state.quotas.get((project, region), []))
                return {"kind": "compute#region", "name": region, "status": "UP",
                        "quotas": quotas}  # fmt: skip
            case ("GET", "zones", zone, "acceleratorTypes", name):
                return state.zonal(state.accelerator_types, "acceleratorTypes", project, zone, name)
            case ("GET", "zones", zone, "machineTypes", name):
                return state.zonal(state.machine_types, "machineTypes", project, zone, name)
            case ("GET", "zones", zone, "disks", name):
                return state.zonal(state.disks, "disks", project, zone, name)
            case ("GET", "zones", zone, "instances"):
                found = state.listed(project, zone, query.get("filter", ""))
                return _page(found, query, state.page_size, "compute#instanceList", zone)
            case ("GET", "aggregated", "instances"):
                found = state.listed(project, None, query.get("filter", ""))
                items: dict[str, Any] = {}
                for inst in found:
                    where = "zones/" + inst["zone"].rsplit("/", 1)[1]
                    items.setdefault(where, {"instances": []})["instances"].append(inst)
                return {
                    "kind": "compute#instanceAggregatedList",
                    "id": f"projects/{project}/aggregated/instances",
                    "items": items,
                }
            case ("POST", "zones", zone, "instances"):
                if not isinstance(body, dict):
                    raise _invalid("Required field 'resource' not specified")
                return state.insert(project, zone, body)
            case ("GET", "zones", zone, "instances", name):
                return state.instance(project, zone, name)
            case ("POST", "zones", zone, "instances", name, "stop"):
                return state.stop(project, zone, name)
            case ("POST", "zones", zone, "instances", name, "start"):
                return state.start(project, zone, name)
            case ("GET", "zones", zone, "disks"):
                test = _parse_filter(query.get("filter", ""))
                with state.lock:
                    found = [
                        copy.deepcopy(d)
                        for (p, z, _), d in sorted(state.disks.items())
                        if (p, z) == (project, zone) and test(d)
                    ]
                return _page(found, query, state.page_size, "compute#diskList", zone)
            case ("DELETE", "zones", zone, "disks", name):
                return state.delete_disk(project, zone, name)
            case ("DELETE", "zones", zone, "instances", name):
                return state.delete(project, zone, name)
            case ("GET", "zones", zone, "operations", name):
                return state.finish(project, zone, name)
            case ("POST", "zones", zone, "operations", name, "wait"):
                return state.finish(project, zone, name)
        raise _not_found(path)


def _page(
    items: list[dict[str, Any]], query: dict[str, str], page_size: int, kind: str, zone: str
) -> dict[str, Any]:
    size = min(int(query.get("maxResults") or 500), page_size)
    start = int(query.get("pageToken") or 0)
    answer: dict[str, Any] = {
        "kind": kind,
        "id": f"zones/{zone}/instances",
        "items": items[start : start + size],
    }
    if start + size < len(items):
        answer["nextPageToken"] = str(start + size)
    return answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ComputeState


class ComputeStandin:
    """The running server: `url` (http://host:port, the client's api_endpoint), `state`, and
    the set-up and inspection helpers tests use."""

    def __init__(self, server: _Server) -> None:
        host, port = server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self.state = server.state

    # -- set-up ----------------------------------------------------------------------

    def add_image(
        self,
        project: str,
        name: str,
        *,
        family: str | None = None,
        labels: dict[str, str] | None = None,
        disk_size_gb: int = 30,
        status: str = "READY",
    ) -> dict[str, Any]:
        with self.state.lock:
            image = {
                "kind": "compute#image",
                "id": str(next(self.state.ids)),
                "name": name,
                "creationTimestamp": _timestamp(),
                "selfLink": f"{API}projects/{project}/global/images/{name}",
                "status": status,
                "diskSizeGb": str(disk_size_gb),
                "architecture": "X86_64",
                "labels": dict(labels or {}),
            }
            if family:
                image["family"] = family
            self.state.images[(project, name)] = image
            return image

    def add_accelerator_type(
        self, project: str, zone: str, name: str, *, max_cards: int = 4
    ) -> None:
        zone_url = f"{API}projects/{project}/zones/{zone}"
        with self.state.lock:
            self.state.accelerator_types[(project, zone, name)] = {
                "kind": "compute#acceleratorType",
                "id": str(next(self.state.ids)),
                "name": name,
                "description": name,
                "zone": zone,
                "maximumCardsPerInstance": max_cards,
                "selfLink": f"{zone_url}/acceleratorTypes/{name}",
            }

    def add_machine_type(
        self,
        project: str,
        zone: str,
        name: str,
        *,
        cpus: int = 8,
        memory_mb: int = 30720,
        accelerators: list[tuple[str, int]] | None = None,
    ) -> None:
        zone_url = f"{API}projects/{project}/zones/{zone}"
        with self.state.lock:
            machine = {
                "kind": "compute#machineType",
                "id": str(next(self.state.ids)),
                "name": name,
                "description": f"{cpus} vCPUs, {memory_mb // 1024} GB RAM",
                "guestCpus": cpus,
                "memoryMb": memory_mb,
                "zone": zone,
                "selfLink": f"{zone_url}/machineTypes/{name}",
            }
            if accelerators:
                machine["accelerators"] = [
                    {"guestAcceleratorType": t, "guestAcceleratorCount": n} for t, n in accelerators
                ]
            self.state.machine_types[(project, zone, name)] = machine

    def add_disk(self, project: str, zone: str, name: str, *, size_gb: int = 200) -> None:
        with self.state.lock:
            self.state.disks[(project, zone, name)] = _disk(project, zone, name, size_gb)

    def disk(self, project: str, zone: str, name: str) -> dict[str, Any] | None:
        with self.state.lock:
            return copy.deepcopy(self.state.disks.get((project, zone, name)))

    def set_quota(self, project: str, region: str, metric: str, limit: int, usage: int) -> None:
        with self.state.lock:
            quotas = self.state.quotas.setdefault((project, region), [])
            quotas[:] = [q for q in quotas if q["metric"] != metric]
            quotas.append({"metric": metric, "limit": float(limit), "usage": float(usage)})

    def set_project_metadata(self, project: str, items: dict[str, str]) -> None:
        with self.state.lock:
            self.state.project_metadata[project] = [
                {"key": k, "value": v} for k, v in items.items()
            ]

    def add_instance(
        self,
        project: str,
        zone: str,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        disks: list[tuple[str, str]] = (),  # type: ignore[assignment]
        status: str = "RUNNING",
    ) -> dict[str, Any]:
        """An instance made elsewhere (not through insert), using `disks` [(name, mode)]."""
        zone_url = f"{API}projects/{project}/zones/{zone}"
        with self.state.lock:
            instance = {
                "kind": "compute#instance",
                "id": str(next(self.state.ids)),
                "name": name,
                "status": status,
                "creationTimestamp": _timestamp(),
                "zone": zone_url,
                "machineType": f"{zone_url}/machineTypes/n1-standard-4",
                "labels": dict(labels or {}),
                "selfLink": f"{zone_url}/instances/{name}",
                "disks": [
                    {"source": f"{zone_url}/disks/{d}", "mode": mode, "deviceName": d}
                    for d, mode in disks
                ],
            }
            self.state.instances[(project, zone, name)] = instance
            for disk, mode in disks:
                self.state.attach((project, zone, disk), instance["selfLink"], mode)
            return instance

    def fail_next_insert(
        self,
        code: str,
        message: str,
        http_status: int = 503,
        http_message: str = "SERVICE UNAVAILABLE",
    ) -> None:
        """The next insert is accepted, and its operation ends DONE with this error."""
        with self.state.lock:
            self.state.insert_errors.append(
                {
                    "code": code,
                    "message": message,
                    "http_status": http_status,
                    "http_message": http_message,
                }
            )

    # -- inspection ------------------------------------------------------------------

    def requests(self, method: str | None = None, suffix: str | None = None) -> list[Recorded]:
        """Recorded requests, optionally only those of a method and / or whose path ends so."""
        with self.state.lock:
            return [
                r
                for r in self.state.requests
                if (method is None or r.method == method)
                and (suffix is None or r.path.endswith(suffix))
            ]

    def inserts(self) -> list[dict[str, Any]]:
        """The bodies of every instances.insert received, in order."""
        return [r.body for r in self.requests("POST", "/instances")]

    def clear(self) -> None:
        """Forget the recorded requests (the resources stay)."""
        with self.state.lock:
            self.state.requests.clear()

    def instance(self, project: str, zone: str, name: str) -> dict[str, Any] | None:
        with self.state.lock:
            found = self.state.instances.get((project, zone, name))
            return copy.deepcopy(found)

    def instance_names(self, project: str, zone: str) -> list[str]:
        with self.state.lock:
            return sorted(n for p, z, n in self.state.instances if (p, z) == (project, zone))


@contextmanager
def compute_standin(host: str = "127.0.0.1") -> Iterator[ComputeStandin]:
    server = _Server((host, 0), _Handler)
    server.state = ComputeState()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ComputeStandin(server)
    finally:
        server.shutdown()
        server.server_close()
