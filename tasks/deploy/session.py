"""Lock -> work -> record, written once for every task that changes the host.

A ``HostSession`` is one helper process on the host for one task (deploy, rollback,
compose.up, secrets.push / rotate, host.swap, sync). A changing session takes the deploy
lock when it starts and ends with ``finish``: the audit line with the outcome
(ok / failed / rolled-back / no changes). If the task dies first - Ctrl-C, a cut
connection, an error this code did not expect - the helper itself records "interrupted"
and the steps that had completed, and the kernel drops the lock with the process. The
audit therefore never says more than what happened.

A read-only session (health, logs, history, dry runs) takes no lock and writes nothing.
In a dry run every changing call is printed ("would: ...") instead of sent.

Config keys: ``nightguard.rootless``, ``nightguard.ssh.command_timeout`` (the longest
silence allowed from the host during a step), ``nightguard.app_dir``,
``nightguard.container_name``, ``nightguard.image_name``.
"""

from __future__ import annotations

import getpass
import signal
import socket
import threading
from datetime import UTC, datetime

from ..config import Settings
from ..contract import MOVE_MARK_FILE, ROOTLESS_STATE, STATE_DIR, Facts
from ..errors import StepFailed
from ..ssh.hostlink import BOOTSTRAP, HostLink, HostStepFailed, helper_source
from ..ssh.remote import Remote, shell_join
from . import commands as cmd

READ_TIMEOUT = 60  # a read-only answer (facts, health) comes within this


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def holder(command: str) -> dict:
    return {"who": f"{getpass.getuser()}@{socket.gethostname()}", "since": now(),
            "command": command}


class LockHeld(StepFailed):
    def __init__(self, held: dict):
        alive = "" if held.get("alive", True) else " (its process is gone)"
        super().__init__("lock", f"another deploy holds the lock: {held.get('who', '?')} "
                         f"({held.get('command', '?')}) since {held.get('since', '?')}"
                         f"{alive}; if it is stuck, `inv unlock --force` stops it")
        self.held = held


# the tasks that start the agent: refused on a host the agent moved away from
STARTS_AGENT = frozenset({"deploy", "compose.up", "rollback", "secrets.push", "secrets.rotate",
                          "data.restore"})


class MovedAway(StepFailed):
    """The agent moved from this host to another VM (`inv vm.move`'s mark): a task that
    would start it here is refused before it changes anything."""

    def __init__(self, mark: dict):
        super().__init__("host", f"the agent moved from this host to {mark.get('to')} "
                         f"({mark.get('state')}, {mark.get('at')}, `inv vm.move`): this task "
                         "would start a second agent. Address the new VM (nightguard.gcp.zone/"
                         "instance); to bring the agent back, `inv vm.move --undo` an "
                         f"unfinished move, or remove {STATE_DIR}/{MOVE_MARK_FILE} here; "
                         "nothing was changed")


def describe(op: str, args: dict) -> str:
    """What a changing call would do, for dry runs (never a value: data is not shown)."""
    if op == "run":
        return shell_join(args["argv"])
    shown = {k: v for k, v in args.items()
             if k not in ("text", "state", "audit", "config", "service", "timer", "dropin",
                           "version")}
    return f"{op} {shown}" if shown else op


