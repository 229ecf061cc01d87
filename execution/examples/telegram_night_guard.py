#!/usr/bin/env python3
"""A small real Night Guard: a Telegram bot that answers each text message with Gemini.

    python3 execution/examples/telegram_night_guard.py        (cwd /app)

Needs the packages in execution/examples/requirements.txt (python-telegram-bot, which
brings httpx). What it shows beyond the reference agent (execution/system/night_guard.py):
  * long polling with python-telegram-bot's ``run_polling``: on SIGTERM/SIGINT it stops
    fetching, confirms the updates it already fetched with one last getUpdates, answers
    them and exits 0, so a restart neither answers a message twice nor loses one. Pending
    updates are never dropped at start (Telegram keeps them for 24 h);
  * one poller per token: Telegram answers 409 Conflict when two processes poll, so a
    deploy must stop the old container before it starts the new one. After failed polls
    (409s, Telegram unreachable) python-telegram-bot waits 1, 1.5, 2.25, ... up to 30 s
    before it polls again, and a stop waits for that pause to end: a stop can then
    outlast podman's 10 s grace and end in SIGKILL;
  * the heartbeat is written by a task on the bot's own event loop, so a blocked loop makes
    the health check fail. It also carries the time of the last completed getUpdates
    ("polled_at", whatever Telegram answered: updates, none, or an error) and the long-poll
    timeout ("poll_timeout"), so a bot whose loop runs but whose polls never come back
    (a "deaf" bot) fails the health check too;
  * a bot token Telegram refuses (401, e.g. revoked) is not retried: the agent stops
    polling, stays up, writes "token": "rejected" into its heartbeat, and the health check
    reports it without failing, so no restart loop keeps calling Telegram with a dead
    token. A deploy with a new token starts a fresh agent;
  * secrets never reach the log: the URLs that carry the bot token are not logged, and
    secret values are blanked out of every log line, tracebacks included.

Environment: NG_SECRETS_DIR (/run/secrets; files telegram_bot_token and gemini_api_key),
NG_TELEGRAM_API_BASE (https://api.telegram.org/bot), NG_GEMINI_API_BASE
(https://generativelanguage.googleapis.com), NG_GEMINI_MODEL (gemini-2.0-flash),
NG_GEMINI_TIMEOUT (8 s), NG_HEARTBEAT_FILE (/tmp/nightguard/heartbeat),
NG_HEARTBEAT_INTERVAL (5 s), NG_POLL_TIMEOUT (10, whole seconds: the getUpdates long-poll
timeout, which the heartbeat reports as "poll_timeout").
"""

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "system"))
import httpx
from heartbeat import beat
from night_guard import DEFAULT_HEARTBEAT_FILE, DEFAULT_SECRETS_DIR, load_secrets
from telegram import Update
from telegram.error import Conflict, InvalidToken
from telegram.ext import Application, ContextTypes, MessageHandler, filters
from telegram.request import HTTPXRequest

TOKEN_SECRET = "telegram_bot_token"
GEMINI_SECRET = "gemini_api_key"
DEFAULT_TELEGRAM_API = "https://api.telegram.org/bot"
DEFAULT_GEMINI_API = "https://generativelanguage.googleapis.com"
DEFAULT_GEMINI_MODEL = "gemini-2.0-flash"
# Below podman's 10 s stop grace: an answer in progress at SIGTERM still goes out
# (as an apology at worst) before the container is killed.
DEFAULT_GEMINI_TIMEOUT = 8.0
DEFAULT_INTERVAL = 5.0
DEFAULT_POLL_TIMEOUT = 10  # python-telegram-bot's own default for run_polling
APOLOGY = "Sorry, I cannot answer right now. Please try again in a minute."
MAX_MESSAGE = 4096  # Telegram's limit for one message
EXIT_CONFIG = 2
# httpx logs every request URL at INFO, and a Bot API URL holds the token
# (/bot<TOKEN>/getUpdates): these loggers stay at WARNING.
QUIET_LOGGERS = ("httpx", "httpcore")
POLLING_TASK = "Updater:start_polling:polling_task"  # python-telegram-bot's name for it

