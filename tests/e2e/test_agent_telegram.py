"""A real agent, end to end: the example Telegram Night Guard with its dependencies, on the
shared Debian 12 sandbox, talking to a fake Telegram Bot API (and a fake Gemini) that runs
on this machine and that the agent reaches through the guest's network.

Its image installs python-telegram-bot from the package index inside the sandbox (as
`python:3.x-slim` would on a real VM). A message sent to the fake is answered; through a
cold deploy, a code change, a rollback and a secret rotation the fake never sees two
pollers at once (no 409), no update is lost or answered twice, and the polling gap of each
restart is measured.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.e2e.deploy_helpers import (
    CONTAINER,
    audit,
    back_healthy,
    checked,
    copy_source,
    figure,
    healthy_now,
    inv,
    inv_env,
    make_env_file,
    markers,
    output,
    started_at,
    wait_until,
)
from tests.fakes.telegram_api import FakeTelegram

BOT_TOKEN = "424242:e2e-fake-bot-token-Xy7"
GEMINI_KEY = "gem-e2e-real-agent-91f2"
NEW_GEMINI_KEY = "gem-e2e-rotated-5d0c"
AGENT = "python3 /app/execution/examples/telegram_night_guard.py"


def laptop_address() -> str:
    """This machine's address on its network: the guest's QEMU NAT reaches it, and so does
    the agent's container behind its own user-mode network (127.0.0.1 would be its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("192.0.2.123", 9))  # no packet is sent: this only picks a route
        address = sock.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback address the sandbox could reach")
    return address


@pytest.fixture(scope="module")
def telegram():
    fake = FakeTelegram(BOT_TOKEN, host="0.0.0.0", gemini_key=GEMINI_KEY).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def env(sandbox_bookworm, telegram, tmp_path_factory):
    base = tmp_path_factory.mktemp("telegram")
    source = copy_source(base / "src")
    requirements = (source / "execution/examples/requirements.txt").read_text()
    with open(source / "deployment/requirements-agent.txt", "a") as handle:
        handle.write(requirements)
    address = laptop_address()
    agent_env = {"NG_TELEGRAM_API_BASE": telegram.url_for(address),
                 "NG_GEMINI_API_BASE": telegram.gemini_url_for(address)}
    return inv_env(sandbox_bookworm, make_env_file(base, BOT_TOKEN, GEMINI_KEY), source,
                   NIGHTGUARD_AGENT_COMMAND=AGENT,
                   NIGHTGUARD_AGENT_ENV=json.dumps(agent_env))


def ask(telegram, text: str, timeout: float = 90) -> dict:
    update = telegram.send_user_message(text)
    assert telegram.wait_for(lambda: not telegram.unanswered(), timeout), \
        f"no answer to {text!r} within {timeout}s"
    return update


def polling_gap(telegram, since: float) -> float:
    """The longest time after `since` during which nobody polled (a restart's outage)."""
    rows = [r for r in telegram.getupdates_intervals() if r[1] >= since]
    gaps = [later[0] - earlier[1] for earlier, later in zip(rows, rows[1:], strict=False)]
    return max(gaps, default=0.0)


def test_the_agent_with_its_dependencies_deploys_and_answers(sandbox_bookworm, env, telegram,
                                                            ssh_run):
    done = inv(["deploy"], env, timeout=2400)
    assert done.returncode == 0, output(done)
    assert "plan: image: build" in done.stdout
    version = checked(ssh_run, sandbox_bookworm, f"sudo -n podman exec {CONTAINER} "
                      "python3 -c 'import telegram; print(telegram.__version__)'").strip()
    assert version.startswith("22.")  # installed from the index inside the sandbox
    assert healthy_now(ssh_run, sandbox_bookworm)
    ask(telegram, "hello night guard")
    [reply] = telegram.replies()
    assert "gemini says" in reply.text
    assert telegram.conflicts == 0
    for value in (BOT_TOKEN, GEMINI_KEY):
        assert value not in output(done)
        assert value not in inv(["logs", "--tail", "200"], env).stdout


def through(step, telegram, env, ssh_run, target, *args) -> float:
    """Run one task while a user keeps writing; returns the polling gap it caused."""
    started = time.time()
    before = len(telegram.injected)
    telegram.send_user_message(f"before {step}")
    done = inv(args or [step], env)
    assert done.returncode == 0, output(done)
    telegram.send_user_message(f"after {step}")
    assert telegram.wait_for(lambda: not telegram.unanswered(), 120), telegram.unanswered()
    assert len(telegram.injected) == before + 2
    assert telegram.answered_twice() == []
    assert telegram.conflicts == 0, f"two pollers overlapped during {step}"
    assert healthy_now(ssh_run, target)
    gap = polling_gap(telegram, started)
    figure(f"telegram polling gap, {step}", gap)
    return gap


