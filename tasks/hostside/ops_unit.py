"""Ops on the agent's unit and container: a command run (the build, a restart), the
unit file, a root-only file the unit reads, a restart in place, the health gate, and
the health and logs `inv health` / `inv logs` read."""

import json
import os
import signal
import time

from ..contract import HEARTBEAT_FILE, MOVE_MARK_FILE
from .base import (
    OpError,
    pid_alive,
    read_json,
    read_text,
    run_streaming,
    sh,
    write_json,
    write_private,
)
from .host_facts import cgroup_limits, host_memory, logs_tail, swap_facts, unit_status
from .nofollow import read_nofollow
from .ops_alerts import alerts_summary
from .podman_store import container_state, image_info
from .statedir import last_audit, lock_holder, lock_is_free
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
    """Write the unit; reload systemd only when it changed; enable it (unless ``enable`` is
    false: a VM a move stages the agent on must not start it at boot)."""
    p = s.paths
    user = ["--user"] if s.args.get("rootless") else []
    changed = read_text(p["unit"]) != req["text"].strip()
    if changed:
        os.makedirs(os.path.dirname(p["unit"]), exist_ok=True)
        write_private(p["unit"], req["text"], 0o644)
        code, _, err = sh(["systemctl", *user, "daemon-reload"])
        if code != 0:
            raise OpError(f"systemctl daemon-reload failed: {err.strip()[-200:]}")
    if req.get("enable", True) and not os.path.lexists(p["unit_wants"]):
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
    # after a restart in place (`since`) no check of the unit's can be the new process's
    checked = not req.get("since") and recent_pass(p, a["container"])
    while time.monotonic() < deadline and not s.gone.is_set():
        if checked:  # the unit's own check at start passed: no second one
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
    """The agent says Telegram refused its token (``{"token": "rejected"}`` in its
    heartbeat: the contract in execution/system/heartbeat.py). The agent owns that file: it
    is read without following a link (one to a host file would resolve outside the
    container) and never more than 4 kB of it."""
    root = os.path.join(paths.get("proc", "/proc"), str(container["pid"]), "root")
    name = (container.get("heartbeat_file") or HEARTBEAT_FILE).lstrip("/")
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        found = read_nofollow(root_fd, name, 4096)
    finally:
        os.close(root_fd)
    try:
        beat = json.loads(found[0]) if found else None
    except ValueError:
        return False
    return isinstance(beat, dict) and beat.get("token") == "rejected"


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
    code, out, err = sh(argv + [s.args["container"]], 120)
    return {"exit": code, "text": (out + err)[-200000:]}
