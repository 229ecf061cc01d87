"""Ops on the agent's data dir: a backup streamed to the client, and a restore put in place
by a rename with the old tree kept aside.

Backup (``data_backup``): the container is paused (``podman pause``: the cgroup freezer,
nothing of the agent runs, nothing is lost) while each file is copied into a root-only
snapshot dir in the state dir (at disk speed), and unpaused; then the tar is made from the
copies, gzipped as it is made and sent in frames of 256 kB (``Session.send_bytes``), each
copy removed once sent: the archive never exists whole on the host, in memory or on disk,
and compression and the network do not lengthen the agent's pause. Without room on the
disk for the copy, the tar is made and sent while the agent is paused. A marker in the
state dir says the agent is paused; if the helper dies before it unpauses, the next data
op (or a deploy, from its facts) unpauses it.

Restore: ``data_upload`` appends the archive to a root-only file in the state dir,
``data_unpack`` writes it as a new tree beside the data dir (same filesystem, every file's
sha256 checked against the manifest the client read), ``data_swap`` stops the agent and
renames (old -> ``<data_dir>.ng-previous``, new -> data dir) and starts it again; the client
gates it, then ``data_settle`` (healthy) or ``data_undo`` (the old tree back). A journal in
the state dir names the phase: a restore cut after the swap is undone by the next data op.
"""

import gzip
import io
import json
import os
import resource
import socket
import stat
import tarfile
import time

from ..contract import DATA_JOURNAL_FILE, DATA_PAUSED_FILE, DATA_SIBLINGS
from .base import OpError, _unlink, now, read_json, read_text, sh, write_json
from .datatree import MANIFEST_NAME, TreeReader, TreeWriter, tree_size
from .nofollow import open_dir_nofollow, remove_tree_at
from .podman_store import container_state

FORMAT = 1
FRAME = 256 * 1024
UPLOAD = "data-upload.tar.gz"
SNAPSHOT = "data-snapshot"  # in the state dir: the paused copy, gone once it is sent
SNAPSHOT_MARGIN = 256 << 20  # the disk keeps this much free besides the copy


def data_paths(s):
    """The data dir and its two siblings on the same filesystem (renames stay atomic)."""
    data_dir = s.args["data_dir"].rstrip("/")
    staging, previous, failed = (data_dir + suffix for suffix in DATA_SIBLINGS)
    return {"data": data_dir, "staging": staging, "previous": previous, "failed": failed,
            "journal": os.path.join(s.paths["state"], DATA_JOURNAL_FILE),
            "paused": os.path.join(s.paths["state"], DATA_PAUSED_FILE),
            "upload": os.path.join(s.paths["state"], UPLOAD),
            "snapshot": os.path.join(s.paths["state"], SNAPSHOT)}


class FrameWriter(io.RawIOBase):
    """A write-only file whose bytes go to the client in frames of FRAME bytes."""

    def __init__(self, s, request_id):
        super().__init__()
        self.s, self.request_id = s, request_id
        self.buffer, self.sent = bytearray(), 0

    def writable(self):
        return True

    def write(self, data):
        if self.s.gone.is_set():
            raise OpError("interrupted: the client went away")
        self.buffer += data
        while len(self.buffer) >= FRAME:
            self._send(bytes(self.buffer[:FRAME]))
            del self.buffer[:FRAME]
        return len(data)

    def _send(self, chunk):
        self.s.send_bytes(self.request_id, chunk)
        self.sent += len(chunk)

    def finish(self):
        if self.buffer:
            self._send(bytes(self.buffer))
            self.buffer.clear()


# -- pausing the agent --------------------------------------------------------------------------
def pause_agent(s, where):
    """Pause the running container; returns the monotonic time the pause was asked for
    (None when it was not running: nothing writes the data dir then)."""
    found = container_state(s.paths, s.args["container"])
    if not found or not found.get("running"):
        return None
    write_json(where["paused"], {"container": s.args["container"], "at": now()})
    asked = time.monotonic()
    code, _, err = sh(["podman", "pause", s.args["container"]], 60)
    if code != 0:
        _unlink(where["paused"])
        raise OpError(f"could not pause the agent for a consistent copy: {err.strip()[-200:]}")
    return asked


def unpause_agent(s, where):
    code, _, err = sh(["podman", "unpause", s.args["container"]], 60)
    if code != 0 and "not paused" not in err and "no such container" not in err.lower():
        raise OpError(f"podman unpause failed: {err.strip()[-200:]}")
    _unlink(where["paused"])


def heal(s, where):
    """What an interrupted data op left: a paused agent, a restore cut after its swap (undone:
    the tree that was there before it comes back). Returns what was done, in words."""
    done = []
    if os.path.exists(where["paused"]):
        unpause_agent(s, where)
        done.append("the agent, left paused by an interrupted backup, runs again")
    journal = read_json(where["journal"], None)
    if journal is not None:
        put_back(s, where, journal)
        done.append("an interrupted restore was undone: the data dir is back as it was "
                    "before it")
    for leftover in ("staging", "snapshot"):
        if os.path.lexists(where[leftover]):
            _remove_tree(where[leftover])
    _unlink(where["upload"])
    return done


