"""`inv data.backup` and `inv data.restore`: the agent's data dir to the laptop and back.

Backup: one locked session on the host; the helper pauses the agent's container
(``podman pause``) while it reads the data dir, and streams it as a gzipped tar through the
task's one SSH connection, straight into a file here (never whole in memory on either
side). Nothing the agent made is followed: links are stored as links, FIFOs, sockets,
devices and hard links are skipped and named. The file is read back against its manifest
before it takes its name, ``nightguard-data-<host>-<UTC time>.tar.gz`` in ``--out``; the
last ``nightguard.data.keep`` of that host's backups are kept; its path is the last line.

Restore: the file is checked first, on the laptop (whole, unaltered, this deployment's;
else one line, exit 2, no connection made), then sent, unpacked beside the data dir and
checked again there, and put in place with two renames while the agent is stopped (the old
tree kept aside as ``<data_dir>.ng-previous``); the agent starts through the health gate,
and if it is not healthy the old tree comes back. A restore cut after its swap is undone
by the next data task. Each run leaves an audit line (`inv history`).

Config keys: ``nightguard.data.keep``, ``nightguard.data.out``, ``nightguard.data_dir``,
``nightguard.container_name``, ``nightguard.image_name``, ``nightguard.health.deadline``.
"""

from __future__ import annotations

from pathlib import Path

from invoke import Collection, task

from ..cli import TARGET_HELP, one_line_errors, settings_for
from ..config import Settings
from ..errors import StepFailed
from ..ssh.remote import Remote
from ..ssh.targets import open_remote
from . import apply
from .backup import (
    backup_audit,
    check_identity,
    deployment_identity,
    describe,
    out_folder,
    read_backup,
    report_backup,
    send_backup,
    take_backup,
)
from .envfile import SecretValues
from .session import HostSession


def run_backup(settings: Settings, remote: Remote, folder: Path) -> Path:
    """Stream the data dir into a file in ``folder``; returns its path once checked."""
    with HostSession(remote, settings, command="data.backup") as session:
        final, answer, manifest = take_backup(session, settings, folder)
        session.finish("ok", **backup_audit(final, answer))
    report_backup(remote.out, settings, folder, final, answer, manifest)
    return final


@task(help={**{k: TARGET_HELP[k] for k in ("target", "host")},
            "out": "the folder the backup goes to (default: nightguard.data.out, `backups` "
                   "in the project)"}, auto_shortflags=False)
@one_line_errors
def backup(c, target=None, host=None, out=None):
    """Copy the agent's data dir to this machine: one .tar.gz, its path on the last line.

    The agent is paused (not stopped) while its data is read; links are stored as links,
    never followed; special files are skipped and named. Keeps the newest
    nightguard.data.keep backups of the host."""
    settings = settings_for(c, target, host)
    folder = out_folder(settings, out)
    with open_remote(settings) as remote:
        final = run_backup(settings, remote, folder)
    print(final)


# -- restore --------------------------------------------------------------------------------
def swap_and_gate(session: HostSession, settings: Settings) -> dict:
    """Stop, swap, start, gate; the old tree back (and gated) if the new one fails."""
    remote = session.remote
    with remote.step("swap", "agent stopped, restored tree in place, agent started"):
        swapped = session.call("data_swap", step="swap")
    answer = apply.wait_healthy(session, settings, since=swapped.get("started", 0))
    if answer.get("healthy"):
        session.call("data_settle", step="settle")
        return {"healthy": True, "previous": swapped.get("previous")}
    apply.report_unhealthy(remote, SecretValues({}), answer)
    with remote.step("undo", "the data dir from before the restore back in place"):
        undone = session.call("data_undo", step="undo")
    again = apply.wait_healthy(session, settings, since=undone.get("started", 0))
    return {"healthy": False, "reason": answer.get("reason"), "back_healthy":
            bool(again.get("healthy"))}


def run_restore(settings: Settings, remote: Remote, path: Path, manifest: dict) -> dict:
    with HostSession(remote, settings, command="data.restore") as session:
        with remote.step("upload", f"{path.stat().st_size / 1e6:.1f} MB"):
            size = send_backup(session, path)
        with remote.step("unpack", "beside the data dir, every file checked"):
            session.call("data_unpack", step="unpack", size=size, owner=manifest.get("owner"),
                         files={rel: e["sha256"] for rel, e in manifest["files"].items()})
        result = swap_and_gate(session, settings)
        audit = {"backup": path.name, "files": len(manifest["files"]),
                 "from": (manifest.get("host") or {}).get("hostname")}
        if result["healthy"]:
            session.finish("ok", **audit)
            return result
        session.finish("rolled-back", error=result.get("reason"), **audit)
    back = "it is healthy again" if result["back_healthy"] else "it is NOT healthy either"
    raise StepFailed("restore", f"the agent was not healthy on the restored data "
                     f"({result.get('reason')}): the data dir from before is back, {back}")


@task(help={**{k: TARGET_HELP[k] for k in ("target", "host")},
            "path": "the backup file (`inv data.backup` made it)"}, auto_shortflags=False)
@one_line_errors
def restore(c, path, target=None, host=None):
    """Put a backup of the agent's data dir back, through the health gate.

    The file is checked first (whole, unaltered, this deployment's): else one line and
    nothing changes. The old data dir is kept aside (<data_dir>.ng-previous) and comes back
    if the agent is not healthy on the restored one."""
    settings = settings_for(c, target, host)
    file = Path(path)
    manifest = read_backup(file)
    check_identity(file, manifest, deployment_identity(settings))
    print(f"restore: {describe(manifest)}")
    with open_remote(settings) as remote:
        result = run_restore(settings, remote, file, manifest)
    kept = f"; the previous data dir is kept at {result['previous']}" \
        if result.get("previous") else ""
    print(f"restored {file.name}: the agent is healthy{kept}")


ns = Collection("data", backup, restore)
