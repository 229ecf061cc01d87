"""The Compute Engine API layer: clients from settings, errors in one line, zone operations,
the VM's lifecycle and the free-tier check. SSH keys in metadata and the VM's SSH address
(host key pinning) live in ``tasks.gcp.ssh``.

Credentials: ``nightguard.gcp.credentials_file`` (a service-account key) if set, else
Application Default Credentials; none at all when ``nightguard.gcp.api_endpoint`` is an
``http://`` address (a local fake). Every API failure becomes ``GcpError``: one line saying
what went wrong and what to do.

Config keys: ``nightguard.gcp.*``, ``nightguard.ssh.user/port/key_filename/known_hosts``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import google.auth
import requests
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.auth.exceptions import DefaultCredentialsError, RefreshError
from google.oauth2 import service_account

from ..config import Settings
from ..errors import StepFailed

if TYPE_CHECKING:
    from google.cloud import compute_v1

SCOPES = ["https://www.googleapis.com/auth/compute"]
FREE_REGIONS = ("us-west1", "us-central1", "us-east1")


def v1():
    """``google.cloud.compute_v1``, imported on first use: loading it takes seconds, which
    every `inv` run (even `inv --list`) would pay otherwise."""
    from google.cloud import compute_v1

    return compute_v1


class GcpError(StepFailed):
    """A Compute API failure in one line; ``status``/``resource`` say what kind."""

    def __init__(self, step: str, reason: str, status: int = 0, resource: str = ""):
        super().__init__(step, reason)
        self.status = status
        self.resource = resource


@dataclass
class Gce:
    """Clients plus the VM's coordinates; timeouts are seconds."""

    settings: Settings
    instances: compute_v1.InstancesClient
    operations: compute_v1.ZoneOperationsClient
    images: compute_v1.ImagesClient
    projects: compute_v1.ProjectsClient
    request_timeout: float = 30.0
    operation_timeout: float = 300.0
    poll_interval: float = 2.0
    build: Callable[[type], Any] | None = field(default=None, repr=False)
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)

    def client(self, name: str) -> Any:
        """Another compute_v1 client (``"DisksClient"``...) with the same credentials and
        endpoint, built on first use: most tasks never need it."""
        if name not in self._clients:
            self._clients[name] = self.build(getattr(v1(), name))
        return self._clients[name]

    @property
    def region(self) -> str:
        return self.zone.rsplit("-", 1)[0]

    @property
    def project(self) -> str:
        return self.settings["gcp.project"]

    @property
    def zone(self) -> str:
        return self.settings["gcp.zone"]

    @property
    def name(self) -> str:
        return self.settings["gcp.instance"]

    def call(self, method, **kwargs):
        # retry=None: the defaults retry for up to 600s, which hides a dead endpoint.
        return method(**kwargs, timeout=self.request_timeout, retry=None)


def credentials(settings: Settings, scopes=SCOPES, endpoint_key: str = "gcp.api_endpoint"):
    """The account every Google API call uses; anonymous when ``endpoint_key`` names a
    local http:// fake."""
    if settings[endpoint_key].startswith("http://"):
        return AnonymousCredentials()
    key_file = settings["gcp.credentials_file"]
    try:
        if key_file:
            path = settings.path("gcp.credentials_file")
            if not path.is_file():
                raise GcpError("gcp credentials", f"{path} not found: fix "
                               "nightguard.gcp.credentials_file (a service-account JSON key)")
            return service_account.Credentials.from_service_account_file(str(path),
                                                                          scopes=scopes)
        return google.auth.default(scopes=scopes)[0]
    except (DefaultCredentialsError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or ["unreadable"])[0]
        detail = f"{key_file} is not a service-account key ({first})" if key_file else \
            "no Application Default Credentials found"
        raise GcpError("gcp credentials", f"{detail}: run `gcloud auth application-default "
                       "login` or set nightguard.gcp.credentials_file") from None


def connect(settings: Settings) -> Gce:
    """Clients for the configured project; anonymous against an http:// fake."""
    account = credentials(settings)
    endpoint = settings["gcp.api_endpoint"]
    options = ClientOptions(api_endpoint=endpoint) if endpoint else None

    def build(cls):
        return cls(credentials=account, transport="rest", client_options=options)

    compute = v1()
    return Gce(settings, build(compute.InstancesClient), build(compute.ZoneOperationsClient),
               build(compute.ImagesClient), build(compute.ProjectsClient), build=build)


