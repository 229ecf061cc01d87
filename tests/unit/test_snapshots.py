"""The boot disk's daily snapshots: the settings, the schedule's pure parts, and the API calls
through the real google-cloud-compute client against the fake (tests/fake_gce.py), the
`vm.create` and `vm.snapshots` tasks included."""

from __future__ import annotations

import io
import json
import os

import pytest
from invoke import MockContext
from invoke.exceptions import Exit

from tasks.config import ConfigError, load_settings
from tasks.gcp import api as gcp
from tasks.gcp import snapshots as snap
from tasks.gcp import ssh as gcp_ssh
from tasks.gcp import tasks as vm
from tests.unit import gcpfake

# the fake Compute API and clients on it, shared with the other Compute Engine tests
fake = gcpfake.fake
gce = gcpfake.gce
make = gcpfake.make
one_line = gcpfake.one_line


POLICY = "/regions/us-west1/resourcePolicies"
POLICY_URL = ("https://www.googleapis.com/compute/v1/projects/demo-project/regions/us-west1/"
              "resourcePolicies/nightguard-daily")
DISK_URL = ("https://www.googleapis.com/compute/v1/projects/demo-project/zones/us-west1-b/"
            "disks/nightguard")


# -- settings -------------------------------------------------------------------------
def test_snapshot_settings_default_to_a_daily_0300_utc_schedule_kept_7_days(tmp_path):
    s = load_settings(root=tmp_path, environ={})
    assert (s["gcp.snapshots.enabled"], s["gcp.snapshots.keep_days"],
            s["gcp.snapshots.start_time"]) == (True, 7, "03:00")
    s = load_settings(root=tmp_path, environ={"NIGHTGUARD_GCP_SNAPSHOTS_KEEP_DAYS": "365",
                                              "NIGHTGUARD_GCP_SNAPSHOTS_START_TIME": "23:00",
                                              "NIGHTGUARD_GCP_SNAPSHOTS_ENABLED": "false"})
    assert (s["gcp.snapshots.enabled"], s["gcp.snapshots.keep_days"],
            s["gcp.snapshots.start_time"]) == (False, 365, "23:00")


@pytest.mark.parametrize("key, value, expected", [
    ("KEEP_DAYS", "0", "nightguard.gcp.snapshots.keep_days: must be between 1 and 365"),
    ("KEEP_DAYS", "366", "nightguard.gcp.snapshots.keep_days: must be between 1 and 365"),
    ("START_TIME", "03:30", "nightguard.gcp.snapshots.start_time: '03:30' is not a whole hour "
     "in UTC (HH:00, e.g. 03:00): the Compute API starts snapshot schedules on the hour"),
    ("START_TIME", "24:00", "'24:00' is not a whole hour"),
    ("START_TIME", "3:00", "'3:00' is not a whole hour"),
])
def test_bad_snapshot_settings_are_one_line(tmp_path, key, value, expected):
    with pytest.raises(ConfigError) as caught:
        load_settings(root=tmp_path, environ={f"NIGHTGUARD_GCP_SNAPSHOTS_{key}": value})
    assert one_line(caught).startswith(f"environment (NIGHTGUARD_GCP_SNAPSHOTS_{key}): ")
    assert expected in str(caught.value)


# -- the schedule's pure parts ----------------------------------------------------------
def test_policy_name_fits_a_resource_name():
    assert snap.policy_name("nightguard") == "nightguard-daily"
    long = "a" * 56 + "-bcdefg"
    assert snap.policy_name(long) == "a" * 56 + "-daily"
    assert len(snap.policy_name("x" * 63)) == 63


def test_differences_name_each_setting_that_differs():
    want = snap.Schedule("n", "us-west1", "03:00", 7, snap.KEEP, ("us-west1",))
    assert snap.differences(want, want) == []
    have = snap.Schedule("n", "us-west1", "05:00", 14, "APPLY_RETENTION_POLICY", ("us",))
    assert snap.differences(have, want) == [
        "starts at 05:00 UTC, not 03:00 (gcp.snapshots.start_time)",
        "keeps 14 days, not 7 (gcp.snapshots.keep_days)",
        "on disk deletion APPLY_RETENTION_POLICY, not KEEP_AUTO_SNAPSHOTS",
        "stores in us, not us-west1"]


