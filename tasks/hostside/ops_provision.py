"""Ops that prepare the host: packages (apt, after waiting for its locks) and the
swapfile."""

import os
import time

from .aptlock import LOCK_BUSY, apt_busy_error, missing_packages, wait_for_apt
from .base import OpError, read_text, run_streaming, sh
from .host_facts import swap_facts


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
