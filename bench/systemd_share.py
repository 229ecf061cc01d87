"""systemd's own share of keeping watch, measured natively (this machine's own cores, not
an emulated VM): what systemd, journald, D-Bus and logind spend for each event the design
makes them handle on the VM, and per hour at a health check and a watcher pass every
5 min and every 10 min, as shares of the 900 CPU-seconds an hour an e2-micro sustains and
of the 1.8 CPU-s/h issue 24 allows in all. bench/watch_cost.py measures the rest (the
podman client, conmon, crun, health_check.py, the watcher's Python) but not this: systemd
is not PID 1 on this machine.

    .venv/bin/python bench/systemd_share.py [--quick] [--json] [--rounds 5] [--window 20]
                                            [--every 0.2] [--lines 300] [--shows 200]
                                            [--period 0.01]

Needs root and Podman (crun, conmon); where it cannot run it says why in one line and
exits 2. A Debian 12 root filesystem with systemd, dbus and python3-minimal is made once
by mmdebstrap from Debian's mirror (NG_SANDBOX_MIRROR, as the sandbox's images) and
cached in ~/.cache/nightguard-deploy/systemd-share/; it is `podman import`ed and run with
`--systemd=always --network none` and /lib/systemd/systemd as its PID 1 (on
this machine's hybrid cgroup layout with a v1 hugetlb hierarchy mounted while it runs, as
bench/watch_cost.py does). Everything it creates is removed at the end.

What is measured, per round (medians over rounds, min-max, n):
  check    a Podman health check's unit: `systemd-run --on-unit-inactive=...
           --timer-property=AccuracySec=...` with the service `/bin/true`, as Podman 4.3
           creates it once per container start, firing every --every s for --window s;
           the activations counted from systemd's own "Deactivated successfully" lines.
  watch    nightguard-watch.timer and its Type=oneshot, Nice=10 service as the deploy
           writes them, the pass `/bin/true`, firing every --every s.
  journal  one ~1 kB journal entry with fields like Podman's health_status event, from a
           new process each time (`logger --journald`), as each `podman healthcheck run`
           writes its event; --lines a round.
  show     the watcher's one `systemctl show -p ...` a pass (systemd's side of it),
           asked of an active Type=notify unit with a watchdog; --shows a round.
  ping     one WATCHDOG=1 to a Type=notify service with WatchdogSec=30, NotifyAccess=all
           (a python3 loop sends one every --period s; stopped with SIGSTOP for the idle
           window); per message received, counted by the loop.
CPU: /proc/PID/task/*/schedstat (ns) of the container's systemd (PID 1), systemd-journald,
dbus-daemon and systemd-logind; for check and watch also the container's cgroup (v1
cpuacct.usage, or v2 cpu.stat), which adds the child systemd forks for each activation
(its set-up before exec, then /bin/true). Each busy window is paired with an idle window
of the same length in the same round; per event = (busy - idle rate x busy length) / events.
The drivers' own CPU (the shell loop, logger, systemctl, the pinging loop) is not counted.
systemd's share of an activation = the container's cgroup per activation minus one
/bin/true (fork, exec, exit: its wait4() rusage, on the host): the command's own CPU is
bench/watch_cost.py's. An activation's figure already holds systemd's own two journal lines
about it ("Started", "Deactivated successfully").
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
TARGET = 1.8  # CPU-s an hour issue 24 allows for keeping watch, systemd's share counted
HOUR = 3600.0
INTERVALS = (300.0, 600.0)  # a health check and a watcher pass every 5 min, every 10 min
PING_EVERY = 15.0  # WatchdogSec=30: conmon forwards a WATCHDOG=1 every 15 s
KINDS = ("check", "watch", "journal", "show", "ping")
# The same events at a slow rate: each a wake-up from idle, as on the VM (where they come
# minutes or 15 s apart); where measured, the hour is reckoned from these.
SLOW = ("check", "watch", "ping")
CONTAINER = "container"  # the container's cgroup, beside the daemons' own counters
EVENT_BYTES = 1024
TIME_LINE = "PODMAN_TIME=%020d"  # shell printf format, a new number each entry
TIME_BYTES = len("PODMAN_TIME=") + 20 + 1


# -- pure parts ------------------------------------------------------------------------------
def stats(values) -> dict:
    """Median, min, max and n of a list of numbers (an empty list gives None's and 0)."""
    values = list(values)
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def per_event(busy: dict, busy_wall: float, idle: dict, idle_wall: float,
              events: int) -> dict | None:
    """CPU-s per event of each component: the busy window's CPU minus what the component
    spends at rest over as long (its idle window's rate), divided by the events; "daemons"
    is the sum over all but the container's cgroup. None when nothing happened."""
    if events <= 0 or busy_wall <= 0 or idle_wall <= 0:
        return None
    found = {name: (busy[name] - idle[name] * busy_wall / idle_wall) / events
             for name in busy if name in idle}
    found["daemons"] = sum(v for k, v in found.items() if k != CONTAINER)
    found["events"] = events
    return found


def count_entries(lines, start: float, end: float) -> int:
    """Journal entries (`journalctl -o json` lines) whose time falls in [start, end),
    wall-clock seconds."""
    count = 0
    for line in lines:
        try:
            stamp = int(json.loads(line)["__REALTIME_TIMESTAMP"]) / 1e6
        except (ValueError, KeyError, TypeError):
            continue
        count += start <= stamp < end
    return count


def podman_event_entry(size: int = EVENT_BYTES) -> str:
    """`logger --journald` input: the fields of a Podman health_status event (libpod's
    journald events backend) less PODMAN_TIME, which the driver adds to each entry
    (TIME_LINE, TIME_BYTES long: a new value each time, as Podman's), padded with label
    fields of at most 200 bytes each to `size` bytes in all: none reaches the 512 bytes
    over which journald compresses a field, and a Podman event has none that long."""
    cid = "c0ffee" * 10 + "beef"
    fields = ["MESSAGE=" + cid, "SYSLOG_IDENTIFIER=podman", "PODMAN_EVENT=health_status",
              "PODMAN_TYPE=container", "PODMAN_ID=" + cid,
              "PODMAN_IMAGE=localhost/nightguard:latest", "PODMAN_NAME=nightguard-agent",
              "PODMAN_HEALTH_STATUS=healthy"]
    text = "\n".join(fields) + "\n"
    room = size - TIME_BYTES - len(text)
    number = 0
    while room > 0:
        head = f"PODMAN_LABEL_{number}="
        if room < len(head) + 2:
            raise ValueError(f"no room to pad to {size} bytes")
        body = min(200, room) - len(head) - 1
        if 0 < room - (len(head) + body + 1) < 20:  # keep the last field long enough
            body -= 20
        text += head + "x" * body + "\n"
        room -= len(head) + body + 1
        number += 1
    if room < 0:
        raise ValueError(f"an entry needs more than {size} bytes")
    return text


def summarise(found: dict, true_s: list[float]) -> dict:
    """Rounds' per_event() dicts -> {kind: {"parts": {component: stats}, "share": stats,
    "events": total}}, and "true": /bin/true's stats. An activation's share is the
    container's cgroup less one /bin/true; any other event's is the daemons' sum."""
    true = stats(true_s)
    out = {"true": true}
    for kind, rounds in found.items():
        rounds = [r for r in rounds if r]
        names = sorted({k for r in rounds for k in r if k != "events"})
        parts = {name: stats(r[name] for r in rounds if name in r) for name in names}
        if kind.startswith(("check", "watch")):
            share = stats(r[CONTAINER] - true["median"] for r in rounds)
            parts["forked child"] = stats(r[CONTAINER] - r["daemons"] for r in rounds)
        else:
            share = stats(r["daemons"] for r in rounds)
        out[kind] = {"parts": parts, "share": share, "events": sum(r["events"] for r in rounds)}
    return out


def hourly(cost: dict, every: float) -> list[dict]:
    """The design's hour at a health check and a watcher pass every `every` s; `cost` holds
    the per-event CPU-s of each kind (KINDS)."""
    n = HOUR / every
    rows = [("health check: its transient timer fires its service", n, cost["check"]),
            ("health check: ~1 kB journal entry (Podman's event)", n, cost["journal"]),
            ("watcher pass: nightguard-watch.timer starts its oneshot", n, cost["watch"]),
            ("watcher pass: its `systemctl show` (systemd's side)", n, cost["show"]),
            ("watcher pass: its line in the journal", n, cost["journal"]),
            ("WATCHDOG=1 from conmon every 15 s", HOUR / PING_EVERY, cost["ping"])]
    table = [{"what": what, "per_hour": count, "per_event_s": each, "cpu_s_h": count * each}
             for what, count, each in rows]
    total = sum(r["cpu_s_h"] for r in table)
    table.append({"what": "total", "per_hour": None, "per_event_s": None, "cpu_s_h": total})
    for row in table:
        row["share_pct"] = row["cpu_s_h"] / BUDGET * 100
        row["of_target_pct"] = row["cpu_s_h"] / TARGET * 100
    return table


def costs(summary: dict) -> dict:
    """The median share per event of each kind for hourly(): the slow rate's where there
    is one."""
    return {kind: summary.get(f"{kind}_slow", summary[kind])["share"]["median"]
            for kind in KINDS}


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def micro(s: dict) -> str:
    """`median (min-max, n)` in µs of a stats() dict in seconds."""
    if not s["n"]:
        return "-"
    digits = 1 if s["median"] is not None and abs(s["median"]) < 1e-4 else 0
    return (f"{s['median'] * 1e6:,.{digits}f} µs ({s['min'] * 1e6:,.{digits}f}-"
            f"{s['max'] * 1e6:,.{digits}f}, n={s['n']})")


LABELS = {"check": "timer-driven transient service (a Podman health check's unit)",
          "watch": "timer-driven oneshot (nightguard-watch)",
          "journal": "one ~1 kB journal entry from a new process",
          "show": "one `systemctl show -p ...` (systemd's side)",
          "ping": "one WATCHDOG=1 (NotifyAccess=all, WatchdogSec=30)"}


def event_table(summary: dict, rates: dict | None = None) -> str:
    """Each kind's share and its parts; `rates`: {kind: what its rate was}, if known."""
    rows = []
    rates = rates or {}
    for kind in [k for k in KINDS for k in (k, f"{k}_slow") if k in summary]:
        found = summary[kind]
        what = ("container's cgroup less /bin/true" if kind.startswith(("check", "watch"))
                else "the daemons")
        rate = f" ({rates[kind]})" if kind in rates else ""
        rows.append([f"**{LABELS[kind.removesuffix('_slow')]}**{rate}: {what}",
                     micro(found["share"]), f"{found['events']:,}"])
        for name, s in found["parts"].items():
            if name not in ("daemons",):
                rows.append([f"· {name}", micro(s), ""])
    rows.append(["/bin/true, on the host (fork, exec, exit)", micro(summary["true"]), ""])
    return markdown(["event: systemd's share", "CPU per event: median (min-max, rounds)",
                     "events"], rows)


def hourly_table(rows: list[dict], every: float) -> str:
    def num(v, digits):
        return "-" if v is None else f"{v:,.{digits}f}"

    cells = [[r["what"], num(r["per_hour"], 0),
              "-" if r["per_event_s"] is None else f"{r['per_event_s'] * 1e6:,.1f} µs",
              num(r["cpu_s_h"], 4), num(r["share_pct"], 4) + "%",
              num(r["of_target_pct"], 2) + "%"] for r in rows]
    return (f"A health check and a watcher pass every {every / 60:g} min:\n\n"
            + markdown(["what", "events/h", "CPU per event", "CPU-s/h", "of 900 CPU-s/h",
                        "of the 1.8 CPU-s/h allowed"], cells))


def rates(args) -> dict:
    """What each kind's rate was, for the event table."""
    fast, slow = f"every {args.every:g} s", f"every {args.slow_every:g} s"
    return {"check": fast, "watch": fast, "check_slow": slow, "watch_slow": slow,
            "ping": f"every {args.period:g} s", "ping_slow": f"every {args.slow_period:g} s"}


def report(summary: dict, header: list[str], rates_: dict | None = None) -> str:
    parts = ["\n".join(header), event_table(summary, rates_)]
    parts += [hourly_table(hourly(costs(summary), every), every) for every in INTERVALS]
    parts.append("Caveats: Debian 12's systemd 252 as a container's PID 1, not the VM's: "
                 "on this hybrid machine it runs with v1 cgroups (name=systemd, no "
                 "controllers to set up per unit), the VM's are v2 with controllers; fewer "
                 "units are loaded than on the VM. The slow rates are still faster than "
                 "the VM's (a timer every 5-10 min, a ping every 15 s), whose wake-ups come "
                 "from colder caches.")
    return "\n\n".join(parts)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds of 8 s windows, 100 entries, 50 shows")
    parser.add_argument("--json", action="store_true", help="the figures as JSON, too")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=float, default=20.0, help="seconds each")
    parser.add_argument("--every", type=float, default=0.2,
                        help="seconds between a timer's activations")
    parser.add_argument("--lines", type=int, default=300, help="journal entries a round")
    parser.add_argument("--shows", type=int, default=200, help="systemctl show a round")
    parser.add_argument("--period", type=float, default=0.01,
                        help="seconds between WATCHDOG=1 messages")
    parser.add_argument("--slow-every", type=float, default=2.0,
                        help="seconds between a timer's activations, slow rate")
    parser.add_argument("--slow-period", type=float, default=1.0,
                        help="seconds between WATCHDOG=1 messages, slow rate")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds after boot before the first window")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.window, args.lines, args.shows = 2, 8.0, 100, 50
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench.systemd_share_lab import CannotRun, measure_all

    try:
        summary, header = measure_all(args)
    except CannotRun as exc:
        print(f"systemd_share: cannot run here: {exc}", file=sys.stderr)
        return 2
    print(report(summary, header, rates(args)))
    if args.json:
        print(json.dumps({"summary": summary,
                          "hourly": {str(int(e)): hourly(costs(summary), e)
                                     for e in INTERVALS}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
