"""SSH on the Compute Engine VM: keys in the ssh-keys metadata (read-modify-write with the
fingerprint), the project's key pair, and the VM's SSH address with its host key pinned in
the project-local known_hosts.

Config keys: ``nightguard.ssh.user/port/key_filename/known_hosts/connect_timeout``.
"""

from __future__ import annotations

import base64
import os
import socket
import sys
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tasks.config import Settings
from tasks.deploy.remote import SshTarget
from tasks.errors import ConfigError, StepFailed
from tasks.gcp.api import (
    Gce,
    GcpError,
    api_errors,
    connect,
    external_ip,
    get_instance,
    v1,
    wait_for_operation,
)

DEFAULT_KEY = ".ssh/nightguard_ed25519"
METADATA_ATTEMPTS = 5


# -- SSH keys in metadata -------------------------------------------------------------
def _metadata(items) -> dict[str, str]:
    return {item.key: item.value for item in items}


def os_login_source(gce: Gce, instance) -> str:
    """'VM' or 'project' when OS Login is on (then ssh-keys metadata is ignored), else ''."""
    own = _metadata(instance.metadata.items).get("enable-oslogin")
    if own is not None:  # the VM's value overrides the project's
        return "VM" if own.strip().upper() == "TRUE" else ""
    try:
        with api_errors(gce, "vm authorize-key"):
            project = gce.call(gce.projects.get, project=gce.project)
    except GcpError as exc:
        if exc.status == 403:  # may not read project metadata; the VM's value decides
            return ""
        raise
    common = _metadata(project.common_instance_metadata.items).get("enable-oslogin", "")
    return "project" if common.strip().upper() == "TRUE" else ""


def ssh_keys_entry(user: str, public_key: str) -> str:
    """'user:TYPE BASE64 user', the line format the guest agent reads."""
    kind, blob = public_key.split()[:2]
    return f"{user}:{kind} {blob} {user}"


def _has_key(lines: list[str], user: str, blob: str) -> bool:
    for line in lines:
        owner, _, key = line.partition(":")
        if owner.strip() == user and blob in key.split()[1:2]:
            return True
    return False


def authorize_key(gce: Gce, user: str, public_key: str, timeout: float | None = None) -> bool:
    """Add ``user``'s key to the VM's ssh-keys metadata, keeping every other key.
    True if added, False if already there. Retries when the fingerprint went stale."""
    step = "vm authorize-key"
    blob = public_key.split()[1]
    for attempt in range(METADATA_ATTEMPTS):
        instance = get_instance(gce, step)
        if attempt == 0 and (where := os_login_source(gce, instance)):
            raise GcpError(step, f"OS Login is enabled ({where} metadata enable-oslogin=TRUE),"
                           " so the VM ignores ssh-keys metadata: add the key with `gcloud "
                           "compute os-login ssh-keys add --key-file KEY.pub` or set "
                           "enable-oslogin=FALSE on the VM")
        items = _metadata(instance.metadata.items)
        lines = [line for line in items.get("ssh-keys", "").splitlines() if line.strip()]
        if _has_key(lines, user, blob):
            return False
        items["ssh-keys"] = "\n".join([*lines, ssh_keys_entry(user, public_key)])
        metadata = v1().Metadata(
            fingerprint=instance.metadata.fingerprint,
            items=[v1().Items(key=k, value=v) for k, v in items.items()])
        try:
            with api_errors(gce, step):
                op = gce.call(gce.instances.set_metadata_unary, project=gce.project,
                              zone=gce.zone, instance=gce.name, metadata_resource=metadata)
        except GcpError as exc:
            if exc.status == 412:  # someone else wrote metadata since our read
                continue
            raise
        wait_for_operation(gce, op, step, timeout)
        return True
    raise GcpError(step, f"VM metadata kept changing during {METADATA_ATTEMPTS} attempts "
                   "(HTTP 412): retry in a moment")



def public_key(settings: Settings, out=None) -> str:
    """'TYPE BASE64' of the login key: KEY.pub, else derived from KEY, else (no key
    configured) a new ed25519 pair at .ssh/nightguard_ed25519 in the project."""
    key = private_key_path(settings)
    pub = Path(f"{key}.pub")
    if pub.is_file():
        parts = pub.read_text().split()
        if len(parts) < 2:
            raise ConfigError(f"{pub} is not an OpenSSH public key")
        return " ".join(parts[:2])
    if key.is_file():
        try:
            loaded = paramiko.PKey.from_path(key)
        except paramiko.PasswordRequiredException:
            raise ConfigError(f"{key} is encrypted and {pub} is missing: create it with "
                              f"`ssh-keygen -y -f {key} > {pub}`") from None
        except (paramiko.SSHException, ValueError, OSError) as exc:
            raise ConfigError(f"{key} is not a usable SSH private key: {exc}") from None
        return f"{loaded.get_name()} {loaded.get_base64()}"
    if settings["ssh.key_filename"]:
        raise ConfigError(f"{settings.source('ssh.key_filename')}: nightguard.ssh.key_filename:"
                          f" {key} not found")
    return generate_keypair(key, out)


