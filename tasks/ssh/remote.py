"""The one place that talks to a host: a single Fabric connection per run and host.

A task opens one pipe (``open_pipe``: one command, the host helper's bootstrap, see
``tasks.deploy.session``) and sends every step through it; ``stream`` serves `logs -f`.
This module decides how bytes travel and how progress shows: one SSH connection (through
the ProxyJump hops or the ProxyCommand of ``tasks.ssh.sshconfig``, if any), connect
timeouts and keepalives, ``sudo -n`` (never a password prompt), secrets only inside the
pipe (never in an argv, ``env=`` or a pty), a line per step with its duration - live on a
terminal, plain lines every few seconds elsewhere - and failures turned into
``StepFailed``: one line.

Host keys (every hop's too) are checked strictly and never added (``tasks.ssh.hostkeys``).

Logging in: with a key file (``nightguard.ssh.key_filename``, the sandbox's, the GCP
project key) that key only; without one, a running ssh-agent's keys, then ssh_config's
IdentityFile, else ~/.ssh/id_* (IdentitiesOnly: no agent).

A host still being set up (``SshTarget.login_wait`` seconds, only set for a Compute Engine
VM created minutes ago): a refused login, or a refused, unroutable or unanswered connection,
is tried again every few seconds until that bound, saying once why it waits; then it fails
in one line naming the user, the key and what to check. Without it, it fails at once.

Config keys used: ``nightguard.ssh.connect_timeout``, ``nightguard.ssh.command_timeout``.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import paramiko
from fabric import Config, Connection

from ..errors import StepFailed
from ..progress import Step
from .address import SshTarget, shown_path
from .hostkeys import UnknownHostKey, pin_command, pin_host_keys, unpin_command
from .hostlink import PipeClosed

# paramiko's own error log (a traceback per failed greeting) would reach stderr through
# logging's last resort; the step's one line says what happened
logging.getLogger("paramiko").addHandler(logging.NullHandler())
# A host being set up is tried again this often: a VM's guest agent writes the login key
# within a minute or so; trying more often would only fill sshd's log with refusals.
LOGIN_RETRY_EVERY = 3.0
SEND_TIMEOUT = 300.0  # the longest a send may wait for the host to take what it is sent


def shown_duration(seconds: float) -> str:
    """'5m', '4m 30s', '1.5s': a wait's bound as people (and the settings) write it."""
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return " ".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (rest, "s"))
                    if n)


# after connect_failure's words, what to look at (refused, no route and silence differ)
CONNECT_HINTS = {
    "connection refused": " (the host answered, but nothing listens on port {port}: is sshd "
                          "running, is the port right?)",
    "no route to host": " (the network cannot reach {host}: the address, the VM's state or "
                        "a firewall)",
}


def connect_failure(exc: BaseException, timeout: float) -> str:
    """What a failed TCP connect or SSH greeting was, in words; "" if it was not one."""
    causes = [exc]
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        causes = list(exc.errors.values())  # one per address the name resolved to
    elif isinstance(exc, paramiko.SSHException) and "protocol banner" in str(exc):
        # connected, then silence or a hang-up: paramiko keeps which as the context
        causes = [exc.__context__ or EOFError()]
    elif isinstance(exc, paramiko.SSHException) and str(exc) == "No existing session":
        causes = [TimeoutError()]  # the key exchange had not finished within the timeout
    codes = {getattr(cause, "errno", None) for cause in causes}
    if errno.ECONNREFUSED in codes:
        return "connection refused"
    if codes & {errno.EHOSTUNREACH, errno.ENETUNREACH}:
        return "no route to host"
    if any(isinstance(cause, TimeoutError) for cause in causes):
        return f"no answer within {timeout:g}s"
    # a hang-up in any of its forms: reset, aborted, a write into it, or plain EOF
    if any(isinstance(cause, EOFError | ConnectionError) for cause in causes):
        return "connection closed before the SSH greeting"
    if isinstance(exc, paramiko.SSHException) and "protocol banner" in str(exc):
        return "connection closed before the SSH greeting"  # whatever paramiko kept of it
    return ""


