"""The measuring side of bench/watch_cost.py (see its docstring for what each figure is and
how it is taken): a Night Guard container run natively with Podman as the unit runs it, a
notify socket standing in for systemd's, and the three measurements (checks, watcher
passes, the supervisor's pings at rest) plus the supervisors' memory."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import glob
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench.watch_cost import ROOT, stats

PREFIX = f"ngwc{os.getpid()}"
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
CGROUP = Path("/sys/fs/cgroup")
HUGETLB = CGROUP / "hugetlb"
PR_SET_CHILD_SUBREAPER = 36
TICK = os.sysconf("SC_CLK_TCK")


class CannotRun(Exception):
    """Podman cannot run the container here; the message says why."""


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise CannotRun(f"`{' '.join(argv[:4])}` failed: {(done.stderr or done.stdout)[-400:]}")
    return done


# -- CPU readers -------------------------------------------------------------------------------
class CpuGroup:
    """A cgroup's CPU time in seconds: v1 cpuacct.usage (ns) or v2 cpu.stat usage_usec."""

    def __init__(self, path: Path):
        self.path = path
        self.v1 = (path / "cpuacct.usage").exists()

    def seconds(self) -> float:
        if self.v1:
            return int((self.path / "cpuacct.usage").read_text()) / 1e9
        for line in (self.path / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6
        raise CannotRun(f"no usage_usec in {self.path}/cpu.stat")

    def procs(self) -> list[str]:
        return (self.path / "cgroup.procs").read_text().split()


def cpu_root() -> Path:
    """Where CPU is accounted: the v1 cpuacct hierarchy (hybrid), else the v2 one."""
    return CGROUP / "cpuacct" if (CGROUP / "cpuacct").is_dir() else CGROUP


def group_of(pid: int) -> CpuGroup:
    root = cpu_root()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if ("cpuacct" in controllers.split(",")) == (root.name == "cpuacct"):
            return CpuGroup(root / path.lstrip("/"))
    raise CannotRun(f"no CPU cgroup for pid {pid}")


def task_cpu(pid: int) -> tuple[float, float]:
    """(schedstat seconds, /proc/PID/stat seconds) of a process, all its threads."""
    ns = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with contextlib.suppress(OSError):
            ns += int(Path(path).read_text().split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return ns / 1e9, (int(fields[11]) + int(fields[12])) / TICK


def memory_kib(pid: int) -> dict:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found["rss_kib" if key == "VmRSS" else "hwm_kib"] = int(value.split()[0])
    return found


# -- the notify socket -------------------------------------------------------------------------
class NotifySocket:
    """A datagram socket standing in for systemd's: it records every message."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.5)
        self.messages: list[tuple[float, str]] = []
        self.closed = False
        self.thread = threading.Thread(target=self.listen, daemon=True)
        self.thread.start()

    def listen(self):
        while not self.closed:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            self.messages.append((time.monotonic(), data.decode(errors="replace")))

    def count(self, text: str) -> int:
        return sum(1 for _, m in list(self.messages) if text in m.split("\n"))

    def close(self):
        self.closed = True
        self.thread.join(2)
        self.sock.close()


# -- the container -----------------------------------------------------------------------------
def preflight() -> Path | None:
    """The base tar (None when --base names an image); CannotRun when nothing can work."""
    missing = [t for t in ("podman", "crun", "conmon") if not shutil.which(t)]
    if missing:
        raise CannotRun(f"not installed: {', '.join(missing)}")
    if os.geteuid() != 0:
        raise CannotRun("needs root (rootful Podman, as the unit runs it, and cgroup writes)")
    tars = sorted(glob.glob(os.path.expanduser("~/.cache/nightguard-deploy/base/*/base.tar")),
                  key=os.path.getmtime)
    return Path(tars[-1]) if tars else None


@contextlib.contextmanager
def hugetlb_v1():
    """crun refuses a hybrid cgroup layout whose hugetlb is only in v2: a v1 hierarchy for
    it while the bench runs (../shared/notes/watch-cost-native.md); not needed on a VM."""
    hybrid = (CGROUP / "cpuacct").is_dir() and (CGROUP / "unified").is_dir()
    mounted = created = False
    if hybrid and not os.path.ismount(HUGETLB):
        created = not HUGETLB.exists()
        with contextlib.suppress(OSError):
            HUGETLB.mkdir(exist_ok=True)
        mounted = subprocess.run(["mount", "-t", "cgroup", "-o", "hugetlb", "none",
                                  str(HUGETLB)], capture_output=True).returncode == 0
    try:
        yield
    finally:
        if mounted:
            subprocess.run(["umount", str(HUGETLB)], capture_output=True)
        if created:
            with contextlib.suppress(OSError):
                HUGETLB.rmdir()


def container_spec(app: Path, data: Path, markers: Path, image: str):
    """The deploy's own spec (desired_state on the default settings), moved to the bench's
    names and files; no health interval (no systemd here: checks are run by hand)."""
    from tasks.config import load_settings
    from tasks.deploy.plan import desired_state

    settings = load_settings(root=ROOT, environ={},
                             overrides={"target": "ssh", "ssh.host": "203.0.113.7"})
    spec = desired_state(settings, {}, {"bench.py": "0" * 64}, podman="4.3.1",
                         base_id="sha256:" + "0" * 64).spec
    secrets = tuple(f"{PREFIX}_{name}" for name in spec.secrets)
    env = tuple((k, ",".join(secrets) if k == "NG_REQUIRED_SECRETS" else v)
                for k, v in spec.environment)
    return settings, dataclasses.replace(
        spec, name=f"{PREFIX}-agent", image=image, app_dir=str(app), data_dir=str(data),
        markers_file=str(markers), secrets=secrets, environment=env,
        health_interval="disable")


class Lab:
    """The container, its image, secrets and files; close() removes all of it."""

    def __init__(self, tmp: Path, base_tar: Path | None, base_image: str | None):
        self.tmp, self.base_tar, self.base = tmp, base_tar, base_image
        self.image = f"localhost/{PREFIX}:bench"
        self.made: list[list[str]] = []  # podman commands that undo what was made
        self.notify = None

    def build(self):
        if self.base is None:
            if self.base_tar is None:
                raise CannotRun("no base image: no ~/.cache/nightguard-deploy/base/*/base.tar "
                                "(or name one in storage with --base)")
            self.base = f"localhost/{PREFIX}-base:bench"
            run(["podman", "import", str(self.base_tar), self.base], timeout=600)
            self.made.append(["rmi", "--force", self.base])
        from tasks.deploy.commands import image_build

        run(image_build(self.image, str(ROOT / "deployment/Dockerfile.nightguard"),
                        str(ROOT / "deployment"), self.base, needs_network=False), timeout=600)
        self.made.insert(0, ["rmi", "--force", self.image])

    def files(self):
        app = self.tmp / "app"
        (app / "execution/system").mkdir(parents=True)
        for name in ("directives", "knowledge"):
            (app / name).mkdir()
        for path in (ROOT / "execution/system").glob("*.py"):
            shutil.copy(path, app / "execution/system" / path.name)
        (self.tmp / "data").mkdir()
        (self.tmp / "release.env").write_text("NG_RELEASE_VERSION=bench\n")
        return app, self.tmp / "data", self.tmp / "release.env"

    def start(self):
        from tasks.deploy.commands import run_args

        self.build()
        self.settings, self.spec = container_spec(*self.files(), self.image)
        for secret in self.spec.secrets:
            run(["podman", "secret", "create", secret, "-"], input="dummy-value\n")
            self.made.insert(0, ["secret", "rm", secret])
        self.notify = NotifySocket(self.tmp / "notify.sock")
        argv = ["podman", "run", "--cgroups=no-conmon", "--rm", "--sdnotify=container",
                "--replace", "--detach", *ULIMITS, *run_args(self.spec)]
        self.made.insert(0, ["rm", "--force", "--ignore", "--time", "0", self.spec.name])
        run(argv, env={**os.environ, "NOTIFY_SOCKET": self.notify.path}, timeout=120)
        pids = run(["podman", "inspect", "-f", "{{.State.Pid}} {{.State.ConmonPid}}",
                    self.spec.name]).stdout.split()
        self.pid, self.conmon = int(pids[0]), int(pids[1])
        self.group = group_of(self.pid)

    def close(self):
        for argv in self.made:
            subprocess.run(["podman", *argv], capture_output=True, timeout=120)
        if self.notify is not None:
            self.notify.close()


# -- the measurements --------------------------------------------------------------------------
def measure_pings(lab: Lab, windows: int, seconds: float) -> dict:
    """ng-supervise and conmon at rest, per window: CPU-s an hour and CPU per ping."""
    deadline = time.monotonic() + 30
    while lab.notify.count("WATCHDOG=1") < 1 and time.monotonic() < deadline:
        time.sleep(0.2)  # the first ping: the supervisor is in its steady state
    found = {k: [] for k in ("supervisor_h", "supervisor_ping", "conmon_h", "conmon_ping",
                             "agent_h", "supervisor_ticks_h", "container_rate")}
    perf = perf_start(lab.pid)
    first, start = task_cpu(lab.pid), time.monotonic()
    for _ in range(windows):
        s0, t0_ticks = task_cpu(lab.pid)
        c0, g0, p0, w0 = task_cpu(lab.conmon)[0], lab.group.seconds(), \
            lab.notify.count("WATCHDOG=1"), time.monotonic()
        time.sleep(seconds)
        s1, t1_ticks = task_cpu(lab.pid)
        c1, g1, p1, w1 = task_cpu(lab.conmon)[0], lab.group.seconds(), \
            lab.notify.count("WATCHDOG=1"), time.monotonic()
        wall, pings = w1 - w0, max(1, p1 - p0)
        found["supervisor_h"].append((s1 - s0) * 3600 / wall)
        found["supervisor_ticks_h"].append((t1_ticks - t0_ticks) * 3600 / wall)
        found["supervisor_ping"].append((s1 - s0) / pings)
        found["conmon_h"].append((c1 - c0) * 3600 / wall)
        found["conmon_ping"].append((c1 - c0) / pings)
        found["agent_h"].append(((g1 - g0) - (s1 - s0)) * 3600 / wall)
        found["container_rate"].append((g1 - g0) / wall)
    result = {k: stats(v) for k, v in found.items()}
    last, hours = task_cpu(lab.pid), (time.monotonic() - start) / 3600
    perf_s = perf_stop(perf)
    result["supervisor_whole"] = {"schedstat_h": (last[0] - first[0]) / hours,
                                  "ticks_h": (last[1] - first[1]) / hours,
                                  "perf_h": None if perf_s is None else perf_s / hours}
    result["pings_per_window"] = (lab.notify.count("WATCHDOG=1"), windows, seconds)
    return result


def perf_start(pid: int):
    """`perf stat -e task-clock` attached to `pid` (None without perf)."""
    if not shutil.which("perf"):
        return None
    return subprocess.Popen(["perf", "stat", "-x,", "-e", "task-clock", "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def perf_stop(proc) -> float | None:
    """The task-clock perf counted, in seconds (None when it could not)."""
    if proc is None:
        return None
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2] == "task-clock" and fields[1] == "msec":
            with contextlib.suppress(ValueError):
                return float(fields[0]) / 1000
    return None


def own_group() -> CpuGroup:
    path = cpu_root() / f"{PREFIX}-check"
    path.mkdir(exist_ok=True)
    return CpuGroup(path)


def one_check(lab: Lab, group: CpuGroup, rest_rate: float) -> dict:
    """One `podman healthcheck run` in `group`; its orphans reaped (the bench is a
    subreaper) and the group empty before the counters are read again."""
    procs = str(group.path / "cgroup.procs")

    def join():
        with open(procs, "w") as fh:
            fh.write(str(os.getpid()))

    g0, c0, t0 = group.seconds(), lab.group.seconds(), time.monotonic()
    proc = subprocess.Popen(["podman", "healthcheck", "run", lab.spec.name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=join)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"`podman healthcheck run` exited {proc.returncode}: not healthy")
    orphans = 0.0
    deadline = time.monotonic() + 10
    while group.procs() and time.monotonic() < deadline:
        orphans += reap()
        time.sleep(0.01)
    orphans += reap()
    wall = time.monotonic() - t0
    client = usage.ru_utime + usage.ru_stime
    host = group.seconds() - g0
    inside = lab.group.seconds() - c0 - rest_rate * wall
    return {"client": client, "conmon": host - client, "container": inside,
            "total": host + inside, "rusage_sum": client + orphans}


def reap() -> float:
    """CPU seconds of the orphans that ended (the bench is their subreaper)."""
    total = 0.0
    while True:
        try:
            pid, _, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return total
        if pid == 0:
            return total
        total += usage.ru_utime + usage.ru_stime


def measure_checks(lab: Lab, n: int, rest_rate: float) -> dict:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    group = own_group()
    try:
        one_check(lab, group, rest_rate)  # warm-up: the page cache, Podman's own caches
        samples = [one_check(lab, group, rest_rate) for _ in range(n)]
    finally:
        reap()
        with contextlib.suppress(OSError):
            group.path.rmdir()
    return {k: stats(s[k] for s in samples) for k in samples[0]}


FAKE_SYSTEMCTL = """#!/bin/sh
/usr/bin/systemctl --version >/dev/null 2>&1
printf 'ActiveState=active\\nNRestarts=0\\nExecMainStatus=0\\nExecMainCode=0\\n'
printf 'Result=success\\nActiveEnterTimestamp=%s\\n' "$(date '+%a %Y-%m-%d %H:%M:%S %Z')"
"""


def watcher_setup(lab: Lab) -> tuple[list[str], dict]:
    """The watcher installed as the deploy installs it, in the bench's folder."""
    from tasks.deploy.commands import unit_name, watcher_code
    from tasks.deploy.plan import watcher_config
    from tasks.hostside.bundle import watcher_program

    folder, tools = lab.tmp / "watch", lab.tmp / "bin"
    folder.mkdir()
    tools.mkdir()
    (folder / "watcher.py").write_bytes(watcher_program())
    (tools / "systemctl").write_text(FAKE_SYSTEMCTL)
    (tools / "systemctl").chmod(0o755)
    args = {"config": watcher_config(lab.settings), "unit": unit_name(lab.spec.name),
            "container": lab.spec.name, "rootless": False,
            "paths": {"state": str(folder), "alerts_state": str(folder / "alerts-state.json")}}
    (folder / "alerts.json").write_text(json.dumps(args))
    argv = ["/usr/bin/python3", "-I", "-S", "-c", watcher_code(str(folder)),
            str(folder / "alerts.json")]
    return argv, {"PATH": f"{tools}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def timed(argv, env) -> tuple[float, str]:
    """(CPU seconds of the process tree, its first line of output)."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"`{argv[0]} ...` exited {proc.returncode}: {out[-300:]}")
    return usage.ru_utime + usage.ru_stime, (out.splitlines() or [""])[0]


def measure_passes(lab: Lab, n: int) -> dict:
    argv, env = watcher_setup(lab)
    _, line = timed(argv, env)  # warm-up: writes the bytecode, as the first pass does
    passes = [timed(argv, env) for _ in range(n)]
    floor = [timed(["/usr/bin/python3", "-I", "-S", "-c", "pass"], env)[0] for _ in range(n)]
    return {"pass": stats(p[0] for p in passes), "floor": stats(floor),
            "lines": sorted({line, *(p[1] for p in passes)})}


def old_supervisor(tmp: Path) -> Path | None:
    """deployment/ng-supervise as it was before it became Python (from git), or None."""
    log = subprocess.run(["git", "-C", str(ROOT), "log", "--format=%H", "--",
                          "deployment/ng-supervise"], capture_output=True, text=True)
    for commit in log.stdout.split():
        show = subprocess.run(["git", "-C", str(ROOT), "show",
                               f"{commit}:deployment/ng-supervise"],
                              capture_output=True, text=True)
        if show.returncode == 0 and show.stdout.startswith("#!/bin/sh"):
            (tmp / "ng-supervise.sh").write_text(show.stdout)
            return tmp / "ng-supervise.sh"
    return None


def native_rss(argv: list[str], env: dict, heartbeat: Path) -> dict:
    """A supervisor's memory after 3 s, `sleep` as its agent, the heartbeat fresh."""
    proc = subprocess.Popen([*argv, "sleep", "30"], env=env, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        heartbeat.write_text("{}\n")  # its first beat: READY=1, then pings
        time.sleep(2.5)
        return memory_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def measure_memory(lab: Lab) -> dict:
    found = {"ng-supervise (Python) in the container": memory_kib(lab.pid)}
    heartbeat = lab.tmp / "native-heartbeat"
    scratch = NotifySocket(lab.tmp / "native-notify.sock")
    try:
        env = {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": scratch.path, "NG_WATCHDOG_SEC": "10",
               "NG_HEARTBEAT_FILE": str(heartbeat)}
        found["ng-supervise (Python), natively"] = native_rss(
            ["/usr/bin/python3", "-I", "-S", str(ROOT / "deployment/ng-supervise")], env,
            heartbeat)
        old = old_supervisor(lab.tmp)
        if old is not None:
            found["old ng-supervise (sh: dash), natively"] = native_rss(
                ["/bin/sh", str(old)], env, heartbeat)
    finally:
        scratch.close()
    return found


def versions() -> str:
    def first(argv):
        done = subprocess.run(argv, capture_output=True, text=True)
        return (done.stdout or done.stderr).strip().splitlines()[0] if done.stdout else "?"

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return (f"{cpu}, {os.cpu_count()} CPUs, kernel {platform.release()}; "
            f"{first(['podman', '--version'])}, {first(['crun', '--version'])}, "
            f"{first(['conmon', '--version'])}; PID 1 is "
            f"{Path('/proc/1/comm').read_text().strip()}; load average "
            f"{Path('/proc/loadavg').read_text().split()[0]} at the start")


def measure_all(args) -> tuple[dict, list[str]]:
    base_tar = preflight()
    machine = versions()
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}-") as tmp, hugetlb_v1():
        os.chmod(tmp, 0o755)
        lab = Lab(Path(tmp), base_tar, args.base)
        try:
            lab.start()
            pings = measure_pings(lab, args.windows, args.window)
            rest_rate = pings["container_rate"]["median"]
            found = {"pings": pings, "check": measure_checks(lab, args.checks, rest_rate),
                     "pass": measure_passes(lab, args.passes), "memory": measure_memory(lab)}
        finally:
            lab.close()
    whole = pings["supervisor_whole"]
    perf = "-" if whole["perf_h"] is None else f"{whole['perf_h']:.3f}"
    header = [f"Natively on {machine}.",
              f"Image: deployment/Dockerfile.nightguard on "
              f"{args.base or base_tar}; run with "
              "the deploy's run_args, --sdnotify=container, --cgroups=no-conmon.",
              f"Checks: {args.checks} (+1 warm-up), watcher passes: {args.passes} (+1), "
              f"pings: {args.windows} windows of {args.window:g} s "
              f"({pings['pings_per_window'][0]} WATCHDOG=1 received in all).",
              "Check: its cgroup's CPU (client + conmon + crun) + the container's cgroup "
              "delta minus its rest rate; pass: wait4 rusage of `python3 -I -S -c` "
              "importing the watcher; pings: /proc/PID/task/*/schedstat of ng-supervise "
              "and conmon over each window, divided by the pings received.",
              "A ping's CPU is ng-supervise's whole wake-up (a Python process waking from "
              "sigtimedwait between checks with cold caches), not only its stat, read and "
              f"datagram. Cross-check over all windows: schedstat {whole['schedstat_h']:.3f}"
              f" CPU-s/h, `perf stat -e task-clock` {perf}, /proc/PID/stat ticks "
              f"{whole['ticks_h']:.3f} (10 ms steps: too coarse for a few ms a window).",
              f"Watcher pass said: {'; '.join(found['pass']['lines'])}",
              "Target (issue 24): at rest, natively, <= 1.8 CPU-s/h (0.2% of 900) with "
              "systemd's share counted."]
    return found, header
