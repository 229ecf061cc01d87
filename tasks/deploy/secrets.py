"""`inv secrets.*`: Podman secrets from the local .env, rotated with one restart.

How a changed value is noticed without keeping plaintext anywhere: the host keeps a random
32-byte key (``/var/lib/nightguard/secret.salt``, root only) and, per secret, the
HMAC-SHA256 of the value under that key (``secrets.json``, root only). The laptop reads
the key and the HMACs with the facts, computes the HMAC of its .env value and compares.
This works on every Podman from 4.3 (which cannot show a secret's value) to 5.x.

Values travel only on the SSH channel's stdin into ``podman secret create NAME -``.
During a rotation the last known-good value is kept on the host as ``NAME__previous``
(another Podman secret) until the container is healthy with the new one.

Config keys: ``nightguard.secrets`` (Podman secret name -> .env key), ``nightguard.env_file``.
"""

from __future__ import annotations

import getpass
import re

from invoke import Collection, task
from invoke.exceptions import Exit

from tasks.cli import TARGET_HELP, one_line_errors, settings_for
from tasks.config import Settings
from tasks.deploy import apply
from tasks.deploy.deploy import digests_for, holder, lock_failure, now, report_unhealthy
from tasks.deploy.envfile import SecretValues, load_secret_values
from tasks.deploy.facts import call, read_facts
from tasks.deploy.plan import secrets_label
from tasks.deploy.remote import Remote
from tasks.errors import ConfigError, StepFailed
from tasks.targets import open_remote

NAMES_HELP = "secret names (default: all of nightguard.secrets); repeat the flag for several"


def pick_names(settings: Settings, names: list[str] | None) -> list[str]:
    known = settings.secret_names
    for name in names or []:
        if name not in known:
            raise ConfigError(f"unknown secret {name!r} (known: {', '.join(known)})")
    return list(names) if names else known


def prompt_values(settings: Settings, names: list[str]) -> SecretValues:
    values = {}
    for name in names:
        value = getpass.getpass(f"new value for {name} ({settings['secrets'][name]}): ")
        if not value.strip():
            raise ConfigError(f"{name}: empty value")
        values[name] = value
    return SecretValues(values)


def changed_names(facts: dict, values: SecretValues) -> list[str]:
    digests = digests_for(facts, values)
    stored = facts.get("secret_hashes") or {}
    present = facts.get("secrets") or {}
    # No digest (no host key yet, or a secret made by hand): the value is unknown, so push.
    return [n for n in values.values
            if n not in present or not digests.get(n) or stored.get(n) != digests[n]]


def relabel_unit(unit_text: str, digests: dict[str, str]) -> str:
    """The running unit with only its secrets label changed: rotating a key must not
    also roll out code or image changes."""
    return re.sub(r"nightguard\.secrets=[0-9a-f]+", f"nightguard.secrets={secrets_label(digests)}",
                  unit_text)


def locked_facts(remote: Remote, settings: Settings, command: str) -> dict:
    facts = read_facts(remote, settings, lock=holder(command), ensure_salt=True)
    if not facts["lock"]["acquired"]:
        raise lock_failure(facts["lock"])
    return facts


def record(remote, settings, facts, values, names, outcome, command):
    digests = digests_for(facts, values)
    stored = dict(facts.get("secret_hashes") or {})
    if outcome == "ok":
        stored.update({n: digests[n] for n in names})
    call(remote, settings, "record", step="record", changes=True, unlock=True,
         secret_hashes=stored,
         audit={"when": now(), "who": holder(command)["who"], "command": command,
                "secrets": names, "outcome": outcome})


@task(iterable=["name"], help={**TARGET_HELP, "name": NAMES_HELP})
@one_line_errors
def push(c, target=None, host=None, dry_run=False, name=None):
    """Create the secrets that are missing on the host or differ from .env (no restart)."""
    settings = settings_for(target, host)
    values = load_secret_values(settings, pick_names(settings, name))
    with open_remote(settings, dry_run=dry_run, redact=values.redact) as remote:
        facts = read_facts(remote, settings)
        todo = changed_names(facts, values)
        if not todo:
            print("secrets: all up to date")
            return
        if dry_run:
            apply.push_secrets(remote, settings, facts, todo, values.values)
            return
        facts = locked_facts(remote, settings, "secrets.push")
        todo = changed_names(facts, values)
        outcome = "failed"
        try:
            with remote.step("secrets", ", ".join(todo)):
                apply.push_secrets(remote, settings, facts, todo, values.values)
            outcome = "ok"
        finally:
            record(remote, settings, facts, values, todo, outcome, "secrets.push")
        print("secrets: pushed; a running container keeps the old values until "
              "`inv secrets.rotate` or `inv deploy` recreates it")


@task(iterable=["name"], help={**TARGET_HELP, "name": NAMES_HELP,
                               "prompt": "type the new values (no echo) instead of reading .env"})
