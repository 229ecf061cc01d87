"""`inv deploy` beside a hand-written yardstick script, on the same sandbox VM, in the same
run, alternating: cold, no-op and one-file-change deploys.

    .venv/bin/python bench/deploy_bench.py [--runs 3] [--os bookworm] [--yardstick PATH]

The yardstick (e.g. ../shared/bench/manual-deploy.sh, with its app/ beside it) is not part
of this repository: without --yardstick the bench measures `inv deploy` alone and says so.

Prints, per kind: the medians of both tools' wall time and their ratio (ours / script);
where our time went (our step lines, medians); and our SSH connections, remote commands
and bytes sent twice - as `inv deploy` counts them, and as the host saw them (sshd's
"Accepted" lines in the journal, sudo's log of commands, and the bytes the guest's eth0
received, which include SSH's own framing and encryption). Cold means: our (or the
script's) container, unit, secrets, images, state, app dir and swapfile removed first;
Podman and the preloaded base image stay, as on a VM made by `inv vm.create`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.sandbox import machine as sandbox  # noqa: E402
from tests.e2e.deploy_helpers import copy_source, inv, inv_env, make_env_file  # noqa: E402

YARDSTICK: Path | None = None  # the script beside ours (--yardstick), or None: ours alone
ALONE = ("no yardstick given (--yardstick PATH, e.g. ../shared/bench/manual-deploy.sh): "
         "measuring `inv deploy` alone")
STATS = re.compile(r"ssh connections: (\d+), remote commands: (\d+), steps: (\d+), "
                   r"bytes sent: (\d+)")
STEP = re.compile(r"^  - ([\w.]+)(?::[^(]*)? \(([\d.]+)s\)$")
RESET_OURS = r"""
systemctl disable --now container-97layer-nightguard.service >/dev/null 2>&1
rm -f /etc/systemd/system/container-97layer-nightguard.service; systemctl daemon-reload
podman rm -f -t 0 97layer-nightguard >/dev/null 2>&1
for s in $(podman secret ls --format '{{.Name}}' | grep -v '^yardstick_'); do
  podman secret rm "$s" >/dev/null; done
