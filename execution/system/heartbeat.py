"""Heartbeat file for the Night Guard health check.

The container's health check (health_check.py) calls the agent healthy while the
heartbeat file's mtime is younger than NG_HEARTBEAT_MAX_AGE (30 s by default).
The file is NG_HEARTBEAT_FILE, default /tmp/nightguard/heartbeat.

Use from your own agent (with /app/execution/system on sys.path, or next to it):

    from heartbeat import beat
    beat()  # call this from your main loop, at least every few seconds

Calling ``beat()`` from the main loop is the point: when the loop hangs, the
heartbeat goes stale and the container is reported unhealthy. A background
thread, ``HeartbeatThread(interval=5).start()``, keeps beating while the main
loop is stuck, so it only proves that the process is alive; use it for agents
whose main loop you cannot touch, and know what it does not detect.

An agent that long-polls (Telegram's getUpdates) also says how its polling goes, so
that a bot whose loop runs but whose polling has stalled is caught too:

    beat(fields={"polled_at": last_poll_done, "poll_timeout": 10})
    beat(fields={"token": "rejected"})   # the API refuses the token: polling stopped

The file then holds that one-line JSON object instead of the bare time; health_check.py
reads it (see its docstring). Without ``fields`` nothing about polling is reported.
"""

import os
import sys
import threading
import time

DEFAULT_PATH = "/tmp/nightguard/heartbeat"


def default_path():
    return os.environ.get("NG_HEARTBEAT_FILE") or DEFAULT_PATH


def beat(path=None, now=None, fields=None):
    """Atomically replace the heartbeat file with the current Unix time.

    With ``fields`` (a flat dict of numbers and strings) the file holds them as one
    JSON object instead; the mtime still carries the beat.

    A reader never sees a half-written file: the text goes to a temporary file
    in the same directory, which then replaces the heartbeat in one rename.
    The directory is created on first use.
    """
    path = path or default_path()
    now = time.time() if now is None else now
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    if fields is None:
        data = f"{now:.3f}\n".encode()
    else:
        import json  # only agents that report polling pay for it, once

        data = (json.dumps(fields, separators=(",", ":")) + "\n").encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class HeartbeatThread(threading.Thread):
    """A daemon thread that beats every ``interval`` seconds until ``stop()``."""

    def __init__(self, interval=5.0, path=None):
        super().__init__(name="heartbeat", daemon=True)
        self.interval = interval
        self.path = path
        self._stopped = threading.Event()

    def run(self):
        while True:
            try:
                beat(self.path)
            except OSError as exc:  # keep trying: the disk may come back
                print(f"heartbeat: write failed: {exc}", file=sys.stderr, flush=True)
            if self._stopped.wait(self.interval):
                return

    def stop(self, timeout=None):
        self._stopped.set()
        if self.is_alive():
            self.join(timeout)