def test_only_a_daily_snapshot_schedule_is_read_as_one():
    compute = gcp.v1()
    built = snap.build_policy(snap.Schedule("n", "us-west1", "04:00", 9, snap.KEEP,
                                            ("us-west1",)))
    built.region = "https://www.googleapis.com/compute/v1/projects/p/regions/us-west1"
    assert snap.read_policy(built) == snap.Schedule("n", "us-west1", "04:00", 9, snap.KEEP,
                                                    ("us-west1",))
    weekly = compute.ResourcePolicy(name="w", snapshot_schedule_policy=compute
                                    .ResourcePolicySnapshotSchedulePolicy(
                                        schedule=compute.ResourcePolicySnapshotSchedulePolicySchedule(
                                            weekly_schedule=compute.ResourcePolicyWeeklyCycle())))
    assert snap.read_policy(weekly) is None
    assert snap.read_policy(compute.ResourcePolicy(
        name="i", instance_schedule_policy=compute.ResourcePolicyInstanceSchedulePolicy(
            time_zone="UTC"))) is None


def test_snapshot_rows_and_table():
    compute = gcp.v1()
    made = compute.Snapshot(name="nightguard-us-west1-b-20261207", status="READY",
                            creation_timestamp="2026-12-06T19:00:05.123-08:00",
                            storage_bytes=int(1.5 * 1024**3), auto_created=True)
    by_hand = compute.Snapshot(name="before-upgrade", status="CREATING",
                               creation_timestamp="2026-12-01T10:00:00Z", storage_bytes=0)
    rows = [snap.snapshot_row(made), snap.snapshot_row(by_hand)]
    assert rows[0] == {"name": "nightguard-us-west1-b-20261207",
                       "created": "2026-12-07 03:00 UTC", "storage_gb": 1.5,
                       "status": "READY", "scheduled": True}
    assert rows[1]["scheduled"] is False and rows[1]["created"] == "2026-12-01 10:00 UTC"
    assert snap.table(rows) == [
        "NAME                            CREATED               STORED   STATUS    BY",
        "nightguard-us-west1-b-20261207  2026-12-07 03:00 UTC  1.50 GB  READY     schedule",
        "before-upgrade                  2026-12-01 10:00 UTC  0.00 GB  CREATING  manual"]


def test_same_policy_takes_full_and_partial_urls():
    assert snap.same_policy(POLICY_URL, "projects/demo-project/regions/us-west1/"
                                        "resourcePolicies/nightguard-daily")
    assert not snap.same_policy(POLICY_URL, POLICY_URL.replace("us-west1", "us-east1"))


# -- the schedule through the API -------------------------------------------------------
def policy_body(name: str = "nightguard-daily", start: str = "03:00", keep: int = 7,
                storage: tuple[str, ...] = ("us-west1",)) -> dict:
    return {"name": name, "snapshotSchedulePolicy": {
        "schedule": {"dailySchedule": {"daysInCycle": 1, "startTime": start}},
        "retentionPolicy": {"maxRetentionDays": keep,
                            "onSourceDiskDelete": "KEEP_AUTO_SNAPSHOTS"},
        "snapshotProperties": {"storageLocations": list(storage)}}}


def test_the_schedule_is_made_with_the_settings_values(make, fake):
    gce = make(**{"gcp.snapshots.keep_days": 14, "gcp.snapshots.start_time": "05:00"})
    fake.op_polls = 2  # a regional operation, polled with our own client
    link, made, warning = snap.ensure_schedule(gce)
    assert (link, made, warning) == (POLICY_URL, True, "")
    [insert] = fake.sent("POST", POLICY + "$")
    body = insert.body
    assert body.pop("description")
    assert body == policy_body(start="05:00", keep=14)
    assert len(fake.sent("POST", r"/regions/us-west1/operations/[^/]+/wait$")) == 2
    assert not fake.sent("POST", r"/zones/.*/operations/")


def test_a_second_run_reuses_the_schedule(gce, fake):
    first = snap.ensure_schedule(gce)
    second = snap.ensure_schedule(gce)
    assert second == (first[0], False, "")
    assert len(fake.sent("POST", POLICY + "$")) == 1


