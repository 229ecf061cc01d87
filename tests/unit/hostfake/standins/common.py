"""What the stand-ins share: their configuration, the call log, control files, JSON state.

Every stand-in reads ``$NGFAKE_CONFIG`` (written by ``tests.unit.hostfake.FakeHost``): where
the fake host's Podman storage, run dir, /proc and cgroup tree are, and the control dir a
test writes to inject failures. Each call is appended to ``$NGFAKE_LOG`` as one JSON line:
{"tool", "argv", "env"} (the few variables a test checks, e.g. DEBIAN_FRONTEND).
"""

from __future__ import annotations

import json
import os
import sys
import time

with open(os.environ["NGFAKE_CONFIG"]) as _handle:
    CONFIG = json.load(_handle)
SEEN_ENV = ("DEBIAN_FRONTEND", "NEEDRESTART_MODE")


def record(tool: str, argv: list[str]) -> None:
    entry = {"tool": tool, "argv": argv, "t": round(time.time(), 3),
             "env": {k: os.environ[k] for k in SEEN_ENV if k in os.environ}}
    with open(os.environ["NGFAKE_LOG"], "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def read_json(path: str, default):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return default


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle)
    os.replace(tmp, path)


def control(name: str, default=None):
    """A test's instruction (JSON) from the control dir, or ``default``."""
    return read_json(os.path.join(CONFIG["control"], name), default)


def fail_if_told(key: str, argv: list[str]) -> None:
    """Exit as the real tool would fail when the test wrote ``fail-<key>``: {"times": n
    (-1: always), "match": an argv word the failure is limited to, "message", "code"}."""
    path = os.path.join(CONFIG["control"], f"fail-{key}")
    rule = read_json(path, None)
    if rule is None or (rule.get("match") and rule["match"] not in argv):
        return
    times = rule.get("times", 1)
    if times > 0:
        if times == 1:
            os.unlink(path)
        else:
            write_json(path, dict(rule, times=times - 1))
    sys.stderr.write(rule.get("message", f"Error: injected failure ({key})") + "\n")
    sys.exit(rule.get("code", 125))


def host_path(path: str) -> str:
    """A path as the fake host's files have it: e.g. /var/lib/nightguard in a unit file
    is the test's state dir."""
    for prefix, target in CONFIG.get("path_map", {}).items():
        if path == prefix or path.startswith(prefix + "/"):
            return target + path[len(prefix):]
    return path


def iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".123456789Z"


def parse_size(text: str) -> int:
    units = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    text = text.strip().lower()
    if text[-1:] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)
