"""The SSH address of a host the user names (target ssh, ``--host``), as their OpenSSH
configuration describes it.

Read: ``~/.ssh/config``, then ``/etc/ssh/ssh_config`` (the first value found wins, as in
ssh(1)). Followed: HostName, Port, User, IdentityFile, IdentitiesOnly, ProxyJump (a chain
``a,b`` too; each hop resolved the same way and its host key checked like the target's),
ProxyCommand (e.g. an IAP tunnel: ``gcloud compute start-iap-tunnel %h %p
--listen-on-stdin ...``), UserKnownHostsFile and GlobalKnownHostsFile (read, never
written). Not followed: StrictHostKeyChecking (checking is always strict), Include (paramiko
does not read it), and the rest of ssh_config(5).

A ``nightguard.ssh.*`` value set anywhere but the defaults (a config file, the environment,
a flag) wins over ssh_config; a default (port 22, user ubuntu) gives way to it. With
``nightguard.ssh.key_filename`` set, that key is the only one tried; without it, the keys of
a running ssh-agent, IdentityFile, else ~/.ssh/id_* (as ssh(1)).

``parse_host`` is the one reader of a host a user types (``--host``, ``nightguard.ssh.host``,
a ProxyJump hop): HOST, USER@HOST, HOST:PORT, USER@HOST:PORT, [IPV6]:PORT, USER@[IPV6]:PORT
or an alias; a user or port written there wins over the settings and ssh_config.

Config keys: ``nightguard.ssh.host`` (a name or a ``Host`` alias), ``ssh.port``,
``ssh.user``, ``ssh.key_filename``, ``ssh.known_hosts`` (the project's pins, read first).
"""

from __future__ import annotations

import getpass
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import paramiko

from ..config import Settings
from ..errors import ConfigError
from .address import SshTarget

USER_CONFIG = "~/.ssh/config"
SYSTEM_CONFIG = "/etc/ssh/ssh_config"
USER_KNOWN_HOSTS = "~/.ssh/known_hosts ~/.ssh/known_hosts2"  # ssh(1)'s defaults
GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2"
MAX_HOPS = 8


