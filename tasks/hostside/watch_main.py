"""The alert watcher's program: one pass (observe, decide, send, ping, remember) and
its entry point, run by the nightguard-watch timer."""

import fcntl
import os
import socket
import sys
import time

from ..contract import MOVE_MARK_FILE
from .agent_beat import token_state
from .base import now, read_json, sh, write_json
from .host_facts import host_memory, unit_status
from .podman_store import container_state
from .statedir import default_paths, lock_is_free
from .verdict import agent_status
from .watch_rules import exits_in_journal, ping_due, rate_limit, transitions
from .watch_send import bot_token, send_ping, telegram_send

OUTBOX_MAX = 20  # messages kept for the next pass when Telegram cannot be reached



def restart_exits(args, since):
    """(code, status, name) of each exit of the unit's main process since `since`, from
    the journal lines systemd itself wrote about the unit; an exit that follows systemd's
    "Watchdog timeout (limit 10s)!" is ("watchdog", "10s", name)."""
    unit = args["unit"]
    if args.get("rootless"):
        argv = ["journalctl", "--user", "-u", unit]
    else:
        argv = ["journalctl", "_PID=1", f"UNIT={unit}"]
    code, out, _ = sh(argv + ["--since", f"@{int(since)}", "-o", "cat", "--no-pager",
                              "-q", "-n", "200"], 30)
    return exits_in_journal(out) if code == 0 else []


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
    running = bool(container and container.get("running"))
    return {"status": status, "detail": detail, "nrestarts": count, "exits": exits,
            "token": token_state(paths, container) if running else None,
            "swap_pct": 100.0 * (swap_total - swap_free) / swap_total if swap_total else None,
            "disk_free_mb": int(memory["disk_free"] // (1024 * 1024)),
            "host": socket.gethostname()}


def quiet_reason(paths):
    """Why this pass says nothing: a deploy holds the lock, the agent moved to another VM
    from here (`inv vm.move`'s mark), or its unit is not enabled (a move's new VM before its
    start); "" otherwise."""
    if not lock_is_free(paths):
        return "a deploy holds the lock"
    if os.path.exists(os.path.join(paths["state"], MOVE_MARK_FILE)):
        return "the agent moved to another VM from here"
    if os.path.exists(paths["unit"]) and not os.path.lexists(paths["unit_wants"]):
        return "the agent's unit is not enabled here"
    return ""


def watch_pass(args, now_t=None):
    """One pass: observe, decide, send, ping, remember. Returns the line it prints."""
    paths = default_paths(args)
    conf = args["config"]
    now_t = time.time() if now_t is None else now_t
    state = read_json(paths["alerts_state"], {}) or {}
    skipped = quiet_reason(paths)
    if skipped:  # the agent is stopped or restarted on purpose: not news
        state.update(last_pass=now(), last_pass_t=now_t, skipped=skipped)
        write_json(paths["alerts_state"], state)
        return f"watch: {skipped}; skipped"
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


if __name__ == "__main__":  # `python3 watcher.py alerts.json`, by hand
    sys.exit(watch_main(sys.argv[1:]))
