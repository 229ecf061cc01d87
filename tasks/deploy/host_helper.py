"""Runs ON THE HOST, as root (``sudo -n python3``) or as the SSH user when rootless; never
imported by the tasks. Standard library only: a host needs nothing but python3, which
Debian and Ubuntu cloud images ship. It travels as one program (``tasks.deploy.hostlink``
sends it once and the host keeps it by version), so it stays one file.

One process serves one task over the SSH channel's stdin/stdout:
  in   one JSON line per request {"id", "op", "step", ...}; "data": N means N raw bytes
       follow the line (a secret value, a tarball): nothing travels in an argv
  out  {"id", "progress": text} lines while a step runs, then {"id", "ok": true,
       "result": {...}} or {"id", "ok": false, "error": one line, "tail": [lines]}
A session that changes the host holds the deploy lock: flock(2) on <state>/lock, which the
kernel releases when this process ends, however it ends (no stale lock to break, no race
between two breakers). It writes the audit line itself: the outcome the client reports
with `finish`, or "interrupted" with the steps that had completed when the client went
away (Ctrl-C, a cut connection, a SIGTERM from `inv unlock --force`).

Files in the app dir are written as root without ever following a symbolic link: every
path is walked with openat(O_NOFOLLOW) from the app dir's own descriptor, files are
created O_EXCL under a random name, fchmod/fchown act on the open file, and renameat
replaces a planted link instead of writing through it. The agent's container cannot write
the app dir at all (it is mounted read-only); this is the second wall.

Reading the host is cheap by design: facts come from files (Podman's storage JSON, the
container's OCI config, its pid file and health log, systemd's unit files) and the podman
CLI is the fallback where a file is not where this Podman keeps it.

Ops: facts apt_wait provision swap rm_env sync release restore_code secret_put secret_restore
secret_forget run install_unit write_file dirs gate health logs history finish unlock
base (pull the base image) watcher (install / remove it) alert_test exec (a command in
the container) remove_plan remove (the deployment off the host).

The same file is also the alert watcher: run as `python3 watcher.py alerts.json` (a copy the
deploy keeps at <state>/watcher.py, run by the nightguard-watch timer) it does one watch
pass and exits; see watch_main and the "alerts" section below.
"""

import base64
import errno
import fcntl
import hashlib
import hmac
import io
import json
import os
import pwd
import queue
import re
import secrets as random
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time

MIN_PODMAN = (4, 3)  # --health-on-failure; see the README's "Host requirements"
KEEP_RELEASES = 10
WATCH_UNIT = "nightguard-watch"  # .service (one watch pass) and .timer (its schedule)
COPY_SEP = "__"  # NAME__<digest12>: a kept value of secret NAME
OUR_MOUNTS = ("/app", "/data", "/run/secrets")  # the mounts facts report


# -- small helpers ---------------------------------------------------------------------
def now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_text(path, limit=None):
    try:
        with open(path, "rb") as handle:
            data = handle.read() if limit is None else handle.read(limit)
    except OSError:
        return None
    return data.decode("utf-8", "replace").strip()


def read_json(path, default):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return default


def write_private(path, data, mode=0o600):
    """Atomic write of a root-only file in a directory only root can write."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data if isinstance(data, bytes) else data.encode())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_json(path, data):
    write_private(path, json.dumps(data, sort_keys=True))


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def version_tuple(text):
    try:
        return tuple(int(p) for p in str(text).split("-")[0].split(".")[:2])
    except ValueError:
        return (0, 0)


def pid_alive(pid):
    try:
        return int(pid) > 0 and os.path.exists(f"/proc/{int(pid)}")
    except (TypeError, ValueError):
        return False


class OpError(Exception):
    """A step that failed on the host: one line, plus the tail of what the command said."""

    def __init__(self, message, tail=None):
        super().__init__(message)
        self.tail = tail or []


# -- the session: protocol, lock, journal, audit -----------------------------------------
def default_paths(a):
    """Where things are on this host; a test moves any of them with args["paths"]."""
    unit = a["unit"]
    if a.get("rootless"):
        uid, home = os.getuid(), os.path.expanduser("~")
        state, graph = f"{home}/.local/state/nightguard", f"{home}/.local/share/containers/storage"
        run, units = f"/run/user/{uid}", f"{home}/.config/systemd/user"
        runroot, wants = f"/run/user/{uid}/containers", f"{units}/default.target.wants/{unit}"
    else:
        state, graph = "/var/lib/nightguard", "/var/lib/containers/storage"
        run, units = "/run", "/etc/systemd/system"
        runroot, wants = "/run/containers/storage", f"{units}/multi-user.target.wants/{unit}"
    paths = {"state": state, "graphroot": graph, "runroot": runroot, "run": run,
             "unit": f"{units}/{unit}", "unit_wants": wants,
             "markers": f"{state}/{a['container']}.release.env",
             "swapfile": "/swapfile", "fstab": "/etc/fstab", "proc_swaps": "/proc/swaps",
             "sysctl_conf": "/etc/sysctl.d/99-nightguard.conf",
             "swappiness": "/proc/sys/vm/swappiness", "os_release": "/etc/os-release",
             "systemd_run": "/run/systemd/system", "apt_sources": "/etc/apt",
             "linger_dir": "/var/lib/systemd/linger",
             "cgroup_controllers": "/sys/fs/cgroup/cgroup.controllers",
             "proc": "/proc", "cgroup": "/sys/fs/cgroup",
             "meminfo": "/proc/meminfo", "disk": "/", "apt_locks": list(APT_LOCKS),
             # the alert watcher: a copy of this file, its arguments, its state, its units
             "watcher": f"{state}/watcher.py", "alerts_args": f"{state}/alerts.json",
             "alerts_state": f"{state}/alerts-state.json",
             "watch_service": f"{units}/{WATCH_UNIT}.service",
             "watch_timer": f"{units}/{WATCH_UNIT}.timer",
             "watch_timer_wants": f"{units}/timers.target.wants/{WATCH_UNIT}.timer"}
    paths.update(a.get("paths") or {})
    return paths


class Session:
    def __init__(self, args, stdin, stdout):
        self.args = args
        self.paths = default_paths(args)
        self.stdin = stdin
        self.stdout = stdout
        self.requests = queue.Queue()
        self.gone = threading.Event()  # the client went away, or we were told to stop
        self.write_lock = threading.Lock()
        self.journal = []
        self.current = None
        self.during = None  # the step that was running when the client went away
        self.lock_fd = None
        self.finished = False
        self.changing = args.get("mode") == "change"
        self.holder = dict(args.get("holder") or {}, pid=os.getpid())

    # protocol -------------------------------------------------------------------------
    def send(self, message):
        line = (json.dumps(message, default=str) + "\n").encode()
        with self.write_lock:
            try:
                self.stdout.write(line)
                self.stdout.flush()
            except (BrokenPipeError, OSError, ValueError):
                self.gone.set()

    def progress(self, request_id, text):
        self.send({"id": request_id, "progress": text[-500:]})

    def reader(self):
        """Reads requests (and their data) until EOF; EOF means the client is gone."""
        try:
            while True:
                line = self.stdin.readline()
                if not line:
                    break
                request = json.loads(line)
                size = int(request.pop("data", 0) or 0)
                if size:
                    request["data"] = self.stdin.read(size)
                    if len(request["data"]) != size:
                        break
                self.requests.put(request)
        except (OSError, ValueError):
            pass
        self.gone.set()
        self.requests.put(None)

    # lock -----------------------------------------------------------------------------
    def take_lock(self):
        state = self.paths["state"]
        path = os.path.join(state, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return {"acquired": False, "held_by": lock_holder(self.paths)}
        self.lock_fd = fd
        write_json(os.path.join(state, "lock.json"), self.holder)
        return {"acquired": True}

    def release_lock(self):
        if self.lock_fd is not None:
            try:
                os.unlink(os.path.join(self.paths["state"], "lock.json"))
            except OSError:
                pass
            os.close(self.lock_fd)
            self.lock_fd = None

    # audit ----------------------------------------------------------------------------
    def audit(self, entry):
        entry = dict(entry, when=now(), who=self.holder.get("who", "?"),
                     command=self.holder.get("command", "?"), steps=list(self.journal))
        path = os.path.join(self.paths["state"], "audit.log")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")

    def close(self):
        """The end of the session: an audit line unless `finish` wrote one, then unlock."""
        if self.changing and self.lock_fd is not None and not self.finished:
            during = self.during or self.current
            self.audit({"outcome": "interrupted",
                        "version": self.args.get("version"),
                        "during": during,
                        "detail": "the client went away before the deploy finished"})
        self.release_lock()


def lock_holder(paths):
    holder = read_json(os.path.join(paths["state"], "lock.json"), None)
    if holder is None:
        return {"who": "unknown", "since": "?", "command": "?"}
    holder["alive"] = pid_alive(holder.get("pid"))
    return holder


def lock_is_free(paths):
    path = os.path.join(paths["state"], "lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# -- running programs ------------------------------------------------------------------
def sh(argv, timeout=120, data=None, env=None):
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, input=data,
                              env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)
    return (done.returncode, done.stdout.decode("utf-8", "replace"),
            done.stderr.decode("utf-8", "replace"))


def end_process(proc):
    """SIGTERM, and SIGKILL after 10 s: a command this helper started, ended."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_streaming(session, request_id, argv, timeout, on_interrupt="kill", data=None,
                  env=None, keep=40):
    """Runs argv, sends its output as progress, keeps the last lines. When the client
    goes away the command is killed (a build) or left to finish (a restart), as asked."""
    full_env = dict(os.environ, **(env or {}))
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if data is not None else
                                subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=full_env)
    except OSError as exc:
        raise OpError(f"{argv[0]}: {exc.strerror or exc}") from None
    if data is not None:
        try:
            proc.stdin.write(data)
            proc.stdin.close()
        except BrokenPipeError:
            pass
    tail = []

    def pump():
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            tail.append(line)
            del tail[:-keep]
            session.progress(request_id, line)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    deadline = time.monotonic() + timeout
    killed = None
    while proc.poll() is None:
        if time.monotonic() > deadline:
            killed = f"timed out after {timeout}s"
        elif session.gone.is_set() and on_interrupt == "kill":
            killed = "interrupted"
        if killed:
            end_process(proc)
            break
        time.sleep(0.1)
    pumper.join(5)
    return proc.returncode, tail, killed


# -- reading the host --------------------------------------------------------------------
def os_release(paths):
    info = {}
    for line in (read_text(paths["os_release"]) or "").splitlines():
        key, _, value = line.partition("=")
        info[key.strip()] = value.strip().strip('"')
    return {"id": info.get("ID", ""), "version_id": info.get("VERSION_ID", ""),
            "codename": info.get("VERSION_CODENAME", ""),
            "like": info.get("ID_LIKE", "").split(), "name": info.get("PRETTY_NAME", "")}


TOOLS = {
    "podman": ["/usr/bin/podman", "/usr/local/bin/podman"],
    "crun": ["/usr/bin/crun"], "runc": ["/usr/bin/runc", "/usr/sbin/runc"],
    "conmon": ["/usr/bin/conmon", "/usr/libexec/podman/conmon", "/usr/lib/podman/conmon"],
    "netavark": ["/usr/lib/podman/netavark", "/usr/libexec/podman/netavark"],
    "aardvark-dns": ["/usr/lib/podman/aardvark-dns", "/usr/libexec/podman/aardvark-dns"],
    "cni": ["/usr/lib/cni/bridge", "/opt/cni/bin/bridge"],
    "iptables": ["/usr/sbin/iptables", "/sbin/iptables"],
    "nft": ["/usr/sbin/nft", "/sbin/nft"],
    "newuidmap": ["/usr/bin/newuidmap"],
    "slirp4netns": ["/usr/bin/slirp4netns"], "pasta": ["/usr/bin/pasta"],
    "systemctl": ["/usr/bin/systemctl", "/bin/systemctl"],
    "apt-get": ["/usr/bin/apt-get"],
}