log = logging.getLogger("night_guard")


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then blanks out every secret value, tracebacks included.

    python-telegram-bot logs a rejected token as InvalidToken("The token `<TOKEN>` was
    rejected by the server.") with its traceback, before the agent sees the exception.
    """

    secrets = ()

    def format(self, record):
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text


def setup_logging():
    formatter = RedactingFormatter(
        "%(asctime)s.%(msecs)03dZ %(name)s %(levelname)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    formatter.converter = time.gmtime
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return formatter


class Gemini:
    """``await generate(prompt) -> str`` through the Gemini REST API.

    Anything with the same method can stand in for it. The key travels in the
    x-goog-api-key header, never in a URL, so no URL that may be logged holds it.
    """

    def __init__(self, api_key, base_url, model, timeout):
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={"x-goog-api-key": api_key},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        )
        self._path = f"/v1beta/models/{model}:generateContent"

    async def generate(self, prompt):
        body = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
        response = await self._client.post(self._path, json=body)
        response.raise_for_status()
        parts = response.json()["candidates"][0]["content"]["parts"]
        text = "".join(part.get("text", "") for part in parts).strip()
        if not text:
            raise ValueError("empty answer")
        return text

    async def aclose(self):
        await self._client.aclose()


def describe(exc):
    """A short, secret-free description of a failed model call."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__


class Polling:
    """What the heartbeat says about polling: the last completed getUpdates, or that
    Telegram refused the token."""

    def __init__(self, timeout):
        self.timeout = timeout
        self.polled_at = None  # set when polling begins, then at each answered getUpdates
        self.token_rejected = False
        self.on_rejected = None  # called once, on the first 401

    def answered(self, status):
        self.polled_at = time.time()
        if status == 401:
            self.reject()

    def reject(self):
        if not self.token_rejected:
            self.token_rejected = True
            if self.on_rejected:
                self.on_rejected()

    def fields(self):
        if self.token_rejected:
            return {"token": "rejected"}
        if self.polled_at is None:
            return None  # not polling yet: a plain beat
        return {"polled_at": round(self.polled_at, 3), "poll_timeout": self.timeout}


class PollRequest(HTTPXRequest):
    """The getUpdates connection, telling ``polling`` whenever an answer came back.

    Any HTTP answer is progress (an error too: Telegram is listening); a request that
    times out or cannot connect is not, so a poll that never returns stops the clock.
    """

    def __init__(self, polling, **kwargs):
        super().__init__(**kwargs)
        self._polling = polling

    async def do_request(self, *args, **kwargs):
        status, payload = await super().do_request(*args, **kwargs)
        self._polling.answered(status)
        return status, payload


def safe_beat(path, polling=None):
    try:
        beat(path, fields=polling.fields() if polling else None)
    except OSError as exc:  # the health check will notice; the bot goes on
        log.warning("heartbeat write failed: %s", exc)


async def keep_beating(path, interval, polling):
    while True:
        safe_beat(path, polling)
        await asyncio.sleep(interval)


def build_app(token, api_base, model, heartbeat_file, interval, polling):
    async def answer(update: Update, context: ContextTypes.DEFAULT_TYPE):
        message = update.effective_message
        try:
            text = await model.generate(message.text)
        except Exception as exc:  # a failed model call costs one answer, never the bot
            log.warning("model call failed (%s), sending an apology", describe(exc))
            text = APOLOGY
        await message.reply_text(text[:MAX_MESSAGE], do_quote=True)
        log.info("answered message %s in chat %s", message.message_id, message.chat_id)

    async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE):
        if isinstance(context.error, Conflict):
            log.warning("409 Conflict: another process polls with this bot token")
        else:
            log.error("%s: %s", type(context.error).__name__, context.error)

    async def stop_polling():
        # python-telegram-bot's polling task ends by itself with InvalidToken; once it has,
        # stopping the updater here takes that exception (so run_polling's own shutdown runs
        # cleanly) and skips its last getUpdates, one more call with a refused token.
        for task in asyncio.all_tasks():
            if task.get_name() == POLLING_TASK:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await task
        with contextlib.suppress(InvalidToken, RuntimeError):
            await app.updater.stop()
        app.stop_running()

    def on_rejected():
        app.bot_data["stop_polling"] = asyncio.get_running_loop().create_task(stop_polling())

    async def post_init(app: Application):
        polling.polled_at = time.time()  # the clock starts with polling: a first poll can hang
        polling.on_rejected = on_rejected
        # A plain task on the main loop (not app.create_task: stop() would wait for it).
        app.bot_data["heartbeat"] = asyncio.create_task(
            keep_beating(heartbeat_file, interval, polling)
        )
        log.info("running, heartbeat every %gs to %s", interval, heartbeat_file)

    async def post_shutdown(app: Application):
        task = app.bot_data.get("heartbeat")
        if task:
            task.cancel()
        await model.aclose()

    app = (
        Application.builder()
        .token(token)
        .base_url(api_base)
        # Pool of one, as python-telegram-bot builds it for getUpdates.
        .get_updates_request(PollRequest(polling, connection_pool_size=1))
        .post_init(post_init)
        .post_shutdown(post_shutdown)
        .build()
    )
    app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, answer))
    app.add_error_handler(on_error)
    return app


