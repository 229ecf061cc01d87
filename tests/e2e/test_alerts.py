"""Alerts end to end on the shared Debian 12 sandbox (Podman 4.3, systemd 252): the deploy
installs the watcher (its timer set to a pass every 10 s), which talks to a fake Telegram
Bot API and a fake ping endpoint on this machine, reached from the guest through QEMU's
network at this machine's address. A crash, a hang (the reference agent's control files)
and the way back each produce exactly the messages expected; the bot's token shows in no
process list, journal or file outside Podman's storage; the cost of one pass is measured.
"""

from __future__ import annotations

import base64
import json
import shlex
import threading
import time
from pathlib import Path

import pytest

from bench.watcher_bench import measure, report
from tests.e2e.deploy_helpers import (
    CONTAINER,
    GEMINI,
    STATE,
    checked,
    copy_source,
    fault_then_back,
    health_status,
    inv,
    inv_env,
    make_env_file,
    output,
    wait_until,
)
from tests.e2e.test_agent_telegram import laptop_address
from tests.fakes.ping import FakePing
from tests.fakes.telegram_api import FakeTelegram

BOT_TOKEN = "424243:e2e-alerts-bot-token-Wq8"
CHAT = "4242"
WATCH_UNIT = "nightguard-watch"
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


@pytest.fixture(scope="module")
def telegram():
    fake = FakeTelegram(BOT_TOKEN, host="0.0.0.0", gemini_key=GEMINI).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def ping():
    fake = FakePing(host="0.0.0.0").start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def env(sandbox_bookworm, telegram, ping, tmp_path_factory):
    base = tmp_path_factory.mktemp("alerts")
    source = copy_source(base / "src")
    address = laptop_address()
    return inv_env(sandbox_bookworm, make_env_file(base, BOT_TOKEN, GEMINI), source,
                   NIGHTGUARD_ALERTS_ENABLED="true", NIGHTGUARD_ALERTS_CHAT_ID=CHAT,
                   NIGHTGUARD_ALERTS_API_BASE=f"http://{address}:{telegram.port}",
                   NIGHTGUARD_ALERTS_PING_URL=ping.url_for(address),
                   NIGHTGUARD_ALERTS_INTERVAL="10s", NIGHTGUARD_ALERTS_PING_EVERY="30s")


def texts(telegram, since: int = 0) -> list[str]:
    return [r.text for r in telegram.replies()[since:]]


def wait_for_messages(telegram, since: int, count: int, timeout: float) -> list[str]:
    """The messages after `since` once there are `count`, and after two more passes (to
    see that no other one follows)."""
    assert telegram.wait_for(lambda: len(telegram.replies()) >= since + count, timeout), \
        f"expected {count} message(s) within {timeout:.0f}s, got {texts(telegram, since)}"
    time.sleep(25)
    return texts(telegram, since)


# Every process's command line (what `ps -eo args` shows: its argv, or [name] for one with
# none), read from /proc by one process: a `ps` every 0.2 s cost the lab VM a quarter of a
# CPU-second each under emulation, taken from the recovery the samples watch.
SAMPLE_ARGS = r"""
import os, sys, time
for _ in range(int(sys.argv[1])):
    lines = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().rstrip(b"\0").replace(b"\0", b" ")
            if not argv:
                with open(f"/proc/{pid}/comm", "rb") as handle:
                    argv = b"[" + handle.read().strip() + b"]"
        except OSError:
            continue  # it ended while read
        lines.append(argv.decode(errors="replace"))
    sys.stdout.write("\n".join(lines) + "\n---\n")
    sys.stdout.flush()
    time.sleep(0.2)
"""


class ProcessSampler:
    """Every process's command line on the guest every 0.2 s for `seconds`, in one SSH
    command (one Python process reading /proc)."""

    def __init__(self, ssh_run, target, seconds: int):
        loops = int(seconds / 0.2)
        command = f"python3 -I -S -c {shlex.quote(SAMPLE_ARGS)} {loops}"
        self.result = None
        self.thread = threading.Thread(target=lambda: setattr(
            self, "result", ssh_run(target, command, timeout=seconds * 4 + 120)), daemon=True)
        self.thread.start()

    def samples(self) -> list[str]:
        self.thread.join()
        assert self.result is not None and self.result.returncode == 0, self.result
        return self.result.stdout.split("---\n")


