"""`inv vm.move`'s host side through its real execution layer (tasks/deploy/movehosts.py):
two fake hosts running the real host helper (tests/unit/hostfake) stand for the two VMs, the
fake Compute API for the VMs themselves. The old agent is stopped (and disabled) before the
new one is started, the data dir arrives whole, both hosts' audit logs tell the move, the
VM left carries the mark health shows; a new agent that fails its gate is stopped and the
old one started again."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tasks.config import load_settings
from tasks.deploy import data, moveflow
from tasks.deploy.backup import read_backup
from tasks.deploy.health import summarize
from tasks.deploy.movehosts import GceCloud, SshHosts
from tasks.deploy.secretstore import load_secret_values
from tasks.deploy.session import HostSession, MovedAway
from tasks.deploy.sync import local_manifest, rules_for
from tasks.gcp import moveplan as mp
from tests.unit import gcpfake
from tests.unit.hostfake import UNIT, LocalRemote
from tests.unit.hostfake.deployer import Deployer

fake = gcpfake.fake

OLD, NEW = "nightguard", "nightguard-2"


class FakeHosts(SshHosts):
    """SshHosts whose every session is the helper of the fake host standing for the VM."""

    def __init__(self, settings_at, values, manifest, hosts: dict):
        super().__init__(settings_at, values, manifest, out=io.StringIO())
        self.hosts, self.remotes = hosts, []

    def remote(self, where, wait=0.0):
        remote = LocalRemote(self.hosts[where["instance"]], redact=self.values.redact)
        self.remotes.append(remote)
        return remote

    def text(self) -> str:
        return "".join(r.out.getvalue() for r in self.remotes)


@pytest.fixture
def two_hosts(make_fake_host, project, fake, tmp_path):
    hosts = {OLD: make_fake_host(), NEW: make_fake_host()}
    for host in hosts.values():
        host.configure(swap_names={str(host.paths["swapfile"]): "/swapfile"})
    fake.add_instance(OLD, zone="us-west1-b")

    def settings_at(where, **more):
        host = hosts[where["instance"]]
        return load_settings(root=project, environ={}, overrides={
            "app_dir": str(host.app_dir), "data_dir": str(host.data_dir),
            "limits.swap_size": "16m", "health.deadline": 5, "target": "gcp",
            "data.out": str(tmp_path / "backups"), "gcp.api_endpoint": fake.endpoint,
            **{f"gcp.{k}": where[k] for k in mp.KEYS}, **more})
    source = {"project": fake.project, "zone": "us-west1-b", "instance": OLD,
              "machine_type": "e2-micro"}
    Deployer(project, hosts[OLD])(settings_at(source))  # the agent runs on the old VM
    (hosts[OLD].data_dir / "memory").mkdir(parents=True, exist_ok=True)
    (hosts[OLD].data_dir / "memory" / "chat.json").write_text('{"remember": "the milk"}')
    (hosts[OLD].data_dir / "state.db").write_bytes(bytes(range(256)) * 400)
    settings = settings_at(source)
    values = load_secret_values(settings)
    manifest = local_manifest(settings.path("source_dir"), rules_for(settings, values.values))
    dest = mp.target(source, zone="us-central1-a", instance=NEW)
    journal = mp.Journal.begin(tmp_path / "move.json", source, dest)
    layer = FakeHosts(settings_at, values, manifest, hosts)
    return journal, GceCloud(settings_at, timeout=30), layer, hosts


def agent_timeline(hosts: dict) -> list[tuple[float, str, str]]:
    """(time, VM, start|stop) of every start and stop of the agent's unit on either host."""
    events = []
    for name, host in hosts.items():
        for entry in host.call_log():
            argv = entry["argv"]
            if entry["tool"] == "systemctl" and UNIT in argv and \
                    argv[0] in ("start", "restart", "stop"):
                events.append((entry["t"], name, "stop" if argv[0] == "stop" else "start"))
    return sorted(events)


def most_at_once(events, running: set[str]) -> int:
    most = len(running)
    for _, name, verb in events:
        (running.add if verb == "start" else running.discard)(name)
        most = max(most, len(running))
    return most


