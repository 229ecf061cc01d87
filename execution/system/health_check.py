#!/usr/bin/env python3
"""Night Guard container health check (the image's HEALTHCHECK).

Run as ``python3 execution/system/health_check.py`` with cwd /app. Prints exactly
one JSON line and exits 0 when healthy (warnings allowed) or 1 when unhealthy:

    {"status":"healthy","checks":{"heartbeat":{"ok":true,"age_s":3.1},...},
     "warnings":[]}

Checks:
  heartbeat  the heartbeat file's mtime is younger than NG_HEARTBEAT_MAX_AGE
  polling    for an agent that reports it (a JSON object in the heartbeat file, written
             by heartbeat.beat(fields=...)): its last completed poll ("polled_at", Unix
             time) is at most "poll_timeout" + NG_POLL_MARGIN seconds old, so a bot whose
             loop still beats but whose getUpdates never returns fails (state "stalled").
             No such fields: state "not_reported", never a failure. "token": "rejected"
             (the API refuses the bot token): state "token_rejected" and a warning, not a
             failure, since a restart cannot mend a revoked token and would only call
             Telegram again
  secrets    every name in NG_REQUIRED_SECRETS is a non-empty file in NG_SECRETS_DIR
             (only names are reported, never values)
  dirs       directives/ and knowledge/ under NG_APP_DIR exist and are listable
  memory     cgroup (v2 or v1) usage against its limit; above NG_MEMORY_WARN_PERCENT
             it adds a warning, it never fails the check
  disk       free space of NG_APP_DIR's filesystem is at least NG_MIN_FREE_DISK_MB

Environment (all optional): NG_APP_DIR (default: two levels above this file),
NG_HEARTBEAT_FILE (/tmp/nightguard/heartbeat), NG_HEARTBEAT_MAX_AGE (30 s),
NG_POLL_MARGIN (30 s: covers python-telegram-bot's longest pause between polls after
errors, 30 s; a poll that hangs times out on the client and is retried at once, so it
never completes and only an answer moves polled_at),
NG_SECRETS_DIR (/run/secrets), NG_REQUIRED_SECRETS
("telegram_bot_token,gemini_api_key"), NG_MEMORY_WARN_PERCENT (90),
NG_MIN_FREE_DISK_MB (50), NG_CGROUP_ROOT (/sys/fs/cgroup).

It runs every few seconds for the life of the container, so it stays cheap: only
math, os, sys and time are imported. ``json`` is deliberately avoided because it pulls
in ``re`` and ``enum`` and doubles the start-up time of the process; the output is
small enough for the tiny encoder below.
"""

import math
import os
import sys
import time

DEFAULT_HEARTBEAT_FILE = "/tmp/nightguard/heartbeat"
DEFAULT_HEARTBEAT_MAX_AGE = 30.0
DEFAULT_POLL_MARGIN = 30.0
# The heartbeat's content is a short line; anything longer is not ours to parse.
HEARTBEAT_PEEK_BYTES = 1024
DEFAULT_SECRETS_DIR = "/run/secrets"
DEFAULT_REQUIRED_SECRETS = "telegram_bot_token,gemini_api_key"
DEFAULT_MEMORY_WARN_PERCENT = 90.0
DEFAULT_MIN_FREE_DISK_MB = 50.0
DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
REQUIRED_DIRS = ("directives", "knowledge")

MB = 1024 * 1024
# cgroup v1 reports "no limit" as a page-rounded 2**63-1; v2 writes "max".
UNLIMITED_BYTES = 1 << 60
# A secret larger than this is still "ok"; only its first bytes are inspected.
SECRET_PEEK_BYTES = 4096


def default_app_dir():
    """The app root: two levels above this file's directory (/app in the image)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.dirname(os.path.dirname(here))


# --- checks: small pure-ish functions, each returns a dict with "ok" -------------


def check_heartbeat(path, now, max_age):
    """Fresh when the file's mtime is younger than ``max_age`` seconds."""
    try:
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return {"ok": False, "error": "missing"}
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__}
    age = max(0.0, now - mtime)
    result = {"ok": age < max_age, "age_s": round(age, 1)}
    if not result["ok"]:
        result["max_age_s"] = max_age
    return result


