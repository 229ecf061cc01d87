"""Operations: each function changes one thing on the host, through the task's session.

The tasks (deploy, rollback, secrets, single steps) decide order and outcome; these turn a
planned change into calls to the host helper, with a step line each. "Recreate the
container and wait until it is healthy" and "bring a recorded release back" are written
here once and used by every task that needs them.
"""

from __future__ import annotations

from ..config import Settings, parse_duration
from ..hostside.bundle import watcher_source
from . import commands as cmd
from .envfile import SecretValues
from .plan import Desired, Plan, build_needs_network, limit_drift
from .session import HostSession
from .sync import delta_tarball

BUILD_TIMEOUT = 1800
INSTALL_TIMEOUT = 1800


def provision(host: HostSession, settings: Settings, packages: list[str]) -> None:
    """apt-get install on the host; it waits there (up to ``host.apt_wait``) for whoever
    holds apt's locks and installs only what is still missing then."""
    wait = parse_duration(settings["host.apt_wait"])
    with host.remote.step("host", f"installing {', '.join(packages)} (apt-get)"):
        answer = host.call("provision", step="provision", packages=packages, wait=wait,
                           timeout=INSTALL_TIMEOUT + wait)
    say_waited(host, answer.get("waited") or [])
    if answer and not answer.get("installed"):
        print(f"    host: nothing left to install: {', '.join(packages)} came with what held "
              "apt", file=host.remote.out)


def wait_for_apt(host: HostSession, settings: Settings, busy: list[dict]) -> None:
    """Before any apt work: wait until the host's package manager is free (a new VM's
    startup script, apt-daily, unattended-upgrades), up to ``host.apt_wait``; never kills
    it. Raises StepFailed naming the holder when it is still busy then."""
    wait = parse_duration(settings["host.apt_wait"])
    holder = host.remote.redact(holder_text(busy[0]))  # a host process's command line
    with host.remote.step("host.apt", f"waiting for {holder} (up to "
                          f"{settings['host.apt_wait']})"):
        answer = host.call("apt_wait", step="wait for apt", changes=False, wait=wait,
                           timeout=wait + 60)
    say_waited(host, answer.get("holders") or [], answer.get("waited"))


def holder_text(holder: dict) -> str:
    """'apt-get (pid 1270, the VM's startup script)': who holds apt's locks, in words."""
    words = (holder.get("command") or "a process").split()
    name = words[0].rsplit("/", 1)[-1] if words else "a process"
    if name.startswith("python") and len(words) > 1 and not words[1].startswith("-"):
        # unattended-upgrade is a Python script: name the script
        name = words[1].rsplit("/", 1)[-1]
    about = ", ".join(x for x in (f"pid {holder.get('pid')}", holder.get("what")
                                  or holder.get("unit")) if x)
    return f"{name} ({about})"


def say_waited(host: HostSession, holders: list[dict], seconds: float | None = None) -> None:
    if not holders:
        return
    took = seconds if seconds is not None else max(h.get("waited", 0) for h in holders)
    # command lines of the host's processes: shown as every other line, redacted
    held = host.remote.redact("; ".join(holder_text(h) for h in holders))
    print(f"    host: waited {took:.0f}s for apt's locks, held by {held}", file=host.remote.out)


def setup_swap(host: HostSession, settings: Settings) -> None:
    with host.remote.step("host.swap", settings["limits.swap_size"]):
        host.call("swap", step="swap", size=settings.size("limits.swap_size"),
                  swappiness=settings["limits.swappiness"])


def remove_env_file(host: HostSession) -> None:
    with host.remote.step("host.env", "removing a plain-text .env from the app dir"):
        host.call("rm_env", step="remove .env")


def sync_code(host: HostSession, settings: Settings, desired: Desired, plan: Plan) -> None:
    detail = plan.delta.describe() + (f", {len(plan.links)} link(s) removed" if plan.links
                                      else "")
    with host.remote.step("sync", detail):
        data = delta_tarball(settings.path("source_dir"), plan.delta.changed) \
            if plan.delta.changed else None
        # the full list only when it changed: the host keeps it from the last sync
        listed = sorted(desired.manifest)
        host.call("sync", step="sync", data=data, files=list(plan.delta.changed),
                  delete=list(plan.delta.deleted), links=plan.links,
                  all_files=None if listed == plan.synced else listed)


