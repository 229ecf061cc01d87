"""`inv secrets.*`: Podman secrets from their sources (.env, a command, Google Secret
Manager: ``tasks.deploy.secretstore``), rotated with one restart.

How a changed value is noticed without keeping plaintext anywhere: the host keeps a random
32-byte key (``<state>/secret.salt``, root only) and, per secret, the HMAC-SHA256 of the
value under that key (``secrets.json``, root only), written by the host when Podman has the
value - never before. The laptop computes the HMAC of the value its source gives and
compares. This
works on every Podman from 4.3 (which cannot show a secret's value) to 5.x.

Values travel only inside the task's session on the host (never an argv, a log line or a
file of ours). When a value is replaced, the one it replaces is kept as another Podman
secret, ``NAME__<first 12 of its HMAC>``, for as long as a kept release uses it: a failed
rotation or deploy, and `inv rollback`, put it back.

Config keys: ``nightguard.secrets`` (Podman secret name -> its source),
``nightguard.env_file``.
"""

from __future__ import annotations

import getpass
import json

from invoke import Collection, task
from invoke.exceptions import Exit

from ..cli import TARGET_HELP, one_line_errors, settings_for
from ..config import Settings
from ..errors import ConfigError, StepFailed
from ..ssh.targets import open_remote
from . import apply
from .envfile import SecretValues
from .plan import (
    changed_secrets,
    previous_release,
    rotated_release,
    secret_digests,
)
from .secretstore import load_secret_values, source_word, sources
from .session import HostSession, now

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
        where = sources(settings, [name])[name].describe()
        value = getpass.getpass(f"new value for {name} (instead of {where}): ")
        if not value.strip():
            raise ConfigError(f"{name}: empty value")
        values[name] = value
    return SecretValues(values)


@task(iterable=["name"], help={**TARGET_HELP, "name": NAMES_HELP}, auto_shortflags=False)
@one_line_errors
def push(c, target=None, host=None, dry_run=False, name=None):
    """Create the secrets that are missing on the host or differ from their source (no
    restart)."""
    settings = settings_for(c, target, host)
    values = load_secret_values(settings, pick_names(settings, name))
    with open_remote(settings, dry_run=dry_run, redact=values.redact) as remote, \
            HostSession(remote, settings, command="secrets.push") as session:
        facts = session.facts()
        todo = changed_secrets(facts, secret_digests(facts, values.values), list(values.values))
        if not todo:
            session.finish("no changes", secrets=[])
            print("secrets: all up to date")
            return
        apply.push_secrets(session, todo, values.values)
        session.finish("ok", secrets=todo)
    if not dry_run:
        print("secrets: pushed; the running container keeps the old values until "
              "`inv secrets.rotate` or `inv deploy` recreates it")


PROMPT_HELP = "type the new values (no echo) instead of reading their sources"


@task(iterable=["name"], help={**TARGET_HELP, "name": NAMES_HELP, "prompt": PROMPT_HELP},
      auto_shortflags=False)
@one_line_errors
def rotate(c, target=None, host=None, dry_run=False, name=None, prompt=False):
    """Replace secret values, recreate the container, keep them only if it gets healthy."""
    settings = settings_for(c, target, host)
    names = pick_names(settings, name)
    values = prompt_values(settings, names) if prompt else load_secret_values(settings, names)
    with open_remote(settings, dry_run=dry_run, redact=values.redact) as remote, \
            HostSession(remote, settings, command="secrets.rotate") as session:
        facts = session.facts()
        current = previous_release(facts)
        running = ((facts.get("container") or {}).get("markers") or {}).get(
            "NG_RELEASE_VERSION")
        if current is None:
            raise StepFailed("rotate", "Night Guard is not deployed here yet: run `inv deploy`")
        if running != current["version"]:
            raise StepFailed("rotate", "the running container is not the last healthy "
                             "release (a deploy did not finish): run `inv deploy` first")
        todo = changed_secrets(facts, secret_digests(facts, values.values), list(values.values))
        if not todo:
            session.finish("no changes", secrets=[])
            print("secrets: the host already has these values")
            return
        recorded = apply.push_secrets(session, todo, values.values)
        if dry_run:
            apply.restart(session, settings)
            return
        release = rotated_release(current, recorded, now())
        answer = apply.recreate_and_wait(session, settings, current["unit_text"],
                                         release["markers_text"], unit_changed=False)
        audit = {"secrets": todo, "version": release["version"],
                 "previous": current["version"]}
        if answer.get("healthy"):
            apply.record_release(session, settings, release, "ok", audit)
        else:
            apply.report_unhealthy(remote, values, answer)
            again = apply.restore_release(session, settings, current, code=None)
            apply.forget_unused_secrets(session)
            back = "old values back, healthy" if again.get("healthy") else \
                "old values back, NOT healthy"
            reason = values.redact(answer.get("reason", "not healthy"))
            session.finish("rolled-back" if again.get("healthy") else "failed",
                           error=f"{reason}; {back}", **audit)
            raise StepFailed("rotate", f"{reason}; {back}")
    print(f"secrets: rotated {', '.join(todo)}; the container is healthy with them")
    if prompt:
        print("note: put the new values into their sources (.env, the password manager, "
              "Secret Manager) too, or the next deploy puts the old ones back")