def _skip(text, pos):
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}


def _string(text, pos):
    """A JSON string at ``pos`` (its opening quote): (value, position after it)."""
    out, pos, end = [], pos + 1, len(text)
    while pos < end:
        ch = text[pos]
        if ch == '"':
            return "".join(out), pos + 1
        if ch != "\\":
            out.append(ch)
            pos += 1
            continue
        esc = text[pos + 1 : pos + 2]
        if esc != "u":
            out.append(_ESCAPES.get(esc, esc))
            pos += 2
            continue
        code = int(text[pos + 2 : pos + 6], 16)
        pos += 6
        if 0xD800 <= code < 0xDC00 and text[pos : pos + 2] == "\\u":
            low = int(text[pos + 2 : pos + 6], 16)  # a UTF-16 surrogate pair
            if 0xDC00 <= low < 0xE000:
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                pos += 6
        out.append(chr(code))
    raise ValueError("unterminated string")


def _scalar(text, pos):
    """A JSON string, number, boolean or null at ``pos``: (value, position after it)."""
    if text[pos : pos + 1] == '"':
        return _string(text, pos)
    stop = pos
    while stop < len(text) and text[stop] not in ",} \t\r\n":
        stop += 1
    word = text[pos:stop]
    literals = {"true": True, "false": False, "null": None}
    if word in literals:
        return literals[word], stop
    value = float(word)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value, stop


def parse_flat_object(text):
    """A one-level JSON object of strings, numbers, booleans and nulls, else None.

    The heartbeat's content; a small scanner because ``json`` would double the start-up
    time of every check (see the module docstring). Nested values are refused.
    """
    try:
        pos = _skip(text, 0)
        if text[pos : pos + 1] != "{":
            return None
        result = {}
        pos = _skip(text, pos + 1)
        if text[pos : pos + 1] == "}":
            return result if not text[_skip(text, pos + 1) :] else None
        while True:
            if text[pos : pos + 1] != '"':
                return None
            key, pos = _string(text, pos)
            pos = _skip(text, pos)
            if text[pos : pos + 1] != ":":
                return None
            result[key], pos = _scalar(text, _skip(text, pos + 1))
            pos = _skip(text, pos)
            ch = text[pos : pos + 1]
            if ch == "}":
                return result if not text[_skip(text, pos + 1) :] else None
            if ch != ",":
                return None
            pos = _skip(text, pos + 1)
    except (ValueError, IndexError):
        return None


def check_polling(path, now, margin):
    """Polling progress as the agent reports it in the heartbeat's content.

    Only an agent that writes "polled_at" can fail this check; a revoked token is
    reported (state "token_rejected"), never failed: a restart cannot fix it.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEARTBEAT_PEEK_BYTES)
    except OSError:  # the heartbeat check says what is wrong with the file
        return {"ok": True, "state": "not_reported"}
    fields = parse_flat_object(head.decode("utf-8", "replace"))
    if not fields:
        return {"ok": True, "state": "not_reported"}
    if fields.get("token") == "rejected":
        return {"ok": True, "state": "token_rejected"}
    polled_at = fields.get("polled_at")
    if not isinstance(polled_at, float):
        return {"ok": True, "state": "not_reported"}
    timeout = fields.get("poll_timeout")
    timeout = timeout if isinstance(timeout, float) and timeout >= 0 else 0.0
    age = max(0.0, now - polled_at)
    limit = timeout + margin
    if age <= limit:
        return {"ok": True, "state": "polling", "age_s": round(age, 1)}
    return {"ok": False, "state": "stalled", "age_s": round(age, 1), "max_age_s": limit}


def secret_state(path):
    """'ok', 'missing', 'empty' or 'unreadable'. The content is never returned."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(SECRET_PEEK_BYTES)
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "unreadable"
    return "ok" if head.strip() else "empty"


def check_secrets(secrets_dir, names):
    """Every required secret is a non-empty file; reports names and states only."""
    problems = {}
    for name in names:
        if os.sep in name or name in ("", ".", ".."):
            problems[name] = "invalid-name"
            continue
        state = secret_state(os.path.join(secrets_dir, name))
        if state != "ok":
            problems[name] = state
    result = {"ok": not problems}
    if problems:
        result["problems"] = problems
    return result


