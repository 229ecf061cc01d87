"""`inv vm.move`'s order: each step of the move (or of its undo) between its two journal
writes, against two execution layers - ``cloud`` (the VMs, through the Compute API) and
``hosts`` (the agent on a VM, through its SSH session) - so the order is the same code
whatever carries it out (tests record it).

Never two agents: the old agent is stopped (and disabled) before the data is copied and the
new one started; on the way back the new one is stopped before the old one starts. A step
that fails once the old agent may be stopped (but for a deploy lock another task holds)
undoes the move at once: the new agent stopped, the old VM and agent started again through
the gate. Ctrl-C leaves the journal saying where it stopped, and the next run finishes the
move (or, with ``--undo``, undoes it).

Config keys: none of its own (the journal: ``tasks.gcp.moveplan``).
"""

from __future__ import annotations

import time
from typing import Protocol

from ..errors import ConfigError, StepFailed
from ..gcp.moveplan import Journal, label, next_steps, now, undo_needed
from .session import LockHeld


class Cloud(Protocol):
    def status(self, where: dict) -> str | None: ...  # RUNNING, TERMINATED...; None: absent
    def create(self, where: dict) -> bool: ...  # True: made now
    def start(self, where: dict) -> None: ...
    def stop(self, where: dict) -> None: ...


class Hosts(Protocol):
    def stage(self, where: dict) -> dict: ...
    def stop_agent(self, where: dict, mark: dict | None) -> None: ...
    def copy(self, source: dict, dest: dict) -> dict: ...
    def start_new(self, where: dict) -> dict: ...
    def start_old(self, where: dict) -> dict: ...
    def mark(self, where: dict, mark: dict | None) -> None: ...


class MoveFailed(StepFailed):
    """The move did not complete; ``str()`` is the step's own line and whether the move
    was undone."""

    def __init__(self, step: str, reason: str):
        super().__init__(step, reason)
        self.args = (reason,)


def _create(journal: Journal, cloud: Cloud, hosts: Hosts, out) -> dict:
    created = cloud.create(journal.dest)
    print(f"  new VM {journal.dest['instance']}: {'created' if created else 'already there'}"
          f" in {journal.dest['zone']}", file=out)
    return {"created": created}


def _stage(journal: Journal, cloud: Cloud, hosts: Hosts, out) -> dict:
    return {"version": hosts.stage(journal.dest).get("version")}


def _stop_old(journal: Journal, cloud: Cloud, hosts: Hosts, out) -> dict:
    hosts.stop_agent(journal.source, {"to": label(journal.dest), "state": "moving",
                                      "at": now(), "move": journal.data["id"]})
    return {"at_s": time.time()}


def _copy(journal: Journal, cloud: Cloud, hosts: Hosts, out) -> dict:
    return hosts.copy(journal.source, journal.dest)


def _start_new(journal: Journal, cloud: Cloud, hosts: Hosts, out) -> dict:
    answer = hosts.start_new(journal.dest)
    if not answer.get("healthy", True):
        raise StepFailed("start new", answer.get("reason") or "the new agent is not healthy")
    stopped = journal.step("stop_old").get("at_s")
    return {"outage_s": round(time.time() - stopped, 1) if stopped else None}


def _park_old(journal: Journal, cloud: Cloud, hosts: Hosts, out) -> dict:
    if cloud.status(journal.source) == "RUNNING":
        hosts.mark(journal.source, {"to": label(journal.dest), "state": "moved", "at": now(),
                                    "move": journal.data["id"]})
        cloud.stop(journal.source)
    return {}


FORWARD = {"create": _create, "stage": _stage, "stop_old": _stop_old, "copy": _copy,
           "start_new": _start_new, "park_old": _park_old}


def run_steps(journal: Journal, cloud: Cloud, hosts: Hosts, out) -> str:
    """The journal's remaining steps; returns its final state ("done" or "undone")."""
    if journal.state == "undoing":
        return undo(journal, cloud, hosts, out)
    for name in next_steps(journal):
        journal.start(name)
        try:
            facts = FORWARD[name](journal, cloud, hosts, out)
        except KeyboardInterrupt:
            journal.fail(name, "interrupted")
            raise
        except (StepFailed, ConfigError, OSError) as exc:  # a refused backup, a full disk
            journal.fail(name, str(exc))
            failed = exc
        else:
            journal.finish(name, **facts)
            continue
        # out of the except: what the undo raises is its own, not chained to this failure
        if isinstance(failed, LockHeld):  # another task's turn on that VM: not a failure
            raise MoveFailed(name, f"{failed}; then run `inv vm.move` again to finish the "
                             "move (or `inv vm.move --undo`)")
        if not journal.was_started("stop_old"):  # the old agent was never touched
            raise MoveFailed(name, f"{failed}; the agent still runs on "
                             f"{label(journal.source)}: `inv vm.move` tries again, "
                             "`inv vm.move --undo` gives up")
        print(f"  ! {failed}: undoing the move", file=out)
        journal.set_state("undoing", reason=str(failed))
        undo(journal, cloud, hosts, out)
        raise MoveFailed(name, f"{failed}; the move was undone: the agent runs on "
                         f"{label(journal.source)} again")
    journal.set_state("done", ended=now())
    return "done"


def _stop_new(journal: Journal, cloud: Cloud, hosts: Hosts, out) -> None:
    """The new agent stopped for good; where its VM cannot be reached, the VM is stopped
    through the API instead: nothing runs on a stopped VM."""
    if cloud.status(journal.dest) != "RUNNING":
        return
    try:
        hosts.stop_agent(journal.dest, None)
    except StepFailed as exc:
        print(f"  ! {exc}: stopping VM {journal.dest['instance']} instead", file=out)
        cloud.stop(journal.dest)


def _start_old(journal: Journal, cloud: Cloud, hosts: Hosts, out) -> None:
    if cloud.status(journal.source) != "RUNNING":
        cloud.start(journal.source)
    answer = hosts.start_old(journal.source)
    if not answer.get("healthy"):
        raise StepFailed("start old", f"the agent on {label(journal.source)} is not healthy "
                         f"either: {answer.get('reason') or '?'}")


def undo(journal: Journal, cloud: Cloud, hosts: Hosts, out) -> str:
    """Back to the old VM: the new agent stopped first, then the old one started."""
    if journal.state != "undoing":
        journal.set_state("undoing", reason="asked (--undo)")
    needed = undo_needed(journal)
    for name in next_steps(journal):
        journal.start(name)
        try:
            if needed[name]:
                (_stop_new if name == "stop_new" else _start_old)(journal, cloud, hosts, out)
        except BaseException as exc:  # recorded whatever it is, then told
            journal.fail(name, str(exc) or "interrupted")
            raise
        journal.finish(name, skipped=not needed[name])
    journal.set_state("undone", ended=now())
    return "undone"
