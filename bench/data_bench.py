"""`inv data.backup` and `inv data.restore` of a data dir of a given size, on a sandbox VM
where the agent is deployed: the agent's pause, the backup's wall time and size, the host
helper's peak memory (its own max RSS, as the kernel counts it), the host's lowest
MemAvailable while the backup ran, and the restore's wall time.

    .venv/bin/python bench/data_bench.py [--sandbox e2e-bookworm] [--mb 100] [--runs 1]

The data: files of 1 MB, half random (as a model's state or a database compresses badly),
half text (as chat logs do), written on the host into the data dir as the agent's uid. They
are removed at the end (the restore has put them back; the data dir's earlier tree stays
aside as <data_dir>.ng-previous until the next restore).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.sandbox import machine as sandbox  # noqa: E402
from tests.e2e.conftest import run_over_ssh  # noqa: E402
from tests.e2e.deploy_helpers import copy_source, inv, inv_env, make_env_file  # noqa: E402

DATA_DIR = "/home/ubuntu/97layerOS-data"


def ssh(target: dict, command: str) -> str:
    done = run_over_ssh(target, command, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"data_bench: `{command[:60]}...` failed: {done.stderr.strip()}")
    return done.stdout


def fill(target: dict, mb: int) -> None:
    half = mb // 2
    ssh(target, f"sudo -n -u '#1000' sh -c 'mkdir -p {DATA_DIR}/bench && cd {DATA_DIR}/bench "
                f"&& for i in $(seq 1 {half}); do head -c 1000000 /dev/urandom > r$i.bin; done "
                f"&& for i in $(seq 1 {mb - half}); do yes \"chat line $i: hello night guard\" "
                "| head -c 1000000 > t$i.txt; done'")


class LowestAvailable(threading.Thread):
    """The host's MemAvailable, sampled every second over one SSH command."""

    def __init__(self, target: dict):
        super().__init__(daemon=True)
        argv = sandbox.build_ssh_argv(target["port"], target["key_filename"],
                                      target["known_hosts"],
                                      "while :; do awk '/MemAvailable/ {print $2}' "
                                      "/proc/meminfo; sleep 1; done")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL)
        self.values: list[int] = []

    def run(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.values.append(int(line))

    def stop(self) -> int | None:
        self.proc.terminate()
        self.proc.wait(10)
        return min(self.values) if self.values else None


def one_run(env: dict, target: dict, out: Path) -> dict:
    probe = LowestAvailable(target)
    probe.start()
    time.sleep(2)
    started = time.monotonic()
    done = inv(["data.backup", "--out", str(out)], env, timeout=3600)
    wall = time.monotonic() - started
    lowest = probe.stop()
    if done.returncode != 0:
        raise SystemExit(f"data_bench: data.backup failed: {done.stdout}{done.stderr}")
    path = Path(done.stdout.strip().splitlines()[-1])
    paused = re.search(r"the agent was paused ([0-9.]+) s", done.stdout)
    peak = re.search(r"helper peak memory ([0-9]+) MB", done.stdout)
    started = time.monotonic()
    back = inv(["data.restore", str(path)], env, timeout=3600)
    if back.returncode != 0:
        raise SystemExit(f"data_bench: data.restore failed: {back.stdout}{back.stderr}")
    return {"backup_s": wall, "paused_s": float(paused.group(1)) if paused else None,
            "size_mb": path.stat().st_size / 1e6,
            "helper_peak_mb": int(peak.group(1)) if peak else None,
            "host_lowest_available_mb": lowest / 1024 if lowest else None,
            "restore_s": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandbox", default="e2e-bookworm")
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args(argv)
    target = sandbox.target(args.sandbox)
    target["name"] = args.sandbox
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        copy_source(base / "src")
        env = inv_env(target, make_env_file(base), base / "src")
        deployed = inv(["deploy"], env)
        if deployed.returncode != 0:
            raise SystemExit(f"data_bench: deploy failed: {deployed.stderr.strip()}")
        fill(target, args.mb)
        print(f"data_bench: {args.mb} MB in {DATA_DIR}/bench on {args.sandbox} "
              f"(half random, half text)")
        for run in range(args.runs):
            figures = one_run(env, target, base / "backups")
            print(f"run {run + 1}: " + ", ".join(
                f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in figures.items()))
    ssh(target, f"sudo -n rm -rf {DATA_DIR}/bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
