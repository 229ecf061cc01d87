"""Where things are on this host (``default_paths``; a test moves any of them) and
what the state dir says about the deploy lock, the last task, and a systemd reload owed
(``write_units``)."""

import contextlib
import fcntl
import json
import os

from ..contract import (
    ALERTS_ARGS_FILE,
    ROOTLESS_STATE,
    STATE_DIR,
    SWAPFILE,
    WATCH_UNIT,
    WATCHER_FILE,
)
from .base import OpError, pid_alive, read_json, read_text, sh, write_private

APT_LOCKS = ("/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock", "/var/lib/apt/lists/lock",
             "/var/cache/apt/archives/lock")


def default_paths(a):
    """Where things are on this host; a test moves any of them with args["paths"]."""
    unit = a["unit"]
    if a.get("rootless"):
        uid, home = os.getuid(), os.path.expanduser("~")
        state = os.path.expanduser(ROOTLESS_STATE)
        graph = f"{home}/.local/share/containers/storage"
        run, units = f"/run/user/{uid}", f"{home}/.config/systemd/user"
        runroot, wants = f"/run/user/{uid}/containers", f"{units}/default.target.wants/{unit}"
    else:
        state, graph = STATE_DIR, "/var/lib/containers/storage"
        run, units = "/run", "/etc/systemd/system"
        runroot, wants = "/run/containers/storage", f"{units}/multi-user.target.wants/{unit}"
    paths = {"state": state, "graphroot": graph, "runroot": runroot, "run": run,
             "unit": f"{units}/{unit}", "unit_wants": wants,
             "markers": f"{state}/{a['container']}.release.env",
             "swapfile": SWAPFILE, "fstab": "/etc/fstab", "proc_swaps": "/proc/swaps",
             "sysctl_conf": "/etc/sysctl.d/99-nightguard.conf",
             "swappiness": "/proc/sys/vm/swappiness", "os_release": "/etc/os-release",
             "systemd_run": "/run/systemd/system", "apt_sources": "/etc/apt",
             "linger_dir": "/var/lib/systemd/linger",
             "cgroup_controllers": "/sys/fs/cgroup/cgroup.controllers",
             "proc": "/proc", "cgroup": "/sys/fs/cgroup",
             "meminfo": "/proc/meminfo", "disk": "/", "apt_locks": list(APT_LOCKS),
             # the alert watcher: a copy of this file, its arguments, its state, its units
             "watcher": f"{state}/{WATCHER_FILE}", "alerts_args": f"{state}/{ALERTS_ARGS_FILE}",
             "alerts_state": f"{state}/alerts-state.json",
             "watch_service": f"{units}/{WATCH_UNIT}.service",
             "watch_timer": f"{units}/{WATCH_UNIT}.timer",
             "watch_timer_wants": f"{units}/timers.target.wants/{WATCH_UNIT}.timer",
             # a pass right after each start of the agent (the watcher's own drop-in)
             "watch_dropin": f"{units}/{unit}.d/{WATCH_UNIT}.conf"}
    paths.update(a.get("paths") or {})
    return paths


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


# A unit file written and not yet read by systemd (the run was cut between the write and its
# daemon-reload) looks, by its text, like one already in force: the next run would skip it and
# systemd would keep the old definition. A mark per writer, set before the first write and
# cleared after the reload, makes the next run's facts say so and its step finish the job.
RELOAD_OWED = "systemd-reload-owed."


def reload_owed(paths):
    """The writers ("unit", "watcher") whose unit files systemd has not read since."""
    prefix = RELOAD_OWED
    try:
        names = os.listdir(paths["state"])
    except OSError:
        return []
    return sorted(n[len(prefix):] for n in names if n.startswith(prefix))


@contextlib.contextmanager
def reload_after(paths, writer, user=()):
    """Around a change to ``writer``'s unit files: the mark before it, systemd's
    daemon-reload and the mark's removal after it (a failed reload leaves the mark)."""
    mark = os.path.join(paths["state"], RELOAD_OWED + writer)
    os.makedirs(paths["state"], mode=0o700, exist_ok=True)
    write_private(mark, "")
    yield
    code, _, err = sh(["systemctl", *user, "daemon-reload"])
    if code != 0:
        raise OpError(f"systemctl daemon-reload failed: {err.strip()[-200:]}")
    os.unlink(mark)


def write_units(paths, writer, files, user=()):
    """Writes those of ``files`` ({path: text}) that differ from the host's, then has
    systemd read them again, once; also when an earlier run of this writer was cut before
    its reload. Returns (the paths written, whether systemd was reloaded)."""
    owed = writer in reload_owed(paths)
    written = [path for path, text in files.items() if read_text(path) != text.strip()]
    if not written and not owed:
        return [], False
    with reload_after(paths, writer, user):
        for path in written:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_private(path, files[path], 0o644)
    return written, True