# -- errors ---------------------------------------------------------------------------
def _which(gce: Gce, message: str) -> tuple[str, str]:
    found = re.search(r"'(projects/[^']+)'", message)
    resource = found.group(1) if found else ""
    s = gce.settings
    if "/images/" in resource:
        return "image", (f"image family {s['gcp.image_family']} not found in "
                         f"{s['gcp.image_project']}: fix nightguard.gcp.image_family/"
                         "image_project")
    if "/operations/" in resource:  # operations expire; the change itself may have happened
        return "operation", "the operation vanished before it was seen done: check with " \
            "`inv vm.status`"
    if "/disks/" in resource:
        return "disk", (f"disk {resource.rsplit('/', 1)[-1]} not found in zone {gce.zone}: "
                        "check the VM's boot disk with `inv vm.status`")
    if "/resourcePolicies/" in resource:
        return "policy", f"resource policy {resource.rsplit('/', 1)[-1]} not found"
    if "/instances/" in resource or not resource:
        return "vm", (f"VM {gce.name} not found in project {gce.project} zone {gce.zone}: "
                      "create it with `inv vm.create` or fix nightguard.gcp.instance/zone")
    if "/zones/" in resource or "/regions/" in resource:
        return "zone", f"zone {gce.zone} does not exist: fix nightguard.gcp.zone (e.g. us-west1-b)"
    return "project", (f"project {gce.project} not found or not visible to these credentials: "
                       "fix nightguard.gcp.project")


def _explain(gce: Gce, exc: api_exceptions.GoogleAPICallError) -> tuple[str, str]:
    code = exc.code or 0
    message = (exc.message or str(exc)).strip().splitlines()[0]
    message = re.sub(r"^[A-Z]+ \S+: ", "", message)  # drop the client's "GET <url>: "
    reasons = {e.get("reason", "") for e in exc.errors or [] if isinstance(e, dict)}
    if code == 429 or reasons & {"quotaExceeded", "rateLimitExceeded"} or "Quota" in message:
        return "", (f"quota exceeded in project {gce.project}: {message} - free resources or "
                    "request more quota (console: IAM & Admin > Quotas)")
    if code == 401:
        return "", ("credentials rejected (expired or revoked): run `gcloud auth "
                    "application-default login` or renew nightguard.gcp.credentials_file")
    if code == 403 and ("resourcePolicies" in message or "snapshots" in message):
        return "", (f"permission denied in project {gce.project}: {message} - grant the "
                    "account a role that has it, or set nightguard.gcp.snapshots.enabled: "
                    "false to go without daily snapshots")
    if code == 403:
        return "", (f"permission denied in project {gce.project}: {message} - grant the "
                    "account roles/compute.instanceAdmin.v1 and check the Compute Engine API "
                    "is enabled")
    if code == 404:
        return _which(gce, message)
    if code == 409:
        return "vm", f"VM {gce.name} already exists in project {gce.project} zone {gce.zone}"
    if code in (408, 504):
        return "", f"the Compute API timed out: {message} - retry"
    return "", f"Compute API error {code}: {message}"


@contextmanager
def api_errors(gce: Gce, step: str) -> Iterator[None]:
    """Turn whatever the client raises into one GcpError line."""
    try:
        yield
    except api_exceptions.GoogleAPICallError as exc:
        resource, reason = _explain(gce, exc)
        raise GcpError(step, reason, exc.code or 0, resource) from None
    except requests.exceptions.Timeout:
        raise GcpError(step, f"no answer from the Compute API within {gce.request_timeout:g}s:"
                       " check the network and retry", 408) from None
    except requests.exceptions.ConnectionError:
        endpoint = gce.settings["gcp.api_endpoint"] or "compute.googleapis.com"
        raise GcpError(step, f"cannot reach the Compute API at {endpoint}: check the network "
                       "or nightguard.gcp.api_endpoint") from None
    except (RefreshError, DefaultCredentialsError) as exc:
        detail = (str(exc).strip().splitlines() or ["refresh failed"])[0]
        raise GcpError(step, f"credentials rejected ({detail}): run `gcloud auth "
                       "application-default login` or renew nightguard.gcp.credentials_file",
                       401) from None