def find_tools(paths):
    root = paths.get("tool_root", "")
    found = {}
    for name, candidates in TOOLS.items():
        override = shutil.which(name, path=paths["tool_path"]) if paths.get("tool_path") \
            else None
        found[name] = override or next((c for c in candidates if os.path.exists(root + c)),
                                       None)
    return found


def podman_version(session_paths, tools, may_cache):
    """Podman's version, cached by the binary's identity: a podman process costs ~1 s on
    a small VM, and the binary only changes when it is upgraded."""
    binary = tools.get("podman")
    if not binary:
        return None
    try:
        st = os.stat(binary)
    except OSError:
        return None
    key = f"{binary}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    cache_path = os.path.join(session_paths["state"], "podman-version.json")
    cache = read_json(cache_path, {})
    if cache.get("key") == key:
        return cache.get("version")
    code, out, _ = sh([binary, "version", "--format", "{{.Client.Version}}"], 60)
    version = out.strip() if code == 0 and out.strip() else None
    if version and may_cache:
        write_json(cache_path, {"key": key, "version": version})
    return version


def storage_names(paths):
    """Image names, secret names and container ids from Podman's own JSON files; None for a
    part whose file is absent or unreadable (the caller then asks the podman CLI)."""
    images = read_json(os.path.join(paths["graphroot"], "overlay-images", "images.json"),
                       None)
    secrets = read_json(os.path.join(paths["graphroot"], "secrets", "secrets.json"), None)
    folder = os.path.join(paths["graphroot"], "overlay-containers")
    # Podman 5 keeps --rm ("volatile") containers apart, in volatile-containers.json
    found = [read_json(os.path.join(folder, name), None)
             for name in ("containers.json", "volatile-containers.json")]
    if any(isinstance(part, list) for part in found):
        containers = [c for part in found if isinstance(part, list) for c in part]
    else:  # none yet: an empty store (its lock exists), or one this helper cannot read
        containers = [] if os.path.exists(os.path.join(folder, "containers.lock")) else None
    return images, secrets, containers


