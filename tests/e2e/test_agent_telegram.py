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
    checked,
    copy_source,
    figure,
    healthy_now,
    inv,
    inv_env,
    make_env_file,
    markers,
    output,
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
