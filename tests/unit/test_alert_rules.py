"""The alert watcher's pure rules (tasks/hostside/watch_rules.py, run on the host): what one
watch pass makes of what it saw, table by table. Each table is a run of passes through
`transitions` with the state carried from pass to pass, as the watcher keeps it."""

from __future__ import annotations

import pytest

from tasks.config import load_settings
from tasks.deploy.plan import desired_watcher, watcher_action, watcher_config
from tasks.hostside.bundle import watcher_source
from tasks.hostside.verdict import agent_status
from tasks.hostside.watch_rules import (
    STARTING_GRACE,
    describe_exit,
    exits_in_journal,
    ping_due,
    rate_limit,
    transitions,
)

CONF = watcher_config(load_settings(environ={
    "NIGHTGUARD_ALERTS_ENABLED": "true", "NIGHTGUARD_ALERTS_CHAT_ID": "4242",
    "NIGHTGUARD_ALERTS_PING_URL": "http://127.0.0.1:9/ping/abc"}))


def test_the_rules_get_the_settings_the_laptop_writes():
    assert CONF["crash_loop"] == {"restarts": 3, "minutes": 10}
    assert (CONF["interval"], CONF["ping_every"]) == (600, 600)
    assert (CONF["swap_percent"], CONF["disk_free_mb"]) == (80, 1024)
    assert CONF["rate_limit"] == {"messages": 10, "minutes": 60}
    # the token's secret is named; no value of it is among the watcher's arguments
    assert CONF["secret"] == "telegram_bot_token"
    assert set(CONF) == {"chat_id", "api_base", "secret", "interval", "ping_url",
                         "ping_every", "crash_loop", "swap_percent", "disk_free_mb",
                         "rate_limit"}


def seen(status="healthy", n=0, exits=(), swap=10.0, disk=5000, detail="",
         token="accepted") -> dict:
    return {"status": status, "detail": detail or f"detail of {status}", "nrestarts": n,
            "exits": [list(e) for e in exits], "swap_pct": swap, "disk_free_mb": disk,
            "host": "vm1", "token": token}


CRASH = ("exited", "3", "NOTIMPLEMENTED")
KILL = ("exited", "137", "n/a")


def run(passes, conf=CONF, step=30.0):
    """[(observation, seconds since the start or None for the next step)] -> the kinds of
    message each pass sends, and the texts of all of them."""
    state, kinds, texts, clock = {}, [], [], 0.0
    for entry in passes:
        obs, at = entry if isinstance(entry, tuple) else (entry, None)
        clock = clock + step if at is None else at
        state, messages = transitions(state, obs, conf, clock)
        kinds.append([kind for kind, _ in messages])
        texts += [text for _, text in messages]
    return kinds, texts, state


TABLE = {
    "steady health is silence": (
        [seen(), seen(), seen()], [[], [], []]),
    "a crash: the restart, then the way back": (
        [seen(), seen("starting", 1, [CRASH]), seen("healthy", 1)],
        [[], ["restart"], ["recovered"]]),
    "a crash whose new container is already healthy: both, in order": (
        [seen(), seen("healthy", 1, [CRASH])], [[], ["restart", "recovered"]]),
    "a hang: unhealthy, killed by its check, healthy again": (
        [seen(), seen("unhealthy"), seen("unhealthy"), seen("starting", 1, [KILL]),
         seen("starting", 1), seen("healthy", 1)],
        [[], ["unhealthy"], [], ["restart"], [], ["recovered"]]),
    "a hang whose kill a pass sees between the kill and the restart": (
        [seen(), seen("unhealthy"), seen("starting"), seen("starting", 1, [KILL]),
         seen("healthy", 1)],
        [[], ["unhealthy"], [], ["restart"], ["recovered"]]),
    "down and back": (
        [seen(), seen("down"), seen("down"), seen("starting"), seen()],
        [[], ["down"], [], [], ["recovered"]]),
    "a deploy's restart resets systemd's counter: not a restart": (
        [seen(n=5), seen(n=0), seen(n=0), seen("starting", 1, [CRASH])],
        [[], [], [], ["restart"]]),
    "the first pass on a sick host says so": (
        [seen("unhealthy")], [["unhealthy"]]),
    "the first pass while starting says nothing": (
        [seen("starting")], [[]]),
    "starting past the grace period is down, once": (
        [seen("starting"), (seen("starting"), STARTING_GRACE - 1),
         (seen("starting"), STARTING_GRACE + 30), (seen("starting"), STARTING_GRACE + 60),
         (seen(), STARTING_GRACE + 90)],
        [[], [], ["down"], [], ["recovered"]]),
    "swap over the threshold and back below it with a margin": (
        [seen(swap=50), seen(swap=85), seen(swap=90), seen(swap=78), seen(swap=74)],
        [[], ["swap"], [], [], ["swap ok"]]),
    "disk under the floor and back above it with a margin": (
        [seen(disk=5000), seen(disk=900), seen(disk=1100), seen(disk=1200)],
        [[], ["disk"], [], ["disk ok"]]),
    "a refused token: once, the agent up all along; accepted again after a rotation": (
        [seen(), seen(token="rejected"), seen(token="rejected"), seen(token="rejected"),
         seen("starting", token=None), seen()],
        [[], ["token"], [], [], [], ["token ok"]]),
    "no heartbeat to read says nothing of the token": (
        [seen(token="rejected"), seen("down", token=None), seen("down", token=None)],
        [["token"], ["down"], []]),
    "no swap at all is no swap alert": (
        [seen(swap=None), seen(swap=None)], [[], []]),
}