def list_images(paths, name, images=None):
    if images is None:
        images, _, _ = storage_names(paths)
    if isinstance(images, list):
        names = [n for image in images for n in image.get("names") or []]
    else:
        code, out, _ = sh(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"])
        names = out.split() if code == 0 else []
    tags = sorted({n.rsplit(":", 1)[1] for n in names if n.rsplit(":", 1)[0] == name})
    return names, tags


def image_info(paths, name, images=None):
    """Id, digest and creation time of image NAME (the base image): from Podman's
    images.json, else `podman image inspect`. None when the storage lacks it. "created" is
    when the image was built (its config's date), so it tells how old a base image is."""
    if not name:
        return None
    if images is None:
        images, _, _ = storage_names(paths)
    wanted = {name} if ":" in name.rsplit("/", 1)[-1] or "@" in name else {name,
                                                                          f"{name}:latest"}
    if isinstance(images, list):
        image = next((i for i in images if wanted & set(i.get("names") or [])), None)
        return None if image is None else {
            "name": name, "id": image.get("id"), "digest": image.get("digest"),
            "created": image.get("created")}
    code, out, _ = sh(["podman", "image", "inspect", name])
    if code != 0:
        return None
    try:
        data = json.loads(out)[0]
    except (ValueError, IndexError):
        return None
    return {"name": name, "id": data.get("Id"), "digest": data.get("Digest"),
            "created": data.get("Created")}


def list_secrets(paths, secrets=None):
    """Name -> creation time."""
    if secrets is None:
        _, secrets, _ = storage_names(paths)
    if isinstance(secrets, dict) and isinstance(secrets.get("secrets"), dict):
        return {s.get("name"): s.get("createdAt", "") for s in secrets["secrets"].values()}
    if not os.path.exists(os.path.join(paths["graphroot"], "secrets")):
        if secrets is None and os.path.isdir(paths["graphroot"]):
            return {}
    code, out, _ = sh(["podman", "secret", "ls", "--noheading", "--format",
                       "{{.Name}}|{{.CreatedAt}}"])
    pairs = (line.split("|", 1) for line in out.splitlines() if "|" in line)
    return {name: created for name, created in pairs} if code == 0 else {}


def container_from_files(paths, name, containers):
    """The container's state from its OCI config, pid file and health log: what crun was
    really given (env, limits, mounts), without a podman process. None if not found."""
    entry = next((c for c in containers if name in (c.get("names") or [])), None)
    if entry is None:
        return {"absent": True}
    cid = entry["id"]
    config = read_json(os.path.join(paths["graphroot"], "overlay-containers", cid,
                                    "userdata", "config.json"), None)
    if not isinstance(config, dict):
        return None
    run_dir = os.path.join(paths["runroot"], "overlay-containers", cid)
    pid = read_text(os.path.join(run_dir, "userdata", "pidfile"))
    alive = pid_alive(pid)
    if alive:  # pid reuse: the pid must still be in this container's cgroup
        alive = cid in (read_text(f"{paths['proc']}/{pid}/cgroup") or cid)
    health = None
    for candidate in (os.path.join(run_dir, "healthcheck.log"),
                      os.path.join(run_dir, "userdata", "healthcheck.log"),
                      os.path.join(paths["graphroot"], "overlay-containers", cid, "userdata",
                                   "healthcheck.log")):
        health = read_json(candidate, None)
        if health is not None:
            break
    resources = (config.get("linux") or {}).get("resources") or {}
    memory = resources.get("memory") or {}
    cpu = resources.get("cpu") or {}
    env = dict(item.split("=", 1) for item in (config.get("process") or {}).get("env", [])
               if "=" in item)
    mounts = [{"destination": m.get("destination"), "source": m.get("source"),
               "options": m.get("options") or []} for m in config.get("mounts") or []
              if (m.get("destination") or "").startswith(OUR_MOUNTS)]
    quota, period = cpu.get("quota") or 0, cpu.get("period") or 0
    return {
        "id": cid, "running": bool(alive), "pid": int(pid) if alive else 0,
        "status": "running" if alive else "exited",
        "image": json.loads(entry.get("metadata") or "{}").get("image-name", ""),
        "created": entry.get("created"),
        "markers": {k: v for k, v in env.items() if k.startswith("NG_RELEASE_")},
        "heartbeat_file": env.get("NG_HEARTBEAT_FILE", "/tmp/nightguard/heartbeat"),
        "memory": memory.get("limit", 0), "memory_swap": memory.get("swap", 0),
        "memory_reservation": memory.get("reservation", 0),
        "nano_cpus": int(quota * 1e9 // period) if period else 0,
        "mounts": mounts,
        "health": (health or {}).get("Status", "") if health is not None else None,
        "failing_streak": int((health or {}).get("FailingStreak") or 0),
        "health_log": [{"exit": e.get("ExitCode"), "output": (e.get("Output") or "")[-300:]}
                       for e in ((health or {}).get("Log") or [])[-3:]],
        "source": "files",
    }


def container_from_podman(name):
    code, out, _ = sh(["podman", "container", "inspect", name])
    if code != 0:
        return {"absent": True}
    data = json.loads(out)[0]
    host, state = data.get("HostConfig", {}), data.get("State", {})
    health = state.get("Health") or state.get("Healthcheck") or {}
    env = dict(item.split("=", 1) for item in (data.get("Config") or {}).get("Env") or []
               if "=" in item)
    return {
        "id": data.get("Id"), "running": state.get("Running", False),
        "pid": state.get("Pid", 0), "status": state.get("Status"),
        "image": data.get("ImageName", ""), "created": data.get("Created"),
        "markers": {k: v for k, v in env.items() if k.startswith("NG_RELEASE_")},
        "heartbeat_file": env.get("NG_HEARTBEAT_FILE", "/tmp/nightguard/heartbeat"),
        "memory": host.get("Memory", 0), "memory_swap": host.get("MemorySwap", 0),
        "memory_reservation": host.get("MemoryReservation", 0),
        "nano_cpus": host.get("NanoCpus", 0) or int(host.get("CpuQuota", 0) * 1e9
                                                     // max(host.get("CpuPeriod", 1), 1)),
        "mounts": [{"destination": m.get("Destination"), "source": m.get("Source"),
                    "options": m.get("Options") or []} for m in data.get("Mounts") or []
                   if (m.get("Destination") or "").startswith(OUR_MOUNTS)],
        "health": health.get("Status", ""),
        "failing_streak": int(health.get("FailingStreak") or 0),
        "health_log": [{"exit": e.get("ExitCode"), "output": (e.get("Output") or "")[-300:]}
                       for e in (health.get("Log") or [])[-3:]],
        "started_at": state.get("StartedAt"),
        "source": "podman",
    }


def container_state(paths, name, want_health=False, containers=None):
    if containers is None:
        _, _, containers = storage_names(paths)
    found = container_from_files(paths, name, containers) \
        if isinstance(containers, list) else None
    if found is None or (want_health and found.get("running") and found.get("health") is None):
        found = container_from_podman(name)
    if found.get("absent"):
        return None
    reload = read_json(os.path.join(paths["state"], "reload.json"), {})
    if reload.get("cid") == found.get("id") and reload.get("markers"):
        # restarted in place (SIGHUP) since it was created: it runs what the reload said
        found["markers"] = dict(reload["markers"])
        found["reloaded_at"] = reload.get("at")
    return found


def cgroup_limits(paths, pid):
    """The limits the kernel enforces, read from the container's cgroup (v2 or v1)."""
    try:
        with open(f"{paths['proc']}/{pid}/cgroup") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return {}
    limits = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = paths["cgroup"] + path
            for key, name in (("memory", "memory.max"), ("swap", "memory.swap.max"),
                              ("memory_usage", "memory.current"),
                              ("swap_usage", "memory.swap.current"),
                              ("memory_peak", "memory.peak")):
                limits[key] = read_text(os.path.join(base, name))
        elif "memory" in controllers.split(","):
            base = paths["cgroup"] + "/memory" + path
            limits["memory"] = read_text(base + "/memory.limit_in_bytes")
            limits["memsw"] = read_text(base + "/memory.memsw.limit_in_bytes")
            limits["memory_usage"] = read_text(base + "/memory.usage_in_bytes")
    return limits


def host_memory(paths):
    info = {}
    for line in (read_text(paths["meminfo"]) or "").splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0]) * 1024 if rest.split() else 0
    disk = shutil.disk_usage(paths["disk"])
    return {"mem_total": info.get("MemTotal"), "mem_available": info.get("MemAvailable"),
            "swap_total": info.get("SwapTotal"), "swap_free": info.get("SwapFree"),
            "disk_free": disk.free, "disk_total": disk.total}


def swap_facts(paths):
    swapfile = paths["swapfile"]
    swaps = (read_text(paths["proc_swaps"]) or "").splitlines()[1:]
    try:
        st = os.lstat(swapfile)
        size, mode = st.st_size, oct(st.st_mode & 0o777)
    except OSError:
        size, mode = 0, None
    fstab = read_text(paths["fstab"]) or ""
    return {
        "swaps": [{"path": s.split()[0], "size": int(s.split()[2]) * 1024} for s in swaps],
        "swapfile_size": size, "swapfile_mode": mode,
        "swap_in_fstab": any(line.split()[:1] == [swapfile] for line in fstab.splitlines()),
        "swappiness": int(read_text(paths["swappiness"]) or -1),
        "swappiness_persisted": read_text(paths["sysctl_conf"]),
    }


def apt_sources(paths):
    """(scheme, host, port) of every apt source: what `provision` will need to reach."""
    hosts = set()
    folder = paths["apt_sources"]
    files = [os.path.join(folder, "sources.list")]
    files += [os.path.join(folder, "sources.list.d", n)
              for n in sorted(_listdir(os.path.join(folder, "sources.list.d")))]
    for path in files:
        for line in (read_text(path) or "").splitlines():
            for word in line.replace("URIs:", " ").split():
                if word.startswith(("http://", "https://")):
                    scheme, rest = word.split("://", 1)
                    host = rest.split("/", 1)[0]
                    name, _, port = host.partition(":")
                    hosts.add((scheme, name, int(port) if port else
                               (443 if scheme == "https" else 80)))
    return sorted(hosts)


# -- apt and dpkg: never race the host's package manager ---------------------------------
APT_LOCKS = ("/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock", "/var/lib/apt/lists/lock",
             "/var/cache/apt/archives/lock")
# who holds them in a new VM's first hour, named as a person knows them
APT_USERS = {"google-startup-scripts.service": "the VM's startup script",
             "apt-daily.service": "apt's daily update of the package lists",
             "apt-daily-upgrade.service": "unattended-upgrades",
             "unattended-upgrades.service": "unattended-upgrades",
             "cloud-init.service": "cloud-init", "cloud-config.service": "cloud-init",
             "cloud-final.service": "cloud-init", "packagekit.service": "PackageKit"}
LOCK_BUSY = re.compile(r"Could not get lock|Unable to (acquire|lock)|lock was locked by "
                       r"another process|frontend lock")
FLOCK = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid (+ padding)
APT_SETTLE = 2.0  # free this long before it counts: a script's next apt command follows


def lock_holder_pid(path):
    """The pid holding an fcntl lock on path that a writer would meet; None when free or
    absent (-1: an open-file-description lock, whose owner the kernel does not name)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        probe = struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        kind, _, _, _, pid = struct.unpack(FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, probe))
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if kind == fcntl.F_UNLCK else pid


def process_unit(paths, pid):
    """The systemd unit a process runs in (its cgroup's last .service or .scope)."""
    text = read_text(os.path.join(paths["proc"], str(pid), "cgroup")) or ""
    lines = sorted(text.splitlines(), key=lambda line: not line.startswith("0::"))
    for line in lines:
        parts = line.split(":", 2)[-1].split("/")
        units = [p for p in parts if p.endswith((".service", ".scope"))]
        if units:
            return units[-1]
    return ""


def process_age(paths, pid):
    """Seconds since the process started (None if it is gone)."""
    stat_text = read_text(os.path.join(paths["proc"], str(pid), "stat"))
    uptime = read_text(os.path.join(paths["proc"], "uptime"))
    try:
        started = int(stat_text.rsplit(")", 1)[1].split()[19])
        return max(0.0, float(uptime.split()[0]) - started / os.sysconf("SC_CLK_TCK"))
    except (AttributeError, IndexError, ValueError):
        return None


def apt_holders(paths):
    """Who holds apt's and dpkg's locks now: [{pid, command, unit, what, running, locks}]."""
    holders = {}
    for path in paths["apt_locks"]:
        pid = lock_holder_pid(path)
        if pid is None:
            continue
        if pid not in holders:
            raw = b""
            if pid > 0:
                try:
                    with open(os.path.join(paths["proc"], str(pid), "cmdline"), "rb") as fh:
                        raw = fh.read(400)
                except OSError:
                    pass
            unit = process_unit(paths, pid) if pid > 0 else ""
            what = APT_USERS.get(unit) or ("an SSH login" if unit.startswith("session-")
                                           else "")
            holders[pid] = {"pid": pid, "command": raw.replace(b"\0", b" ").decode(
                "utf-8", "replace").strip()[:160], "unit": unit, "what": what,
                "running": process_age(paths, pid) if pid > 0 else None, "locks": []}
        holders[pid]["locks"].append(path)
    return list(holders.values())


def age_text(seconds):
    seconds = max(0, int(seconds or 0))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def holder_text(h):
    who = f"pid {h['pid']} ({h['command'] or 'unknown command'})" if h["pid"] > 0 \
        else "an unnamed process"
    if h["what"]:
        who += f", {h['what']}" + (f" [{h['unit']}]" if h["unit"] else "")
    elif h["unit"]:
        who += f" [{h['unit']}]"
    if h.get("running") is not None:
        who += f", running {age_text(h['running'])}"
    return who


def apt_busy_error(busy, bound):
    h = busy[0]
    look = f"systemctl status {h['unit']}" if h["unit"].endswith(".service") else \
        f"ps -o pid,etime,args -p {h['pid']}"
    return (f"apt is still busy after {age_text(float(bound))}: {holder_text(h)} holds "
            f"{h['locks'][0]}; look at it with `{look}`, then deploy again (nothing was "
            "changed; nightguard.host.apt_wait sets how long to wait)")


def wait_for_apt(s, request_id, deadline, seen):
    """Blocks until nobody holds apt's or dpkg's locks or the deadline passes; never kills
    them. Returns who still holds them ([] when free); ``seen`` gathers every holder met,
    by pid. Progress names the holder every 10 s and whenever it changes."""
    started, shown, next_line = time.monotonic(), None, 0.0
    while True:
        holders = apt_holders(s.paths)
        if not holders and shown is not None:  # free long enough for a script's next command?
            time.sleep(APT_SETTLE)
            holders = apt_holders(s.paths)
        if not holders:
            return []
        for h in holders:
            seen[h["pid"]] = dict(h, waited=round(time.monotonic() - started, 1))
        t = time.monotonic()
        if t >= deadline:
            return holders
        if s.gone.is_set():
            raise OpError("interrupted while waiting for apt's locks (nothing was changed)")
        if holders[0]["pid"] != shown or t >= next_line:
            s.progress(request_id, f"waiting for apt ({age_text(t - started)} so far, up to "
                                   f"{age_text(deadline - started)}): {holder_text(holders[0])}")
            shown, next_line = holders[0]["pid"], t + 10
        time.sleep(1)


def missing_packages(packages):
    """The packages dpkg does not list as installed (all of them if dpkg-query fails)."""
    code, out, _ = sh(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n",
                       *packages], timeout=60)
    installed = {line.split()[0] for line in out.splitlines()
                 if line.split()[1:] == ["installed"]}
    return [p for p in packages if p not in installed]


def reachable(host, port, timeout=5.0):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# -- the app dir, without following links --------------------------------------------------
def open_dir_nofollow(path, create_owner=None):
    """A descriptor on an absolute directory path, refusing links at every level below /."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in [p for p in path.split("/") if p]:
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if create_owner is None:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.fchown(child, *create_owner)
            os.close(fd)
            fd = child
        return fd
    except OSError:
        os.close(fd)
        raise


def walk_to_parent(root_fd, rel, owner=None):
    """The descriptor of rel's parent directory under root_fd, made if missing. A link
    or a non-directory where a directory belongs is removed, never followed."""
    fd = os.dup(root_fd)
    parts = rel.split("/")
    for part in parts[:-1]:
        if part in ("", ".", ".."):
            os.close(fd)
            raise OpError(f"refusing path {rel!r}")
        try:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as exc:
            if owner is None:
                os.close(fd)
                raise
            if exc.errno != errno.ENOENT:  # ELOOP/ENOTDIR: a link or a file in the way
                os.unlink(part, dir_fd=fd)
            os.mkdir(part, 0o755, dir_fd=fd)
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.fchown(child, *owner)
        os.close(fd)
        fd = child
    if parts[-1] in ("", ".", ".."):
        os.close(fd)
        raise OpError(f"refusing path {rel!r}")
    return fd


def read_nofollow(root_fd, rel):
    """(bytes, mode) of a regular file under root_fd, or None (absent, a link, a dir)."""
    try:
        parent = walk_to_parent(root_fd, rel)
    except OSError:
        return None
    try:
        fd = os.open(rel.rsplit("/", 1)[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
                     dir_fd=parent)
    except OSError:
        return None
    finally:
        os.close(parent)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(), stat.S_IMODE(st.st_mode)
    finally:
        os.close(fd)


def write_nofollow(root_fd, rel, data, mode, owner):
    parent = walk_to_parent(root_fd, rel, owner)
    name = rel.rsplit("/", 1)[-1]
    tmp = f".{name}.ng-{random.token_hex(6)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                     dir_fd=parent)
        try:
            os.write(fd, data) if len(data) < 1 << 20 else _write_all(fd, data)
            os.fchown(fd, *owner)
            os.fchmod(fd, mode & 0o777)
        finally:
            os.close(fd)
        try:  # a directory in the file's place (e.g. planted): take it away first
            if stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                remove_tree_at(parent, name)
        except FileNotFoundError:
            pass
        os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=parent)
        except OSError:
            pass
        raise
    finally:
        os.close(parent)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def remove_nofollow(root_fd, rel):
    try:
        parent = walk_to_parent(root_fd, rel)
    except OSError:
        return False
    try:
        os.unlink(rel.rsplit("/", 1)[-1], dir_fd=parent)
        return True
    except IsADirectoryError:
        return False
    except OSError:
        return False
    finally:
        os.close(parent)


def remove_tree_at(dir_fd, name):
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError:
        os.unlink(name, dir_fd=dir_fd)
        return
    try:
        for entry in os.listdir(fd):
            if stat.S_ISDIR(os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode):
                remove_tree_at(fd, entry)
            else:
                os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def tree_manifest(root_fd, skip=()):
    """rel -> sha256 of regular files; links are listed apart, never followed."""
    found, links = {}, []

    def walk(fd, prefix):
        for name in sorted(os.listdir(fd)):
            rel = prefix + name
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links.append(rel)
            elif stat.S_ISDIR(st.st_mode):
                if name in skip:
                    continue
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                dir_fd=fd)
                try:
                    walk(child, rel + "/")
                finally:
                    os.close(child)
            elif stat.S_ISREG(st.st_mode):
                got = read_nofollow(fd, name)
                if got is not None:
                    found[rel] = f"{sha256_bytes(got[0])}:{got[1]:o}"

    walk(root_fd, "")
    return found, links


def app_owner(args):
    entry = pwd.getpwnam(args["owner"])
    return entry.pw_uid, entry.pw_gid


# -- ops -----------------------------------------------------------------------------------
def op_facts(s, req):
    a, paths = s.args, s.paths
    tools = find_tools(paths)
    facts = {"os": os_release(paths), "tools": tools,
             "systemd": os.path.isdir(paths["systemd_run"]),
             "cgroup2": os.path.exists(paths["cgroup_controllers"]),
             "uid": os.getuid()}
    facts["podman"] = podman_version(paths, tools, may_cache=s.changing)
    facts.update(swap_facts(paths))
    images, secrets, containers = storage_names(paths) if tools["podman"] else ([], {}, [])
    facts["image_names"], facts["image_tags"] = list_images(paths, a["image_name"], images) \
        if tools["podman"] else ([], [])
    facts["secrets"] = list_secrets(paths, secrets) if tools["podman"] else {}
    facts["base_image"] = image_info(paths, a.get("base_image"), images) \
        if tools["podman"] else None
    facts["secret_hashes"] = read_json(os.path.join(paths["state"], "secrets.json"), {})
    salt_path = os.path.join(paths["state"], "secret.salt")
    if s.changing and not os.path.exists(salt_path):
        write_private(salt_path, os.urandom(32).hex())
    facts["secret_salt"] = read_text(salt_path)
    facts["container"] = container_state(paths, a["container"], containers=containers) \
        if tools["podman"] else None
    facts["unit_text"] = read_text(paths["unit"])
    facts["unit_enabled"] = os.path.lexists(paths["unit_wants"])
    facts["linger"] = os.path.exists(os.path.join(paths["linger_dir"], a["owner"]))
    facts["markers_text"] = read_text(paths["markers"])
    facts["watcher"] = watcher_facts(paths)
    app_dir = a["app_dir"]
    try:
        root_fd = open_dir_nofollow(app_dir)
    except OSError:
        facts.update(app_dir_exists=False, manifest={}, links=[])
    else:
        try:
            manifest, links = tree_manifest(root_fd, skip=(".git", "__pycache__"))
        finally:
            os.close(root_fd)
        facts.update(app_dir_exists=True, manifest=manifest, links=links)
    facts["env_file_on_host"] = ".env" in facts["manifest"]
    facts["synced"] = read_json(os.path.join(paths["state"], "synced.json"), [])
    facts["state"] = read_json(os.path.join(paths["state"], "state.json"), {"history": []})
    facts["releases"] = sorted(n[:-7] for n in _listdir(os.path.join(paths["state"],
                                                                     "releases"))
                               if n.endswith(".tar.gz"))
    facts["host"] = host_memory(paths)
    facts["last_audit"] = last_audit(paths)
    basics = ("podman", "conmon", "aardvark-dns")
    if any(not tools[name] for name in basics) or not (tools["crun"] or tools["runc"]):
        facts["apt_sources"] = apt_sources(paths) if tools.get("apt-get") else []
        facts["apt_reachable"] = {f"{h}:{p}": reachable(h, p, 5.0)
                                  for _, h, p in facts["apt_sources"][:4]}
    # always (four F_GETLK calls): whatever the plan installs, the deploy waits for it first
    facts["apt_busy"] = apt_holders(paths)
    return facts


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def last_audit(paths, count=1):
    text = read_text(os.path.join(paths["state"], "audit.log")) or ""
    lines = text.splitlines()[-count:]
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out[-1] if count == 1 and out else (out if count != 1 else None)


def op_provision(s, req):
    """apt-get install of what the host lacks (after the swapfile is on: a 1 GB host can
    run out of memory in dpkg). Waits first for whoever holds apt's or dpkg's locks (up
    to req["wait"] seconds) and installs only what is still missing then: a new VM's
    startup script may have installed it meanwhile. Left to finish when the client goes
    away: a dpkg run cut half-way leaves a host that needs `dpkg --configure -a`, which
    this op runs first."""
    env = {"DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}
    deadline = time.monotonic() + float(req.get("wait", 0))
    seen = {}
    missing = list(req["packages"])
    for name in ("configure", "update", "install"):
        busy = wait_for_apt(s, req["id"], deadline, seen)
        if busy:
            raise OpError(apt_busy_error(busy, req.get("wait", 0)))
        missing = missing_packages(missing)
        if not missing:  # what the deploy needed came with what it waited for
            return {"installed": [], "waited": list(seen.values())}
        # apt's own DPkg::Lock::Timeout covers dpkg's two locks only, not the lists and
        # archives locks of a download (apt 2.6 / 2.7 / 3.0 alike): our wait and a
        # retry on "Could not get lock" cover all four
        left = str(max(1, int(deadline - time.monotonic())))
        argv = {"configure": ["dpkg", "--configure", "-a"],
                "update": ["apt-get", "-q", "update"],
                "install": ["apt-get", "-q", "-y", "--no-install-recommends",
                            "-o", f"DPkg::Lock::Timeout={left}",
                            "-o", "Dpkg::Options::=--force-confdef",
                            "-o", "Dpkg::Options::=--force-confold",
                            "install", *missing]}[name]
        run_apt_step(s, req["id"], argv, env, deadline, seen, req.get("wait", 0))
    return {"installed": missing, "waited": list(seen.values())}


def run_apt_step(s, request_id, argv, env, deadline, seen, bound):
    """One apt/dpkg command once nobody else holds the locks; again when it still lost
    the race for a lock (another command of the same script took it in between)."""
    while True:
        busy = wait_for_apt(s, request_id, deadline, seen)
        if busy:
            raise OpError(apt_busy_error(busy, bound))
        code, tail, killed = run_streaming(s, request_id, argv, 1800, on_interrupt="finish",
                                           env=env)
        if code == 0:
            return
        if not killed and any(LOCK_BUSY.search(line) for line in tail) \
                and time.monotonic() < deadline and not s.gone.is_set():
            time.sleep(2)
            continue
        raise OpError(f"`{' '.join(argv[:2])} ...` exited {code}"
                      + (f" ({killed})" if killed else ""), tail[-15:])


def op_apt_wait(s, req):
    """Read-only: waits until nobody holds apt's or dpkg's locks (never kills them)."""
    started = time.monotonic()
    seen = {}
    busy = wait_for_apt(s, req["id"], started + float(req["wait"]), seen)
    if busy:
        raise OpError(apt_busy_error(busy, req["wait"]))
    return {"waited": round(time.monotonic() - started, 1), "holders": list(seen.values())}


def op_swap(s, req):
    p = s.paths
    size, swapfile = int(req["size"]), p["swapfile"]
    current = swap_facts(p)
    active = any(x["path"] == swapfile for x in current["swaps"])
    if not active:
        if current["swapfile_size"] != size:
            if os.path.lexists(swapfile):
                os.unlink(swapfile)
            code, _, err = sh(["fallocate", "-l", str(size), swapfile])
            if code != 0:
                code, _, err = sh(["dd", "if=/dev/zero", f"of={swapfile}", "bs=1M",
                                   f"count={size // 1048576}", "status=none"], 600)
                if code != 0:
                    raise OpError(f"cannot make {swapfile}: {err.strip()[-200:]}")
        os.chmod(swapfile, 0o600)
        for argv in (["mkswap", swapfile], ["swapon", swapfile]):
            code, _, err = sh(argv)
            if code != 0:
                raise OpError(f"{argv[0]} {swapfile} failed: {err.strip()[-200:]}")
    os.chmod(swapfile, 0o600)
    fstab = read_text(p["fstab"]) or ""
    if not any(line.split()[:1] == [swapfile] for line in fstab.splitlines()):
        with open(p["fstab"], "a") as handle:
            handle.write(("" if fstab.endswith("\n") or not fstab else "\n")
                         + f"{swapfile} none swap sw 0 0\n")
    wanted = f"vm.swappiness={int(req['swappiness'])}"
    if read_text(p["sysctl_conf"]) != wanted:
        with open(p["sysctl_conf"], "w") as handle:
            handle.write(wanted + "\n")
    with open(p["swappiness"], "w") as handle:
        handle.write(str(int(req["swappiness"])))
    return {"active": True}


def op_rm_env(s, req):
    fd = open_dir_nofollow(s.args["app_dir"])
    try:
        return {"removed": remove_nofollow(fd, ".env")}
    finally:
        os.close(fd)


def op_sync(s, req):
    """Write the sent files (a tarball) and remove the deleted ones, keeping what they
    replace so `restore_code` can put it back. Never follows a link."""
    a, p = s.args, s.paths
    owner = app_owner(a)
    state = p["state"]
    root_fd = open_dir_nofollow(a["app_dir"], create_owner=owner)
    try:
        touched = list(req["files"]) + list(req["delete"])
        backup = io.BytesIO()
        with tarfile.open(fileobj=backup, mode="w") as tar:
            for rel in touched:
                got = read_nofollow(root_fd, rel)
                if got is not None:
                    info = tarfile.TarInfo(rel)
                    info.size, info.mode = len(got[0]), got[1]
                    tar.addfile(info, io.BytesIO(got[0]))
        write_private(os.path.join(state, "rollback-code.tar"), backup.getvalue())
        write_json(os.path.join(state, "rollback-added.json"),
                   [r for r in req["files"] if read_nofollow(root_fd, r) is None])
        write_json(os.path.join(state, "rollback-synced.json"),
                   read_json(os.path.join(state, "synced.json"), []))
        for rel in req.get("links", []):  # links in the tree are never kept; first, so
            remove_nofollow(root_fd, rel)  # a file synced in a link's place stays
        written = 0
        if req.get("data"):
            with tarfile.open(fileobj=io.BytesIO(req["data"]), mode="r:gz") as delta:
                for member in delta.getmembers():
                    if not member.isfile():
                        continue
                    data = delta.extractfile(member).read()
                    write_nofollow(root_fd, member.name, data, member.mode, owner)
                    written += 1
        for rel in req["delete"]:
            remove_nofollow(root_fd, rel)
        if req.get("all_files") is not None:
            write_json(os.path.join(state, "synced.json"), sorted(req["all_files"]))
    finally:
        os.close(root_fd)
    return {"written": written, "deleted": len(req["delete"])}


def op_release(s, req):
    """A release passed its health gate: record it (its unit and markers as they are on this
    host now, so nothing long travels), keep its code for `rollback --to`, and let go of
    what no kept release needs: older code snapshots, secret copies, images."""
    a, p = s.args, s.paths
    entry = dict(req["entry"], unit_text=read_text(p["unit"]) or "",
                 markers_text=read_text(p["markers"]) or "")
    version = entry["version"]
    state_path = os.path.join(p["state"], "state.json")
    state = read_json(state_path, {"history": []})
    history = [entry] + [h for h in state.get("history") or [] if h.get("version") != version]
    history = history[:max(1, int(req.get("keep", 3)))]
    write_json(state_path, {"history": history, "verified": version})
    folder = os.path.join(p["state"], "releases")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    synced = read_json(os.path.join(p["state"], "synced.json"), [])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        try:
            root_fd = open_dir_nofollow(a["app_dir"])
        except FileNotFoundError:
            root_fd = None  # nothing synced yet: an empty snapshot
        try:
            for rel in synced if root_fd is not None else []:
                got = read_nofollow(root_fd, rel)
                if got is not None:
                    info = tarfile.TarInfo(rel)
                    info.size, info.mode = len(got[0]), got[1]
                    tar.addfile(info, io.BytesIO(got[0]))
        finally:
            if root_fd is not None:
                os.close(root_fd)
    write_private(os.path.join(folder, f"{version}.tar.gz"), buffer.getvalue())
    kept = {h["version"] for h in history}
    for name in _listdir(folder):
        if name.endswith(".tar.gz") and name[:-7] not in kept:
            os.unlink(os.path.join(folder, name))
    forget_secrets(p, history)
    tags = {h.get("image_tag") for h in history}
    _, present = list_images(p, a["image_name"])
    stale = [f"{a['image_name']}:{t}" for t in present if t not in tags]
    if stale:
        sh(["podman", "rmi", "--ignore", *stale], 300)
    if stale or req.get("prune"):  # base images no kept image is built on any more
        sh(["podman", "image", "prune", "--force"], 300)
    return {"kept": [h["version"] for h in history], "pruned": stale}


def forget_secrets(paths, history):
    """Drop kept values (NAME__<digest12>) no kept release runs with."""
    keep = {f"{name}{COPY_SEP}{d[:12]}" for h in history
            for name, d in (h.get("secrets") or {}).items()}
    dropped = []
    for name in list_secrets(paths):
        if COPY_SEP in name and name not in keep:
            sh(["podman", "secret", "rm", name])
            dropped.append(name)
    return dropped


def op_restore_code(s, req):
    """Put back the files the last sync replaced, or a kept release's whole tree."""
    a, p = s.args, s.paths
    owner = app_owner(a)
    root_fd = open_dir_nofollow(a["app_dir"], create_owner=owner)
    restored = removed = 0
    try:
        if req.get("version"):
            path = os.path.join(p["state"], "releases", f"{req['version']}.tar.gz")
            if not os.path.exists(path):
                raise OpError(f"the code of release {req['version']} is no longer kept")
            with tarfile.open(path, "r:gz") as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                wanted = {m.name for m in members}
                for member in members:
                    write_nofollow(root_fd, member.name, tar.extractfile(member).read(),
                                   member.mode, owner)
                    restored += 1
            for rel in read_json(os.path.join(p["state"], "synced.json"), []):
                if rel not in wanted and remove_nofollow(root_fd, rel):
                    removed += 1
            write_json(os.path.join(p["state"], "synced.json"), sorted(wanted))
        else:
            for rel in read_json(os.path.join(p["state"], "rollback-added.json"), []):
                if remove_nofollow(root_fd, rel):
                    removed += 1
            backup = os.path.join(p["state"], "rollback-code.tar")
            if os.path.exists(backup):
                with tarfile.open(backup) as tar:
                    for member in tar.getmembers():
                        if member.isfile():
                            write_nofollow(root_fd, member.name,
                                           tar.extractfile(member).read(), member.mode, owner)
                            restored += 1
            synced = read_json(os.path.join(p["state"], "rollback-synced.json"), None)
            if synced is not None:  # what the next sync may delete: the files back here
                write_json(os.path.join(p["state"], "synced.json"), synced)
    finally:
        os.close(root_fd)
    return {"restored": restored, "removed": removed}


# secrets ------------------------------------------------------------------------------
def salt(paths):
    text = read_text(os.path.join(paths["state"], "secret.salt"))
    if not text:
        raise OpError("the host has no secret key yet (facts of a changing session make it)")
    return bytes.fromhex(text)


def digest(paths, value):
    return hmac.new(salt(paths), value, hashlib.sha256).hexdigest()


def secret_value(paths, name, podman_version_text):
    """A secret's value, read on the host only (never sent back): Podman >= 4.7 shows it
    to its owner; older Podman keeps it in its file driver's store."""
    if version_tuple(podman_version_text) >= (4, 7):
        code, out, _ = sh(["podman", "secret", "inspect", "--showsecret", "--format",
                           "{{.SecretData}}", name])
        if code == 0:
            return out.rstrip("\n").encode()
    store = read_json(os.path.join(paths["graphroot"], "secrets", "secrets.json"), {})
    secret_id = (store.get("nameToID") or {}).get(name)
    if secret_id is None:
        return None
    data = read_json(os.path.join(paths["graphroot"], "secrets", "filedriver",
                                  "secretsdata.json"), {})
    encoded = data.get(secret_id)
    return None if encoded is None else base64.b64decode(encoded)


def create_secret(name, value, replace, present):
    """`--replace` where Podman has it (atomic); else rm + create."""
    if present and not replace:
        sh(["podman", "secret", "rm", name])
    argv = ["podman", "secret", "create"] + (["--replace"] if replace and present else []) \
        + [name, "-"]
    code, _, err = sh(argv, data=value)
    if code != 0:
        raise OpError(f"podman secret create {name} failed: {err.strip()[-200:]}")


def op_secret_put(s, req):
    """Replace secret NAME with the value sent (bytes after the request line). The value
    it replaces is kept first as NAME__<digest12> (for a rollback); the new value's digest
    is recorded only once Podman has it: the host never claims a value it lacks."""
    p, name, value = s.paths, req["name"], req["data"]
    version = req.get("podman") or ""
    replace = version_tuple(version) >= (4, 7)
    present = list_secrets(p)
    hashes = read_json(os.path.join(p["state"], "secrets.json"), {})
    kept = None
    if name in present:
        old = secret_value(p, name, version)
        if old is not None:
            kept = digest(p, old)
            copy = f"{name}{COPY_SEP}{kept[:12]}"
            if copy not in present:
                create_secret(copy, old, replace, False)
        elif req.get("keep", True):
            raise OpError(f"cannot read the current value of {name} to keep it")
    try:
        create_secret(name, value, replace, name in present)
    except OpError:
        if kept and name not in list_secrets(p):  # rm went through, create did not
            create_secret(name, secret_value(p, f"{name}{COPY_SEP}{kept[:12]}", version),
                          False, False)
        raise
    hashes[name] = digest(p, value)
    write_json(os.path.join(p["state"], "secrets.json"), hashes)
    return {"digest": hashes[name], "kept": kept}


def op_secret_restore(s, req):
    """Put back the kept value of NAME whose digest is given (rollbacks)."""
    p, version = s.paths, req.get("podman") or ""
    present = list_secrets(p)
    restored, missing = [], []
    hashes = read_json(os.path.join(p["state"], "secrets.json"), {})
    for name, wanted in req["digests"].items():
        if hashes.get(name) == wanted:
            continue
        copy = f"{name}{COPY_SEP}{wanted[:12]}"
        value = secret_value(p, copy, version) if copy in present else None
        if value is None:
            missing.append(name)
            continue
        current = secret_value(p, name, version) if name in present else None
        if current is not None:
            old = digest(p, current)
            backup = f"{name}{COPY_SEP}{old[:12]}"
            if backup not in present:
                create_secret(backup, current, version_tuple(version) >= (4, 7), False)
        create_secret(name, value, version_tuple(version) >= (4, 7), name in present)
        hashes[name] = wanted
        write_json(os.path.join(p["state"], "secrets.json"), hashes)
        restored.append(name)
    return {"restored": restored, "missing": missing}


def op_secret_forget(s, req):
    """After a rollback: drop the values no kept release uses (the failed one among them)."""
    history = read_json(os.path.join(s.paths["state"], "state.json"), {}).get("history") or []
    return {"dropped": forget_secrets(s.paths, history)}


# running, units, files ---------------------------------------------------------------------
def op_run(s, req):
    started = time.time()
    code, tail, killed = run_streaming(s, req["id"], req["argv"], req.get("timeout", 600),
                                       req.get("on_interrupt", "kill"), req.get("data"),
                                       req.get("env"))
    if code != 0 and req.get("check") is not False:
        why = killed or f"exited {code}"
        if req.get("unit_journal"):  # systemctl's own words say nothing: the unit's do
            tail = tail + logs_tail(s.args, started, 12).splitlines()
        raise OpError(f"`{' '.join(req['argv'][:3])} ...` {why}", tail[-15:])
    return {"exit": code, "tail": tail[-15:]}


def op_install_unit(s, req):
    """Write the unit; reload systemd only when it changed; enable it."""
    p = s.paths
    user = ["--user"] if s.args.get("rootless") else []
    changed = read_text(p["unit"]) != req["text"].strip()
    if changed:
        os.makedirs(os.path.dirname(p["unit"]), exist_ok=True)
        write_private(p["unit"], req["text"], 0o644)
        code, _, err = sh(["systemctl", *user, "daemon-reload"])
        if code != 0:
            raise OpError(f"systemctl daemon-reload failed: {err.strip()[-200:]}")
    if not os.path.lexists(p["unit_wants"]):
        code, _, err = sh(["systemctl", *user, "enable", "--quiet", s.args["unit"]])
        if code != 0:
            raise OpError(f"systemctl enable failed: {err.strip()[-200:]}")
    if user:
        ensure_linger(s)
    return {"changed": changed}


def ensure_linger(s):
    """A user's units (and Podman's health timers) die with the last login session unless
    systemd lingers for the user: enable it, or say the one command that does."""
    owner = s.args["owner"]
    if os.path.exists(os.path.join(s.paths["linger_dir"], owner)):
        return
    code, _, err = sh(["loginctl", "enable-linger", owner])
    if code != 0 and os.geteuid() != 0:
        # polkit lets a user linger itself only from an active local session, not over
        # SSH; a user with passwordless sudo (a cloud VM's, the sandbox's) may still
        code = sh(["sudo", "-n", "loginctl", "enable-linger", owner])[0]
    if code != 0 or not os.path.exists(os.path.join(s.paths["linger_dir"], owner)):
        raise OpError(f"rootless mode needs systemd to linger for {owner} (else the agent "
                      f"stops at logout and after a reboot): run `sudo loginctl enable-linger "
                      f"{owner}` on the host once ({err.strip()[-120:] or 'not allowed'})")


def op_dirs(s, req):
    """The agent's data dir (its only writable mount) and the app dir, made if missing,
    never through a link. Podman hands the data dir to the container's user (`:U`)."""
    owner = app_owner(s.args)
    for key in ("app_dir", "data_dir"):
        os.close(open_dir_nofollow(s.args[key], create_owner=owner))
    return {"ok": True}


def op_reload(s, req):
    """Restart the agent inside its running container (SIGHUP to ng-supervise, its PID 1):
    a code change without a new container. Recorded against the container's id, with the
    markers it now runs with; a container made later (a crash, a reboot) reads the markers
    file itself."""
    a, p = s.args, s.paths
    container = container_state(p, a["container"])
    if not container or not container.get("running"):
        raise OpError("the container is not running: nothing to restart in place")
    markers = dict(line.split("=", 1) for line in (read_text(p["markers"]) or "").splitlines()
                   if "=" in line)
    at = time.time()
    if a.get("rootless"):  # the container's PID 1 is another uid's: ask Podman
        code, _, err = sh(["podman", "kill", "--signal", "HUP", a["container"]])
        if code != 0:
            raise OpError(f"podman kill --signal HUP failed: {err.strip()[-200:]}")
    else:
        os.kill(int(container["pid"]), signal.SIGHUP)
    write_json(os.path.join(p["state"], "reload.json"),
               {"cid": container["id"], "markers": markers, "at": at})
    return {"at": at}


def op_write_file(s, req):
    """A root-only file the unit reads (e.g. the release markers); the path is one of the
    session's own, never one the client names."""
    path = s.paths[req["key"]]
    write_private(path, req["text"], 0o600)
    return {"written": req["key"]}


def op_gate(s, req):
    """The container's limits as crun applied them, then health: `podman healthcheck run`
    until it passes or the deadline. An agent that keeps exiting fails the gate at once
    (systemd's restart counter tells), with what it printed before it died."""
    a, p = s.args, s.paths
    started = time.time()
    deadline = time.monotonic() + req["deadline"]
    restarts = int(unit_status(a).get("NRestarts") or 0)
    container, checked_at = None, time.monotonic()
    while time.monotonic() < deadline and not s.gone.is_set():
        container = container_state(p, a["container"])
        if container and container.get("running"):
            break
        if time.monotonic() - checked_at > 2:
            checked_at = time.monotonic()
            unit = unit_status(a)
            if int(unit.get("NRestarts") or 0) - restarts >= 2:
                return {"healthy": False, "container": container, "logs": logs_tail(a, started),
                        "reason": "the agent keeps exiting (last exit status "
                                  f"{unit.get('ExecMainStatus', '?')})"}
        time.sleep(0.3)
    if not container or not container.get("running"):
        return {"healthy": False, "reason": "container is not running",
                "container": container, "logs": logs_tail(a, started)}
    result = {"container": container, "cgroup": cgroup_limits(p, container["pid"])}
    # at most half the deadline: an agent that never beats still gets its checks (and logs)
    wait_first_beat(p, container, time.monotonic() + req["deadline"] / 2, s.gone,
                    newer_than=req.get("since") or 0)
    last = ""
    while time.monotonic() < deadline and not s.gone.is_set():
        code, out, err = sh(["podman", "healthcheck", "run", a["container"]], 60)
        last = (out + err).strip()
        if code == 0:
            result["healthy"] = True
            result["container"] = container_state(p, a["container"]) or container
            return result
        now_state = container_state(p, a["container"])
        if not now_state or not now_state.get("running"):
            break
        time.sleep(1)
    if s.gone.is_set():
        return {"healthy": False, "reason": "interrupted", "container": container}
    result.update(healthy=False, reason=f"not healthy within {req['deadline']}s: "
                  f"{last[-200:] or 'the container stopped'}",
                  container=container_state(p, a["container"], want_health=True),
                  logs=logs_tail(a, started))
    return result


def wait_first_beat(paths, container, until, gone, newer_than=0):
    """Wait until the new agent wrote its first heartbeat (read through the container's own
    root, /proc/PID/root), so the first `podman healthcheck run` - a second of CPU on a
    small VM - is not spent on an agent still starting."""
    name = container.get("heartbeat_file") or "/tmp/nightguard/heartbeat"
    path = os.path.join(paths.get("proc", "/proc"), str(container["pid"]), "root",
                        name.lstrip("/"))
    while time.monotonic() < until and not gone.is_set():
        try:
            st = os.stat(path)
            if st.st_size > 0 and st.st_mtime > newer_than:
                return True
        except OSError:
            if not pid_alive(container["pid"]):
                return False
        time.sleep(0.2)
    return False


def logs_tail(a, since, lines=20):
    """What the agent (and systemd about it) said since `since`: the unit's journal, which
    outlives a container removed with --rm; podman's own log where the journal is empty."""
    user = ["--user"] if a.get("rootless") else []
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since - 1))
    code, out, _ = sh(["journalctl", *user, "-u", a["unit"], "--since", stamp, "-n",
                       str(lines), "-o", "cat", "--no-pager"])
    if code == 0 and out.strip():
        return out[-3000:]
    _, out, err = sh(["podman", "logs", "--tail", str(lines), a["container"]])
    return (out + err)[-3000:]


