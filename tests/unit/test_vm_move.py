"""`inv vm.move`: where a move goes (and the input refused before anything changes), the
journal, and the order of the move and of its undo - with the VMs made, started and stopped
through the real google-cloud-compute client against the fake Compute API, and the agents
on them as a model that knows what systemd does at boot (an enabled unit starts) and that a
stopped VM runs nothing. Every operation is recorded with the agents running after it: never
two. A cut (Ctrl-C) or a failure is injected before and after each operation; the next run
finishes the move, or undoes it. The host side of the move on two fake hosts (the real
helper): tests/unit/test_vm_move_hosts.py."""

from __future__ import annotations

import io
import json
import os
import re

import pytest
from invoke import MockContext
from invoke.exceptions import Exit

from tasks.config import load_settings
from tasks.deploy import move as move_task
from tasks.deploy import moveflow
from tasks.deploy.health import moved_line
from tasks.deploy.movehosts import GceCloud
from tasks.deploy.session import LockHeld
from tasks.errors import ConfigError, StepFailed
from tasks.gcp import moveplan as mp
from tasks.gcp import ssh as gcp_ssh
from tasks.gcp import tasks as vm_tasks
from tests.unit import gcpfake

fake = gcpfake.fake

DATA = {"memory/chat.json": "the milk", "state.db": "x" * 100}


def old_place(fake) -> dict:
    return {"project": fake.project, "zone": "us-west1-b", "instance": "nightguard",
            "machine_type": "e2-micro"}


def settings_maker(tmp_path, fake):
    def settings_at(where):
        return load_settings(root=tmp_path, environ={}, overrides={
            "target": "gcp", "gcp.project": where["project"], "gcp.zone": where["zone"],
            "gcp.instance": where["instance"], "gcp.machine_type": where["machine_type"],
            "gcp.api_endpoint": fake.endpoint})
    return settings_at


class World:
    """The agents as the VMs run them; ``log``: (operation, VMs whose agent runs after it)."""

    def __init__(self, fake):
        self.fake = fake
        self.running: dict[str, bool] = {"nightguard": True}
        self.enabled: dict[str, bool] = {"nightguard": True}
        self.data: dict[str, dict] = {"nightguard": dict(DATA)}
        self.marks: dict[str, dict] = {}
        self.log: list[tuple[str, tuple[str, ...]]] = []
        self.copied_while_running: list[str] = []
        self.note("before the move")

    def vm_running(self, name: str) -> bool:
        return (self.fake.instances.get(name) or {}).get("status") == "RUNNING"

    def agents(self) -> tuple[str, ...]:
        return tuple(sorted(n for n, on in self.running.items() if on and self.vm_running(n)))

    def note(self, op: str) -> None:
        self.log.append((op, self.agents()))

    def ops(self) -> list[str]:
        return [op for op, _ in self.log[1:]]

    def most_agents(self) -> int:
        return max(len(agents) for _, agents in self.log)


class Injector:
    """Raises at the named point once: ("copy", "after"), kind "cut" (Ctrl-C) or "fail"."""

    def __init__(self, at: tuple[str, str] | None = None, kind: str = "cut"):
        self.at, self.kind = at, kind

    def __call__(self, op: str, when: str) -> None:
        if self.at == (op, when):
            self.at = None
            if self.kind == "cut":
                raise KeyboardInterrupt
            if self.kind == "refused":
                raise ConfigError("nightguard-data-x.tar.gz: altered; nothing was changed")
            raise StepFailed(op, "injected failure")


