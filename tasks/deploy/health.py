"""`inv health` and `inv logs`: what the agent is doing, read-only, from the laptop.

`inv health` prints one screen (or ``--json``) and exits 0 only when the container runs,
is healthy and its limits match the configuration, so cron or CI can alert on it. It also
shows how old the base image is (its build date, from Podman's images.json: `inv deploy
--refresh` replaces it) and when the alert watcher last sent a message and pinged. The
restart count is systemd's (NRestarts of the unit), with the last exit reason: Podman's
own RestartCount is 0 for every fresh container the unit makes. It never changes anything
on the host. Everything printed passes through the .env values' redaction: an agent that
prints its token shows "[REDACTED]" here.

Config keys: ``nightguard.limits.*`` (to flag drift), ``nightguard.container_name``.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime

from invoke import Collection, task
from invoke.exceptions import Exit

from ..cli import TARGET_HELP, one_line_errors, settings_for
from ..config import Settings
from ..contract import SWAPFILE
from ..ssh.hostlink import PipeClosed
from ..ssh.targets import open_remote
from . import commands as cmd
from .envfile import redaction
from .plan import limit_drift
from .session import HostSession

EXIT_UNHEALTHY = 3


def mb(value) -> str:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return str(value)
    if number >= 2**60:
        return "unlimited"
    return f"{number / 1024**2:.0f}M"


def exit_reason(unit: dict) -> str:
    """systemd's last exit of the unit's main process in words; "-" when there was none
    (ExecMainCode 0: the main process has not exited, e.g. it is running)."""
    code, status = unit.get("ExecMainCode", ""), unit.get("ExecMainStatus", "")
    kind = {"1": "exited", "2": "killed", "3": "dumped"}.get(str(code))
    if kind is None:
        return "-"
    return f"{kind} {status}".strip()


def check_lines(health_log: list[dict]) -> list[str]:
    """The health log's entries, oldest first, one line per run of identical results
    (Podman keeps every check: the same output three times is one line, "x3")."""
    runs: list[list] = []
    for entry in health_log:
        key = (entry.get("exit"), (entry.get("output") or "").strip()[:160])
        if runs and runs[-1][0] == key:
            runs[-1][1] += 1
        else:
            runs.append([key, 1])
    lines = []
    for (code, output), count in runs:
        times = f" (x{count})" if count > 1 else ""
        lines.append(f"  check       exit {code}{times}" + (f": {output}" if output else ""))
    return lines


def age_days(stamp: str | None, now: datetime | None = None) -> int | None:
    """Whole days since an RFC 3339 time as Podman writes it (nanoseconds, Z or an offset);
    None when there is none or it cannot be read."""
    if not stamp:
        return None
    text = str(stamp).strip().replace("Z", "+00:00")
    head, _, rest = text.partition(".")
    offset = rest[next((i for i, ch in enumerate(rest) if ch in "+-"), len(rest)):] \
        if rest else ""
    try:
        when = datetime.fromisoformat(head + offset)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0, ((now or datetime.now(UTC)) - when).days)


def base_line(base: dict | None, days: int | None) -> str:
    if not base:
        return "not on the host"
    image_id = (base.get("id") or "?").split(":")[-1][:12]
    built = str(base.get("created") or "?")[:10]
    age = f"{days} days old" if days is not None else "age unknown"
    return f"{base.get('name')} {image_id}, built {built} ({age})"


def alerts_line(alerts: dict | None) -> str:
    if not alerts or not alerts.get("installed"):
        return "off (nightguard.alerts.enabled)"
    alert = alerts.get("last_alert") or {}
    ping = alerts.get("last_ping") or {}
    parts = [f"last alert {alert['at']} ({alert.get('kind', '?')})" if alert.get("at")
             else "no alert sent yet",
             f"last ping {ping['at']} ({ping.get('kind')}, "
             f"{'delivered' if ping.get('ok') else 'failed'})" if ping.get("at")
             else "no ping"]
    if not alerts.get("enabled"):
        parts.append("the timer is NOT enabled")
    if alerts.get("outbox"):
        parts.append(f"{alerts['outbox']} message(s) waiting: {alerts.get('last_error')}")
    if alerts.get("held"):
        parts.append(f"{alerts['held']} held back by the rate limit")
    return "; ".join(parts)


def moved_line(mark: dict | None) -> str:
    """The mark `inv vm.move` leaves on the VM the agent left, in words ("" without one)."""
    if not mark:
        return ""
    if mark.get("state") == "moved":
        return f"not the live VM: the agent moved to {mark.get('to')} at {mark.get('at')}"
    return (f"a move to {mark.get('to')} is under way since {mark.get('at')}: the agent is "
            "stopped here (`inv vm.move` finishes it, `inv vm.move --undo` undoes it)")


def summarize(settings: Settings, answer: dict) -> dict:
    """Verdict and the problems behind it, from the host's answer: the agent's own verdict
    is the host's (the alert watcher's too); drift, swap and the rest are added here."""
    container = answer.get("container") or {}
    verdict = answer.get("verdict") or {}
    problems = [verdict["problem"]] if verdict.get("problem") else []
    if moved := moved_line(answer.get("moved")):  # not live here: said before anything else
        problems.insert(0, moved)
    elif answer.get("enabled") is False:
        problems.insert(0, "the agent's unit is not enabled here: staged by `inv vm.move`, "
                           "whose start has not come yet (or disabled by hand)")
    if verdict.get("status") != "healthy" and not problems:  # never healthy by omission
        problems.append(f"the host's verdict is {verdict.get('status') or 'missing'}")
    drift = limit_drift(settings, container, answer.get("cgroup") or {}) if container else []
    problems += [f"drift: {d}" for d in drift]
    if SWAPFILE not in (answer.get("swaps") or []):
        problems.append("swapfile is not active")
    unit = answer.get("unit") or {}
    return {"healthy": not problems, "problems": problems,
            "restarts": int(unit.get("NRestarts") or 0), "last_exit": exit_reason(unit),
            "base_age_days": age_days((answer.get("base_image") or {}).get("created")),
            **answer}


def render(settings: Settings, report: dict) -> str:
    container = report.get("container") or {}
    cgroup = report.get("cgroup") or {}
    host = report.get("host") or {}
    lock = report.get("lock")
    deployed = report.get("deployed") or {}
    unit = report.get("unit") or {}
    last = report.get("last_audit") or {}
    lines = [
        f"Night Guard: {'HEALTHY' if report['healthy'] else 'UNHEALTHY'}",
        f"  container   {settings['container_name']}: {container.get('status', 'absent')}, "
        f"health {container.get('health') or '-'}",
        f"  unit        {unit.get('ActiveState', '-')} since "
        f"{unit.get('ActiveEnterTimestamp') or '-'}; restarts {report.get('restarts', 0)}, "
        f"last exit {report.get('last_exit', '-')}",
        f"  release     {deployed.get('version', '-')} ({deployed.get('image', '-')}), "
        f"running {(container.get('markers') or {}).get('NG_RELEASE_VERSION', '-')}",
        f"  memory      {mb(cgroup.get('memory_usage'))} of {mb(cgroup.get('memory'))} RAM, "
        f"swap {mb(cgroup.get('swap_usage'))} of {mb(cgroup.get('swap', cgroup.get('memsw')))}"
        f", peak {mb(cgroup.get('memory_peak'))}"
        f"  (want {settings['limits.memory']} / {settings['limits.memory_swap']} RAM+swap)",
        f"  host        RAM {mb(host.get('mem_available'))} free of {mb(host.get('mem_total'))}, "
        f"swap {mb(host.get('swap_free'))} free of {mb(host.get('swap_total'))}, "
        f"disk {mb(host.get('disk_free'))} free",
        "  lock        " + (f"held by {lock.get('who', '?')} ({lock.get('command', '?')}) since "
                             f"{lock.get('since', '?')}" if lock else "free"),
        f"  last task   {last.get('command', '-')} {last.get('outcome', '-')} at "
        f"{last.get('when', '-')}",
        f"  base image  {base_line(report.get('base_image'), report.get('base_age_days'))}",
        f"  alerts      {alerts_line(report.get('alerts'))}",
    ]
    lines += check_lines(container.get("health_log") or [])
    for problem in report["problems"]:
        lines.append(f"  ! {problem}")
    return "\n".join(lines)


@task(help={"target": TARGET_HELP["target"], "host": TARGET_HELP["host"],
            "json": "print one JSON document instead of the screen",
            "watch": "refresh every N seconds until interrupted (0: once)"},
      auto_shortflags=False)
@one_line_errors
def health(c, target=None, host=None, json_=False, watch=0):
    """Show the agent's health, restarts, memory against limits, drift and host state."""
    settings = settings_for(c, target, host)
    values = redaction(settings)
    with open_remote(settings, redact=values.redact) as remote, \
            HostSession(remote, settings, command="health", changing=False) as session:
        while True:
            answer = session.call("health", step="health", changes=False)
            report = summarize(settings, answer)
            if json_:
                print(json.dumps(values.redact_tree(report), sort_keys=True, default=str))
            else:
                if watch:
                    sys.stdout.write("\033[H\033[2J")
                print(values.redact(render(settings, report)))
            if not watch:
                break
            time.sleep(watch)
    if not report["healthy"]:
        raise Exit(code=EXIT_UNHEALTHY)


@task(help={"target": TARGET_HELP["target"], "host": TARGET_HELP["host"],
            "follow": "keep printing new lines", "since": "e.g. 10m or 2026-11-29T10:00:00",
            "tail": "number of lines from the end (default 100)"}, auto_shortflags=False)
@one_line_errors
def logs(c, target=None, host=None, follow=False, since=None, tail=100):
    """Print the agent's logs (secret values redacted); -f follows."""
    settings = settings_for(c, target, host)
    values = redaction(settings)
    with open_remote(settings, redact=values.redact) as remote:
        if follow:
            argv = cmd.logs(settings["container_name"], tail=tail, since=since, follow=True,
                            rootful=not settings["rootless"])
            pipe = remote.open_pipe(argv, step="logs")
            try:
                while True:
                    sys.stdout.write(values.redact(pipe.readline(3600).decode("utf-8",
                                                                              "replace")))
                    sys.stdout.flush()
            except (PipeClosed, TimeoutError):
                return
        with HostSession(remote, settings, command="logs", changing=False) as session:
            answer = session.call("logs", step="logs", changes=False, tail=tail,
                                  since=since or "")
    sys.stdout.write(values.redact(answer.get("text", "")))


ns = Collection(health, logs)
