"""apt and dpkg: who holds their locks (named as a person knows them), waiting for
them without ever killing a holder, and what is still to install."""

import fcntl
import os
import re
import socket
import struct
import time

from .base import OpError, read_text, sh

# who holds apt's and dpkg's locks (statedir.APT_LOCKS) in a new VM's first hour
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
