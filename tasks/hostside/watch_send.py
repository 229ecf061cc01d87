"""The watcher's side effects toward the owner: the bot's token read from Podman's
secret when a message goes out, Telegram's sendMessage, and the dead-man ping."""

import json
import re

from ..contract import WATCH_UNIT
from .host_facts import find_tools, podman_version
from .podman_store import secret_value


# the watcher's side effects ----------------------------------------------------------------
def bot_token(paths, conf):
    """The bot's token, read when a message goes out: Podman's secret, never a file of
    ours, an argv or the journal."""
    version = podman_version(paths, find_tools(paths), may_cache=False) or ""
    value = secret_value(paths, conf["secret"], version)
    return value.decode().strip() if value else None


def redact(text, token):
    return text.replace(token, "[REDACTED]") if token else text


def telegram_send(conf, token, text, timeout=10):
    """sendMessage (POST, JSON) to the owner's chat; arrived = ok true with a message_id."""
    import urllib.error
    import urllib.request

    chat = conf["chat_id"]
    body = json.dumps({"chat_id": int(chat) if re.fullmatch(r"-?\d+", chat) else chat,
                       "text": redact(text, token)[:4000],
                       "disable_web_page_preview": True}).encode()
    request = urllib.request.Request(f"{conf['api_base'].rstrip('/')}/bot{token}/sendMessage",
                                     data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, data = response.status, response.read(65536)
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read(65536)
        exc.close()
    except (OSError, ValueError) as exc:  # unreachable, refused, timed out
        return {"ok": False, "status": None,
                "error": redact(f"{type(exc).__name__}: {exc}", token)[:200]}
    try:
        answer = json.loads(data)
    except ValueError:
        answer = {}
    result = answer.get("result") if isinstance(answer, dict) else None
    message_id = result.get("message_id") if isinstance(result, dict) else None
    return {"ok": bool(answer.get("ok")) and message_id is not None, "status": status,
            "message_id": message_id,
            "description": redact(str(answer.get("description") or ""), token)[:200]}


def send_ping(url, timeout=10):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, method="GET",
                                     headers={"User-Agent": WATCH_UNIT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return {"ok": 200 <= response.status < 300, "status": response.status}
    except urllib.error.HTTPError as exc:
        exc.close()
        return {"ok": False, "status": exc.code}
    except (OSError, ValueError) as exc:
        return {"ok": False, "status": None, "error": type(exc).__name__}