class ModelHosts:
    """The hosts layer (tasks/deploy/movehosts.SshHosts) as a model of the agents."""

    def __init__(self, world: World, inject: Injector | None = None, healthy: bool = True):
        self.world, self.inject, self.healthy = world, inject or Injector(), healthy

    def _op(self, op: str, where: dict, change) -> None:
        name = where["instance"]
        if not self.world.vm_running(name):
            raise StepFailed("connect", f"{name}: no route to host (the VM is stopped)")
        self.inject(op, "before")
        change(name)
        self.world.note(f"{op} {name}")
        self.inject(op, "after")

    def stage(self, where):
        def change(name):
            assert not self.world.running.get(name)
            self.world.enabled[name] = False
        self._op("stage", where, change)
        return {"version": "v1"}

    def stop_agent(self, where, mark):
        def change(name):
            self.world.running[name] = self.world.enabled[name] = False
            if mark:
                self.world.marks[name] = mark
        self._op("stop_agent", where, change)

    def copy(self, source, dest):
        def change(name):
            if self.world.running.get(source["instance"]):
                self.world.copied_while_running.append(source["instance"])
            self.world.data[name] = dict(self.world.data[source["instance"]])
        self._op("copy", dest, change)
        return {"files": len(DATA)}

    def start_new(self, where):
        def change(name):
            self.world.running[name] = self.world.enabled[name] = True
        self._op("start_new", where, change)
        return {"healthy": self.healthy, "reason": "not healthy within 5s"}

    def start_old(self, where):
        def change(name):
            self.world.marks.pop(name, None)
            self.world.running[name] = self.world.enabled[name] = True
        self._op("start_old", where, change)
        return {"healthy": True}

    def mark(self, where, mark):
        self._op("mark", where, lambda name: self.world.marks.__setitem__(name, mark))


class ModelCloud(GceCloud):
    """The real Compute API layer, and what a VM's start and stop do to its agent."""

    def __init__(self, settings_at, world: World, inject: Injector | None = None):
        super().__init__(settings_at, timeout=30)
        self.world, self.inject = world, inject or Injector()

    def create(self, where):
        self.inject("create", "before")
        made = super().create(where)
        self.world.note(f"create {where['instance']}")
        self.inject("create", "after")
        return made

    def start(self, where):
        super().start(where)
        name = where["instance"]  # systemd starts an enabled unit at boot
        self.world.running[name] = self.world.enabled.get(name, False)
        self.world.note(f"vm start {name}")

    def stop(self, where):
        self.inject("vm_stop", "before")
        super().stop(where)
        self.world.note(f"vm stop {where['instance']}")
        self.inject("vm_stop", "after")


@pytest.fixture
def move(tmp_path, fake):
    """(journal, cloud, hosts, world) for a move of nightguard to us-central1-a as
    nightguard-2, e2-small."""
    fake.add_instance("nightguard", zone="us-west1-b")
    world = World(fake)
    settings_at = settings_maker(tmp_path, fake)
    source = old_place(fake)
    dest = mp.target(source, zone="us-central1-a", machine_type="e2-small",
                     instance="nightguard-2")
    journal = mp.Journal.begin(tmp_path / ".nightguard" / "move.json", source, dest)
    return journal, settings_at, world


def run(journal, settings_at, world, inject=None, healthy=True):
    inject = inject or Injector()
    return moveflow.run_steps(journal, ModelCloud(settings_at, world, inject), ModelHosts(
        world, inject, healthy), _Out())


class _Out:
    def __init__(self):
        self.lines: list[str] = []

    def write(self, text):
        self.lines.append(text)

    def flush(self):
        pass


# -- where a move goes ------------------------------------------------------------------------
@pytest.mark.parametrize("given, changes", [
    ({"zone": "us-central1-a"}, ["zone us-west1-b -> us-central1-a"]),
    ({"instance": "nightguard-2"}, ["instance nightguard -> nightguard-2"]),
    ({"machine_type": "e2-small", "instance": "ng-small"},
     ["machine type e2-micro -> e2-small", "instance nightguard -> ng-small"]),
    ({"zone": "europe-west1-b", "machine_type": "e2-medium"},
     ["zone us-west1-b -> europe-west1-b", "machine type e2-micro -> e2-medium"]),
])
def test_the_plan_of_each_kind_of_move(given, changes):
    source = {"project": "p", "zone": "us-west1-b", "instance": "nightguard",
              "machine_type": "e2-micro"}
    dest = mp.target(source, **given)
    assert dest == dict(source, **given)
    assert mp.kind(source, dest) == changes
    assert mp.delete_command(source) == ("gcloud compute instances delete nightguard --zone "
                                         "us-west1-b --project p")


