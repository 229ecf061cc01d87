"""The unit tier's host: the real host helper (tasks/hostside, one bundle) as a local child
process, with its state dir, the app dir and Podman's storage in a temp folder, and the
stand-ins in ./standins for podman, systemctl, journalctl, apt-get, dpkg and the swap
tools.

    host = FakeHost(tmp_path, live_pid, dead_pid)  # the `fake_host` fixture (conftest.py)
    with host.helper() as helper:                  # one helper process, a changing session
        facts = helper.call("facts")
    host.calls("podman")                           # the argv of every podman call so far
    host.fail("secret-create", match="NAME")       # the next `secret create NAME` fails
    host.control("health", {"fail": True})         # the container's health check fails
    host.watch()                                   # one pass of the installed alert watcher
    remote = LocalRemote(host)                     # a Remote whose pipe is that helper

Safety: the tests run as root on CI, where the machine's own systemctl or swapon would
change the machine. The helper's PATH holds only the stand-in dir and a dir with python3
(for the stand-ins' shebang), and every path the helper knows (``default_paths``) points
into the temp folder; ``check_isolated`` refuses to start a test otherwise.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tasks.deploy import commands as cmd
from tasks.hostside.bundle import helper_program
from tasks.hostside.statedir import default_paths
from tasks.ssh.address import SshTarget
from tasks.ssh.hostlink import BOOTSTRAP, HostLink, helper_source, local_pipe
from tasks.ssh.remote import Remote

STANDINS = Path(__file__).resolve().with_name("standins")
TOOLS = {"podman": "podman.py", "systemctl": "systemctl.py", "journalctl": "journalctl.py",
         "apt-get": "apt_get.py", "dpkg": "dpkg.py", "dpkg-query": "apt_get.py",
         "fallocate": "swap.py", "dd": "swap.py", "mkswap": "swap.py",
         "swapon": "swap.py", "swapoff": "swap.py", "crun": "tool.py", "conmon": "tool.py",
         "netavark": "tool.py",
         "aardvark-dns": "tool.py", "iptables": "tool.py", "slirp4netns": "tool.py",
         "pasta": "tool.py", "loginctl": "loginctl.py"}
RUNS = ("podman", "systemctl", "journalctl", "apt-get", "dpkg", "dpkg-query", "fallocate", "dd",
        "mkswap", "swapon", "swapoff", "loginctl")
CONTAINER = "97layer-nightguard"
IMAGE = "localhost/nightguard"
UNIT = cmd.unit_name(CONTAINER)
OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n' \
             "VERSION_CODENAME=bookworm\n"


def kept_helper() -> Path:
    """The helper's bundle in a file named by its version, as a host keeps it: the
    bootstrap runs it from there instead of asking for it on every start."""
    path = Path(tempfile.gettempdir()) / f"nightguard-helper-{helper_source()[1]}.py"
    if not path.exists() or path.read_bytes() != helper_program():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(helper_program())
        tmp.replace(path)
    return path


HELPER_FILE = kept_helper()


class Isolation(Exception):
    """The helper could reach something of the real machine."""


class FakeHost:
    def __init__(self, root: Path, live_pid: int, dead_pid: int, *, podman: str = "4.9.3"):
        self.root = root = Path(root)
        self.bin = root / "bin"
        self.pybin = root / "pybin"
        self.owner = pwd.getpwuid(os.getuid()).pw_name
        self.app_dir = root / "home" / "app"
        self.data_dir = root / "home" / "data"
        state = root / "var/lib/nightguard"
        units = root / "etc/systemd/system"
        self.paths = {
            "state": state, "graphroot": root / "var/lib/containers/storage",
            "runroot": root / "run/containers/storage", "run": root / "run",
            "unit": units / UNIT, "unit_wants": units / "multi-user.target.wants" / UNIT,
            "markers": state / f"{CONTAINER}.release.env", "swapfile": root / "swapfile",
            "fstab": root / "etc/fstab", "proc_swaps": root / "proc/swaps",
            "sysctl_conf": root / "etc/sysctl.d/99-nightguard.conf",
            "swappiness": root / "proc/sys/vm/swappiness", "os_release": root / "etc/os-release",
            "systemd_run": root / "run/systemd/system", "apt_sources": root / "etc/apt",
            "linger_dir": root / "var/lib/systemd/linger",
            "cgroup_controllers": root / "sys/fs/cgroup/cgroup.controllers",
            "proc": root / "proc", "cgroup": root / "sys/fs/cgroup",
            "meminfo": root / "proc/meminfo", "disk": root,
            "watcher": state / "watcher.py", "alerts_args": state / "alerts.json",
            "alerts_state": state / "alerts-state.json",
            "watch_service": units / "nightguard-watch.service",
            "watch_timer": units / "nightguard-watch.timer",
            "watch_timer_wants": units / "timers.target.wants" / "nightguard-watch.timer",
            "watch_dropin": units / "container-97layer-nightguard.service.d"
                            / "nightguard-watch.conf",
            "tool_path": self.bin, "tool_root": root / "nothing",  # no real /usr/bin/podman
            "apt_locks": [root / "var/lib/dpkg/lock-frontend", root / "var/lib/dpkg/lock",
                          root / "var/lib/apt/lists/lock", root / "var/cache/apt/archives/lock"],
        }
        for key in ("graphroot", "runroot", "systemd_run", "apt_sources", "cgroup"):
            self.paths[key].mkdir(parents=True, exist_ok=True)
        for key in ("sysctl_conf", "swappiness", "unit"):
            self.paths[key].parent.mkdir(parents=True, exist_ok=True)
        for lock in self.paths["apt_locks"]:  # as on any Debian host: the files exist
            lock.parent.mkdir(parents=True, exist_ok=True)
            lock.write_text("")
        self.paths["os_release"].write_text(OS_RELEASE)
        self.paths["proc_swaps"].write_text("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")
        self.paths["swappiness"].write_text("60\n")
        self.paths["fstab"].write_text("# /etc/fstab\nUUID=1234 / ext4 defaults 0 1\n")
        self.paths["cgroup_controllers"].write_text("cpuset cpu io memory pids\n")
        self.meminfo()
        (self.paths["apt_sources"] / "sources.list").write_text("")
        archive = root / "var/lib/nightguard-sandbox/base.tar"  # the sandbox's preloaded base
        archive.parent.mkdir(parents=True)
        archive.write_bytes(b"a base image archive")
        self.bin.mkdir()
        for name, script in TOOLS.items():
            (self.bin / name).symlink_to(STANDINS / script)
        self.pybin.mkdir()  # the stand-ins' python3: without site-packages (faster)
        python = getattr(sys, "_base_executable", sys.executable)
        (self.pybin / "python3").write_text(f'#!/bin/sh\nexec {shlex.quote(python)} -S "$@"\n')
        (self.pybin / "python3").chmod(0o755)
        self.watch_argvs: list[list[str]] = []
        self.control_dir = root / "control"
        self.control_dir.mkdir()
        self.log = root / "calls.jsonl"
        self.log.write_text("")
        self.config = root / "standins.json"
        self.standin_config = {
            "graphroot": str(self.paths["graphroot"]), "runroot": str(self.paths["runroot"]),
            "proc": str(self.paths["proc"]), "cgroup": str(self.paths["cgroup"]),
            "run": str(self.paths["run"]), "unit_dir": str(units),
            "wants_dir": str(self.paths["unit_wants"].parent),
            "systemd_state": str(root / "systemd.json"),
            "proc_swaps": str(self.paths["proc_swaps"]), "swap_names": {},
            "linger_dir": str(self.paths["linger_dir"]),
            "path_map": {cmd.STATE_DIR: str(state),
                         "/var/lib/nightguard-sandbox": str(archive.parent)},
            "control": str(self.control_dir),
            "bin": str(self.bin), "live_pid": live_pid, "dead_pid": dead_pid,
            "version": podman}
        self.configure()

    def meminfo(self, *, swap_total_mb: int = 2048, swap_free_mb: int = 2048) -> None:
        """The host's /proc/meminfo as a 1 GB VM with its swapfile shows it."""
        self.paths["meminfo"].write_text(
            f"MemTotal:        1004584 kB\nMemFree:          123456 kB\n"
            f"MemAvailable:     512000 kB\nSwapTotal:       {swap_total_mb * 1024} kB\n"
            f"SwapFree:        {swap_free_mb * 1024} kB\n")

    def configure(self, **changes) -> None:
        """Change what the stand-ins are told (e.g. swap_names, version)."""
        self.standin_config.update(changes)
        self.config.write_text(json.dumps(self.standin_config))

    # -- what the helper gets -----------------------------------------------------------
    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NGFAKE_")}
        env.update(PATH=f"{self.bin}:{self.pybin}", NGFAKE_CONFIG=str(self.config),
                   NGFAKE_LOG=str(self.log))
        check_path(self, env["PATH"])
        return env

    def args(self, mode: str = "change", who: str = "ana@laptop", command: str = "deploy",
             paths: dict | None = None, **extra) -> dict:
        """The helper's arguments as HostSession sends them; `paths` moves some further."""
        moved = {k: as_arg(v) for k, v in {**self.paths, **(paths or {})}.items()}
        return {"mode": mode, "holder": {"who": who, "command": command,
                                         "since": "2026-11-29T10:00:00Z"},
                "app_dir": str(self.app_dir), "data_dir": str(self.data_dir),
                "container": CONTAINER, "image_name": IMAGE, "unit": UNIT, "rootless": False,
                "owner": self.owner, "paths": moved, "helper_path": str(HELPER_FILE),
                "keep_helper": False, **extra}

    def helper(self, mode: str = "change", **args) -> Helper:
        return Helper(self, mode, **args)

    # -- the stand-ins ------------------------------------------------------------------
    def calls(self, tool: str | None = None) -> list[list[str]]:
        entries = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [e["argv"] for e in entries if tool is None or e["tool"] == tool]

    def call_log(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def control(self, name: str, value) -> None:
        (self.control_dir / name).write_text(json.dumps(value))

    def fail(self, what: str, *, times: int = 1, match: str | None = None,
             message: str | None = None) -> None:
        """The next `times` calls of `what` (-1: all) fail, optionally only those whose
        argv holds the word `match`."""
        rule = {"times": times, "match": match}
        if message:
            rule["message"] = message
        self.control(f"fail-{what}", rule)

    def remove_tool(self, name: str) -> None:
        (self.bin / name).unlink()

    # -- the alert watcher ----------------------------------------------------------------
    def watch(self, timeout: float = 30) -> subprocess.CompletedProcess:
        """One pass of the installed watcher, as its systemd service runs it: the watcher's
        program imported from where the deploy put it, with its arguments file."""
        argv = [getattr(sys, "_base_executable", sys.executable), "-I", "-S", "-c",
                cmd.watcher_code(str(self.paths["watcher"].parent)),
                str(self.paths["alerts_args"])]
        self.watch_argvs.append(argv)
        return subprocess.run(argv, env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def alerts_state(self) -> dict:
        return self.read("alerts_state", default={}) or {}

    def health_log(self, status: str, streak: int = 0, output: str = "") -> None:
        """The running container's health as Podman records it (healthcheck.log)."""
        entry = self.container()
        log = {"Status": status, "FailingStreak": streak,
               "Log": [{"Start": "", "End": "", "ExitCode": 1 if streak else 0,
                        "Output": output}]}
        folder = self.paths["runroot"] / "overlay-containers" / entry["id"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "healthcheck.log").write_text(json.dumps(log))

    # -- reading the fake host ----------------------------------------------------------
    def read(self, key: str, *parts: str, default=None):
        path = self.paths[key].joinpath(*parts)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return default

    def secret_values(self) -> dict[str, str]:
        import base64

        store = self.read("graphroot", "secrets", "secrets.json", default={}) or {}
        data = self.read("graphroot", "secrets", "filedriver", "secretsdata.json",
                         default={}) or {}
        return {name: base64.b64decode(data[sid]).decode()
                for name, sid in (store.get("nameToID") or {}).items()}

    def image_names(self) -> list[str]:
        images = self.read("graphroot", "overlay-images", "images.json", default=[])
        return sorted(n for image in images for n in image.get("names") or [])

    def container(self) -> dict | None:
        """The agent's container as Podman stores it: entry, OCI config, secrets it got."""
        entries = self.read("graphroot", "overlay-containers", "containers.json", default=[])
        entry = next((c for c in entries if CONTAINER in c["names"]), None)
        if entry is None:
            return None
        cid = entry["id"]
        config = self.read("graphroot", "overlay-containers", cid, "userdata", "config.json")
        env = dict(item.split("=", 1) for item in config["process"]["env"])
        folder = self.paths["graphroot"] / "overlay-containers" / cid / "userdata" / "secrets"
        return {"id": cid, "env": env, "config": config,
                "secrets": {p.name: p.read_text() for p in folder.iterdir()}}

    def audit(self) -> list[dict]:
        path = self.paths["state"] / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []

    def state(self) -> dict:
        return self.read("state", "state.json", default={}) or {}


class Helper:
    """One helper process, spoken to through HostLink as HostSession does: for driving
    ops one at a time. `hello` is the helper's first answer (with the lock's fate)."""

    def __init__(self, host: FakeHost, mode: str = "change", **args):
        self.host = host
        self.pipe = local_pipe(host.env())
        self.progress: list[str] = []
        self.link = HostLink(self.pipe, on_progress=lambda step, line: self.progress.append(line))
        self.hello = self.link.hello(host.args(mode, **args), step="connect", timeout=20)

    @property
    def pid(self) -> int:
        return self.pipe.proc.pid

    def call(self, op: str, *, step: str | None = None, data: bytes | None = None,
             timeout: float = 30, **args) -> dict:
        return self.link.call(op, step=step or op, timeout=timeout, data=data, **args).result

    def start(self, op: str, *, step: str | None = None, **args) -> None:
        """Send a request without waiting for its answer (to leave in the middle of it)."""
        request = dict(args, id=next(self.link.ids), op=op, step=step or op)
        self.link._send(json.dumps(request).encode() + b"\n")

    def next_message(self, timeout: float = 10) -> dict:
        return json.loads(self.pipe.readline(timeout))

    def close(self, wait: float = 15) -> int | None:
        """End of input, as when the task ends: the helper audits, unlocks, exits."""
        return self.link.close(wait)

    def __enter__(self) -> Helper:
        return self

    def __exit__(self, *exc) -> None:
        if self.pipe.proc.poll() is None:
            self.link.close(15)
        if self.pipe.proc.poll() is None:
            self.pipe.proc.kill()
            self.pipe.proc.wait()


class LocalRemote(Remote):
    """A Remote whose one pipe is the helper on the fake host instead of an SSH channel.
    The helper's arguments are those HostSession sends, with the fake host's paths and the
    helper file of this checkout (so the host keeps no copy and coverage maps its lines)."""

    def __init__(self, host: FakeHost, *, dry_run: bool = False, redact=None,
                 on_progress=None):
        super().__init__(SshTarget("fake-host", 22, host.owner, label="the fake host"),
                         dry_run=dry_run, redact=redact or (lambda text: text),
                         out=io.StringIO())
        self.host = host
        self.sent_args: list[dict] = []  # what each session asked the helper for
        self.ops: list[str] = []  # every request sent, in order
        self.on_progress = on_progress

    def open_pipe(self, argv, *, step: str):
        assert argv == cmd.bootstrap(BOOTSTRAP, True), argv
        self.stats.connections = 1
        self.stats.commands += 1
        return _ArgsPipe(local_pipe(self.host.env()), self)

    def progress(self, line: str) -> None:
        super().progress(line)
        if self.on_progress:
            self.on_progress(line)

    @property
    def text(self) -> str:
        return self.out.getvalue()


class _ArgsPipe:
    """A LocalPipe that moves the host paths of the first line (the helper's arguments)."""

    def __init__(self, pipe, remote: LocalRemote):
        self.pipe = pipe
        self.remote = remote
        self.first = True

    def send(self, data: bytes) -> None:
        if self.first:
            self.first = False
            args = json.loads(data)
            self.remote.sent_args.append(dict(args))
            assert args["helper_path"].startswith(cmd.STATE_DIR + "/helper/")
            args["paths"] = {**{k: as_arg(v) for k, v in self.remote.host.paths.items()},
                             **args["paths"]}
            args["helper_path"], args["keep_helper"] = str(HELPER_FILE), False
            data = json.dumps(args).encode() + b"\n"
        elif data.startswith(b"{"):  # a request line, then its data if any
            self.remote.ops.append(json.loads(data.split(b"\n", 1)[0])["op"])
        self.pipe.send(data)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


# -- the safety check -----------------------------------------------------------------------
def as_arg(value):
    """A path (or a list of them) as the helper's JSON arguments carry it."""
    return [str(v) for v in value] if isinstance(value, list) else str(value)


def inside(path, root: Path) -> bool:
    if isinstance(path, list):
        return all(inside(p, root) for p in path)
    return Path(os.path.abspath(path)).is_relative_to(root)


def check_path(host: FakeHost, path: str) -> None:
    dirs = path.split(":")
    if dirs[0] != str(host.bin):
        raise Isolation(f"PATH starts with {dirs[0]!r}, not the stand-in dir {host.bin}")
    outside = [d for d in dirs if not inside(d, host.root)]
    if outside:
        raise Isolation(f"PATH holds {', '.join(outside)}, outside the test's folder")


def check_isolated(host: FakeHost) -> None:
    """Raise Isolation unless the helper can reach only stand-ins and the temp folder."""
    check_path(host, host.env()["PATH"])
    for program in RUNS:
        found = shutil.which(program, path=host.env()["PATH"])
        if not found or Path(found).resolve().parent != STANDINS:
            raise Isolation(f"{program} on the helper's PATH is {found}, not a stand-in")
    known = default_paths({"unit": UNIT, "container": CONTAINER})
    for key in known:
        if key not in host.paths or not inside(host.paths[key], host.root):
            raise Isolation(f"the helper's {key} path is {host.paths.get(key, known[key])}, "
                            "outside the test's folder")
    for key in ("tool_path", "tool_root"):
        if not inside(host.paths[key], host.root):
            raise Isolation(f"{key} is outside the test's folder")
