"""SSH on the Compute Engine VM: keys in the ssh-keys metadata (read-modify-write with the
fingerprint), the project's key pair, and the VM's SSH address with its host key pinned in
the project-local known_hosts.

Host keys are pinned by address (the known_hosts the connection checks) and by instance
(``pin_host_key``), so a new ephemeral IP after a stop/start keeps the VM's pinned key
instead of trusting whatever answers there. A VM created minutes ago is still being set up:
its sshd and its login user come up during its first minutes, so the target it gets waits
for them (``nightguard.ssh.login_wait``, one bound for both).

Config keys: ``nightguard.ssh.user/port/key_filename/known_hosts/connect_timeout`` and
``nightguard.ssh.login_wait``.
"""

from __future__ import annotations

import base64
import os
import socket
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..config import Settings, parse_duration
from ..errors import ConfigError, StepFailed
from ..ssh.address import SshTarget
from ..ssh.remote import Patience, connect_failure, shown_duration
from .api import (
    Gce,
    GcpError,
    api_errors,
    connect,
    external_ip,
    get_instance,
    v1,
    wait_for_operation,
)
from .moveplan import moved_note, place

DEFAULT_KEY = ".ssh/nightguard_ed25519"
METADATA_ATTEMPTS = 5
# A VM this young may still be setting itself up: the guest agent creates the login user
# and writes its key from ssh-keys a minute or so after boot, sshd starts about then, and
# `inv vm.create` returns before either. Later a refused login is a real refusal.
FRESH_VM = timedelta(minutes=15)
LOGIN_HINT = ("the key is not in the VM's ssh-keys metadata or OS Login is on: "
              "`inv vm.authorize-key` adds it (and says if OS Login is on)")


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