def unit_status(args):
    user = ["--user"] if args.get("rootless") else []
    code, out, _ = sh(["systemctl", *user, "show", "-p",
                       "ActiveState,NRestarts,ExecMainStatus,ExecMainCode,Result,"
                       "ActiveEnterTimestamp", args["unit"]])
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return values if code == 0 else {}


def op_health(s, req):
    """Everything `inv health` shows, read-only."""
    a, p = s.args, s.paths
    container = container_state(p, a["container"], want_health=True)
    return {
        "container": container,
        "cgroup": cgroup_limits(p, container["pid"]) if container and container.get("pid")
        else {},
        "host": host_memory(p),
        "swaps": [x["path"] for x in swap_facts(p)["swaps"]],
        "lock": None if lock_is_free(p) else lock_holder(p),
        "unit": unit_status(a),
        "last_audit": last_audit(p),
        "deployed": {k: v for k, v in (read_json(os.path.join(p["state"], "state.json"), {})
                                        .get("history") or [{}])[0].items()
                     if k not in ("unit_text", "markers_text")},
        "alerts": alerts_summary(p),
        "base_image": image_info(p, a.get("base_image")),
    }


def op_logs(s, req):
    argv = ["podman", "logs", "--timestamps", "--tail", str(int(req.get("tail", 100)))]
    if req.get("since"):
        argv += ["--since", req["since"]]
    code, out, err = sh(argv + [s.args["container"]], 120)
    return {"exit": code, "text": (out + err)[-200000:]}