def load_ssh_config() -> paramiko.SSHConfig:
    """The user's ssh_config, then the system's, as one (the first value found wins)."""
    config = paramiko.SSHConfig()
    for name in (USER_CONFIG, SYSTEM_CONFIG):
        path = Path(os.path.expanduser(name))
        if not path.is_file():
            continue
        try:
            with path.open(encoding="utf-8") as handle:
                config.parse(handle)
        except (paramiko.ssh_exception.ConfigParseError, OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return config


def _lookup(config: paramiko.SSHConfig, alias: str, where: str) -> dict:
    try:
        return dict(config.lookup(alias))
    except (paramiko.SSHException, ValueError, OSError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _port(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{where}: Port {text!r} is not a number") from None


def _files(value: str) -> tuple[str, ...]:
    return tuple(os.path.expanduser(p) for p in value.split() if p != "none")


HOST_FORMS = ("HOST, USER@HOST, HOST:PORT, USER@HOST:PORT, [IPV6]:PORT, USER@[IPV6]:PORT "
              "or an ~/.ssh/config Host alias")
_HOST_NAME = re.compile(r"^[A-Za-z0-9_.%-]+$")  # a name, an IPv4 address or an alias
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?$")
_USER_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?$")


@dataclass(frozen=True)
class HostSpec:
    """A host as ssh(1) takes it: ``user`` and ``port`` are None when not given."""

    host: str
    user: str | None = None
    port: int | None = None


def parse_port(text: str, where: str) -> int:
    """A TCP port (1-65535) from text; ConfigError naming ``where`` otherwise."""
    text = str(text).strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"{where}: {text!r} is not a port number (1-65535)")
    return int(text)


def parse_host(spec: str, where: str = "--host") -> HostSpec:
    """The one parser of a host a user types (``--host``, ``nightguard.ssh.host``, a
    ProxyJump hop): HOST, USER@HOST, HOST:PORT, USER@HOST:PORT, [IPV6], [IPV6]:PORT,
    USER@[IPV6]:PORT, a bare IPv6 address, ssh://USER@HOST:PORT, or an ssh_config alias.
    Anything else is a ConfigError of one line naming the accepted forms."""
    text = str(spec).strip()
    refuse = ConfigError(f"{where}: {text!r} is not a host; use {HOST_FORMS}")
    rest = text.removeprefix("ssh://").rstrip("/") if text.startswith("ssh://") else text
    user, at, rest = rest.rpartition("@")
    if at and not _USER_NAME.match(user):
        raise refuse
    port = None
    if rest.startswith("["):
        host, closed, tail = rest[1:].partition("]")
        if not closed or not _IPV6.match(host) or host.count(":") < 2:
            raise refuse
        if tail:
            if not tail.startswith(":"):
                raise refuse
            port = parse_port(tail[1:], f"{where} {text}")
    elif rest.count(":") > 1:  # a bare IPv6 address: no port (ssh -p / --port gives one)
        host = rest
        if not _IPV6.match(host):
            raise refuse
    else:
        host, colon, given = rest.partition(":")
        if colon:
            port = parse_port(given, f"{where} {text}")
        if not _HOST_NAME.match(host):
            raise refuse
    if not host:
        raise refuse
    return HostSpec(host=host, user=user or None, port=port)


def _hop(config: paramiko.SSHConfig, spec: str, known_hosts: str, depth: int,
         follow: bool) -> SshTarget:
    """A ProxyJump hop: its own ssh_config entry; only the first hop of a chain follows its
    own ProxyJump / ProxyCommand (as ssh -J does)."""
    parsed = parse_host(spec, f"{USER_CONFIG}: ProxyJump")
    user, alias, port = parsed.user, parsed.host, parsed.port
    found = _lookup(config, alias, f"{USER_CONFIG}: ProxyJump {spec}")
    jump, command = _proxies(config, found, known_hosts, depth) if follow else (None, "")
    return SshTarget(
        host=found.get("hostname", alias),
        port=port or _port(found.get("port", "22"), f"{USER_CONFIG}: Host {alias}"),
        user=user or found.get("user") or getpass.getuser(),
        known_hosts=known_hosts,
        identity_files=_identity_files(found),
        identities_only=found.get("identitiesonly", "no").lower() == "yes",
        other_known_hosts=_other_known_hosts(found),
        jump=jump, proxy_command=command, alias=alias)


def _proxies(config: paramiko.SSHConfig, found: dict, known_hosts: str,
             depth: int) -> tuple[SshTarget | None, str]:
    """(the last hop before the host, or None; a ProxyCommand, or "")."""
    chain = found.get("proxyjump") or "none"
    if chain.lower() != "none":
        if depth >= MAX_HOPS:
            raise ConfigError(f"{USER_CONFIG}: ProxyJump: more than {MAX_HOPS} hops (a loop?)")
        hop = None
        for index, spec in enumerate(s.strip() for s in chain.split(",")):
            previous = hop
            hop = _hop(config, spec, known_hosts, depth + 1, follow=index == 0)
            if previous is not None:
                hop = replace(hop, jump=previous, proxy_command="")
        return hop, ""
    command = found.get("proxycommand") or "none"  # paramiko turns "none" into None
    return None, "" if command.lower() == "none" else command


def _identity_files(found: dict) -> tuple[str, ...]:
    """IdentityFile entries that exist (ssh(1) skips a missing one, with a warning)."""
    return tuple(p for p in (os.path.expanduser(f) for f in found.get("identityfile", []))
                 if os.path.isfile(p))


def _other_known_hosts(found: dict) -> tuple[str, ...]:
    return _files(found.get("userknownhostsfile", USER_KNOWN_HOSTS)) + \
        _files(found.get("globalknownhostsfile", GLOBAL_KNOWN_HOSTS))


def ssh_target(settings: Settings) -> SshTarget:
    """The target ``nightguard.ssh.host`` names, with what ssh_config says about it."""
    spec = parse_host(settings["ssh.host"],
                      f"{settings.source('ssh.host')}: nightguard.ssh.host")
    alias = spec.host
    config = load_ssh_config()
    found = _lookup(config, alias, f"{USER_CONFIG}: Host {alias}")
    known_hosts = str(settings.path("ssh.known_hosts"))

    def explicit(key: str) -> bool:
        return settings.source(key) != "defaults"

    port = settings["ssh.port"]
    if spec.port:
        port = spec.port
    elif not explicit("ssh.port") and "port" in found:
        port = _port(found["port"], f"{USER_CONFIG}: Host {alias}")
    user = spec.user or (settings["ssh.user"] if explicit("ssh.user") else
                         found.get("user", settings["ssh.user"]))
    key = str(settings.path("ssh.key_filename")) if settings["ssh.key_filename"] else ""
    jump, command = _proxies(config, found, known_hosts, 0)
    return SshTarget(
        host=found.get("hostname", alias), port=port, user=user, key_filename=key,
        known_hosts=known_hosts,
        identity_files=() if key else _identity_files(found),
        identities_only=found.get("identitiesonly", "no").lower() == "yes",
        other_known_hosts=_other_known_hosts(found),
        jump=jump, proxy_command=command, alias=alias)
