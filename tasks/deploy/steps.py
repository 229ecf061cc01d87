"""Single steps of the deploy, each runnable alone: `inv sync`, `inv host.swap`,
`inv compose.check`, `inv compose.up`, and `inv rollback`.

Each reads the facts it needs first and changes only what differs, like `inv deploy`.
Config keys: as `inv deploy` (``inv config``).
"""

from __future__ import annotations

from invoke import Collection, task

from tasks.cli import TARGET_HELP, one_line_errors, settings_for
from tasks.deploy import apply
from tasks.deploy.compose import check_compose
from tasks.deploy.deploy import (
    holder,
    lock_failure,
    now,
    preflight,
    report_unhealthy,
    run_deploy,
)
from tasks.deploy.envfile import SecretValues
from tasks.deploy.facts import call, read_facts
from tasks.deploy.plan import desired_state, make_plan, swap_needed
from tasks.errors import ConfigError, StepFailed
from tasks.targets import open_remote

FLAGS = {**TARGET_HELP}


@task(help=FLAGS)
@one_line_errors
def sync(c, target=None, host=None, dry_run=False):
    """Send the files that differ to the host's app dir (never .env, .git, venvs)."""
    settings = settings_for(target, host)
    with open_remote(settings, dry_run=dry_run) as remote:
        with remote.step("facts"):
            facts = read_facts(remote, settings)
        desired = desired_state(settings, {})
        plan = make_plan(settings, desired, facts, {})
        if not plan.delta:
            print("sync: no changes")
            return
        with remote.step("sync", plan.delta.describe()):
            apply.sync_code(remote, settings, desired, plan.delta)
        print("sync: done; the container picks the code up at its next restart "
              "(`inv deploy` restarts it when the code changed)")


@task(name="swap", help=FLAGS)
@one_line_errors
def host_swap(c, target=None, host=None, dry_run=False):
    """Set up the 2 GB swapfile (mode 600, fstab, swappiness) if it is not in place."""
    settings = settings_for(target, host)
    with open_remote(settings, dry_run=dry_run) as remote:
        if not swap_needed(settings, read_facts(remote, settings)):
            print("host.swap: already in place")
            return
        with remote.step("host.swap", settings["limits.swap_size"]):
            apply.setup_swap(remote, settings)


@task(name="check", help={"target": TARGET_HELP["target"]})
@one_line_errors
def compose_check(c, target=None):
    """Check the compose file against the configuration (local, no SSH)."""
    settings = settings_for(target)
    check_compose(settings)
    print(f"{settings.path('compose_file').name}: ok")


@task(name="up", help=FLAGS)
@one_line_errors
def compose_up(c, target=None, host=None, dry_run=False):
    """Bring the service up as the compose file says (the full, idempotent deploy)."""
    settings, values = preflight(target, host)
    with open_remote(settings, dry_run=dry_run, redact=values.redact) as remote:
        run_deploy(settings, values, remote)


@task(help=FLAGS)
@one_line_errors
def rollback(c, target=None, host=None, dry_run=False):
    """Go back to the previously deployed version (image, container spec and code)."""
    settings = settings_for(target, host)
    with open_remote(settings, dry_run=dry_run) as remote:
        facts = read_facts(remote, settings, lock=None if dry_run else holder("rollback"))
        if facts.get("lock") and not facts["lock"]["acquired"]:
            raise lock_failure(facts["lock"])
        history = (facts.get("state") or {}).get("history", [])
        outcome = "failed"
        try:
            if len(history) < 2:
                raise ConfigError("no previous version recorded on the host")
            previous = history[1]
            print(f"rollback: {history[0]['version']} -> {previous['version']}")
            if dry_run:
                return
            with remote.step("rollback", previous["version"]):
                call(remote, settings, "restore", step="rollback", changes=True)
                apply.install_unit(remote, settings, previous["unit_text"])
                apply.restart_container(remote, settings)
                answer = apply.wait_healthy(remote, settings)
            outcome = "ok" if answer.get("healthy") else f"failed: {answer.get('reason')}"
            if answer.get("healthy"):
                history = [previous, history[0], *history[2:]]
            else:
                report_unhealthy(remote, SecretValues({}), answer)
        finally:
            if not dry_run:
                state = dict(facts.get("state") or {}, history=history)
                call(remote, settings, "record", step="record", changes=True, unlock=True,
                     audit={"when": now(), "who": holder("rollback")["who"],
                            "command": "rollback", "outcome": outcome,
                            "version": history[0]["version"] if history else None},
                     state=state)
        if outcome != "ok":
            raise StepFailed("rollback", outcome)


host_ns = Collection("host", host_swap)
compose_ns = Collection("compose", compose_check, compose_up)
