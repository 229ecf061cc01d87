"""Pure parts of the orchestration: secrets change detection, lock messages, release
picking, `inv health` verdicts and the limit drift check."""

from __future__ import annotations

import pytest

from tasks.config import load_settings
from tasks.deploy.health import exit_reason, render, summarize
from tasks.deploy.history import pick_release
from tasks.deploy.plan import changed_secrets, limit_drift, secret_digest, secret_digests
from tasks.deploy.secrets import pick_names
from tasks.deploy.session import LockHeld
from tasks.errors import ConfigError
from tasks.hostside.verdict import agent_status, verdict

MiB = 1024 * 1024
SALT = "00" * 32


@pytest.fixture
def settings():
    return load_settings(environ={})


def good_container():
    return {"running": True, "status": "running", "health": "healthy", "restarts": 0,
            "memory": 700 * MiB, "memory_swap": 2700 * MiB, "memory_reservation": 500 * MiB,
            "nano_cpus": 1_000_000_000, "health_log": [], "pid": 42}


def test_secret_digest_is_keyed_and_never_the_value():
    digest = secret_digest(SALT, "tg-value")
    assert "tg-value" not in digest
    assert digest != secret_digest("11" * 32, "tg-value")
    assert digest == secret_digest(SALT, "tg-value")


def test_changed_secrets_compares_keyed_hashes():
    values = {"telegram_bot_token": "new", "gemini_api_key": "same"}
    facts = {"secret_salt": SALT,
             "secrets": {"telegram_bot_token": "x", "gemini_api_key": "y"},
             "secret_hashes": {"telegram_bot_token": secret_digest(SALT, "old"),
                               "gemini_api_key": secret_digest(SALT, "same")}}
    digests = secret_digests(facts, values)
    assert changed_secrets(facts, digests, list(values)) == ["telegram_bot_token"]
    facts["secrets"].pop("gemini_api_key")
    assert changed_secrets(facts, digests, list(values)) == ["telegram_bot_token",
                                                             "gemini_api_key"]


def test_without_a_host_key_every_secret_counts_as_changed():
    values = {"telegram_bot_token": "a"}
    assert secret_digests({}, values) == {}
    facts = {"secrets": {"telegram_bot_token": "t"}}
    assert changed_secrets(facts, {}, list(values)) == ["telegram_bot_token"]


def test_pick_names_rejects_unknown(settings):
    assert pick_names(settings, None) == ["telegram_bot_token", "gemini_api_key"]
    assert pick_names(settings, ["gemini_api_key"]) == ["gemini_api_key"]
    with pytest.raises(ConfigError, match="unknown secret 'nope'"):
        pick_names(settings, ["nope"])


def test_lock_message_names_holder_since_and_the_way_out():
    error = LockHeld({"who": "ana@laptop", "since": "2026-11-29T10:00:00Z", "command": "deploy",
                      "alive": True})
    assert str(error) == ("step 'lock' failed: another deploy holds the lock: ana@laptop "
                          "(deploy) since 2026-11-29T10:00:00Z; if it is stuck, "
                          "`inv unlock --force` stops it")


def release(version: str) -> dict:
    return {"version": version, "unit_text": "u", "markers_text": "m", "secrets": {}}


def test_pick_release_defaults_to_the_one_before_and_takes_a_prefix():
    history = [release("aaa111"), release("bbb222"), release("ccc333")]
    assert pick_release(history, None)["version"] == "bbb222"
    assert pick_release(history, "ccc")["version"] == "ccc333"
    with pytest.raises(ConfigError, match="no such release"):
        pick_release(history, "zzz")
    with pytest.raises(ConfigError, match="no earlier release"):
        pick_release(history[:1], None)
    old_format = [release("aaa111"), {"version": "old", "unit_text": "u"}]
    with pytest.raises(ConfigError, match="no earlier release"):
        pick_release(old_format, None)  # recorded before releases kept markers


def test_limit_drift_reads_inspect_and_cgroup(settings):
    container = good_container()
    v2 = {"memory": str(700 * MiB), "swap": str(2000 * MiB)}
    assert limit_drift(settings, container, v2) == []
    # podman-compose's silent default: swap = 2x RAM
    drifted = dict(container, memory_swap=1400 * MiB)
    assert limit_drift(settings, drifted, {"memory": str(700 * MiB), "swap": str(700 * MiB)}) == [
        f"memory_swap is {1400 * MiB} (want {2700 * MiB})",
        f"cgroup memory.swap.max is {700 * MiB} (want {2000 * MiB})"]
    assert limit_drift(settings, container, {"memory": str(700 * MiB),
                                             "memsw": str(1400 * MiB)}) == [
        f"cgroup memory.memsw.limit_in_bytes is {1400 * MiB} (want {2700 * MiB})"]


def answered(answer: dict) -> dict:
    """A health answer with the verdict the host adds to it."""
    return dict(answer, verdict=verdict(answer.get("container"), answer.get("unit") or {}))


def test_health_verdicts(settings):
    answer = {"container": good_container(), "cgroup": {}, "swaps": ["/swapfile"],
              "host": {}, "lock": None}
    assert summarize(settings, answered(answer))["healthy"]
    unhealthy = summarize(settings, answered(dict(answer, container=dict(good_container(),
                                                                         health="unhealthy"))))
    assert unhealthy["problems"] == ["health is unhealthy"]
    no_swap = summarize(settings, answered(dict(answer, swaps=[])))
    assert no_swap["problems"] == ["swapfile is not active"]
    missing = summarize(settings, answered(dict(answer, container=None)))
    assert "container does not exist" in missing["problems"]
    stopped = summarize(settings, answered(dict(answer, container=dict(
        good_container(), running=False, status="exited"))))
    assert stopped["problems"] == ["container is exited"]
    screen = render(settings, unhealthy)
    assert screen.splitlines()[0] == "Night Guard: UNHEALTHY"
    assert "! health is unhealthy" in screen


def test_health_and_the_alerts_share_the_hosts_verdict(settings):
    """One verdict: a check failing (Podman's streak) while its status still says healthy
    is unhealthy for `inv health` as for the watcher, and a missing verdict is never
    healthy."""
    failing = dict(good_container(), failing_streak=2,
                   health_log=[{"exit": 1, "output": "heartbeat is stale"}])
    answer = answered({"container": failing, "cgroup": {}, "swaps": ["/swapfile"],
                       "host": {}, "lock": None, "unit": {"ActiveState": "active"}})
    assert answer["verdict"]["status"] == agent_status(failing, {"ActiveState": "active"})[0] \
        == "unhealthy"
    report = summarize(settings, answer)
    assert not report["healthy"]
    assert report["problems"] == ["health is healthy, 2 failed check(s) in a row"]
    assert not summarize(settings, dict(answer, verdict={}))["healthy"]
    assert summarize(settings, answered(dict(answer, container=good_container())))["healthy"]


def test_restarts_come_from_systemd_with_the_last_exit_reason(settings):
    answer = {"container": good_container(), "cgroup": {}, "swaps": ["/swapfile"], "host": {},
              "lock": None, "unit": {"NRestarts": "4", "ExecMainCode": "1",
                                     "ExecMainStatus": "3", "ActiveState": "active"}}
    report = summarize(settings, answered(answer))
    assert report["restarts"] == 4 and report["last_exit"] == "exited 3"
    assert "restarts 4, last exit exited 3" in render(settings, report)
    assert exit_reason({"ExecMainCode": "2", "ExecMainStatus": "9"}) == "killed 9"
    assert exit_reason({}) == "-"
