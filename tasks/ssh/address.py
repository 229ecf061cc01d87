"""Where and how to log in to a host (``SshTarget``: what ``tasks.ssh.targets`` resolves
and ``tasks.ssh.remote`` connects to), and paths as a command to paste shows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SshTarget:
    """Where and how to log in; host keys: ``tasks.ssh.hostkeys``, keys to log in
    with: ``tasks.ssh.remote``."""

    host: str
    port: int
    user: str
    key_filename: str = ""  # the one key to log in with (no agent, no other key)
    known_hosts: str = ""  # the project's pins: when they name the host, they alone decide
    label: str = ""
    identity_files: tuple[str, ...] = ()  # ssh_config IdentityFile: with the agent's keys
    identities_only: bool = False  # ssh_config IdentitiesOnly: no agent
    other_known_hosts: tuple[str, ...] = ()  # read when known_hosts does not name the host
    jump: SshTarget | None = None  # ProxyJump: the hop this host is reached through
    proxy_command: str = ""  # ProxyCommand: its stdin/stdout is the connection
    alias: str = ""  # the name the user gave (an ssh_config Host), when it is not host
    login_wait: float = 0.0  # seconds to retry refused logins/connections (a new VM)
    login_wait_reason: str = ""  # what it waits for: "the VM's guest agent to install ..."
    login_hint: str = ""  # what to check when the login is still refused after login_wait
    # (name, file): other names the project pins this host's key under (the GCP instance)
    pinned_as: tuple[tuple[str, str], ...] = ()

    @property
    def host_key_name(self) -> str:
        """The host as known_hosts names it."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def describe(self) -> str:
        if self.label:
            return self.label
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6
        text = f"{self.user}@{host}:{self.port}"
        if self.alias and self.alias != self.host:
            text += f" ({self.alias})"
        if self.jump is not None:
            text += f" via {self.jump.describe()}"
        elif self.proxy_command:
            text += " via ProxyCommand"
        return text


def shown_path(path: str | Path) -> str:
    """A path as a command to paste should say it: relative to the current directory if
    under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd())) or "."
    except ValueError:
        return str(path)