def _poll(gce: Gce, op: compute_v1.Operation, remaining: float) -> compute_v1.Operation:
    """One long-poll of a zone's or a region's operation (a resource policy's insert is
    regional), with our own clients."""
    if op.region and not op.zone:
        return gce.client("RegionOperationsClient").wait(
            project=gce.project, region=op.region.rsplit("/", 1)[-1], operation=op.name,
            timeout=min(remaining, 150), retry=None)
    return gce.operations.wait(project=gce.project, zone=gce.zone, operation=op.name,
                               timeout=min(remaining, 150), retry=None)


def wait_for_operation(gce: Gce, op: compute_v1.Operation, step: str,
                       timeout: float | None = None) -> compute_v1.Operation:
    """Poll with our own operations clients (``ExtendedOperation.result()`` would
    ignore the configured endpoint); raise the operation's error, if any."""
    done = v1().Operation.Status.DONE
    limit = timeout or gce.operation_timeout
    deadline = time.monotonic() + limit
    while op.status != done:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GcpError(step, f"operation {op.operation_type or op.name} not done after "
                           f"{limit:g}s (still {op.status.name}): it may finish later, "
                           "check with `inv vm.status`", 408)
        try:
            with api_errors(gce, step):
                op = _poll(gce, op, remaining)
        except GcpError as exc:
            if exc.status != 408:  # a slow long-poll is not a failure by itself
                raise
        if op.status != done:
            time.sleep(max(0.0, min(gce.poll_interval, deadline - time.monotonic())))
    if op.error.errors:
        first = op.error.errors[0]
        if first.code == "QUOTA_EXCEEDED":
            reason = (f"quota exceeded in project {gce.project}: {first.message} - free "
                      "resources or request more quota (console: IAM & Admin > Quotas)")
        elif first.code.startswith("ZONE_RESOURCE_POOL_EXHAUSTED"):
            reason = (f"zone {gce.zone} has no capacity for this VM right now: retry later "
                      "or pick another free-tier zone (nightguard.gcp.zone)")
        else:
            reason = f"operation {op.operation_type} failed: {first.code}: {first.message}"
        raise GcpError(step, reason, op.http_error_status_code)
    return op


# -- the VM ---------------------------------------------------------------------------
def get_instance(gce: Gce, step: str = "vm get") -> compute_v1.Instance:
    with api_errors(gce, step):
        return gce.call(gce.instances.get, project=gce.project, zone=gce.zone,
                        instance=gce.name)


def find_instance(gce: Gce, step: str = "vm get") -> compute_v1.Instance | None:
    """The VM, or None when only the VM (not the project or zone) is missing."""
    try:
        return get_instance(gce, step)
    except GcpError as exc:
        if exc.status == 404 and exc.resource == "vm":
            return None
        raise


def external_ip(instance: compute_v1.Instance) -> str:
    for nic in instance.network_interfaces:
        for access in nic.access_configs:
            if access.nat_i_p:
                return access.nat_i_p
    return ""


# Installs Podman while the VM boots, so the first `inv deploy` has less to do; the deploy
# checks and installs what is missing itself and never depends on this having run.
STARTUP_SCRIPT = """#!/bin/sh
# nightguard: install Podman at first boot (the deploy would do it otherwise)
command -v podman >/dev/null 2>&1 && exit 0
export DEBIAN_FRONTEND=noninteractive
# apt-daily may hold the lists lock at first boot (apt waits for dpkg's locks, not that one)
for try in 1 2 3 4 5 6 7 8 9 10; do apt-get -q update && break; sleep 15; done
apt-get -q -y --no-install-recommends -o DPkg::Lock::Timeout=600 install \\
  podman crun conmon netavark aardvark-dns iptables slirp4netns
"""


def service_account_text(instance) -> str:
    """Which account the VM's processes - the agent's included - can get a token for from the
    metadata server, and with which scopes."""
    accounts = list(instance.service_accounts)
    if not accounts:
        return "none (nothing on the VM can get a Google token from its metadata server)"
    scopes = ", ".join(s.rsplit("/", 1)[-1] for s in accounts[0].scopes) or "no scopes"
    return f"{accounts[0].email} (scopes: {scopes}) - the agent can use it too"