class HostSession:
    """One helper process on the host for one task; see the module docstring."""

    def __init__(self, remote: Remote, settings: Settings, *, command: str,
                 changing: bool = True, paths: dict | None = None):
        self.remote = remote
        self.settings = settings
        self.command = command
        self.changing = changing and not remote.dry_run
        self.paths = paths or {}
        self.link: HostLink | None = None
        self.done: list[str] = []
        self.finished = False
        self.timeout = settings["ssh.command_timeout"]
        self.interrupted = False  # Ctrl-C was pressed; raised at the next safe point
        self._previous_sigint = None
        self.facts_seen: Facts = {}  # the last facts read in this session

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> HostSession:
        settings = self.settings
        rootful = not settings["rootless"]
        state = self.paths.get("state") or (STATE_DIR if rootful else ROOTLESS_STATE)
        pipe = self.remote.open_pipe(cmd.bootstrap(BOOTSTRAP, rootful), step="connect")
        self.link = HostLink(pipe, redact=self.remote.redact, on_progress=self._progress)
        args = {
            "mode": "change" if self.changing else "read",
            "holder": holder(self.command),
            "app_dir": settings["app_dir"], "data_dir": settings["data_dir"],
            "container": settings["container_name"], "image_name": settings["image_name"],
            "base_image": settings["base_image"],
            "unit": cmd.unit_name(settings["container_name"]), "rootless": not rootful,
            "owner": self.remote.target.user, "paths": self.paths,
            "helper_path": f"{state}/helper/{helper_source()[1]}.py",
            "keep_helper": self.changing,
        }
        try:
            hello = self.link.hello(args, step="connect", timeout=READ_TIMEOUT)
        except BaseException:
            self._close_link()
            raise
        if self.changing and not (hello.get("lock") or {}).get("acquired"):
            self._close_link()
            raise LockHeld((hello.get("lock") or {}).get("held_by") or {})
        if self.changing and hello.get("moved") and self.command in STARTS_AGENT:
            try:
                self.finish(None)  # nothing was done: no audit line
            finally:
                self._close_link()
            raise MovedAway(hello["moved"])
        self._catch_ctrl_c()
        return self

    def _catch_ctrl_c(self) -> None:
        """Ctrl-C ends the host side's input at once (the helper finishes its step and records
        "interrupted") and is raised here at the next safe point. Python's own
        KeyboardInterrupt can land inside a garbage-collector callback, where it is only
        printed and lost: the task would go on as if nothing happened. A second Ctrl-C is
        Python's default again."""
        if threading.current_thread() is not threading.main_thread():
            return

        def on_ctrl_c(signum, frame) -> None:
            self.interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if self.link is not None:
                self.link.pipe.shutdown_write()

        self._previous_sigint = signal.signal(signal.SIGINT, on_ctrl_c)

    def _release_ctrl_c(self) -> None:
        previous = getattr(self, "_previous_sigint", None)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
            self._previous_sigint = None

    def __exit__(self, exc_type, exc, tb) -> None:
        self._release_ctrl_c()
        try:
            if exc_type is KeyboardInterrupt and self.link is not None:
                print("  ! interrupted: the host finishes its current step and records the "
                      "task as interrupted", file=self.remote.out, flush=True)
            elif exc is not None and self.changing and not self.finished \
                    and self.link is not None and not isinstance(exc, LockHeld):
                # a failed step is always told; an input error before any change is not
                failed = isinstance(exc, StepFailed) or self.done
                try:
                    self.finish(f"failed: {exc}" if failed else None)
                except StepFailed:
                    pass  # the connection is gone: the host recorded "interrupted" itself
        finally:
            self._close_link()

    def _close_link(self) -> None:
        if self.link is not None:
            if self.link.close(wait=30) is None:
                print("  ! the host side did not finish within 30 s; it records the task "
                      "itself when it does", file=self.remote.out)
            self.remote.stats.bytes_sent += self.link.bytes_sent
            self.link = None

    # -- calls ------------------------------------------------------------------------------
    def _progress(self, step: str, line: str) -> None:
        self.remote.progress(line)

    def call(self, op: str, *, step: str, timeout: float | None = None,
             data: bytes | None = None, changes: bool = True, **args) -> dict:
        if changes and not self.changing:
            print(f"    would: {self.remote.redact(describe(op, args))}", file=self.remote.out)
            return {}
        if self.interrupted:
            raise KeyboardInterrupt
        try:
            answer = self.link.call(op, step=step, timeout=timeout or self.timeout, data=data,
                                    **args)
        except HostStepFailed as exc:
            for line in exc.tail[-12:]:  # the command's own last words: the real reason
                print(f"    | {line}", file=self.remote.out)
            if self.interrupted:
                raise KeyboardInterrupt from None
            raise
        except StepFailed:
            if self.interrupted:  # the host ended its side as asked
                raise KeyboardInterrupt from None
            raise
        self.remote.stats.steps += 1
        if changes:
            self.done.append(step)
        if self.interrupted:
            raise KeyboardInterrupt
        return answer.result

    def facts(self, **args) -> Facts:
        facts = self.call("facts", step="facts", changes=False, timeout=READ_TIMEOUT,
                          record=False, **args)
        self.facts_seen = facts
        return facts

    def finish(self, outcome: str | None, *, release: dict | None = None, keep: int = 3,
               prune: bool = False, **audit) -> None:
        """The outcome of a changing task: its audit line, and the release that passed its
        gate, recorded by the host in the same request. ``outcome=None`` ends the session
        without a line (nothing was changed)."""
        if not self.changing:
            return
        entry = None if outcome is None else dict(audit, outcome=outcome)
        self.link.call("finish", step="record", timeout=READ_TIMEOUT, audit=entry,
                       release=release, keep=keep, prune=prune)
        self.finished = True