@pytest.mark.parametrize("name", TABLE)
def test_transitions(name):
    passes, expected = TABLE[name]
    kinds, texts, _ = run(passes)
    assert kinds == expected, texts
    assert all(text.startswith("Night Guard on vm1: ") for text in texts)


def test_a_restart_says_why_it_exited():
    _, texts, _ = run([seen(), seen("starting", 1, [CRASH])])
    assert texts == ["Night Guard on vm1: RESTARTED: crashed: exited with status 3."]
    _, texts, _ = run([seen(), seen("unhealthy", detail="1 failed check(s) in a row: stale"),
                       seen("starting", 1, [KILL])])
    assert texts == ["Night Guard on vm1: UNHEALTHY: 1 failed check(s) in a row: stale.",
                     "Night Guard on vm1: RESTARTED: killed after failing its health check "
                     "(SIGKILL, exit 137)."]
    _, texts, _ = run([seen(), seen("unhealthy"), seen("starting"),
                       seen("starting", 1, [KILL])])  # a pass between the kill and restart
    assert texts[-1].endswith("killed after failing its health check (SIGKILL, exit 137).")
    _, texts, _ = run([seen(), seen("unhealthy"), seen(), seen("starting", 1, [KILL])])
    assert "killed by SIGKILL (exit 137: out of memory" in texts[-1]  # a check passed since
    _, texts, _ = run([seen(), seen("starting", 1, [KILL])])  # no failing check before
    assert "killed by SIGKILL (exit 137: out of memory, or a kill)" in texts[0]
    _, texts, _ = run([seen(), seen("starting", 1, [])])
    assert texts == ["Night Guard on vm1: RESTARTED: the exit reason is not in the journal."]


def test_a_refused_token_says_what_to_do():
    _, texts, state = run([seen(), seen(token="rejected")])
    assert texts == ["Night Guard on vm1: TOKEN REJECTED: Telegram refuses the bot's token "
                     "(revoked or replaced?). The agent stopped polling and stays up; a restart "
                     "cannot fix it: put the new token in its source and run "
                     "`inv secrets.rotate`."]
    assert state["token_rejected"] is True


def test_a_crash_loop_is_one_message_and_the_way_back_waits_for_its_end():
    passes = [seen(), seen("starting", 1, [CRASH]), seen("healthy", 1),
              seen("starting", 2, [CRASH]), seen("starting", 3, [CRASH]),
              seen("starting", 4, [CRASH]), seen("healthy", 4), seen("healthy", 4),
              (seen("healthy", 4), 700.0),  # 3 restarts (at 120, 150, 180 s) in 10 min
              (seen("healthy", 4), 800.0)]  # fewer than 3: the loop is over
    kinds, texts, state = run(passes)
    assert kinds == [[], ["restart"], ["recovered"], ["restart"], ["crash loop"], [], [], [],
                     [], ["recovered"]]
    assert texts[3] == ("Night Guard on vm1: CRASH LOOP: 3 restarts in the last 10 min, "
                        "systemd keeps restarting it (last: crashed: exited with status 3).")
    assert not state["crash_loop"]


def test_thresholds_of_zero_mean_no_host_alerts():
    conf = dict(CONF, swap_percent=0, disk_free_mb=0)
    kinds, _, _ = run([seen(swap=99, disk=1), seen(swap=100, disk=0)], conf)
    assert kinds == [[], []]