def test_no_overlap_no_loss_through_change_rollback_and_rotation(sandbox_bookworm, env,
                                                                 telegram, ssh_run):
    target = sandbox_bookworm
    gaps = {}
    with open(env["NIGHTGUARD_SOURCE_DIR"] + "/knowledge/README.md", "a") as handle:
        handle.write(f"code change {time.time()}\n")
    gaps["code change"] = through("deploy", telegram, env, ssh_run, target)
    gaps["rollback"] = through("rollback", telegram, env, ssh_run, target)
    gaps["deploy again"] = through("deploy", telegram, env, ssh_run, target)
    text = open(env["NIGHTGUARD_ENV_FILE"]).read().replace(GEMINI_KEY, NEW_GEMINI_KEY)
    with open(env["NIGHTGUARD_ENV_FILE"], "w") as handle:
        handle.write(text)
    telegram.gemini_key = NEW_GEMINI_KEY  # the old key stops working, as after a revoke
    gaps["rotation"] = through("secrets.rotate", telegram, env, ssh_run, target,
                               "secrets.rotate", "--name", "gemini_api_key")
    assert telegram.replies()[-1].text.startswith("gemini says")  # the new key works
    assert audit(ssh_run, target)[-1]["command"] == "secrets.rotate"
    assert markers(ssh_run, target)
    assert telegram.unanswered() == [] and telegram.answered_twice() == []
    assert telegram.conflicts == 0
    print("polling gaps: " + ", ".join(f"{k} {v:.1f} s" for k, v in gaps.items()))
    assert max(gaps.values()) < 120


def polling_agent(env, telegram, ssh_run, target) -> None:
    """The example agent runs and polls the fake; deployed here when no earlier test of this
    module did (e.g. when only the drills below are selected)."""
    if not telegram.wait_for(lambda: telegram.open_polls(), 20):
        done = inv(["deploy"], env, timeout=2400)
        assert done.returncode == 0, output(done)
    assert telegram.wait_for(lambda: telegram.open_polls(), 60), "the agent does not poll"
    assert healthy_now(ssh_run, target)


def test_deaf_bot_is_restarted_by_the_watchdog(sandbox_bookworm, env, telegram, ssh_run):
    """getUpdates held with the connection open: the loop still beats, polled_at stops;
    after poll_timeout 10 s + margin 30 s ng-supervise kills the agent (the container exits
    121) and systemd restarts it - within 2 minutes. The fake listens again once the new
    container runs, as a fresh connection would get answers."""
    target = sandbox_bookworm
    polling_agent(env, telegram, ssh_run, target)
    before = started_at(ssh_run, target)
    telegram.set_deaf()
    since = time.monotonic()
    try:
        def restarted():
            now = started_at(ssh_run, target)
            return now and now != before

        assert wait_until(restarted, 300, 3), "a deaf agent was not restarted within 300 s"
        seconds = time.monotonic() - since
        figure(f"{target['name']}: deaf -> restarted", seconds)
    finally:
        telegram.set_deaf(False)
    assert seconds <= 120, f"a deaf agent restarted after {seconds:.0f} s, not within 2 min"
    assert telegram.deaf_polls >= 1
    journal = checked(ssh_run, target, f"sudo -n journalctl -u container-{CONTAINER}.service "
                                       f"-o cat --no-pager --since '-{int(seconds) + 60}s'")
    assert "ng-supervise: polling made no progress for" in journal, journal[-2000:]
    assert "the agent is deaf, killing it (the container exits 121" in journal
    assert "Main process exited, code=exited, status=121/n/a" in journal
    seconds = back_healthy(ssh_run, target, before, since, 420)
    assert seconds is not None, "not healthy again after the restart"
    figure(f"{target['name']}: deaf -> healthy", seconds)
    ask(telegram, "are you listening again?")


def test_revoked_token_is_reported_not_restarted(sandbox_bookworm, env, telegram, ssh_run):
    """401 to every call: the agent stops polling and stays up; no restart within 90 s -
    twice the time a stalled poller has before ng-supervise kills it (poll_timeout 10 s
    + margin 30 s) - at most a few calls with the refused token, and
    health_check's JSON (the full check, which Podman runs every 10 min) says token_rejected."""
    target = sandbox_bookworm
    polling_agent(env, telegram, ssh_run, target)
    before = started_at(ssh_run, target)
    telegram.set_revoked()
    revoked_at = time.monotonic()
    try:
        time.sleep(90)
        calls = [r for r in telegram.calls("getUpdates", "getMe")
                 if r.start >= revoked_at or r.end is None or r.end >= revoked_at]
        assert 1 <= len(calls) <= 3, [(r.method, r.status) for r in calls]
        assert started_at(ssh_run, target) == before, "the container was restarted"
        done = ssh_run(target, f"sudo -n podman exec {CONTAINER} "
                               "python3 /app/execution/system/health_check.py")
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["checks"]["polling"]["state"] == "token_rejected", report
        assert healthy_now(ssh_run, target)
        figure(f"{target['name']}: calls in 90 s with a revoked token", len(calls), "calls")
    finally:
        telegram.set_revoked(False)
    # A new container (as a deploy with a new token would start) polls again.
    checked(ssh_run, target, f"sudo -n podman kill {CONTAINER}")
    assert back_healthy(ssh_run, target, before, time.monotonic(), 300) is not None
    ask(telegram, "back with a valid token?")
