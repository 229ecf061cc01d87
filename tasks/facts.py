"""Facts: read a host's state in one round trip, and the other calls into the host helper.

``tasks/host_helper.py`` is sent as text on stdin together with one JSON line of
arguments, and runs under ``sudo -n python3`` (or plain ``python3`` when rootless).
Nothing about the call shows in the host's process list but the fixed bootstrap below.
"""

from __future__ import annotations

import base64
import json
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks.commands import STATE_DIR, sudo, unit_name
from tasks.config import Settings
from tasks.remote import Remote, StepFailed

# Reads the argument line, then runs the next line (the helper, compressed) as the program.
BOOTSTRAP = ("import sys,json,zlib,base64;ARGS=json.loads(sys.stdin.readline());"
             "exec(compile(zlib.decompress(base64.b64decode(sys.stdin.readline())),"
             "'nightguard_host','exec'))")


@lru_cache(maxsize=1)
def helper_source() -> str:
    """The helper, compressed: it travels with every call (about 6 KB instead of 20)."""
    source = Path(__file__).with_name("host_helper.py").read_bytes()
    return base64.b64encode(zlib.compress(source, 9)).decode() + "\n"


def state_dir(settings: Settings) -> str:
    return "/home/{user}/.local/state/nightguard" if settings["rootless"] else STATE_DIR


def unit_path(settings: Settings, user: str) -> str:
    name = unit_name(settings["container_name"])
    if settings["rootless"]:
        return f"/home/{user}/.config/systemd/user/{name}"
    return f"/etc/systemd/system/{name}"


def base_args(settings: Settings, user: str) -> dict[str, Any]:
    return {
        "app_dir": settings["app_dir"],
        "container": settings["container_name"],
        "image_name": settings["image_name"],
        "unit": unit_name(settings["container_name"]),
        "unit_path": unit_path(settings, user),
        "state_dir": state_dir(settings).format(user=user),
        "rootless": settings["rootless"],
        "owner": user,
    }


def call(remote: Remote, settings: Settings, op: str, *, step: str, changes: bool,
         timeout: int | None = None, **args: Any) -> dict[str, Any]:
    """Run one host-helper operation and return its JSON answer."""
    payload = dict(base_args(settings, remote.target.user), op=op, **args)
    argv = sudo(["python3", "-c", BOOTSTRAP], rootful=not settings["rootless"])
    result = remote.run(argv, step=step, stdin=json.dumps(payload) + "\n" + helper_source(),
                        changes=changes, timeout=timeout)
    if remote.dry_run and changes:
        return {}
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise StepFailed(step, f"the host helper answered no JSON: {result.stdout[-200:]!r} "
                         f"{result.stderr[-200:]!r}") from None


def read_facts(remote: Remote, settings: Settings, *, lock: dict | None = None,
               ensure_salt: bool = False) -> dict[str, Any]:
    return call(remote, settings, "facts", step="facts", changes=False, lock=lock,
                ensure_salt=ensure_salt)
