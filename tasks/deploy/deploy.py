"""`inv deploy`, `inv rollback`, `inv unlock`: the seed's guide as one health-gated pipeline.

Order: preflight (local, no SSH) -> facts (one round trip) -> plan -> lock -> apply only
what differs -> verify limits -> health gate (rollback on failure) -> audit record.
A second run with nothing changed stops after the facts: one round trip, "no changes".

Config keys: everything under ``nightguard.*`` (``inv config``); ``nightguard.keep_images``
images stay on the host for rollbacks.
"""

from __future__ import annotations

import getpass
import socket
import time
from datetime import UTC, datetime

from invoke import Collection, task

from tasks.cli import TARGET_HELP, one_line_errors, settings_for
from tasks.config import Settings
from tasks.deploy import apply
from tasks.deploy.compose import check_compose
from tasks.deploy.envfile import SecretValues, load_secret_values
from tasks.deploy.facts import call, read_facts
from tasks.deploy.plan import Desired, Plan, desired_state, make_plan, secret_digest
from tasks.deploy.remote import Remote
from tasks.errors import StepFailed
from tasks.targets import open_remote


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def holder(command: str) -> dict:
    return {"who": f"{getpass.getuser()}@{socket.gethostname()}", "since": now(),
            "command": command}


def digests_for(facts: dict, values: SecretValues) -> dict[str, str]:
    salt = facts.get("secret_salt")
    if not salt:
        return {}
    return {name: secret_digest(salt, value) for name, value in values.values.items()}


def lock_failure(lock: dict) -> StepFailed:
    held = lock.get("held_by") or {}
    return StepFailed("lock", f"another deploy holds the lock: {held.get('who', '?')} "
                      f"({held.get('command', '?')}) since {held.get('since', '?')}; "
                      "if it is gone, run `inv unlock`")


def preflight(target, host) -> tuple[Settings, SecretValues]:
    """Everything that can be checked without the host; raises before any SSH."""
    settings = settings_for(target, host)
    values = load_secret_values(settings)
    check_compose(settings)
    return settings, values


def print_plan(remote: Remote, plan: Plan) -> None:
    for line in plan.lines():
        print(f"    plan: {line}", file=remote.out)
    for reason in plan.reasons:
        print(f"    why: {reason}", file=remote.out)


def apply_plan(remote: Remote, settings: Settings, values: SecretValues, facts: dict,
               desired: Desired, plan: Plan) -> None:
    if plan.swap:
        with remote.step("host.swap", settings["limits.swap_size"]):
            apply.setup_swap(remote, settings)
    if plan.remove_env_file:
        with remote.step("host.env", "removing plain-text .env"):
            apply.remove_env_file(remote, settings)
    if plan.delta:
        with remote.step("sync", plan.delta.describe()):
            apply.sync_code(remote, settings, desired, plan.delta)
    if plan.secrets:
        with remote.step("secrets", ", ".join(plan.secrets)):
            apply.push_secrets(remote, settings, facts, plan.secrets, values.values)
    if plan.build_image:
        with remote.step("image", desired.image_ref):
            apply.build_image(remote, settings, desired)
    if plan.write_unit:
        with remote.step("unit"):
            apply.install_unit(remote, settings, desired.unit_text)
    if plan.restart:
        with remote.step("container", "restart"):
            apply.restart_container(remote, settings)


def report_unhealthy(remote: Remote, values: SecretValues, answer: dict) -> None:
    print(f"  ! {values.redact(answer.get('reason', 'not healthy'))}", file=remote.out)
    for entry in (answer.get("container") or {}).get("health_log", []):
        print(f"    health check (exit {entry['exit']}): {values.redact(entry['output'].strip())}",
              file=remote.out)
    for line in values.redact(answer.get("logs", "")).splitlines()[-20:]:
        print(f"    log: {line}", file=remote.out)


def roll_back(remote: Remote, settings: Settings, values: SecretValues, facts: dict,
              plan: Plan) -> str:
    """Put back the previous unit (image + spec) and the files this sync replaced."""
    previous_unit = facts.get("unit_text")
    if not previous_unit:
        return "no previous version to roll back to"
    with remote.step("rollback"):
        if plan.delta:
            call(remote, settings, "restore", step="rollback", changes=True)
        apply.install_unit(remote, settings, previous_unit)
        apply.restart_container(remote, settings)
        answer = apply.wait_healthy(remote, settings)
    if not answer.get("healthy"):
        report_unhealthy(remote, values, answer)
        return "rolled back, but the previous version is not healthy either"
    return "rolled back; the previous version is healthy again"