def check_dirs(app_dir, names=REQUIRED_DIRS):
    """Each directory exists and can be listed."""
    problems = {}
    for name in names:
        try:
            os.listdir(os.path.join(app_dir, name))
        except FileNotFoundError:
            problems[name] = "missing"
        except NotADirectoryError:
            problems[name] = "not-a-dir"
        except OSError:
            problems[name] = "unreadable"
    result = {"ok": not problems}
    if problems:
        result["problems"] = problems
    return result


def _read_int(path):
    """An integer from a cgroup file; None when absent, unreadable or "max"."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(64).strip()
    except OSError:
        return None
    if not text or text == b"max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _limit(value):
    """A cgroup limit, or None when it means unlimited."""
    if value is None or value <= 0 or value >= UNLIMITED_BYTES:
        return None
    return value


def _stat_value(path, key):
    """One counter from a memory.stat file, 0 when absent."""
    prefix = key.encode() + b" "
    try:
        with open(path, "rb") as fh:
            for line in fh:
                if line.startswith(prefix):
                    return int(line[len(prefix) :])
    except (OSError, ValueError):
        pass
    return 0


def read_cgroup_memory(root):
    """Memory figures in bytes from cgroup v2 or v1 files under ``root``.

    Returns None when no memory controller is visible, else a dict with
    used, limit, swap_used, swap_limit (limits are None when unlimited).
    ``used`` leaves out inactive file cache, which the kernel reclaims before it
    swaps or kills, as ``docker stats`` does.
    """
    current = _read_int(os.path.join(root, "memory.current"))
    if current is not None:  # cgroup v2: swap is counted apart from memory
        cache = _stat_value(os.path.join(root, "memory.stat"), "inactive_file")
        return {
            "version": 2,
            "used": max(0, current - cache),
            "limit": _limit(_read_int(os.path.join(root, "memory.max"))),
            "swap_used": _read_int(os.path.join(root, "memory.swap.current")) or 0,
            "swap_limit": _limit(_read_int(os.path.join(root, "memory.swap.max"))),
        }
    v1 = os.path.join(root, "memory")
    usage = _read_int(os.path.join(v1, "memory.usage_in_bytes"))
    if usage is None:
        return None
    # cgroup v1: memsw.* count memory + swap together.
    cache = _stat_value(os.path.join(v1, "memory.stat"), "total_inactive_file")
    limit = _limit(_read_int(os.path.join(v1, "memory.limit_in_bytes")))
    memsw_usage = _read_int(os.path.join(v1, "memory.memsw.usage_in_bytes"))
    memsw_limit = _limit(_read_int(os.path.join(v1, "memory.memsw.limit_in_bytes")))
    swap_used = max(0, memsw_usage - usage) if memsw_usage is not None else 0
    swap_limit = None
    if memsw_limit is not None and limit is not None:
        swap_limit = max(0, memsw_limit - limit)
    return {
        "version": 1,
        "used": max(0, usage - cache),
        "limit": limit,
        "swap_used": swap_used,
        "swap_limit": swap_limit,
    }


def check_memory(mem, warn_percent):
    """Never fails; returns (result, warnings). ``mem`` is read_cgroup_memory()."""
    if mem is None:
        return {"ok": True, "limit_mb": None}, []
    used, limit = mem["used"], mem["limit"]
    swap_used, swap_limit = mem["swap_used"], mem["swap_limit"]
    result = {"ok": True, "used_mb": round(used / MB)}
    warnings = []
    result["limit_mb"] = round(limit / MB) if limit else None
    if limit:
        pct = 100.0 * used / limit
        result["pct"] = round(pct, 1)
        if pct >= warn_percent:
            warnings.append(f"memory {pct:.0f}% of {round(limit / MB)} MB limit")
    if swap_used or swap_limit:
        result["swap_mb"] = round(swap_used / MB)
        result["swap_limit_mb"] = round(swap_limit / MB) if swap_limit else None
    if limit and swap_limit:
        total_pct = 100.0 * (used + swap_used) / (limit + swap_limit)
        if total_pct >= warn_percent:
            total_mb = round((limit + swap_limit) / MB)
            warnings.append(f"memory+swap {total_pct:.0f}% of {total_mb} MB limit, OOM kill near")
    return result, warnings


def check_disk(path, min_free_mb):
    """Free space (for unprivileged users) of ``path``'s filesystem."""
    try:
        st = os.statvfs(path)
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__}
    free_mb = st.f_bavail * st.f_frsize / MB
    result = {"ok": free_mb >= min_free_mb, "free_mb": int(free_mb)}
    if not result["ok"]:
        result["min_mb"] = min_free_mb
    return result


