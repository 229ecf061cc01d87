"""`inv vm.move`: the agent to another VM - another zone, machine type or instance name -
with its data, never two agents at once.

A new VM is created (as `inv vm.create` makes one), the agent deployed there but not
started; then the agent on the old VM is stopped (and disabled), its data dir copied across
through this machine, and the agent started on the new VM through the health gate. Not
healthy: the new agent is stopped and the old one started again. The old VM is left stopped
through the API, never deleted (the command to delete it is printed), with a mark that makes
`inv health` there say where the agent went. The order and the journal: tasks/deploy/
moveflow.py and tasks/gcp/moveplan.py; what each step does on a host: movehosts.py.

Bad input (a zone, type or name Google would refuse, a move that goes nowhere, a move to
the old VM's own zone and name) is one line, exit 2, nothing changed. A cut move (Ctrl-C, a
dropped connection) is finished by the next `inv vm.move`, or undone by `inv vm.move
--undo`. The move is written to both VMs' audit logs (`inv history`).

Config keys: ``nightguard.gcp.*`` (the VM the agent runs on now; the new one takes its
settings but for what is given), ``nightguard.move_journal``, and what a deploy reads.
"""

from __future__ import annotations

import sys

from invoke import task

from ..cli import one_line_errors, settings_for
from ..errors import ConfigError
from ..gcp import api as gcp
from ..gcp.moveplan import (
    Journal,
    config_lines,
    decide,
    delete_command,
    kind,
    label,
    place,
    target,
)
from .moveflow import run_steps, undo
from .movehosts import GceCloud, SshHosts
from .pipeline import preflight

HELP = {
    "zone": "the new VM's zone, e.g. us-central1-a (default: the current one)",
    "machine_type": "the new VM's machine type, e.g. e2-small (default: the current one)",
    "instance": "the new VM's name (needed when the zone stays the same)",
    "undo": "undo an unfinished move: the new agent stopped, the old VM and agent started",
    "timeout": "seconds to wait for each Compute API operation (default 300)",
}


def settings_maker(c):
    """The settings of the VM at a place: the configured ones, its coordinates replaced."""
    def settings_at(where: dict):
        return settings_for(c, "gcp", gcp__project=where["project"], gcp__zone=where["zone"],
                            gcp__instance=where["instance"],
                            gcp__machine_type=where["machine_type"])
    return settings_at


def check_new(cloud: GceCloud, base, source: dict, dest: dict) -> None:
    """Before the journal is written: the old VM runs, the ssh settings address both."""
    if base["ssh.host"]:
        raise ConfigError("vm.move: nightguard.ssh.host names one host, and a move needs two "
                          "(each VM's address comes from the Compute API): unset it")
    status = cloud.status(source)
    if status != "RUNNING":
        what = "does not exist" if status is None else f"is {status}"
        raise ConfigError(f"vm.move: VM {source['instance']} in {source['zone']} {what}: the "
                          "agent must run there to be moved (`inv vm.start`); nothing changed")
    for warning in gcp.free_tier_warnings(cloud.settings_at(dest)):
        print(f"warning: {warning}: the new VM will be billed", file=sys.stderr)


def report(journal: Journal, state: str) -> None:
    source, dest = journal.source, journal.dest
    if state == "done":
        outage = journal.step("start_new").get("outage_s")
        print(f"moved: the agent runs on {label(dest)}; the agent was down {outage} s (from "
              "the old agent's stop to the new one's passed health gate)")
        print(f"the old VM {source['instance']} is stopped, not deleted; `inv health` there "
              f"says where the agent went. To delete it: {delete_command(source)}")
        print("point this project at the new VM (invoke.yaml):")
        for line in config_lines(dest):
            print(f"  {line}")
    elif not journal.is_done("create"):
        print(f"undone: the agent runs on {label(source)}; no new VM was made")
    else:
        made = "made by the move" if journal.step("create").get("created") else \
            "there before the move"
        print(f"undone: the agent runs on {label(source)}; the new VM {dest['instance']} "
              f"({made}) is left with its agent stopped. To delete it: "
              f"{delete_command(dest)}")


@task(help=HELP)
@one_line_errors
def move(c, zone=None, machine_type=None, instance=None, undo_=False, timeout=300):
    """Move the agent to a new VM (zone, machine type or name) with its data.

    Never two agents at once: creates the VM, deploys there without starting the agent,
    stops the agent here, copies its data dir through this machine, starts it there through
    the health gate (not healthy: stopped there, started here again). The old VM is stopped,
    never deleted. A cut move is finished by running `inv vm.move` again, or undone by
    `inv vm.move --undo`."""
    base = settings_for(c, "gcp")
    path = base.path("move_journal")
    journal = Journal.load(path)
    given = zone or machine_type or instance
    wanted = target(place(base), zone, machine_type, instance) if given else None
    action = decide(journal, undo=undo_, wanted=wanted)
    settings_at = settings_maker(c)
    cloud = GceCloud(settings_at, timeout)
    values, manifest = preflight(base)  # .env and the code, before anything changes
    if action == "new":
        check_new(cloud, base, place(base), wanted)
        journal = Journal.begin(path, place(base), wanted)
        print(f"move {label(journal.source)} -> {label(journal.dest)}: "
              f"{'; '.join(kind(journal.source, journal.dest))} (journal {path})")
    else:
        print(f"{'undo' if action == 'undo' else 'finish'} the move {label(journal.source)} "
              f"-> {label(journal.dest)} (journal {path})")
    hosts = SshHosts(settings_at, values, manifest)
    state = undo(journal, cloud, hosts, sys.stdout) if action == "undo" else \
        run_steps(journal, cloud, hosts, sys.stdout)
    report(journal, state)


def configure(vm_ns) -> None:
    """`vm.move` joins the vm collection (tasks/gcp/tasks.py), which imports nothing of the
    deploy."""
    vm_ns.add_task(move)
