"""Where a lab VM's CPU goes during a drill: the guest kernel's process accounting.

    python bench/guest_cpu.py start  [--vm e2e-bookworm]   # turn accounting on (as root)
    ... run drills against the VM ...
    python bench/guest_cpu.py report [--vm e2e-bookworm] [--top 25]

`start` points the guest kernel's BSD process accounting (acct(2), record version 3) at a
fresh file; every process that exits from then on leaves one 64-byte record: its command
name, its parent's pid, user and system CPU (ticks of 10 ms, as the kernel samples them)
and elapsed time. `report` stops accounting, reads the file back and prints CPU seconds per
command and, for the commands that cost most, per parent command - so that a podman call
made by a test probe is told from one made by the host helper or by a systemd unit.
Processes still running at `report` (the agent, conmon, sshd's listener) are not in it;
the guest's whole CPU over the window is printed beside it (/proc/stat), so what the
records miss is visible. A reboot ends the accounting (and restarts /proc/stat): the table
then covers the time up to the reboot, as shares of the records' own sum.

Under TCG these are emulated seconds: they say where the suite's time goes, not what
anything costs on a real host.
"""

import argparse
import base64
import collections
import struct
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.sandbox import machine as sb  # noqa: E402

PACCT = "/var/log/ng-bench-pacct"
RECORD = struct.Struct("<BBHIIIIIIf8H16s")  # struct acct_v3, linux/acct.h
AHZ = 100

START = f"""set -e
{{ head -1 /proc/stat; cat /proc/sys/kernel/random/boot_id; }} > {PACCT}.stat
rm -f {PACCT}; install -m 600 /dev/null {PACCT}
python3 -c 'import ctypes,sys; l=ctypes.CDLL(None, use_errno=True)
sys.exit(l.acct(b"{PACCT}") and ctypes.get_errno())'
"""
REPORT = f"""set -e
python3 -c 'import ctypes; ctypes.CDLL(None).acct(None)'
head -1 /proc/stat; cat {PACCT}.stat /proc/sys/kernel/random/boot_id; echo ==
base64 -w0 {PACCT}
"""


def comp_t(value: int) -> int:
    """The kernel's 13-bit mantissa, 3-bit base-8 exponent encoding."""
    return (value & 0x1FFF) << (3 * (value >> 13))


def records(raw: bytes):
    for off in range(0, len(raw) - RECORD.size + 1, RECORD.size):
        f = RECORD.unpack_from(raw, off)
        if f[1] != 3:
            raise SystemExit(f"record {off // RECORD.size}: version {f[1]}, not 3")
        yield {
            "pid": f[6], "ppid": f[7], "etime": f[9] / AHZ,
            "cpu": (comp_t(f[10]) + comp_t(f[11])) / AHZ,
            "comm": f[18].rstrip(b"\0").decode(errors="replace"),
        }  # fmt: skip


def ssh(target: dict, script: str) -> str:
    """Runs `script` as root on the VM `target` (a dict from sandbox.target()), on stdin."""
    argv = sb.build_ssh_argv(target["port"], target["key_filename"], target["known_hosts"],
                             "sudo -n sh -s")
    done = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-300:]}")
    return done.stdout


def start(target: dict) -> None:
    ssh(target, START)


def cpu_seconds(stat_line: str) -> tuple[float, float]:
    """(busy, total) seconds from /proc/stat's first line (USER_HZ 100)."""
    ticks = [int(x) for x in stat_line.split()[1:]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks[:8]) - idle) / 100, sum(ticks[:8]) / 100


def summarize(recs: list[dict], busy: float, top: int) -> list[str]:
    """The table: CPU seconds per command, with the parents that spent most on it."""
    by_pid = {r["pid"]: r for r in recs}
    per_comm, count = collections.Counter(), collections.Counter()
    per_parent = collections.defaultdict(collections.Counter)
    for r in recs:
        per_comm[r["comm"]] += r["cpu"]
        count[r["comm"]] += 1
        parent = by_pid.get(r["ppid"], {}).get("comm", f"(running {r['ppid']})")
        per_parent[r["comm"]][parent] += r["cpu"]
    total = sum(per_comm.values())
    lines = [f"exited processes {len(recs)}, their CPU {total:.0f} s "
             f"({100 * total / max(busy, 1e-9):.0f}% of the guest's busy time)",
             f"{'command':<16} {'count':>6} {'CPU-s':>8} {'%busy':>6}  top parents"]
    for comm, cpu in per_comm.most_common(top):
        parents = ", ".join(f"{p} {c:.0f}" for p, c in per_parent[comm].most_common(3))
        lines.append(f"{comm:<16} {count[comm]:>6} {cpu:>8.1f} "
                     f"{100 * cpu / max(busy, 1e-9):>6.1f}  {parents}")
    return lines


def report(target: dict, top: int) -> str:
    """Stops the accounting and returns the table (accounting started by `start`)."""
    head, _, blob = ssh(target, REPORT).partition("==\n")
    now, then, boot_then, boot_now = head.splitlines()[:4]
    recs = list(records(base64.b64decode(blob)))
    if boot_now != boot_then:  # /proc/stat restarted; the records end at the reboot
        cpu = sum(r["cpu"] for r in recs)
        return "\n".join(["the VM rebooted: records up to the reboot, shares of their sum",
                          *summarize(recs, cpu, top)])
    busy = cpu_seconds(now)[0] - cpu_seconds(then)[0]
    wall = (cpu_seconds(now)[1] - cpu_seconds(then)[1]) / 2  # two vCPUs
    lines = summarize(recs, busy, top)
    return "\n".join([f"guest busy {busy:.0f} CPU-s over ~{wall:.0f} s", *lines])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["start", "report"])
    ap.add_argument("--vm", default="e2e-bookworm")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    try:
        target = sb.target(args.vm)
        if args.action == "start":
            start(target)
            print(f"accounting on in {args.vm}")
        else:
            print(report(target, args.top))
    except RuntimeError as exc:
        raise SystemExit(f"guest_cpu: {args.vm}: {exc}") from None


if __name__ == "__main__":
    main()
