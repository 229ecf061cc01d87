"""One session over the SSH channel's stdin/stdout: the protocol's framing, the
deploy lock (flock(2) on <state>/lock, released by the kernel when the process ends,
however it ends) and the audit line (the client's outcome, or "interrupted")."""

import fcntl
import json
import os
import queue
import threading

from .base import now, write_json
from .statedir import default_paths, lock_holder


class Session:
    def __init__(self, args, stdin, stdout):
        self.args = args
        self.paths = default_paths(args)
        self.stdin = stdin
        self.stdout = stdout
        self.requests = queue.Queue()
        self.gone = threading.Event()  # the client went away, or we were told to stop
        self.write_lock = threading.Lock()
        self.journal = []
        self.current = None
        self.during = None  # the step that was running when the client went away
        self.lock_fd = None
        self.finished = False
        self.changing = args.get("mode") == "change"
        self.holder = dict(args.get("holder") or {}, pid=os.getpid())

    # protocol -------------------------------------------------------------------------
    def send(self, message):
        line = (json.dumps(message, default=str) + "\n").encode()
        with self.write_lock:
            try:
                self.stdout.write(line)
                self.stdout.flush()
            except (BrokenPipeError, OSError, ValueError):
                self.gone.set()

    def send_bytes(self, request_id, data):
        """A frame of raw bytes for a request (a backup's stream): a header line naming its
        length, then the bytes; the client reads exactly that many."""
        header = (json.dumps({"id": request_id, "bytes": len(data)}) + "\n").encode()
        with self.write_lock:
            try:
                self.stdout.write(header)
                self.stdout.write(data)
                self.stdout.flush()
            except (BrokenPipeError, OSError, ValueError):
                self.gone.set()

    def progress(self, request_id, text):
        self.send({"id": request_id, "progress": text[-500:]})

    def reader(self):
        """Reads requests (and their data) until EOF; EOF means the client is gone."""
        try:
            while True:
                line = self.stdin.readline()
                if not line:
                    break
                request = json.loads(line)
                size = int(request.pop("data", 0) or 0)
                if size:
                    request["data"] = self.stdin.read(size)
                    if len(request["data"]) != size:
                        break
                self.requests.put(request)
        except (OSError, ValueError):
            pass
        self.gone.set()
        self.requests.put(None)

    # lock -----------------------------------------------------------------------------
    def take_lock(self):
        state = self.paths["state"]
        path = os.path.join(state, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return {"acquired": False, "held_by": lock_holder(self.paths)}
        self.lock_fd = fd
        write_json(os.path.join(state, "lock.json"), self.holder)
        return {"acquired": True}

    def release_lock(self):
        if self.lock_fd is not None:
            try:
                os.unlink(os.path.join(self.paths["state"], "lock.json"))
            except OSError:
                pass
            os.close(self.lock_fd)
            self.lock_fd = None

    # audit ----------------------------------------------------------------------------
    def audit(self, entry):
        entry = dict(entry, when=now(), who=self.holder.get("who", "?"),
                     command=self.holder.get("command", "?"), steps=list(self.journal))
        path = os.path.join(self.paths["state"], "audit.log")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")

    def close(self):
        """The end of the session: an audit line unless `finish` wrote one, then unlock."""
        if self.changing and self.lock_fd is not None and not self.finished:
            during = self.during or self.current
            self.audit({"outcome": "interrupted",
                        "version": self.args.get("version"),
                        "during": during,
                        "detail": "the client went away before the deploy finished"})
        self.release_lock()