@task(name="list", help={"target": TARGET_HELP["target"], "host": TARGET_HELP["host"]},
      auto_shortflags=False)
@one_line_errors
def list_(c, target=None, host=None):
    """List the host's secrets: created, used by the container, matches its source (no
    values)."""
    settings = settings_for(c, target, host)
    try:
        values = load_secret_values(settings)
    except ConfigError as exc:
        values, problem = SecretValues({}), str(exc)
    else:
        problem = ""
    with open_remote(settings, redact=values.redact) as remote, \
            HostSession(remote, settings, command="secrets.list", changing=False) as session:
        facts = session.facts()
    digests = secret_digests(facts, values.values)
    stored = facts.get("secret_hashes") or {}
    running = ((facts.get("container") or {}).get("markers") or {}).get("NG_RELEASE_VERSION")
    history = (facts.get("state") or {}).get("history") or []
    release = next((h for h in history if h.get("version") == running), {})
    for secret in settings.secret_names:
        created = (facts.get("secrets") or {}).get(secret)
        if not created:
            print(f"{secret:24} MISSING on host")
            continue
        word = source_word(settings, secret)
        match = (f"unknown ({word} unreadable)" if secret not in digests else
                 f"matches {word}" if stored.get(secret) == digests[secret] else
                 f"differs from {word}")
        used = "in use" if (release.get("secrets") or {}).get(secret) == stored.get(secret) \
            else "not in the running container"
        print(f"{secret:24} created {created[:19]}  {used}  {match}")
    if problem:
        print(f"note: {problem}")


@task(help={"target": TARGET_HELP["target"], "host": TARGET_HELP["host"]},
      auto_shortflags=False)
@one_line_errors
def check(c, target=None, host=None):
    """Fail (exit 1) when a required secret is missing on the host."""
    settings = settings_for(c, target, host)
    with open_remote(settings) as remote, \
            HostSession(remote, settings, command="secrets.check", changing=False) as session:
        facts = session.facts()
    missing = [n for n in settings.secret_names if n not in (facts.get("secrets") or {})]
    if missing:
        raise Exit(f"error: missing on {remote.target.describe()}: {', '.join(missing)} "
                   "(run `inv secrets.push`)", code=1)
    print(f"secrets: all {len(settings.secret_names)} present")


@task(name="to-gcp", iterable=["name"],
      help={"project": "the Google Cloud project to keep them in (default: nightguard.gcp."
                       "project)", "name": NAMES_HELP}, auto_shortflags=False)
@one_line_errors
def to_gcp(c, project=None, name=None):
    """Copy the secrets .env holds into Google Secret Manager; print the config that reads them.

    Each becomes projects/PROJECT/secrets/NAME (a new version when it exists). Nothing on the
    VM changes; delete the keys from .env once the printed lines are in invoke.yaml."""
    settings = settings_for(c, None, None)
    project = project or settings["gcp.project"]
    if not project:
        raise ConfigError("no project: give --project P or set nightguard.gcp.project")
    names = [n for n in pick_names(settings, name)
             if sources(settings, [n])[n].kind == "env"]
    if not names:
        raise ConfigError("no secret of nightguard.secrets comes from .env: nothing to copy")
    values = load_secret_values(settings, names)
    from ..gcp import secretmanager  # the client loads in about a second: only when used

    for secret in names:
        version = secretmanager.put(settings, project, secret, values.values[secret])
        print(f"stored {secret} as {version}")
    print("now read them from there - in invoke.yaml:\n  nightguard:\n    secrets:")
    for secret, entry in settings["secrets"].items():
        shown = f"{{gcp: projects/{project}/secrets/{secret}}}" if secret in names else \
            (entry if isinstance(entry, str) else json.dumps(entry))
        print(f"      {secret}: {shown}")


ns = Collection("secrets", push, rotate, list_, check, to_gcp)
