"""What the health machinery costs on the sandbox VM (the e2-micro look-alike), measured in
the guest: CPU seconds per hour of the health check as Podman runs it (`podman healthcheck
run`: podman, conmon, the runtime's exec and health_check.py together) and of the agent's
heartbeat loop, against an e2-micro's sustained 0.25 vCPU (900 CPU-s per hour).

    .venv/bin/python bench/health_cost_bench.py [--checks 20] [--idle 120] [--os bookworm]

Needs a deployed agent on the sandbox (it deploys one if the container is absent). The
check's cost is the guest's whole busy CPU time (all cores, /proc/stat) during N checks run
back to back, minus the idle baseline of the same length, divided by N; times 120 checks an
hour (interval 30 s). The heartbeat's cost is the agent container's own CPU (its cgroup's
cpu.stat) over an idle window. Under TCG every instruction costs 10-20x a real core: these
are upper bounds, and the figures say where they were measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.sandbox import machine as sandbox  # noqa: E402
from tests.e2e.deploy_helpers import copy_source, inv, inv_env, make_env_file  # noqa: E402

PROBE = r"""
import json, os, subprocess, sys, time
C = "97layer-nightguard"
HZ = os.sysconf("SC_CLK_TCK")
def busy():
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f) - f[3] - f[4]) / HZ  # all but idle and iowait, in seconds
def agent_cpu():
    pid = open(f"/run/containers/storage/overlay-containers/{cid}/userdata/pidfile").read()
    path = open(f"/proc/{pid.strip()}/cgroup").read().split("::", 1)[1].strip()
    stat = open(f"/sys/fs/cgroup{path}/cpu.stat").read().split()
    return int(stat[stat.index("usage_usec") + 1]) / 1e6
cid = open("/run/container-97layer-nightguard.service.ctr-id").read().strip()
checks, idle = int(sys.argv[1]), float(sys.argv[2])
b0, a0, t0 = busy(), agent_cpu(), time.monotonic()
time.sleep(idle)
idle_busy, idle_agent, idle_wall = busy() - b0, agent_cpu() - a0, time.monotonic() - t0
b1, t1 = busy(), time.monotonic()
for _ in range(checks):
    subprocess.run(["podman", "healthcheck", "run", C], check=True, capture_output=True)
run_busy, run_wall = busy() - b1, time.monotonic() - t1
print(json.dumps({"idle_busy": idle_busy, "idle_wall": idle_wall, "idle_agent": idle_agent,
                  "run_busy": run_busy, "run_wall": run_wall, "checks": checks}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=20)
    parser.add_argument("--idle", type=float, default=120)
    parser.add_argument("--os", default="bookworm")
    args = parser.parse_args()
    name = f"bench-{args.os}"
    target = sandbox.ensure_up(name, os_flavour=args.os, timeout=900)
    target["name"] = name
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        copy_source(base / "src")
        done = inv(["deploy"], inv_env(target, make_env_file(base), base / "src"))
        if done.returncode != 0:
            raise SystemExit(f"deploy failed:\n{done.stdout}\n{done.stderr}")
    argv = sandbox.build_ssh_argv(target["port"], target["key_filename"],
                                  target["known_hosts"],
                                  f"sudo -n python3 - {args.checks} {args.idle}")
    out = subprocess.run(argv, input=PROBE, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    r = json.loads(out.stdout)
    baseline_rate = r["idle_busy"] / r["idle_wall"]
    per_check = (r["run_busy"] - baseline_rate * r["run_wall"]) / r["checks"]
    heartbeat_hour = r["idle_agent"] / r["idle_wall"] * 3600
    check_hour = per_check * 120
    print(f"on the {args.os} sandbox (TCG emulation, 2 vCPUs): one `podman healthcheck run` "
          f"costs {per_check:.2f} CPU-s ({r['run_wall'] / r['checks']:.2f} s wall)")
    print(f"health checks every 30 s: {check_hour:.0f} CPU-s per hour = "
          f"{check_hour / 900 * 100:.1f}% of an e2-micro's sustained 0.25 vCPU")
    print(f"agent at rest (heartbeat every 5 s): {heartbeat_hour:.1f} CPU-s per hour = "
          f"{heartbeat_hour / 900 * 100:.2f}% of it")
    print(f"whole guest at rest: {baseline_rate * 3600:.0f} CPU-s per hour")


if __name__ == "__main__":
    main()