def _stop_early(signum, frame):
    raise SystemExit(0)  # a stop before polling starts: nothing fetched, nothing to confirm


def stay_rejected(heartbeat_file, interval):
    """Keep beating with "token": "rejected" until SIGTERM/SIGINT; never call Telegram.

    Exiting instead would let the restart policy start the agent again every few
    seconds, each start one more call with a token Telegram refuses.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_early)  # the event loop that handled them is closed
    rejected = Polling(None)
    rejected.token_rejected = True
    try:
        while True:
            safe_beat(heartbeat_file, rejected)
            time.sleep(interval)
    except SystemExit:
        log.info("stopped")
        return 0


def main():
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_early)  # run_polling installs its own handlers later
    formatter = setup_logging()
    env = os.environ
    try:
        interval = float(env.get("NG_HEARTBEAT_INTERVAL") or DEFAULT_INTERVAL)
        timeout = float(env.get("NG_GEMINI_TIMEOUT") or DEFAULT_GEMINI_TIMEOUT)
        poll_timeout = int(env.get("NG_POLL_TIMEOUT") or DEFAULT_POLL_TIMEOUT)
        if not (0 < interval <= 3600 and 0 < timeout <= 600 and 0 <= poll_timeout <= 600):
            raise ValueError
    except ValueError:
        log.error(
            "NG_HEARTBEAT_INTERVAL, NG_GEMINI_TIMEOUT and NG_POLL_TIMEOUT must be positive seconds"
        )
        return EXIT_CONFIG
    log.info("starting (pid %d)", os.getpid())
    secrets_dir = env.get("NG_SECRETS_DIR") or DEFAULT_SECRETS_DIR
    try:
        secrets = load_secrets(secrets_dir, [TOKEN_SECRET, GEMINI_SECRET])
    except ValueError as exc:
        log.error("required secret problem: %s", exc)
        return EXIT_CONFIG
    formatter.secrets = tuple(secrets.values())
    model = Gemini(
        secrets[GEMINI_SECRET],
        env.get("NG_GEMINI_API_BASE") or DEFAULT_GEMINI_API,
        env.get("NG_GEMINI_MODEL") or DEFAULT_GEMINI_MODEL,
        timeout,
    )
    heartbeat_file = env.get("NG_HEARTBEAT_FILE") or DEFAULT_HEARTBEAT_FILE
    polling = Polling(poll_timeout)
    app = build_app(
        secrets[TOKEN_SECRET],
        env.get("NG_TELEGRAM_API_BASE") or DEFAULT_TELEGRAM_API,
        model,
        heartbeat_file,
        interval,
        polling,
    )
    try:
        # Never drop_pending_updates: messages sent while the bot was down must be answered.
        app.run_polling(allowed_updates=[Update.MESSAGE], timeout=poll_timeout)
    except InvalidToken:  # at start (getMe, deleteWebhook): the event loop is closed by now
        polling.token_rejected = True
    except Exception as exc:  # e.g. Telegram unreachable at start: the restart policy retries
        log.error("stopped: %s: %s", type(exc).__name__, exc)
        return 1
    if polling.token_rejected:
        log.error(
            "Telegram rejected the bot token (secret %s): not polling any more; "
            "deploy a valid token to start again",
            TOKEN_SECRET,
        )
        return stay_rejected(heartbeat_file, interval)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
