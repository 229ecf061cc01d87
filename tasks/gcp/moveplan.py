"""`inv vm.move`'s facts: where the agent goes (checked before anything is touched), the
order of the steps, and the journal that lets a cut move be finished or undone.

Pure: no API call, no SSH. A place is ``{"project", "zone", "instance", "machine_type"}``.

Steps, in order (``STEPS``): create the new VM; stage the agent there (deployed, not
started, its unit not enabled); stop the agent on the old VM (stopped and disabled, marked
"moving"); copy the data dir across (through this machine); start the agent on the new VM
through the health gate; park the old VM (marked "moved to X", then stopped through the
API, never deleted). Undo (``UNDO_STEPS``): stop the agent on the new VM, then start the
old VM (if stopped) and its agent through the gate. The old agent is stopped before the new
one starts, and the new one stopped before the old one starts again: never two at once.

The journal (``nightguard.move_journal``, `.nightguard/move.json`, mode 600) records each
step before and after, written atomically (a new file, fsync, rename, fsync of the folder),
so a move cut at any point (Ctrl-C, a dropped connection, a power cut of this machine)
leaves the journal as it was before or after a write, never half of one.

Config keys: ``nightguard.move_journal``, ``nightguard.gcp.project/zone/instance/
machine_type``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path

from ..errors import ConfigError

STEPS = ("create", "stage", "stop_old", "copy", "start_new", "park_old")
UNDO_STEPS = ("stop_new", "start_old")
KEYS = ("project", "zone", "instance", "machine_type")
ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
MACHINE_TYPE = re.compile(r"^[a-z][a-z0-9]*-[a-z0-9]+(-[a-z0-9]+)*$")
INSTANCE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
FORMAT = 1


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def place(settings) -> dict:
    """Where the settings say the agent runs."""
    return {key: settings[f"gcp.{key}"] for key in KEYS}


def label(where: dict) -> str:
    return f"{where['instance']} ({where['zone']}, {where['machine_type']})"


def target(current: dict, zone: str | None = None, machine_type: str | None = None,
           instance: str | None = None) -> dict:
    """Where the move goes: ``current`` with what was given; ConfigError (one line, nothing
    changed) for a value Google would refuse or a move that goes nowhere."""
    if not (zone or machine_type or instance):
        raise ConfigError("vm.move: give where to move: --zone, --machine-type and/or "
                          "--instance")
    if zone is not None and not ZONE.match(zone):
        raise ConfigError(f"vm.move: --zone {zone!r} is not a zone (like us-west1-b)")
    if machine_type is not None and not MACHINE_TYPE.match(machine_type):
        raise ConfigError(f"vm.move: --machine-type {machine_type!r} is not a machine type "
                          "(like e2-micro or e2-small)")
    if instance is not None and not INSTANCE.match(instance):
        raise ConfigError(f"vm.move: --instance {instance!r} is not a VM name (lowercase "
                          "letters, digits and '-', starting with a letter, at most 63)")
    wanted = dict(current, **{k: v for k, v in (("zone", zone), ("machine_type", machine_type),
                                                  ("instance", instance)) if v})
    if wanted == current:
        raise ConfigError(f"vm.move: the agent already runs on {label(current)}: nothing to "
                          "move")
    if (wanted["zone"], wanted["instance"]) == (current["zone"], current["instance"]):
        raise ConfigError(f"vm.move: VM {current['instance']} already exists in "
                          f"{current['zone']} (a name is unique in its zone): give the new VM "
                          "another --instance name, or another --zone")
    return wanted


def kind(source: dict, dest: dict) -> list[str]:
    """What changes, in words: ['zone us-west1-b -> us-central1-a', ...]."""
    return [f"{key.replace('_', ' ')} {source[key]} -> {dest[key]}"
            for key in ("zone", "machine_type", "instance") if source[key] != dest[key]]


def delete_command(where: dict) -> str:
    return (f"gcloud compute instances delete {where['instance']} --zone {where['zone']} "
            f"--project {where['project']}")


def config_lines(where: dict) -> list[str]:
    """The settings that make later tasks address the VM the agent now runs on."""
    return [f"nightguard.gcp.zone: {where['zone']}",
            f"nightguard.gcp.instance: {where['instance']}",
            f"nightguard.gcp.machine_type: {where['machine_type']}"]


# -- the journal ------------------------------------------------------------------------------
class Journal:
    """One move's record on this machine; every change is saved before it returns."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @classmethod
    def load(cls, path: Path) -> Journal | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"vm.move: the move journal {path} is not readable ({exc}): "
                              "look at it, and move it away to start over") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"vm.move: the move journal {path} is not one this version "
                              "reads: move it away to start over")
        return cls(path, data)

    @classmethod
    def begin(cls, path: Path, source: dict, dest: dict) -> Journal:
        journal = cls(path, {"format": FORMAT, "id": secrets.token_hex(4), "from": source,
                             "to": dest, "state": "moving", "started": now(), "steps": {},
                             "log": []})
        journal.save()
        return journal

    @property
    def state(self) -> str:
        return self.data["state"]

    @property
    def source(self) -> dict:
        return self.data["from"]

    @property
    def dest(self) -> dict:
        return self.data["to"]

    def step(self, name: str) -> dict:
        return self.data["steps"].get(name) or {}

    def is_done(self, name: str) -> bool:
        return bool(self.step(name).get("done"))

    def was_started(self, name: str) -> bool:
        return bool(self.step(name).get("started"))

    def start(self, name: str) -> None:
        entry = self.data["steps"].setdefault(name, {})
        entry["started"] = now()
        entry.pop("error", None)
        self._log(f"{name} started")

    def finish(self, name: str, **facts) -> None:
        self.data["steps"].setdefault(name, {}).update(facts, done=now())
        self._log(f"{name} done")

    def fail(self, name: str, error: str) -> None:
        self.data["steps"].setdefault(name, {})["error"] = error
        self._log(f"{name} failed: {error}")

    def set_state(self, state: str, **facts) -> None:
        self.data.update(facts, state=state)
        self._log(f"move {state}")

    def _log(self, line: str) -> None:
        self.data["log"].append(f"{now()} {line}")
        self.save()

    def save(self) -> None:
        """Atomic: a new file beside the journal, fsync'd, renamed over it, the folder
        fsync'd; a cut leaves the old journal or the new one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(self.data, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, self.path)
        finally:
            partial.unlink(missing_ok=True)
        folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def next_steps(journal: Journal) -> list[str]:
    """The steps a run still has to do, in order: the move's forward steps not done yet, or,
    once it is being undone, the undo steps not done yet."""
    if journal.state == "undoing":
        return [name for name in UNDO_STEPS if not journal.is_done(name)]
    if journal.state == "moving":
        return [name for name in STEPS if not journal.is_done(name)]
    return []


def undo_needed(journal: Journal) -> dict:
    """What an undo must do, from what the move started: stop the new agent once anything
    may have started it (its start began); start the old one once its stop began."""
    return {"stop_new": journal.was_started("start_new"),
            "start_old": journal.was_started("stop_old")}


def decide(journal: Journal | None, *, undo: bool, wanted: dict | None) -> str:
    """What this run does: "new" (a move from scratch), "finish" (a cut move, forward),
    "undo" (back to the old VM), or "nothing"; ConfigError when the arguments contradict the
    journal. ``wanted``: the place the arguments name (None when none was given)."""
    pending = journal is not None and journal.state in ("moving", "undoing")
    if not pending:
        if undo:
            raise ConfigError("vm.move --undo: no unfinished move to undo"
                              + (f" (the last one is {journal.state})" if journal else ""))
        if wanted is None:
            raise ConfigError("vm.move: give where to move: --zone, --machine-type and/or "
                              "--instance")
        return "new"
    if wanted is not None and wanted != journal.dest:
        raise ConfigError(f"vm.move: a move to {label(journal.dest)} is unfinished: run "
                          "`inv vm.move` to finish it, or `inv vm.move --undo`, first")
    if undo or journal.state == "undoing":
        return "undo"
    return "finish"


def moved_note(path: Path, where: dict) -> str:
    """"moved to X at T" when the journal says the agent left ``where`` (a completed move),
    else ""."""
    try:
        journal = Journal.load(path)
    except ConfigError:
        return ""
    if journal is None or journal.state != "done" or \
            {k: journal.source.get(k) for k in ("project", "zone", "instance")} != \
            {k: where.get(k) for k in ("project", "zone", "instance")}:
        return ""
    return f"the agent moved to {label(journal.dest)} at {journal.data.get('ended', '?')} " \
           f"(`inv vm.move`, {path})"
