"""The execution layer of `inv vm.move`: the VMs through the Compute API (``GceCloud``) and
the agent on each VM through its one SSH session (``SshHosts``). The order is
``tasks.deploy.moveflow``'s; what a step does to a host is written here once.

- stage: the deploy pipeline with ``start=False`` (unit written, not enabled; no agent)
- stop_agent: the ``agent`` op (stop, disable) with the ``move_mark`` op before it
- copy: the old VM's data dir streamed here as a backup file (`inv data.backup`'s code),
  checked against its manifest and the deployment's identity, then sent, unpacked and put
  in place on the new VM with its agent still stopped (``data_swap`` with ``start=False``)
- start_new: the deploy pipeline again, which enables, starts and gates the agent and
  records the release; start_old: the mark removed, the agent enabled and started, gated
- mark: the "moved to X" mark on the old VM

Secret values come from ``preflight`` once and travel only inside the sessions.

Config keys: everything a deploy reads; ``nightguard.data.out`` (the backup the data
travels as is kept there), ``nightguard.gcp.snapshots.*`` (the new VM's daily snapshots).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..config import Settings
from ..errors import StepFailed
from ..gcp import api as gcp
from ..gcp import snapshots as snap
from ..gcp import ssh as gcp_ssh
from ..gcp.moveplan import label
from ..ssh.remote import Remote
from ..ssh.targets import resolve_target
from . import apply
from .backup import (
    backup_audit,
    check_identity,
    deployment_identity,
    out_folder,
    read_backup,
    send_backup,
    take_backup,
)
from .envfile import SecretValues
from .pipeline import run_deploy
from .session import HostSession

STEP = "vm move"
BOOT_WAIT = 300.0  # a VM started again: its sshd may take this long to answer


class GceCloud:
    """The two VMs through the Compute API (tasks/gcp/api.py)."""

    def __init__(self, settings_at: Callable[[dict], Settings], timeout: float = 300):
        self.settings_at, self.timeout = settings_at, timeout

    def gce(self, where: dict) -> gcp.Gce:
        return gcp.connect(self.settings_at(where))

    def status(self, where: dict) -> str | None:
        found = gcp.find_instance(self.gce(where), STEP)
        return found.status if found is not None else None

    def create(self, where: dict) -> bool:
        """The new VM as `inv vm.create` makes it (its daily snapshot schedule included)."""
        gce = self.gce(where)
        settings = gce.settings
        entry = gcp_ssh.ssh_keys_entry(settings["ssh.user"], gcp_ssh.public_key(settings))
        policy = snap.ensure_schedule(gce, self.timeout, STEP)[0] \
            if settings["gcp.snapshots.enabled"] else ""
        vm, created = gcp.create_instance(gce, entry, self.timeout, policy)
        if policy and not created:
            snap.attach(gce, snap.get_disk(gce, vm, STEP), policy, self.timeout, STEP)
        return created

    def start(self, where: dict) -> None:
        gcp.power(self.gce(where), "start", self.timeout)

    def stop(self, where: dict) -> None:
        gcp.power(self.gce(where), "stop", self.timeout)


class SshHosts:
    """The agent on each VM, one SSH session per step."""

    def __init__(self, settings_at: Callable[[dict], Settings], values: SecretValues,
                 manifest: dict[str, str], out=None):
        self.settings_at, self.values, self.manifest, self.out = \
            settings_at, values, manifest, out

    def remote(self, where: dict, wait: float = 0.0) -> Remote:
        settings = self.settings_at(where)
        target = resolve_target(settings)
        if wait:  # a VM started a moment ago: its sshd is still coming up
            target = replace(target, login_wait=max(target.login_wait, wait))
        return Remote(target, connect_timeout=settings["ssh.connect_timeout"],
                      command_timeout=settings["ssh.command_timeout"],
                      redact=self.values.redact, out=self.out)

    def stage(self, where: dict) -> dict:
        with self.remote(where) as remote:
            return run_deploy(self.settings_at(where), self.values, self.manifest, remote,
                              command="vm.move", start=False)

    def stop_agent(self, where: dict, mark: dict | None) -> None:
        settings = self.settings_at(where)
        with self.remote(where) as remote, \
                HostSession(remote, settings, command="vm.move") as host:
            with remote.step("agent", f"stopped and disabled on {where['instance']}"):
                if mark is not None:
                    host.call("move_mark", step="mark", mark=mark)
                host.call("agent", step="stop agent", action="stop")
            host.finish(f"stopped: moving to {mark['to']}" if mark else
                        "stopped: the move is undone", move=(mark or {}).get("move"))

    def copy(self, source: dict, dest: dict) -> dict:
        """The old VM's data dir (its agent stopped) to the new VM, through this machine."""
        old = self.settings_at(source)
        with self.remote(source) as remote, HostSession(remote, old, command="vm.move") as host:
            final, answer, manifest = take_backup(host, old, out_folder(old))
            host.finish(f"data sent: moving to {label(dest)}", **backup_audit(final, answer))
        new = self.settings_at(dest)
        # the backup just taken of the deployment on the old VM: it must be that one's
        # (a restore's own check - this deployment's - is deliberately not the one here)
        check_identity(final, read_backup(final), deployment_identity(new),
                       moved_from=deployment_identity(old))
        with self.remote(dest) as remote, HostSession(remote, new, command="vm.move") as host:
            with remote.step("upload", f"{final.stat().st_size / 1e6:.1f} MB"):
                size = send_backup(host, final)
            with remote.step("unpack", "the data dir, every file checked, the agent stopped"):
                host.call("data_unpack", step="unpack", size=size, owner=manifest.get("owner"),
                          files={rel: e["sha256"] for rel, e in manifest["files"].items()})
                host.call("data_swap", step="swap", start=False)
                host.call("data_settle", step="settle")
            host.finish(f"data in place: moved from {label(source)}", backup=final.name,
                        files=len(manifest["files"]))
        return {"backup": str(final), "files": len(manifest["files"])}

    def start_new(self, where: dict) -> dict:
        """The deploy pipeline: the unit enabled, the agent started and gated, the release
        recorded; a gate that fails is an answer (the move is undone), not an error."""
        with self.remote(where) as remote:
            try:
                run_deploy(self.settings_at(where), self.values, self.manifest, remote,
                           command="vm.move")
            except StepFailed as exc:
                if exc.step != "health":
                    raise
                return {"healthy": False, "reason": exc.reason}
        return {"healthy": True}

    def start_old(self, where: dict) -> dict:
        settings = self.settings_at(where)
        with self.remote(where, wait=BOOT_WAIT) as remote, \
                HostSession(remote, settings, command="vm.move") as host:
            host.call("move_mark", step="mark", mark=None)
            with remote.step("agent", f"enabled and started on {where['instance']}"):
                host.call("agent", step="start agent", action="start")
            gate = apply.wait_healthy(host, settings)
            if gate.get("healthy"):
                host.finish("rolled-back: the move is undone, the agent runs here again")
            else:
                apply.report_unhealthy(remote, self.values, gate)
                host.finish("failed", error=self.values.redact(gate.get("reason") or "?"))
        return gate

    def mark(self, where: dict, mark: dict | None) -> None:
        settings = self.settings_at(where)
        with self.remote(where) as remote, \
                HostSession(remote, settings, command="vm.move") as host:
            host.call("move_mark", step="mark", mark=mark)
            host.finish(f"moved to {mark['to']}" if mark else "move mark removed",
                        move=(mark or {}).get("move"))