def generate_keypair(key: Path, out=None) -> str:
    private = Ed25519PrivateKey.generate()
    key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    with os.fdopen(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
        handle.write(pem)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
    Path(f"{key}.pub").write_text(f"{public} nightguard\n")
    print(f"generated SSH key pair {key} (keep .ssh/ out of git)", file=out or sys.stderr)
    return public


# -- SSH address and host key ---------------------------------------------------------
def private_key_path(settings: Settings) -> Path:
    """The configured key, else the project's generated one."""
    if settings["ssh.key_filename"]:
        return settings.path("ssh.key_filename")
    return settings.root / DEFAULT_KEY


def published_host_keys(gce: Gce) -> list[paramiko.PKey]:
    """Host keys the guest agent published as guest attributes ([] if none)."""
    try:
        with api_errors(gce, "vm host keys"):
            # query_path is not a flattened argument: only the request object carries it.
            request = v1().GetGuestAttributesInstanceRequest(
                project=gce.project, zone=gce.zone, instance=gce.name, query_path="hostkeys/")
            found = gce.call(gce.instances.get_guest_attributes, request=request)
    except GcpError as exc:
        if exc.status in (400, 403, 404):  # disabled, not yet written, or not allowed
            return []
        raise
    keys = []
    for item in found.query_value.items:
        try:
            keys.append(paramiko.PKey.from_type_string(item.key, base64.b64decode(item.value)))
        except (ValueError, paramiko.SSHException):
            continue  # a key type paramiko cannot use is no use for pinning
    return keys


def fetch_host_key(host: str, port: int, timeout: float) -> paramiko.PKey:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise StepFailed("host key", f"{host}:{port} unreachable: {exc}") from None
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise StepFailed("host key", f"no SSH host key from {host}:{port}: {exc}") from None
    finally:
        transport.close()


def pin_host_key(gce: Gce, host: str, port: int, known_hosts: Path, out=None) -> None:
    """Make ``known_hosts`` hold the VM's host key: from guest attributes (authoritative,
    replaces a stale entry after the address was reused), else on first use only."""
    out = out or sys.stdout
    entry = host if port == 22 else f"[{host}]:{port}"
    hosts = paramiko.HostKeys()
    if known_hosts.exists():
        hosts.load(str(known_hosts))
    known = hosts.lookup(entry)
    published = published_host_keys(gce)
    if published:
        if known and all(k.get_name() in known and known[k.get_name()] == k
                         for k in published):
            return
        while True:
            try:
                del hosts[entry]
            except KeyError:
                break
        for key in published:
            hosts.add(entry, key.get_name(), key)
        print(f"pinned host key of {entry} from the VM's guest attributes: "
              f"{published[0].get_name()} {published[0].fingerprint}", file=out)
    elif known:
        return  # the connection itself verifies it (RejectPolicy): a change is refused
    else:
        key = fetch_host_key(host, port, gce.settings["ssh.connect_timeout"])
        hosts.add(entry, key.get_name(), key)
        print(f"recorded host key of {entry} on first use: {key.get_name()} "
              f"{key.fingerprint} (compare with the VM's serial console)", file=out)
    known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    hosts.save(str(known_hosts))


def ssh_target(settings: Settings, gce: Gce | None = None, out=None) -> SshTarget:
    """The VM's SSH address via the API, with its host key pinned in known_hosts."""
    gce = gce or connect(settings)
    instance = get_instance(gce, "vm address")
    if instance.status != "RUNNING":
        raise GcpError("vm address", f"VM {gce.name} is {instance.status}: start it with "
                       "`inv vm.start`")
    host = external_ip(instance)
    if not host:
        raise GcpError("vm address", f"VM {gce.name} has no external IP: it needs an "
                       "ONE_TO_ONE_NAT access config (recreate with `inv vm.create`)")
    port = settings["ssh.port"]
    known_hosts = settings.path("ssh.known_hosts")
    pin_host_key(gce, host, port, known_hosts, out)
    key = private_key_path(settings)
    return SshTarget(host=host, port=port, user=settings["ssh.user"],
                     key_filename=str(key) if key.exists() else "",
                     known_hosts=str(known_hosts), label=f"gcp {gce.name} ({host})")