def run_deploy(settings: Settings, values: SecretValues, remote: Remote,
               force_unlock: bool = False) -> dict:
    started = time.monotonic()
    with remote.step("facts"):
        facts = read_facts(remote, settings)
    digests = digests_for(facts, values)
    desired = desired_state(settings, digests)
    plan = make_plan(settings, desired, facts, digests)
    if not plan:
        print(f"no changes: {remote.target.describe()} runs {desired.version}", file=remote.out)
        return {"changed": False, "version": desired.version}
    print_plan(remote, plan)
    if remote.dry_run:
        apply_plan(remote, settings, values, facts, desired, plan)
        print("dry run: nothing was changed", file=remote.out)
        return {"changed": False, "dry_run": True}

    if force_unlock:
        released = call(remote, settings, "unlock", step="lock", changes=True).get("released")
        if released:
            print(f"    released the lock of {released.get('who')} since "
                  f"{released.get('since')}", file=remote.out)
    with remote.step("lock"):
        facts = read_facts(remote, settings, lock=holder("deploy"), ensure_salt=True)
        if not facts["lock"]["acquired"]:
            raise lock_failure(facts["lock"])
        if facts["lock"].get("broke_stale"):
            print(f"    broke a stale lock of {facts['lock']['broke_stale'].get('who')}",
                  file=remote.out)
    digests = digests_for(facts, values)
    desired = desired_state(settings, digests, manifest=desired.manifest)
    plan = make_plan(settings, desired, facts, digests)
    outcome, error = "ok", None
    try:
        apply_plan(remote, settings, values, facts, desired, plan)
        if plan.restart:
            with remote.step("health", f"deadline {settings['health.deadline']}s"):
                answer = apply.wait_healthy(remote, settings)
            if not answer.get("healthy"):
                report_unhealthy(remote, values, answer)
                rolled = roll_back(remote, settings, values, facts, plan)
                outcome = f"failed: {answer.get('reason')}; {rolled}"
                error = StepFailed("health", f"{values.redact(answer.get('reason', ''))}; "
                                   f"{rolled}")
        if plan.drop_secret_backups and error is None:
            with remote.step("secrets", "dropping backups of an interrupted rotation"):
                call(remote, settings, "secret_drop_backup", step="secrets", changes=True)
    except StepFailed as exc:
        outcome, error = f"failed: {exc}", exc
    finally:
        record(remote, settings, facts, desired, digests, plan, outcome, started)
    if error:
        raise error
    print(f"deployed {desired.version} to {remote.target.describe()} "
          f"in {time.monotonic() - started:.1f}s", file=remote.out)
    return {"changed": True, "version": desired.version}


def record(remote: Remote, settings: Settings, facts: dict, desired: Desired,
           digests: dict, plan: Plan, outcome: str, started: float) -> None:
    """Audit line, deployed version and secret hashes; releases the lock. Runs even after a
    failure, and its own failure is reported but never hides the first one."""
    state = facts.get("state") or {"history": []}
    if outcome == "ok":
        entry = {"version": desired.version, "image": desired.image_ref, "when": now(),
                 "unit_text": desired.unit_text}
        state["history"] = [entry, *[h for h in state.get("history", [])
                                     if h.get("version") != desired.version]][:10]
    audit = {"when": now(), "who": holder("deploy")["who"], "command": "deploy",
             "version": desired.version, "outcome": outcome, "changes": plan.lines(),
             "seconds": round(time.monotonic() - started, 1)}
    pushed = {k: v for k, v in digests.items() if outcome == "ok" or k not in plan.secrets}
    stored = dict(facts.get("secret_hashes") or {}, **pushed)
    try:
        call(remote, settings, "record", step="record", changes=True, audit=audit, state=state,
             secret_hashes=stored, unlock=True)
        if outcome == "ok":
            recent = state["history"][:settings["keep_images"]]
            keep = {h["image"].rsplit(":", 1)[1] for h in recent}
            apply.prune_images(remote, settings, facts, keep | {desired.image_tag})
    except StepFailed as exc:
        print(f"  ! could not record the outcome: {exc}", file=remote.out)


@task(help={**TARGET_HELP,
            "force_unlock": "release a deploy lock held by someone else first (after checking "
                            "that nobody is deploying)"})
@one_line_errors
def deploy(c, target=None, host=None, dry_run=False, force_unlock=False):
    """Deploy Night Guard: sync code, swap, secrets, image, container; wait until healthy."""
    settings, values = preflight(target, host)
    with open_remote(settings, dry_run=dry_run, redact=values.redact) as remote:
        print(f"deploy to {remote.target.describe()}"
              + (" (dry run)" if dry_run else ""), file=remote.out)
        run_deploy(settings, values, remote, force_unlock=force_unlock)
        stats = remote.stats
        print(f"ssh connections: {stats.connections}, remote commands: {stats.commands}, "
              f"bytes sent: {stats.bytes_sent}", file=remote.out)


@task(help={"target": TARGET_HELP["target"], "host": TARGET_HELP["host"]})
@one_line_errors
def unlock(c, target=None, host=None):
    """Release a deploy lock left behind by a deploy that died (says who held it)."""
    settings = settings_for(target, host)
    with open_remote(settings) as remote:
        answer = call(remote, settings, "unlock", step="unlock", changes=True)
        held = answer.get("released")
        print(f"released the lock of {held.get('who')} since {held.get('since')}"
              if held else "no lock was held")


ns = Collection(deploy, unlock)
