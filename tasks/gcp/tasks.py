"""`inv vm.*`: the Compute Engine VM the agent runs on (create, status, start, stop, reset,
ip, authorize-key).

Config keys (``nightguard:`` in Invoke's config files, or ``NIGHTGUARD_<KEY>``):
  gcp.project (required), gcp.zone, gcp.instance, gcp.machine_type, gcp.image_project,
  gcp.image_family, gcp.disk_gb, gcp.disk_type, gcp.network_tag,
  gcp.credentials_file (service-account key; default: Application Default Credentials),
  gcp.api_endpoint (e.g. a local fake at http://127.0.0.1:PORT),
  ssh.user, ssh.key_filename (its .pub goes into the VM's ssh-keys metadata; when empty a
  key pair is generated at .ssh/nightguard_ed25519), ssh.known_hosts, ssh.port.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

from invoke import Collection, task

from ..cli import one_line_errors, settings_for
from ..config import Settings
from ..errors import ConfigError
from . import api as gcp
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
    leave the free tier."""
    settings = _settings(c, project, zone, instance, gcp__machine_type=machine_type,
                         gcp__disk_gb=disk_gb)
    for warning in gcp.free_tier_warnings(settings):
        _warn(f"{warning}: this VM will be billed")
    gce = gcp.connect(settings)
    user = settings["ssh.user"]
    entry = gcp_ssh.ssh_keys_entry(user, gcp_ssh.public_key(settings))
    vm, created = gcp.create_instance(gce, entry, timeout)
    address = gcp.external_ip(vm) or "no external IP yet"
    if created:
        print(f"created VM {gce.name} in {gce.zone} ({vm.status}, {address}); "
              f"SSH user {user}")
        print(f"service account: {gcp.service_account_text(vm)}")
    else:
        print(f"VM {gce.name} already exists in {gce.zone} ({vm.status}, {address}): "
              "nothing created; add your key with `inv vm.authorize-key`")
    if where := gcp_ssh.os_login_source(gce, vm):
        _warn(f"OS Login is enabled in the {where} metadata: ssh-keys metadata is ignored")


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


ns = Collection("vm", create, status, start, stop, reset, ip, authorize_key)
