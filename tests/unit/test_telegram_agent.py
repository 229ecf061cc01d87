"""Run the Telegram example agent as a subprocess against the fake Bot API and Gemini."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip(
    "telegram",
    reason="python-telegram-bot is not installed (execution/examples/requirements.txt)",
    exc_type=ImportError,
)

from tests.fakes.telegram_api import GEMINI_PREFIX, FakeTelegram  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "execution" / "examples" / "telegram_night_guard.py"
HEALTH_CHECK = ROOT / "execution" / "system" / "health_check.py"
TOKEN = "987654:telegram-token-never-logged"
GEMINI = "gemini-key-never-logged"
APOLOGY = "Sorry, I cannot answer right now"


class Agent:
    def __init__(self, workdir, fake, secrets=None, argv=None, **extra_env):
        workdir.mkdir(parents=True)
        self.secrets_dir = workdir / "secrets"
        self.secrets_dir.mkdir()
        if secrets is None:
            secrets = {"telegram_bot_token": TOKEN, "gemini_api_key": GEMINI}
        for name, value in secrets.items():
            (self.secrets_dir / name).write_text(value + "\n")
        self.heartbeat = workdir / "heartbeat"
        self.log_path = workdir / "agent.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NG_")}
        env.update(
            NG_SECRETS_DIR=str(self.secrets_dir),
            NG_TELEGRAM_API_BASE=fake.base_url,
            NG_GEMINI_API_BASE=fake.gemini_base_url,
            NG_HEARTBEAT_FILE=str(self.heartbeat),
            NG_HEARTBEAT_INTERVAL="0.1",
        )
        env.update(extra_env)
        self._log = open(self.log_path, "wb")  # a file, not a pipe: never blocks the agent
        self.proc = subprocess.Popen(
            argv or [sys.executable, str(AGENT)],
            cwd=workdir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self):
        return self.log_path.read_text()

    def beat(self):
        """(mtime, fields) of the heartbeat ((None, {}) when there is none); fields is {}
        for a plain beat."""
        for _ in range(100):
            try:
                mtime = self.heartbeat.stat().st_mtime
                text = self.heartbeat.read_text()
            except FileNotFoundError:  # not written yet, or between stat and read: retry
                time.sleep(0.01)
                continue
            return mtime, json.loads(text) if text.startswith("{") else {}
        return None, {}

    def health(self, **env):
        """(exit code, report) of health_check.py run on this agent's heartbeat."""
        cgroup = self.heartbeat.parent / "no-cgroup"
        cgroup.mkdir(exist_ok=True)
        run_env = dict(
            os.environ,
            NG_APP_DIR=str(ROOT),
            NG_HEARTBEAT_FILE=str(self.heartbeat),
            NG_SECRETS_DIR=str(self.secrets_dir),
            NG_CGROUP_ROOT=str(cgroup),
            **env,
        )
        proc = subprocess.run(
            [sys.executable, str(HEALTH_CHECK)],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert proc.stdout.count("\n") == 1, proc.stdout + proc.stderr
        return proc.returncode, json.loads(proc.stdout), proc.stdout

    def wait_exit(self, timeout=10.0):
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def terminate(self, timeout=5.0):
        """SIGTERM; returns (exit code, seconds it took)."""
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.wait_exit(timeout)
        return code, time.monotonic() - began

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait_exit()


@pytest.fixture
def fake():
    server = FakeTelegram(TOKEN, gemini_key=GEMINI).start()
    yield server
    server.stop()


@pytest.fixture
def start(tmp_path, fake):
    agents = []

    def _start(**kwargs):
        agents.append(Agent(tmp_path / f"agent{len(agents)}", fake, **kwargs))
        return agents[-1]

    yield _start
    for agent in agents:
        agent.stop()


def getupdates_count(fake):
    return len([r for r in fake.requests if r.method == "getUpdates"])


def wait_polling(fake, agent, since=0):
    """Wait until a getUpdates newer than the first ``since`` ones is held open."""

    def polling():
        return getupdates_count(fake) > since and fake.open_polls()

    if not fake.wait_for(lambda: polling() or agent.proc.poll() is not None, 15) or not polling():
        pytest.fail(f"agent is not polling; rc={agent.proc.poll()}\n{agent.output()}")


def wait_replies(fake, n, agent, timeout=10):
    if not fake.wait_for(lambda: len(fake.replies()) >= n, timeout):
        pytest.fail(f"{len(fake.replies())} of {n} replies\n{agent.output()}")
    return fake.replies()


def test_answers_with_gemini(start, fake):
    agent = start()
    wait_polling(fake, agent)
    sent = fake.send_user_message("is the server up?")
    (reply,) = wait_replies(fake, 1, agent)
    assert reply.text == GEMINI_PREFIX + "is the server up?"
    assert reply.reply_to == sent["message"]["message_id"]
    assert reply.chat_id == sent["message"]["chat"]["id"]
    (call,) = fake.gemini_calls()
    assert call.status == 200 and call.model == "gemini-2.0-flash" and not call.key_in_url
    # Startup as documented: getMe, then deleteWebhook, never drop_pending_updates.
    methods = [r.method for r in fake.requests if r.api == "telegram"]
    assert methods[:3] == ["getMe", "deleteWebhook", "getUpdates"]
    delete = next(r for r in fake.requests if r.method == "deleteWebhook")
    assert delete.params.get("drop_pending_updates") in (None, "False", "false", False)
    code, took = agent.terminate()
    assert code == 0 and took < 5
    assert "Traceback" not in agent.output()


def test_gemini_failure_sends_an_apology(start, fake):
    agent = start()
    wait_polling(fake, agent)
    fake.fail_gemini(1)
    fake.send_user_message("first")
    fake.send_user_message("second")
    first, second = wait_replies(fake, 2, agent)
    assert first.text.startswith(APOLOGY)
    assert second.text == GEMINI_PREFIX + "second"
    assert [c.status for c in fake.gemini_calls()] == [503, 200]
    assert "model call failed (HTTP 503)" in agent.output()
    assert agent.proc.poll() is None


def test_restart_neither_repeats_nor_loses_messages(start, fake):
    first = start()
    wait_polling(fake, first)
    fake.send_user_message("before the restart")
    wait_replies(fake, 1, first)
    code, took = first.terminate()
    assert code == 0 and took < 5, first.output()
    assert "Traceback" not in first.output()
    # The stopping agent confirmed what it had fetched: nothing is pending any more.
    assert fake.pending_updates() == []
    stopped_at = time.monotonic()

    down = fake.send_user_message("while it was down")
    assert fake.pending_updates() == [down]
    polls_before = getupdates_count(fake)
    second = start()
    wait_polling(fake, second, since=polls_before)
    replies = wait_replies(fake, 2, second)
    # Updates are handled in order: a repeat of the first message would have come first.
    assert [r.text for r in replies] == [
        GEMINI_PREFIX + "before the restart",
        GEMINI_PREFIX + "while it was down",
    ]
    assert fake.unanswered() == [] and fake.answered_twice() == []
    assert fake.conflicts == 0

    # No overlap: the old poller's last getUpdates ended before the new one's first began.
    intervals = fake.getupdates_intervals()
    last_old = max(end for start_, end, _ in intervals if start_ < stopped_at)
    first_new = min(start_ for start_, _, _ in intervals if start_ > stopped_at)
    assert last_old < first_new
    assert second.terminate()[0] == 0


def test_sigterm_mid_answer_still_answers_once(start, fake):
    fake.gemini_delay = 0.5
    first = start()
    wait_polling(fake, first)
    fake.send_user_message("slow question")
    assert fake.wait_for(lambda: [r for r in fake.requests if r.api == "gemini"], 5)
    assert fake.replies() == []  # the answer is still being made
    code, _ = first.terminate()
    assert code == 0, first.output()
    assert len(fake.replies()) == 1
    assert fake.pending_updates() == []

    fake.gemini_delay = 0
    polls_before = getupdates_count(fake)
    second = start()
    wait_polling(fake, second, since=polls_before)
    later = fake.send_user_message("after")
    replies = wait_replies(fake, 2, second)
    assert replies[-1].reply_to == later["message"]["message_id"]
    assert fake.answered_twice() == [] and fake.unanswered() == []


def test_a_second_poller_makes_the_fake_count_a_conflict(start, fake):
    first = start()
    wait_polling(fake, first)
    assert fake.conflicts == 0
    second = start()
    if not fake.wait_for(lambda: fake.conflicts >= 1, 10):
        pytest.fail(f"no conflict\n{first.output()}\n{second.output()}")
    both = lambda: first.output() + second.output()  # noqa: E731
    assert fake.wait_for(lambda: "409 Conflict" in both(), 5), both()
    assert first.terminate()[0] == 0
    assert second.terminate()[0] == 0


def test_heartbeat_refreshed_while_running(start, fake):
    agent = start()
    wait_polling(fake, agent)
    assert agent.heartbeat.exists()
    seen = set()
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        seen.add(agent.beat()[0])
        time.sleep(0.05)
    assert len(seen) >= 3
    assert abs(max(seen) - time.time()) < 5


def test_secrets_never_logged(start, fake):
    agent = start()
    wait_polling(fake, agent)
    fake.send_user_message("hello")
    wait_replies(fake, 1, agent)
    assert agent.terminate()[0] == 0
    # Precondition: the token did travel in request URLs, the key in a header.
    assert [r for r in fake.requests if r.api == "telegram" and r.authorized]
    assert [c for c in fake.gemini_calls() if c.status == 200 and not c.key_in_url]
    out = agent.output()
    assert "answered message" in out
    assert TOKEN not in out and GEMINI not in out
    assert "HTTP Request:" not in out  # httpx's URL lines are not logged at all
    assert "[redacted]" not in out


def test_the_log_check_can_fail(start, fake):
    # The same agent with both guards off (httpx/httpcore loggers left at INFO, no
    # redaction): httpx's INFO lines show the Bot API URLs, token included. The Gemini key
    # travels in a header, so it is still absent.
    unguarded = (
        "import importlib.util, logging, sys\n"
        f"spec = importlib.util.spec_from_file_location('agent', {str(AGENT)!r})\n"
        "agent = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(agent)\n"
        "agent.QUIET_LOGGERS = ()\n"
        "agent.RedactingFormatter.format = logging.Formatter.format\n"
        "sys.exit(agent.main())\n"
    )
    agent = start(argv=[sys.executable, "-c", unguarded])
    wait_polling(fake, agent)
    fake.send_user_message("hello")
    wait_replies(fake, 1, agent)
    assert agent.terminate()[0] == 0
    out = agent.output()
    assert "HTTP Request:" in out
    assert TOKEN in out
    assert GEMINI not in out


@pytest.mark.parametrize("missing", ["telegram_bot_token", "gemini_api_key"])
def test_missing_secret_exits_2_naming_it(start, fake, missing):
    secrets = {"telegram_bot_token": TOKEN, "gemini_api_key": GEMINI}
    del secrets[missing]
    agent = start(secrets=secrets)
    assert agent.wait_exit() == 2
    out = agent.output()
    assert f"{missing} is missing" in out
    assert TOKEN not in out and GEMINI not in out
    assert fake.requests == []


def wait_beat(agent, predicate, timeout=15, what="a heartbeat"):
    """The first (mtime, fields) for which ``predicate(fields)`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and agent.proc.poll() is None:
        mtime, fields = agent.beat()
        if predicate(fields):
            return mtime, fields
        time.sleep(0.05)
    pytest.fail(f"no {what}; rc={agent.proc.poll()}, last {agent.beat()}\n{agent.output()}")


def test_heartbeat_reports_polling_progress(start, fake):
    agent = start(NG_POLL_TIMEOUT="1")
    wait_polling(fake, agent)
    _, first = wait_beat(agent, lambda f: "polled_at" in f, what="polled_at")
    assert first["poll_timeout"] == 1 and abs(first["polled_at"] - time.time()) < 5
    # Each empty 1 s long poll that comes back is progress.
    _, later = wait_beat(agent, lambda f: f.get("polled_at", 0) > first["polled_at"] + 1.5)
    code, report, _ = agent.health(NG_POLL_MARGIN="1")
    assert code == 0, report
    assert report["checks"]["polling"]["state"] == "polling"


def test_a_deaf_bot_fails_the_health_check_while_it_beats(start, fake):
    agent = start(NG_POLL_TIMEOUT="1")
    wait_polling(fake, agent)
    wait_beat(agent, lambda f: "polled_at" in f, what="polled_at")
    code, report, _ = agent.health(NG_POLL_MARGIN="1")
    assert code == 0 and report["checks"]["polling"]["state"] == "polling", report

    fake.set_deaf()
    assert fake.wait_for(lambda: fake.deaf_polls >= 1, 10), agent.output()
    held_at = time.monotonic()
    _, fields = agent.beat()
    stalled_at = fields["polled_at"]
    # Past poll_timeout + margin (2 s), and through one client-side read timeout (1 + 5 s)
    # and its retry, which is held too.
    beats = set()
    while time.monotonic() - held_at < 7:
        mtime, fields = agent.beat()
        beats.add(mtime)
        assert fields["polled_at"] == stalled_at
        time.sleep(0.1)
    assert len(beats) >= 10  # the loop still beats
    assert fake.deaf_polls >= 2 and agent.proc.poll() is None
    code, report, line = agent.health(NG_POLL_MARGIN="1")
    assert code == 1
    assert [name for name, c in report["checks"].items() if not c["ok"]] == ["polling"]
    assert report["checks"]["polling"]["state"] == "stalled"
    assert report["checks"]["polling"]["age_s"] > 2 and '"polling":{"ok":false' in line
    # The same heartbeat passes with a margin the stall is within.
    assert agent.health(NG_POLL_MARGIN="60")[0] == 0

    fake.set_deaf(False)  # answers again: polling makes progress, the check passes
    wait_beat(agent, lambda f: f["polled_at"] > stalled_at, what="progress after the stall")
    assert agent.health(NG_POLL_MARGIN="1")[0] == 0
    assert agent.terminate()[0] == 0


def token_calls(fake, since=0.0):
    """getUpdates and getMe calls open at ``since`` or made after it."""
    return [
        r
        for r in fake.calls("getUpdates", "getMe")
        if r.start >= since or r.end is None or r.end >= since
    ]


def test_a_revoked_token_stops_polling_and_is_reported(start, fake):
    agent = start(NG_POLL_TIMEOUT="1")
    wait_polling(fake, agent)
    wait_beat(agent, lambda f: "polled_at" in f, what="polled_at")
    revoked_at = time.monotonic()
    fake.set_revoked()
    wait_beat(agent, lambda f: f.get("token") == "rejected", what='"token": "rejected"')
    assert [r.status for r in token_calls(fake, revoked_at)][:1] == [401]
    # No retry loop: python-telegram-bot's backoff (1, 1.5, 2.25 s) or an exit and a
    # restart would make more calls in this window than the agent's last getUpdates.
    time.sleep(6)
    assert agent.proc.poll() is None, agent.output()
    calls = token_calls(fake, revoked_at)
    print("calls after the revocation:", [(r.method, r.status) for r in calls])
    assert 1 <= len(calls) <= 3, [(r.method, r.status) for r in calls]
    assert all(r.status == 401 for r in calls)
    mtime, fields = agent.beat()
    assert fields == {"token": "rejected"} and time.time() - mtime < 2

    code, report, _ = agent.health(NG_POLL_MARGIN="1")
    assert code == 0, report
    assert report["checks"]["polling"] == {"ok": True, "state": "token_rejected"}
    assert report["warnings"] == ["telegram rejected the bot token: the agent stopped polling"]
    code, took = agent.terminate()
    assert code == 0 and took < 5
    out = agent.output()
    assert "Telegram rejected the bot token (secret telegram_bot_token)" in out
    assert TOKEN not in out and GEMINI not in out


def test_a_rejected_token_at_start_is_reported_not_retried(start, fake):
    # python-telegram-bot logs InvalidToken("The token `<TOKEN>` was rejected ...") with a
    # traceback before run_polling raises: only the redacting formatter keeps it out.
    wrong = "987654:a-wrong-token-never-logged"
    agent = start(secrets={"telegram_bot_token": wrong, "gemini_api_key": GEMINI})
    wait_beat(agent, lambda f: f.get("token") == "rejected", what='"token": "rejected"')
    time.sleep(3)  # an exit or a retry would show by now
    assert agent.proc.poll() is None, agent.output()
    assert [(r.method, r.authorized) for r in fake.requests] == [("getMe", False)]
    code, report, _ = agent.health()
    assert code == 0 and report["checks"]["polling"]["state"] == "token_rejected", report
    assert agent.terminate()[0] == 0
    out = agent.output()
    assert "Telegram rejected the bot token (secret telegram_bot_token)" in out
    assert "The token `[redacted]` was rejected" in out  # what PTB tried to print
    assert wrong not in out and GEMINI not in out
