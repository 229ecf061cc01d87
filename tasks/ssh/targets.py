"""Where the tasks run: turns the configured target into an SSH address and opens
the one ``Remote`` a task uses.

The sandbox and the GCP VM are addressed by what the project knows (their own keys and
pinned host keys): their packages provide a resolver each, which the root collection
registers (``register``, in tasks/__init__.py), so this low layer imports nothing of them. A
host the user names (target ssh, ``--host``), or a target whose resolver declines (None), is
resolved through their ssh_config (``tasks.ssh.sshconfig``), where an explicit
``nightguard.ssh.*`` wins.

Config keys: ``nightguard.target`` (sandbox | ssh | gcp), ``nightguard.sandbox.*``,
``nightguard.ssh.*``, ``nightguard.gcp.*``.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import Settings
from . import sshconfig
from .address import SshTarget
from .remote import Remote

# target kind -> its SSH address from the settings, or None for "as ssh_config says"
Resolver = Callable[[Settings], SshTarget | None]
RESOLVERS: dict[str, Resolver] = {}


def register(kind: str, resolver: Resolver) -> None:
    """Let ``resolver`` address the targets of ``kind`` (the task layer wires these up)."""
    RESOLVERS[kind] = resolver


def resolve_target(settings: Settings) -> SshTarget:
    """The SSH address of the configured target; raises ConfigError with a hint."""
    resolver = RESOLVERS.get(settings["target"])
    found = resolver(settings) if resolver is not None else None
    return found if found is not None else sshconfig.ssh_target(settings)


def open_remote(settings: Settings, *, dry_run: bool = False, redact=None) -> Remote:
    return Remote(resolve_target(settings), dry_run=dry_run,
                  connect_timeout=settings["ssh.connect_timeout"],
                  command_timeout=settings["ssh.command_timeout"],
                  redact=redact or (lambda text: text))
