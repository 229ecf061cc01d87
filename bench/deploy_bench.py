"""Deploy figures on a sandbox VM: cold, no-op and one-file-change deploys.

For each kind, N runs (default 3); prints medians of wall time, SSH connections opened,
remote commands run and bytes sent (as `inv deploy` itself counts them).

    .venv/bin/python bench/deploy_bench.py [--runs 3] [--os bookworm]

A cold run starts from a fresh sandbox disk each time (boot not counted).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.sandbox import machine as sandbox  # noqa: E402
from tests.e2e.deploy_helpers import copy_source, inv, inv_env, make_env_file  # noqa: E402

STATS = re.compile(r"ssh connections: (\d+), remote commands: (\d+), bytes sent: (\d+)")


def one_deploy(env: dict) -> dict:
    started = time.monotonic()
    done = inv(["deploy"], env)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"deploy failed:\n{done.stdout}\n{done.stderr}")
    connections, commands, sent = (int(x) for x in STATS.search(done.stdout).groups())
    return {"seconds": seconds, "connections": connections, "commands": commands,
            "bytes": sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--os", default="bookworm")
    args = parser.parse_args()
    name = f"bench-{args.os}"
    results: dict[str, list[dict]] = {"cold": [], "no-op": [], "one file": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        copy_source(base / "src")
        env_file = make_env_file(base)
        for run in range(args.runs):
            target = sandbox.ensure_up(name, os_flavour=args.os, fresh=True, timeout=900)
            target["name"] = name
            env = inv_env(target, env_file, base / "src")
            results["cold"].append(one_deploy(env))
            for _ in range(1 if run else args.runs):
                results["no-op"].append(one_deploy(env))
            with open(base / "src" / "knowledge" / "README.md", "a") as handle:
                handle.write(f"bench change {time.time()}\n")
            results["one file"].append(one_deploy(env))
        sandbox.down(name, destroy=True)
    print(f"deploy on a sandbox ({args.os}, TCG emulation), medians of {args.runs}+ runs")
    print(f"{'kind':10} {'wall s':>8} {'ssh conns':>10} {'commands':>9} {'bytes sent':>11}")
    for kind, rows in results.items():
        def med(key, rows=rows):
            return statistics.median(row[key] for row in rows)
        print(f"{kind:10} {med('seconds'):8.1f} {med('connections'):10.0f} "
              f"{med('commands'):9.0f} {med('bytes'):11.0f}")


if __name__ == "__main__":
    main()