def test_a_schedule_made_meanwhile_by_someone_else_is_reused(gce, fake):
    fake.add_policy("us-west1", policy_body())
    fake.fail("GET", POLICY + "/nightguard-daily$", 404, "The resource 'projects/demo-project/"
              "regions/us-west1/resourcePolicies/nightguard-daily' was not found", "notFound")
    assert snap.ensure_schedule(gce) == (POLICY_URL, False, "")
    assert len(fake.sent("POST", POLICY + "$")) == 1  # answered 409


def test_an_existing_schedule_with_other_settings_is_used_and_told(gce, fake):
    fake.add_policy("us-west1", policy_body(keep=30))
    link, made, warning = snap.ensure_schedule(gce)
    assert (link, made) == (POLICY_URL, False)
    assert warning == (
        "snapshot schedule nightguard-daily already exists and keeps 30 days, not 7 "
        "(gcp.snapshots.keep_days): it is used as it is; to apply the settings, detach and "
        "delete it (`gcloud compute disks remove-resource-policies DISK --zone us-west1-b "
        "--resource-policies nightguard-daily`, `gcloud compute resource-policies delete "
        "nightguard-daily --region us-west1`) and run `inv vm.create` again")
    assert not fake.sent("POST", POLICY + "$")


def test_the_name_taken_by_another_kind_of_policy_is_one_line(gce, fake):
    fake.add_policy("us-west1", {"name": "nightguard-daily", "instanceSchedulePolicy": {
        "timeZone": "UTC", "vmStopSchedule": {"schedule": "0 22 * * *"}}})
    with pytest.raises(gcp.GcpError) as caught:
        snap.ensure_schedule(gce)
    assert one_line(caught) == (
        "step 'vm snapshots' failed: the name nightguard-daily is taken in region us-west1 by "
        "a resource policy that is not a daily snapshot schedule: delete it (`gcloud compute "
        "resource-policies delete nightguard-daily --region us-west1`) or pick another "
        "nightguard.gcp.instance")


PERMISSION = ("Required 'compute.resourcePolicies.create' permission for "
              "'projects/demo-project/regions/us-west1/resourcePolicies/nightguard-daily'")


@pytest.mark.parametrize("status, message, reason, expected", [
    (403, PERMISSION, "forbidden",
     f"permission denied in project demo-project: {PERMISSION} - grant the account a role "
     "that has it, or set nightguard.gcp.snapshots.enabled: false to go without daily "
     "snapshots"),
    (403, "Quota 'RESOURCE_POLICIES' exceeded.  Limit: 10.0 in region us-west1.",
     "quotaExceeded",
     "quota exceeded in project demo-project: Quota 'RESOURCE_POLICIES' exceeded.  Limit: "
     "10.0 in region us-west1. - free resources or request more quota (console: IAM & Admin "
     "> Quotas)"),
])
def test_insert_failures_are_one_line(gce, fake, status, message, reason, expected):
    fake.fail("POST", POLICY + "$", status, message, reason)
    with pytest.raises(gcp.GcpError) as caught:
        snap.ensure_schedule(gce)
    assert one_line(caught) == f"step 'vm snapshots' failed: {expected}"
    assert not fake.resource_policies


def test_a_failed_regional_operation_is_one_line(gce, fake):
    fake.op_error = ("QUOTA_EXCEEDED", "Quota 'SNAPSHOT_SCHEDULES' exceeded.")
    with pytest.raises(gcp.GcpError) as caught:
        snap.ensure_schedule(gce)
    assert one_line(caught) == (
        "step 'vm snapshots' failed: quota exceeded in project demo-project: Quota "
        "'SNAPSHOT_SCHEDULES' exceeded. - free resources or request more quota (console: IAM "
        "& Admin > Quotas)")


# -- the boot disk ----------------------------------------------------------------------
def test_a_new_vm_names_the_schedule_for_its_boot_disk(gce, fake):
    link = snap.ensure_schedule(gce)[0]
    vm_, created = gcp.create_instance(gce, "ubuntu:k ubuntu", snapshot_policy=link)
    assert created
    [insert] = fake.sent("POST", r"/instances$")
    assert insert.body["disks"][0]["initializeParams"]["resourcePolicies"] == [POLICY_URL]
    disk = snap.get_disk(gce, vm_, "t")
    assert list(disk.resource_policies) == [POLICY_URL]
    assert snap.attach(gce, disk, link) == "already"
    assert not fake.sent("POST", r"/addResourcePolicies$")