@one_line_errors
def rotate(c, target=None, host=None, dry_run=False, name=None, prompt=False):
    """Replace secret values, recreate the container, keep them only if it gets healthy."""
    settings = settings_for(target, host)
    names = pick_names(settings, name)
    values = prompt_values(settings, names) if prompt else load_secret_values(settings, names)
    with open_remote(settings, dry_run=dry_run, redact=values.redact) as remote:
        facts = read_facts(remote, settings)
        if not facts.get("unit_text"):
            raise StepFailed("rotate", "Night Guard is not deployed here yet: run `inv deploy`")
        if dry_run:
            todo = changed_names(facts, values) or names
            print(f"plan: back up {', '.join(todo)}; create the new values; recreate the "
                  "container; wait until healthy; then drop the backups (or put them back)")
            apply.push_secrets(remote, settings, facts, todo, values.values)
            apply.restart_container(remote, settings)
            return
        facts = locked_facts(remote, settings, "secrets.rotate")
        todo = changed_names(facts, values)
        if not todo:
            call(remote, settings, "unlock", step="unlock", changes=True)
            print("secrets: the host already has these values")
            return
        digests = dict(facts.get("secret_hashes") or {}, **digests_for(facts, values))
        outcome = "failed"
        try:
            outcome = rotate_on_host(remote, settings, facts, values, todo, digests)
        finally:
            record(remote, settings, facts, values, todo if outcome == "ok" else [],
                   outcome, "secrets.rotate")
        if outcome != "ok":
            raise StepFailed("rotate", outcome)
        print(f"secrets: rotated {', '.join(todo)}; the container is healthy with them")


def rotate_on_host(remote, settings, facts, values, todo, digests) -> str:
    with remote.step("backup", "keeping the current values until the new ones work"):
        call(remote, settings, "secret_backup", step="backup", changes=True, names=todo)
    with remote.step("secrets", ", ".join(todo)):
        apply.push_secrets(remote, settings, facts, todo, values.values)
    with remote.step("container", "recreate with the new values"):
        apply.install_unit(remote, settings, relabel_unit(facts["unit_text"], digests))
        apply.restart_container(remote, settings)
    with remote.step("health", f"deadline {settings['health.deadline']}s"):
        answer = apply.wait_healthy(remote, settings)
    if answer.get("healthy"):
        call(remote, settings, "secret_drop_backup", step="backup", changes=True)
        return "ok"
    report_unhealthy(remote, values, answer)
    with remote.step("rollback", "old values and container back"):
        call(remote, settings, "secret_restore", step="rollback", changes=True, names=todo)
        apply.install_unit(remote, settings, facts["unit_text"])
        apply.restart_container(remote, settings)
        again = apply.wait_healthy(remote, settings)
    back = "old values back, healthy" if again.get("healthy") else "old values back, NOT healthy"
    return f"failed: {values.redact(answer.get('reason', 'not healthy'))}; {back}"


@task(name="list", help={"target": TARGET_HELP["target"], "host": TARGET_HELP["host"]})
@one_line_errors
def list_(c, target=None, host=None):
    """List the host's secrets: created, used by the container, matches .env (no values)."""
    settings = settings_for(target, host)
    try:
        values = load_secret_values(settings)
    except ConfigError as exc:
        values, problem = SecretValues({}), str(exc)
    else:
        problem = ""
    with open_remote(settings) as remote:
        facts = read_facts(remote, settings)
    digests = digests_for(facts, values)
    stored = facts.get("secret_hashes") or {}
    used = set(((facts.get("container") or {}).get("secrets")) or [])
    for secret in settings.secret_names:
        created = (facts.get("secrets") or {}).get(secret)
        if not created:
            print(f"{secret:24} MISSING on host")
            continue
        match = ("unknown (.env unreadable)" if secret not in digests else
                 "matches .env" if stored.get(secret) == digests[secret] else "differs from .env")
        print(f"{secret:24} created {created[:19]}  "
              f"{'used by container' if secret in used else 'not in use'}  {match}")
    if problem:
        print(f"note: {problem}")


@task(help={"target": TARGET_HELP["target"], "host": TARGET_HELP["host"]})
@one_line_errors
def check(c, target=None, host=None):
    """Fail (exit 1) when a required secret is missing on the host."""
    settings = settings_for(target, host)
    with open_remote(settings) as remote:
        facts = read_facts(remote, settings)
    missing = [n for n in settings.secret_names if n not in (facts.get("secrets") or {})]
    if missing:
        raise Exit(f"error: missing on {remote.target.describe()}: {', '.join(missing)} "
                   "(run `inv secrets.push`)", code=1)
    print(f"secrets: all {len(settings.secret_names)} present")


ns = Collection("secrets", push, rotate, list_, check)
