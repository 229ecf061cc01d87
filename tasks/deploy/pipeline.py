"""The deploy pipeline: the seed's guide as one health-gated run, shared by every task that
deploys (`inv deploy`, `inv compose.up`) and by `inv kube.export`'s preflight.

Order: preflight (local, no SSH: .env, compose file, what travels) -> one session
on the host (lock) -> facts (when something must be installed and apt is busy - a new
VM's startup script, unattended-upgrades - wait for it, then read them again) -> plan ->
swap -> install what the host lacks -> sync ->
secrets -> base image (pulled when absent, or with --refresh) -> image -> alert watcher ->
unit -> restart -> health gate (on failure: the last healthy release back, secrets
included) -> release record and audit line.
A second run with nothing changed is one SSH connection, one remote command, "no changes".

The image's tag holds the base image's id on the host, so ``refresh`` (pull the base;
weekly from CI, see the README) rebuilds exactly when the base changed, and the new image
goes through the same gate and rollback as any change.

Not a task module: the tasks (tasks/deploy/deploy.py, steps.py, history.py,
tasks/kube/tasks.py) import it and never each other.

Config keys: everything under ``nightguard.*`` (``inv config``); ``nightguard.keep_images``
releases (image, code, secret values) stay on the host for rollbacks;
``nightguard.base_image``; ``nightguard.alerts.*`` (the watcher, tasks/deploy/alerts.py).
"""

from __future__ import annotations

import time

from ..config import Settings
from ..errors import ConfigError, StepFailed
from ..ssh.remote import Remote
from . import apply
from .backup import backup_before_deploy
from .compose import check_compose
from .envfile import SecretValues
from .plan import (
    Desired,
    Plan,
    base_id,
    desired_state,
    desired_watcher,
    expected_podman,
    host_needs,
    make_plan,
    plan_container,
    previous_release,
    secret_digests,
    touches_health_check,
)
from .secretstore import load_secret_values
from .session import HostSession, now
from .sync import local_manifest, rules_for


class HostUnfit(StepFailed):
    """The host cannot take this deploy; raised before anything on it changed."""


def preflight(settings: Settings) -> tuple[SecretValues, dict[str, str]]:
    """Everything that can be checked without the host; raises before any SSH. The task
    reads the settings (``tasks.cli.settings_for``): a task's context stays in the tasks."""
    values = load_secret_values(settings)
    for name, value in settings["agent_env"].items():
        if any(secret and secret in value for secret in values.values.values()):
            raise ConfigError(f"nightguard.agent_env.{name} holds a secret's value: secrets "
                              "come from nightguard.secrets and reach the agent as files, "
                              "never as environment")
    check_compose(settings)
    manifest = local_manifest(settings.path("source_dir"), rules_for(settings, values.values))
    return values, manifest


def print_plan(remote: Remote, settings: Settings, plan: Plan) -> None:
    for line in plan.lines(settings):
        print(f"    plan: {line}", file=remote.out)
    for reason in plan.reasons:
        print(f"    why: {reason}", file=remote.out)


def gate_or_roll_back(host: HostSession, settings: Settings, values: SecretValues,
                      facts: dict, plan: Plan, answer: dict) -> tuple[str, StepFailed]:
    """The new release failed its gate: bring the last healthy one back."""
    apply.report_unhealthy(host.remote, values, answer)
    reason = values.redact(answer.get("reason", "not healthy"))
    previous = previous_release(facts)
    if previous is None:
        return "failed", StepFailed("health", f"{reason}; no earlier release to roll back to")
    code = previous["version"] if previous["version"] in facts.get("releases", []) else (
        "last-sync" if plan.delta else None)
    again = apply.restore_release(host, settings, previous, code=code)
    apply.forget_unused_secrets(host)
    if again.get("healthy"):
        return "rolled-back", StepFailed("health", f"{reason}; rolled back to "
                                         f"{previous['version']}, which is healthy again")
    apply.report_unhealthy(host.remote, values, again)
    return "failed", StepFailed("health", f"{reason}; rolled back to {previous['version']}, "
                                "but it is not healthy either")


