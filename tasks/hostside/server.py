"""The host helper's entry point: the table of ops, one request's handling, and the
session's main loop."""

import os
import signal
import sys
import threading

from ..contract import MOVE_MARK_FILE, READ_ONLY_OPS
from .base import OpError, read_json
from .ops_alerts import op_alert_test, op_watcher
from .ops_data import (
    op_data_backup,
    op_data_heal,
    op_data_settle,
    op_data_swap,
    op_data_undo,
    op_data_unpack,
    op_data_upload,
)
from .ops_facts import op_facts
from .ops_history import op_finish, op_history, op_release, op_unlock
from .ops_image import op_base
from .ops_move import op_agent, op_move_mark
from .ops_provision import op_apt_wait, op_provision, op_swap
from .ops_remove import op_exec, op_remove, op_remove_plan
from .ops_secrets import op_secret_forget, op_secret_put, op_secret_restore
from .ops_sync import op_dirs, op_restore_code, op_rm_env, op_sync
from .ops_unit import op_gate, op_health, op_install_unit, op_logs, op_reload, op_run, op_write_file
from .session import Session

OPS = {"facts": op_facts, "provision": op_provision, "swap": op_swap, "rm_env": op_rm_env,
       "sync": op_sync, "release": op_release, "restore_code": op_restore_code,
       "secret_put": op_secret_put, "secret_restore": op_secret_restore,
       "secret_forget": op_secret_forget, "run": op_run, "install_unit": op_install_unit,
       "write_file": op_write_file, "dirs": op_dirs, "reload": op_reload, "gate": op_gate,
       "health": op_health, "logs": op_logs, "history": op_history, "finish": op_finish,
       "unlock": op_unlock, "base": op_base, "watcher": op_watcher,
       "alert_test": op_alert_test, "apt_wait": op_apt_wait, "exec": op_exec,
       "remove_plan": op_remove_plan, "remove": op_remove, "data_backup": op_data_backup,
       "data_upload": op_data_upload, "data_unpack": op_data_unpack, "data_swap": op_data_swap,
       "data_settle": op_data_settle, "data_undo": op_data_undo, "data_heal": op_data_heal,
       "agent": op_agent, "move_mark": op_move_mark}
READ_ONLY = READ_ONLY_OPS


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
        # the agent moved to another VM from here (`inv vm.move`): the client refuses what
        # would start a second agent
        hello["moved"] = read_json(os.path.join(state, MOVE_MARK_FILE), None)
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


if __name__ == "__main__":
    main(ARGS)  # noqa: F821 - ARGS is set by the bootstrap line that runs this text
    # The reader thread may still wait on stdin (the client keeps it open after `finish`;
    # a SIGTERM comes at any time): the interpreter's shutdown would abort on it ("Fatal
    # Python error: _enter_buffered_busy", SIGABRT, a core dump on some hosts).
    os._exit(0)