class Patience:
    """Tries again while a host is being set up: ``again`` pauses a few seconds and says
    True until ``bound`` seconds have passed (never, for 0). Each new reason is printed
    once; a step line ticks while it waits (never silent for long)."""

    def __init__(self, bound: float, out):
        self.bound = bound
        self.out = out
        self.started = time.monotonic()
        self.deadline = self.started + bound
        self.reason = ""  # the reason said last: "" until it first waited
        self._step: Step | None = None

    @property
    def waited(self) -> float:
        """Seconds since the first try, once it had to wait (0 if it never did)."""
        return time.monotonic() - self.started if self.reason else 0.0

    def again(self, reason: str, line: str) -> bool:
        left = self.deadline - time.monotonic()
        if not reason or self.bound <= 0 or left <= 0:
            return False
        if reason != self.reason:
            self._end(None)
            self.reason = reason
            print(line, file=self.out, flush=True)
            self._step = Step("wait", reason, self.out).__enter__()
        time.sleep(min(LOGIN_RETRY_EVERY, left))
        return True

    def _end(self, exc_type) -> None:
        if self._step is not None:
            self._step.__exit__(exc_type, None, None)
            self._step = None

    def __enter__(self) -> Patience:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._end(exc_type)


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
        # the channel keeps the last read's timeout (half a second): a large request would
        # fail as soon as the host's window is full that long, so sending has its own
        self.channel.settimeout(SEND_TIMEOUT)
        try:
            self.channel.sendall(data)
        except (OSError, EOFError, paramiko.SSHException):
            raise PipeClosed() from None
        self.stats.bytes_sent += len(data)

    def _drain_stderr(self) -> None:
        while self.channel.recv_stderr_ready():
            self.errors = (self.errors + self.channel.recv_stderr(65536))[-8192:]

    def _fill(self, deadline: float) -> None:
        """More bytes into the buffer, waiting until ``deadline`` at most."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.channel.settimeout(min(left, 0.5))
            try:
                chunk = self.channel.recv(262144)
            except TimeoutError:
                self._drain_stderr()
                continue
            except (OSError, EOFError, paramiko.SSHException):
                raise PipeClosed() from None
            if not chunk:
                self._drain_stderr()
                raise PipeClosed()
            self.buffer += chunk
            return

    def read_exact(self, size: int, timeout: float) -> bytes:
        """``size`` raw bytes (a frame of a stream), each wait at most ``timeout``."""
        while len(self.buffer) < size:
            self._fill(time.monotonic() + timeout)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def readline(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            self._fill(deadline)
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
        self._opened: list[Connection] = []  # hops first, the host last

    # -- connection -------------------------------------------------------------------
    def _connect(self) -> Connection:
        if self._connection is not None:
            return self._connection
        try:
            connection = self._open(self.target, "")
        except BaseException:
            self.close()
            raise
        self._connection = connection
        self.stats.connections += 1
        return connection

    def _auth(self, target: SshTarget) -> dict:
        kwargs = {"banner_timeout": self.connect_timeout, "auth_timeout": self.connect_timeout}
        if target.key_filename:
            return {**kwargs, "key_filename": [target.key_filename], "allow_agent": False,
                    "look_for_keys": False}
        return {**kwargs, "key_filename": list(target.identity_files),
                "allow_agent": not target.identities_only,
                "look_for_keys": not target.identity_files}

    def _open(self, target: SshTarget, role: str) -> Connection:
        """Connect to ``target`` (through its hops first), host keys checked on each; a host
        being set up is tried again (see the module's docstring)."""
        gateway = self._open(target.jump, " (jump host)") if target.jump is not None else None
        who = target.describe() + role
        with Patience(target.login_wait, self.out) as patience:
            while True:
                connection, source = self._attempt(target, who, gateway)
                try:
                    connection.open()
                    break
                except (paramiko.SSHException, OSError, EOFError) as exc:
                    connection.client.close()  # a half-open one, e.g. after a refused login
                    self._opened.remove(connection)
                    reason = self._retryable(exc)
                    if not patience.again(reason, self._waiting_line(target, reason)):
                        failed = (self._gave_up(target, who, reason) if reason and
                                  target.login_wait > 0 else
                                  self._failure(exc, target, who, source))
                        raise failed from None
        transport = connection.client.get_transport()
        if transport is not None:
            transport.set_keepalive(15)
        return connection

    def _attempt(self, target: SshTarget, who: str, gateway) -> tuple[Connection, str]:
        """A new, unopened connection to ``target`` with its host keys pinned, and the
        known_hosts file they came from."""
        kwargs = self._auth(target)
        if target.proxy_command and gateway is None:
            try:
                kwargs["sock"] = paramiko.ProxyCommand(target.proxy_command)
            except (OSError, ValueError, paramiko.SSHException) as exc:
                raise StepFailed("connect", f"{who}: ProxyCommand did not start: "
                                 f"{exc}") from None
        connection = Connection(host=target.host, user=target.user, port=target.port,
                                connect_timeout=self.connect_timeout, connect_kwargs=kwargs,
                                config=Config(overrides={"load_ssh_configs": False}),
                                gateway=gateway)
        source = pin_host_keys(connection.client, target)
        self._opened.append(connection)
        return connection, source

    def _retryable(self, exc: BaseException) -> str:
        """Why a host being set up may still let us in later ("" if it will not)."""
        if isinstance(exc, UnknownHostKey | paramiko.BadHostKeyException |
                      paramiko.BadAuthenticationType):
            return ""
        if isinstance(exc, paramiko.AuthenticationException):
            return "login refused"
        return connect_failure(exc, self.connect_timeout)

    @staticmethod
    def _waiting_line(target: SshTarget, reason: str) -> str:
        bound = shown_duration(target.login_wait)
        if reason == "login refused":
            what = target.login_wait_reason or f"{target.user}'s login to be accepted"
        else:
            what = f"sshd at {target.host}:{target.port}"
        return f"waiting for {what} ({reason}; retrying up to {bound})"

    @staticmethod
    def _gave_up(target: SshTarget, who: str, reason: str) -> StepFailed:
        """The one line after ``login_wait`` of refusals."""
        bound = shown_duration(target.login_wait)
        if reason != "login refused":
            return StepFailed("connect", f"{who}: {reason} on every try for {bound}")
        key = shown_path(target.key_filename) if target.key_filename else \
            "the agent's and ~/.ssh's keys"
        hint = target.login_hint or f"the key is not authorized for {target.user} there"
        return StepFailed("connect", f"{who}: login as {target.user} with {key} refused for "
                          f"{bound}: {hint}")

    def _failure(self, exc: BaseException, target: SshTarget, who: str,
                 source: str) -> StepFailed:
        """The one line for a connection that failed at once."""
        if isinstance(exc, UnknownHostKey):
            key = f"{exc.key.get_name()} {exc.key.fingerprint}"
            if exc.revoked:
                return StepFailed("connect", f"{who}: host key {key} is marked @revoked in a "
                                  "known_hosts file: refusing it")
            tried = ", ".join(shown_path(p) for p in (target.known_hosts,
                                                      *target.other_known_hosts)
                              if p and (p == target.known_hosts or os.path.isfile(p)))
            return StepFailed("connect", f"{who}: host key unknown (not in {tried}); it "
                              f"offered {key}: if that is the host's, pin it with "
                              f"`{pin_command(target, exc.key)}`")
        if isinstance(exc, paramiko.BadHostKeyException):
            return StepFailed("connect", f"{who}: host key does not match {shown_path(source)} "
                              f"(it offered {exc.key.get_name()} {exc.key.fingerprint}): only "
                              "if you know the host was rebuilt, remove the old pin with "
                              f"`{unpin_command(target, source)}` and connect again")
        failed = connect_failure(exc, self.connect_timeout)
        if failed:
            hint = CONNECT_HINTS.get(failed, "").format(host=target.host, port=target.port)
            return StepFailed("connect", f"{who}: {failed}{hint}")
        if isinstance(exc, paramiko.SSHException):
            return StepFailed("connect", f"{who}: {exc}")
        if isinstance(exc, socket.gaierror):
            return StepFailed("connect", f"{who}: cannot resolve {target.host}: "
                              f"{exc.strerror or exc}")
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return StepFailed("connect", f"{who}: {reason}")

    def close(self) -> None:
        while self._opened:  # the host first, then the hops it went through
            self._opened.pop().close()
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
            self.close()
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
