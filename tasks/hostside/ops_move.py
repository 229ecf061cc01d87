"""Ops of a move between VMs (`inv vm.move`): the agent stopped for good on the VM it
leaves, started on the one it goes to, and the mark that says where it went.

``agent`` with ``action: stop`` stops the agent's unit and disables it, so a reboot (or
`inv vm.start` of a VM that was left stopped) never brings a second agent up; ``start``
enables and starts it (the client gates it after). ``move_mark`` writes (or, with no mark,
removes) ``MOVE_MARK_FILE`` in the state dir: ``{"to": ..., "state": "moving" | "moved",
"at": ...}``, which `inv health` on that VM shows.
"""

import os
import time

from ..contract import MOVE_MARK_FILE
from .base import OpError, _unlink, read_json, sh, write_json
from .podman_store import container_state

AGENT_ACTIONS = ("stop", "start")


def move_mark_path(s):
    return os.path.join(s.paths["state"], MOVE_MARK_FILE)


def read_move_mark(s):
    return read_json(move_mark_path(s), None)


def _unit_ctl(s, *verb, timeout=300):
    user = ["--user"] if s.args.get("rootless") else []
    return sh(["systemctl", *user, *verb, s.args["unit"]], timeout)


def op_agent(s, req):
    """Stop and disable, or enable and start, the agent's unit."""
    action = req.get("action")
    if action not in AGENT_ACTIONS:
        raise OpError(f"agent: unknown action {action!r}")
    if not os.path.exists(s.paths["unit"]):
        if action == "stop":  # never deployed here: nothing runs
            return {"running": False, "deployed": False}
        raise OpError("the agent is not deployed on this host (no unit): nothing to start")
    if action == "stop":
        code, _, err = _unit_ctl(s, "stop")
        if code != 0:
            raise OpError(f"systemctl stop {s.args['unit']} failed: {err.strip()[-200:]}")
        code, _, err = _unit_ctl(s, "disable", "--quiet")
        if code != 0:
            raise OpError(f"systemctl disable {s.args['unit']} failed: {err.strip()[-200:]}")
        found = container_state(s.paths, s.args["container"])
        if found and found.get("running"):
            raise OpError("the agent's container still runs after its unit stopped")
        return {"running": False, "deployed": True}
    code, _, err = _unit_ctl(s, "enable", "--quiet")
    if code != 0:
        raise OpError(f"systemctl enable {s.args['unit']} failed: {err.strip()[-200:]}")
    started = time.time()
    # a start that fails is not the end: the gate that follows says what is wrong
    code, _, err = _unit_ctl(s, "start", timeout=360)
    return {"started": started, "exit": code, "error": err.strip()[-200:] if code else ""}


def op_move_mark(s, req):
    """Where the agent went from this VM (``mark``), or no mark (a move undone)."""
    mark = req.get("mark")
    if mark is None:
        return {"removed": _unlink(move_mark_path(s))}
    if not isinstance(mark, dict) or not mark.get("to"):
        raise OpError("move_mark: a mark names where the agent went")
    write_json(move_mark_path(s), {k: mark.get(k) for k in ("to", "state", "at", "move")})
    return {"mark": read_move_mark(s)}