def read_host_key(host: str, port: int, timeout: float) -> paramiko.PKey:
    """The key the SSH server at host:port offers; raises OSError, EOFError, SSHException."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=timeout)
            return transport.get_remote_server_key()
        finally:
            transport.close()


def host_key_error(host: str, port: int, exc: BaseException) -> StepFailed:
    if isinstance(exc, OSError):
        return StepFailed("host key", f"{host}:{port} unreachable: {exc}")
    return StepFailed("host key", f"no SSH host key from {host}:{port}: {exc}")


def instance_pin_name(gce: Gce, instance) -> str:
    """The VM's own name in known_hosts: ``gce/PROJECT/ZONE/NAME/ID``. The numeric id is new
    when a VM is re-created under the same name, so its new key is not taken for a change;
    ssh(1) can check against it too (``-o HostKeyAlias=gce/...``)."""
    return f"gce/{gce.project}/{gce.zone}/{instance.name}/{instance.id}"


def instance_pins_path(known_hosts: Path) -> Path:
    """Where the pins by instance live: beside known_hosts, in its format (``.instances``),
    so that known_hosts itself holds addresses only, as ssh(1) writes it."""
    return known_hosts.with_name(f"{known_hosts.name}.instances")


def _load(path: Path) -> paramiko.HostKeys:
    hosts = paramiko.HostKeys()
    if path.exists():
        hosts.load(str(path))
    return hosts


def _keys(hosts: paramiko.HostKeys, name: str) -> dict[str, str]:
    return {kind: key.get_base64() for kind, key in (hosts.lookup(name) or {}).items()}


def _pin(hosts: paramiko.HostKeys, name: str, keys: list[paramiko.PKey], path: Path) -> None:
    """Make ``name`` hold exactly ``keys`` in the file at ``path`` (written only if not)."""
    if _keys(hosts, name) == {key.get_name(): key.get_base64() for key in keys}:
        return
    while True:
        try:
            del hosts[name]
        except KeyError:
            break
    for key in keys:
        hosts.add(name, key.get_name(), key)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    hosts.save(str(path))


def _shown(keys: list[paramiko.PKey]) -> str:
    return f"{keys[0].get_name()} {keys[0].fingerprint}"


def pin_host_key(gce: Gce, instance, host: str, port: int, known_hosts: Path, out=None,
                 wait: float = 0.0) -> float:
    """Make ``known_hosts`` hold the VM's host key for host:port, and its instance pin
    (``instance_pin_name`` in ``instance_pins_path``) the same key. The key comes from, in
    order: guest attributes (authoritative: they replace a stale entry after the address was
    reused, or a changed key); the instance's pin (a new IP after a stop/start gets the key
    the VM had, and a stale entry of another VM at that IP gives way to it); the address's
    own entry (the connection verifies it strictly: a change is refused); else first use,
    waiting up to ``wait`` seconds for a VM's sshd that is not up yet. Returns the seconds
    it waited."""
    out = out or sys.stdout
    entry = host if port == 22 else f"[{host}]:{port}"
    by_address, by_instance = _load(known_hosts), _load(instance_pins_path(known_hosts))
    name = instance_pin_name(gce, instance)
    had, pinned = by_address.lookup(entry), by_instance.lookup(name)
    keys, note, waited = published_host_keys(gce), "", 0.0
    if keys:
        note = f"pinned host key of {entry} from the VM's guest attributes: {_shown(keys)}"
    elif pinned:
        keys = list(pinned.values())
        note = (f"replaced the host key of {entry} (another VM's: addresses are reused) with "
                f"the one pinned for VM {gce.name}: {_shown(keys)}" if had else
                f"pinned host key of {entry} (VM {gce.name}'s new address) from the key "
                f"pinned for the VM: {_shown(keys)}")
    elif had:
        keys = list(had.values())
    else:
        keys, note, waited = first_host_keys(gce, host, port, entry, wait, out)
    if note and _keys(by_address, entry) != {key.get_name(): key.get_base64() for key in keys}:
        print(note, file=out)
    _pin(by_address, entry, keys, known_hosts)
    _pin(by_instance, name, keys, instance_pins_path(known_hosts))
    return waited


def first_host_keys(gce: Gce, host: str, port: int, entry: str, wait: float,
                    out) -> tuple[list[paramiko.PKey], str, float]:
    """(keys, what to say, seconds waited) for a VM nothing pins yet: the key its sshd
    offers, on first use. A VM still booting is asked again for up to ``wait`` seconds while
    its sshd refuses or does not answer; guest attributes published meanwhile win."""
    timeout = gce.settings["ssh.connect_timeout"]
    with Patience(wait, out) as patience:
        while True:
            try:
                key = read_host_key(host, port, timeout)
                return [key], (f"recorded host key of {entry} on first use: {_shown([key])} "
                               "(compare with the VM's serial console)"), patience.waited
            except (OSError, EOFError, paramiko.SSHException) as exc:
                reason = connect_failure(exc, timeout)
                line = (f"waiting for sshd at {host}:{port} to read its host key ({reason}; "
                        f"retrying up to {shown_duration(wait)})")
                if not patience.again(reason, line):
                    if reason and wait > 0:
                        raise StepFailed("host key", f"{host}:{port}: {reason} on every try "
                                         f"for {shown_duration(wait)}") from None
                    raise host_key_error(host, port, exc) from None
            if keys := published_host_keys(gce):
                return keys, (f"pinned host key of {entry} from the VM's guest attributes: "
                              f"{_shown(keys)}"), patience.waited


def resolve_target(settings: Settings) -> SshTarget | None:
    """The resolver of target gcp (registered with ``tasks.ssh.targets`` by the root
    collection): the VM's address from the API, unless ``nightguard.ssh.host`` names the
    host (an IAP tunnel's ssh_config alias, say): then None, and ssh_config decides."""
    return None if settings["ssh.host"] else ssh_target(settings)


def created_recently(instance, now: datetime | None = None) -> bool:
    """True for a VM created less than ``FRESH_VM`` ago (creationTimestamp, RFC 3339)."""
    try:
        created = datetime.fromisoformat(instance.creation_timestamp)
    except (TypeError, ValueError):
        return False
    return (now or datetime.now(UTC)) - created < FRESH_VM


def ssh_target(settings: Settings, gce: Gce | None = None, out=None) -> SshTarget:
    """The VM's SSH address via the API, with its host key pinned in known_hosts. A VM
    created minutes ago is waited for: first its sshd (for the host key), then the login,
    within one ``nightguard.ssh.login_wait`` in all."""
    gce = gce or connect(settings)
    instance = get_instance(gce, "vm address")
    if instance.status != "RUNNING":
        moved = moved_note(settings.path("move_journal"), place(settings))
        raise GcpError("vm address", f"VM {gce.name} is {instance.status}: "
                       + (moved if moved else "start it with `inv vm.start`"))
    host = external_ip(instance)
    if not host:
        raise GcpError("vm address", f"VM {gce.name} has no external IP: it needs an "
                       "ONE_TO_ONE_NAT access config (recreate with `inv vm.create`)")
    port, user = settings["ssh.port"], settings["ssh.user"]
    known_hosts = settings.path("ssh.known_hosts")
    wait = parse_duration(settings["ssh.login_wait"]) if created_recently(instance) else 0.0
    waited = pin_host_key(gce, instance, host, port, known_hosts, out, wait)
    key = private_key_path(settings)
    return SshTarget(host=host, port=port, user=user,
                     key_filename=str(key) if key.exists() else "",
                     known_hosts=str(known_hosts), label=f"gcp {gce.name} ({host})",
                     login_wait=max(0.0, wait - waited),
                     login_wait_reason=f"the VM's guest agent to install the key for {user}",
                     login_hint=LOGIN_HINT,
                     pinned_as=((instance_pin_name(gce, instance),
                                 str(instance_pins_path(known_hosts))),))
