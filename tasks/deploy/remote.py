"""The one place that talks to a host: a single Fabric connection per run and host.

A task opens one pipe (``open_pipe``: one command, the host helper's bootstrap, see
``tasks.deploy.session``) and sends every step through it; ``stream`` serves `logs -f`.
This module decides how bytes travel and how progress shows: one SSH connection, connect
timeouts and keepalives, host keys checked against the project's known_hosts (never added
blindly), ``sudo -n`` (never a password prompt), secrets only inside the pipe (never in an
argv, ``env=`` or a pty), a line per step with its duration - live on a terminal, plain
lines every few seconds elsewhere - and failures turned into ``StepFailed``: one line.

Config keys used: ``nightguard.ssh.connect_timeout``, ``nightguard.ssh.command_timeout``.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paramiko
from fabric import Config, Connection

from tasks.deploy.hostlink import PipeClosed
from tasks.errors import StepFailed
from tasks.progress import Step


@dataclass(frozen=True)
class SshTarget:
    host: str
    port: int
    user: str
    key_filename: str = ""
    known_hosts: str = ""
    label: str = ""

    def describe(self) -> str:
        return self.label or f"{self.user}@{self.host}:{self.port}"


@dataclass
class Stats:
    """What a run cost, for the summary line and the benchmarks."""

    connections: int = 0
    commands: int = 0
    steps: int = 0
    bytes_sent: int = 0


class SshPipe:
    """One command's stdin/stdout over an SSH channel, line by line, with timeouts."""

    def __init__(self, channel, stats: Stats):
        self.channel = channel
        self.stats = stats
        self.buffer = b""
        self.errors = b""

    def send(self, data: bytes) -> None:
        try:
            self.channel.sendall(data)
        except (OSError, EOFError, paramiko.SSHException):
            raise PipeClosed() from None
        self.stats.bytes_sent += len(data)

    def _drain_stderr(self) -> None:
        while self.channel.recv_stderr_ready():
            self.errors = (self.errors + self.channel.recv_stderr(65536))[-8192:]

    def readline(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.channel.settimeout(min(left, 0.5))
            try:
                chunk = self.channel.recv(65536)
            except TimeoutError:
                self._drain_stderr()
                continue
            except (OSError, EOFError, paramiko.SSHException):
                raise PipeClosed() from None
            if not chunk:
                self._drain_stderr()
                raise PipeClosed()
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line + b"\n"

    def shutdown_write(self) -> None:
        try:
            self.channel.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while not self.channel.exit_status_ready():
            if time.monotonic() > deadline or self.channel.closed and \
                    not self.channel.exit_status_ready():
                return None
            self._drain_stderr()
            time.sleep(0.05)
        return self.channel.recv_exit_status()

    def stderr_tail(self) -> str:
        try:
            self._drain_stderr()
        except (OSError, EOFError, paramiko.SSHException):
            pass
        return self.errors.decode("utf-8", "replace")


def shell_join(argv: Sequence[str]) -> str:
    return shlex.join(str(part) for part in argv)


class Remote:
    """Runs commands on one host over one SSH connection."""

    def __init__(
        self,
        target: SshTarget,
        *,
        dry_run: bool = False,
        connect_timeout: int = 15,
        command_timeout: int = 600,
        redact: Callable[[str], str] = lambda text: text,
        out=None,
    ):
        self.target = target
        self.dry_run = dry_run
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.redact = redact
        self.out = out or sys.stdout
        self.stats = Stats()
        self._step: Step | None = None
        # what callers learned about this host during the run (e.g. the helper is cached)
        self.facts_cache: dict[str, object] = {}
        self._connection: Connection | None = None

    # -- connection -------------------------------------------------------------------
    def _connect(self) -> Connection:
        if self._connection is not None:
            return self._connection
        target = self.target
        connect_kwargs = {"allow_agent": False, "look_for_keys": not target.key_filename,
                          "banner_timeout": self.connect_timeout,
                          "auth_timeout": self.connect_timeout}
        if target.key_filename:
            connect_kwargs["key_filename"] = [target.key_filename]
        config = Config(overrides={"load_ssh_configs": False})
        connection = Connection(host=target.host, user=target.user, port=target.port,
                                connect_timeout=self.connect_timeout,
                                connect_kwargs=connect_kwargs, config=config)
        # Host keys are verified against the project's known_hosts, never added blindly.
        connection.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        if target.known_hosts and Path(target.known_hosts).exists():
            connection.client.load_host_keys(target.known_hosts)
        try:
            connection.open()
        except paramiko.BadHostKeyException:
            raise StepFailed("connect", f"{target.describe()}: host key does not match "
                             f"{target.known_hosts}") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise StepFailed("connect", f"{target.describe()}: host key unknown "
                                 f"(not in {target.known_hosts})") from None
            raise StepFailed("connect", f"{target.describe()}: {exc}") from None
        except (OSError, EOFError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise StepFailed("connect", f"{target.describe()} unreachable within "
                             f"{self.connect_timeout}s: {reason}") from None
        transport = connection.client.get_transport()
        if transport is not None:
            transport.set_keepalive(15)
        self._connection = connection
        self.stats.connections += 1
        return connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- commands ---------------------------------------------------------------------
    def open_pipe(self, argv: Sequence[str], *, step: str) -> SshPipe:
        """Start one command whose stdin/stdout the caller speaks over (the host helper)."""
        connection = self._connect()
        try:
            channel = connection.client.get_transport().open_session(
                timeout=self.connect_timeout)
            channel.exec_command(shell_join(argv))
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self._connection = None
            raise StepFailed(step, f"could not start a command on "
                             f"{self.target.describe()}: {exc}") from None
        self.stats.commands += 1
        return SshPipe(channel, self.stats)

    # -- progress ---------------------------------------------------------------------
    def progress(self, line: str) -> None:
        """The last thing a running step said (a build line); shown live on a terminal."""
        if self._step is not None:
            self._step.say(line)

    @contextmanager
    def step(self, name: str, detail: str = "") -> Iterator[None]:
        """A line per step with its duration, never silence while it runs (see Step)."""
        with Step(name, detail, self.out) as self._step:
            try:
                yield
            finally:
                self._step = None