@pytest.mark.parametrize("given, words", [
    ({}, "give where to move"),
    ({"zone": "us-west1"}, "--zone 'us-west1' is not a zone"),
    ({"zone": "US-WEST1-B"}, "is not a zone"),
    ({"zone": "us-west1-b; rm -rf /"}, "is not a zone"),
    ({"machine_type": "E2 micro"}, "is not a machine type"),
    ({"instance": "Night_Guard"}, "is not a VM name"),
    ({"instance": "a" * 64}, "is not a VM name"),
    ({"zone": "us-west1-b", "machine_type": "e2-micro"}, "already runs on nightguard"),
    ({"machine_type": "e2-small"}, "a name is unique in its zone"),
])
def test_bad_input_is_one_line(given, words):
    source = {"project": "p", "zone": "us-west1-b", "instance": "nightguard",
              "machine_type": "e2-micro"}
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")) as caught:
        mp.target(source, **given)
    assert "\n" not in str(caught.value)


def test_what_a_run_does_from_the_journal(tmp_path):
    path = tmp_path / "move.json"
    source = {"project": "p", "zone": "us-west1-b", "instance": "a", "machine_type": "e2-micro"}
    dest = dict(source, instance="b")
    assert mp.decide(None, undo=False, wanted=dest) == "new"
    with pytest.raises(ConfigError, match="no unfinished move to undo"):
        mp.decide(None, undo=True, wanted=None)
    journal = mp.Journal.begin(path, source, dest)
    assert mp.decide(mp.Journal.load(path), undo=False, wanted=None) == "finish"
    assert mp.decide(journal, undo=False, wanted=dest) == "finish"
    assert mp.decide(journal, undo=True, wanted=None) == "undo"
    with pytest.raises(ConfigError, match="a move to b .* is unfinished"):
        mp.decide(journal, undo=False, wanted=dict(source, instance="c"))
    journal.set_state("undoing")
    assert mp.decide(journal, undo=False, wanted=None) == "undo"
    journal.set_state("done", ended="T")
    assert mp.decide(journal, undo=False, wanted=dict(source, instance="c")) == "new"
    assert "moved to b" in mp.moved_note(path, source) and mp.moved_note(path, dest) == ""


