"""Ops on the agent's unit and container: a command run (the build, a restart), the
unit file, a root-only file the unit reads, a restart in place, the health gate, and
the health and logs `inv health` / `inv logs` read."""

import os
import signal
import time

from ..contract import HEARTBEAT_FILE, MOVE_MARK_FILE
from .agent_beat import token_state
from .base import (
    OpError,
    pid_alive,
    podman_logs,
    read_json,
    read_text,
    run_streaming,
    sh,
    write_json,
    write_private,
)
from .host_facts import cgroup_limits, host_memory, logs_tail, swap_facts, unit_status
from .ops_alerts import alerts_summary
from .podman_store import container_state, image_info
from .statedir import last_audit, lock_holder, lock_is_free, write_units
from .verdict import verdict


# running, units, files ---------------------------------------------------------------------
def op_run(s, req):
    started = time.time()
    code, tail, killed = run_streaming(s, req["id"], req["argv"], req.get("timeout", 600),
                                       req.get("on_interrupt", "kill"), req.get("data"),
                                       req.get("env"))
    if code != 0 and req.get("unit_journal"):  # systemctl's own words say nothing
        tail = tail + logs_tail(s.args, started, 12).splitlines()
    if code != 0 and req.get("check") is not False:
        why = killed or f"exited {code}"
        raise OpError(f"`{' '.join(req['argv'][:3])} ...` {why}", tail[-15:])
    return {"exit": code, "tail": tail[-15:]}


def op_install_unit(s, req):
    """Write the unit; reload systemd only when it changed (or a cut run still owes the
    reload: statedir.write_units); enable it (unless ``enable`` is
    false: a VM a move stages the agent on must not start it at boot). `enable` gets
    --no-reload: it would reload the manager a second time (~3 s on the lab VM under
    emulation, generators and all) for a link only the next boot reads."""
    p = s.paths
    user = ["--user"] if s.args.get("rootless") else []
    written, reloaded = write_units(p, "unit", {p["unit"]: req["text"]}, user)
    changed = bool(written) or reloaded
    if req.get("enable", True) and not os.path.lexists(p["unit_wants"]):
        code, _, err = sh(["systemctl", *user, "enable", "--no-reload", "--quiet",
                           s.args["unit"]])
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


def op_write_file(s, req):
    """A root-only file the unit reads (e.g. the release markers); the path is one of the
    session's own, never one the client names."""
    path = s.paths[req["key"]]
    write_private(path, req["text"], 0o600)
    return {"written": req["key"]}


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


def running_container(s, started, deadline):
    """(container, None) once the agent's container runs, or (container, failed answer):
    an agent that keeps exiting fails at once (systemd's restart counter tells), with what
    it printed before it died."""
    a, p = s.args, s.paths
    restarts = int(unit_status(a).get("NRestarts") or 0)
    container, checked_at = None, time.monotonic()
    while time.monotonic() < deadline and not s.gone.is_set():
        container = container_state(p, a["container"])
        if container and container.get("running"):
            return container, None
        if time.monotonic() - checked_at > 2:
            checked_at = time.monotonic()
            unit = unit_status(a)
            if int(unit.get("NRestarts") or 0) - restarts >= 2:
                return container, {
                    "healthy": False, "container": container, "logs": logs_tail(a, started),
                    "reason": "the agent keeps exiting (last exit status "
                              f"{unit.get('ExecMainStatus', '?')})"}
        time.sleep(0.3)
    return container, {"healthy": False, "reason": "container is not running",
                       "container": container, "logs": logs_tail(a, started)}


def op_gate(s, req):
    """The container's limits as crun applied them, then health: `podman healthcheck run`
    until it passes or the deadline (after a restart in place, the new agent's own first
    beat instead). An agent that keeps exiting fails the gate at once."""
    a, p = s.args, s.paths
    started = time.time()
    deadline = time.monotonic() + req["deadline"]
    container, failed = running_container(s, started, deadline)
    if failed:
        return failed
    result = {"container": container, "cgroup": cgroup_limits(p, container["pid"])}
    # at most half the deadline: an agent that never beats still gets its checks (and logs)
    since, half = req.get("since") or 0, time.monotonic() + req["deadline"] / 2
    beaten = wait_first_beat(p, container, half, s.gone, newer_than=since)
    last = ""
    if since:
        # a restart in place: the same container, secrets, dirs and limits; what changed is
        # the process, so its own first beat is the news, and no `podman healthcheck run`
        # (a second of CPU on a small VM) is needed - unless the change touched the check's
        # own code (`full`). Where /proc cannot say which process is the new one, the check
        # runs as before.
        checked = beaten and not req.get("full") and \
            new_agent_beat(p, container, since, half, s.gone)
        result["checked"] = "the restarted agent's first heartbeat" if checked else ""
    else:  # the unit's own check at start, once the agent said READY
        checked = recent_pass(p, a["container"])
    while time.monotonic() < deadline and not s.gone.is_set():
        if checked:  # passed already: no second check
            code, out, err = 0, "", ""
            checked = False
        else:
            code, out, err = sh(["podman", "healthcheck", "run", a["container"]], 60)
        last = (out + err).strip()
        if code == 0 and token_rejected(p, container):
            # healthy as a process (a restart cannot fix a revoked token), but not a release
            # to keep: the gate puts the previous one back
            result.update(healthy=False, logs=logs_tail(a, started),
                          reason="Telegram rejected the bot token (the agent stopped polling):"
                                 " check the token's source")
            return result
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


