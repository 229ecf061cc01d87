"""`inv history` and `inv rollback`: the releases the host keeps, and going back to one.

A release is what passed a health gate: image, container spec (the unit), code (a snapshot
of the synced tree) and the secret values it ran with (kept as Podman secrets). The host
keeps the last ``nightguard.keep_images`` of them; its audit log says what every task did.

Config keys: ``nightguard.keep_images``.
"""

from __future__ import annotations

import json

from invoke import Collection, task

from ..cli import TARGET_HELP, one_line_errors, settings_for
from ..errors import ConfigError, StepFailed
from ..ssh.targets import open_remote
from . import apply
from .envfile import SecretValues, redaction
from .pipeline import print_stats
from .session import HostSession


def pick_release(history: list[dict], wanted: str | None) -> dict:
    """The release to go back to: `wanted` (a version or its prefix), else the one before
    the current."""
    usable = [h for h in history if h.get("markers_text") and h.get("unit_text")]
    if wanted:
        found = [h for h in usable if h["version"].startswith(wanted)]
        if len(found) != 1:
            known = ", ".join(h["version"] for h in usable) or "none"
            raise ConfigError(f"--to {wanted}: {'ambiguous' if found else 'no such release'} "
                              f"(kept: {known})")
        return found[0]
    if len(usable) < 2:
        raise ConfigError("no earlier release is kept on the host")
    return usable[1]


@task(help={**TARGET_HELP, "to": "the version to go back to (`inv history` lists them); "
            "default: the release before the current one"}, auto_shortflags=False)
@one_line_errors
def rollback(c, target=None, host=None, dry_run=False, to=None):
    """Go back to an earlier release: its image, container spec, code and secret values."""
    settings = settings_for(c, target, host)
    with open_remote(settings, dry_run=dry_run) as remote:
        try:
            with HostSession(remote, settings, command="rollback") as session:
                facts = session.facts()
                history = (facts.get("state") or {}).get("history") or []
                release = pick_release(history, to)
                current = history[0]["version"] if history else None
                print(f"rollback: {current} -> {release['version']} "
                      f"(deployed {release.get('when', '?')})", file=remote.out)
                code = release["version"] if release["version"] in facts.get("releases", []) \
                    else None
                if code is None:
                    print("  ! its code is no longer kept: the code on the host stays",
                          file=remote.out)
                if dry_run:
                    return
                answer = apply.restore_release(session, settings, release, code=code)
                audit = {"version": release["version"], "previous": current}
                if answer.get("healthy"):
                    apply.record_release(session, settings, release, "ok", audit)
                    print(f"rolled back to {release['version']}; it is healthy",
                          file=remote.out)
                    return
                apply.report_unhealthy(remote, SecretValues({}), answer)
                session.finish("failed", error=answer.get("reason"), **audit)
                raise StepFailed("rollback", f"{release['version']} is not healthy: "
                                 f"{answer.get('reason')}")
        finally:
            print_stats(remote)


@task(help={"target": TARGET_HELP["target"], "host": TARGET_HELP["host"],
            "json": "print JSON (the audit lines and the kept releases)",
            "limit": "how many audit lines (default 20)"}, auto_shortflags=False)
@one_line_errors
def history(c, target=None, host=None, json_=False, limit=20):
    """What was done to the host (its audit log, newest first) and the releases it keeps."""
    settings = settings_for(c, target, host)
    with open_remote(settings) as remote, \
            HostSession(remote, settings, command="history", changing=False) as session:
        answer = session.call("history", step="history", changes=False, limit=limit)
    answer = redaction(settings).redact_tree(answer)  # error texts may quote a value
    audit = list(reversed(answer.get("audit") or []))
    releases = (answer.get("state") or {}).get("history") or []
    verified = (answer.get("state") or {}).get("verified")
    if json_:
        kept = [{k: v for k, v in r.items() if k not in ("unit_text", "markers_text")}
                for r in releases]
        print(json.dumps({"audit": audit, "releases": kept, "verified": verified},
                         indent=2, sort_keys=True))
        return
    print("releases kept (newest first):")
    for entry in releases:
        mark = "*" if entry.get("version") == verified else " "
        print(f" {mark} {entry.get('version')}  {entry.get('when', '?')}  "
              f"image {entry.get('image_tag', '?')}  code {entry.get('code', '?')}")
    print("audit (newest first):")
    for line in audit:
        extra = f" during {line['during']}" if line.get("during") else ""
        print(f"  {line.get('when')}  {line.get('command', '?'):15} "
              f"{line.get('outcome', '?')}{extra}  {line.get('version') or ''}  "
              f"by {line.get('who', '?')}")


ns = Collection(rollback, history)
