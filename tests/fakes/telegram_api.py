"""A fake Telegram Bot API server, with a fake Gemini endpoint beside it, for tests.

Standard library only: a ThreadingHTTPServer in a background thread, so the same fake
serves an agent started as a subprocess, a container, or a QEMU guest (bind 0.0.0.0 and
give the guest ``fake.url_for("10.0.2.2")``).

    fake = FakeTelegram("123456:token").start()     # 127.0.0.1, a free port
    fake.base_url                 # "http://127.0.0.1:PORT/bot", python-telegram-bot's base_url
    fake.gemini_base_url          # "http://127.0.0.1:PORT", + /v1beta/models/M:generateContent
    sent = fake.send_user_message("hello")         # an update the bot will receive
    fake.wait_for(lambda: fake.replies(), timeout=5)
    fake.unanswered(), fake.answered_twice(), fake.conflicts, fake.getupdates_intervals()
    fake.stop()

Bot API (``/bot<TOKEN>/<method>``; JSON bodies, form bodies and query strings alike):
  getMe, deleteWebhook and setWebhook (``drop_pending_updates`` forgets every pending
  update), getWebhookInfo (no webhook), sendMessage (recorded, answers a Message),
  getUpdates, and ``{"ok":true,"result":true}`` for any other method. A wrong
  token answers 401 as the real API does.
  getUpdates: ``offset`` confirms (forgets) every update below it, ``limit`` caps the batch,
  ``timeout`` holds the request open until an update arrives or the time is up.
  ``allowed_updates`` is ignored. As on the real API, a getUpdates that arrives while an
  older one is still open ends the older one at once with 409 "Conflict: terminated by
  other getUpdates request" and is served itself; each such case counts in ``conflicts``.
  An older request whose client has already hung up (a poller cancels its long poll
  when it stops) is dropped without a conflict: nobody is there to get the 409.

Failures on request: ``set_deaf()`` holds every getUpdates (open ones too) without an
answer for as long as the client keeps its connection, while the other methods still
answer (a Bot API that stopped delivering; ``deaf_polls`` counts the held requests);
``set_revoked()`` answers 401 Unauthorized to every call, held getUpdates included, as
Telegram does once a token has been revoked. Both take ``False`` to end them.

Gemini (``POST /v1beta/models/<model>:generateContent``): the key goes in the
``x-goog-api-key`` header. As Google does, no key answers 403 PERMISSION_DENIED and a
wrong key 400 INVALID_ARGUMENT (reason API_KEY_INVALID). The answer's text is
"gemini says: " + the prompt. ``fail_gemini(n)`` makes the next n calls answer 503;
``gemini_delay`` (seconds) holds every answer, to catch an agent in the middle of a call.

Not modelled: webhooks (setWebhook sets none), file uploads
(multipart bodies), per-chat message ids, rate limits (429 retry_after).

The server never logs: request lines hold the bot token.
"""

from __future__ import annotations

import json
import re
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

TELEGRAM_PATH = re.compile(r"^/bot(?P<token>[^/]*)/(?P<method>[A-Za-z]+)$")
GEMINI_PATH = re.compile(r"^/v1beta/models/(?P<model>[^/:]+):generateContent$")
CONFLICT = (
    "Conflict: terminated by other getUpdates request; "
    "make sure that only one bot instance is running"
)
GEMINI_PREFIX = "gemini says: "
# How often a held getUpdates looks for a client that hung up.
POLL_SLICE = 0.05
# How long a newer getUpdates waits for an older one's client to hang up before calling
# it a conflict: a stopping poller cancels its long poll just before its last getUpdates.
HANGUP_GRACE = 0.05


@dataclass
class Request:
    api: str  # "telegram" or "gemini"
    method: str  # Bot API method as sent, or "generateContent"
    peer: tuple[str, int]
    start: float  # time.monotonic() when the request had been read
    wall: float  # time.time() at the same moment
    params: dict[str, Any]
    authorized: bool
    status: int = 0  # HTTP status answered; 0 while open or when the client hung up first
    end: float | None = None  # time.monotonic() when answered (or given up)