def test_a_move_through_the_hosts_keeps_one_agent_and_the_data(two_hosts, fake, project):
    journal, cloud, layer, hosts = two_hosts
    before = {p.relative_to(hosts[OLD].data_dir).as_posix(): p.read_bytes()
              for p in hosts[OLD].data_dir.rglob("*") if p.is_file()}
    started = len(agent_timeline(hosts))
    assert moveflow.run_steps(journal, cloud, layer, io.StringIO()) == "done"
    layer.copy_backup = journal.step("copy")["backup"]
    after = {p.relative_to(hosts[NEW].data_dir).as_posix(): p.read_bytes()
             for p in hosts[NEW].data_dir.rglob("*") if p.is_file()}
    assert after == before and len(before) == 2
    events = agent_timeline(hosts)[started:]
    assert most_at_once(events, {OLD}) == 1
    first_new = next(i for i, e in enumerate(events) if e[1] == NEW and e[2] == "start")
    assert "stop" in [e[2] for e in events[:first_new] if e[1] == OLD]
    assert not hosts[OLD].paths["unit_wants"].exists()  # a reboot starts nothing
    assert hosts[NEW].paths["unit_wants"].exists()
    old_audit = [(a["command"], a["outcome"]) for a in hosts[OLD].audit()]
    new_audit = [(a["command"], a["outcome"]) for a in hosts[NEW].audit()]
    assert old_audit[-3:] == [("vm.move", f"stopped: moving to {mp.label(journal.dest)}"),
                              ("vm.move", f"data sent: moving to {mp.label(journal.dest)}"),
                              ("vm.move", f"moved to {mp.label(journal.dest)}")]
    assert new_audit[-3:] == [("vm.move", "staged"),
                              ("vm.move", f"data in place: moved from {mp.label(journal.source)}"),
                              ("vm.move", "ok")]
    assert hosts[NEW].state()["verified"]  # the release passed its gate there
    with hosts[OLD].helper(mode="read") as look:
        assert look.call("health")["moved"]["state"] == "moved"
    assert fake.instances[OLD]["status"] == "TERMINATED"
    assert "staged" in layer.text()
    # a deploy or a restore on the VM left would start a second agent: refused, nothing
    # changed; a backup of what is left there is not
    audit_before = hosts[OLD].audit()
    with pytest.raises(MovedAway, match="the agent moved from this host to nightguard-2 .*this "
                       "task would start a second agent"):
        Deployer(project, hosts[OLD])(layer.settings_at(journal.source))
    old_settings = layer.settings_at(journal.source)
    backup = Path(layer.copy_backup)
    with pytest.raises(MovedAway):
        data.run_restore(old_settings, LocalRemote(hosts[OLD]), backup, read_backup(backup))
    assert hosts[OLD].audit() == audit_before
    data.run_backup(old_settings, LocalRemote(hosts[OLD]), backup.parent)
    assert hosts[OLD].audit()[-1]["command"] == "data.backup"
    assert not hosts[OLD].paths["unit_wants"].exists()


def test_a_new_agent_that_fails_its_gate_is_stopped_and_the_old_one_comes_back(two_hosts, fake):
    journal, cloud, layer, hosts = two_hosts
    hosts[NEW].control("health", {"fail": True})
    started = len(agent_timeline(hosts))
    with pytest.raises(moveflow.MoveFailed, match="the move was undone"):
        moveflow.run_steps(journal, cloud, layer, io.StringIO())
    events = agent_timeline(hosts)[started:]
    assert most_at_once(events, {OLD}) == 1
    assert [e[1:] for e in events][-2:] == [(NEW, "stop"), (OLD, "start")]
    assert hosts[OLD].paths["unit_wants"].exists()
    assert not hosts[NEW].paths["unit_wants"].exists()
    assert hosts[OLD].audit()[-1]["outcome"].startswith("rolled-back")
    with hosts[OLD].helper(mode="read") as look:
        assert look.call("health")["moved"] is None
    with hosts[NEW].helper(mode="read") as look:
        answer = look.call("health")
    assert answer["enabled"] is False
    assert summarize(layer.settings_at(journal.dest), answer)["problems"][0].startswith(
        "the agent's unit is not enabled here: staged by `inv vm.move`")
    assert journal.state == "undone"


def test_a_move_cut_after_the_new_vms_data_swap_is_finished_by_the_next_run(two_hosts, fake,
                                                                            monkeypatch):
    journal, cloud, layer, hosts = two_hosts
    real_call = HostSession.call

    def cut_before_settle(self, op, **kwargs):
        if op == "data_settle":
            raise KeyboardInterrupt  # Ctrl-C between the swap and its settle
        return real_call(self, op, **kwargs)
    monkeypatch.setattr(HostSession, "call", cut_before_settle)
    started = len(agent_timeline(hosts))
    with pytest.raises(KeyboardInterrupt):
        moveflow.run_steps(journal, cloud, layer, io.StringIO())
    assert journal.step("copy")["error"] == "interrupted"
    cut = agent_timeline(hosts)[started:]
    assert (OLD, "stop") in [e[1:] for e in cut] and [e for e in cut if e[2] == "start"] == []
    monkeypatch.setattr(HostSession, "call", real_call)
    again = mp.Journal.load(journal.path)
    assert moveflow.run_steps(again, cloud, layer, io.StringIO()) == "done"
    events = agent_timeline(hosts)[started:]
    assert most_at_once(events, {OLD}) == 1
    # the next data op healed the cut swap without starting the agent it had left stopped
    starts = [e for e in events if e[1:] == (NEW, "start")]
    assert len(starts) == 1
    assert (hosts[NEW].data_dir / "memory" / "chat.json").read_text() == \
        '{"remember": "the milk"}'
    assert "an interrupted restore was undone" in layer.text()