def test_the_deploy_installs_the_watcher_and_its_first_passes_are_quiet(
        sandbox_bookworm, env, telegram, ping, ssh_run):
    done = inv(["deploy"], env)
    assert done.returncode == 0, output(done)
    assert "plan: alerts: install the watcher" in done.stdout
    assert ping.wait_for(lambda: "ok" in ping.kinds(), 120), "no ping from the watcher"
    assert telegram.replies() == []  # healthy from the first pass on: nothing to say
    assert checked(ssh_run, sandbox_bookworm,
                   f"systemctl is-active {WATCH_UNIT}.timer").strip() == "active"
    modes = checked(ssh_run, sandbox_bookworm, f"sudo -n stat -c '%a %U' {STATE}/alerts.json "
                    f"{STATE}/watcher.py {STATE}/alerts-state.json").split("\n")
    assert modes[:3] == ["600 root"] * 3
    again = inv(["deploy"], env)
    assert again.returncode == 0 and "no changes" in again.stdout, output(again)


def test_alerts_test_arrives(env, telegram):
    before = len(telegram.replies())
    done = inv(["alerts.test"], env)
    assert done.returncode == 0, output(done)
    [reply] = telegram.replies()[before:]
    assert f"alerts.test: arrived in chat {CHAT} via {env['NIGHTGUARD_ALERTS_API_BASE']} " \
           f"(message {reply.message_id})" in done.stdout
    assert "a test message (`inv alerts.test`" in reply.text


def test_a_crash_is_one_restart_message_then_healthy_again(sandbox_bookworm, env, telegram,
                                                           ping, ssh_run):
    assert wait_until(lambda: health_status(ssh_run, sandbox_bookworm) == "healthy", 120, 2)
    before, pings = len(telegram.replies()), len(ping.pings)
    sampler = ProcessSampler(ssh_run, sandbox_bookworm, 60)
    fault_then_back(ssh_run, sandbox_bookworm, "crash", 60)  # tests/e2e/test_recovery.py
    new = wait_for_messages(telegram, before, 2, timeout=240)
    print("crash:", *new, sep="\n  ")
    assert len(new) == 2, new
    assert new[0].endswith(": RESTARTED: crashed: exited with status 3."), new
    assert ": healthy again (the trouble lasted " in new[1], new
    assert "fail" not in ping.kinds()[pings:]  # never unhealthy: no failure ping
    samples = sampler.samples()
    assert len(samples) > 100 and any("import watcher" in s for s in samples)  # saw a pass
    assert not any(BOT_TOKEN in s for s in samples)


def test_a_hang_is_killed_by_the_watchdog_then_healthy(sandbox_bookworm, env, telegram, ping,
                                                       ssh_run):
    """The main loop blocks: the heartbeat goes stale, ng-supervise (the container's PID 1)
    kills the agent at that moment and the container exits 120; systemd restarts it -
    before the full health check (every 10 min) has even run. One restart message that says
    so, then healthy again."""
    assert wait_until(lambda: health_status(ssh_run, sandbox_bookworm) == "healthy", 120, 2)
    before, pings = len(telegram.replies()), len(ping.pings)
    seconds = fault_then_back(ssh_run, sandbox_bookworm, "hang", 120)
    new = wait_for_messages(telegram, before, 2, timeout=240)
    print("hang:", *new, sep="\n  ")
    assert len(new) == 2, new
    assert new[0].endswith(": RESTARTED: hung (its heartbeat stopped), killed by its "
                           "supervisor."), new
    assert ": healthy again (the trouble lasted " in new[1], new
    journal = checked(ssh_run, sandbox_bookworm,
                      f"sudo -n journalctl -u container-{CONTAINER}.service -o cat --no-pager "
                      f"--since '-{int(seconds) + 120}s'")
    assert "the agent is hung, killing it (the container exits 120" in journal, journal[-2000:]
    assert "Main process exited, code=exited, status=120/n/a" in journal
    assert "Watchdog timeout" not in journal  # the backstop had nothing to do
    assert "fail" not in ping.kinds()[pings:]  # never unhealthy by the full check


