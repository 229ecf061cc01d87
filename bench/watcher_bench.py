"""Cost of one alert-watcher pass on a host: CPU time and peak memory.

    .venv/bin/python bench/watcher_bench.py [--sandbox NAME] [--runs 10]

Runs the watcher the deploy installed (``/var/lib/nightguard/watcher.py`` with its
``alerts.json``, as nightguard-watch.service does: ``python3 -I -S``, the watcher imported
so that its compiled bytecode is kept) N times over SSH on a
sandbox VM where `inv deploy` ran with ``nightguard.alerts.enabled``, and prints the
medians, beside ``python3 -I -S -c pass`` as the floor of any Python process. Each run is a
real pass (on a steady healthy host it sends nothing; it may ping).

The pass runs inside a small wrapper in the same process: at the end it reads the
process's own CPU time from
os.times() - its children (systemctl, and journalctl after a restart) included - and its
peak RSS from /proc/self/status (VmHWM). A child's ru_maxrss would count the forking
parent's size instead (see bench/health_check_bench.py). The interpreter's start is
included, as it is in every pass the timer starts.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WATCHER = "/var/lib/nightguard/watcher.py"
ARGS = "/var/lib/nightguard/alerts.json"
WRAPPER = """
import json, os, sys
if len(sys.argv) > 1:  # as the service does it (tasks/deploy/commands.py: watcher_code)
    folder, name = os.path.split(sys.argv[1])
    sys.path.append(folder)
    __import__(name[:-3]).watch_main(sys.argv[2:])
t = os.times()
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
sys.stderr.write(json.dumps({"cpu_s": t.user + t.system + t.children_user + t.children_system,
                             "children_cpu_s": t.children_user + t.children_system,
                             "rss_kib": int(hwm.split()[1])}) + "\\n")
"""


def remote_command(script: str | None) -> str:
    """The command line (for the remote shell) of one measured run."""
    code = base64.b64encode(WRAPPER.encode()).decode()
    run = f"exec(__import__('base64').b64decode('{code}').decode())"
    tail = f" {script} {ARGS}" if script else ""
    return f"sudo -n /usr/bin/python3 -I -S -c \"{run}\"{tail}"


def measure(ssh_run, target, runs: int = 10) -> dict:
    """Medians over `runs` passes of the watcher and of an empty python3, run on `target`
    through ``ssh_run(target, command)`` (tests/e2e/conftest.py's run_over_ssh)."""
    found = {}
    for label, script in (("floor", None), ("watcher", WATCHER)):
        samples = []
        for _ in range(runs + 1):  # the first run warms the page cache
            done = ssh_run(target, remote_command(script))
            if done.returncode != 0:
                raise RuntimeError(f"{label}: exit {done.returncode}: {done.stderr[-300:]}")
            samples.append(json.loads(done.stderr.strip().splitlines()[-1]))
        samples = samples[1:]
        found[label] = {
            "cpu_ms": statistics.median(s["cpu_s"] for s in samples) * 1000,
            "cpu_max_ms": max(s["cpu_s"] for s in samples) * 1000,
            "children_cpu_ms": statistics.median(s["children_cpu_s"] for s in samples) * 1000,
            "rss_mb": statistics.median(s["rss_kib"] for s in samples) / 1024,
            "rss_max_mb": max(s["rss_kib"] for s in samples) / 1024,
            "runs": runs,
        }
    return found


def report(found: dict, interval: float = 30.0) -> str:
    lines = []
    for label, name in (("floor", "python3 -I -S -c pass"), ("watcher", "watch pass")):
        m = found[label]
        lines.append(f"{name:22} cpu median {m['cpu_ms']:6.1f} ms (max {m['cpu_max_ms']:.1f},"
                     f" children {m['children_cpu_ms']:.1f}) | peak RSS median "
                     f"{m['rss_mb']:5.1f} MB, max {m['rss_max_mb']:5.1f} MB")
    per_hour = found["watcher"]["cpu_ms"] / 1000 * 3600 / interval
    lines.append(f"at one pass every {interval:g} s: {per_hour:.1f} CPU-s per hour "
                 f"({per_hour / 36:.2f}% of one core)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandbox", default="default", help="the sandbox VM's name")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--interval", type=float, default=30.0, help="alerts.interval, s")
    args = parser.parse_args(argv)
    from tasks.sandbox import machine as sandbox
    from tests.e2e.conftest import run_over_ssh

    found = measure(run_over_ssh, sandbox.target(args.sandbox), args.runs)
    print(f"sandbox {args.sandbox}, {args.runs} runs each")
    print(report(found, args.interval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