def push_secrets(host: HostSession, names: list[str], values: dict[str, str]) -> dict[str, str]:
    """Each value goes inside the session (never an argv); the value it replaces is kept
    on the host for rollbacks. Returns the digests the host recorded."""
    recorded = {}
    with host.remote.step("secrets", ", ".join(names)):
        for name in names:
            answer = host.call("secret_put", step=f"secret {name}", name=name,
                               data=values[name].encode())
            recorded[name] = answer.get("digest", "")
    return recorded


def get_base(host: HostSession, settings: Settings, how: str) -> dict:
    """Pull (or import) the base image; the host answers its id before and after
    ({} in a dry run)."""
    base, archive = settings["base_image"], settings["base_image_archive"]
    argv = cmd.image_import(archive, base) if how == "import" else cmd.image_pull(base)
    with host.remote.step("base", f"{how} {base}"):
        return host.call("base", step="base image", argv=argv, name=base,
                         timeout=BUILD_TIMEOUT)


def build_image(host: HostSession, settings: Settings, desired: Desired) -> None:
    context = f"{settings['app_dir']}/deployment"
    argv = cmd.image_build(desired.image_ref, f"{context}/Dockerfile.nightguard", context,
                           settings["base_image"], build_needs_network(settings))
    with host.remote.step("image", desired.image_ref):
        host.call("run", step="image", argv=argv, timeout=BUILD_TIMEOUT, on_interrupt="kill")


def set_up_watcher(host: HostSession, action: str, wanted: dict | None) -> None:
    """Install, update or remove the alert watcher (its program, files, service and timer)."""
    with host.remote.step("alerts", f"{action} the watcher"):
        if action == "remove" or wanted is None:
            host.call("watcher", step="alerts", action="remove")
        else:
            program, version = watcher_source()
            host.call("watcher", step="alerts", action=action, config=wanted["config"],
                      service=wanted["service"], timer=wanted["timer"],
                      dropin=wanted["dropin"], version=version,
                      data=program)


def install_unit(host: HostSession, unit_text: str, *, enable: bool = True) -> None:
    """``enable=False``: written but not enabled (a move's new VM until its agent starts)."""
    with host.remote.step("unit", "" if enable else "not enabled: the agent stays stopped"):
        host.call("install_unit", step="unit", text=unit_text, enable=enable)


def write_markers(host: HostSession, text: str) -> None:
    host.call("write_file", step="markers", key="markers", text=text)


def restart(host: HostSession, settings: Settings) -> None:
    argv = cmd.systemctl("restart", cmd.unit_name(settings["container_name"]),
                         rootful=not settings["rootless"])
    with host.remote.step("container", "restart"):
        # left to finish when the client goes away: systemd completes it anyway. A start
        # that fails (an agent that exits before its first beat: no READY) is not the end:
        # systemd keeps restarting it, and the health gate that follows says what is wrong
        # and puts the last healthy release back
        answer = host.call("run", step="restart", argv=argv, timeout=360,
                           on_interrupt="finish", unit_journal=True, check=False)
    if answer.get("exit"):
        for line in (answer.get("tail") or [])[-5:]:
            print(f"    | {host.remote.redact(line)}", file=host.remote.out)
        print(f"    the unit did not start (systemctl exited {answer['exit']}): the health "
              "gate decides", file=host.remote.out)


def reload_agent(host: HostSession, settings: Settings, markers_text: str,
                 full_check: bool = False) -> dict:
    """A code-only change: the markers, then the agent restarted inside its container;
    then the gate, which waits for the new process's own first heartbeat - and runs the
    full health check too when the change touched the check's own code (`full_check`)."""
    write_markers(host, markers_text)
    with host.remote.step("agent", "restart in place"):
        at = host.call("reload", step="reload").get("at", 0)
    return wait_healthy(host, settings, since=at, full_check=full_check)