def op_data_heal(s, req):
    """What an interrupted backup or restore left, repaired (a deploy asks, from facts)."""
    return {"healed": heal(s, data_paths(s))}


def _remove_tree(path):
    parent, name = os.path.split(path)
    fd = open_dir_nofollow(parent)
    try:
        remove_tree_at(fd, name)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


# -- backup ---------------------------------------------------------------------------------
def op_data_backup(s, req):
    """The data dir as a gzipped tar sent in frames, the agent paused while it is read; the
    manifest is the archive's last member."""
    where = data_paths(s)
    healed = heal(s, where)
    try:
        root_fd = open_dir_nofollow(where["data"])
    except FileNotFoundError:
        if req.get("missing_ok"):
            return {"absent": True, "healed": healed}
        raise OpError(f"there is no data dir {where['data']} on this host: nothing to back "
                      "up") from None
    except OSError as exc:
        raise OpError(f"{where['data']}: {exc.strerror} (a link or not a directory: refusing"
                      " it)") from None
    try:
        return _stream_backup(s, req, where, root_fd, healed)
    finally:
        os.close(root_fd)


def snapshot_dir(s, where, total):
    """A root-only directory in the state dir for the paused copy, as a descriptor; None
    when the disk lacks room for it (the tar is then made while the agent is paused)."""
    if os.path.lexists(where["snapshot"]):
        _remove_tree(where["snapshot"])
    disk = os.statvfs(s.paths["state"])
    if disk.f_bavail * disk.f_frsize < total + SNAPSHOT_MARGIN:
        return None
    os.mkdir(where["snapshot"], 0o700)
    return os.open(where["snapshot"], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


def _counter(s, req, total, verb):
    done, shown = [0], [time.monotonic()]

    def counted(n):
        done[0] += n
        if time.monotonic() - shown[0] > 2:
            shown[0] = time.monotonic()
            s.progress(req["id"], f"{done[0] / 1e6:.1f} of {total / 1e6:.1f} MB {verb}")

    return done, counted


def _stream_backup(s, req, where, root_fd, healed):
    total = tree_size(root_fd)
    snap_fd = snapshot_dir(s, where, total) if req.get("snapshot", True) else None
    done, counted = _counter(s, req, total, "sent" if snap_fd is not None else "read")
    out = FrameWriter(s, req["id"])
    zipped = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=int(req.get("level", 6)),
                           mtime=0)
    tar = tarfile.open(fileobj=zipped, mode="w|", format=tarfile.PAX_FORMAT)
    tree = TreeWriter(tar, on_read=counted, stop=s.gone.is_set, snapshot_fd=snap_fd)
    root_st = os.fstat(root_fd)
    try:
        paused = pause_agent(s, where) if req.get("pause", True) else None
        try:
            tree.add_tree(root_fd)
        finally:
            if paused is not None:  # the outage: from `podman pause` to unpause's return
                unpause_agent(s, where)
            outage = None if paused is None else time.monotonic() - paused
        tree.flush()
    finally:
        if snap_fd is not None:
            os.close(snap_fd)
            _remove_tree(where["snapshot"])
    manifest = dict(tree.manifest_part(), format=FORMAT, created=now(),
                    identity=req.get("identity") or {}, host=host_identity(),
                    release=_release(s), owner=[root_st.st_uid, root_st.st_gid],
                    data_dir=where["data"])
    _end_archive(tar, zipped, out, manifest)
    return {"files": len(tree.files), "bytes": done[0], "links": tree.links,
            "skipped": tree.skipped, "sent": out.sent, "paused_s": outage,
            "copy": "snapshot" if snap_fd is not None else "while paused",
            "host": manifest["host"], "release": manifest["release"], "healed": healed,
            "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def _end_archive(tar, zipped, out, manifest):
    """The manifest as the last member, then the tar's and gzip's ends, all sent."""
    blob = json.dumps(manifest, sort_keys=True, indent=1).encode()
    info = tarfile.TarInfo(MANIFEST_NAME)
    info.size, info.mode, info.mtime = len(blob), 0o644, int(time.time())
    tar.addfile(info, io.BytesIO(blob))
    tar.close()
    zipped.close()
    out.finish()


def host_identity():
    return {"hostname": socket.gethostname(),
            "machine_id": read_text("/etc/machine-id", 64) or ""}


def _release(s):
    state = read_json(os.path.join(s.paths["state"], "state.json"), {})
    history = state.get("history") or [{}]
    return {"version": history[0].get("version"), "verified": state.get("verified")}


# -- restore --------------------------------------------------------------------------------
def op_data_upload(s, req):
    """One piece of the archive, appended to a root-only file in the state dir."""
    where = data_paths(s)
    if req.get("first"):
        must_be_deployed(s)
        s.data_healed = heal(s, where)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if req.get("first")
                                                        else os.O_APPEND)
    fd = os.open(where["upload"], flags, 0o600)
    try:
        view = memoryview(req.get("data") or b"")
        while view:
            view = view[os.write(fd, view):]
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return {"size": size, "healed": getattr(s, "data_healed", []) if req.get("first")
            else []}