def test_the_journal_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "j" / "move.json"
    source = {"project": "p", "zone": "us-west1-b", "instance": "a", "machine_type": "e2-micro"}
    journal = mp.Journal.begin(path, source, dict(source, instance="b"))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    before = path.read_text()

    def cut(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        journal.start("create")
    assert path.read_text() == before  # the old journal, whole
    assert [p.name for p in path.parent.iterdir()] == ["move.json"]  # no half-written file
    monkeypatch.undo()
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not readable") as caught:
        mp.Journal.load(path)
    assert "\n" not in str(caught.value)


# -- the move, its order, and the agents --------------------------------------------------------
def test_a_move_creates_the_vm_stops_the_old_agent_before_the_new_one_starts(move, fake):
    journal, settings_at, world = move
    assert run(journal, settings_at, world) == "done"
    assert world.ops() == ["create nightguard-2", "stage nightguard-2", "stop_agent nightguard",
                           "copy nightguard-2", "start_new nightguard-2", "mark nightguard",
                           "vm stop nightguard"]
    assert world.most_agents() == 1 and world.agents() == ("nightguard-2",)
    assert world.copied_while_running == []
    [insert] = fake.sent("POST", r"/zones/us-central1-a/instances$")
    assert insert.body["name"] == "nightguard-2"
    assert insert.body["machineType"] == "zones/us-central1-a/machineTypes/e2-small"
    assert insert.body["disks"][0]["initializeParams"]["resourcePolicies"][0].endswith(
        "/regions/us-central1/resourcePolicies/nightguard-2-daily")
    assert fake.instances["nightguard"]["status"] == "TERMINATED"  # stopped, not deleted
    assert not fake.sent("DELETE", "instances")
    assert world.data["nightguard-2"] == DATA
    assert world.marks["nightguard"]["state"] == "moved" and \
        world.marks["nightguard"]["to"].startswith("nightguard-2 (us-central1-a")
    saved = json.loads(journal.path.read_text())
    assert saved["state"] == "done" and all(saved["steps"][s]["done"] for s in mp.STEPS)
    assert isinstance(saved["steps"]["start_new"]["outage_s"], float)


def test_a_new_agent_that_fails_its_gate_is_stopped_before_the_old_one_starts(move, fake):
    journal, settings_at, world = move
    with pytest.raises(moveflow.MoveFailed, match="the move was undone: the agent runs on "
                       "nightguard"):
        run(journal, settings_at, world, healthy=False)
    ops = world.ops()
    assert ops[-3:] == ["start_new nightguard-2", "stop_agent nightguard-2",
                        "start_old nightguard"]
    assert world.most_agents() == 1 and world.agents() == ("nightguard",)
    assert world.enabled["nightguard"] and not world.enabled["nightguard-2"]
    assert "nightguard" not in world.marks
    assert journal.state == "undone" and fake.instances["nightguard"]["status"] == "RUNNING"


POINTS = [("create", "before"), ("create", "after"), ("stage", "before"), ("stage", "after"),
          ("stop_agent", "before"), ("stop_agent", "after"), ("copy", "before"),
          ("copy", "after"), ("start_new", "before"), ("start_new", "after"),
          ("mark", "before"), ("mark", "after"), ("vm_stop", "before"), ("vm_stop", "after")]


@pytest.mark.parametrize("point", POINTS, ids=["-".join(p) for p in POINTS])
def test_a_move_cut_anywhere_is_finished_by_the_next_run(move, fake, point):
    journal, settings_at, world = move
    with pytest.raises(KeyboardInterrupt):
        run(journal, settings_at, world, Injector(point))
    again = mp.Journal.load(journal.path)
    assert again.state == "moving" and mp.decide(again, undo=False, wanted=None) == "finish"
    assert any(again.step(s).get("error") == "interrupted" for s in mp.STEPS)
    assert run(again, settings_at, world) == "done"
    assert world.most_agents() == 1 and world.agents() == ("nightguard-2",)
    assert world.copied_while_running == []
    assert world.data["nightguard-2"] == DATA
    assert fake.instances["nightguard"]["status"] == "TERMINATED"
    assert world.marks["nightguard"]["state"] == "moved"
    assert len(fake.sent("POST", r"/zones/us-central1-a/instances$")) == 1  # made once


@pytest.mark.parametrize("point", POINTS, ids=["-".join(p) for p in POINTS])
def test_a_move_cut_anywhere_is_undone_by_undo(move, fake, point):
    journal, settings_at, world = move
    with pytest.raises(KeyboardInterrupt):
        run(journal, settings_at, world, Injector(point))
    again = mp.Journal.load(journal.path)
    assert mp.decide(again, undo=True, wanted=None) == "undo"
    cloud, hosts = ModelCloud(settings_at, world), ModelHosts(world)
    assert moveflow.undo(again, cloud, hosts, _Out()) == "undone"
    assert world.most_agents() == 1 and world.agents() == ("nightguard",)
    assert fake.instances["nightguard"]["status"] == "RUNNING"
    assert world.enabled["nightguard"] and "nightguard" not in world.marks
    assert not world.running.get("nightguard-2") and not world.enabled.get("nightguard-2")
    assert world.data["nightguard"] == DATA
    stops = [i for i, op in enumerate(world.ops()) if op == "stop_agent nightguard-2"]
    starts = [i for i, op in enumerate(world.ops()) if op == "start_old nightguard"]
    if again.was_started("start_new"):  # the new agent may run: stopped before the old starts
        assert stops and starts and stops[-1] < starts[-1]


@pytest.mark.parametrize("point", POINTS, ids=["-".join(p) for p in POINTS])
def test_a_step_that_fails_undoes_the_move_once_the_old_agent_was_touched(move, fake, point):
    journal, settings_at, world = move
    with pytest.raises(moveflow.MoveFailed) as caught:
        run(journal, settings_at, world, Injector(point, "fail"))
    assert "\n" not in str(caught.value)
    assert world.most_agents() == 1 and world.agents() == ("nightguard",)
    if journal.was_started("stop_old"):
        assert journal.state == "undone" and "the move was undone" in str(caught.value)
        assert world.enabled["nightguard"] and "nightguard" not in world.marks
        assert fake.instances["nightguard"]["status"] == "RUNNING"
    else:  # the old agent was never stopped: nothing to undo, a rerun tries again
        assert journal.state == "moving" and "the agent still runs on nightguard" in \
            str(caught.value)
        assert world.running["nightguard"] and world.enabled["nightguard"]


def test_a_backup_refused_half_way_undoes_the_move_in_one_line(move, fake):
    journal, settings_at, world = move
    with pytest.raises(moveflow.MoveFailed, match="altered; nothing was changed; the move was "
                       "undone: the agent runs on nightguard") as caught:
        run(journal, settings_at, world, Injector(("copy", "before"), "refused"))
    assert "\n" not in str(caught.value)
    assert journal.state == "undone" and world.agents() == ("nightguard",)
    assert "altered" in journal.step("copy")["error"]


def test_a_lock_another_task_holds_stops_the_move_without_undoing_it(move, fake):
    journal, settings_at, world = move

    class Busy(ModelHosts):
        def copy(self, source, dest):
            raise LockHeld({"who": "ana@laptop", "command": "deploy", "since": "T"})
    hosts = Busy(world)
    with pytest.raises(moveflow.MoveFailed, match="another deploy holds the lock: ana@laptop "
                       ".*then run `inv vm.move` again to finish the move"):
        moveflow.run_steps(journal, ModelCloud(settings_at, world), hosts, _Out())
    assert journal.state == "moving" and world.agents() == ()  # stopped, waiting for a rerun
    assert run(journal, settings_at, world) == "done"
    assert world.agents() == ("nightguard-2",) and world.most_agents() == 1


def test_the_undo_stops_a_new_vm_it_cannot_reach_rather_than_risk_two_agents(move, fake):
    journal, settings_at, world = move
    with pytest.raises(KeyboardInterrupt):
        run(journal, settings_at, world, Injector(("start_new", "after")))
    hosts = ModelHosts(world, Injector(("stop_agent", "before"), "fail"))
    assert moveflow.undo(journal, ModelCloud(settings_at, world), hosts, _Out()) == "undone"
    assert fake.instances["nightguard-2"]["status"] == "TERMINATED"
    assert world.most_agents() == 1 and world.agents() == ("nightguard",)
    assert world.ops().index("vm stop nightguard-2") < world.ops().index("start_old nightguard")


def test_the_health_of_the_vm_left_says_where_the_agent_went():
    assert moved_line(None) == ""
    assert moved_line({"to": "ng-2 (us-central1-a, e2-small)", "state": "moved",
                       "at": "2026-12-07T16:00:00Z"}) == \
        "not the live VM: the agent moved to ng-2 (us-central1-a, e2-small) at " \
        "2026-12-07T16:00:00Z"
    assert "under way" in moved_line({"to": "ng-2", "state": "moving", "at": "T"})


# -- the task: bad input is one line, exit 2, nothing changed -----------------------------------
@pytest.fixture
def env(monkeypatch, tmp_path, fake):
    for name in [n for n in os.environ if n.startswith("NIGHTGUARD_")]:
        monkeypatch.delenv(name)
    key = tmp_path / "id_ed25519"
    gcp_ssh.generate_keypair(key, out=io.StringIO())
    for name, value in {"TARGET": "gcp", "GCP_PROJECT": fake.project,
                        "GCP_API_ENDPOINT": fake.endpoint, "GCP_ZONE": "us-west1-b",
                        "GCP_INSTANCE": "nightguard", "SSH_KEY_FILENAME": str(key),
                        "MOVE_JOURNAL": str(tmp_path / "move.json")}.items():
        monkeypatch.setenv(f"NIGHTGUARD_{name}", value)
    return tmp_path / "move.json"


@pytest.mark.parametrize("flags, words", [
    ({"zone": "nowhere"}, "--zone 'nowhere' is not a zone"),
    ({"zone": "us-west1-b"}, "the agent already runs on nightguard"),
    ({"machine_type": "e2-small"}, "a name is unique in its zone"),
    ({}, "give where to move"),
    ({"undo_": True}, "no unfinished move to undo"),
])
def test_the_task_refuses_bad_input_in_one_line_and_changes_nothing(env, fake, flags, words):
    fake.add_instance("nightguard", zone="us-west1-b")
    with pytest.raises(Exit) as caught:
        vm_tasks.ns["move"](MockContext(), **flags)
    assert caught.value.code == 2
    assert caught.value.message.startswith("error: vm.move") and words in caught.value.message
    assert "\n" not in caught.value.message
    assert not env.exists() and not fake.sent("POST", ".")


def test_the_task_refuses_to_move_an_agent_from_a_stopped_vm(env, fake, monkeypatch):
    fake.add_instance("nightguard", zone="us-west1-b", status="TERMINATED")
    monkeypatch.setattr(move_task, "preflight", lambda settings: (None, {}))
    with pytest.raises(Exit) as caught:
        vm_tasks.ns["move"](MockContext(), instance="nightguard-2")
    assert caught.value.code == 2 and "VM nightguard in us-west1-b is TERMINATED" in \
        caught.value.message
    assert not env.exists() and not fake.sent("POST", ".")


def test_vm_move_has_help_for_every_flag():
    task = vm_tasks.ns["move"]
    assert task.__doc__ and set(task.help) == {"zone", "machine_type", "instance", "undo",
                                               "timeout"}


def test_the_task_moves_then_a_cut_rerun_finishes_and_says_how_to_delete_the_old_vm(
        env, fake, monkeypatch, capsys):
    fake.add_instance("nightguard", zone="us-west1-b")
    world = World(fake)
    inject = Injector(("copy", "after"))
    monkeypatch.setattr(move_task, "preflight", lambda settings: (None, {}))
    monkeypatch.setattr(move_task, "GceCloud",
                        lambda settings_at, timeout: ModelCloud(settings_at, world, inject))
    monkeypatch.setattr(move_task, "SshHosts",
                        lambda settings_at, values, manifest: ModelHosts(world, inject))
    task = vm_tasks.ns["move"]
    with pytest.raises(Exit) as caught:
        task(MockContext(), zone="us-central1-a", instance="nightguard-2")
    assert caught.value.code == 130  # Ctrl-C
    assert mp.Journal.load(env).state == "moving"
    task(MockContext())  # no arguments: the journal's move, finished
    out = capsys.readouterr().out
    assert "finish the move nightguard (us-west1-b, e2-micro) -> nightguard-2 (us-central1-a, "\
           "e2-micro)" in out
    assert re.search(r"moved: the agent runs on nightguard-2 \(us-central1-a, e2-micro\); the "
                     r"agent was down [\d.]+ s", out)
    assert "To delete it: gcloud compute instances delete nightguard --zone us-west1-b " \
           "--project demo-project" in out
    assert "  nightguard.gcp.instance: nightguard-2" in out
    assert world.most_agents() == 1 and world.agents() == ("nightguard-2",)
    with pytest.raises(Exit) as caught:  # the old VM is stopped now: nothing left to move
        task(MockContext(), zone="europe-west1-b")
    assert caught.value.code == 2 and "is TERMINATED" in caught.value.message