def op_history(s, req):
    return {"audit": last_audit(s.paths, count=int(req.get("limit", 50))) or [],
            "state": read_json(os.path.join(s.paths["state"], "state.json"),
                               {"history": []})}


def op_finish(s, req):
    """The client's account of the outcome: the release it made (if its gate passed) and the
    audit line, in one request - the host never says a release is verified while the audit
    says the task was cut short, or the other way round - then unlock."""
    result = {"recorded": req.get("audit") is not None}
    if req.get("release") is not None:
        result.update(op_release(s, {"entry": req["release"], "keep": req.get("keep", 3),
                                     "prune": req.get("prune")}))
    if req.get("audit") is not None:
        s.audit(req["audit"])
    s.finished = True
    return result


def op_unlock(s, req):
    """Stop the session that holds the lock (it writes its own "interrupted" line)."""
    p = s.paths
    if lock_is_free(p):
        return {"released": None}
    holder = lock_holder(p)
    pid = holder.get("pid")
    if not req.get("force"):
        return {"released": None, "held_by": holder}
    cmdline = read_text(f"/proc/{pid}/cmdline") or ""
    if "nightguard-host" not in cmdline:
        raise OpError(f"the lock holder (pid {pid}) is not a nightguard session")
    os.kill(int(pid), signal.SIGTERM)
    for _ in range(100):
        if lock_is_free(p):
            return {"released": holder}
        time.sleep(0.1)
    os.kill(int(pid), signal.SIGKILL)
    time.sleep(0.5)
    return {"released": holder, "killed": True}


