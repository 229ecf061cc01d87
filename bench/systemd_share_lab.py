"""The measuring side of bench/systemd_share.py (see its docstring for what each figure is
and how it is taken): a Debian 12 root filesystem with systemd, made by mmdebstrap and
cached, booted natively in a Podman container with systemd as its PID 1, and the four
measurements driven inside it."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.systemd_share import TIME_LINE, count_entries, per_event, podman_event_entry, summarise
from bench.watch_cost_lab import ULIMITS, CannotRun, group_of, hugetlb_v1

PREFIX = f"ngss{os.getpid()}"
RECIPE_VERSION = 1
# What the VM's systemd side runs: PID 1, journald, D-Bus and logind (a GCE Debian 12 VM
# has all four); python3 for the pinging service, bsdutils for logger --journald.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3-minimal", "bsdutils", "util-linux")
DAEMONS = ("systemd", "systemd-journal", "dbus-daemon", "systemd-logind")  # comm names
TRUE = "/bin/true"
# Masked (/dev/null over the unit file): nothing of the host's to touch from the container,
# not its sysctls nor a console's getty.
MASKED = ("systemd-sysctl.service", "getty@.service", "serial-getty@.service",
          "console-getty.service")

# A Podman health check's unit, as Podman 4.3 creates it (libpod/healthcheck_linux.go):
# a transient timer and service from systemd-run, --on-unit-inactive=<interval>, the
# timer's AccuracySec=1s; here the interval and accuracy short to fire often, and the
# service /bin/true (the check's own CPU is bench/watch_cost.py's).
CHECK_UNIT = "ngss-check"
# nightguard-watch.timer and .service as the deploy writes them (tasks.deploy.commands:
# watcher_timer, watcher_service), the interval short and the pass /bin/true.
WATCH_UNIT = "ngss-watch"
WATCH_SERVICE = """[Unit]
Description=stand-in for nightguard-watch.service
StartLimitIntervalSec=0
[Service]
Type=oneshot
ExecStart=/bin/true
TimeoutStartSec=120
Nice=10
"""
WATCH_TIMER = """[Unit]
Description=stand-in for nightguard-watch.timer
[Timer]
OnActiveSec=100ms
OnUnitActiveSec={every}
AccuracySec=1ms
Unit=ngss-watch.service
"""
# A service that says READY=1, then WATCHDOG=1 every PERIOD seconds, counting them in
# /run/ngss-pings (read from the host through /proc/PID/root); paused by SIGSTOP.
PINGER = r"""
import os, socket, sys, time
addr = os.environ["NOTIFY_SOCKET"]
addr = "\0" + addr[1:] if addr.startswith("@") else addr
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.connect(addr)
sock.send(b"READY=1")
fd = os.open("/run/ngss-pings", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
period, count, due = float(sys.argv[1]), 0, time.monotonic()
while True:
    sock.send(b"WATCHDOG=1")
    count += 1
    os.pwrite(fd, b"%12d\n" % count, 0)
    due = max(due + period, time.monotonic())
    time.sleep(max(0.0, due - time.monotonic()))
"""
PING_UNIT = "ngss-pinger"
PING_SERVICE = """[Unit]
Description=WATCHDOG=1 every {period} s (the container unit's conmon stands in)
[Service]
Type=notify
NotifyAccess=all
WatchdogSec=30
ExecStart=/usr/bin/python3 -I -S /usr/local/lib/ngss-pinger.py {period}
"""
# The watcher's one systemd call a pass (tasks.hostside.host_facts.unit_status), asked of
# an active unit of the same kind (Type=notify with a watchdog), loaded as the agent's is.
SHOW = ("systemctl show -p ActiveState,NRestarts,ExecMainStatus,ExecMainCode,Result,"
        "ActiveEnterTimestamp systemd-journald.service")
UNIT_SUCCESS = "7ad2d189f7e94e70a38c781354912448"  # "<unit>: Deactivated successfully."


def run(argv, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if done.returncode != 0:
        raise CannotRun(f"`{' '.join(argv[:5])}` failed: "
                        f"{(done.stderr or done.stdout).strip()[-400:]}")
    return done


# -- the root filesystem -------------------------------------------------------------------------
def recipe() -> dict:
    from tasks.sandbox.image import DPKG_EXCLUDES, mirror

    return {"version": RECIPE_VERSION, "suite": "bookworm", "packages": list(PACKAGES),
            "excludes": list(DPKG_EXCLUDES), "mirror": mirror()}


def rootfs_tar(log=None) -> Path:
    """The cached tar (~/.cache/nightguard-deploy/systemd-share/<recipe>/rootfs.tar), made
    by mmdebstrap the first time (a minute or two, from Debian's mirror)."""
    from tasks.sandbox.image import cache_dir, mmdebstrap_argv, recipe_key

    spec = recipe()
    folder = cache_dir() / "systemd-share" / recipe_key(spec)
    tar = folder / "rootfs.tar"
    if tar.is_file():
        return tar
    if not shutil.which("mmdebstrap"):
        raise CannotRun("no cached root filesystem and no mmdebstrap to make one")
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".rootfs-{os.getpid()}.tar"
    hooks = ['rm -f "$1/etc/machine-id"', 'touch "$1/etc/machine-id"']
    argv = mmdebstrap_argv(spec["suite"], spec["packages"], str(partial), spec["mirror"],
                           tuple(spec["excludes"]), hooks)
    print(f"systemd_share: building the root filesystem ({tar})", file=log, flush=True)
    with open(folder / "build.log", "w") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=1800)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise CannotRun(f"mmdebstrap failed (exit {done.returncode}); see {folder}/build.log")
    (folder / "recipe.json").write_text(json.dumps(spec, indent=1))
    os.rename(partial, tar)
    return tar


# -- CPU of the container's daemons ----------------------------------------------------------------
def schedstat(pid: int) -> float:
    """CPU seconds of a process, all its threads, from /proc/PID/task/*/schedstat (ns)."""
    ns = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with contextlib.suppress(OSError):
            ns += int(Path(path).read_text().split()[0])
    return ns / 1e9


def same_namespace(pid: int) -> list[tuple[int, str]]:
    """(host pid, comm) of every process in `pid`'s PID namespace."""
    ns = os.readlink(f"/proc/{pid}/ns/pid")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                found.append((int(entry), Path(f"/proc/{entry}/comm").read_text().strip()))
    return found


class Box:
    """The container with systemd as PID 1; close() removes it and its image."""

    def __init__(self, tar: Path):
        self.tar = tar
        self.name = f"{PREFIX}-systemd"
        self.image = f"localhost/{PREFIX}:bench"
        self.made: list[list[str]] = []
        self.failed_units = ""

    def start(self, journal: Path, boot_timeout: float = 120):
        run(["podman", "import", str(self.tar), self.image], timeout=600)
        self.made.append(["rmi", "--force", self.image])
        self.made.insert(0, ["rm", "--force", "--ignore", "--time", "5", self.name])
        masks = [f"--volume=/dev/null:/etc/systemd/system/{unit}:ro" for unit in MASKED]
        # the journal on disk, as the VM's (Podman's --systemd would put a tmpfs there)
        run(["podman", "run", "--detach", "--name", self.name, "--systemd=always",
             "--network", "none", *masks, f"--volume={journal}:/var/log/journal", *ULIMITS,
             self.image, "/lib/systemd/systemd"], timeout=120)
        self.pid = int(run(["podman", "inspect", "-f", "{{.State.Pid}}", self.name]).stdout)
        self.root = Path(f"/proc/{self.pid}/root")
        self.group = group_of(self.pid)
        deadline = time.monotonic() + boot_timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.sh("systemctl is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(1)
        else:
            raise CannotRun(f"systemd in the container did not finish booting ({state!r})")
        if state == "degraded":
            self.failed_units = self.sh("systemctl --failed --plain --no-legend",
                                        check=False).stdout.strip()
        self.version = self.sh("systemctl --version").stdout.splitlines()[0]

    def sh(self, script: str, check: bool = True, timeout: float = 300):
        argv = ["podman", "exec", self.name, "/bin/sh", "-c", script]
        if check:
            return run(argv, timeout=timeout)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def write(self, path: str, text: str):
        """A file in the container, written through /proc/PID/root."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def daemons(self) -> dict[str, int]:
        """{comm: host pid} of systemd's processes in the container (PID 1 first)."""
        found = {"systemd": self.pid}
        for pid, comm in same_namespace(self.pid):
            if comm in DAEMONS and comm not in found:
                found[comm] = pid
        return found

    def snapshot(self, daemons: dict[str, int]) -> dict:
        cpu = {name: schedstat(pid) for name, pid in daemons.items()}
        cpu["container"] = self.group.seconds()
        return {"cpu": cpu, "t": time.monotonic(), "wall": time.time()}

    def close(self):
        for argv in self.made:
            subprocess.run(["podman", *argv], capture_output=True, timeout=120)


# -- the measurements ------------------------------------------------------------------------------
SETTLE = 2.0  # seconds after each podman exec before a window opens


def window(box: Box, seconds: float) -> tuple[dict, float, tuple[float, float]]:
    """CPU deltas of the daemons and the container over `seconds` of whatever is going on:
    ({component: s}, wall seconds, (wall clock start, end))."""
    daemons = box.daemons()
    before = box.snapshot(daemons)
    time.sleep(seconds)
    after = box.snapshot(daemons)
    return delta(before, after), after["t"] - before["t"], (before["wall"], after["wall"])


def delta(before: dict, after: dict) -> dict:
    return {k: after["cpu"][k] - before["cpu"][k] for k in after["cpu"] if k in before["cpu"]}


def counted(box: Box, unit: str, span: tuple[float, float]) -> int:
    """How many times `unit` finished successfully within the wall-clock span, from the
    journal lines systemd wrote (read after the window has closed)."""
    out = box.sh(f"journalctl -q -o json --output-fields=MESSAGE_ID --since=@{int(span[0]) - 2}"
                 f" MESSAGE_ID={UNIT_SUCCESS} UNIT={unit}", check=False).stdout
    return count_entries(out.splitlines(), *span)


def measure_timer(box: Box, rounds: int, seconds: float, every: float, start: str, stop: str,
                  unit: str) -> list[dict]:
    """Per round: an idle window, then the timer firing for one of the same length."""
    samples = []
    for _ in range(rounds):
        idle, idle_wall, _ = window(box, seconds)
        box.sh(start)
        time.sleep(SETTLE)
        busy, busy_wall, span = window(box, seconds)
        box.sh(stop)
        events = counted(box, unit, span)
        time.sleep(SETTLE)
        samples.append(per_event(busy, busy_wall, idle, idle_wall, events))
    return samples


def measure_check(box: Box, rounds: int, seconds: float, every: float) -> list[dict]:
    start = (f"systemd-run --quiet --unit={CHECK_UNIT} --on-unit-inactive={every * 1000:.0f}ms"
             f" --timer-property=AccuracySec=1ms -p StartLimitIntervalSec=0 {TRUE}"
             f" && systemctl start {CHECK_UNIT}.service")
    # the timer gone, a transient service between two runs is gone too (nothing to stop)
    stop = (f"systemctl stop {CHECK_UNIT}.timer; "
            f"systemctl stop {CHECK_UNIT}.service 2>/dev/null; true")
    return measure_timer(box, rounds, seconds, every, start, stop, f"{CHECK_UNIT}.service")


def measure_watch(box: Box, rounds: int, seconds: float, every: float) -> list[dict]:
    box.write(f"/etc/systemd/system/{WATCH_UNIT}.service", WATCH_SERVICE)
    box.write(f"/etc/systemd/system/{WATCH_UNIT}.timer",
              WATCH_TIMER.format(every=f"{every * 1000:.0f}ms"))
    box.sh("systemctl daemon-reload")
    time.sleep(SETTLE)
    return measure_timer(box, rounds, seconds, every, f"systemctl start {WATCH_UNIT}.timer",
                         f"systemctl stop {WATCH_UNIT}.timer", f"{WATCH_UNIT}.service")


def measure_driven(box: Box, rounds: int, n: int, command: str) -> list[dict]:
    """Per round: `command` n times in a shell loop in the container (its own processes are
    not counted: only the daemons'), then an idle window of the same length."""
    loop = f"i=0; while [ $i -lt {n} ]; do {command} >/dev/null; i=$((i+1)); done"
    samples = []
    for _ in range(rounds):
        daemons = box.daemons()
        before = box.snapshot(daemons)
        box.sh(loop, timeout=600)
        after = box.snapshot(daemons)
        busy_wall = after["t"] - before["t"]
        time.sleep(SETTLE)
        idle, idle_wall, _ = window(box, busy_wall)
        samples.append(per_event(delta(before, after), busy_wall, idle, idle_wall, n))
    return samples


def measure_journal(box: Box, rounds: int, n: int) -> list[dict]:
    box.write("/run/ngss-entry", podman_event_entry())
    return measure_driven(box, rounds, n, "{ cat /run/ngss-entry; printf "
                          f"'{TIME_LINE}\\n' $i; }} | logger --journald")


def measure_show(box: Box, rounds: int, n: int) -> list[dict]:
    return measure_driven(box, rounds, n, SHOW)


def measure_pings(box: Box, rounds: int, seconds: float, period: float) -> list[dict]:
    """The pinging service started once; per round an idle window (it stopped by SIGSTOP),
    then one of the same length with it pinging; its own CPU is not counted."""
    box.write("/usr/local/lib/ngss-pinger.py", PINGER)
    box.write(f"/etc/systemd/system/{PING_UNIT}.service", PING_SERVICE.format(period=period))
    box.sh(f"systemctl daemon-reload && systemctl start {PING_UNIT}.service")
    pinger = next((pid for pid, comm in same_namespace(box.pid) if comm == "python3"
                   and b"ngss-pinger" in Path(f"/proc/{pid}/cmdline").read_bytes()), None)
    if pinger is None:
        raise CannotRun("the pinging service did not start")
    counter = box.root / "run/ngss-pings"
    samples = []
    try:
        for _ in range(rounds):
            os.kill(pinger, 19)  # SIGSTOP
            time.sleep(SETTLE)
            idle, idle_wall, _ = window(box, seconds)
            p0 = int(counter.read_text())
            os.kill(pinger, 18)  # SIGCONT
            busy, busy_wall, _ = window(box, seconds)
            pings = int(counter.read_text()) - p0
            samples.append(per_event(busy, busy_wall, idle, idle_wall, pings))
    finally:
        with contextlib.suppress(OSError):
            os.kill(pinger, 18)
        box.sh(f"systemctl stop {PING_UNIT}.service", check=False)
    return samples


def measure_true(n: int) -> list[float]:
    """CPU seconds of one /bin/true (fork, exec, run, exit): wait4() rusage, on the host."""
    found = []
    for _ in range(n):
        pid = os.posix_spawn(TRUE, [TRUE], {})
        _, _, usage = os.wait4(pid, 0)
        found.append(usage.ru_utime + usage.ru_stime)
    return found


def describe(box: Box) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    layout = box.sh("stat -fc %T /sys/fs/cgroup; stat -fc %T /sys/fs/cgroup/unified "
                    "2>/dev/null || true", check=False).stdout.split()
    journal = box.sh("stat -fc %T /var/log/journal", check=False).stdout.strip()
    podman = run(["podman", "--version"]).stdout.strip()
    return (f"{cpu}, {os.cpu_count()} CPUs, kernel {platform.release()}; {podman}; in the "
            f"container {box.version}, /sys/fs/cgroup {'+'.join(layout)}, the journal on "
            f"{journal or '?'}; load average {Path('/proc/loadavg').read_text().split()[0]}")


def measure_all(args) -> tuple[dict, list[str]]:
    if os.geteuid() != 0:
        raise CannotRun("needs root (rootful Podman; cgroup and /proc reads)")
    missing = [t for t in ("podman", "crun", "conmon") if not shutil.which(t)]
    if missing:
        raise CannotRun(f"not installed: {', '.join(missing)}")
    tar = rootfs_tar()
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}-", dir="/var/tmp") as tmp, \
            hugetlb_v1():
        box = Box(tar)
        try:
            box.start(Path(tmp))
            time.sleep(args.settle)  # boot's own work (units, journal) over
            machine = describe(box)
            found = {
                "check": measure_check(box, args.rounds, args.window, args.every),
                "check_slow": measure_check(box, args.rounds, args.window, args.slow_every),
                "watch": measure_watch(box, args.rounds, args.window, args.every),
                "watch_slow": measure_watch(box, args.rounds, args.window, args.slow_every),
                "journal": measure_journal(box, args.rounds, args.lines),
                "show": measure_show(box, args.rounds, args.shows),
                # windows under WatchdogSec=30 with the idle one's settling: no kill
                "ping": measure_pings(box, args.rounds, min(args.window, 25 - SETTLE),
                                      args.period),
                "ping_slow": measure_pings(box, args.rounds, min(args.window, 25 - SETTLE),
                                           args.slow_period),
            }
            daemons = sorted(box.daemons())
        finally:
            box.close()
    true_s = measure_true(200)
    found = summarise(found, true_s)
    header = [f"Natively on {machine}.",
              f"Root filesystem: {tar} (Debian 12, mmdebstrap: {', '.join(PACKAGES)}), "
              "podman import, run --systemd=always --network none with /lib/systemd/systemd "
              "as PID 1, /var/log/journal a folder of the host's /var/tmp. Daemons counted: "
              f"{', '.join(daemons)}.",
              f"Rounds: {args.rounds}; timer windows of {args.window:g} s firing every "
              f"{args.every:g} s, then every {args.slow_every:g} s; {args.lines} journal "
              f"entries and {args.shows} `systemctl show` a round; WATCHDOG=1 every "
              f"{args.period:g} s, then every "
              f"{args.slow_period:g} s (windows of at most {25 - SETTLE:g} s).",
              f"Units failed at boot: {box.failed_units or 'none'}; load average at the "
              f"end {Path('/proc/loadavg').read_text().split()[0]}."]
    return found, header
