"""`inv vm.*`: the Compute Engine VM the agent runs on (create, status, start, stop, reset,
ip, authorize-key, snapshots).

Config keys (``nightguard:`` in Invoke's config files, or ``NIGHTGUARD_<KEY>``):
  gcp.project (required), gcp.zone, gcp.instance, gcp.machine_type, gcp.image_project,
  gcp.image_family, gcp.disk_gb, gcp.disk_type, gcp.network_tag,
  gcp.credentials_file (service-account key; default: Application Default Credentials),
  gcp.api_endpoint (e.g. a local fake at http://127.0.0.1:PORT),
  gcp.snapshots.enabled/keep_days/start_time (the boot disk's daily snapshot schedule),
  ssh.user, ssh.key_filename (its .pub goes into the VM's ssh-keys metadata; when empty a
  key pair is generated at .ssh/nightguard_ed25519), ssh.known_hosts, ssh.port.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from invoke import Collection, task

from ..cli import one_line_errors, settings_for
from ..config import Settings
from ..errors import ConfigError
from . import api as gcp
from . import snapshots as snap
from . import ssh as gcp_ssh

VM_HELP = {
    "project": "Google Cloud project (default: nightguard.gcp.project)",
    "zone": "zone, e.g. us-west1-b (default: nightguard.gcp.zone)",
    "instance": "VM name (default: nightguard.gcp.instance)",
}
TIMEOUT_HELP = "seconds to wait for the operation to finish (default 300)"


def _settings(c, project: str | None, zone: str | None, instance: str | None,
              **more) -> Settings:
    return settings_for(c, "gcp", gcp__project=project, gcp__zone=zone, gcp__instance=instance,
                        **more)


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def uptime(started: str, now: datetime | None = None) -> str:
    """'2d 3h 4m' since an RFC 3339 timestamp such as lastStartTimestamp."""
    if not started:
        return "-"
    seconds = int(((now or datetime.now(UTC)) - datetime.fromisoformat(started))
                  .total_seconds())
    days, rest = divmod(max(seconds, 0), 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours}h {rest // 60}m"
    return f"{days}d {text}" if days else text


def describe(instance, zone: str, now: datetime | None = None) -> list[str]:
    running = instance.status == "RUNNING"
    return [f"state: {instance.status}",
            f"zone: {zone}",
            f"machine type: {instance.machine_type.rsplit('/', 1)[-1]}",
            f"external IP: {gcp.external_ip(instance) or '-'}",
            f"uptime: {uptime(instance.last_start_timestamp, now) if running else '-'}"]


@task(help={**VM_HELP, "machine_type": "machine type (default: nightguard.gcp.machine_type)",
            "disk_gb": "boot disk size in GB (default: nightguard.gcp.disk_gb)",
            "timeout": TIMEOUT_HELP})
@one_line_errors
def create(c, project=None, zone=None, instance=None, machine_type=None, disk_gb=None,
           timeout=300):
    """Create the VM with your SSH key (an existing VM is reported, not duplicated).

    e2-micro, 30 GB pd-standard boot disk, network tag, external IP, no service account
    (the agent can get no Google token from the metadata server); warns when the settings
    leave the free tier. With nightguard.gcp.snapshots.enabled, the boot disk gets a daily
    snapshot schedule (made first; attached to an existing VM's disk too)."""
    settings = _settings(c, project, zone, instance, gcp__machine_type=machine_type,
                         gcp__disk_gb=disk_gb)
    for warning in gcp.free_tier_warnings(settings):
        _warn(f"{warning}: this VM will be billed")
    gce = gcp.connect(settings)
    user = settings["ssh.user"]
    entry = gcp_ssh.ssh_keys_entry(user, gcp_ssh.public_key(settings))
    policy = _schedule(gce, timeout) if settings["gcp.snapshots.enabled"] else ""
    vm, created = gcp.create_instance(gce, entry, timeout, policy)
    address = gcp.external_ip(vm) or "no external IP yet"
    if created:
        print(f"created VM {gce.name} in {gce.zone} ({vm.status}, {address}); "
              f"SSH user {user}")
        print(f"service account: {gcp.service_account_text(vm)}")
    else:
        print(f"VM {gce.name} already exists in {gce.zone} ({vm.status}, {address}): "
              "nothing created; add your key with `inv vm.authorize-key`")
    if policy:
        _attach_schedule(gce, vm, policy, created, timeout)
    if where := gcp_ssh.os_login_source(gce, vm):
        _warn(f"OS Login is enabled in the {where} metadata: ssh-keys metadata is ignored")


def _schedule(gce: gcp.Gce, timeout) -> str:
    """The snapshot schedule's URL, made now if missing (before the VM: a missing
    permission stops `vm.create` with nothing created)."""
    link, made, warning = snap.ensure_schedule(gce, timeout, "vm create")
    want = snap.wanted(gce.settings)
    print(f"snapshot schedule {want.name} ({want.text()}): "
          f"{'created' if made else 'already there'} in {want.region}")
    if warning:
        _warn(warning)
    return link


def _attach_schedule(gce: gcp.Gce, vm, policy: str, created: bool, timeout) -> None:
    """A new VM's boot disk was made with the schedule: read back, so the line printed is
    what the disk has (attached now if the API left it out); an existing one gets it now."""
    name = policy.rsplit("/", 1)[-1]
    disk = snap.get_disk(gce, vm, "vm create")
    done = snap.attach(gce, disk, policy, timeout, "vm create")
    if created and done == "already":
        print(f"boot disk {disk.name}: snapshot schedule {name} attached")
    elif done == "other":
        _warn(f"boot disk {disk.name} has another resource policy "
              f"({', '.join(p.rsplit('/', 1)[-1] for p in disk.resource_policies)}), and a "
              f"disk takes one snapshot schedule: {name} is not attached; see `inv "
              "vm.snapshots`")
    else:
        print(f"boot disk {disk.name}: snapshot schedule {name} "
              f"{'attached now' if done == 'attached' else 'already attached'}")


@task(help=VM_HELP)
@one_line_errors
def status(c, project=None, zone=None, instance=None):
    """Print the VM's state, zone, machine type, external IP and uptime."""
    settings = _settings(c, project, zone, instance)
    gce = gcp.connect(settings)
    print(f"VM {gce.name} in project {gce.project}")
    for line in describe(gcp.get_instance(gce, "vm status"), gce.zone):
        print(f"  {line}")


def _power(c, action: str, project, zone, instance, timeout) -> None:
    gce = gcp.connect(_settings(c, project, zone, instance))
    vm = gcp.power(gce, action, timeout)
    print(f"VM {gce.name}: {action} done, now {vm.status} "
          f"({gcp.external_ip(vm) or 'no external IP'})")


@task(help={**VM_HELP, "timeout": TIMEOUT_HELP})
@one_line_errors
def start(c, project=None, zone=None, instance=None, timeout=300):
    """Start the stopped VM (an ephemeral external IP may change)."""
    _power(c, "start", project, zone, instance, timeout)


@task(help={**VM_HELP, "timeout": TIMEOUT_HELP})
@one_line_errors
def stop(c, project=None, zone=None, instance=None, timeout=300):
    """Stop the VM (the disk stays and is still billed beyond the free tier)."""
    _power(c, "stop", project, zone, instance, timeout)


@task(help={**VM_HELP, "timeout": TIMEOUT_HELP})
@one_line_errors
def reset(c, project=None, zone=None, instance=None, timeout=300):
    """Hard-reset the running VM, like pressing the reset button."""
    _power(c, "reset", project, zone, instance, timeout)


@task(help=VM_HELP)
@one_line_errors
def ip(c, project=None, zone=None, instance=None):
    """Print only the VM's external IP (for scripts)."""
    gce = gcp.connect(_settings(c, project, zone, instance))
    vm = gcp.get_instance(gce, "vm ip")
    address = gcp.external_ip(vm)
    if not address:
        raise gcp.GcpError("vm ip", f"VM {gce.name} has no external IP ({vm.status}): "
                           "start it with `inv vm.start`")
    print(address)


@task(help={**VM_HELP, "user": "login user on the VM (default: nightguard.ssh.user)",
            "key": "public key file (default: nightguard.ssh.key_filename + .pub)",
            "timeout": TIMEOUT_HELP})
@one_line_errors
def authorize_key(c, project=None, zone=None, instance=None, user=None, key=None,
                  timeout=300):
    """Add an SSH public key to the VM's ssh-keys metadata, keeping the other keys."""
    settings = _settings(c, project, zone, instance, ssh__user=user)
    if key:
        path = Path(key).expanduser()
        parts = path.read_text().split() if path.is_file() else []
        if len(parts) < 2:
            raise ConfigError(f"--key: {path} is not an OpenSSH public key file")
        public = " ".join(parts[:2])
    else:
        public = gcp_ssh.public_key(settings)
    gce = gcp.connect(settings)
    login = settings["ssh.user"]
    if gcp_ssh.authorize_key(gce, login, public, timeout):
        print(f"authorized the key for {login} on VM {gce.name}")
    else:
        print(f"the key for {login} is already authorized on VM {gce.name}")


@task(help={**VM_HELP, "json": "print JSON instead of text"})
@one_line_errors
def snapshots(c, project=None, zone=None, instance=None, json_=False):
    """List the boot disk's snapshots, newest first, and its daily snapshot schedule.

    Each snapshot: name, time (UTC), storage it takes (GB, billed per GB-month), status, and
    whether the schedule made it."""
    gce = gcp.connect(_settings(c, project, zone, instance))
    step = "vm snapshots"
    disk = snap.get_disk(gce, gcp.get_instance(gce, step), step)
    schedule = snap.attached_schedule(gce, disk, step)
    rows = [snap.snapshot_row(s) for s in snap.list_snapshots(gce, disk, step)]
    if json_:
        plan = schedule and {"name": schedule.name, "region": schedule.region,
                             "start_time": schedule.start_time,
                             "keep_days": schedule.keep_days}
        print(json.dumps({"instance": gce.name, "disk": disk.name, "schedule": plan or None,
                          "snapshots": rows}, indent=2, sort_keys=True))
        return
    if schedule:
        print(f"boot disk {disk.name}: snapshot schedule {schedule.name} ({schedule.text()})")
    elif disk.resource_policies:  # a disk takes one snapshot schedule: ours cannot join
        names = [p.rsplit("/", 1)[-1] for p in disk.resource_policies]
        print(f"boot disk {disk.name}: no daily schedule attached, but {', '.join(names)}: "
              f"detach it (`gcloud compute disks remove-resource-policies {disk.name} --zone "
              f"{gce.zone} --resource-policies {names[0]}`), then run `inv vm.create`")
    else:
        print(f"boot disk {disk.name}: no schedule attached: run `inv vm.create` (it attaches "
              f"{snap.policy_name(gce.name)} to an existing VM's disk; "
              "nightguard.gcp.snapshots.enabled must be true)")
    for line in snap.table(rows) if rows else ["no snapshots yet"]:
        print(line)


ns = Collection("vm", create, status, start, stop, reset, ip, authorize_key, snapshots)