# -- the base image ------------------------------------------------------------------------
def op_base(s, req):
    """Pull (or import) the base image; answer its id before and after, so the client
    tags and builds from the base it has really got (`inv deploy --refresh`)."""
    name = req["name"]
    before = image_info(s.paths, name)
    code, tail, killed = run_streaming(s, req["id"], req["argv"], req.get("timeout", 1800),
                                       on_interrupt="kill")
    if code != 0:
        raise OpError(f"`{' '.join(req['argv'][:2])} {name}` {killed or f'exited {code}'}",
                      tail[-15:])
    after = image_info(s.paths, name)
    if after is None:
        raise OpError(f"{name} is not in Podman's storage after `{' '.join(req['argv'][:2])}`")
    return {"before": before, "after": after,
            "changed": (before or {}).get("id") != after.get("id")}


# -- alerts: the watcher -------------------------------------------------------------------
# The same file, run by a systemd timer (imported as the module `watcher`, or run as
# `python3 watcher.py alerts.json`), does one watch pass (see watch_main). Why a timer and
# not the agent unit's own hooks (ExecStopPost=, OnFailure=): a hang never stops the unit,
# so no hook runs for it, only the health check notices; OnFailure= does not fire while
# Restart=always restarts; swap, disk and the dead-man ping need a clock anyway; and a hook
# runs in the agent's stop path, where a slow Telegram would hold up its restart. systemd
# resets ExecMainStatus when the new main process starts, so a pass finds a restart's exit
# reason in systemd's own journal lines about the unit.
WATCH_FILES = ("watch_timer", "watch_service", "watcher", "alerts_args")
STARTING_GRACE = 600  # "starting" for this long (no healthy check) counts as down
SWAP_HYSTERESIS = 5  # percentage points below the threshold before "swap back to normal"
OUTBOX_MAX = 20  # messages kept for the next pass when Telegram cannot be reached
EXIT_LINE = re.compile(r"Main process exited, code=(\w+), status=(\d+)/(\S+)")


def watcher_facts(paths):
    """What of the watcher is installed: its version (a hash of the copy, as hostlink
    names helpers), its settings (never a token: there is none in them), its units."""
    source = read_text_bytes(paths["watcher"])
    return {"present": any(os.path.lexists(paths[k]) for k in WATCH_FILES),
            "version": sha256_bytes(source)[:16] if source is not None else None,
            "config": (read_json(paths["alerts_args"], {}) or {}).get("config"),
            "service": read_text(paths["watch_service"]),
            "timer": read_text(paths["watch_timer"]),
            "enabled": os.path.lexists(paths["watch_timer_wants"])}