def test_a_new_vm_without_schedule_names_none(gce, fake):
    gcp.create_instance(gce, "ubuntu:k ubuntu")
    [insert] = fake.sent("POST", r"/instances$")
    assert "resourcePolicies" not in insert.body["disks"][0]["initializeParams"]


def test_an_existing_disk_gets_the_schedule_attached_once(gce, fake):
    fake.add_instance("nightguard")
    link = snap.ensure_schedule(gce)[0]
    instance = gcp.get_instance(gce)
    assert snap.attach(gce, snap.get_disk(gce, instance, "t"), link) == "attached"
    [add] = fake.sent("POST", r"/zones/us-west1-b/disks/nightguard/addResourcePolicies$")
    assert add.body == {"resourcePolicies": [POLICY_URL]}
    assert fake.disks["nightguard"]["resourcePolicies"] == [POLICY_URL]
    assert snap.attach(gce, snap.get_disk(gce, instance, "t"), link) == "already"
    assert len(fake.sent("POST", r"/addResourcePolicies$")) == 1


def test_a_disk_with_another_policy_is_left_alone(gce, fake):
    fake.add_instance("nightguard")
    fake.disks["nightguard"]["resourcePolicies"] = [POLICY_URL.replace("nightguard-daily",
                                                                       "mine")]
    link = snap.ensure_schedule(gce)[0]
    assert snap.attach(gce, snap.get_disk(gce, gcp.get_instance(gce), "t"), link) == "other"
    assert not fake.sent("POST", r"/addResourcePolicies$")


def test_a_missing_disk_is_named(gce, fake):
    fake.add_instance("nightguard")
    del fake.disks["nightguard"]
    with pytest.raises(gcp.GcpError) as caught:
        snap.get_disk(gce, gcp.get_instance(gce), "vm snapshots")
    assert one_line(caught) == ("step 'vm snapshots' failed: disk nightguard not found in zone "
                                "us-west1-b: check the VM's boot disk with `inv vm.status`")


# -- the disk's snapshots ---------------------------------------------------------------
def test_snapshots_are_the_disks_own_newest_first(gce, fake):
    fake.add_instance("nightguard")
    fake.add_snapshot("middle", created="2026-12-05T03:00:00Z")
    fake.add_snapshot("newest", created="2026-12-05T20:00:00-08:00")  # 04:00 UTC next day
    fake.add_snapshot("oldest", created="2026-12-04T03:00:00Z", scheduled=False)
    fake.add_snapshot("elsewhere", disk="other-disk", created="2026-12-06T03:00:00Z")
    disk = snap.get_disk(gce, gcp.get_instance(gce), "t")
    found = snap.list_snapshots(gce, disk)
    assert [s.name for s in found] == ["newest", "middle", "oldest"]
    [listed] = fake.sent("GET", r"/global/snapshots$")
    assert listed.query == {"filter": [f'sourceDisk = "{DISK_URL}"']}


def test_a_refused_list_is_one_line(gce, fake):
    fake.add_instance("nightguard")
    disk = snap.get_disk(gce, gcp.get_instance(gce), "t")
    message = "Required 'compute.snapshots.list' permission for 'projects/demo-project'"
    fake.fail("GET", r"/global/snapshots$", 403, message, "forbidden")
    with pytest.raises(gcp.GcpError) as caught:
        snap.list_snapshots(gce, disk)
    assert one_line(caught).startswith(f"step 'vm snapshots' failed: permission denied in "
                                       f"project demo-project: {message} - grant the account a "
                                       "role that has it")


# -- the tasks ----------------------------------------------------------------------------
@pytest.fixture
def env(monkeypatch, tmp_path, fake):
    """The tasks read settings from the environment, pointed at the fake and tmp_path."""
    for name in [n for n in os.environ if n.startswith("NIGHTGUARD_")]:
        monkeypatch.delenv(name)
    key = tmp_path / "id_ed25519"
    gcp_ssh.generate_keypair(key, out=io.StringIO())
    for name, value in {"GCP_PROJECT": fake.project, "GCP_API_ENDPOINT": fake.endpoint,
                        "SSH_KEY_FILENAME": str(key),
                        "SSH_KNOWN_HOSTS": str(tmp_path / "known_hosts")}.items():
        monkeypatch.setenv(f"NIGHTGUARD_{name}", value)
    return monkeypatch