# --- output -----------------------------------------------------------------


def _encode_str(text):
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"' or ch == "\\" or code < 0x20 or code > 0x7E:
            if code > 0xFFFF:  # outside the BMP: a UTF-16 surrogate pair
                code -= 0x10000
                out.append(f"\\u{0xD800 | code >> 10:04x}\\u{0xDC00 | code & 0x3FF:04x}")
            else:
                out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def to_json(value):
    """Compact single-line JSON for the plain types the checks produce."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "null"
    if isinstance(value, str):
        return _encode_str(value)
    if isinstance(value, dict):
        items = (_encode_str(str(k)) + ":" + to_json(v) for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return _encode_str(str(value))


# --- wiring -----------------------------------------------------------------


def _number(env, name, default, warnings):
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        warnings.append(f"bad {name}, using {default:g}")
        return default
    return value


def run_checks(env, now):
    """All checks from configuration in ``env``; returns (report, exit_code)."""
    warnings = []
    app_dir = env.get("NG_APP_DIR") or default_app_dir()
    heartbeat_file = env.get("NG_HEARTBEAT_FILE") or DEFAULT_HEARTBEAT_FILE
    max_age = _number(env, "NG_HEARTBEAT_MAX_AGE", DEFAULT_HEARTBEAT_MAX_AGE, warnings)
    poll_margin = _number(env, "NG_POLL_MARGIN", DEFAULT_POLL_MARGIN, warnings)
    secrets_dir = env.get("NG_SECRETS_DIR") or DEFAULT_SECRETS_DIR
    raw_names = env.get("NG_REQUIRED_SECRETS")
    if raw_names is None:
        raw_names = DEFAULT_REQUIRED_SECRETS
    names = [n.strip() for n in raw_names.split(",") if n.strip()]
    warn_pct = _number(env, "NG_MEMORY_WARN_PERCENT", DEFAULT_MEMORY_WARN_PERCENT, warnings)
    min_disk = _number(env, "NG_MIN_FREE_DISK_MB", DEFAULT_MIN_FREE_DISK_MB, warnings)
    cgroup_root = env.get("NG_CGROUP_ROOT") or DEFAULT_CGROUP_ROOT

    checks = {}

    def guarded(name, func, *args):
        try:
            checks[name] = func(*args)
        except Exception as exc:  # noqa: BLE001 - a broken check must still print JSON
            checks[name] = {"ok": False, "error": type(exc).__name__}

    guarded("heartbeat", check_heartbeat, heartbeat_file, now, max_age)
    guarded("polling", check_polling, heartbeat_file, now, poll_margin)
    if checks["polling"].get("state") == "token_rejected":
        warnings.append("telegram rejected the bot token: the agent stopped polling")
    guarded("secrets", check_secrets, secrets_dir, names)
    guarded("dirs", check_dirs, app_dir)
    try:
        checks["memory"], mem_warnings = check_memory(read_cgroup_memory(cgroup_root), warn_pct)
        warnings.extend(mem_warnings)
    except Exception as exc:  # noqa: BLE001 - memory only ever warns
        checks["memory"] = {"ok": True, "error": type(exc).__name__}
        warnings.append(f"memory check failed: {type(exc).__name__}")
    guarded("disk", check_disk, app_dir, min_disk)

    healthy = all(c.get("ok") for c in checks.values())
    report = {
        "status": "healthy" if healthy else "unhealthy",
        "checks": checks,
        "warnings": warnings,
    }
    return report, 0 if healthy else 1


def main(env=None, now=None, out=None):
    report, code = run_checks(
        os.environ if env is None else env, time.time() if now is None else now
    )
    (out or sys.stdout).write(to_json(report) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
