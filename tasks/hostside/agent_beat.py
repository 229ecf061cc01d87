"""What the agent says about itself in its heartbeat file (the contract in
execution/system/heartbeat.py), read from the host through the container's own root. The
agent owns that file and is the least trusted thing on the host: it is read without
following a link (one to a host file would resolve outside the container), opened so a
FIFO cannot hold the reader, and never more than 4 kB of it."""

import json
import os

from ..contract import HEARTBEAT_FILE
from .nofollow import read_nofollow

BEAT_PEEK = 4096


def token_state(paths, container):
    """"rejected" when the agent says Telegram refused its token (``{"token":
    "rejected"}``: it stopped polling and stays up), "accepted" when its heartbeat says
    nothing of the kind, None when there is no heartbeat to read."""
    if not container or not container.get("pid"):
        return None
    root = os.path.join(paths.get("proc", "/proc"), str(container["pid"]), "root")
    name = (container.get("heartbeat_file") or HEARTBEAT_FILE).lstrip("/")
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        found = read_nofollow(root_fd, name, BEAT_PEEK)
    finally:
        os.close(root_fd)
    if not found:
        return None
    try:
        beat = json.loads(found[0])
    except ValueError:
        return "accepted"  # the bare time of an agent that reports no polling
    return "rejected" if isinstance(beat, dict) and beat.get("token") == "rejected" \
        else "accepted"
