"""Daily snapshots of the VM's boot disk, where the agent's data lives: a snapshot schedule (a
resource policy in the VM's region, made once and reused), attached to the boot disk, and the
disk's snapshots listed newest first.

Config keys: ``nightguard.gcp.snapshots.enabled/keep_days/start_time``, ``gcp.instance``,
``gcp.zone``. Errors are ``api.GcpError`` lines, like the rest of the Compute layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..config import Settings
from . import api as gcp

if TYPE_CHECKING:
    from google.cloud import compute_v1

KEEP = "KEEP_AUTO_SNAPSHOTS"  # the disk's snapshots outlive it: a deleted VM is restorable
GIB = 1024**3


@dataclass(frozen=True)
class Schedule:
    """A daily snapshot schedule: its name, region, start (UTC, HH:00) and retention."""

    name: str
    region: str
    start_time: str
    keep_days: int
    on_delete: str = KEEP
    storage: tuple[str, ...] = ()

    def text(self) -> str:
        return f"daily at {self.start_time} UTC, kept {self.keep_days} days"


def policy_name(instance: str) -> str:
    """``<instance>-daily``, within the 63 characters a resource name may have."""
    return f"{instance[:57].rstrip('-')}-daily"


def wanted(settings: Settings) -> Schedule:
    region = settings["gcp.zone"].rsplit("-", 1)[0]
    return Schedule(policy_name(settings["gcp.instance"]), region,
                    settings["gcp.snapshots.start_time"], settings["gcp.snapshots.keep_days"],
                    KEEP, (region,))


def build_policy(schedule: Schedule) -> compute_v1.ResourcePolicy:
    compute = gcp.v1()
    policy = compute.ResourcePolicySnapshotSchedulePolicy(
        schedule=compute.ResourcePolicySnapshotSchedulePolicySchedule(
            daily_schedule=compute.ResourcePolicyDailyCycle(
                days_in_cycle=1, start_time=schedule.start_time)),
        retention_policy=compute.ResourcePolicySnapshotSchedulePolicyRetentionPolicy(
            max_retention_days=schedule.keep_days, on_source_disk_delete=schedule.on_delete),
        # kept in the VM's region: the cheapest location, beside the disk it restores
        snapshot_properties=compute.ResourcePolicySnapshotSchedulePolicySnapshotProperties(
            storage_locations=list(schedule.storage)))
    return compute.ResourcePolicy(
        name=schedule.name, snapshot_schedule_policy=policy,  # the region is in the URL
        description="nightguard: daily snapshots of the agent's boot disk")


def read_policy(policy: compute_v1.ResourcePolicy) -> Schedule | None:
    """The daily snapshot schedule a resource policy holds; None when it holds another kind
    (a weekly or hourly schedule, an instance schedule...)."""
    if "snapshot_schedule_policy" not in policy:
        return None
    snap = policy.snapshot_schedule_policy
    daily = snap.schedule.daily_schedule
    if "daily_schedule" not in snap.schedule or daily.days_in_cycle != 1:
        return None
    return Schedule(policy.name, policy.region.rsplit("/", 1)[-1], daily.start_time,
                    snap.retention_policy.max_retention_days,
                    snap.retention_policy.on_source_disk_delete,
                    tuple(snap.snapshot_properties.storage_locations))


def differences(have: Schedule, want: Schedule) -> list[str]:
    """What an existing schedule does otherwise than the settings ask, in words."""
    found = []
    if have.start_time != want.start_time:
        found.append(f"starts at {have.start_time} UTC, not {want.start_time} "
                     "(gcp.snapshots.start_time)")
    if have.keep_days != want.keep_days:
        found.append(f"keeps {have.keep_days} days, not {want.keep_days} "
                     "(gcp.snapshots.keep_days)")
    if have.on_delete != want.on_delete:
        found.append(f"on disk deletion {have.on_delete or 'unset'}, not {want.on_delete}")
    if have.storage != want.storage:
        found.append(f"stores in {', '.join(have.storage) or 'the default location'}, not "
                     f"{', '.join(want.storage)}")
    return found


def _get_policy(gce: gcp.Gce, region: str, name: str, step: str):
    try:
        with gcp.api_errors(gce, step):
            return gce.call(gce.client("ResourcePoliciesClient").get, project=gce.project,
                            region=region, resource_policy=name)
    except gcp.GcpError as exc:
        if exc.status == 404 and exc.resource == "policy":
            return None
        raise


def _insert_policy(gce: gcp.Gce, want: Schedule, step: str, timeout: float | None) -> bool:
    """True if made now, False if someone made one under the name meanwhile."""
    try:
        with gcp.api_errors(gce, step):
            op = gce.call(gce.client("ResourcePoliciesClient").insert_unary,
                          project=gce.project, region=want.region,
                          resource_policy_resource=build_policy(want))
    except gcp.GcpError as exc:
        if exc.status == 409:
            return False
        raise
    gcp.wait_for_operation(gce, op, step, timeout)
    return True


def ensure_schedule(gce: gcp.Gce, timeout: float | None = None,
                    step: str = "vm snapshots") -> tuple[str, bool, str]:
    """(the schedule's URL, made now?, a warning or ""): the settings' schedule made in the
    VM's region if missing; one with the same name is reused, its differences told."""
    want = wanted(gce.settings)
    found = _get_policy(gce, want.region, want.name, step)
    created = False
    if found is None:
        created = _insert_policy(gce, want, step, timeout)
        found = _get_policy(gce, want.region, want.name, step)
        if found is None:
            raise gcp.GcpError(step, f"resource policy {want.name} in {want.region} vanished "
                               "right after it was made: retry")
    have = read_policy(found)
    if have is None:
        raise gcp.GcpError(step, f"the name {want.name} is taken in region {want.region} by a "
                           "resource policy that is not a daily snapshot schedule: delete it "
                           f"(`gcloud compute resource-policies delete {want.name} --region "
                           f"{want.region}`) or pick another nightguard.gcp.instance")
    changes = differences(have, want)
    warning = ""
    if changes:
        warning = (f"snapshot schedule {want.name} already exists and {'; '.join(changes)}: it "
                   "is used as it is; to apply the settings, detach and delete it (`gcloud "
                   f"compute disks remove-resource-policies DISK --zone {gce.zone} "
                   f"--resource-policies {want.name}`, `gcloud compute resource-policies "
                   f"delete {want.name} --region {want.region}`) and run `inv vm.create` again")
    return found.self_link, created, warning


# -- the boot disk ------------------------------------------------------------------------
def boot_disk(instance: compute_v1.Instance) -> tuple[str, str]:
    """(zone, name) of the VM's boot disk, read from its source URL."""
    for disk in instance.disks:
        if disk.boot and disk.source:
            parts = disk.source.split("/")
            return parts[parts.index("zones") + 1], parts[-1]
    raise gcp.GcpError("vm snapshots", f"VM {instance.name} has no boot disk the API names")


def get_disk(gce: gcp.Gce, instance: compute_v1.Instance, step: str) -> compute_v1.Disk:
    zone, name = boot_disk(instance)
    with gcp.api_errors(gce, step):
        return gce.call(gce.client("DisksClient").get, project=gce.project, zone=zone,
                        disk=name)


def same_policy(a: str, b: str) -> bool:
    """Two URLs of one resource policy (full or partial, any API host)."""
    def tail(url: str) -> str:
        return url[url.index("projects/"):] if "projects/" in url else url
    return tail(a) == tail(b)


def attach(gce: gcp.Gce, disk: compute_v1.Disk, policy: str, timeout: float | None = None,
           step: str = "vm snapshots") -> str:
    """Attach the schedule to a disk that exists: "attached", "already" or, when the disk
    has another policy (a disk takes one snapshot schedule), "other"."""
    if any(same_policy(p, policy) for p in disk.resource_policies):
        return "already"
    if disk.resource_policies:
        return "other"
    compute = gcp.v1()
    zone = disk.zone.rsplit("/", 1)[-1]
    with gcp.api_errors(gce, step):
        op = gce.call(gce.client("DisksClient").add_resource_policies_unary,
                      project=gce.project, zone=zone, disk=disk.name,
                      disks_add_resource_policies_request_resource=compute
                      .DisksAddResourcePoliciesRequest(resource_policies=[policy]))
    gcp.wait_for_operation(gce, op, step, timeout)
    return "attached"


def attached_schedule(gce: gcp.Gce, disk: compute_v1.Disk, step: str) -> Schedule | None:
    """The daily snapshot schedule attached to the disk, if any."""
    for url in disk.resource_policies:
        parts = url.split("/")
        if "regions" not in parts:
            continue
        policy = _get_policy(gce, parts[parts.index("regions") + 1], parts[-1], step)
        schedule = read_policy(policy) if policy is not None else None
        if schedule is not None:
            return schedule
    return None


# -- the disk's snapshots -----------------------------------------------------------------
def list_snapshots(gce: gcp.Gce, disk: compute_v1.Disk,
                   step: str = "vm snapshots") -> list[compute_v1.Snapshot]:
    """The snapshots taken of this disk (by its URL: those of an earlier disk of the same
    name, kept after it was deleted, included), newest first."""
    with gcp.api_errors(gce, step):
        request = gcp.v1().ListSnapshotsRequest(
            project=gce.project, filter=f'sourceDisk = "{disk.self_link}"')
        found = list(gce.call(gce.client("SnapshotsClient").list, request=request))
    return sorted(found, key=lambda s: created_at(s.creation_timestamp), reverse=True)


def created_at(stamp: str) -> datetime:
    try:
        return datetime.fromisoformat(stamp).astimezone(UTC)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


def snapshot_row(snapshot: compute_v1.Snapshot) -> dict:
    """What `vm.snapshots` shows of one snapshot (and prints with --json)."""
    when = created_at(snapshot.creation_timestamp)
    return {"name": snapshot.name,
            "created": when.strftime("%Y-%m-%d %H:%M UTC") if when.year > 1 else "-",
            "storage_gb": round(snapshot.storage_bytes / GIB, 2),
            "status": snapshot.status,
            "scheduled": bool(snapshot.auto_created or
                              snapshot.source_snapshot_schedule_policy)}


def table(rows: list[dict]) -> list[str]:
    """The rows in aligned columns, a header first."""
    head = ["NAME", "CREATED", "STORED", "STATUS", "BY"]
    cells = [[r["name"], r["created"], f"{r['storage_gb']:.2f} GB", r["status"],
              "schedule" if r["scheduled"] else "manual"] for r in rows]
    widths = [max(len(line[i]) for line in [head, *cells]) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in [head, *cells]]