@pytest.mark.parametrize(("container", "unit", "expected"), [
    (None, {"ActiveState": "failed", "Result": "exit-code"}, "down"),
    (None, {"ActiveState": "inactive", "Result": "success"}, "down"),
    (None, {"ActiveState": "activating"}, "starting"),  # systemd restarting it
    ({"running": False}, {"ActiveState": "active"}, "starting"),
    ({"running": True, "health": "healthy", "failing_streak": 0}, {}, "healthy"),
    # Podman says healthy until the retries are used up: a failing check is news already
    ({"running": True, "health": "healthy", "failing_streak": 1}, {}, "unhealthy"),
    ({"running": True, "health": "unhealthy", "failing_streak": 3}, {}, "unhealthy"),
    ({"running": True, "health": "starting", "failing_streak": 0}, {}, "starting"),
    ({"running": True, "health": None}, {}, "starting"),
])
def test_agent_status(container, unit, expected):
    assert agent_status(container, unit)[0] == expected


def test_agent_status_says_what_the_check_said():
    container = {"running": True, "health": "healthy", "failing_streak": 2,
                 "health_log": [{"exit": 1, "output": '{"status": "unhealthy"} stale'}]}
    assert agent_status(container, {}) == \
        ("unhealthy", '2 failed check(s) in a row: {"status": "unhealthy"} stale')
    assert agent_status(None, {"ActiveState": "failed", "Result": "exit-code"})[1] == \
        "the unit is failed (result exit-code), no container runs"


@pytest.mark.parametrize(("exit_line", "unhealthy", "expected"), [
    (("exited", "3", "NOTIMPLEMENTED"), False, ("crash", "crashed: exited with status 3")),
    (("exited", "137", "n/a"), True,
     ("health kill", "killed after failing its health check (SIGKILL, exit 137)")),
    (("killed", "9", "KILL"), True,
     ("health kill", "killed after failing its health check (SIGKILL, exit 137)")),
    (("exited", "137", "n/a"), False,
     ("crash", "killed by SIGKILL (exit 137: out of memory, or a kill)")),
    (("killed", "15", "TERM"), False, ("crash", "killed by signal TERM")),
    (("dumped", "11", "SEGV"), False, ("crash", "crashed with a core dump (signal SEGV)")),
    (("watchdog", "30s", "KILL"), False,
     ("hang", "the container stopped answering (no liveness ping for 30s: frozen as a whole), "
              "killed by systemd's watchdog")),
    (("exited", "120", "n/a"), False, ("hang", "hung (its heartbeat stopped), killed by its "
                                               "supervisor")),
    (("exited", "121", "n/a"), False,
     ("deaf", "deaf (its loop ran but its polling made no progress), killed by its supervisor")),
])
def test_describe_exit(exit_line, unhealthy, expected):
    assert describe_exit(*exit_line, was_unhealthy=unhealthy) == expected


def test_exits_in_journal_tell_a_watchdogs_kill_from_a_crash():
    # systemd 252's own lines about the unit (journalctl -o cat), two restarts
    journal = "\n".join([
        "container-ng.service: Main process exited, code=exited, status=3/NOTIMPLEMENTED",
        "container-ng.service: Failed with result 'exit-code'.",
        "container-ng.service: Scheduled restart job, restart counter is at 1.",
        "container-ng.service: Watchdog timeout (limit 10s)!",
        "container-ng.service: Killing process 4242 (conmon) with signal SIGKILL.",
        "container-ng.service: Main process exited, code=killed, status=9/KILL",
        "container-ng.service: Failed with result 'watchdog'.",
    ])
    assert exits_in_journal(journal) == [["exited", "3", "NOTIMPLEMENTED"],
                                         ["watchdog", "10s", "KILL"]]
    assert exits_in_journal("") == []


# -- the rate limit ------------------------------------------------------------------------
LIMIT = dict(CONF, rate_limit={"messages": 2, "minutes": 60})


def msgs(*kinds):
    return [[kind, f"text of {kind}"] for kind in kinds]


def test_over_the_limit_is_held_back_and_counted_then_told():
    state, go = rate_limit({}, msgs("a", "b", "c"), LIMIT, 0.0, "healthy")
    assert [kind for kind, _ in go] == ["a", "b"] and state["held"] == 1
    state["sent"] += [0.0, 0.0]  # both delivered
    state, go = rate_limit(state, msgs("d"), LIMIT, 60.0, "healthy")
    assert go == [] and state["held"] == 2  # no room within the hour
    state, go = rate_limit(state, msgs("e"), LIMIT, 3601.0, "unhealthy")
    assert go == [["e", "text of e (2 alert(s) before this one were held back by the rate "
                        "limit)"]]
    assert state["held"] == 0 and state["sent"] == []