def build_instance(settings: Settings, source_image: str, ssh_keys: str,
                   snapshot_policy: str = "") -> compute_v1.Instance:
    compute = v1()
    zone = settings["gcp.zone"]
    # The boot disk is made with the VM, so its snapshot schedule is named here: the API
    # takes resourcePolicies in initializeParams for a new disk, boot disks included, and the
    # disk then never exists unscheduled (addResourcePolicies is for disks that exist).
    disk = compute.AttachedDiskInitializeParams(
        source_image=source_image, disk_size_gb=settings["gcp.disk_gb"],
        disk_type=f"zones/{zone}/diskTypes/{settings['gcp.disk_type']}",
        resource_policies=[snapshot_policy] if snapshot_policy else [])
    nat = compute.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")
    # Guest attributes let the guest agent publish its host keys for pinning.
    items = [compute.Items(key="ssh-keys", value=ssh_keys),
             compute.Items(key="enable-guest-attributes", value="TRUE"),
             compute.Items(key="startup-script", value=STARTUP_SCRIPT)]
    # No service_accounts: the Compute API then attaches none (gcloud and the console would
    # add the default compute account, Editor on the project, usable by the agent too).
    return compute.Instance(
        name=settings["gcp.instance"],
        machine_type=f"zones/{zone}/machineTypes/{settings['gcp.machine_type']}",
        disks=[compute.AttachedDisk(boot=True, auto_delete=True, initialize_params=disk)],
        network_interfaces=[compute.NetworkInterface(network="global/networks/default",
                                                        access_configs=[nat])],
        tags=compute.Tags(items=[settings["gcp.network_tag"]]),
        metadata=compute.Metadata(items=items))


def create_instance(gce: Gce, ssh_keys: str, timeout: float | None = None,
                    snapshot_policy: str = "") -> tuple[compute_v1.Instance, bool]:
    """(the VM, True) if created now, (the VM, False) if it was already there;
    ``snapshot_policy``: a resource policy's URL for the new boot disk."""
    step = "vm create"
    existing = find_instance(gce, step)
    if existing is not None:
        return existing, False
    s = gce.settings
    with api_errors(gce, step):
        image = gce.call(gce.images.get_from_family, project=s["gcp.image_project"],
                         family=s["gcp.image_family"])
    try:
        with api_errors(gce, step):
            op = gce.call(gce.instances.insert_unary, project=gce.project, zone=gce.zone,
                          instance_resource=build_instance(s, image.self_link, ssh_keys,
                                                           snapshot_policy))
    except GcpError as exc:
        if exc.status == 409:  # created meanwhile by someone else
            return get_instance(gce, step), False
        raise
    wait_for_operation(gce, op, step, timeout)
    return get_instance(gce, step), True


def power(gce: Gce, action: str, timeout: float | None = None) -> compute_v1.Instance:
    """start, stop or reset the VM and wait for it."""
    step = f"vm {action}"
    with api_errors(gce, step):
        op = gce.call(getattr(gce.instances, f"{action}_unary"), project=gce.project,
                      zone=gce.zone, instance=gce.name)
    wait_for_operation(gce, op, step, timeout)
    return get_instance(gce, step)


def free_tier_warnings(settings: Settings) -> list[str]:
    zone = settings["gcp.zone"]
    region = zone.rsplit("-", 1)[0]
    warnings = []
    if region not in FREE_REGIONS:
        warnings.append(f"zone {zone} is outside the free tier regions "
                        f"({', '.join(FREE_REGIONS)})")
    if settings["gcp.machine_type"] != "e2-micro":
        warnings.append(f"machine type {settings['gcp.machine_type']} is not the free "
                        "e2-micro")
    if settings["gcp.disk_gb"] > 30:
        warnings.append(f"boot disk {settings['gcp.disk_gb']} GB is above the free 30 GB")
    if settings["gcp.disk_type"] != "pd-standard":
        warnings.append(f"disk type {settings['gcp.disk_type']} is not the free pd-standard")
    return warnings
