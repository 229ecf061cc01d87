"""Recovery times on a sandbox VM with the production health settings: crash, hang and
host reboot, each until a NEW container is healthy. Prints medians of N runs (default 3),
and the CPU the health machinery costs per hour on the host.

    .venv/bin/python bench/recovery_bench.py [--runs 3] [--os bookworm] [--skip-hang]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.sandbox import machine as sandbox  # noqa: E402
from tests.e2e.conftest import run_over_ssh  # noqa: E402
from tests.e2e.deploy_helpers import (  # noqa: E402
    CONTAINER,
    control,
    copy_source,
    healthy_now,
    inspect,
    inv,
    inv_env,
    make_env_file,
    wait_until,
)


def started_at(target) -> str | None:
    data = inspect(run_over_ssh, target)
    return data["State"]["StartedAt"] if data and data["State"]["Running"] else None


def time_to_recover(target, trigger, timeout: float = 600) -> float:
    before = started_at(target)
    began = time.monotonic()
    trigger()

    def recovered():
        now = started_at(target)
        return now and now != before and healthy_now(run_over_ssh, target)

    if not wait_until(recovered, timeout, 1):
        raise SystemExit("no recovery within the timeout")
    return time.monotonic() - began


def health_check_cpu(target, runs: int = 5) -> float:
    """CPU seconds (user + system, podman and its children) of one `podman healthcheck
    run`, which is what each timer tick costs the host."""
    script = (f"sudo -n bash -c 'TIMEFORMAT=%U+%S; time (for i in $(seq {runs}); do "
              f"podman healthcheck run {CONTAINER} >/dev/null; done)' 2>&1 | tail -1")
    user, system = run_over_ssh(target, script).stdout.strip().split("+")
    return (float(user) + float(system)) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--os", default="bookworm")
    parser.add_argument("--skip-hang", action="store_true")
    args = parser.parse_args()
    name = f"bench-recovery-{args.os}"
    target = sandbox.ensure_up(name, os_flavour=args.os, fresh=True, timeout=900)
    target["name"] = name
    results: dict[str, list[float]] = {"crash": [], "hang": [], "reboot": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        copy_source(base / "src")
        env = inv_env(target, make_env_file(base), base / "src")
        done = inv(["deploy"], env)
        if done.returncode != 0:
            raise SystemExit(done.stdout + done.stderr)
        for _ in range(args.runs):
            results["crash"].append(time_to_recover(
                target, lambda: control(run_over_ssh, target, "crash")))
            if not args.skip_hang:
                results["hang"].append(time_to_recover(
                    target, lambda: control(run_over_ssh, target, "hang")))
            results["reboot"].append(time_to_recover(
                target, lambda: run_over_ssh(target, "sudo -n systemctl reboot")))
        per_check = health_check_cpu(target)
    sandbox.down(name, destroy=True)
    print(f"recovery on a sandbox ({args.os}, TCG), interval 30s / retries 3 / heartbeat 30s,"
          f" medians of {args.runs}")
    for kind, values in results.items():
        if values:
            print(f"  {kind:7} {statistics.median(values):6.1f} s  (runs: "
                  + ", ".join(f"{v:.0f}" for v in values) + ")")
    print(f"  one health check: {per_check:.2f} CPU-s on the host; at a 30 s interval "
          f"{per_check * 120:.0f} CPU-s per hour ({per_check * 120 / 36:.2f} % of one vCPU)")


if __name__ == "__main__":
    main()