def test_create_makes_the_schedule_before_the_vm_with_the_settings(env, fake, capsys):
    env.setenv("NIGHTGUARD_GCP_SNAPSHOTS_KEEP_DAYS", "10")
    env.setenv("NIGHTGUARD_GCP_SNAPSHOTS_START_TIME", "22:00")
    vm.create(MockContext())
    posts = [r.path.rsplit("/", 1)[1] for r in fake.requests if r.method == "POST"]
    assert posts == ["resourcePolicies", "instances"]
    [policy] = fake.sent("POST", POLICY + "$")
    retention = policy.body["snapshotSchedulePolicy"]["retentionPolicy"]
    assert retention == {"maxRetentionDays": 10, "onSourceDiskDelete": "KEEP_AUTO_SNAPSHOTS"}
    daily = policy.body["snapshotSchedulePolicy"]["schedule"]["dailySchedule"]
    assert daily == {"daysInCycle": 1, "startTime": "22:00"}
    [insert] = fake.sent("POST", r"/instances$")
    assert insert.body["disks"][0]["initializeParams"]["resourcePolicies"] == [POLICY_URL]
    assert fake.sent("GET", r"/zones/us-west1-b/disks/nightguard$")  # read back
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("snapshot schedule nightguard-daily (daily at 22:00 UTC, kept 10 days): "
                      "created in us-west1")
    assert out[-1] == "boot disk nightguard: snapshot schedule nightguard-daily attached"


def test_create_reads_the_new_disk_back_and_attaches_what_is_missing(env, fake, capsys,
                                                                    monkeypatch):
    made = fake._boot_disk

    def dropping_policies(zone, instance):  # an API that left initializeParams' policy out
        made(zone, instance)
        fake.disks[instance["name"]]["resourcePolicies"] = []
    monkeypatch.setattr(fake, "_boot_disk", dropping_policies)
    vm.create(MockContext())
    [add] = fake.sent("POST", r"/disks/nightguard/addResourcePolicies$")
    assert add.body == {"resourcePolicies": [POLICY_URL]}
    assert capsys.readouterr().out.splitlines()[-1] == (
        "boot disk nightguard: snapshot schedule nightguard-daily attached now")


def test_create_on_an_existing_vm_attaches_the_schedule_to_its_disk(env, fake, capsys):
    fake.add_instance("nightguard")
    vm.create(MockContext())
    assert not fake.sent("POST", r"/instances$")
    [add] = fake.sent("POST", r"/disks/nightguard/addResourcePolicies$")
    assert add.body == {"resourcePolicies": [POLICY_URL]}
    assert capsys.readouterr().out.splitlines()[-1] == (
        "boot disk nightguard: snapshot schedule nightguard-daily attached now")


def test_create_with_snapshots_disabled_makes_no_schedule(env, fake, capsys):
    env.setenv("NIGHTGUARD_GCP_SNAPSHOTS_ENABLED", "false")
    vm.create(MockContext())
    assert not [r for r in fake.requests if "resourcePolicies" in r.path]
    [insert] = fake.sent("POST", r"/instances$")
    assert "resourcePolicies" not in insert.body["disks"][0]["initializeParams"]
    assert "snapshot" not in capsys.readouterr().out


def test_create_tells_a_schedule_with_other_settings_in_one_line(env, fake, capsys):
    fake.add_policy("us-west1", policy_body(start="04:00"))
    vm.create(MockContext())
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("warning: snapshot schedule nightguard-daily already exists and "
                             "starts at 04:00 UTC, not 03:00 (gcp.snapshots.start_time): it "
                             "is used as it is; ")
    assert len(fake.sent("POST", r"/instances$")) == 1


def test_create_without_the_permission_creates_nothing(env, fake):
    fake.fail("POST", POLICY + "$", 403, PERMISSION, "forbidden")
    with pytest.raises(Exit) as caught:
        vm.create(MockContext())
    assert caught.value.code == 1
    assert caught.value.message == (
        f"error: step 'vm create' failed: permission denied in project demo-project: "
        f"{PERMISSION} - grant the account a role that has it, or set "
        "nightguard.gcp.snapshots.enabled: false to go without daily snapshots")
    assert not fake.sent("POST", r"/instances$") and not fake.instances


