"""Where the tasks run: turns the configured target into an SSH address and opens
the one ``Remote`` a task uses.

Config keys: ``nightguard.target`` (sandbox | ssh | gcp), ``nightguard.sandbox.*``,
``nightguard.ssh.*``, ``nightguard.gcp.*``.
"""

from __future__ import annotations

from tasks.config import Settings
from tasks.deploy.remote import Remote, SshTarget
from tasks.errors import ConfigError


def resolve_target(settings: Settings) -> SshTarget:
    """The SSH address of the configured target; raises ConfigError with a hint."""
    kind = settings["target"]
    if kind == "sandbox":
        from tasks.sandbox import machine as sandbox

        name = settings["sandbox.name"]
        try:
            found = sandbox.target(name)
        except RuntimeError as exc:
            raise ConfigError(str(exc)) from None
        return SshTarget(host=found["host"], port=int(found["port"]), user=found["user"],
                         key_filename=found["key_filename"],
                         known_hosts=found["known_hosts"], label=f"sandbox {name}")
    if kind == "gcp" and not settings["ssh.host"]:
        from tasks.gcp import ssh as gcp

        return gcp.ssh_target(settings)
    key = settings["ssh.key_filename"]
    return SshTarget(host=settings["ssh.host"], port=settings["ssh.port"],
                     user=settings["ssh.user"],
                     key_filename=str(settings.path("ssh.key_filename")) if key else "",
                     known_hosts=str(settings.path("ssh.known_hosts")))


def open_remote(settings: Settings, *, dry_run: bool = False, redact=None) -> Remote:
    return Remote(resolve_target(settings), dry_run=dry_run,
                  connect_timeout=settings["ssh.connect_timeout"],
                  command_timeout=settings["ssh.command_timeout"],
                  redact=redact or (lambda text: text))
