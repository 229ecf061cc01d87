"""`inv health` and `inv logs`: what the agent is doing, read-only, from the laptop.

`inv health` prints one screen (or ``--json``) and exits 0 only when the container runs,
is healthy and its limits match the configuration, so cron or CI can alert on it.
It never changes anything on the host.

Config keys: ``nightguard.limits.*`` (to flag drift), ``nightguard.container_name``.
"""

from __future__ import annotations

import json
import sys
import time

from invoke import Collection, task
from invoke.exceptions import Exit

from tasks.cli import TARGET_HELP, one_line_errors, settings_for
from tasks.config import Settings
from tasks.deploy import commands as cmd
from tasks.deploy.apply import limit_drift
from tasks.deploy.facts import call
from tasks.targets import open_remote

EXIT_UNHEALTHY = 3


def mb(value) -> str:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return str(value)
    if number >= 2**60:
        return "unlimited"
    return f"{number / 1024**2:.0f}M"


def summarize(settings: Settings, answer: dict) -> dict:
    """Verdict and the problems behind it, from the host's answer."""
    container = answer.get("container") or {}
    problems = []
    if not container:
        problems.append("container does not exist")
    elif not container.get("running"):
        problems.append(f"container is {container.get('status')}")
    elif container.get("health") != "healthy":
        problems.append(f"health is {container.get('health') or 'unknown'}")
    drift = limit_drift(settings, container, answer.get("cgroup") or {}) if container else []
    problems += [f"drift: {d}" for d in drift]
    if "/swapfile" not in (answer.get("swaps") or []):
        problems.append("swapfile is not active")
    return {"healthy": not problems, "problems": problems, **answer}


def render(settings: Settings, report: dict) -> str:
    container = report.get("container") or {}
    cgroup = report.get("cgroup") or {}
    host = report.get("host") or {}
    lock = report.get("lock")
    deployed = report.get("deployed") or {}
    lines = [
        f"Night Guard: {'HEALTHY' if report['healthy'] else 'UNHEALTHY'}",
        f"  container   {settings['container_name']}: {container.get('status', 'absent')}, "
        f"health {container.get('health') or '-'}, restarts {container.get('restarts', '-')}, "
        f"started {container.get('started_at', '-')}",
        f"  unit        {report.get('unit_active', '-')}",
        f"  version     {deployed.get('version', '-')} ({deployed.get('image', '-')})",
        f"  memory      {mb(cgroup.get('memory_usage'))} of {mb(cgroup.get('memory'))} RAM, "
        f"swap {mb(cgroup.get('swap_usage'))} of {mb(cgroup.get('swap', cgroup.get('memsw')))}"
        f"  (want {settings['limits.memory']} / {settings['limits.memory_swap']} RAM+swap)",
        f"  host        RAM {mb(host.get('mem_available'))} free of {mb(host.get('mem_total'))}, "
        f"swap {mb(host.get('swap_free'))} free of {mb(host.get('swap_total'))}, "
        f"disk {mb(host.get('disk_free'))} free",
        "  lock        " + (f"held by {lock.get('who', '?')} since {lock.get('since', '?')}"
                             if lock else "free"),
    ]
    for entry in container.get("health_log", []):
        output = entry.get("output", "").strip()[:160]
        lines.append(f"  check       exit {entry.get('exit')}: {output}")
    for problem in report["problems"]:
        lines.append(f"  ! {problem}")
    return "\n".join(lines)


@task(help={"target": TARGET_HELP["target"], "host": TARGET_HELP["host"],
            "json": "print one JSON document instead of the screen",
            "watch": "refresh every N seconds until interrupted (0: once)"})
@one_line_errors
def health(c, target=None, host=None, json_=False, watch=0):
    """Show the agent's health, memory against limits, drift and host state (read-only)."""
    settings = settings_for(target, host)
    with open_remote(settings) as remote:
        while True:
            answer = call(remote, settings, "health", step="health", changes=False)
            report = summarize(settings, answer)
            if json_:
                print(json.dumps(report, sort_keys=True, default=str))
            else:
                if watch:
                    sys.stdout.write("\033[H\033[2J")
                print(render(settings, report))
            if not watch:
                break
            time.sleep(watch)
    if not report["healthy"]:
        raise Exit(code=EXIT_UNHEALTHY)


@task(help={"target": TARGET_HELP["target"], "host": TARGET_HELP["host"],
            "follow": "keep printing new lines", "since": "e.g. 10m or 2026-11-29T10:00:00",
            "tail": "number of lines from the end (default 100)"})
@one_line_errors
def logs(c, target=None, host=None, follow=False, since=None, tail=100):
    """Print the agent's logs (podman logs); -f follows."""
    settings = settings_for(target, host)
    with open_remote(settings) as remote:
        argv = cmd.logs(settings["container_name"], tail=tail, since=since, follow=follow,
                        rootful=not settings["rootless"])
        if follow:
            remote.stream(argv, step="logs")
            return
        result = remote.run(argv, step="logs", changes=False)
        sys.stdout.write(result.stdout + result.stderr)


ns = Collection(health, logs)