def test_health_shows_the_last_alert_and_the_last_ping(env):
    done = inv(["health"], env)
    assert done.returncode == 0, output(done)
    line = next(li for li in done.stdout.splitlines() if li.startswith("  alerts"))
    assert "last alert 20" in line and "(recovered)" in line and "last ping 20" in line, line
    assert "  base image  localhost/nightguard-base:latest " in done.stdout


# The token must not reach the guest in a command of ours either: sudo logs the command line
# it runs (its message, and the _CMDLINE of its entries), so a `sudo grep TOKEN` would put it
# in the journal this test searches. It travels base64-encoded and is decoded into a pipe.
TOKEN_ON_STDOUT = f"printf %s {base64.b64encode(BOT_TOKEN.encode()).decode()} | base64 -d"


def search(ssh_run, target, folders: str, *options: str) -> list[str]:
    """Files under `folders` that hold the token (grep as root, the token on its stdin). A
    file that vanished while grep walked (a temp file, a rotated journal) is no failure of
    the search; any other error is."""
    done = ssh_run(target, f"{TOKEN_ON_STDOUT} | sudo -n grep -rlF -D skip {' '.join(options)}"
                           f" -f - {folders}", timeout=900)
    errors = [line for line in done.stderr.splitlines()
              if not line.endswith("No such file or directory")]
    assert done.returncode in (0, 1, 2) and not errors, (done.returncode, done.stderr[-500:])
    return done.stdout.split()


def test_the_token_is_in_no_process_journal_or_file_outside_podmans_storage(
        sandbox_bookworm, ssh_run):
    passes = checked(ssh_run, sandbox_bookworm,
                     f"sudo -n journalctl -u {WATCH_UNIT}.service -o cat --no-pager")
    assert "; sent restart" in passes and "; sent recovered" in passes  # the passes logged
    # every field of every entry (_CMDLINE: the argv of whatever logged)
    journal = ssh_run(sandbox_bookworm, f"token=$({TOKEN_ON_STDOUT}); sudo -n journalctl "
                      '--no-pager -o verbose | grep -cF -- "$token"', timeout=600)
    assert journal.returncode == 1 and journal.stdout.strip() == "0", journal
    # the search can find it: the copy Podman mounts into the container holds it
    found = search(ssh_run, sandbox_bookworm, "/var/lib/containers/storage/overlay-containers")
    assert any(f.endswith("/userdata/secrets/telegram_bot_token") for f in found), found
    # everywhere but Podman's storage (its secret store, the copies it mounts), /proc, /sys
    # (/run/netns holds network namespace handles, which cannot be read as files)
    assert search(ssh_run, sandbox_bookworm, "/etc /home /root /tmp /var /run /usr/local",
                  "--exclude-dir=containers", "--exclude-dir=netns") == []
    units = checked(ssh_run, sandbox_bookworm,
                    f"systemctl cat {WATCH_UNIT}.service {WATCH_UNIT}.timer "
                    f"container-{CONTAINER}.service")
    assert "ExecStart=/usr/bin/python3 -I -S" in units and BOT_TOKEN not in units
    assert f"ExecStartPost=-/usr/bin/systemctl start --no-block {WATCH_UNIT}.service" in units


def test_the_cost_of_one_pass(sandbox_bookworm, ssh_run):
    found = measure(ssh_run, sandbox_bookworm, runs=10)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "watcher.json").write_text(json.dumps(found, indent=2))
    print(report(found, 30.0))
    assert found["watcher"]["cpu_ms"] > found["floor"]["cpu_ms"] > 0
    assert found["watcher"]["rss_mb"] < 64


def test_alerts_off_remove_the_watcher(sandbox_bookworm, env, ssh_run):
    done = inv(["deploy"], dict(env, NIGHTGUARD_ALERTS_ENABLED="false"))
    assert done.returncode == 0, output(done)
    assert "plan: alerts: remove the watcher (alerts are off)" in done.stdout
    left = checked(ssh_run, sandbox_bookworm,
                   f"sudo -n ls {STATE} /etc/systemd/system; systemctl is-active "
                   f"{WATCH_UNIT}.timer || true")
    assert "watcher.py" not in left and "alerts.json" not in left
    assert f"{WATCH_UNIT}.timer" not in left and left.strip().endswith("inactive")
