"""Where the tasks run: turns the configured target into an SSH address and opens
the one ``Remote`` a task uses.

The sandbox and the GCP VM are addressed by what the project knows (their own keys and
pinned host keys); a host the user names (target ssh, ``--host``) is resolved through their
ssh_config (``tasks.ssh.sshconfig``), where an explicit ``nightguard.ssh.*`` wins.

Config keys: ``nightguard.target`` (sandbox | ssh | gcp), ``nightguard.sandbox.*``,
``nightguard.ssh.*``, ``nightguard.gcp.*``.
"""

from __future__ import annotations

from ..config import Settings
from ..errors import ConfigError
from . import sshconfig
from .remote import Remote, SshTarget


def resolve_target(settings: Settings) -> SshTarget:
    """The SSH address of the configured target; raises ConfigError with a hint."""
    kind = settings["target"]
    if kind == "sandbox":
        from ..sandbox import machine as sandbox

        name = settings["sandbox.name"]
        try:
            found = sandbox.target(name)
        except RuntimeError as exc:
            raise ConfigError(str(exc)) from None
        return SshTarget(host=found["host"], port=int(found["port"]), user=found["user"],
                         key_filename=found["key_filename"],
                         known_hosts=found["known_hosts"], label=f"sandbox {name}")
    if kind == "gcp" and not settings["ssh.host"]:
        from ..gcp import ssh as gcp

        return gcp.ssh_target(settings)
    return sshconfig.ssh_target(settings)


def open_remote(settings: Settings, *, dry_run: bool = False, redact=None) -> Remote:
    return Remote(resolve_target(settings), dry_run=dry_run,
                  connect_timeout=settings["ssh.connect_timeout"],
                  command_timeout=settings["ssh.command_timeout"],
                  redact=redact or (lambda text: text))
