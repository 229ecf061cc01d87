"""`inv vm.*` tasks, the login key pair, and the VM's SSH address with its host key pinned
(guest attributes, else first use against a throwaway paramiko server)."""

from __future__ import annotations

import base64
import copy
import inspect
import io
import os
from datetime import UTC, datetime

import paramiko
import pytest
from invoke import MockContext
from invoke.exceptions import Exit

from tasks.config import load_settings
from tasks.errors import ConfigError, StepFailed
from tasks.gcp import api as gcp
from tasks.gcp import ssh as gcp_ssh
from tasks.gcp import tasks as vm
from tasks.ssh.remote import Remote
from tests.unit import gcpfake
from tests.unit.sshstub import ssh_server

# the fake Compute API and clients on it, shared with the other Compute Engine tests
fake = gcpfake.fake


@pytest.fixture
def env(monkeypatch, tmp_path, fake):
    """The tasks read settings from the environment, pointed at the fake and tmp_path."""
    for name in [n for n in os.environ if n.startswith("NIGHTGUARD_")]:
        monkeypatch.delenv(name)
    key = tmp_path / "id_ed25519"
    gcp_ssh.generate_keypair(key, out=io.StringIO())
    for name, value in {"GCP_PROJECT": fake.project, "GCP_API_ENDPOINT": fake.endpoint,
                        "GCP_ZONE": "us-west1-b", "GCP_INSTANCE": "nightguard",
                        "SSH_USER": "ubuntu", "SSH_KEY_FILENAME": str(key),
                        "SSH_KNOWN_HOSTS": str(tmp_path / "known_hosts")}.items():
        monkeypatch.setenv(f"NIGHTGUARD_{name}", value)
    return key


def settings(tmp_path, fake, **overrides):
    values = {"gcp.project": fake.project, "gcp.api_endpoint": fake.endpoint, **overrides}
    return load_settings(root=tmp_path, environ={}, overrides=values)


# -- tasks ----------------------------------------------------------------------------
def test_every_task_has_a_docstring_and_help_for_every_flag():
    assert set(vm.ns.task_names) == {"create", "status", "start", "stop", "reset", "ip",
                                     "authorize-key", "snapshots", "move"}
    for task in vm.ns.tasks.values():
        assert task.__doc__
        probe = copy.copy(task)
        probe.help = dict(task.help)  # get_arguments() consumes help entries
        flags = probe.get_arguments()  # also raises on help for an unknown flag
        assert len(flags) == len(inspect.signature(task.body).parameters) - 1
        assert all(flag.help for flag in flags), task.name


def test_create_then_create_again_reports_the_existing_vm(env, fake, capsys):
    vm.create(MockContext())
    vm.create(MockContext())
    out, err = capsys.readouterr()
    schedule = "snapshot schedule nightguard-daily (daily at 03:00 UTC, kept 7 days)"
    assert out.splitlines() == [
        f"{schedule}: created in us-west1",
        "created VM nightguard in us-west1-b (RUNNING, 203.0.113.10); SSH user ubuntu",
        "service account: none (nothing on the VM can get a Google token from its metadata "
        "server)",
        "boot disk nightguard: snapshot schedule nightguard-daily attached",
        f"{schedule}: already there in us-west1",
        "VM nightguard already exists in us-west1-b (RUNNING, 203.0.113.10): nothing "
        "created; add your key with `inv vm.authorize-key`",
        "boot disk nightguard: snapshot schedule nightguard-daily already attached"]
    assert err == ""
    assert len(fake.sent("POST", r"/instances$")) == 1
    blob = (env.parent / "id_ed25519.pub").read_text().split()[1]
    [insert] = fake.sent("POST", r"/instances$")
    keys = {i["key"]: i["value"] for i in insert.body["metadata"]["items"]}["ssh-keys"]
    assert keys == f"ubuntu:ssh-ed25519 {blob} ubuntu"


def test_create_warns_once_per_line_when_leaving_the_free_tier(env, capsys):
    vm.create(MockContext(), zone="europe-west1-b", machine_type="e2-small", disk_gb="40")
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "warning: zone europe-west1-b is outside the free tier regions (us-west1, "
        "us-central1, us-east1): this VM will be billed",
        "warning: machine type e2-small is not the free e2-micro: this VM will be billed",
        "warning: boot disk 40 GB is above the free 30 GB: this VM will be billed"]