def restore_owner(where, manifest_owner):
    """Who owns the restored tree: the data dir's owner now (what the running container
    was given, `:U`), else the one the backup recorded. None when not root (rootless:
    Podman's `:U` maps it)."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(where["data"], follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            return st.st_uid, st.st_gid
    except FileNotFoundError:
        pass
    if manifest_owner and len(manifest_owner) == 2:
        return int(manifest_owner[0]), int(manifest_owner[1])
    return None


def must_be_deployed(s):
    if not os.path.exists(s.paths["unit"]):
        raise OpError("the agent is not deployed on this host (no unit): run `inv deploy` "
                      "first, then restore; nothing was changed")


def op_data_unpack(s, req):
    """The uploaded archive as a new tree beside the data dir, every file checked."""
    where = data_paths(s)
    must_be_deployed(s)
    if req.get("size") is not None and os.path.getsize(where["upload"]) != req["size"]:
        raise OpError("the archive did not arrive whole")
    if os.path.lexists(where["staging"]):
        _remove_tree(where["staging"])
    parent, name = os.path.split(where["staging"])
    parent_fd = open_dir_nofollow(parent)
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        root_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)
    owner = restore_owner(where, req.get("owner"))
    try:
        with tarfile.open(where["upload"], mode="r|gz") as tar:
            TreeReader(root_fd, req["files"], owner, stop=s.gone.is_set).unpack(tar)
    except (OpError, OSError, tarfile.TarError, EOFError) as exc:
        os.close(root_fd)
        _remove_tree(where["staging"])
        _unlink(where["upload"])
        raise OpError(f"restore refused, nothing changed: {exc}") from None
    os.close(root_fd)
    _unlink(where["upload"])
    return {"files": len(req["files"]), "owner": list(owner) if owner else None}


def _systemctl(s, verb):
    user = ["--user"] if s.args.get("rootless") else []
    code, _, err = sh(["systemctl", *user, verb, s.args["unit"]], 300)
    if code != 0:
        raise OpError(f"systemctl {verb} {s.args['unit']} failed: {err.strip()[-200:]}")


def op_data_swap(s, req):
    """Stop the agent, old tree aside and new tree in place (two renames), start it - unless
    ``start`` is false (a move: the agent starts on the new VM only once the old one is
    stopped, and a heal of this swap must not start it either)."""
    where = data_paths(s)
    if not os.path.isdir(where["staging"]):
        raise OpError("no restored tree is waiting (unpack first)")
    if os.path.lexists(where["previous"]):  # an earlier restore's: the newer one wins
        _remove_tree(where["previous"])
    had_old = os.path.lexists(where["data"])
    start = req.get("start", True) is not False
    write_json(where["journal"], {"phase": "swapping", "had_old": had_old, "at": now(),
                                  "start": start})
    _systemctl(s, "stop")
    if had_old:
        os.rename(where["data"], where["previous"])
    os.rename(where["staging"], where["data"])
    write_json(where["journal"], {"phase": "swapped", "had_old": had_old, "at": now(),
                                  "start": start})
    started = time.time()
    if start:
        _systemctl(s, "start")
    return {"previous": where["previous"] if had_old else None, "started": started}


def op_data_settle(s, req):
    """The restored tree passed the gate: it stays; the old one stays aside."""
    where = data_paths(s)
    _unlink(where["journal"])
    return {"previous": where["previous"] if os.path.lexists(where["previous"]) else None}


def put_back(s, where, journal):
    """The tree from before the restore back in place (the restored one aside as
    ``.ng-failed``); the agent stopped for the renames and started again."""
    _systemctl(s, "stop")
    if journal.get("had_old") and os.path.lexists(where["previous"]):
        if os.path.lexists(where["data"]):
            if os.path.lexists(where["failed"]):
                _remove_tree(where["failed"])
            os.rename(where["data"], where["failed"])
        os.rename(where["previous"], where["data"])
    # with no tree before the restore (had_old false) the restored one stays: there is
    # nothing to go back to
    _unlink(where["journal"])
    if journal.get("start", True):  # a move's swap left the agent stopped: so does its undo
        _systemctl(s, "start")


def op_data_undo(s, req):
    """The restored tree failed the gate: the old one back, the agent started on it."""
    where = data_paths(s)
    journal = read_json(where["journal"], None)
    if journal is None:
        raise OpError("no restore to undo")
    started = time.time()
    put_back(s, where, journal)
    return {"failed": where["failed"], "started": started}
