"""The Compute Engine layer through the real google-cloud-compute client against the fake."""

from __future__ import annotations

import json
import subprocess
import time

import google.auth
import pytest
from google.auth.exceptions import DefaultCredentialsError

from tasks.config import load_settings
from tasks.gcp import api as gcp
from tasks.gcp import ssh as gcp_ssh
from tests.fake_gce import FakeGce

VM = r"/zones/us-west1-b/instances/nightguard$"
VM_RESOURCE = "The resource 'projects/demo-project/zones/us-west1-b/instances/nightguard' " \
              "was not found"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOurKey me@laptop"


@pytest.fixture
def fake():
    server = FakeGce().start()
    yield server
    server.stop()


@pytest.fixture
def make(tmp_path, fake):
    def make(**overrides):
        values = {"gcp.project": fake.project, "gcp.api_endpoint": fake.endpoint, **overrides}
        settings = load_settings(root=tmp_path, environ={}, overrides=values)
        gce = gcp.connect(settings)
        gce.poll_interval, gce.request_timeout = 0.0, 2.0
        return gce
    return make


@pytest.fixture
def gce(make):
    return make()


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


# -- create ---------------------------------------------------------------------------
def test_create_sends_a_free_tier_vm_with_the_ssh_key(gce, fake):
    vm, created = gcp.create_instance(gce, "ubuntu:ssh-ed25519 AAAA ubuntu")
    assert created and vm.status == "RUNNING" and gcp.external_ip(vm) == "203.0.113.10"
    assert fake.sent("GET", r"/projects/ubuntu-os-cloud/global/images/family/"
                            r"ubuntu-2404-lts-amd64$")
    [insert] = fake.sent("POST", r"/zones/us-west1-b/instances$")
    body = insert.body
    assert body["machineType"] == "zones/us-west1-b/machineTypes/e2-micro"
    disk = body["disks"][0]
    assert disk["boot"] and disk["autoDelete"]
    params = disk["initializeParams"]
    assert params["sourceImage"].endswith("/projects/ubuntu-os-cloud/global/images/"
                                          "ubuntu-2404-noble-amd64-v20250101")
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
                                "ubuntu-os-cloud: fix nightguard.gcp.image_family/image_project")


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
