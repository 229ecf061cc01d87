"""The Compute Engine layer through the real google-cloud-compute client against the fake;
the VM's host key pinned by instance, and the first minutes of a new VM (its sshd and login
user not up yet) against small paramiko servers. The login wait itself against a real sshd
is in test_remote_sshd.py."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import threading
import time
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime

import google.auth
import paramiko
import pytest
from google.auth.exceptions import DefaultCredentialsError

from tasks.config import load_settings
from tasks.errors import StepFailed
from tasks.gcp import api as gcp
from tasks.gcp import ssh as gcp_ssh
from tasks.ssh import remote as remote_module
from tasks.ssh.remote import Remote
from tests.unit import gcpfake
from tests.unit.sshstub import ssh_server

# the fake Compute API and clients on it, shared with the other Compute Engine tests
fake = gcpfake.fake
gce = gcpfake.gce
make = gcpfake.make
one_line = gcpfake.one_line


VM = r"/zones/us-west1-b/instances/nightguard$"
VM_RESOURCE = "The resource 'projects/demo-project/zones/us-west1-b/instances/nightguard' " \
              "was not found"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOurKey me@laptop"


# -- create ---------------------------------------------------------------------------
def test_create_sends_a_free_tier_vm_with_the_ssh_key(gce, fake):
    vm, created = gcp.create_instance(gce, "ubuntu:ssh-ed25519 AAAA ubuntu")
    assert created and vm.status == "RUNNING" and gcp.external_ip(vm) == "203.0.113.10"
    assert fake.sent("GET", r"/projects/debian-cloud/global/images/family/debian-12$")
    [insert] = fake.sent("POST", r"/zones/us-west1-b/instances$")
    body = insert.body
    assert body["machineType"] == "zones/us-west1-b/machineTypes/e2-micro"
    disk = body["disks"][0]
    assert disk["boot"] and disk["autoDelete"]
    params = disk["initializeParams"]
    assert params["sourceImage"].endswith("/projects/debian-cloud/global/images/"
                                          "debian-12-bookworm-v20251111")
    assert int(params["diskSizeGb"]) == 30
    assert params["diskType"] == "zones/us-west1-b/diskTypes/pd-standard"
    assert body["tags"]["items"] == ["nightguard"]
    assert body["networkInterfaces"][0]["accessConfigs"][0]["type"] == "ONE_TO_ONE_NAT"
    items = {i["key"]: i["value"] for i in body["metadata"]["items"]}
    assert items["ssh-keys"] == "ubuntu:ssh-ed25519 AAAA ubuntu"
    assert items["enable-guest-attributes"] == "TRUE"
    script = items["startup-script"]
    assert script.startswith("#!/bin/sh") and "command -v podman" in script
    assert "install" in script and "podman" in script.split("install", 1)[1]
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0
    # no account: nothing on the VM, the agent included, can get a Google token
    assert "serviceAccounts" not in body
    assert gcp.service_account_text(vm).startswith("none (nothing on the VM can get")


def test_an_attached_account_is_named_with_its_scopes():
    compute = gcp.v1()
    vm = compute.Instance(service_accounts=[compute.ServiceAccount(
        email="123-compute@developer.gserviceaccount.com",
        scopes=["https://www.googleapis.com/auth/cloud-platform"])])
    assert gcp.service_account_text(vm) == ("123-compute@developer.gserviceaccount.com "
                                            "(scopes: cloud-platform) - the agent can use it too")


def test_create_reports_an_existing_vm_and_inserts_nothing(gce, fake):
    fake.add_instance("nightguard")
    vm, created = gcp.create_instance(gce, "ubuntu:k ubuntu")
    assert not created and vm.name == "nightguard"
    assert not fake.sent("POST", r"/instances$")


def test_create_treats_409_from_a_racing_creator_as_existing(gce, fake):
    fake.add_instance("nightguard")
    fake.fail("GET", VM, 404, VM_RESOURCE, "notFound")  # gone at first look, then there
    vm, created = gcp.create_instance(gce, "ubuntu:k ubuntu")
    assert not created and vm.name == "nightguard"
    assert len(fake.sent("POST", r"/instances$")) == 1


def test_slow_operation_is_polled_with_our_own_client_until_done(gce, fake):
    fake.op_polls = 3
    vm, created = gcp.create_instance(gce, "ubuntu:k ubuntu")
    assert created
    waits = fake.sent("POST", r"/zones/us-west1-b/operations/[^/]+/wait$")
    assert len(waits) == 3


def test_operation_that_never_finishes_times_out_in_one_line(make, fake):
    gce = make()
    gce.poll_interval = 0.01
    fake.add_instance("nightguard", status="TERMINATED")
    fake.op_polls = 10_000
    started = time.monotonic()
    with pytest.raises(gcp.GcpError) as caught:
        gcp.power(gce, "start", timeout=0.2)
    assert time.monotonic() - started < 2
    assert one_line(caught) == ("step 'vm start' failed: operation start not done after 0.2s "
                                "(still RUNNING): it may finish later, check with "
                                "`inv vm.status`")


def test_hanging_api_times_out_in_one_line(gce, fake):
    gce.request_timeout = 0.3
    fake.hang = VM
    with pytest.raises(gcp.GcpError) as caught:
        gcp.get_instance(gce)
    assert one_line(caught) == ("step 'vm get' failed: no answer from the Compute API within "
                                "0.3s: check the network and retry")


# -- power and address ----------------------------------------------------------------
def test_start_stop_reset_and_external_ip(gce, fake):
    fake.add_instance("nightguard", status="TERMINATED")
    fake.nat_ip = "127.0.0.1"
    assert gcp.power(gce, "start").status == "RUNNING"
    assert gcp.external_ip(gcp.get_instance(gce)) == "127.0.0.1"
    assert gcp.power(gce, "reset").status == "RUNNING"
    stopped = gcp.power(gce, "stop")
    assert stopped.status == "TERMINATED" and gcp.external_ip(stopped) == ""
    verbs = [r.path.rsplit("/", 1)[1] for r in fake.requests if r.method == "POST"
             and "/instances/" in r.path]
    assert verbs == ["start", "reset", "stop"]


# -- host keys pinned by instance: a new address after stop/start -----------------------
@pytest.fixture
def pinned(make, fake, tmp_path):
    """A VM at 127.0.0.1 whose host key was recorded on first use, then stopped and started
    again at 127.0.0.2 (a new ephemeral IP), publishing no guest attributes."""
    key = paramiko.ECDSAKey.generate()
    fake.nat_ip = "127.0.0.1"
    vm = fake.add_instance("nightguard")
    gcp_ssh.generate_keypair(tmp_path / "login_key", out=io.StringIO())
    with ssh_server(key) as port:
        gce = make(**{"ssh.port": port, "ssh.connect_timeout": 5, "ssh.login_wait": "0s",
                      "ssh.key_filename": "login_key"})
        out = io.StringIO()
        gcp_ssh.ssh_target(gce.settings, gce, out)
    assert "on first use" in out.getvalue()
    gcp.power(gce, "stop")
    fake.nat_ip = "127.0.0.2"
    gcp.power(gce, "start")
    known = tmp_path / ".ssh" / "known_hosts"
    return gce, port, key, known, f"gce/demo-project/us-west1-b/nightguard/{vm['id']}"


def first_connection(target) -> str:
    """How the first connection to ``target`` ends: its one-line failure."""
    with Remote(target, connect_timeout=5, out=io.StringIO()) as remote:
        with pytest.raises(StepFailed) as caught:
            remote.open_pipe(["true"], step="probe")
    return one_line(caught)


def test_a_new_address_gets_the_key_pinned_for_the_instance(pinned):
    gce, port, key, known, name = pinned
    line = f"{key.get_name()} {key.get_base64()}"
    assert (known.parent / "known_hosts.instances").read_text() == f"{name} {line}\n"
    out = io.StringIO()
    target = gcp_ssh.ssh_target(gce.settings, gce, out)  # nothing listens at 127.0.0.2 yet
    assert out.getvalue() == (f"pinned host key of [127.0.0.2]:{port} (VM nightguard's new "
                              f"address) from the key pinned for the VM: {key.get_name()} "
                              f"{key.fingerprint}\n")
    assert known.read_text().splitlines() == [f"[127.0.0.1]:{port} {line}",
                                              f"[127.0.0.2]:{port} {line}"]
    with ssh_server(key, "127.0.0.2", port):  # the pinned key is accepted: on to the login
        assert first_connection(target).endswith(
            "gcp nightguard (127.0.0.2): Authentication failed.")


def test_a_different_key_at_the_new_address_is_refused_in_one_line(pinned):
    gce, port, key, known, name = pinned
    target = gcp_ssh.ssh_target(gce.settings, gce, io.StringIO())
    other = paramiko.ECDSAKey.generate()
    with ssh_server(other, "127.0.0.2", port):
        message = first_connection(target)
    fix = (f"ssh-keygen -R '[127.0.0.2]:{port}' -f {known} && ssh-keygen -R {name} -f "
           f"{known}.instances")
    assert message == (f"step 'connect' failed: gcp nightguard (127.0.0.2): host key does not "
                       f"match {known} (it offered {other.get_name()} {other.fingerprint}): "
                       f"only if you know the host was rebuilt, remove the old pin with "
                       f"`{fix}` and connect again")
    subprocess.run(fix, shell=True, check=True, capture_output=True)
    with ssh_server(other, "127.0.0.2", port):
        out = io.StringIO()
        gcp_ssh.ssh_target(gce.settings, gce, out)
    assert out.getvalue().startswith(f"recorded host key of [127.0.0.2]:{port} on first use: ")


def test_a_stale_entry_of_another_vm_at_the_new_address_gives_way(pinned):
    gce, port, key, known, name = pinned
    stale = paramiko.ECDSAKey.generate()
    with known.open("a") as handle:
        handle.write(f"[127.0.0.2]:{port} {stale.get_name()} {stale.get_base64()}\n")
    out = io.StringIO()
    gcp_ssh.ssh_target(gce.settings, gce, out)
    assert out.getvalue() == (f"replaced the host key of [127.0.0.2]:{port} (another VM's: "
                              "addresses are reused) with the one pinned for VM nightguard: "
                              f"{key.get_name()} {key.fingerprint}\n")
    assert f"[127.0.0.2]:{port} {key.get_name()} {key.get_base64()}" in known.read_text()
    assert stale.get_base64() not in known.read_text()


def test_a_vm_re_created_under_its_name_is_not_taken_for_the_old_one(pinned, fake):
    gce, port, key, known, name = pinned
    fake.recreate("nightguard")
    new = paramiko.ECDSAKey.generate()
    with ssh_server(new, "127.0.0.2", port):
        out = io.StringIO()
        target = gcp_ssh.ssh_target(gce.settings, gce, out)
        assert first_connection(target).endswith("Authentication failed.")
    assert out.getvalue().startswith(f"recorded host key of [127.0.0.2]:{port} on first use: "
                                     f"{new.get_name()} {new.fingerprint}")


def test_guest_attributes_win_over_the_instance_pin(pinned, fake):
    gce, port, key, known, name = pinned
    rotated = paramiko.ECDSAKey.generate()
    fake.guest_attributes["nightguard"] = {
        "hostkeys": {rotated.get_name(): rotated.get_base64()}}
    out = io.StringIO()
    gcp_ssh.ssh_target(gce.settings, gce, out)
    assert out.getvalue().startswith(f"pinned host key of [127.0.0.2]:{port} from the VM's "
                                     "guest attributes: ")
    line = f"{rotated.get_name()} {rotated.get_base64()}"
    assert (known.parent / "known_hosts.instances").read_text() == f"{name} {line}\n"


# -- the first minutes of a VM: its sshd and login user not up yet --------------------
def target_of(gce, out=None):
    return gcp_ssh.ssh_target(gce.settings, gce, out or io.StringIO())


def publish(fake, key: paramiko.PKey) -> None:
    fake.guest_attributes["nightguard"] = {"hostkeys": {key.get_name(): key.get_base64()}}


def later(seconds: float, action) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()
    return timer


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote_module, "LOGIN_RETRY_EVERY", 0.2)


def test_a_vm_created_minutes_ago_gets_the_login_wait(make, fake):
    fake.add_instance("nightguard")
    publish(fake, paramiko.ECDSAKey.generate())
    fresh = target_of(make())
    assert fresh.login_wait == 300.0  # nightguard.ssh.login_wait: 5m
    assert fresh.login_wait_reason == "the VM's guest agent to install the key for ubuntu"
    assert "`inv vm.authorize-key`" in fresh.login_hint and "OS Login" in fresh.login_hint
    assert target_of(make(**{"ssh.login_wait": "90s"})).login_wait == 90.0
    assert target_of(make(**{"ssh.login_wait": "0s"})).login_wait == 0.0
    fake.age("nightguard", 16 * 60)
    assert target_of(make()).login_wait == 0.0  # a refused login is a real refusal by now


@pytest.mark.parametrize("stamp, now, fresh", [
    ("2025-01-01T10:00:00.000-08:00", datetime(2025, 1, 1, 18, 14, tzinfo=UTC), True),
    ("2025-01-01T10:00:00.000-08:00", datetime(2025, 1, 1, 18, 16, tzinfo=UTC), False),
    ("2025-01-01T18:00:00Z", datetime(2025, 1, 1, 18, 1, tzinfo=UTC), True),
    ("", datetime(2025, 1, 1, tzinfo=UTC), False),
    ("yesterday", datetime(2025, 1, 1, tzinfo=UTC), False),
])
def test_created_recently_reads_rfc3339(stamp, now, fresh):
    instance = gcp.v1().Instance(creation_timestamp=stamp)
    assert gcp_ssh.created_recently(instance, now) is fresh


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving_later(seconds: float, key: paramiko.PKey, port: int):
    """From ``seconds`` on, an SSH server at 127.0.0.1:port (an sshd starting late)."""
    with ExitStack() as stack:
        timer = later(seconds, lambda: stack.enter_context(ssh_server(key, port=port)))
        yield
        timer.join()


def test_a_new_vms_sshd_is_waited_for_before_its_key_is_recorded(make, fake, quick_retries):
    fake.nat_ip = "127.0.0.1"
    fake.add_instance("nightguard")
    port, key = free_port(), paramiko.ECDSAKey.generate()
    out = io.StringIO()
    started = time.monotonic()
    with serving_later(1.0, key, port):
        target = target_of(make(**{"ssh.port": port, "ssh.login_wait": "20s"}), out)
    waited = time.monotonic() - started
    lines = out.getvalue().splitlines()
    assert lines[0] == (f"waiting for sshd at 127.0.0.1:{port} to read its host key "
                        "(connection refused; retrying up to 20s)")
    assert lines[-1].startswith(f"recorded host key of [127.0.0.1]:{port} on first use: "
                                f"{key.get_name()} {key.fingerprint}")
    assert waited >= 1.0
    assert 20 - waited - 0.5 < target.login_wait < 20 - 0.8  # one bound for both waits


def test_guest_attributes_published_while_waiting_are_taken(make, fake, tmp_path,
                                                          quick_retries):
    fake.nat_ip = "127.0.0.1"
    fake.add_instance("nightguard")
    port, key = free_port(), paramiko.ECDSAKey.generate()
    later(0.8, lambda: publish(fake, key))
    out = io.StringIO()
    target_of(make(**{"ssh.port": port, "ssh.login_wait": "20s"}), out)
    assert out.getvalue().splitlines()[-1].startswith(
        f"pinned host key of [127.0.0.1]:{port} from the VM's guest attributes: ")
    assert key.get_base64() in (tmp_path / ".ssh" / "known_hosts").read_text()


def test_a_new_vms_sshd_that_never_comes_fails_in_one_line(make, fake, quick_retries):
    fake.nat_ip = "127.0.0.1"
    fake.add_instance("nightguard")
    port = free_port()
    with pytest.raises(StepFailed) as caught:
        target_of(make(**{"ssh.port": port, "ssh.login_wait": "1s"}))
    assert one_line(caught) == (f"step 'host key' failed: 127.0.0.1:{port}: connection refused "
                                "on every try for 1s")
    fake.age("nightguard", 3600)  # an older VM: no wait, the error at once
    started = time.monotonic()
    with pytest.raises(StepFailed) as caught:
        target_of(make(**{"ssh.port": port}))
    assert time.monotonic() - started < 1
    assert one_line(caught).startswith(f"step 'host key' failed: 127.0.0.1:{port} unreachable: ")


# -- authorize-key --------------------------------------------------------------------
def _keys(fake) -> list[str]:
    items = {i["key"]: i["value"] for i in fake.instances["nightguard"]["metadata"]["items"]}
    return items["ssh-keys"].splitlines()


def test_authorize_key_is_a_read_modify_write_keeping_other_keys(gce, fake):
    vm = fake.add_instance("nightguard", metadata=[
        {"key": "ssh-keys", "value": "alice:ssh-rsa AAAAalice alice"},
        {"key": "startup-script", "value": "echo hi"}])
    fingerprint = vm["metadata"]["fingerprint"]
    assert gcp_ssh.authorize_key(gce, "ubuntu", KEY) is True
    [write] = fake.sent("POST", r"/setMetadata$")
    assert write.body["fingerprint"] == fingerprint
    items = {i["key"]: i["value"] for i in write.body["items"]}
    assert items["startup-script"] == "echo hi"
    assert items["ssh-keys"].splitlines() == [
        "alice:ssh-rsa AAAAalice alice",
        "ubuntu:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOurKey ubuntu"]


def test_authorize_key_adds_no_duplicate(gce, fake):
    fake.add_instance("nightguard")
    assert gcp_ssh.authorize_key(gce, "ubuntu", KEY) is True
    assert gcp_ssh.authorize_key(gce, "ubuntu", KEY) is False
    assert len(fake.sent("POST", r"/setMetadata$")) == 1
    assert _keys(fake) == ["ubuntu:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOurKey ubuntu"]


def test_authorize_key_retries_after_412_and_keeps_the_racing_write(gce, fake):
    fake.add_instance("nightguard")
    fake.concurrent_writer = "bob:ssh-ed25519 AAAAbob bob"
    assert gcp_ssh.authorize_key(gce, "ubuntu", KEY) is True
    first, second = fake.sent("POST", r"/setMetadata$")
    assert first.body["fingerprint"] != second.body["fingerprint"]
    assert _keys(fake) == ["bob:ssh-ed25519 AAAAbob bob",
                           "ubuntu:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOurKey ubuntu"]


def test_authorize_key_gives_up_after_repeated_412(gce, fake):
    fake.add_instance("nightguard")
    fake.fail("POST", r"/setMetadata$", 412, "fingerprint mismatch", "conditionNotMet", times=9)
    with pytest.raises(gcp.GcpError) as caught:
        gcp_ssh.authorize_key(gce, "ubuntu", KEY)
    assert one_line(caught) == ("step 'vm authorize-key' failed: VM metadata kept changing "
                                "during 5 attempts (HTTP 412): retry in a moment")


@pytest.mark.parametrize("vm_value, project_value, where", [
    ("TRUE", None, "VM"), (None, "TRUE", "project"), ("true", "FALSE", "VM")])
def test_os_login_is_detected_and_no_key_is_written(gce, fake, vm_value, project_value,
                                                     where):
    metadata = [{"key": "enable-oslogin", "value": vm_value}] if vm_value else []
    fake.add_instance("nightguard", metadata=metadata)
    if project_value:
        fake.project_metadata = [{"key": "enable-oslogin", "value": project_value}]
    with pytest.raises(gcp.GcpError) as caught:
        gcp_ssh.authorize_key(gce, "ubuntu", KEY)
    assert one_line(caught) == (
        f"step 'vm authorize-key' failed: OS Login is enabled ({where} metadata "
        "enable-oslogin=TRUE), so the VM ignores ssh-keys metadata: add the key with `gcloud "
        "compute os-login ssh-keys add --key-file KEY.pub` or set enable-oslogin=FALSE on "
        "the VM")
    assert not fake.sent("POST", r"/setMetadata$")


def test_vm_level_oslogin_false_overrides_the_project(gce, fake):
    fake.add_instance("nightguard", metadata=[{"key": "enable-oslogin", "value": "FALSE"}])
    fake.project_metadata = [{"key": "enable-oslogin", "value": "TRUE"}]
    assert gcp_ssh.authorize_key(gce, "ubuntu", KEY) is True


# -- error translation ----------------------------------------------------------------
PERMISSION = "Required 'compute.instances.get' permission for 'projects/demo-project'"


@pytest.mark.parametrize("status, message, reason, expected", [
    (403, PERMISSION, "forbidden",
     f"permission denied in project demo-project: {PERMISSION} - grant the account "
     "roles/compute.instanceAdmin.v1 and check the Compute Engine API is enabled"),
    (404, VM_RESOURCE, "notFound",
     "VM nightguard not found in project demo-project zone us-west1-b: create it with "
     "`inv vm.create` or fix nightguard.gcp.instance/zone"),
    (403, "Quota exceeded for quota metric 'Queries'", "rateLimitExceeded",
     "quota exceeded in project demo-project: Quota exceeded for quota metric 'Queries' - "
     "free resources or request more quota (console: IAM & Admin > Quotas)"),
    (429, "Too many requests", "rateLimitExceeded",
     "quota exceeded in project demo-project: Too many requests - free resources or request "
     "more quota (console: IAM & Admin > Quotas)"),
    (401, "Request had invalid authentication credentials.", "authError",
     # the client refreshes and retries first; anonymous credentials cannot refresh
     "credentials rejected (Anonymous credentials cannot be refreshed.): run `gcloud auth "
     "application-default login` or renew nightguard.gcp.credentials_file"),
    (500, "Internal error.\nsecond line", "backendError",
     "Compute API error 500: Internal error."),
])
def test_http_errors_become_one_line(gce, fake, status, message, reason, expected):
    fake.add_instance("nightguard")
    fake.fail("GET", VM, status, message, reason)
    with pytest.raises(gcp.GcpError) as caught:
        gcp.get_instance(gce)
    assert one_line(caught) == f"step 'vm get' failed: {expected}"


def test_unknown_project_and_zone_are_named(make):
    with pytest.raises(gcp.GcpError) as caught:
        gcp.get_instance(make(**{"gcp.project": "nope"}))
    assert one_line(caught) == ("step 'vm get' failed: project nope not found or not visible "
                                "to these credentials: fix nightguard.gcp.project")
    with pytest.raises(gcp.GcpError) as caught:
        gcp.create_instance(make(**{"gcp.zone": "mars-north1-a"}), "k")
    assert one_line(caught) == ("step 'vm create' failed: zone mars-north1-a does not exist: "
                                "fix nightguard.gcp.zone (e.g. us-west1-b)")


def test_vanished_operation_is_not_blamed_on_the_zone(gce, fake):
    fake.add_instance("nightguard")
    fake.op_polls = 2
    fake.fail("POST", r"/operations/[^/]+/wait$", 404, "The resource 'projects/demo-project/"
              "zones/us-west1-b/operations/operation-9' was not found", "notFound")
    with pytest.raises(gcp.GcpError) as caught:
        gcp.power(gce, "reset")
    assert one_line(caught) == ("step 'vm reset' failed: the operation vanished before it was "
                                "seen done: check with `inv vm.status`")


def test_unknown_image_family_is_named(make):
    with pytest.raises(gcp.GcpError) as caught:
        gcp.create_instance(make(**{"gcp.image_family": "debian-99"}), "k")
    assert one_line(caught) == ("step 'vm create' failed: image family debian-99 not found in "
                                "debian-cloud: fix nightguard.gcp.image_family/image_project")


@pytest.mark.parametrize("code, message, expected", [
    ("QUOTA_EXCEEDED", "Quota 'CPUS' exceeded.  Limit: 0.0 in region us-west1.",
     "quota exceeded in project demo-project: Quota 'CPUS' exceeded.  Limit: 0.0 in region "
     "us-west1. - free resources or request more quota (console: IAM & Admin > Quotas)"),
    ("ZONE_RESOURCE_POOL_EXHAUSTED", "The zone does not have enough resources.",
     "zone us-west1-b has no capacity for this VM right now: retry later or pick another "
     "free-tier zone (nightguard.gcp.zone)"),
])
def test_failed_operations_become_one_line(gce, fake, code, message, expected):
    fake.op_error = (code, message)
    with pytest.raises(gcp.GcpError) as caught:
        gcp.create_instance(gce, "k")
    assert one_line(caught) == f"step 'vm create' failed: {expected}"


def test_unreachable_endpoint(make):
    gce = make(**{"gcp.api_endpoint": "http://127.0.0.1:9"})
    with pytest.raises(gcp.GcpError) as caught:
        gcp.get_instance(gce)
    assert one_line(caught) == ("step 'vm get' failed: cannot reach the Compute API at "
                                "http://127.0.0.1:9: check the network or "
                                "nightguard.gcp.api_endpoint")


# -- credentials ----------------------------------------------------------------------
def _settings(tmp_path, **overrides):
    return load_settings(root=tmp_path, environ={},
                         overrides={"gcp.project": "demo-project", **overrides})


def test_missing_application_default_credentials(tmp_path, monkeypatch):
    def no_credentials(**_):
        raise DefaultCredentialsError("Your default credentials were not found.")
    monkeypatch.setattr(google.auth, "default", no_credentials)
    with pytest.raises(gcp.GcpError) as caught:
        gcp.connect(_settings(tmp_path))
    assert one_line(caught) == ("step 'gcp credentials' failed: no Application Default "
                                "Credentials found: run `gcloud auth application-default "
                                "login` or set nightguard.gcp.credentials_file")


def test_credentials_file_missing_or_malformed(tmp_path):
    with pytest.raises(gcp.GcpError) as caught:
        gcp.connect(_settings(tmp_path, **{"gcp.credentials_file": "sa.json"}))
    assert one_line(caught) == (f"step 'gcp credentials' failed: {tmp_path}/sa.json not "
                                "found: fix nightguard.gcp.credentials_file (a service-account"
                                " JSON key)")
    (tmp_path / "sa.json").write_text(json.dumps({"type": "authorized_user"}))
    with pytest.raises(gcp.GcpError) as caught:
        gcp.connect(_settings(tmp_path, **{"gcp.credentials_file": "sa.json"}))
    assert one_line(caught).startswith("step 'gcp credentials' failed: sa.json is not a "
                                       "service-account key (")


def test_free_tier_warnings(tmp_path):
    assert gcp.free_tier_warnings(_settings(tmp_path)) == []
    costly = _settings(tmp_path, **{"gcp.zone": "europe-west1-b", "gcp.machine_type": "e2-small",
                                    "gcp.disk_gb": 40, "gcp.disk_type": "pd-balanced"})
    assert gcp.free_tier_warnings(costly) == [
        "zone europe-west1-b is outside the free tier regions (us-west1, us-central1, "
        "us-east1)",
        "machine type e2-small is not the free e2-micro",
        "boot disk 40 GB is above the free 30 GB",
        "disk type pd-balanced is not the free pd-standard"]
