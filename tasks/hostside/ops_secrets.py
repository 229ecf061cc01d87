"""Ops on Podman secrets: a new value (the one it replaces kept as
NAME__<digest12> for a rollback), a kept value put back, and kept values let go."""

import hashlib
import hmac
import os

from ..contract import COPY_SEP
from .base import OpError, read_json, read_text, sh, version_tuple, write_json
from .host_facts import find_tools, podman_version
from .podman_store import list_secrets, secret_value


# secrets ------------------------------------------------------------------------------
def host_podman(s):
    """This host's own Podman version (cached by the binary's identity, as facts read it):
    `podman secret create --replace` and `inspect --showsecret` depend on it."""
    return podman_version(s.paths, find_tools(s.paths), may_cache=s.changing) or ""


def salt(paths):
    text = read_text(os.path.join(paths["state"], "secret.salt"))
    if not text:
        raise OpError("the host has no secret key yet (facts of a changing session make it)")
    return bytes.fromhex(text)


def digest(paths, value):
    return hmac.new(salt(paths), value, hashlib.sha256).hexdigest()


def create_secret(name, value, replace, present):
    """`--replace` where Podman has it (atomic); else rm + create."""
    if present and not replace:
        sh(["podman", "secret", "rm", name])
    argv = ["podman", "secret", "create"] + (["--replace"] if replace and present else []) \
        + [name, "-"]
    code, _, err = sh(argv, data=value)
    if code != 0:
        raise OpError(f"podman secret create {name} failed: {err.strip()[-200:]}")


def op_secret_put(s, req):
    """Replace secret NAME with the value sent (bytes after the request line). The value
    it replaces is kept first as NAME__<digest12> (for a rollback); the new value's digest
    is recorded only once Podman has it: the host never claims a value it lacks."""
    p, name, value = s.paths, req["name"], req["data"]
    version = host_podman(s)
    replace = version_tuple(version) >= (4, 7)
    present = list_secrets(p)
    hashes = read_json(os.path.join(p["state"], "secrets.json"), {})
    kept = None
    if name in present:
        old = secret_value(p, name, version)
        if old is not None:
            kept = digest(p, old)
            copy = f"{name}{COPY_SEP}{kept[:12]}"
            if copy not in present:
                create_secret(copy, old, replace, False)
        elif req.get("keep", True):
            raise OpError(f"cannot read the current value of {name} to keep it")
    try:
        create_secret(name, value, replace, name in present)
    except OpError:
        if kept and name not in list_secrets(p):  # rm went through, create did not
            create_secret(name, secret_value(p, f"{name}{COPY_SEP}{kept[:12]}", version),
                          False, False)
        raise
    hashes[name] = digest(p, value)
    write_json(os.path.join(p["state"], "secrets.json"), hashes)
    return {"digest": hashes[name], "kept": kept}


def op_secret_restore(s, req):
    """Put back the kept value of NAME whose digest is given (rollbacks)."""
    p, version = s.paths, host_podman(s)
    present = list_secrets(p)
    restored, missing = [], []
    hashes = read_json(os.path.join(p["state"], "secrets.json"), {})
    for name, wanted in req["digests"].items():
        if hashes.get(name) == wanted:
            continue
        copy = f"{name}{COPY_SEP}{wanted[:12]}"
        value = secret_value(p, copy, version) if copy in present else None
        if value is None:
            missing.append(name)
            continue
        current = secret_value(p, name, version) if name in present else None
        if current is not None:
            old = digest(p, current)
            backup = f"{name}{COPY_SEP}{old[:12]}"
            if backup not in present:
                create_secret(backup, current, version_tuple(version) >= (4, 7), False)
        create_secret(name, value, version_tuple(version) >= (4, 7), name in present)
        hashes[name] = wanted
        write_json(os.path.join(p["state"], "secrets.json"), hashes)
        restored.append(name)
    return {"restored": restored, "missing": missing}


def op_secret_forget(s, req):
    """After a rollback: drop the values no kept release uses (the failed one among them)."""
    history = read_json(os.path.join(s.paths["state"], "state.json"), {}).get("history") or []
    return {"dropped": forget_secrets(s.paths, history)}


def forget_secrets(paths, history):
    """Drop kept values (NAME__<digest12>) no kept release runs with."""
    keep = {f"{name}{COPY_SEP}{d[:12]}" for h in history
            for name, d in (h.get("secrets") or {}).items()}
    dropped = []
    for name in list_secrets(paths):
        if COPY_SEP in name and name not in keep:
            sh(["podman", "secret", "rm", name])
            dropped.append(name)
    return dropped
