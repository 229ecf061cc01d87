"""Process starts an hour at rest on a sandbox VM where the agent is deployed: the
`processes` counter of the guest's /proc/stat over a quiet window with our units running,
then over one of the same length with them stopped (the VM's own baseline), our probe's
own starts subtracted; the units are started again at the end.

    .venv/bin/python bench/rest_processes.py [--sandbox bench-bookworm] [--window 300]

Counts, not CPU: under TCG the guest's CPU figures are emulation (see
../shared/notes/watch-cost-native.md); a process start is a process start.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.deploy.commands import unit_name  # noqa: E402
from tasks.sandbox import machine as sandbox  # noqa: E402
from tests.e2e.conftest import run_over_ssh  # noqa: E402

CONTAINER = "97layer-nightguard"
READ = "awk '/^processes/ {print $2}' /proc/stat"


def starts(target: dict) -> int:
    done = run_over_ssh(target, READ)
    if done.returncode != 0 or not done.stdout.strip().isdigit():
        raise SystemExit(f"rest_processes: cannot read /proc/stat: {done.stderr.strip()}")
    return int(done.stdout)


def probe_cost(target: dict) -> int:
    """Starts one probe makes in the guest (sshd's session, the shell, awk)."""
    first, second = starts(target), starts(target)
    return second - first


def window(target: dict, seconds: float) -> float:
    """Starts an hour over a quiet window, the two probes' own starts subtracted."""
    cost = probe_cost(target)
    before = starts(target)
    time.sleep(seconds)
    after = starts(target)
    return (after - before - cost) * 3600 / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandbox", default="bench-bookworm")
    parser.add_argument("--window", type=float, default=300.0)
    args = parser.parse_args(argv)
    target = sandbox.target(args.sandbox)
    unit = unit_name(CONTAINER)
    if run_over_ssh(target, f"systemctl is-active --quiet {unit}").returncode != 0:
        raise SystemExit(f"rest_processes: {unit} is not active on {args.sandbox}: deploy first")
    ours = ["nightguard-watch.timer", unit]
    with_us = window(target, args.window)
    run_over_ssh(target, "sudo -n systemctl stop " + " ".join(ours))
    try:
        without = window(target, args.window)
    finally:
        run_over_ssh(target, "sudo -n systemctl start " + unit)
        run_over_ssh(target, "systemctl cat nightguard-watch.timer >/dev/null 2>&1 && "
                             "sudo -n systemctl start nightguard-watch.timer")
    print(f"process starts an hour at rest on {args.sandbox} ({args.window:g} s windows): "
          f"with our units {with_us:.0f}, without {without:.0f}, ours {with_us - without:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
