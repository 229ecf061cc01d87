"""A small in-process fake of the Compute Engine REST API, for the real google-cloud-compute
client (``transport="rest"``, ``api_endpoint="http://127.0.0.1:PORT"``).

It keeps instances with their boot disks, zone and region operations, image families,
project metadata, resource policies (snapshot schedules) and snapshots in memory, records
every request (``fake.requests``), and has knobs for the failure paths:

  fake.fail("POST", "/instances", 403, "forbidden")   # next matching request fails
  fake.op_polls = 3                                    # operations RUNNING for 3 polls
  fake.op_error = ("QUOTA_EXCEEDED", "Quota ...")      # next operation ends in an error
  fake.concurrent_writer = "alice:ssh-rsa AAA alice"   # next GET races a metadata write
  fake.hang = "/instances/"                            # matching requests never answer
  fake.nat_ip = "127.0.0.1"                            # address new/started VMs get
  fake.nat_ips["nightguard-2"] = "127.0.0.2"           # ... or this one, for that VM
  fake.age("nightguard", 3600)                         # created an hour ago
  fake.recreate("nightguard")                          # deleted and created again: new id
  fake.add_snapshot("snap-1", "nightguard", created="2026-12-01T03:00:00Z")

It is also the VM's metadata server (/computeMetadata/v1/...: the startup-script and ssh-keys
the VM was created with, and guest attributes the guest writes), for the lab VM that boots
like a cloud image (`sandbox.up --os bookworm-cloud --metadata URL`).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests.fakes.local_http import LocalHttpFake

BASE = "https://www.googleapis.com/compute/v1"
METADATA = "/computeMetadata/v1/"  # the metadata server's paths, served on the same port


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class Failure:
    method: str
    pattern: str
    status: int
    message: str
    reason: str
    times: int


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def error_body(status: int, message: str, reason: str = "") -> dict:
    return {"error": {"code": status, "message": message,
                      "errors": [{"domain": "global", "reason": reason or "error",
                                  "message": message}]}}


@dataclass
class FakeGce(LocalHttpFake):
    project: str = "demo-project"
    zones: tuple[str, ...] = ("us-west1-b", "us-central1-a", "us-east1-b", "europe-west1-b")
    nat_ip: str = "203.0.113.10"
    nat_ips: dict[str, str] = field(default_factory=dict)  # instance name -> its own address
    op_polls: int = 0
    op_error: tuple[str, str] | None = None
    concurrent_writer: str | None = None
    hang: str | None = None
    instances: dict[str, dict] = field(default_factory=dict)
    operations: dict[str, dict] = field(default_factory=dict)
    guest_attributes: dict[str, dict[str, str]] = field(default_factory=dict)
    project_metadata: list[dict] = field(default_factory=list)
    disks: dict[str, dict] = field(default_factory=dict)
    resource_policies: dict[tuple[str, str], dict] = field(default_factory=dict)  # (region, name)
    snapshots: dict[str, dict] = field(default_factory=dict)
    images: dict[tuple[str, str], str] = field(default_factory=lambda: {
        ("ubuntu-os-cloud", "ubuntu-2404-lts-amd64"): "ubuntu-2404-noble-amd64-v20250101",
        ("debian-cloud", "debian-12"): "debian-12-bookworm-v20251111"})
    requests: list[Recorded] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ids = itertools.count(1000)
        self._lock = threading.RLock()
        self._serve()

    def fail(self, method: str, pattern: str, status: int, message: str = "",
             reason: str = "", times: int = 1) -> None:
        """The next ``times`` requests whose path matches ``pattern`` (a regex) fail."""
        self.failures.append(Failure(method, pattern, status, message or f"HTTP {status}",
                                     reason, times))

    def sent(self, method: str, pattern: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    def add_instance(self, name: str, zone: str = "us-west1-b", status: str = "RUNNING",
                     metadata: list[dict] | None = None, **extra: Any) -> dict:
        body = {"name": name, "machineType": f"zones/{zone}/machineTypes/e2-micro",
                "networkInterfaces": [{"accessConfigs": [{"type": "ONE_TO_ONE_NAT",
                                                          "name": "External NAT"}]}],
                "metadata": {"items": metadata or []}, **extra}
        return self._create(zone, body, status)

    def age(self, name: str, seconds: float) -> None:
        """The instance was created ``seconds`` ago (creationTimestamp)."""
        created = datetime.now(UTC) - timedelta(seconds=seconds)
        self.instances[name]["creationTimestamp"] = created.isoformat(timespec="milliseconds")

    def add_snapshot(self, name: str, disk: str = "nightguard", zone: str = "us-west1-b",
                     created: str = "", storage_bytes: int = 2 * 1024**3,
                     status: str = "READY", scheduled: bool = True) -> dict:
        """A snapshot of zone/disk (the disk need not exist: its snapshots outlive it)."""
        snapshot = {"kind": "compute#snapshot", "id": str(next(self._ids)), "name": name,
                    "creationTimestamp": created or _now(), "status": status,
                    "storageBytes": str(storage_bytes), "diskSizeGb": "30",
                    "sourceDisk": self._url(zone, "disks", disk),
                    "selfLink": f"{BASE}/projects/{self.project}/global/snapshots/{name}",
                    "autoCreated": scheduled}
        if scheduled:
            region = zone.rsplit("-", 1)[0]
            snapshot["sourceSnapshotSchedulePolicy"] = self._region_url(
                region, "resourcePolicies", f"{disk}-daily")
        self.snapshots[name] = snapshot
        return snapshot

    def recreate(self, name: str) -> dict:
        """The instance deleted and created again under its name: a new id, created now."""
        instance = self.instances[name]
        instance.update(id=str(next(self._ids)), creationTimestamp=_now())
        return instance

    # -- resources --------------------------------------------------------------------
    def _url(self, zone: str, *rest: str) -> str:
        return "/".join([BASE, "projects", self.project, "zones", zone, *rest])

    def _region_url(self, region: str, *rest: str) -> str:
        return "/".join([BASE, "projects", self.project, "regions", region, *rest])

    @property
    def regions(self) -> set[str]:
        return {zone.rsplit("-", 1)[0] for zone in self.zones}

    def _boot_disk(self, zone: str, instance: dict) -> None:
        """The boot disk made with the VM: a disk of its own, named after the VM unless
        initializeParams says otherwise, which the instance then names by URL only."""
        attached = (instance.get("disks") or [{"boot": True, "autoDelete": True}])[0]
        params = attached.pop("initializeParams", {})
        name = params.get("diskName") or instance["name"]
        self.disks[name] = {"kind": "compute#disk", "id": str(next(self._ids)), "name": name,
                            "zone": self._url(zone), "selfLink": self._url(zone, "disks", name),
                            "sizeGb": str(params.get("diskSizeGb", "30")),
                            "resourcePolicies": list(params.get("resourcePolicies", [])),
                            "users": [instance["selfLink"]], "status": "READY"}
        attached.update(source=self._url(zone, "disks", name), deviceName=name, boot=True)
        instance["disks"] = [attached]

    def _create(self, zone: str, body: dict, status: str = "RUNNING") -> dict:
        instance = json.loads(json.dumps(body))
        instance.update(kind="compute#instance", id=str(next(self._ids)), status=status,
                        zone=self._url(zone), selfLink=self._url(zone, "instances", body["name"]),
                        creationTimestamp=_now())
        instance.setdefault("metadata", {})["fingerprint"] = f"fp{next(self._ids)}"
        instance["metadata"]["kind"] = "compute#metadata"
        self._boot_disk(zone, instance)
        self._set_power(instance, status == "RUNNING")
        self.instances[body["name"]] = instance
        return instance

    def _set_power(self, instance: dict, running: bool) -> None:
        instance["status"] = "RUNNING" if running else "TERMINATED"
        for nic in instance.get("networkInterfaces", []):
            for access in nic.get("accessConfigs", []):
                # An ephemeral external address is released while the VM is stopped.
                if running:
                    access["natIP"] = self.nat_ips.get(instance["name"], self.nat_ip)
                else:
                    access.pop("natIP", None)
        if running:
            instance["lastStartTimestamp"] = _now()

    def _operation(self, zone: str, kind: str, target: str, region: str = "",
                   collection: str = "instances") -> dict:
        """A zone's operation, or a region's when ``region`` is given."""
        name = f"operation-{next(self._ids)}"
        url = partial(self._region_url, region) if region else partial(self._url, zone)
        op = {"kind": "compute#operation", "id": str(next(self._ids)), "name": name,
              "operationType": kind, ("region" if region else "zone"): url(),
              "targetLink": url(collection, target),
              "selfLink": url("operations", name), "insertTime": _now(),
              "status": "RUNNING" if self.op_polls else "DONE",
              "progress": 0 if self.op_polls else 100, "_polls_left": self.op_polls}
        if self.op_error:
            code, message = self.op_error
            self.op_error = None
            op.update(error={"errors": [{"code": code, "message": message}]},
                      httpErrorStatusCode=403, httpErrorMessage="FORBIDDEN")
        self.operations[name] = op
        return op

    def _poll(self, name: str) -> dict:
        op = self.operations[name]
        if op["_polls_left"] > 0:
            op["_polls_left"] -= 1
            if op["_polls_left"] == 0:
                op.update(status="DONE", progress=100, endTime=_now())
        return op

    # -- HTTP -------------------------------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        if url.path.startswith(METADATA):
            return self._serve_metadata(handler, method, url.path[len(METADATA):], raw)
        body = json.loads(raw) if raw else None
        with self._lock:
            self.requests.append(Recorded(method, url.path, parse_qs(url.query), body))
            hang = self.hang and re.search(self.hang, url.path)
        if hang:
            self._release.wait(30)
            return
        with self._lock:
            status, payload = self._route(method, url.path, parse_qs(url.query), body)
        data = json.dumps({k: v for k, v in payload.items() if not k.startswith("_")}).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    # -- the metadata server, as the VM's own software asks it -----------------------------
    def _serve_metadata(self, handler: BaseHTTPRequestHandler, method: str, path: str,
                        raw: bytes) -> None:
        """GET instance/id, instance/attributes/KEY; PUT instance/guest-attributes/NS/KEY:
        the lab VM's stand-ins of Google's guest agent and startup script runner ask this
        (without the Metadata-Flavor header the real server answers 403, so does this).
        It serves the one VM there is: 404 until `vm.create` made it."""
        with self._lock:
            self.requests.append(Recorded(method, METADATA + path, {}, None))
            instance = next(iter(self.instances.values()), None)
            status, text = 404, "no VM yet"
            if handler.headers.get("Metadata-Flavor") != "Google":
                status, text = 403, "Missing Metadata-Flavor:Google header"
            elif instance is not None and method == "GET":
                items = {i["key"]: i["value"] for i in instance["metadata"].get("items", [])}
                key = path.removeprefix("instance/attributes/")
                if path == "instance/id":
                    status, text = 200, instance["id"]
                elif path.startswith("instance/attributes/") and key in items:
                    status, text = 200, items[key]
            elif instance is not None and method == "PUT":
                wanted = re.fullmatch(r"instance/guest-attributes/([^/]+)/([^/]+)", path)
                if wanted:
                    space = self.guest_attributes.setdefault(instance["name"], {})
                    space.setdefault(wanted.group(1), {})[wanted.group(2)] = raw.decode()
                    status, text = 200, ""
        data = text.encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _route(self, method: str, path: str, query: dict, body: Any) -> tuple[int, dict]:
        for failure in self.failures:
            if failure.method == method and failure.times > 0 and re.search(failure.pattern,
                                                                             path):
                failure.times -= 1
                return failure.status, error_body(failure.status, failure.message,
                                                  failure.reason)
        match = re.fullmatch(r"/compute/v1/projects/([^/]+)(/.*)?", path)
        if not match:
            return 404, error_body(404, f"no route for {path}", "notFound")
        project, rest = match.group(1), match.group(2) or ""
        family = re.fullmatch(r"/global/images/family/([^/]+)", rest)
        if family and method == "GET":
            image = self.images.get((project, family.group(1)))
            if not image:
                return 404, self._missing(f"projects/{project}/global/images/family/"
                                          f"{family.group(1)}")
            return 200, {"kind": "compute#image", "name": image, "family": family.group(1),
                         "selfLink": f"{BASE}/projects/{project}/global/images/{image}"}
        if project != self.project:
            return 404, self._missing(f"projects/{project}")
        if not rest and method == "GET":
            return 200, {"kind": "compute#project", "name": project,
                         "commonInstanceMetadata": {"items": self.project_metadata,
                                                    "fingerprint": "pfp"}}
        if rest == "/global/snapshots" and method == "GET":
            return self._list_snapshots(query)
        regional = re.fullmatch(r"/regions/([^/]+)/(resourcePolicies|operations)(?:/([^/]+))?"
                                r"(?:/(\w+))?", rest)
        if regional:
            return self._regional(method, *regional.groups(), body)
        zoned = re.fullmatch(r"/zones/([^/]+)/(instances|operations|disks)(?:/([^/]+))?"
                             r"(?:/(\w+))?", rest)
        if not zoned:
            return 404, error_body(404, f"no route for {path}", "notFound")
        zone, collection, name, verb = zoned.groups()
        if zone not in self.zones:
            return 404, self._missing(f"projects/{project}/zones/{zone}")
        if collection == "operations":
            if name not in self.operations:
                return 404, self._missing(f"projects/{project}/zones/{zone}/operations/{name}")
            return 200, self._poll(name)
        if collection == "disks":
            return self._disks(method, zone, name, verb, body)
        return self._instances(method, zone, name, verb, query, body)

    # -- snapshot schedules, disks, snapshots -----------------------------------------
    def _regional(self, method: str, region: str, collection: str, name: str | None,
                  verb: str | None, body: Any) -> tuple[int, dict]:
        if region not in self.regions:
            return 404, self._missing(f"projects/{self.project}/regions/{region}")
        if collection == "operations":
            if name not in self.operations:
                return 404, self._missing(f"projects/{self.project}/regions/{region}/"
                                          f"operations/{name}")
            return 200, self._poll(name)
        if name is None and method == "POST":
            if (region, body["name"]) in self.resource_policies:
                return 409, error_body(409, f"The resource 'projects/{self.project}/regions/"
                                            f"{region}/resourcePolicies/{body['name']}' already "
                                            "exists", "alreadyExists")
            op = self._operation("", "insert", body["name"], region, "resourcePolicies")
            if "error" not in op:
                self.add_policy(region, body)
            return 200, op
        policy = self.resource_policies.get((region, name or ""))
        if method == "GET" and verb is None and policy is not None:
            return 200, policy
        return 404, self._missing(f"projects/{self.project}/regions/{region}/resourcePolicies/"
                                  f"{name}")

    def add_policy(self, region: str, body: dict) -> dict:
        policy = json.loads(json.dumps(body))
        policy.update(kind="compute#resourcePolicy", id=str(next(self._ids)), status="READY",
                      region=self._region_url(region), creationTimestamp=_now(),
                      selfLink=self._region_url(region, "resourcePolicies", body["name"]))
        self.resource_policies[(region, body["name"])] = policy
        return policy

    def _disks(self, method: str, zone: str, name: str | None, verb: str | None,
               body: Any) -> tuple[int, dict]:
        disk = self.disks.get(name or "")
        if disk is None or not disk["zone"].endswith(f"/{zone}"):
            return 404, self._missing(f"projects/{self.project}/zones/{zone}/disks/{name}")
        if method == "GET" and verb is None:
            return 200, disk
        if method == "POST" and verb == "addResourcePolicies":
            for url in body.get("resourcePolicies", []):
                parts = url.split("/")
                if (parts[parts.index("regions") + 1], parts[-1]) not in self.resource_policies:
                    return 404, self._missing(url[url.index("projects/"):])
            disk["resourcePolicies"] += body.get("resourcePolicies", [])
            return 200, self._operation(zone, "addResourcePolicies", name, collection="disks")
        return 404, error_body(404, f"no route for {verb}", "notFound")

    def _list_snapshots(self, query: dict) -> tuple[int, dict]:
        """GET global/snapshots, with the one filter the tool sends: sourceDisk = "URL"."""
        items = list(self.snapshots.values())
        wanted = query.get("filter", [""])[0]
        if wanted:
            match = re.fullmatch(r'sourceDisk\s*=\s*"([^"]+)"', wanted.strip())
            if not match:
                return 400, error_body(400, f"Invalid value for field 'filter': '{wanted}'. "
                                            "Invalid list filter expression.", "invalid")
            items = [i for i in items if i["sourceDisk"] == match.group(1)]
        return 200, {"kind": "compute#snapshotList", "items": items}

    def _missing(self, resource: str) -> dict:
        return error_body(404, f"The resource '{resource}' was not found", "notFound")

    def _instances(self, method: str, zone: str, name: str | None, verb: str | None,
                   query: dict, body: Any) -> tuple[int, dict]:
        if name is None and method == "GET":
            return 200, {"kind": "compute#instanceList",
                         "items": [i for i in self.instances.values()
                                   if i["zone"].endswith(f"/{zone}")]}
        if name is None and method == "POST":
            if body["name"] in self.instances:
                return 409, error_body(409, f"The resource 'projects/{self.project}/zones/"
                                            f"{zone}/instances/{body['name']}' already exists",
                                       "alreadyExists")
            op = self._operation(zone, "insert", body["name"])
            if "error" not in op:
                self._create(zone, body)
            return 200, op
        instance = self.instances.get(name)
        if instance is None or not instance["zone"].endswith(f"/{zone}"):
            return 404, self._missing(f"projects/{self.project}/zones/{zone}/instances/{name}")
        if method == "GET" and verb is None:
            snapshot = json.loads(json.dumps(instance))
            if self.concurrent_writer:
                self._write_key(instance, self.concurrent_writer)
                self.concurrent_writer = None
            return 200, snapshot
        if method == "GET" and verb == "getGuestAttributes":
            wanted = query.get("queryPath", [""])[0].rstrip("/")
            values = self.guest_attributes.get(name, {}).get(wanted)
            if not values:
                return 404, self._missing(f"projects/{self.project}/zones/{zone}/instances/"
                                          f"{name}/guestAttributes/{wanted}")
            items = [{"namespace": wanted, "key": k, "value": v} for k, v in values.items()]
            return 200, {"kind": "compute#guestAttributes", "queryPath": f"{wanted}/",
                         "queryValue": {"items": items}}
        if method == "POST" and verb == "setMetadata":
            if body.get("fingerprint") != instance["metadata"]["fingerprint"]:
                return 412, error_body(412, "Supplied fingerprint does not match current "
                                            "metadata fingerprint.", "conditionNotMet")
            instance["metadata"] = {"kind": "compute#metadata", "items": body.get("items", []),
                                    "fingerprint": f"fp{next(self._ids)}"}
            return 200, self._operation(zone, "setMetadata", name)
        if method == "POST" and verb in ("start", "stop", "reset"):
            if verb != "reset":
                self._set_power(instance, verb == "start")
            elif instance["status"] == "RUNNING":
                instance["lastStartTimestamp"] = _now()
            return 200, self._operation(zone, verb, name)
        return 404, error_body(404, f"no route for {verb}", "notFound")

    def _write_key(self, instance: dict, line: str) -> None:
        items = instance["metadata"].setdefault("items", [])
        entry = next((i for i in items if i["key"] == "ssh-keys"), None)
        if entry is None:
            items.append({"key": "ssh-keys", "value": line})
        else:
            entry["value"] = entry["value"].rstrip("\n") + "\n" + line
        instance["metadata"]["fingerprint"] = f"fp{next(self._ids)}"
