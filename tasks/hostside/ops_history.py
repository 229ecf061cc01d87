"""Ops on the record: a release that passed its gate, the history, the session's
outcome (``finish``) and stopping a stuck session (``unlock``)."""

import io
import os
import signal
import tarfile
import time

from .base import OpError, _listdir, read_json, read_text, sh, write_json, write_private
from .nofollow import open_dir_nofollow, read_nofollow
from .ops_secrets import forget_secrets
from .podman_store import list_images
from .statedir import last_audit, lock_holder, lock_is_free


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