def new_base(host: HostSession, settings: Settings, desired: Desired, plan: Plan,
             facts: dict) -> tuple[Desired, bool]:
    """Pull (or import) the base image; when its id is not the one planned with, the image
    has another tag: plan the image and container again. Returns (desired, changed)."""
    answer = apply.get_base(host, settings, plan.base)
    after = (answer.get("after") or {}).get("id")
    if not after:  # a dry run
        return desired, False
    short = (after.split(":")[-1])[:12]
    if after == base_id(facts):
        print(f"    base: {settings['base_image']} is unchanged ({short})", file=host.remote.out)
        return desired, False
    before = plan.lines(settings) + plan.reasons
    desired = desired_state(settings, desired.secret_digests, desired.manifest,
                            expected_podman(facts), after)
    plan_container(plan, desired, facts)
    print(f"    base: {settings['base_image']} is {short}"
          + (f" (was {(base_id(facts) or '').split(':')[-1][:12]})" if base_id(facts) else ""),
          file=host.remote.out)
    for line in plan.lines(settings):
        if line not in before:
            print(f"    plan: {line}", file=host.remote.out)
    for reason in plan.reasons:
        if reason not in before:
            print(f"    why: {reason}", file=host.remote.out)
    return desired, bool(base_id(facts))


def apply_plan(host: HostSession, settings: Settings, values: SecretValues,
               desired: Desired, plan: Plan, facts: dict,
               watcher: dict | None = None) -> tuple[Desired, bool]:
    """Everything before the restart; returns the desired state (a pulled base gives the
    image another tag) and whether a base image was replaced."""
    if plan.swap:  # first: dpkg on a 1 GB host without swap can run out of memory
        apply.setup_swap(host, settings)
    if plan.install:
        apply.provision(host, settings, plan.install)
    if plan.remove_env_file:
        apply.remove_env_file(host)
    if plan.delta or plan.links:
        apply.sync_code(host, settings, desired, plan)
    if plan.secrets:
        apply.push_secrets(host, plan.secrets, values.values)
    replaced = False
    if plan.base:
        desired, replaced = new_base(host, settings, desired, plan, facts)
    if plan.build_image:
        apply.build_image(host, settings, desired)
    if plan.watcher:
        apply.set_up_watcher(host, plan.watcher, watcher)
    return desired, replaced


def read_facts(host: HostSession, settings: Settings) -> dict:
    """The host's facts and what it lacks; when something must be installed and apt is busy
    (a new VM's startup script may be installing it), waits and reads them again. Raises
    HostUnfit, with nothing changed, when the host cannot take the deploy."""
    remote = host.remote
    with remote.step("facts"):
        facts = host.facts()
    needs = host_needs(settings, facts)
    if needs.install and facts.get("apt_busy") and not remote.dry_run:
        apply.wait_for_apt(host, settings, facts["apt_busy"])
        with remote.step("facts", "again, after the wait"):
            facts = host.facts()
        needs = host_needs(settings, facts)
    if needs.problems:
        host.finish(None)
        raise HostUnfit("host", needs.problems[0])
    return facts


def show_dry_run(host: HostSession, settings: Settings, desired: Desired, plan: Plan) -> None:
    """What the restart would do, each step said and none done."""
    apply.write_markers(host, desired.markers_text)
    if plan.write_unit:
        apply.install_unit(host, desired.unit_text)
    if plan.restart:
        apply.restart(host, settings)
    elif plan.reload:
        host.call("reload", step="reload")
    print("dry run: nothing was changed", file=host.remote.out)


def restart_and_gate(host: HostSession, settings: Settings, desired: Desired,
                     plan: Plan) -> dict:
    """Reload, or recreate, or only write what changed; then the health gate's answer."""
    if plan.reload:
        return apply.reload_agent(host, settings, desired.markers_text,
                                  full_check=touches_health_check(plan.delta))
    if plan.restart:
        return apply.recreate_and_wait(host, settings, desired.unit_text,
                                       desired.markers_text, unit_changed=plan.write_unit)
    if plan.write_markers or plan.write_unit or plan.gate:
        if plan.write_markers:
            apply.write_markers(host, desired.markers_text)
        if plan.write_unit:
            apply.install_unit(host, desired.unit_text)
        return apply.wait_healthy(host, settings)
    return {"healthy": True}


