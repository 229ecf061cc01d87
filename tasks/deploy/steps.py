"""Single steps of the deploy, each runnable alone: `inv sync`, `inv host.swap`,
`inv compose.check`, `inv compose.up`.

Each reads the facts it needs first and changes only what differs, like `inv deploy`, in a
session of its own (lock, audit line).
Config keys: as `inv deploy` (``inv config``).
"""

from __future__ import annotations

from invoke import Collection, task

from ..cli import TARGET_HELP, one_line_errors, settings_for
from ..ssh.targets import open_remote
from . import apply
from .compose import check_compose
from .pipeline import preflight, print_stats, run_deploy
from .plan import desired_state, make_plan, swap_needed
from .session import HostSession
from .sync import local_manifest, rules_for

FLAGS = {**TARGET_HELP}


@task(help=FLAGS, auto_shortflags=False)
@one_line_errors
def sync(c, target=None, host=None, dry_run=False):
    """Send the files that differ to the host's app dir (only what nightguard.sync declares)."""
    settings = settings_for(c, target, host)
    manifest = local_manifest(settings.path("source_dir"), rules_for(settings))
    with open_remote(settings, dry_run=dry_run) as remote, \
            HostSession(remote, settings, command="sync") as session:
        with remote.step("facts"):
            facts = session.facts()
        desired = desired_state(settings, {}, manifest, facts.get("podman"))
        plan = make_plan(settings, desired, facts, {})
        if not plan.delta and not plan.links:
            session.finish("no changes")
            print("sync: no changes")
            return
        apply.sync_code(session, settings, desired, plan)
        session.finish("ok", changes=[plan.delta.describe()])
    print("sync: done; the container picks the code up at its next restart "
          "(`inv deploy` restarts it when the code changed)")


@task(name="swap", help=FLAGS, auto_shortflags=False)
@one_line_errors
def host_swap(c, target=None, host=None, dry_run=False):
    """Set up the swapfile (size: nightguard.limits.swap_size; mode 600, fstab, swappiness)."""
    settings = settings_for(c, target, host)
    with open_remote(settings, dry_run=dry_run) as remote, \
            HostSession(remote, settings, command="host.swap") as session:
        if not swap_needed(settings, session.facts()):
            session.finish("no changes")
            print("host.swap: already in place")
            return
        apply.setup_swap(session, settings)
        session.finish("ok", changes=[f"swapfile {settings['limits.swap_size']}"])


@task(name="check", help={"target": TARGET_HELP["target"]}, auto_shortflags=False)
@one_line_errors
def compose_check(c, target=None):
    """Check the compose file against the configuration (local, no SSH)."""
    settings = settings_for(c, target)
    check_compose(settings)
    print(f"{settings.path('compose_file').name}: ok")


@task(name="up", help=FLAGS, auto_shortflags=False)
@one_line_errors
def compose_up(c, target=None, host=None, dry_run=False):
    """Bring the service up as the compose file says (the full, idempotent deploy)."""
    settings = settings_for(c, target, host)
    values, manifest = preflight(settings)
    with open_remote(settings, dry_run=dry_run, redact=values.redact) as remote:
        try:
            run_deploy(settings, values, manifest, remote, command="compose.up")
        finally:
            print_stats(remote)


host_ns = Collection("host", host_swap)
compose_ns = Collection("compose", compose_check, compose_up)
