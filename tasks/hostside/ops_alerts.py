"""Ops of the alert watcher on this host: install, update or remove it, its facts
and summary for `inv health`, and `inv alerts.test`."""

import os
import socket
import zlib

from ..contract import WATCH_UNIT
from .base import (
    OpError,
    _listdir,
    _unlink,
    now,
    read_json,
    read_text,
    read_text_bytes,
    sh,
    sha256_bytes,
    write_json,
    write_private,
)
from .statedir import reload_after, write_units
from .watch_send import bot_token, telegram_send

# The same file, run by systemd (imported as the module `watcher`, or run as
# `python3 watcher.py alerts.json`), does one watch pass (see watch_main). A pass runs
# when something happened and on a slow clock: the watcher's drop-in for the agent's unit
# starts one (--no-block: nothing waits for Telegram) after each start of the agent - a
# crash's, a watchdog kill's, a health kill's, a reboot's - and when the unit fails for
# good (OnFailure=); the timer's passes cover swap, disk, a failing full health check and
# the dead-man ping. systemd resets ExecMainStatus when the new main process starts, so a
# pass finds a restart's exit reason in systemd's own journal lines about the unit.
WATCH_FILES = ("watch_timer", "watch_service", "watch_dropin", "watcher", "alerts_args")
UNIT_FILES = (("watch_service", "service"), ("watch_timer", "timer"), ("watch_dropin", "dropin"))


def watcher_facts(paths):
    """What of the watcher is installed: its version (a hash of the copy, as hostlink
    names helpers), its settings (never a token: there is none in them), its units."""
    source = read_text_bytes(paths["watcher"])
    return {"present": any(os.path.lexists(paths[k]) for k in WATCH_FILES),
            "version": sha256_bytes(source)[:16] if source is not None else None,
            "config": (read_json(paths["alerts_args"], {}) or {}).get("config"),
            "service": read_text(paths["watch_service"]),
            "timer": read_text(paths["watch_timer"]),
            "dropin": read_text(paths["watch_dropin"]),
            "enabled": os.path.lexists(paths["watch_timer_wants"])}


def op_watcher(s, req):
    """Install, update or remove the watcher: its own program (sent with the request) at a
    stable path, its arguments (0600, no token), a oneshot service and its timer."""
    a, p = s.args, s.paths
    user = ["--user"] if a.get("rootless") else []
    timer = f"{WATCH_UNIT}.timer"
    if req["action"] == "remove":
        if os.path.lexists(p["watch_timer_wants"]) or os.path.exists(p["watch_timer"]):
            sh(["systemctl", *user, "disable", "--now", "--quiet", timer])
        with reload_after(p, "watcher", user):
            removed = [k for k in (*WATCH_FILES, "alerts_state") if _unlink(p[k])]
            try:
                os.rmdir(os.path.dirname(p["watch_dropin"]))  # the drop-in's dir, when empty
            except OSError:
                pass
            _unlink(p["alerts_state"] + ".lock")
            _drop_bytecode(p["watcher"])
        return {"removed": removed}
    source = watcher_program(req)
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
    written, reloaded = write_units(p, "watcher", {p[key]: req[name] for key, name in UNIT_FILES},
                                    user)
    units = [key for key, _ in UNIT_FILES if p[key] in written]
    if not os.path.lexists(p["watch_timer_wants"]):
        argv = ["systemctl", *user, "enable", "--now", "--quiet", timer]
    elif "watch_timer" in units or (reloaded and not units):
        # a new schedule takes effect when the timer restarts; a reload a cut run owed may
        # carry one this run cannot tell from the text
        argv = ["systemctl", *user, "restart", timer]
    else:
        argv = None
    if argv:
        code, _, err = sh(argv)
        if code != 0:
            raise OpError(f"`{' '.join(argv[:3])} {timer}` failed: {err.strip()[-200:]}")
    return {"changed": changed + units}


def watcher_program(req):
    """The watcher's program as the laptop sent it (compressed, after the request line),
    checked against the version it was sent as: its own, apart from the helper's."""
    try:
        source = zlib.decompress(req.get("data") or b"")
    except zlib.error:
        source = None
    if source is None or sha256_bytes(source)[:16] != req.get("version"):
        raise OpError("the watcher's program did not arrive whole")
    return source


def _drop_bytecode(script):
    """The watcher's compiled bytecode (the service imports it: __pycache__ beside it)."""
    folder = os.path.join(os.path.dirname(script), "__pycache__")
    stem = os.path.basename(script)[:-3] + "."
    for name in _listdir(folder):
        if name.startswith(stem) and name.endswith(".pyc"):
            _unlink(os.path.join(folder, name))


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