def refuse_running_agent(host: HostSession, facts: dict) -> None:
    """A deploy that must not start the agent (``start=False``: a move's new VM) refuses a
    host where it already runs: two agents would poll one bot."""
    if (facts.get("container") or {}).get("running"):
        host.finish(None)
        raise HostUnfit("stage", f"the agent already runs on {host.remote.target.describe()}:"
                        " a host the agent moves to must not run it; nothing was changed")


def stage(host: HostSession, settings: Settings, desired: Desired, audit: dict,
          started: float) -> dict:
    """``start=False``: the release in place (unit not enabled), the agent not started."""
    apply.stage_agent(host, desired)
    audit["seconds"] = round(time.monotonic() - started, 1)
    host.finish("staged", **audit)
    print(f"staged {desired.version} on {host.remote.target.describe()}: the agent is not "
          "started", file=host.remote.out)
    return {"changed": True, "version": desired.version, "started": False}


def run_deploy(settings: Settings, values: SecretValues, manifest: dict[str, str],
               remote: Remote, command: str = "deploy", refresh: bool = False,
               start: bool = True) -> dict:
    """``refresh``: pull the base image even when the host has one (`inv deploy
    --refresh`). ``start=False`` (`inv vm.move`'s new VM): everything but the start - the
    unit is written but not enabled, no agent runs, no release is recorded (its gate is
    still to come); a host where the agent runs is refused."""
    started = time.monotonic()
    with HostSession(remote, settings, command=command) as host:
        facts = read_facts(host, settings)
        if not start:
            refuse_running_agent(host, facts)
        if facts.get("data_unfinished") and not remote.dry_run:
            apply.finish_data_task(host, facts["data_unfinished"])
        digests = secret_digests(facts, values.values)
        desired = desired_state(settings, digests, manifest, expected_podman(facts),
                                base_id(facts))
        watcher = desired_watcher(settings)
        plan = make_plan(settings, desired, facts, digests, refresh=refresh, watcher=watcher)
        if refresh and not plan.base:
            print(f"refresh: {settings['base_image']} is a local image: there is nothing to "
                  "pull", file=remote.out)
        if not plan and start:
            host.finish("no changes", version=desired.version)
            print(f"no changes: {remote.target.describe()} runs {desired.version}",
                  file=remote.out)
            return {"changed": False, "version": desired.version}
        print_plan(remote, settings, plan)
        if settings["data.backup_before_deploy"] and (plan.build_image or plan.base) \
                and not remote.dry_run:
            backup_before_deploy(host, settings)
        audit = {"version": desired.version, "changes": plan.lines(settings),
                 "previous": (facts.get("state") or {}).get("verified")}
        desired, replaced = apply_plan(host, settings, values, desired, plan, facts, watcher)
        audit.update(version=desired.version, changes=plan.lines(settings))
        if remote.dry_run:
            show_dry_run(host, settings, desired, plan)
            return {"changed": False, "dry_run": True}
        if not start:
            return stage(host, settings, desired, audit, started)
        outcome, error = "ok", None
        answer = restart_and_gate(host, settings, desired, plan)
        if not answer.get("healthy"):
            outcome, error = gate_or_roll_back(host, settings, values, facts, plan, answer)
        audit["seconds"] = round(time.monotonic() - started, 1)
        if error is None:
            apply.record_release(host, settings, desired.release(now()), outcome, audit,
                                 prune=replaced)
        else:
            host.finish(outcome, error=str(error), **audit)
    if error:
        raise error
    print(f"deployed {desired.version} to {remote.target.describe()} "
          f"in {time.monotonic() - started:.1f}s", file=remote.out)
    return {"changed": True, "version": desired.version}


def print_stats(remote: Remote) -> None:
    stats = remote.stats
    print(f"ssh connections: {stats.connections}, remote commands: {stats.commands}, "
          f"steps: {stats.steps}, bytes sent: {stats.bytes_sent}", file=remote.out)