def test_status_start_stop_reset_ip(env, fake, capsys):
    fake.add_instance("nightguard", status="TERMINATED")
    vm.start(MockContext())
    vm.ip(MockContext())
    vm.status(MockContext())
    vm.reset(MockContext())
    vm.stop(MockContext())
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "VM nightguard: start done, now RUNNING (203.0.113.10)"
    assert out[1] == "203.0.113.10"
    assert out[2:7] == ["VM nightguard in project demo-project", "  state: RUNNING",
                        "  zone: us-west1-b", "  machine type: e2-micro",
                        "  external IP: 203.0.113.10"]
    assert out[7] in ("  uptime: 0h 0m", "  uptime: 0h 1m")
    assert out[8:] == ["VM nightguard: reset done, now RUNNING (203.0.113.10)",
                       "VM nightguard: stop done, now TERMINATED (no external IP)"]


def test_failures_exit_with_one_line(env, fake, monkeypatch):
    fake.add_instance("nightguard", status="TERMINATED")
    with pytest.raises(Exit) as caught:
        vm.ip(MockContext())
    assert caught.value.code == 1
    assert caught.value.message == ("error: step 'vm ip' failed: VM nightguard has no external "
                                    "IP (TERMINATED): start it with `inv vm.start`")
    with pytest.raises(Exit) as caught:
        vm.status(MockContext(), instance="other")
    assert caught.value.message.startswith("error: step 'vm status' failed: VM other not found")
    monkeypatch.delenv("NIGHTGUARD_GCP_PROJECT")
    with pytest.raises(Exit) as caught:
        vm.status(MockContext())
    assert caught.value.code == 2
    assert caught.value.message.endswith("nightguard.gcp.project: is required when target "
                                         "is gcp")


def test_authorize_key_task_adds_once(env, fake, capsys, tmp_path):
    fake.add_instance("nightguard")
    vm.authorize_key(MockContext())
    vm.authorize_key(MockContext())
    other = tmp_path / "other.pub"
    other.write_text("ssh-ed25519 AAAAother someone\n")
    vm.authorize_key(MockContext(), user="deploy", key=str(other))
    assert capsys.readouterr().out.splitlines() == [
        "authorized the key for ubuntu on VM nightguard",
        "the key for ubuntu is already authorized on VM nightguard",
        "authorized the key for deploy on VM nightguard"]
    assert len(fake.sent("POST", r"/setMetadata$")) == 2


def test_uptime_comes_from_last_start_timestamp():
    instance = gcp.v1().Instance(status="RUNNING", machine_type="zones/z/machineTypes/e2-micro",
                                 last_start_timestamp="2026-01-01T00:00:00.000-08:00")
    now = datetime(2026, 1, 2, 9, 5, tzinfo=UTC)
    assert vm.describe(instance, "z", now)[-1] == "uptime: 1d 1h 5m"
    assert vm.uptime("2026-01-02T09:00:00+00:00", now) == "0h 5m"


# -- key pair -------------------------------------------------------------------------
def test_key_pair_is_generated_in_the_project_when_none_is_configured(tmp_path, fake, capsys):
    s = settings(tmp_path, fake)
    public = gcp_ssh.public_key(s)
    key = tmp_path / ".ssh" / "nightguard_ed25519"
    assert public.startswith("ssh-ed25519 ") and len(public.split()) == 2
    assert key.stat().st_mode & 0o777 == 0o600
    assert paramiko.PKey.from_path(key).get_base64() == public.split()[1]
    assert gcp_ssh.public_key(s) == public
    assert "generated SSH key pair" in capsys.readouterr().err


def test_public_key_is_derived_from_a_configured_private_key(tmp_path, fake):
    key = tmp_path / "mine"
    public = gcp_ssh.generate_keypair(key, out=io.StringIO())
    (tmp_path / "mine.pub").unlink()
    assert gcp_ssh.public_key(settings(tmp_path, fake, **{"ssh.key_filename": "mine"})) == public
    with pytest.raises(ConfigError, match=r"nightguard.ssh.key_filename: .*/absent not found"):
        gcp_ssh.public_key(settings(tmp_path, fake, **{"ssh.key_filename": "absent"}))


