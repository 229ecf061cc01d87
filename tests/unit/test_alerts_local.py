"""The alert watcher on the fake host (tests/unit/hostfake): installed, updated and removed
by run_deploy in its one session, then run as its service runs it (`python3 -I -S
watcher.py alerts.json`) against a fake Telegram Bot API and a fake ping endpoint on this
machine. A crash, a hang and the way back produce exactly the messages expected; the bot's
token is used for sendMessage and is nowhere else."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest
from invoke import Context
from invoke.exceptions import Exit

from tasks.deploy import alerts as alerts_tasks
from tasks.deploy.health import render, summarize
from tasks.errors import StepFailed
from tasks.hostside.bundle import watcher_program
from tests.fakes.ping import FakePing
from tests.fakes.telegram_api import FakeTelegram
from tests.unit.hostfake import UNIT
from tests.unit.hostfake.deployer import TOKEN, Deployer

CHAT = "4242"
HOST = socket.gethostname()
CRASH_LINE = f"{UNIT}: Main process exited, code=exited, status=3/NOTIMPLEMENTED"
KILL_LINE = f"{UNIT}: Main process exited, code=exited, status=137/n/a"


@pytest.fixture
def telegram():
    fake = FakeTelegram(TOKEN).start()
    yield fake
    fake.stop()


@pytest.fixture
def ping():
    fake = FakePing().start()
    yield fake
    fake.stop()


def alert_settings(deploy, telegram, ping=None, **extra):
    return deploy.settings(**{"alerts.enabled": True, "alerts.chat_id": CHAT,
                              "alerts.api_base": f"http://127.0.0.1:{telegram.port}",
                              "alerts.ping_url": ping.url if ping else "", **extra})


@pytest.fixture
def watched(deploy, host, telegram, ping):
    """A deployed fake host with the watcher installed and its first (quiet) pass done."""
    deploy(alert_settings(deploy, telegram, ping))
    first = host.watch()
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("watch: healthy"), first.stdout
    return host


def texts(telegram) -> list[str]:
    return [r.text for r in telegram.replies()]


def restart(host, count: int, line: str) -> None:
    """systemd restarted the agent: its counter, its journal line, a fresh container."""
    host.control("unit", {"NRestarts": str(count)})
    host.control("journal", [f"{UNIT}: Scheduled restart job, restart counter is at "
                             f"{count}.", line, "Started Night Guard agent."])
    host.health_log("starting")


def passes(host, n: int = 1) -> list[str]:
    lines = []
    for _ in range(n):
        done = host.watch()
        assert done.returncode == 0, done.stderr
        lines.append(done.stdout.strip())
    return lines


# -- installed, updated, removed by the deploy -------------------------------------------------
def test_alerts_off_install_nothing(deploy, host):
    deploy()
    assert "alerts" not in deploy.last.text
    assert "watcher" not in deploy.last.ops
    assert not host.paths["watcher"].exists() and not host.paths["watch_timer"].exists()


def test_the_deploy_installs_the_watcher_in_its_one_session(deploy, host, telegram):
    deploy(alert_settings(deploy, telegram))
    out = deploy.last.text
    assert "plan: alerts: install the watcher" in out
    assert deploy.last.stats.connections == 1 and deploy.last.stats.commands == 1
    assert "watcher" in deploy.last.ops and host.audit()[-1]["outcome"] == "ok"
    assert "alerts" in host.audit()[-1]["steps"]
    assert host.paths["watcher"].read_bytes() == watcher_program()
    args = json.loads(host.paths["alerts_args"].read_text())
    assert stat.S_IMODE(host.paths["alerts_args"].stat().st_mode) == 0o600
    assert args["config"]["chat_id"] == CHAT and args["config"]["interval"] == 600
    assert args["unit"] == UNIT and args["container"] == "97layer-nightguard"
    service = host.paths["watch_service"].read_text()
    assert "Type=oneshot" in service
    assert "ExecStart=/usr/bin/python3 -I -S -c \"import sys; sys.path.append(" \
           "'/var/lib/nightguard'); import watcher; sys.exit(watcher.watch_main(sys.argv[1:]))" \
           "\" /var/lib/nightguard/alerts.json" in service
    assert "OnUnitActiveSec=600s" in host.paths["watch_timer"].read_text()
    assert host.paths["watch_timer_wants"].is_symlink()
    assert ["enable", "--now", "--quiet", "nightguard-watch.timer"] in host.calls("systemctl")
    again = deploy(alert_settings(deploy, telegram))
    assert again["changed"] is False and deploy.last.ops == ["facts", "finish"]


def test_a_watcher_update_cut_before_its_reload_is_finished_by_the_next_deploy(
        watched, deploy, telegram, ping):
    host = watched
    host.fail("daemon-reload")  # as if the run were killed between the write and the reload
    with pytest.raises(StepFailed):
        deploy(alert_settings(deploy, telegram, ping, **{"alerts.interval": "1m"}))
    assert "OnUnitActiveSec=60s" in host.paths["watch_timer"].read_text()  # written, unread
    calls = len(host.calls("systemctl"))
    deploy(alert_settings(deploy, telegram, ping, **{"alerts.interval": "1m"}))
    assert "plan: alerts: update the watcher" in deploy.last.text
    assert host.calls("systemctl")[calls:] == [["daemon-reload"],
                                               ["restart", "nightguard-watch.timer"]]
    assert deploy(alert_settings(deploy, telegram, ping, **{"alerts.interval": "1m"})) \
        ["changed"] is False


def test_a_changed_setting_updates_it_and_alerts_off_remove_it(watched, deploy, telegram,
                                                               ping):
    host = watched
    deploy(alert_settings(deploy, telegram, ping, **{"alerts.interval": "1m"}))
    assert "plan: alerts: update the watcher" in deploy.last.text
    assert "plan: container" not in deploy.last.text  # the agent is left alone
    assert "OnUnitActiveSec=60s" in host.paths["watch_timer"].read_text()
    assert host.calls("systemctl")[-1] == ["restart", "nightguard-watch.timer"]
    assert host.paths["alerts_state"].exists()  # the first pass's
    deploy()
    assert "plan: alerts: remove the watcher (alerts are off)" in deploy.last.text
    assert ["disable", "--now", "--quiet", "nightguard-watch.timer"] in host.calls("systemctl")
    for key in ("watcher", "alerts_args", "alerts_state", "watch_service", "watch_timer"):
        assert not host.paths[key].exists(), key
    assert not os.path.lexists(host.paths["watch_timer_wants"])
    assert deploy()["changed"] is False


def test_a_dry_run_names_the_watcher_and_installs_nothing(deploy, host, telegram):
    deploy(alert_settings(deploy, telegram), dry_run=True)
    assert "plan: alerts: install the watcher" in deploy.last.text
    assert "would: watcher {'action': 'install'}" in deploy.last.text
    assert not host.paths["watcher"].exists()


# -- a pass: crash, hang, the way back -----------------------------------------------------------
def test_a_crash_then_the_way_back_are_two_messages(watched, telegram, ping):
    host = watched
    assert texts(telegram) == [] and ping.kinds() == ["ok"]
    restart(host, 1, CRASH_LINE)
    assert passes(host) == ["watch: starting; sent restart"]
    host.health_log("healthy")
    assert passes(host, 2) == ["watch: healthy; sent recovered", "watch: healthy"]
    assert texts(telegram)[0] == f"Night Guard on {HOST}: RESTARTED: crashed: exited with " \
                                 "status 3."
    assert texts(telegram)[1].startswith(f"Night Guard on {HOST}: healthy again (the trouble "
                                         "lasted ")
    assert len(texts(telegram)) == 2
    assert {r.chat_id for r in telegram.replies()} == {int(CHAT)}
    assert ping.kinds() == ["ok"]  # starting: neither; healthy again: within ping_every
    state = host.alerts_state()
    assert state["last_alert"]["kind"] == "recovered" and state["nrestarts"] == 1


def test_a_hang_is_unhealthy_then_killed_then_healthy(watched, telegram, ping):
    host = watched
    host.health_log("healthy", streak=1, output='{"status":"unhealthy","heartbeat":"stale"}')
    assert passes(host) == ["watch: unhealthy; sent unhealthy; ping fail delivered"]
    host.health_log("healthy", streak=2, output="stale")
    assert passes(host) == ["watch: unhealthy"]  # still unhealthy: nothing new
    restart(host, 1, KILL_LINE)
    assert passes(host) == ["watch: starting; sent restart"]
    host.health_log("healthy")
    assert passes(host) == ["watch: healthy; sent recovered; ping ok delivered"]
    assert texts(telegram)[:2] == [
        f'Night Guard on {HOST}: UNHEALTHY: 1 failed check(s) in a row: {{"status":'
        '"unhealthy","heartbeat":"stale"}.',
        f"Night Guard on {HOST}: RESTARTED: killed after failing its health check (SIGKILL, "
        "exit 137)."]
    assert "healthy again" in texts(telegram)[2] and len(texts(telegram)) == 3
    assert ping.kinds() == ["ok", "fail", "ok"]
    assert [p.path for p in ping.pings] == [ping.path, ping.path + "/fail", ping.path]


def test_a_refused_token_is_one_message_and_a_failed_ping_with_no_restart(watched, telegram,
                                                                           ping):
    host = watched
    beat = host.paths["proc"] / str(host.standin_config["live_pid"]) / \
        "root/tmp/nightguard/heartbeat"
    beat.parent.mkdir(parents=True, exist_ok=True)
    beat.write_text('{"token":"rejected"}\n')  # what the agent writes on a 401
    assert passes(host, 2) == ["watch: healthy; sent token; ping fail delivered",
                               "watch: healthy"]
    assert texts(telegram) == [f"Night Guard on {HOST}: TOKEN REJECTED: Telegram refuses the "
                               "bot's token (revoked or replaced?). The agent stopped polling "
                               "and stays up; a restart cannot fix it: put the new token in "
                               "its source and run `inv secrets.rotate`."]
    assert ping.kinds() == ["ok", "fail"]
    assert host.alerts_state()["nrestarts"] == 0
    beat.write_text('{"polled_at":1.0,"poll_timeout":10}\n')  # a rotated token: polling
    assert passes(host) == ["watch: healthy; sent token ok; ping ok delivered"]
    assert texts(telegram)[-1] == f"Night Guard on {HOST}: the bot's token is accepted " \
                                  "again; the agent polls."


def test_a_crash_loop_is_one_message(watched, telegram):
    host = watched
    for count in (1, 2, 3, 4):
        restart(host, count, CRASH_LINE)
        passes(host)
    assert [t.split(": ")[1] for t in texts(telegram)] == ["RESTARTED", "RESTARTED",
                                                          "CRASH LOOP"]
    assert "3 restarts in the last 10 min" in texts(telegram)[2]


def test_swap_and_disk_over_their_thresholds(deploy, host, telegram):
    deploy(alert_settings(deploy, telegram, **{"alerts.disk_free_mb": 10**9}))
    host.meminfo(swap_total_mb=2048, swap_free_mb=200)  # 90 % used
    assert passes(host) == ["watch: healthy; sent swap, disk"]
    assert passes(host) == ["watch: healthy"]
    assert texts(telegram)[0] == f"Night Guard on {HOST}: SWAP 90% used (alert at 80%): " \
                                 "memory is short."
    assert texts(telegram)[1].startswith(f"Night Guard on {HOST}: DISK ")
    host.meminfo(swap_total_mb=2048, swap_free_mb=2000)
    deploy(alert_settings(deploy, telegram, **{"alerts.disk_free_mb": 1}))
    assert "plan: alerts: update the watcher" in deploy.last.text
    assert passes(host) == ["watch: healthy; sent swap ok, disk ok"]
    assert texts(telegram)[2] == f"Night Guard on {HOST}: swap back to 2% used."


def test_the_rate_limit_holds_back_and_tells_later(deploy, host, telegram):
    deploy(alert_settings(deploy, telegram, **{"alerts.rate_limit.messages": 1,
                                               "alerts.disk_free_mb": 10**9}))
    host.meminfo(swap_free_mb=0)
    assert passes(host) == ["watch: healthy; sent swap; 1 held back by the rate limit"]
    assert len(telegram.replies()) == 1
    restart(host, 1, CRASH_LINE)
    assert passes(host) == ["watch: starting; 2 held back by the rate limit"]
    assert len(telegram.replies()) == 1
    state = host.alerts_state()
    state["sent"] = [t - 3600 for t in state["sent"]]  # an hour later
    host.paths["alerts_state"].write_text(json.dumps(state))
    host.health_log("healthy")
    assert passes(host) == ["watch: healthy; sent recovered"]
    assert texts(telegram)[1].endswith("(2 alert(s) before this one were held back by the "
                                       "rate limit)")


def test_messages_telegram_did_not_take_wait_for_the_next_pass(deploy, host):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = deploy.settings(**{"alerts.enabled": True, "alerts.chat_id": CHAT,
                                  "alerts.api_base": f"http://127.0.0.1:{port}"})
    deploy(settings)
    assert passes(host) == ["watch: healthy"]  # nothing to say: nothing tried
    restart(host, 1, CRASH_LINE)
    line = passes(host)[0]
    assert line.startswith("watch: starting; not sent (URLError: ") and \
        line.endswith("1 kept for the next pass")
    assert TOKEN not in line and TOKEN not in json.dumps(host.alerts_state())
    with FakeTelegram(TOKEN, port=port) as telegram:
        host.health_log("healthy")
        assert passes(host) == ["watch: healthy; sent restart, recovered"]
        first, second = texts(telegram)
        assert first.split(": ")[1] == "RESTARTED"
        assert second.startswith(f"Night Guard on {HOST}: healthy again")


def test_a_pass_while_a_deploy_holds_the_lock_says_nothing(watched, telegram):
    host = watched
    restart(host, 1, CRASH_LINE)
    with host.helper(who="ana@laptop"):
        assert passes(host) == ["watch: a deploy holds the lock; skipped"]
    assert texts(telegram) == []


def test_a_pass_on_a_vm_the_agent_moved_from_or_not_yet_started_on_says_nothing(watched,
                                                                                 telegram):
    host = watched
    with host.helper(command="vm.move") as helper:
        helper.call("agent", action="stop")  # stopped and disabled: a move's new VM, staged
    assert passes(host) == ["watch: the agent's unit is not enabled here; skipped"]
    with host.helper(command="vm.move") as helper:
        helper.call("move_mark", mark={"to": "ng-2 (us-central1-a, e2-micro)", "state": "moved",
                                       "at": "T"})
    assert passes(host) == ["watch: the agent moved to another VM from here; skipped"]
    assert texts(telegram) == []


# -- the token: used for sendMessage, nowhere else ----------------------------------------------
@pytest.mark.parametrize("podman", ["4.9.3", "4.3.1"])
def test_the_token_is_in_no_argv_unit_args_file_or_output(make_fake_host, project, telegram,
                                                          podman):
    host = make_fake_host(podman=podman)
    host.configure(swap_names={str(host.paths["swapfile"]): "/swapfile"})
    deploy = Deployer(project, host)
    deploy(alert_settings(deploy, telegram))
    outputs = passes(host)  # the first pass: where things stand
    for count in (1, 2):
        restart(host, count, CRASH_LINE)
        done = host.watch()
        outputs += [done.stdout, done.stderr]
    assert len(telegram.replies()) == 2
    assert all(r.authorized for r in telegram.requests)  # sent with the bot's own token
    store = host.paths["graphroot"] / "secrets"
    assert TOKEN in host.secret_values().values()  # the search below can find it
    assert TOKEN not in json.dumps(host.call_log())  # every stand-in's argv
    assert TOKEN not in json.dumps(host.watch_argvs) and TOKEN not in "".join(outputs)
    leaks = []
    for folder, _, files in os.walk(host.root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path) or path.startswith(str(store)) or "/userdata/secrets" \
                    in path:  # the secret store, and the copies mounted into the container
                continue
            with open(path, "rb") as handle:
                if TOKEN.encode() in handle.read():
                    leaks.append(os.path.relpath(path, host.root))
    assert leaks == []
    checked = {k: host.paths[k].read_text() for k in ("alerts_args", "watch_service",
                                                      "watch_timer", "alerts_state")}
    assert all(TOKEN not in text for text in checked.values())
    showsecret = [a for a in host.calls("podman") if "--showsecret" in a]
    assert bool(showsecret) == (podman == "4.9.3")  # 4.3: Podman's file store is read


# -- inv alerts.test and inv health ---------------------------------------------------------------
@pytest.fixture
def alerts_task(deploy, monkeypatch):
    def run(settings):
        monkeypatch.setattr(alerts_tasks, "settings_for", lambda *a, **k: settings)
        monkeypatch.setattr(alerts_tasks, "open_remote",
                            lambda s, **kwargs: deploy.remote(**kwargs))
        return alerts_tasks.alerts_test(Context())
    return run


def test_alerts_test_sends_through_the_hosts_path_and_says_it_arrived(deploy, host, telegram,
                                                                      alerts_task, capsys):
    settings = alert_settings(deploy, telegram)
    with pytest.raises(Exit, match="no alert watcher on this host: set nightguard.alerts"):
        alerts_task(settings)
    deploy(settings)
    alerts_task(settings)
    [reply] = telegram.replies()
    assert capsys.readouterr().out == f"alerts.test: arrived in chat {CHAT} via " \
        f"http://127.0.0.1:{telegram.port} (message {reply.message_id})\n"
    assert reply.text.startswith(f"Night Guard on {HOST}: a test message (`inv alerts.test`")
    assert deploy.last.sent_args[-1]["mode"] == "read"  # no lock, no audit line
    assert host.audit()[-1]["command"] == "deploy"


def test_alerts_test_says_when_telegram_refuses(deploy, host, alerts_task):
    with FakeTelegram("999:another-bots-token") as other:
        settings = alert_settings(deploy, other)
        deploy(settings)
        with pytest.raises(Exit) as failed:
            alerts_task(settings)
    assert failed.value.code == 1
    assert str(failed.value.message) == (
        "error: step 'alerts.test' failed: Telegram answered HTTP 401: Unauthorized; the "
        f"message did not arrive in chat {CHAT} via http://127.0.0.1:{other.port}")


def test_health_shows_the_last_alert_and_the_last_ping(watched, deploy, telegram):
    host = watched
    restart(host, 1, CRASH_LINE)
    passes(host)
    with host.helper(mode="read") as reader:
        answer = reader.call("health")
    alerts = answer["alerts"]
    assert alerts["installed"] and alerts["enabled"]
    assert alerts["last_alert"]["kind"] == "restart"
    assert alerts["last_ping"]["kind"] == "ok" and alerts["last_ping"]["ok"]
    screen = render(deploy.settings(), summarize(deploy.settings(), answer))
    line = next(li for li in screen.splitlines() if li.startswith("  alerts"))
    assert line == (f"  alerts      last alert {alerts['last_alert']['at']} (restart); "
                    f"last ping {alerts['last_ping']['at']} (ok, delivered)")


def test_the_bench_wrapper_measures_one_real_pass(watched):
    """bench/watcher_bench.py's wrapper, on the fake host: it runs the pass as the service
    does and reports the process's CPU time and peak RSS."""
    import subprocess
    import sys

    from bench.watcher_bench import WRAPPER

    host = watched
    done = subprocess.run([getattr(sys, "_base_executable", sys.executable), "-I", "-S", "-c",
                           WRAPPER, str(host.paths["watcher"]), str(host.paths["alerts_args"])],
                          env=host.env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("watch: healthy")  # a real pass ran
    figures = json.loads(done.stderr.strip().splitlines()[-1])
    assert 0 < figures["cpu_s"] < 10 and figures["children_cpu_s"] > 0  # systemctl show
    assert 4 * 1024 < figures["rss_kib"] < 200 * 1024
