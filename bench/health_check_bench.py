#!/usr/bin/env python3
"""Cost of the container health check: one fresh python3 process per run.

    python3 bench/health_check_bench.py [--runs 20] [--interval 30] [--python PATH]

Prints the median wall time, the median CPU time (user + system, from os.wait4)
and the median and maximum peak RSS of running execution/system/health_check.py,
plus the CPU seconds per hour it costs when
run every --interval seconds (median CPU per run * 3600 / interval). The same is
measured for ``python3 -c pass`` as the floor of any Python health check.

Peak RSS is not taken from this process's rusage: a child started from a Python
process inherits that process's RSS high-water mark at fork/exec, so ru_maxrss
would report the benchmark's own size. It comes from /usr/bin/time (which forks
from a small process) when present, else from the child's own VmHWM read at exit.

The check runs against a healthy temporary setup (heartbeat, secrets, dirs) and
this machine's real cgroup files, so it does exactly the work it does in the
container.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEALTH_CHECK = ROOT / "execution" / "system" / "health_check.py"


def default_python():
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


# Runs a script like "python3 SCRIPT" does, then reports the process's own peak RSS.
VMHWM_WRAPPER = """
import sys
path = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    exec(compile(open(path).read(), path, "exec"), {"__name__": "__main__", "__file__": path})
except SystemExit:
    pass
finally:
    with open("/proc/self/status") as fh:
        sys.stderr.write([line for line in fh if line.startswith("VmHWM:")][0])
"""


def run_once(argv, env):
    """(wall seconds, cpu seconds, exit code) of one child."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def peak_rss_kib(python, script, env):
    """Peak RSS in KiB of ``python script`` (or ``python -c pass`` when script is None)."""
    time_bin = shutil.which("time", path="/usr/bin:/bin")
    if time_bin:
        args = [python, script] if script else [python, "-c", "pass"]
        proc = subprocess.run(
            [time_bin, "-f", "%M", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        return int(proc.stderr.strip().splitlines()[-1])
    if script is None:
        args = [python, "-c", "import sys; sys.stderr.write(open('/proc/self/status').read())"]
    else:
        args = [python, "-c", VMHWM_WRAPPER, script]
    proc = subprocess.run(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
    )
    line = [x for x in proc.stderr.splitlines() if x.startswith("VmHWM:")][-1]
    return int(line.split()[1])


def measure(python, script, env, runs):
    argv = [python, script] if script else [python, "-c", "pass"]
    results = [run_once(argv, env) for _ in range(runs)]
    rss = [peak_rss_kib(python, script, env) for _ in range(runs)]
    return {
        "wall_ms": statistics.median(r[0] for r in results) * 1000,
        "cpu_ms": statistics.median(r[1] for r in results) * 1000,
        "rss_mb": statistics.median(rss) / 1024,
        "rss_max_mb": max(rss) / 1024,
        "exit_codes": sorted({r[2] for r in results}),
    }


def healthy_env(base):
    """Environment for a healthy run in a temporary app tree."""
    app = Path(base) / "app"
    (app / "directives").mkdir(parents=True)
    (app / "knowledge").mkdir()
    secrets = Path(base) / "secrets"
    secrets.mkdir()
    for name in ("telegram_bot_token", "gemini_api_key"):
        (secrets / name).write_text("placeholder\n")
    heartbeat = Path(base) / "heartbeat"
    heartbeat.write_text(f"{time.time():.3f}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NG_")}
    env.update(
        NG_APP_DIR=str(app),
        NG_SECRETS_DIR=str(secrets),
        NG_HEARTBEAT_FILE=str(heartbeat),
        NG_HEARTBEAT_MAX_AGE="3600",
    )
    return env


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--interval", type=float, default=30.0, help="health check period, s")
    parser.add_argument("--python", default=default_python())
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="hc-bench-") as base:
        env = healthy_env(base)
        # Warm the page cache so the first run does not skew the median.
        run_once([args.python, str(HEALTH_CHECK)], env)
        floor = measure(args.python, None, env, args.runs)
        check = measure(args.python, str(HEALTH_CHECK), env, args.runs)

    version = subprocess.run(
        [args.python, "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    rss_source = "/usr/bin/time" if shutil.which("time", path="/usr/bin:/bin") else "VmHWM"
    print(
        f"python: {args.python} ({version}), runs: {args.runs},"
        f" interval: {args.interval:g} s, peak RSS from {rss_source}"
    )
    for label, m in (("python3 -c pass", floor), ("health_check.py", check)):
        print(
            f"{label:16} wall median {m['wall_ms']:6.1f} ms | cpu median {m['cpu_ms']:5.1f} ms"
            f" | peak RSS median {m['rss_mb']:5.1f} MB, max {m['rss_max_mb']:5.1f} MB"
            f" | exit codes {m['exit_codes']}"
        )
    per_hour = check["cpu_ms"] / 1000 * 3600 / args.interval
    print(
        f"health check CPU: {per_hour:.2f} CPU-s per hour at one run every {args.interval:g} s"
        f" ({per_hour / 36:.3f}% of one core)"
    )
    if check["exit_codes"] != [0]:
        print("warning: the health check did not report healthy", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