# -- SSH address and host key ---------------------------------------------------------
def _gce(s):
    gce = gcp.connect(s)
    gce.poll_interval = 0.0
    return gce


def test_guest_attributes_pin_the_host_key(tmp_path, fake):
    host_key = paramiko.ECDSAKey.generate()
    fake.add_instance("nightguard")
    fake.guest_attributes["nightguard"] = {
        "hostkeys": {host_key.get_name(): host_key.get_base64()}}
    s = settings(tmp_path, fake, **{"ssh.port": 2222})
    out = io.StringIO()
    target = gcp_ssh.ssh_target(s, _gce(s), out)
    assert (target.host, target.port, target.user) == ("203.0.113.10", 2222, "ubuntu")
    assert target.known_hosts == str(tmp_path / ".ssh" / "known_hosts")
    line = f"[203.0.113.10]:2222 {host_key.get_name()} {host_key.get_base64()}"
    assert (tmp_path / ".ssh" / "known_hosts").read_text().splitlines() == [line]
    assert fake.sent("GET", "/getGuestAttributes$")[0].query == {"queryPath": ["hostkeys/"]}
    assert "pinned host key of [203.0.113.10]:2222" in out.getvalue()
    again = io.StringIO()
    gcp_ssh.ssh_target(s, _gce(s), again)  # already there: nothing written, nothing said
    assert again.getvalue() == ""


def test_guest_attributes_replace_a_stale_entry(tmp_path, fake):
    old, new = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()
    known = tmp_path / "kh"
    known.write_text(f"203.0.113.10 {old.get_name()} {old.get_base64()}\n")
    fake.add_instance("nightguard")
    fake.guest_attributes["nightguard"] = {"hostkeys": {new.get_name(): new.get_base64()}}
    s = settings(tmp_path, fake, **{"ssh.known_hosts": "kh"})
    gcp_ssh.ssh_target(s, _gce(s), io.StringIO())
    assert known.read_text() == f"203.0.113.10 {new.get_name()} {new.get_base64()}\n"


def test_first_use_records_the_key_and_a_changed_key_is_rejected(tmp_path, fake):
    fake.nat_ip = "127.0.0.1"
    fake.add_instance("nightguard")
    first = paramiko.ECDSAKey.generate()
    with ssh_server(first) as port:
        s = settings(tmp_path, fake, **{"ssh.port": port, "ssh.connect_timeout": 5})
        out = io.StringIO()
        target = gcp_ssh.ssh_target(s, _gce(s), out)
    base = f"[127.0.0.1]:{port} {first.get_name()}"
    assert (tmp_path / ".ssh" / "known_hosts").read_text() == \
        f"{base} {first.get_base64()}\n"
    assert out.getvalue().startswith(f"recorded host key of [127.0.0.1]:{port} on first use: "
                                     f"{first.get_name()} SHA256:")
    with ssh_server(paramiko.ECDSAKey.generate()) as other_port:
        moved = settings(tmp_path, fake, **{"ssh.port": other_port})
        (tmp_path / ".ssh" / "known_hosts").write_text(
            f"[127.0.0.1]:{other_port} {first.get_name()} {first.get_base64()}\n")
        target = gcp_ssh.ssh_target(moved, _gce(moved), io.StringIO())
        with pytest.raises(StepFailed, match="host key does not match"):
            Remote(target, connect_timeout=5).open_pipe(["true"], step="probe")


def test_stopped_vm_has_no_ssh_address(tmp_path, fake):
    fake.add_instance("nightguard", status="TERMINATED")
    s = settings(tmp_path, fake)
    with pytest.raises(gcp.GcpError) as caught:
        gcp_ssh.ssh_target(s, _gce(s))
    assert str(caught.value) == ("step 'vm address' failed: VM nightguard is TERMINATED: "
                                 "start it with `inv vm.start`")


def test_base64_of_published_keys_is_checked(tmp_path, fake):
    fake.add_instance("nightguard")
    fake.guest_attributes["nightguard"] = {"hostkeys": {
        "ssh-ed25519": base64.b64encode(b"garbage").decode()}}
    s = settings(tmp_path, fake)
    assert gcp_ssh.published_host_keys(_gce(s)) == []
