"""`inv deploy` and `inv unlock`: the tasks; the pipeline they run is
``tasks.deploy.pipeline`` (its docstring gives the order of the steps).

A second run with nothing changed is one SSH connection, one remote command, "no changes".
``--refresh`` pulls the base image (weekly from CI, see the README); a changed base goes
through the same gate and rollback as any change.

Config keys: everything under ``nightguard.*`` (``inv config``); ``nightguard.keep_images``
releases (image, code, secret values) stay on the host for rollbacks;
``nightguard.base_image``; ``nightguard.alerts.*`` (the watcher, tasks/deploy/alerts.py).
"""

from __future__ import annotations

from invoke import Collection, task

from ..cli import TARGET_HELP, one_line_errors, settings_for
from ..ssh.targets import open_remote
from .pipeline import preflight, print_stats, run_deploy
from .session import HostSession


@task(help={**TARGET_HELP, "refresh": "pull the base image; if it changed, rebuild and "
            "restart through the same health gate and rollback (weekly from CI: README)"},
      auto_shortflags=False)
@one_line_errors
def deploy(c, target=None, host=None, dry_run=False, refresh=False):
    """Deploy Night Guard: sync code, swap, secrets, image, container; wait until healthy."""
    settings = settings_for(c, target, host)
    values, manifest = preflight(settings)
    with open_remote(settings, dry_run=dry_run, redact=values.redact) as remote:
        print(f"deploy to {remote.target.describe()}" + (" (dry run)" if dry_run else "")
              + (" with a fresh base image" if refresh else ""), file=remote.out)
        try:
            run_deploy(settings, values, manifest, remote, refresh=refresh)
        finally:
            print_stats(remote)


@task(help={"target": TARGET_HELP["target"], "host": TARGET_HELP["host"],
            "force": "stop the deploy that holds the lock (it records itself as interrupted)"},
      auto_shortflags=False)
@one_line_errors
def unlock(c, target=None, host=None, force=False):
    """Say who holds the deploy lock; --force stops that deploy and frees the lock."""
    settings = settings_for(c, target, host)
    with open_remote(settings) as remote, \
            HostSession(remote, settings, command="unlock", changing=False) as session:
        answer = session.call("unlock", step="unlock", changes=False, force=force)
    held = answer.get("released") or answer.get("held_by")
    if answer.get("released"):
        print(f"stopped the deploy of {held.get('who')} ({held.get('command')}) since "
              f"{held.get('since')}; the lock is free")
    elif held:
        print(f"the lock is held by {held.get('who')} ({held.get('command')}) since "
              f"{held.get('since')}, pid {held.get('pid')}; `inv unlock --force` stops it")
    else:
        print("no lock is held")


ns = Collection(deploy, unlock)