@dataclass
class _Poll:
    request: Request
    sock: socket.socket
    terminated: bool = False


@dataclass
class Reply:
    chat_id: int | str
    text: str
    reply_to: int | None
    message_id: int
    time: float  # time.monotonic()
    peer: tuple[str, int]


@dataclass
class GeminiCall:
    model: str
    prompt: str
    status: int
    key_in_url: bool
    time: float = field(default_factory=time.monotonic)


def _int(value, default=None):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float(value, default=0.0):
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _obj(value):
    """A JSON object parameter: the real API takes it as a JSON string in forms."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _peer_gone(sock: socket.socket, wait: float = 0.0) -> bool:
    """True when the client closed its end (EOF pending) or the socket is unusable."""
    try:
        readable, _, _ = select.select([sock], [], [], wait)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that hung up mid-answer, e.g. a cancelled long poll
        super().handle_error(request, client_address)


class FakeTelegram:
    def __init__(
        self,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        gemini_key: str = "fake-gemini-key",
    ):
        self.token = token
        self.gemini_key = gemini_key
        self.conflicts = 0
        self.requests: list[Request] = []
        self.injected: list[dict] = []
        self._sent: list[Reply] = []
        self._gemini: list[GeminiCall] = []
        self._updates: list[dict] = []  # not yet confirmed
        self._polls: list[_Poll] = []  # open getUpdates requests
        self._connections: set[socket.socket] = set()
        self._next_update_id = 100_000
        self._next_message_id = 0
        self._gemini_failures = 0
        self.gemini_delay = 0.0
        self.deaf = False
        self.revoked = False
        self.deaf_polls = 0
        self._closing = False
        self._cond = threading.Condition(threading.RLock())
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a poller's connection pool expects

            def setup(self):
                super().setup()
                with fake._cond:
                    fake._connections.add(self.connection)

            def finish(self):
                with fake._cond:
                    fake._connections.discard(self.connection)
                super().finish()

            def do_GET(self):  # noqa: N802
                fake._handle(self)

            do_POST = do_GET

            def log_message(self, format, *args):  # request lines hold the bot token
                pass

        self._server = _Server((host, port), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-telegram", daemon=True
        )

    # --- lifecycle and addresses ---------------------------------------------------

    def start(self) -> FakeTelegram:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            # Held getUpdates answer (empty) before their connections are cut below.
            deadline = time.monotonic() + 1.0
            while self._polls and time.monotonic() < deadline:
                self._cond.wait(POLL_SLICE)
        self._server.shutdown()
        self._server.server_close()
        with self._cond:  # keep-alive connections too: the server is gone for everyone
            for sock in list(self._connections):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __enter__(self) -> FakeTelegram:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def host(self) -> str:
        host = self._server.server_address[0]
        return "127.0.0.1" if host in ("0.0.0.0", "") else host

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url_for(self, host: str) -> str:
        """The Bot API base URL (python-telegram-bot's ``base_url``) as seen from ``host``."""
        return f"http://{host}:{self.port}/bot"

    def gemini_url_for(self, host: str) -> str:
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url_for(self.host)

    @property
    def gemini_base_url(self) -> str:
        return self.gemini_url_for(self.host)

    # --- test helpers --------------------------------------------------------------

    def send_user_message(self, text: str, chat_id: int = 4242, user: dict | None = None) -> dict:
        """Queue a private text message from a user; returns the update."""
        sender = {"id": chat_id, "is_bot": False, "first_name": "Alice", **(user or {})}
        with self._cond:
            self._next_update_id += 1
            self._next_message_id += 1
            update = {
                "update_id": self._next_update_id,
                "message": {
                    "message_id": self._next_message_id,
                    "from": sender,
                    "chat": {"id": chat_id, "type": "private", "first_name": sender["first_name"]},
                    "date": int(time.time()),
                    "text": text,
                },
            }
            self._updates.append(update)
            self.injected.append(update)
            self._cond.notify_all()
        return update

    def fail_gemini(self, times: int = 1) -> None:
        """The next ``times`` Gemini calls answer 503 UNAVAILABLE."""
        with self._cond:
            self._gemini_failures = times

    def set_deaf(self, on: bool = True) -> None:
        """getUpdates is held without an answer, the connection open, until ``set_deaf(False)``."""
        with self._cond:
            self.deaf = on
            self._cond.notify_all()

    def set_revoked(self, on: bool = True) -> None:
        """Every Bot API call answers 401 Unauthorized, as for a revoked token."""
        with self._cond:
            self.revoked = on
            self._cond.notify_all()

    def calls(self, *methods: str) -> list[Request]:
        """Bot API requests for any of ``methods`` (all when none are named)."""
        wanted = {m.lower() for m in methods}
        with self._cond:
            return [
                r
                for r in self.requests
                if r.api == "telegram" and (not wanted or r.method.lower() in wanted)
            ]

    def open_polls(self) -> list[Request]:
        """getUpdates requests being held right now."""
        with self._cond:
            return [p.request for p in self._polls]

    def replies(self) -> list[Reply]:
        with self._cond:
            return list(self._sent)

    def gemini_calls(self) -> list[GeminiCall]:
        with self._cond:
            return list(self._gemini)

    def pending_updates(self) -> list[dict]:
        """Updates not yet confirmed by an offset."""
        with self._cond:
            return list(self._updates)

    def _reply_counts(self) -> list[tuple[dict, int]]:
        with self._cond:
            counts = []
            for update in self.injected:
                msg = update["message"]
                n = sum(
                    1
                    for r in self._sent
                    if r.reply_to == msg["message_id"] and r.chat_id == msg["chat"]["id"]
                )
                counts.append((update, n))
            return counts

    def unanswered(self) -> list[dict]:
        """Injected updates no sendMessage replied to (by reply_to message id)."""
        return [u for u, n in self._reply_counts() if n == 0]

    def answered_twice(self) -> list[dict]:
        return [u for u, n in self._reply_counts() if n > 1]

    def getupdates_intervals(self) -> list[tuple[float, float, tuple[str, int]]]:
        """(start, end, peer) of every finished authorized getUpdates, by start time."""
        with self._cond:
            rows = [
                (r.start, r.end, r.peer)
                for r in self.requests
                if r.api == "telegram"
                and r.authorized
                and r.method.lower() == "getupdates"
                and r.end is not None
            ]
        return sorted(rows)

    def wait_for(self, predicate, timeout: float = 5.0):
        """Wait until ``predicate()`` is truthy; returns its last value (falsy on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                remaining = deadline - time.monotonic()
                if value or remaining <= 0:
                    return value
                self._cond.wait(min(POLL_SLICE, remaining))

    # --- HTTP ------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        length = _int(handler.headers.get("Content-Length"), 0)
        body = handler.rfile.read(length) if length > 0 else b""
        params: dict[str, Any] = dict(parse_qsl(url.query))
        ctype = (handler.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        try:
            if ctype == "application/json" and body:
                parsed = json.loads(body)
                if isinstance(parsed, dict):
                    params.update(parsed)
            elif ctype == "application/x-www-form-urlencoded":
                params.update(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except (ValueError, UnicodeDecodeError):
            self._answer(
                handler,
                None,
                400,
                {"ok": False, "error_code": 400, "description": "Bad Request: can't parse body"},
            )
            return

        if m := TELEGRAM_PATH.match(url.path):
            self._telegram(handler, m["token"], m["method"], params)
        elif (m := GEMINI_PATH.match(url.path)) and handler.command == "POST":
            self._gemini_call(handler, m["model"], params, "key" in dict(parse_qsl(url.query)))
        else:
            self._answer(
                handler, None, 404, {"ok": False, "error_code": 404, "description": "Not Found"}
            )

    def _record(self, handler, api, method, params, authorized) -> Request:
        record = Request(
            api=api,
            method=method,
            peer=tuple(handler.client_address[:2]),
            start=time.monotonic(),
            wall=time.time(),
            params={k: v for k, v in params.items() if k != "key"},
            authorized=authorized,
        )
        with self._cond:
            self.requests.append(record)
        return record

    def _answer(self, handler, record, status, payload) -> None:
        data = json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            handler.wfile.flush()
            delivered = True
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True
            delivered = False
        if record is not None:
            with self._cond:
                record.status = status if delivered else 0
                record.end = time.monotonic()
                self._cond.notify_all()

    def _telegram(self, handler, token, method, params) -> None:
        authorized = token == self.token and not self.revoked
        record = self._record(handler, "telegram", method, params, authorized)
        if not authorized:
            self._answer(
                handler,
                record,
                401,
                {"ok": False, "error_code": 401, "description": "Unauthorized"},
            )
            return
        name = method.lower()  # the real API takes method names in any case
        if name == "getupdates":
            self._get_updates(handler, record, params)
            return
        if name == "getme":
            result: Any = {
                "id": _int(self.token.split(":")[0], 1),
                "is_bot": True,
                "first_name": "Night Guard (fake)",
                "username": "night_guard_fake_bot",
                "can_join_groups": True,
                "can_read_all_group_messages": False,
                "supports_inline_queries": False,
            }
        elif name == "getwebhookinfo":
            with self._cond:
                pending = len(self._updates)
            result = {"url": "", "has_custom_certificate": False, "pending_update_count": pending}
        elif name in ("deletewebhook", "setwebhook"):
            if str(params.get("drop_pending_updates", "")).lower() in ("true", "1"):
                with self._cond:
                    self._updates.clear()
            result = True
        elif name == "sendmessage":
            status, payload = self._send_message(handler, params)
            self._answer(handler, record, status, payload)
            return
        else:
            result = True
        self._answer(handler, record, 200, {"ok": True, "result": result})

    def _send_message(self, handler, params) -> tuple[int, dict]:
        chat_id = params.get("chat_id")
        chat_id = _int(chat_id, chat_id)
        text = params.get("text")
        if chat_id in (None, ""):
            return 400, {
                "ok": False,
                "error_code": 400,
                "description": "Bad Request: chat_id is empty",
            }
        if not text:
            return 400, {
                "ok": False,
                "error_code": 400,
                "description": "Bad Request: message text is empty",
            }
        reply_to = _int(params.get("reply_to_message_id"))
        reply_parameters = _obj(params.get("reply_parameters"))
        if reply_to is None and isinstance(reply_parameters, dict):
            reply_to = _int(reply_parameters.get("message_id"))
        with self._cond:
            self._next_message_id += 1
            message = {
                "message_id": self._next_message_id,
                "from": {
                    "id": _int(self.token.split(":")[0], 1),
                    "is_bot": True,
                    "first_name": "Night Guard (fake)",
                    "username": "night_guard_fake_bot",
                },
                "chat": {"id": chat_id, "type": "private"},
                "date": int(time.time()),
                "text": text,
            }
            self._sent.append(
                Reply(
                    chat_id,
                    text,
                    reply_to,
                    self._next_message_id,
                    time.monotonic(),
                    tuple(handler.client_address[:2]),
                )
            )
            self._cond.notify_all()
        return 200, {"ok": True, "result": message}

    def _get_updates(self, handler, record, params) -> None:
        offset = _int(params.get("offset"), 0)
        limit = min(100, max(1, _int(params.get("limit"), 100)))
        timeout = max(0.0, _float(params.get("timeout"), 0.0))
        me = _Poll(record, handler.connection)
        if not self._hold_while_deaf(handler, record):
            return

        with self._cond:
            older = list(self._polls)
        # Outside the lock: an older poll whose client hung up is no conflict.
        alive = [p for p in older if not _peer_gone(p.sock, HANGUP_GRACE)]
        with self._cond:
            for poll in older:
                if poll in self._polls:
                    self._polls.remove(poll)
                    if poll in alive:
                        poll.terminated = True
                        self.conflicts += 1
            self._polls.append(me)
            if offset > 0:
                self._updates = [u for u in self._updates if u["update_id"] >= offset]
            elif offset < 0:  # the real API: keep only the last -offset updates
                self._updates = self._updates[offset:]
            self._cond.notify_all()

            deadline = time.monotonic() + timeout
            outcome = "updates"
            while True:
                if me.terminated:
                    outcome = "conflict"
                    break
                if self.revoked or self.deaf:
                    outcome = "revoked" if self.revoked else "deaf"
                    break
                if self._updates or self._closing or time.monotonic() >= deadline:
                    break
                self._cond.wait(min(POLL_SLICE, max(0.0, deadline - time.monotonic())))
                if not me.terminated and _peer_gone(handler.connection):
                    outcome = "gone"
                    break
            if me in self._polls:
                self._polls.remove(me)
            batch = [] if self._closing else list(self._updates[:limit])

        if outcome == "conflict":
            self._answer(
                handler, record, 409, {"ok": False, "error_code": 409, "description": CONFLICT}
            )
        elif outcome == "revoked":
            self._answer(
                handler,
                record,
                401,
                {"ok": False, "error_code": 401, "description": "Unauthorized"},
            )
        elif outcome == "deaf":  # an open poll when the fake went deaf: held from now on
            if self._hold_while_deaf(handler, record):
                self._get_updates(handler, record, params)
        elif outcome == "gone":
            handler.close_connection = True
            with self._cond:
                record.end = time.monotonic()
                self._cond.notify_all()
        else:
            self._answer(handler, record, 200, {"ok": True, "result": batch})

    def _hold_while_deaf(self, handler, record) -> bool:
        """Hold a getUpdates while the fake is deaf; True when it is to be served after all.

        A client that hangs up (its read timeout) ends the hold, with no answer; so does
        stop(), which then cuts the connection.
        """
        with self._cond:
            if not self.deaf:
                return True
            self.deaf_polls += 1
            while self.deaf and not self._closing:
                if self.revoked:
                    break
                self._cond.wait(POLL_SLICE)
                if _peer_gone(handler.connection):
                    handler.close_connection = True
                    record.end = time.monotonic()
                    self._cond.notify_all()
                    return False
            if self._closing:
                handler.close_connection = True
                record.end = time.monotonic()
                return False
        if self.revoked:
            self._answer(
                handler,
                record,
                401,
                {"ok": False, "error_code": 401, "description": "Unauthorized"},
            )
            return False
        return True

    def _gemini_call(self, handler, model, params, key_in_url) -> None:
        key = handler.headers.get("x-goog-api-key") or params.get("key")
        authorized = key == self.gemini_key
        record = self._record(handler, "gemini", "generateContent", params, authorized)
        prompt = ""
        contents = params.get("contents")
        if isinstance(contents, list) and contents and isinstance(contents[-1], dict):
            parts = contents[-1].get("parts") or []
            prompt = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        if not key:
            status, payload = (
                403,
                _google_error(
                    403,
                    "PERMISSION_DENIED",
                    "Method doesn't allow unregistered callers (callers without established "
                    "identity). Please use API Key or other form of API consumer identity to call "
                    "this API.",
                ),
            )
        elif not authorized:
            status, payload = (
                400,
                _google_error(
                    400,
                    "INVALID_ARGUMENT",
                    "API key not valid. Please pass a valid API key.",
                    reason="API_KEY_INVALID",
                ),
            )
        elif not prompt:
            status, payload = (
                400,
                _google_error(
                    400,
                    "INVALID_ARGUMENT",
                    "* GenerateContentRequest.contents: contents is not specified",
                ),
            )
        else:
            with self._cond:
                failing = self._gemini_failures > 0
                if failing:
                    self._gemini_failures -= 1
            if failing:
                status, payload = (
                    503,
                    _google_error(
                        503, "UNAVAILABLE", "The model is overloaded. Please try again later."
                    ),
                )
            else:
                status, payload = (
                    200,
                    {
                        "candidates": [
                            {
                                "content": {
                                    "parts": [{"text": GEMINI_PREFIX + prompt}],
                                    "role": "model",
                                },
                                "finishReason": "STOP",
                                "index": 0,
                            }
                        ],
                        "modelVersion": model,
                    },
                )
        if self.gemini_delay:
            time.sleep(self.gemini_delay)
        with self._cond:
            self._gemini.append(GeminiCall(model, prompt, status, key_in_url))
        self._answer(handler, record, status, payload)


def _google_error(code: int, status: str, message: str, reason: str = "") -> dict:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if reason:
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ]
    return {"error": error}