def test_held_back_alerts_are_summed_up_once_there_is_room_and_nothing_new():
    state = {"sent": [0.0, 10.0], "held": 3}
    state, go = rate_limit(state, [], LIMIT, 100.0, "healthy")
    assert go == [] and state["held"] == 3
    state, go = rate_limit(state, [], LIMIT, 3700.0, "healthy")
    assert go == [["held", "3 alert(s) were held back by the rate limit; now: healthy."]]
    assert state["held"] == 0


def test_nothing_to_say_and_nothing_held_sends_nothing():
    assert rate_limit({}, [], LIMIT, 0.0, "healthy") == ({"sent": [], "held": 0}, [])


# -- the dead-man switch -------------------------------------------------------------------
def pinged(kind, at, ok=True):
    return {"last_ping": {"kind": kind, "t": at, "ok": ok}}


@pytest.mark.parametrize(("state", "status", "now", "expected"), [
    ({}, "healthy", 0, "ok"),
    (pinged("ok", 0), "healthy", 599, None),
    (pinged("ok", 0), "healthy", 600, "ok"),
    (pinged("ok", 0), "unhealthy", 10, "fail"),  # at once on the change
    (pinged("fail", 10), "down", 100, None),
    (pinged("fail", 10), "down", 610, "fail"),
    (pinged("fail", 10), "healthy", 40, "ok"),
    (pinged("ok", 0), "starting", 400, None),  # neither: a restart's start period
    (pinged("ok", 0, ok=False), "healthy", 30, "ok"),  # not delivered: again
    ({"crash_loop": True}, "healthy", 0, "fail"),
    ({"stuck": True}, "starting", 0, "fail"),
    ({"token_rejected": True}, "healthy", 0, "fail"),  # up, but of no use
])
def test_ping_due(state, status, now, expected):
    assert ping_due(state, status, CONF, now) == expected


def test_no_ping_url_no_ping():
    assert ping_due({}, "healthy", dict(CONF, ping_url=""), 0) is None
    assert ping_due({}, "down", dict(CONF, ping_url=""), 0) is None


# -- install, update, remove: the deploy's rule ------------------------------------------------
def test_the_watcher_is_installed_updated_or_removed_where_it_differs():
    enabled = load_settings(environ={"NIGHTGUARD_ALERTS_ENABLED": "1",
                                     "NIGHTGUARD_ALERTS_CHAT_ID": "4242"})
    wanted = desired_watcher(enabled)
    assert wanted["version"] == watcher_source()[1]  # the watcher's own, not the helper's
    assert "OnUnitActiveSec=600s" in wanted["timer"] and "Type=oneshot" in wanted["service"]
    assert "ExecStartPost=-/usr/bin/systemctl start --no-block nightguard-watch.service" in \
        wanted["dropin"].splitlines() and "OnFailure=nightguard-watch.service" in wanted["dropin"]
    assert desired_watcher(load_settings(environ={})) is None
    installed = {"present": True, "version": wanted["version"], "config": wanted["config"],
                 "service": wanted["service"].strip(), "timer": wanted["timer"].strip(),
                 "dropin": wanted["dropin"].strip(), "enabled": True}
    assert watcher_action(wanted, {"watcher": installed}) is None
    assert watcher_action(wanted, {}) == "install"
    assert watcher_action(wanted, {"watcher": {"present": False}}) == "install"
    for change in ({"version": "fedcba9876543210"}, {"enabled": False},
                   {"config": dict(wanted["config"], chat_id="1")},
                   {"timer": "[Timer]\nOnUnitActiveSec=60s"}, {"dropin": None}):
        assert watcher_action(wanted, {"watcher": dict(installed, **change)}) == "update"
    assert watcher_action(None, {"watcher": installed}) == "remove"
    assert watcher_action(None, {"watcher": {"present": False}}) is None
    assert watcher_action(None, {}) is None
    # a run cut between writing (or removing) the watcher's units and systemd's reload
    owed = {"systemd_reload_owed": ["watcher"]}
    assert watcher_action(wanted, {"watcher": installed, **owed}) == "update"
    assert watcher_action(None, {"watcher": {"present": False}, **owed}) == "remove"
    assert watcher_action(wanted, {"watcher": installed, "systemd_reload_owed": ["unit"]}) \
        is None