def wait_healthy(host: HostSession, settings: Settings, since: float = 0,
                 full_check: bool = True) -> dict:
    """Verify the limits in force, then wait for healthy; returns the gate's answer.
    `since`: the agent must have beaten after this moment (a restart in place); then
    without `full_check` its first beat is the answer, no `podman healthcheck run`."""
    deadline = settings["health.deadline"]
    with host.remote.step("health", f"deadline {deadline}s"):
        answer = host.call("gate", step="health", changes=False, record=True,
                           deadline=deadline, timeout=deadline + 60, since=since,
                           full=full_check)
    if answer.get("healthy") and answer.get("checked"):
        print(f"    healthy: {answer['checked']} (the code changed, not the check)",
              file=host.remote.out)
    if answer.get("container") and answer.get("cgroup") is not None:
        drift = limit_drift(settings, answer["container"], answer.get("cgroup") or {})
        if drift:
            answer["healthy"] = False
            answer["reason"] = "limits not in force: " + "; ".join(drift)
    return answer


def recreate_and_wait(host: HostSession, settings: Settings, unit_text: str,
                      markers_text: str, *, unit_changed: bool = True) -> dict:
    """Markers, unit, restart, health gate: the one way a container is (re)made."""
    host.call("dirs", step="dirs", record=False)
    write_markers(host, markers_text)
    if unit_changed:
        install_unit(host, unit_text)
    restart(host, settings)
    return wait_healthy(host, settings)


def restore_release(host: HostSession, settings: Settings, release: dict, *,
                    code: str | None) -> dict:
    """Bring a recorded release back: code (``code`` = "last-sync" for the files this run
    replaced, a version for its kept snapshot, None to leave it), the secret values it
    ran with, its unit and markers; then restart and gate."""
    with host.remote.step("rollback", release["version"]):
        if code == "last-sync":
            host.call("restore_code", step="restore code")
        elif code:
            host.call("restore_code", step="restore code", version=code)
        restored = host.call("secret_restore", step="restore secrets",
                             digests=release.get("secrets") or {})
    if restored.get("missing"):
        print(f"  ! the values of {', '.join(restored['missing'])} for {release['version']} "
              "are no longer kept: the current ones stay", file=host.remote.out)
    return recreate_and_wait(host, settings, release["unit_text"], release["markers_text"])


def report_unhealthy(remote, values: SecretValues, answer: dict) -> None:
    print(f"  ! {values.redact(answer.get('reason', 'not healthy'))}", file=remote.out)
    for entry in (answer.get("container") or {}).get("health_log", []):
        print(f"    health check (exit {entry['exit']}): {values.redact(entry['output'].strip())}",
              file=remote.out)
    for line in values.redact(answer.get("logs", "")).splitlines()[-20:]:
        print(f"    log: {line}", file=remote.out)


def record_release(host: HostSession, settings: Settings, release: dict, outcome: str,
                   audit: dict, *, prune: bool = False) -> None:
    """A release passed its gate: the host records it (with its unit and markers as they
    are there), keeps its code, secret values and image for rollbacks, lets go of what no
    kept release needs; then the audit line. ``prune``: a new base image was pulled, so
    an old one may now be unused (Podman keeps a base while an image built on it is)."""
    entry = {k: v for k, v in release.items() if k not in ("unit_text", "markers_text")}
    host.finish(outcome, release=entry, keep=settings["keep_images"], prune=prune, **audit)


def finish_data_task(host: HostSession, unfinished: list[str]) -> None:
    """A data backup or restore was cut (the agent left paused, a restore's swap not
    settled): the host repairs it first, and says what it did."""
    with host.remote.step("data", f"an interrupted data.{'/'.join(unfinished)} first"):
        healed = host.call("data_heal", step="data repair").get("healed") or []
    for words in healed:
        print(f"  ! {words}", file=host.remote.out)


def stage_agent(host: HostSession, desired: Desired) -> None:
    """Everything a start needs - the dirs, the markers, the unit (not enabled) - and no
    start: the agent of a move's new VM waits until the old one is stopped."""
    host.call("dirs", step="dirs", record=False)
    write_markers(host, desired.markers_text)
    install_unit(host, desired.unit_text, enable=False)


def forget_unused_secrets(host: HostSession) -> None:
    """After a rollback: drop kept secret values no kept release runs with."""
    host.call("secret_forget", step="secrets", record=False)
