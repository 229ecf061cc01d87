"""Host-key pinning: the keys a connection accepts, and the commands that pin or unpin one.

Host keys (every hop's too) are checked strictly and never added: against the project's
known_hosts when it names the host (then it alone decides: a pin there is not overruled by
a stale line elsewhere), else against the user's and the system's known_hosts (what ssh(1)
already verified); a key marked ``@revoked`` in any of them is refused. An unknown key
stops the connection with its fingerprint and the command that pins it; a changed one with
the command that removes the old pin (``ssh-keygen -R``, for every name it is pinned under).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import paramiko

from .address import SshTarget, shown_path


class UnknownHostKey(paramiko.SSHException):
    """No known_hosts file names the host (or only with a revoked key); carries the key."""

    def __init__(self, name: str, key: paramiko.PKey, revoked: bool):
        super().__init__(f"{name}: host key {'revoked' if revoked else 'unknown'}")
        self.key = key
        self.revoked = revoked


class RefuseUnknownHostKeys(paramiko.MissingHostKeyPolicy):
    """paramiko's RejectPolicy, keeping the key it saw for the error message."""

    def __init__(self, revoked: set[str]):
        self.revoked = revoked

    def missing_host_key(self, client, hostname, key):
        raise UnknownHostKey(hostname, key, key.get_base64() in self.revoked)


def read_known_hosts(path: str) -> tuple[paramiko.HostKeys, set[str]]:
    """(the file's host keys, the keys its ``@revoked`` lines name). Lines paramiko cannot
    use are skipped, as ssh(1) does: ``@cert-authority`` (no host certificates here) and
    keys of unknown types; paramiko's own loader would stop at the first marker line."""
    keys, revoked = paramiko.HostKeys(), set()
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            fields = line.split()
            if fields[0] == "@revoked" and len(fields) >= 4:
                revoked.add(fields[3])
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
        except (paramiko.SSHException, paramiko.hostkeys.InvalidHostKey, ValueError):
            continue
        for name in entry.hostnames if entry is not None else ():
            keys.add(name, entry.key.get_name(), entry.key)
    return keys, revoked


def pin_host_keys(client: paramiko.SSHClient, target: SshTarget) -> str:
    """Give ``client`` the host's known keys and a policy that refuses any other; returns
    the file they came from ("" when none names the host)."""
    revoked: set[str] = set()
    chosen, source = None, ""
    for path in (target.known_hosts, *target.other_known_hosts):
        if not path or not os.path.isfile(path):
            continue
        try:
            keys, marked = read_known_hosts(path)
        except OSError:
            continue  # unreadable: as ssh(1), as if absent
        revoked |= marked
        found = keys.lookup(target.host_key_name)
        if chosen is None and found:
            chosen, source = found, path
    for kind, key in (chosen or {}).items():
        if key.get_base64() not in revoked:
            client.get_host_keys().add(target.host_key_name, kind, key)
    client.set_missing_host_key_policy(RefuseUnknownHostKeys(revoked))
    return source


def pin_command(target: SshTarget, key: paramiko.PKey) -> str:
    """The command that adds ``key`` to the project's known_hosts: ssh-keyscan for a host
    this machine reaches itself, the exact line for one behind a jump or a ProxyCommand."""
    known_hosts = shlex.quote(shown_path(target.known_hosts))
    parent = Path(target.known_hosts).parent
    mkdir = "" if parent.is_dir() else f"mkdir -p {shlex.quote(shown_path(parent))} && "
    if target.jump is not None or target.proxy_command:
        line = f"{target.host_key_name} {key.get_name()} {key.get_base64()}"
        return f"{mkdir}echo {shlex.quote(line)} >> {known_hosts}"
    kind = key.get_name()
    kind = "ecdsa" if kind.startswith("ecdsa-") else kind.removeprefix("ssh-")
    return (f"{mkdir}ssh-keyscan -t {kind} -p {target.port} {shlex.quote(target.host)} "
            f">> {known_hosts}")


def unpin_command(target: SshTarget, source: str) -> str:
    """The command that removes the host's pin from ``source`` (and, when that is the
    project's file, the other names it is pinned under), for a key that changed."""
    pins = [(target.host_key_name, source)]
    if source == target.known_hosts:
        pins += target.pinned_as
    return " && ".join(f"ssh-keygen -R {shlex.quote(name)} -f {shlex.quote(shown_path(path))}"
                       for name, path in pins)