def test_a_bad_start_time_stops_create_before_any_call(env, fake):
    env.setenv("NIGHTGUARD_GCP_SNAPSHOTS_START_TIME", "03:15")
    with pytest.raises(Exit) as caught:
        vm.create(MockContext())
    assert caught.value.code == 2
    assert "nightguard.gcp.snapshots.start_time: '03:15' is not a whole hour" in \
        caught.value.message
    assert fake.requests == []


def test_snapshots_lists_the_schedule_and_the_snapshots_newest_first(env, fake, capsys):
    vm.create(MockContext())
    fake.add_snapshot("nightguard-20261205", created="2026-12-05T03:00:07Z",
                      storage_bytes=3 * 1024**3)
    fake.add_snapshot("nightguard-20261206", created="2026-12-06T03:00:09Z",
                      storage_bytes=256 * 1024**2)
    fake.add_snapshot("before-upgrade", created="2026-12-05T12:30:00Z", scheduled=False,
                      status="CREATING", storage_bytes=0)
    capsys.readouterr()
    vm.snapshots(MockContext())
    assert capsys.readouterr().out.splitlines() == [
        "boot disk nightguard: snapshot schedule nightguard-daily (daily at 03:00 UTC, kept 7 "
        "days)",
        "NAME                 CREATED               STORED   STATUS    BY",
        "nightguard-20261206  2026-12-06 03:00 UTC  0.25 GB  READY     schedule",
        "before-upgrade       2026-12-05 12:30 UTC  0.00 GB  CREATING  manual",
        "nightguard-20261205  2026-12-05 03:00 UTC  3.00 GB  READY     schedule"]
    vm.snapshots(MockContext(), json_=True)
    answer = json.loads(capsys.readouterr().out)
    assert answer["schedule"] == {"name": "nightguard-daily", "region": "us-west1",
                                  "start_time": "03:00", "keep_days": 7}
    assert [s["name"] for s in answer["snapshots"]] == [
        "nightguard-20261206", "before-upgrade", "nightguard-20261205"]
    assert answer["snapshots"][0] == {"name": "nightguard-20261206",
                                      "created": "2026-12-06 03:00 UTC", "storage_gb": 0.25,
                                      "status": "READY", "scheduled": True}


def test_snapshots_of_a_disk_without_schedule_says_how_to_attach_it(env, fake, capsys):
    fake.add_instance("nightguard")
    vm.snapshots(MockContext())
    assert capsys.readouterr().out.splitlines() == [
        "boot disk nightguard: no schedule attached: run `inv vm.create` (it attaches "
        "nightguard-daily to an existing VM's disk; nightguard.gcp.snapshots.enabled must be "
        "true)",
        "no snapshots yet"]
    vm.snapshots(MockContext(), json_=True)
    answer = json.loads(capsys.readouterr().out)
    assert answer == {"instance": "nightguard", "disk": "nightguard", "schedule": None,
                      "snapshots": []}


def test_snapshots_of_a_disk_with_another_policy_names_it(env, fake, capsys):
    fake.add_instance("nightguard")
    fake.add_policy("us-west1", policy_body(name="weekly") | {"snapshotSchedulePolicy": {
        "schedule": {"weeklySchedule": {"dayOfWeeks": [{"day": "SUNDAY",
                                                        "startTime": "01:00"}]}}}})
    fake.disks["nightguard"]["resourcePolicies"] = [POLICY_URL.replace("nightguard-daily",
                                                                       "weekly")]
    vm.snapshots(MockContext())
    assert capsys.readouterr().out.splitlines()[0] == (
        "boot disk nightguard: no daily schedule attached, but weekly: detach it (`gcloud "
        "compute disks remove-resource-policies nightguard --zone us-west1-b "
        "--resource-policies weekly`), then run `inv vm.create`")


def test_snapshots_failures_are_one_line(env, fake, capsys):
    with pytest.raises(Exit) as caught:
        vm.snapshots(MockContext())
    assert caught.value.code == 1
    assert caught.value.message.startswith("error: step 'vm snapshots' failed: VM nightguard "
                                           "not found in project demo-project")
    assert capsys.readouterr().out == ""
    with pytest.raises(Exit) as caught:
        vm.snapshots(MockContext(), json_=True)
    answer = json.loads(capsys.readouterr().out)
    assert answer["error"]["step"] == "vm snapshots"
    assert caught.value.message == f"error: {answer['error']['message']}"