def recent_pass(paths, name, fresh=60):
    """Whether Podman's last health check of the container passed at most `fresh` s ago:
    the check the unit runs once the agent said READY (with a watchdog), so the gate need
    not run the same check again a second later. Read from Podman's files only: where
    they lack the health log, the gate runs its own check rather than a `podman inspect`."""
    container = container_state(paths, name) or {}
    passed = container.get("health_passed_at")
    return bool(container.get("running") and container.get("health") == "healthy" and passed
                and passed >= time.time() - fresh)


def heartbeat_path(paths, container):
    """The agent's heartbeat file, read through the container's own root (/proc/PID/root)."""
    name = container.get("heartbeat_file") or HEARTBEAT_FILE
    return os.path.join(paths.get("proc", "/proc"), str(container["pid"]), "root",
                        name.lstrip("/"))


def token_rejected(paths, container):
    """The agent says Telegram refused its token (agent_beat.token_state)."""
    return token_state(paths, container) == "rejected"


def wait_first_beat(paths, container, until, gone, newer_than=0):
    """Wait until the new agent wrote its first heartbeat (read through the container's own
    root, /proc/PID/root), so the first `podman healthcheck run` - a second of CPU on a
    small VM - is not spent on an agent still starting."""
    path = heartbeat_path(paths, container)
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


def agent_started(paths, pid1):
    """When the agent - the newest child of the container's PID 1, ng-supervise - started,
    in time.time()'s terms, from the kernel's start time (10 ms steps, since boot); None
    where /proc does not say (no child, no children file)."""
    proc = paths.get("proc", "/proc")
    try:
        with open(f"{proc}/{int(pid1)}/task/{int(pid1)}/children") as handle:
            children = [int(pid) for pid in handle.read().split()]
        ticks = []
        for child in children:
            with open(f"{proc}/{child}/stat") as handle:
                # fields after the command's closing parenthesis; starttime is field 22
                ticks.append(int(handle.read().rsplit(")", 1)[1].split()[19]))
    except (OSError, ValueError, IndexError):
        return None
    if not ticks:
        return None
    since_boot = max(ticks) / os.sysconf("SC_CLK_TCK")
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)


def new_agent_beat(paths, container, since, until, gone, slack=0.02):
    """Wait until the agent started after `since` (a restart in place) has beaten itself:
    a heartbeat newer than its start, so a last beat of the old process, written while it
    stopped, cannot pass for it. False at `until`, or where /proc cannot tell."""
    path = heartbeat_path(paths, container)
    while time.monotonic() < until and not gone.is_set():
        started = agent_started(paths, container["pid"])
        if started is None:
            return False
        try:
            if started >= since - slack and os.stat(path).st_mtime > started + slack:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def op_health(s, req):
    """Everything `inv health` shows, read-only."""
    a, p = s.args, s.paths
    container = container_state(p, a["container"], want_health=True)
    unit = unit_status(a)
    return {
        "container": container,
        "verdict": verdict(container, unit),
        "cgroup": cgroup_limits(p, container["pid"]) if container and container.get("pid")
        else {},
        "host": host_memory(p),
        "swaps": [x["path"] for x in swap_facts(p)["swaps"]],
        "lock": None if lock_is_free(p) else lock_holder(p),
        "unit": unit,
        "last_audit": last_audit(p),
        "deployed": {k: v for k, v in (read_json(os.path.join(p["state"], "state.json"), {})
                                        .get("history") or [{}])[0].items()
                     if k not in ("unit_text", "markers_text")},
        "alerts": alerts_summary(p),
        "base_image": image_info(p, a.get("base_image")),
        # the agent moved to another VM from this one (`inv vm.move`): where, and when
        "moved": read_json(os.path.join(p["state"], MOVE_MARK_FILE), None),
        # a unit that is there but not enabled: a move's new VM before its start
        "enabled": os.path.lexists(p["unit_wants"]) if os.path.exists(p["unit"]) else None,
    }


def op_logs(s, req):
    argv = ["podman", "logs", "--timestamps", "--tail", str(int(req.get("tail", 100)))]
    if req.get("since"):
        argv += ["--since", req["since"]]
    code, out, err = podman_logs(argv + [s.args["container"]], 120)
    return {"exit": code, "text": (out + err)[-200000:]}