def read_text_bytes(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def op_watcher(s, req):
    """Install, update or remove the watcher: this helper's own file copied to a stable
    path, its arguments (0600, no token), a oneshot service and its timer."""
    a, p = s.args, s.paths
    user = ["--user"] if a.get("rootless") else []
    timer = f"{WATCH_UNIT}.timer"
    if req["action"] == "remove":
        if os.path.lexists(p["watch_timer_wants"]) or os.path.exists(p["watch_timer"]):
            sh(["systemctl", *user, "disable", "--now", "--quiet", timer])
        removed = [k for k in (*WATCH_FILES, "alerts_state") if _unlink(p[k])]
        _unlink(p["alerts_state"] + ".lock")
        _drop_bytecode(p["watcher"])
        code, _, err = sh(["systemctl", *user, "daemon-reload"])
        if code != 0:
            raise OpError(f"systemctl daemon-reload failed: {err.strip()[-200:]}")
        return {"removed": removed}
    source = read_text_bytes(os.path.expanduser(a["helper_path"]))
    if source is None or sha256_bytes(source)[:16] != a.get("helper_version"):
        raise OpError("this helper's own file is not at hand to copy as the watcher")
    os.makedirs(p["state"], mode=0o700, exist_ok=True)
    changed = []
    if read_text_bytes(p["watcher"]) != source:
        _drop_bytecode(p["watcher"])  # Python checks a source's mtime in seconds and size
        write_private(p["watcher"], source, 0o600)
        changed.append("watcher")
    args = {"config": req["config"], "unit": a["unit"], "container": a["container"],
            "rootless": bool(a.get("rootless")), "paths": a.get("paths") or {}}
    if read_json(p["alerts_args"], None) != args:
        write_json(p["alerts_args"], args)
        changed.append("args")
    units = [key for key, text in (("watch_service", req["service"]),
                                   ("watch_timer", req["timer"]))
             if read_text(p[key]) != text.strip()]
    for key in units:
        os.makedirs(os.path.dirname(p[key]), exist_ok=True)
        write_private(p[key], req["service" if key == "watch_service" else "timer"], 0o644)
    if units:
        code, _, err = sh(["systemctl", *user, "daemon-reload"])
        if code != 0:
            raise OpError(f"systemctl daemon-reload failed: {err.strip()[-200:]}")
    if not os.path.lexists(p["watch_timer_wants"]):
        argv = ["systemctl", *user, "enable", "--now", "--quiet", timer]
    elif "watch_timer" in units:  # a new schedule takes effect when the timer restarts
        argv = ["systemctl", *user, "restart", timer]
    else:
        argv = None
    if argv:
        code, _, err = sh(argv)
        if code != 0:
            raise OpError(f"`{' '.join(argv[:3])} {timer}` failed: {err.strip()[-200:]}")
    return {"changed": changed + units}


def _drop_bytecode(script):
    """The watcher's compiled bytecode (the service imports it: __pycache__ beside it)."""
    folder = os.path.join(os.path.dirname(script), "__pycache__")
    stem = os.path.basename(script)[:-3] + "."
    for name in _listdir(folder):
        if name.startswith(stem) and name.endswith(".pyc"):
            _unlink(os.path.join(folder, name))


def _unlink(path):
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def op_alert_test(s, req):
    """`inv alerts.test`: one message through the watcher's own path (its arguments, the
    bot's token read here, sendMessage); the answer says whether Telegram took it."""
    args = read_json(s.paths["alerts_args"], None)
    if not isinstance(args, dict) or not args.get("config"):
        raise OpError("no alert watcher on this host: set nightguard.alerts.enabled and "
                      "nightguard.alerts.chat_id, then `inv deploy`")
    conf = args["config"]
    token = bot_token(s.paths, conf)
    if token is None:
        raise OpError(f"the bot's token (secret {conf['secret']}) cannot be read on the host")
    text = (f"Night Guard on {socket.gethostname()}: a test message (`inv alerts.test`, "
            f"{now()}). Alerts reach you here.")
    answer = telegram_send(conf, token, text)
    return dict(answer, chat_id=conf["chat_id"], api_base=conf["api_base"])


def alerts_summary(paths):
    """For `inv health`: whether the watcher runs, and when it last said or pinged."""
    if not os.path.exists(paths["alerts_args"]):
        return {"installed": False}
    state = read_json(paths["alerts_state"], {}) or {}
    return {"installed": True, "enabled": os.path.lexists(paths["watch_timer_wants"]),
            **{k: state.get(k) for k in ("last_pass", "last_alert", "last_ping", "status",
                                          "held", "last_error")},
            "outbox": len(state.get("outbox") or [])}


# the watcher's pure rules: a state, what one pass saw, and the settings in; the new state
# and the messages out (unit-tested table by table) -------------------------------------------
def agent_status(container, unit):
    """(status, detail): healthy, unhealthy (a health check failing: Podman's failing
    streak, which checks in the start period do not raise), starting (no passed check
    yet, or systemd (re)starting it), down (the unit stopped or failed)."""
    active = unit.get("ActiveState") or ""
    if not container or not container.get("running"):
        if active in ("inactive", "failed"):
            result = unit.get("Result") or "?"
            return "down", f"the unit is {active} (result {result}), no container runs"
        return "starting", f"no container runs; the unit is {active or 'unknown'}"
    streak = int(container.get("failing_streak") or 0)
    if container.get("health") == "unhealthy" or streak > 0:
        log = container.get("health_log") or []
        output = (log[-1].get("output") or "").strip() if log else ""
        return "unhealthy", (f"{streak} failed check(s) in a row"
                             + (f": {output[-200:]}" if output else ""))
    if container.get("health") == "healthy":
        return "healthy", ""
    return "starting", "its health check has not passed yet"


def describe_exit(code, status, name, was_unhealthy):
    """(kind, text) of one exit of the unit's main process, from systemd's line
    "Main process exited, code=exited, status=3/NOTIMPLEMENTED"."""
    if (code == "exited" and status == "137") or (code == "killed" and name == "KILL"):
        if was_unhealthy:
            return "health kill", "killed after failing its health check (SIGKILL, exit 137)"
        return "crash", "killed by SIGKILL (exit 137: out of memory, or a kill)"
    if code == "exited":
        return "crash", f"crashed: exited with status {status}"
    if code == "dumped":
        return "crash", f"crashed with a core dump (signal {name})"
    if code == "killed":
        return "crash", f"killed by signal {name}"
    return "crash", f"ended ({code} {status})"


def minutes_text(seconds):
    seconds = max(0, int(seconds))
    return f"{seconds // 60} min" if seconds >= 120 else f"{seconds} s"


def transitions(state, obs, conf, now_t):
    """One pass: (new state, [(kind, text)]). One message per transition: healthy ->
    unhealthy / down, a restart (with its exit reason), a crash loop (N restarts in M
    minutes; restarts inside a loop say nothing more), swap or disk over a threshold and
    back, and back to healthy once the owner was told of a problem (not inside a loop)."""
    state = dict(state)
    out = []
    host = obs.get("host") or "the host"

    def say(kind, text):
        out.append([kind, f"Night Guard on {host}: {text}"])

    prev, cur = state.get("status"), obs["status"]
    if cur != prev:
        state["since"] = now_t
    # a health check was failing, and no check has passed since: a kill then is its doing
    # (a pass may fall between the kill and the restart, and see "starting")
    failing = prev == "unhealthy" or bool(state.get("failing"))
    # restarts: systemd's counter of automatic restarts (a deploy's restart resets it)
    count, last_count = obs.get("nrestarts"), state.get("nrestarts")
    new = count - last_count if count is not None and last_count is not None \
        and count > last_count else 0
    if count is not None:
        state["nrestarts"] = count
    loop = conf["crash_loop"]
    restarts = [t for t in state.get("restarts") or [] if now_t - t < loop["minutes"] * 60]
    restarts += [now_t] * new
    state["restarts"] = restarts
    looping = len(restarts) >= loop["restarts"]
    if new:
        exits = (obs.get("exits") or [])[-new:]
        reasons = [describe_exit(*e, was_unhealthy=failing)[1] for e in exits]
        why = "; ".join(reasons) or "the exit reason is not in the journal"
        if looping and not state.get("crash_loop"):
            say("crash loop", f"CRASH LOOP: {len(restarts)} restarts in the last "
                f"{loop['minutes']} min, systemd keeps restarting it (last: "
                f"{reasons[-1] if reasons else why}).")
        elif not state.get("crash_loop"):
            say("restart", f"RESTARTED: {why}.")
        state["problem"] = True
        state.setdefault("problem_since", now_t)
    state["crash_loop"] = looping
    # the agent's health
    detail = obs.get("detail") or ""
    if cur == "unhealthy" and prev != "unhealthy":
        say("unhealthy", f"UNHEALTHY: {detail}.")
    elif cur == "down" and prev != "down":
        say("down", f"DOWN: {detail}.")
    stuck = cur == "starting" and now_t - state.get("since", now_t) >= STARTING_GRACE
    if stuck and not state.get("stuck"):
        say("down", f"DOWN: not healthy for {minutes_text(now_t - state['since'])} "
            f"({detail}).")
    state["stuck"] = stuck
    if cur in ("unhealthy", "down") or stuck:
        state["problem"] = True
        state.setdefault("problem_since", now_t)
    if cur == "healthy" and state.get("problem") and not looping:
        since = state.get("problem_since", now_t)
        say("recovered", f"healthy again (the trouble lasted {minutes_text(now_t - since)}).")
        state["problem"] = False
        state.pop("problem_since", None)
    state["status"] = cur
    if cur in ("unhealthy", "healthy"):
        state["failing"] = cur == "unhealthy"
    # the host
    threshold, used = conf["swap_percent"], obs.get("swap_pct")
    if threshold and used is not None:
        if not state.get("swap_high") and used >= threshold:
            say("swap", f"SWAP {used:.0f}% used (alert at {threshold}%): memory is short.")
            state["swap_high"] = True
        elif state.get("swap_high") and used < threshold - SWAP_HYSTERESIS:
            say("swap ok", f"swap back to {used:.0f}% used.")
            state["swap_high"] = False
    floor, free = conf["disk_free_mb"], obs.get("disk_free_mb")
    if floor and free is not None:
        if not state.get("disk_low") and free < floor:
            say("disk", f"DISK {free} MB free (alert below {floor} MB).")
            state["disk_low"] = True
        elif state.get("disk_low") and free >= floor * 1.1:
            say("disk ok", f"disk back to {free} MB free.")
            state["disk_low"] = False
    return state, out


def rate_limit(state, messages, conf, now_t, summary):
    """(state, messages to send): at most N delivered per M minutes. What is over is held
    back and counted; the next message says how many were, and once there is room again
    with nothing new to say, one message tells the count and how things are now."""
    state = dict(state)
    window = conf["rate_limit"]["minutes"] * 60
    sent = [t for t in state.get("sent") or [] if now_t - t < window]
    room = max(conf["rate_limit"]["messages"] - len(sent), 0)
    held_before = int(state.get("held") or 0)
    go = [list(m) for m in messages[:room]]
    held_now = len(messages[room:])
    if held_before and go:
        go[0][1] += f" ({held_before} alert(s) before this one were held back by the rate limit)"
        held_before = 0
    elif held_before and room:
        go = [["held", f"{held_before} alert(s) were held back by the rate limit; now: "
                       f"{summary}."]]
        held_before = 0
    state["sent"] = sent
    state["held"] = held_before + held_now
    return state, go


def ping_due(state, obs_status, conf, now_t):
    """The dead-man switch: "ok" every ping_every while healthy, "fail" when it is not
    (at once on the change, then at the same pace); None while starting or unset."""
    if not conf.get("ping_url"):
        return None
    if state.get("crash_loop") or state.get("stuck") or obs_status in ("unhealthy", "down"):
        kind = "fail"
    elif obs_status == "healthy":
        kind = "ok"
    else:
        return None
    last = state.get("last_ping") or {}
    if last.get("kind") == kind and last.get("ok") and \
            now_t - float(last.get("t") or 0) < conf["ping_every"]:
        return None
    return kind


# the watcher's side effects ----------------------------------------------------------------
def bot_token(paths, conf):
    """The bot's token, read when a message goes out: Podman's secret, never a file of
    ours, an argv or the journal."""
    version = podman_version(paths, find_tools(paths), may_cache=False) or ""
    value = secret_value(paths, conf["secret"], version)
    return value.decode().strip() if value else None


def redact(text, token):
    return text.replace(token, "[REDACTED]") if token else text


def telegram_send(conf, token, text, timeout=10):
    """sendMessage (POST, JSON) to the owner's chat; arrived = ok true with a message_id."""
    import urllib.error
    import urllib.request

    chat = conf["chat_id"]
    body = json.dumps({"chat_id": int(chat) if re.fullmatch(r"-?\d+", chat) else chat,
                       "text": redact(text, token)[:4000],
                       "disable_web_page_preview": True}).encode()
    request = urllib.request.Request(f"{conf['api_base'].rstrip('/')}/bot{token}/sendMessage",
                                     data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, data = response.status, response.read(65536)
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read(65536)
        exc.close()
    except (OSError, ValueError) as exc:  # unreachable, refused, timed out
        return {"ok": False, "status": None,
                "error": redact(f"{type(exc).__name__}: {exc}", token)[:200]}
    try:
        answer = json.loads(data)
    except ValueError:
        answer = {}
    result = answer.get("result") if isinstance(answer, dict) else None
    message_id = result.get("message_id") if isinstance(result, dict) else None
    return {"ok": bool(answer.get("ok")) and message_id is not None, "status": status,
            "message_id": message_id,
            "description": redact(str(answer.get("description") or ""), token)[:200]}


def send_ping(url, timeout=10):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, method="GET",
                                     headers={"User-Agent": "nightguard-watch"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return {"ok": 200 <= response.status < 300, "status": response.status}
    except urllib.error.HTTPError as exc:
        exc.close()
        return {"ok": False, "status": exc.code}
    except (OSError, ValueError) as exc:
        return {"ok": False, "status": None, "error": type(exc).__name__}


def restart_exits(args, since):
    """(code, status, name) of each exit of the unit's main process since `since`, from
    the journal lines systemd itself wrote about the unit."""
    unit = args["unit"]
    if args.get("rootless"):
        argv = ["journalctl", "--user", "-u", unit]
    else:
        argv = ["journalctl", "_PID=1", f"UNIT={unit}"]
    code, out, _ = sh(argv + ["--since", f"@{int(since)}", "-o", "cat", "--no-pager",
                              "-q", "-n", "200"], 30)
    return [list(m.groups()) for m in EXIT_LINE.finditer(out)] if code == 0 else []


def observe(args, paths, state, now_t):
    """What one pass sees, from files and one `systemctl show` (the journal only after a
    restart; podman only where Podman's files lack the health log)."""
    unit = unit_status(args)
    container = container_state(paths, args["container"], want_health=True)
    status, detail = agent_status(container, unit)
    try:
        count = int(unit["NRestarts"])
    except (KeyError, ValueError):
        count = None
    exits = []
    if count is not None and state.get("nrestarts") is not None and count > state["nrestarts"]:
        # a wide window: systemd's stop and restart can outlast a pass, and the newest
        # `new` exits are the ones taken
        exits = restart_exits(args, (state.get("last_pass_t") or now_t) - 300)
    memory = host_memory(paths)
    swap_total, swap_free = memory.get("swap_total") or 0, memory.get("swap_free") or 0
    return {"status": status, "detail": detail, "nrestarts": count, "exits": exits,
            "swap_pct": 100.0 * (swap_total - swap_free) / swap_total if swap_total else None,
            "disk_free_mb": int(memory["disk_free"] // (1024 * 1024)),
            "host": socket.gethostname()}


def watch_pass(args, now_t=None):
    """One pass: observe, decide, send, ping, remember. Returns the line it prints."""
    paths = default_paths(args)
    conf = args["config"]
    now_t = time.time() if now_t is None else now_t
    state = read_json(paths["alerts_state"], {}) or {}
    if not lock_is_free(paths):  # a deploy restarts the agent on purpose: not news
        state.update(last_pass=now(), last_pass_t=now_t, skipped="a deploy holds the lock")
        write_json(paths["alerts_state"], state)
        return "watch: a deploy holds the lock; skipped"
    obs = observe(args, paths, state, now_t)
    state, messages = transitions(state, obs, conf, now_t)
    outbox = [m for m in state.pop("outbox", None) or []]
    state, messages = rate_limit(state, outbox + messages, conf, now_t,
                                 obs["status"] + (" (crash loop)" if state.get("crash_loop")
                                                  else ""))
    sent, error = [], None
    if messages:
        token = bot_token(paths, conf)
        for index, (kind, text) in enumerate(messages):
            answer = telegram_send(conf, token, text) if token else \
                {"ok": False, "error": f"the bot's token (secret {conf['secret']}) "
                                       "cannot be read"}
            if not answer["ok"]:
                error = answer.get("error") or answer.get("description") or \
                    f"HTTP {answer.get('status')}"
                state["outbox"] = messages[index:][-OUTBOX_MAX:]
                break
            sent.append(kind)
            state["sent"].append(now_t)
            state["last_alert"] = {"at": now(), "kind": kind, "text": text[:300],
                                   "message_id": answer.get("message_id")}
    ping = ping_due(state, obs["status"], conf, now_t)
    if ping:
        url = conf["ping_url"].rstrip("/") + ("/fail" if ping == "fail" else "")
        answer = send_ping(url)
        state["last_ping"] = {"at": now(), "t": now_t, "kind": ping, "ok": answer["ok"],
                              "status": answer.get("status")}
    state.update(last_pass=now(), last_pass_t=now_t, last_error=error)
    state.pop("skipped", None)
    write_json(paths["alerts_state"], state)
    line = f"watch: {obs['status']}"
    if sent:
        line += f"; sent {', '.join(sent)}"
    if error:
        line += f"; not sent ({error}), {len(state.get('outbox') or [])} kept for the next pass"
    if state.get("held"):
        line += f"; {state['held']} held back by the rate limit"
    if ping:
        line += f"; ping {ping} {'delivered' if state['last_ping']['ok'] else 'failed'}"
    return line


def watch_main(argv):
    """One watch pass: `python3 watcher.py ARGS_FILE`, or `import watcher;
    watcher.watch_main([ARGS_FILE])` as nightguard-watch.service runs it (the import keeps
    the compiled bytecode).
    One line to the journal; exit 0 even when Telegram is unreachable (the messages wait
    in the state file), 2 when the arguments cannot be read."""
    args = read_json(argv[0], None) if len(argv) == 1 else None
    if not isinstance(args, dict) or not isinstance(args.get("config"), dict):
        sys.stderr.write("usage: watcher.py ARGS_FILE (a JSON file the deploy writes)\n")
        return 2
    paths = default_paths(args)
    fd = os.open(paths["alerts_state"] + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print("watch: another pass is running; skipped")
        return 0
    try:
        print(watch_pass(args), flush=True)
    finally:
        os.close(fd)
    return 0


# -- `inv exec`: a command in the agent's container -------------------------------------------
AGENT_USER = "1000:1000"  # the image's USER: who the agent runs as (it owns /run/secrets/*)


def op_exec(s, req):
    """A command in the agent's running container: `podman exec --user AGENT NAME ARGV...`
    (uid 0 only when ``root`` is asked for), the argv as sent, never through a shell. Its
    output comes back as progress lines tagged "o" (stdout) or "e" (stderr), each the raw
    text with its newline; the answer is its exit code. No stdin; it is ended when the
    client goes away."""
    a = s.args
    container = container_state(s.paths, a["container"])
    if not container:
        raise OpError(f"the container {a['container']} does not exist on this host "
                      "(`inv deploy` creates it)")
    if not container.get("running"):
        raise OpError(f"the container {a['container']} is not running "
                      f"({container.get('status') or 'stopped'}): `inv health` says why")
    command = [str(word) for word in req.get("argv") or []]
    if not command:
        raise OpError("no command to run")
    argv = ["podman", "exec", "--user", "0:0" if req.get("root") else AGENT_USER,
            a["container"], *command]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        raise OpError(f"podman: {exc.strerror or exc}") from None

    def pump(stream, tag):
        for raw in iter(lambda: stream.readline(65536), b""):
            s.send({"id": req["id"], "progress": tag + raw.decode("utf-8", "replace")})

    pumps = [threading.Thread(target=pump, args=(proc.stdout, "o"), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, "e"), daemon=True)]
    for thread in pumps:
        thread.start()
    while proc.poll() is None:
        if s.gone.is_set():
            end_process(proc)
            break
        time.sleep(0.05)
    for thread in pumps:
        thread.join(5)
    return {"exit": proc.returncode}


# -- `inv remove`: the deployment off the host -------------------------------------------------
STATE_KEPT = ("audit.log", "lock", "lock.json")  # what a removal leaves in the state dir
STATE_UNCOUNTED = ("helper",)  # this session's own copy of the helper: removed, not counted


def our_secrets(present, names):
    """The secrets of this deployment among those present: NAME and its kept values
    NAME__<digest12>."""
    wanted = set(names)
    return sorted(n for n in present if n in wanted or (
        COPY_SEP in n and n.rsplit(COPY_SEP, 1)[0] in wanted
        and re.fullmatch(r"[0-9a-f]{12}", n.rsplit(COPY_SEP, 1)[1])))


def swap_present(paths):
    facts = swap_facts(paths)
    active = any(x["path"] == paths["swapfile"] for x in facts["swaps"])
    return active, (active or os.path.lexists(paths["swapfile"]) or facts["swap_in_fstab"]
                    or os.path.lexists(paths["sysctl_conf"]))


def removal(s, req):
    """What of this deployment is on the host, in the order `remove` takes it off:
    ([(key, words)], [words of what stays])."""
    a, p = s.args, s.paths
    found, kept = [], []
    unit = unit_status(a)
    if os.path.lexists(p["unit"]) or os.path.lexists(p["unit_wants"]) or \
            unit.get("ActiveState") not in (None, "", "inactive"):
        found.append(("unit", f"the systemd unit {a['unit']} (stopped, disabled, its file)"))
    images, secrets, containers = storage_names(p)
    if container_state(p, a["container"], containers=containers):
        found.append(("container", f"the container {a['container']}"))
    if watcher_facts(p)["present"]:
        found.append(("watcher", f"the alert watcher ({WATCH_UNIT}.timer and .service)"))
    _, tags = list_images(p, a["image_name"], images)
    if tags:
        found.append(("images", f"{len(tags)} image(s) {a['image_name']}:*"))
    ours = our_secrets(list_secrets(p, secrets), req.get("secrets") or [])
    if ours:
        found.append(("secrets", f"{len(ours)} Podman secret(s): {', '.join(ours)}"))
    if os.path.lexists(a["app_dir"]):
        found.append(("app_dir", f"the app dir {a['app_dir']} (the synced code)"))
    if [n for n in _listdir(p["state"]) if n not in STATE_KEPT + STATE_UNCOUNTED]:
        found.append(("state", f"the deploy state in {p['state']} (releases, records; "
                      "its audit.log stays)"))
    if os.path.lexists(a["data_dir"]):
        if req.get("delete_data"):
            found.append(("data_dir", f"the data dir {a['data_dir']} (the agent's data)"))
        else:
            kept.append(f"the data dir {a['data_dir']} (`inv remove --data` deletes it)")
    present = swap_present(p)[1]
    if present and req.get("swap"):
        found.append(("swap", f"the swapfile {p['swapfile']} (swapoff, fstab, swappiness)"))
    elif present:
        kept.append(f"the swapfile {p['swapfile']} (`inv remove --swap` removes it)")
    return found, kept


def op_remove_plan(s, req):
    """Read-only: what `remove` would take off this host, and the host's name (which a
    user types to confirm deleting the data dir)."""
    found, kept = removal(s, req)
    return {"found": [words for _, words in found], "kept": kept,
            "hostname": socket.gethostname()}


def remove_path(s, path):
    """Remove a file or a whole tree at an absolute path, never following a link (a link
    is removed, not its target)."""
    parent, name = os.path.split(path.rstrip("/"))
    try:
        parent_fd = open_dir_nofollow(parent)
    except FileNotFoundError:
        return
    try:
        remove_tree_at(parent_fd, name)
    except FileNotFoundError:
        pass
    except PermissionError:
        if not s.args.get("rootless"):
            raise
        # rootless: the agent's files belong to sub-uids only the user namespace may remove
        code, _, err = sh(["podman", "unshare", "rm", "-rf", "--", path], 600)
        if code != 0:
            raise OpError(f"cannot remove {path}: {err.strip()[-200:]}") from None
    finally:
        os.close(parent_fd)


def checked(argv, what, timeout=300):
    code, _, err = sh(argv, timeout)
    if code != 0:
        raise OpError(f"`{' '.join(argv[:3])} ...` failed ({what}): {err.strip()[-200:]}",
                      err.strip().splitlines()[-10:])


def op_remove(s, req):
    """Take this deployment off the host: unit, container, alert watcher, images, secrets
    (and their kept values), app dir, the deploy state (its audit log stays: the session's
    own line goes there), then the data dir and the swapfile when asked. Each part is
    looked at again and taken off only if present, so a removal cut half-way is finished
    by the next one."""
    a, p = s.args, s.paths
    user = ["--user"] if a.get("rootless") else []
    found, kept = removal(s, req)
    todo = dict(found)
    for key, words in found:
        s.progress(req["id"], f"removing {words}")
        if key == "unit":
            if unit_status(a).get("ActiveState") not in (None, "", "inactive"):
                checked(["systemctl", *user, "stop", a["unit"]], "stop the agent", 360)
            if os.path.lexists(p["unit_wants"]):
                checked(["systemctl", *user, "disable", "--quiet", a["unit"]], "disable")
            _unlink(p["unit"])
            _unlink(p["unit_wants"])
            checked(["systemctl", *user, "daemon-reload"], "daemon-reload")
            sh(["systemctl", *user, "reset-failed", a["unit"]])  # a failed unit's record
        elif key == "container":
            checked(["podman", "rm", "--force", "--ignore", a["container"]], "container")
        elif key == "watcher":
            op_watcher(s, {"action": "remove"})
        elif key == "images":
            _, tags = list_images(p, a["image_name"])
            checked(["podman", "rmi", "--ignore",
                     *[f"{a['image_name']}:{t}" for t in tags]], "images")
        elif key == "secrets":
            ours = our_secrets(list_secrets(p), req.get("secrets") or [])
            if ours:
                checked(["podman", "secret", "rm", *ours], "secrets")
        elif key == "app_dir":
            remove_path(s, a["app_dir"])
        elif key == "state":
            for name in _listdir(p["state"]):
                if name not in STATE_KEPT:
                    remove_path(s, os.path.join(p["state"], name))
        elif key == "data_dir":
            remove_path(s, a["data_dir"])
        elif key == "swap":
            if swap_present(p)[0]:
                checked(["swapoff", p["swapfile"]], "swapoff", 600)
            fstab = read_text(p["fstab"])
            if fstab is not None:
                lines = [line for line in fstab.splitlines()
                         if line.split()[:1] != [p["swapfile"]]]
                if len(lines) != len(fstab.splitlines()):
                    write_private(p["fstab"], "\n".join(lines) + "\n", 0o644)
            _unlink(p["sysctl_conf"])
            _unlink(p["swapfile"])
    if "state" not in todo:  # this session's own copy of the helper goes in any case
        for name in STATE_UNCOUNTED:
            remove_path(s, os.path.join(p["state"], name))
    return {"removed": [words for _, words in found], "kept": kept}


OPS = {"facts": op_facts, "provision": op_provision, "swap": op_swap, "rm_env": op_rm_env,
       "sync": op_sync, "release": op_release, "restore_code": op_restore_code,
       "secret_put": op_secret_put, "secret_restore": op_secret_restore,
       "secret_forget": op_secret_forget, "run": op_run, "install_unit": op_install_unit,
       "write_file": op_write_file, "dirs": op_dirs, "reload": op_reload, "gate": op_gate,
       "health": op_health, "logs": op_logs, "history": op_history, "finish": op_finish,
       "unlock": op_unlock, "base": op_base, "watcher": op_watcher,
       "alert_test": op_alert_test, "apt_wait": op_apt_wait, "exec": op_exec,
       "remove_plan": op_remove_plan, "remove": op_remove}
# ops a read-only session may run (alert_test sends a message and exec runs a command in the
# container: neither changes anything of the deployment's)
READ_ONLY = {"facts", "health", "logs", "history", "unlock", "alert_test", "apt_wait", "exec",
             "remove_plan"}


def handle(s, request):
    op = request.get("op")
    if op not in OPS or (not s.changing and op not in READ_ONLY):
        s.send({"id": request.get("id"), "ok": False, "error": f"op {op!r} not allowed"})
        return
    step = request.get("step") or op
    s.current = step
    try:
        result = OPS[op](s, request)
    except OpError as exc:
        s.journal.append(f"{step} (failed)")
        s.send({"id": request["id"], "ok": False, "error": str(exc), "tail": exc.tail})
    except Exception as exc:  # noqa: BLE001 - one line to the client, never a hang
        s.journal.append(f"{step} (failed)")
        s.send({"id": request["id"], "ok": False,
                "error": f"{type(exc).__name__}: {exc}"[:400]})
    else:
        if request.get("record", op not in READ_ONLY and op != "finish"):
            s.journal.append(step)
        s.send({"id": request["id"], "ok": True, "result": result})
    finally:
        if s.gone.is_set() and s.during is None:
            s.during = step  # the audit names the step the client left in
        s.current = None


def main(args):
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    s = Session(args, stdin, stdout)

    def stop(signum, frame):  # SIGTERM/SIGHUP/SIGINT: finish the step, then audit
        s.gone.set()
        s.requests.put(None)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, stop)
    state = s.paths["state"]
    if s.changing or os.path.isdir(state):
        os.makedirs(state, mode=0o700, exist_ok=True)
        if os.stat(state).st_mode & 0o077:
            os.chmod(state, 0o700)
    hello = {"hello": True, "pid": os.getpid()}
    if s.changing:
        hello["lock"] = s.take_lock()
        if not hello["lock"]["acquired"]:
            s.send(hello)
            return
    s.send(hello)
    threading.Thread(target=s.reader, daemon=True).start()
    try:
        while True:
            request = s.requests.get()
            if request is None or s.gone.is_set() and request.get("op") != "finish":
                break
            handle(s, request)
            if request.get("op") == "finish" or s.finished:
                break
    finally:
        s.close()


if __name__ == "__main__" and "ARGS" not in globals():
    # the watcher: this file run as a script with an arguments file (nightguard-watch)
    sys.exit(watch_main(sys.argv[1:]))
elif __name__ == "__main__":
    main(ARGS)  # noqa: F821 - ARGS is set by the bootstrap line that runs this text
    # The reader thread may still wait on stdin (the client keeps it open after `finish`;
    # a SIGTERM comes at any time): the interpreter's shutdown would abort on it ("Fatal
    # Python error: _enter_buffered_busy", SIGABRT, a core dump on some hosts).
    os._exit(0)