for i in $(podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/nightguard:'); do
  podman rmi -f "$i" >/dev/null; done
rm -rf /var/lib/nightguard /home/ubuntu/97layerOS /home/ubuntu/97layerOS-data
"""
RESET_SWAP = r"""
swapoff /swapfile 2>/dev/null; rm -f /swapfile /etc/sysctl.d/99-nightguard.conf
sed -i '\#^/swapfile#d' /etc/fstab; sysctl -q -w vm.swappiness=60
"""
# independent counts, read on the host as root (the system journal is not the login
# user's to read): sshd's logins (by the process's name: a login's line is not always
# filed under ssh.service) and sudo's commands in the journal after a cursor taken before
# the deploy, and the bytes eth0 received. The reading probe's own login and sudo come
# after the cursor too: one of each is taken off.
COUNTERS = """sleep 0.5  # journald has written what came before this command
cursor=$(journalctl -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p')
after="{after}"
if [ -n "$after" ]; then
  echo accepted $(( $(journalctl _COMM=sshd --after-cursor "$after" --no-pager -o cat \\
    | grep -c 'Accepted publickey') - 1 ))
  echo commands $(( $(journalctl _COMM=sudo --after-cursor "$after" --no-pager -o cat \\
    | grep -c 'COMMAND=') - 1 ))
fi
echo rx $(awk '/eth0:/ {{print $2}}' /proc/net/dev)
echo cursor "$cursor"
"""


def host(target, script: str) -> str:
    argv = sandbox.build_ssh_argv(target["port"], target["key_filename"],
                                  target["known_hosts"], "sudo -n sh -s")
    done = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"on the sandbox: {script[:60]}...: {done.stderr}")
    return done.stdout


def counters(target, after: str = "") -> dict:
    """The counts since the cursor ``after`` (none: only rx and a cursor to count from)."""
    out = host(target, COUNTERS.format(after=after))
    seen = dict(line.split(" ", 1) for line in out.splitlines())
    return {k: (v if k == "cursor" else int(v)) for k, v in seen.items()}


def ours(env: dict, target) -> dict:
    before = counters(target)
    started = time.monotonic()
    done = inv(["deploy"], env)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"inv deploy failed:\n{done.stdout}\n{done.stderr}")
    seen = counters(target, before["cursor"])
    connections, commands, steps, sent = (int(x) for x in STATS.search(done.stdout).groups())
    timings = {m.group(1): float(m.group(2)) for m in map(STEP.match, done.stdout.splitlines())
               if m}
    return {"seconds": seconds, "connections": connections, "commands": commands,
            "steps": steps, "bytes": sent, "host_accepted": seen["accepted"],
            "host_sudo": seen["commands"], "host_rx": seen["rx"] - before["rx"],
            "timings": timings}


def script(target, app: Path) -> dict:
    env = dict(os.environ, HOST="127.0.0.1", PORT=str(target["port"]), SSH_USER="ubuntu",
               KEY=target["key_filename"], KNOWN_HOSTS=target["known_hosts"],
               APP_SRC=str(app))
    started = time.monotonic()
    done = subprocess.run(["bash", str(YARDSTICK)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the yardstick failed:\n{done.stdout}\n{done.stderr}")
    return {"seconds": time.monotonic() - started}


def reset_script(target, app: Path) -> None:
    env = dict(os.environ, HOST="127.0.0.1", PORT=str(target["port"]), SSH_USER="ubuntu",
               KEY=target["key_filename"], KNOWN_HOSTS=target["known_hosts"], APP_SRC=str(app))
    subprocess.run(["bash", str(YARDSTICK), "--reset"], env=env, capture_output=True,
                   check=True)


def median(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def table(rows: dict, kinds: tuple[str, ...]) -> list[str]:
    """Wall times per kind: ours, the script's and the ratio, or ours alone (the script's
    column then says why it is empty)."""
    lines = [f"{'kind':10} {'ours s':>8} {'script s':>9} {'ratio':>6}"]
    for kind in kinds:
        a = median(rows["ours", kind], "seconds")
        if rows["script", kind]:
            b = median(rows["script", kind], "seconds")
            lines.append(f"{kind:10} {a:8.1f} {b:9.1f} {a / b:6.2f}")
        else:
            lines.append(f"{kind:10} {a:8.1f} {'-':>9} {'-':>6}")
    if not any(rows["script", kind] for kind in kinds):
        lines.append(f"(script: {ALONE})")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; a --yardstick that is not a file (or lacks its app/) stops here, in one
    line, before any VM boots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--os", default="bookworm")
    parser.add_argument("--yardstick", type=Path, default=None,
                        help="the hand-written deploy script to compare with (its app/ "
                             "beside it); default: none, ours is measured alone")
    args = parser.parse_args(argv)
    if args.yardstick is not None:
        if not args.yardstick.is_file():
            parser.exit(2, f"--yardstick {args.yardstick}: no such file\n")
        if not (args.yardstick.parent / "app").is_dir():
            parser.exit(2, f"--yardstick {args.yardstick}: no app/ beside it (the tree the "
                           "script deploys)\n")
    return args


def main(argv: list[str] | None = None) -> None:
    global YARDSTICK
    args = parse_args(argv)
    YARDSTICK = args.yardstick
    if YARDSTICK is None:
        print(ALONE, flush=True)
    name = f"bench-{args.os}"
    kinds = ("cold", "no-op", "one file")
    rows = {(tool, kind): [] for tool in ("ours", "script") for kind in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        copy_source(base / "src")
        env_file = make_env_file(base)
        app = base / "yardstick-app"
        if YARDSTICK is not None:
            shutil.copytree(YARDSTICK.parent / "app", app)
        target = sandbox.ensure_up(name, os_flavour=args.os, timeout=900)
        target["name"] = name
        env = inv_env(target, env_file, base / "src")
        for run in range(args.runs):
            print(f"round {run + 1} of {args.runs}", flush=True)
            host(target, RESET_OURS + RESET_SWAP)
            if YARDSTICK is not None:
                reset_script(target, app)
                rows["script", "cold"].append(script(target, app))
                host(target, RESET_OURS + RESET_SWAP)  # the swapfile: the script's made it
            rows["ours", "cold"].append(ours(env, target))
            if YARDSTICK is not None:
                rows["script", "no-op"].append(script(target, app))
            rows["ours", "no-op"].append(ours(env, target))
            if YARDSTICK is not None:
                main_py = app / "main.py"
                main_py.write_text(re.sub(r"VERSION = .*", f"VERSION = 'bench-{run}'",
                                          main_py.read_text()))
                rows["script", "one file"].append(script(target, app))
            with open(base / "src/knowledge/README.md", "a") as handle:
                handle.write(f"bench change {time.time()}\n")
            rows["ours", "one file"].append(ours(env, target))
        if os.environ.get("NG_BENCH_KEEP") != "1":
            sandbox.down(name, destroy=True)
    print(f"\ndeploy on one sandbox ({args.os}, 1 GB, 2 vCPUs, TCG emulation), "
          f"medians of {args.runs} alternating runs")
    print("\n".join(table(rows, kinds)))
    print("\nwhere our time went (medians of the step lines, seconds)")
    for kind in kinds:
        steps = sorted({s for row in rows["ours", kind] for s in row["timings"]})
        ours_rows = rows["ours", kind]
        parts = [f"{s} {statistics.median(r['timings'].get(s, 0.0) for r in ours_rows):.1f}"
                 for s in steps]
        print(f"  {kind:10} " + ", ".join(parts))
    print("\nour counts: as inv counts them / as the host saw them")
    print(f"{'kind':10} {'ssh conns':>12} {'commands':>12} {'bytes sent / eth0 rx':>24}")
    for kind in kinds:
        r = rows["ours", kind]
        print(f"{kind:10} {median(r, 'connections'):5.0f} / {median(r, 'host_accepted'):<4.0f}"
              f" {median(r, 'commands'):5.0f} / {median(r, 'host_sudo'):<4.0f}"
              f" {median(r, 'bytes'):10.0f} / {median(r, 'host_rx'):<10.0f}")


if __name__ == "__main__":
    main()
