"""What keeping watch costs in CPU, measured natively (on this machine's own cores, with
Podman, not in an emulated VM): per event and per hour, the design before the watchdog
(a health check and a watcher pass every 30 s) against the one after it (the check every
health.interval and a pass every alerts.interval, 10 min each; one of each at every start;
ng-supervise's WATCHDOG=1 pings in between), as shares of the 900 CPU-seconds an hour an
e2-micro sustains (0.25 vCPU).

    .venv/bin/python bench/watch_cost.py [--quick] [--json] [--checks 20] [--passes 20]
                                         [--windows 4] [--window 30]

Needs root and Podman (crun, conmon). Where Podman cannot run a container here, it says
why and exits 2. It builds deployment/Dockerfile.nightguard on the lab's base tar
(~/.cache/nightguard-deploy/base/*/base.tar, `podman import`ed; --base names another
image already in storage) and runs it with the deploy's own run arguments
(tasks.deploy.commands.run_args on tasks.deploy.plan.desired_state's spec) as the unit
does (--cgroups=no-conmon --rm --sdnotify=container --detach), with two dummy secrets,
the reference agent (heartbeat every 5 s) and --health-interval disable (no systemd here
to time the checks: they are run by hand). Everything it creates is removed at the end.

How each figure is taken (medians, min-max, n):
  check     one `podman healthcheck run`, started in a cgroup of the bench's own (v1
            cpuacct.usage, or v2 cpu.stat): its delta is the podman client, conmon and crun
            (--cgroups=no-conmon keeps conmon there); the client alone is its wait4()
            rusage; health_check.py runs in the container's cgroup, whose delta during the
            check, minus the container's own rate at rest, is the in-container share. The
            bench is a child subreaper, so the exec's orphaned conmon is reaped.
  pass      one watcher pass as nightguard-watch.service runs it (`python3 -I -S -c` with
            the watcher imported from its folder, bytecode kept after a warm-up pass): the
            process tree's wait4() rusage; beside it `python3 -I -S -c pass`. No systemd
            here: `systemctl show` is stood in for by a shell script that runs `systemctl
            --version` and prints a healthy unit (systemd's side of the D-Bus call is not
            counted); the container's state comes from Podman's real files.
  pings     ng-supervise (the container's PID 1) and conmon at rest, with NOTIFY_SOCKET a
            datagram socket the bench binds and the deploy's NG_WATCHDOG_SEC (a check and
            a ping every WatchdogSec/2, or sooner when the last beat would go stale):
            CPU from /proc/PID/task/*/schedstat (nanoseconds; /proc/PID/stat's clock ticks
            cross-check it) over windows of --window s; per ping = CPU / WATCHDOG=1 datagrams
            that reached the socket. conmon forwards each ping (at rest it does nothing else).
  memory    VmRSS and VmHWM of ng-supervise in the container; the old sh supervisor (the
            file before it became Python, from git) beside the new one, both run natively
            here with `sleep` as the agent.
Not measured: systemd's own share (a transient unit for each check and pass, journald's
lines; Podman writes about 1 kB of journal per check): systemd is not PID 1 here.
bench/systemd_share.py measures it in a container with systemd as its PID 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUDGET = 900.0  # CPU-s an hour an e2-micro sustains (0.25 vCPU)
HOUR = 3600.0
OLD_EVERY = 30.0


def new_every(key: str) -> float:
    """The design's own interval, from the settings' defaults (health.interval for the
    check, alerts.interval for the watcher's timer)."""
    from tasks.config import DEFAULTS
    from tasks.units import parse_duration

    section, name = key.split(".")
    return float(parse_duration(DEFAULTS[section][name]))


# -- pure parts ------------------------------------------------------------------------------
def stats(values) -> dict:
    """Median, min, max and n of a list of numbers (an empty list gives None's and 0)."""
    values = list(values)
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def per_hour(cost_s: float, every_s: float | None) -> float:
    """CPU-s an hour of an event costing `cost_s` every `every_s` seconds (None: never)."""
    return 0.0 if not every_s else cost_s * HOUR / every_s


def share(cpu_s_per_hour: float) -> float:
    """Percent of the 900 CPU-s an hour an e2-micro sustains."""
    return cpu_s_per_hour / BUDGET * 100


def design_rows(fig: dict) -> list[dict]:
    """The two designs' rows. `fig`: check_s, pass_s (median CPU-s per event) and
    supervisor_h, conmon_h (CPU-s an hour at rest, the pings included)."""
    def event(design, what, cost, every):
        return {"design": design, "what": what, "per_event_ms": cost * 1000,
                "per_hour": 0.0 if every is None else HOUR / every,
                "cpu_s_h": per_hour(cost, every)}

    def steady(design, what, cpu_h):
        return {"design": design, "what": what, "per_event_ms": None, "per_hour": None,
                "cpu_s_h": cpu_h}

    rows = [event("old", "health check every 30 s", fig["check_s"], OLD_EVERY),
            event("old", "watcher pass every 30 s", fig["pass_s"], OLD_EVERY),
            steady("old", "sh supervisor (blocked in wait)", 0.0),
            event("new", f"health check every {new_every('health.interval') / 60:g} min",
                  fig["check_s"], new_every("health.interval")),
            event("new", f"watcher pass every {new_every('alerts.interval') / 60:g} min",
                  fig["pass_s"], new_every("alerts.interval")),
            event("new", "check + pass at each start (none at rest)",
                  fig["check_s"] + fig["pass_s"], None),
            steady("new", "ng-supervise: a check and a WATCHDOG=1 at rest", fig["supervisor_h"]),
            steady("new", "conmon forwarding the pings", fig["conmon_h"])]
    for design in ("old", "new"):
        total = sum(r["cpu_s_h"] for r in rows if r["design"] == design)
        rows.append({"design": design, "what": "total", "per_event_ms": None,
                     "per_hour": None, "cpu_s_h": total})
    for row in rows:
        row["share_pct"] = share(row["cpu_s_h"])
    return rows


def number(value, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{unit}"


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (the README's style: `| a | b |`, `| --- | --- |`)."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def spread(s: dict, scale: float = 1000.0, digits: int = 1, unit: str = " ms") -> str:
    """`median (min-max, n)` of a stats() dict, scaled (seconds to ms by default)."""
    if not s["n"]:
        return "-"
    return (f"{s['median'] * scale:.{digits}f}{unit} ({s['min'] * scale:.{digits}f}-"
            f"{s['max'] * scale:.{digits}f}, n={s['n']})")


def design_table(rows: list[dict]) -> str:
    cells = [[r["design"], r["what"], number(r["per_event_ms"], 1, " ms"),
              number(r["per_hour"], 0), number(r["cpu_s_h"], 2 if r["cpu_s_h"] < 10 else 1),
              number(r["share_pct"], 3 if r["share_pct"] < 0.1 else 2, "%")] for r in rows]
    return markdown(["design", "what", "CPU per event", "events/h", "CPU-s/h",
                     "share of 900 CPU-s/h"], cells)


def event_table(found: dict) -> str:
    """The measured events: median (min-max, n)."""
    m = found
    rows = [["`podman healthcheck run`, all of it", spread(m["check"]["total"])],
            ["· podman client (its rusage)", spread(m["check"]["client"])],
            ["· conmon + crun exec (its cgroup minus the client)", spread(m["check"]["conmon"])],
            ["· health_check.py in the container", spread(m["check"]["container"])],
            ["watcher pass as the service runs it", spread(m["pass"]["pass"])],
            ["· `python3 -I -S -c pass`", spread(m["pass"]["floor"])],
            ["ng-supervise at rest, CPU-s/h", spread(m["pings"]["supervisor_h"], 1, 3, "")],
            ["· per WATCHDOG=1 ping", spread(m["pings"]["supervisor_ping"], 1e6, 0, " µs")],
            ["conmon at rest, CPU-s/h", spread(m["pings"]["conmon_h"], 1, 3, "")],
            ["· per ping forwarded", spread(m["pings"]["conmon_ping"], 1e6, 0, " µs")],
            ["agent at rest (heartbeat every 5 s), CPU-s/h",
             spread(m["pings"]["agent_h"], 1, 3, "")]]
    return markdown(["event", "CPU: median (min-max, n)"], rows)


def memory_table(mem: dict) -> str:
    rows = [[label, number(v.get("rss_kib"), 0, " kB"), number(v.get("hwm_kib"), 0, " kB")]
            for label, v in mem.items()]
    return markdown(["supervisor", "VmRSS", "VmHWM"], rows)


def figures(found: dict) -> dict:
    """The design table's inputs from the measured medians."""
    p = found["pings"]
    return {"check_s": found["check"]["total"]["median"],
            "pass_s": found["pass"]["pass"]["median"],
            "supervisor_h": p["supervisor_h"]["median"], "conmon_h": p["conmon_h"]["median"]}


def report(found: dict, header: list[str]) -> str:
    rows = design_rows(figures(found))
    return "\n\n".join(["\n".join(header), event_table(found), design_table(rows),
                        memory_table(found["memory"]),
                        "Not measured: systemd's share (a transient unit per check and per "
                        "pass, journald's lines): systemd is not PID 1 on this machine."])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="5 checks, 5 passes, 2 windows of 15 s")
    parser.add_argument("--json", action="store_true", help="the figures as JSON, too")
    parser.add_argument("--checks", type=int, default=20)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=float, default=30.0, help="seconds each")
    parser.add_argument("--base", help="a base image already in Podman's storage")
    args = parser.parse_args(argv)
    if args.quick:
        args.checks, args.passes, args.windows, args.window = 5, 5, 2, 15.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench.watch_cost_lab import CannotRun, measure_all

    try:
        found, header = measure_all(args)
    except CannotRun as exc:
        print(f"watch_cost: Podman cannot run a container on this machine: {exc}",
              file=sys.stderr)
        return 2
    print(report(found, header))
    if args.json:
        print(json.dumps({"figures": found, "designs": design_rows(figures(found))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
