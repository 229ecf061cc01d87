"""Pure parts of the orchestration: secrets change detection, unit relabelling, lock
messages, `inv health` verdicts and the limit drift check."""

from __future__ import annotations

import pytest

from tasks.config import load_settings
from tasks.deploy.apply import limit_drift, podman_at_least
from tasks.deploy.deploy import digests_for, lock_failure
from tasks.deploy.envfile import SecretValues
from tasks.deploy.health import render, summarize
from tasks.deploy.plan import secret_digest, secrets_label
from tasks.deploy.secrets import changed_names, pick_names, relabel_unit
from tasks.errors import ConfigError

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


def test_changed_names_compares_keyed_hashes():
    values = SecretValues({"telegram_bot_token": "new", "gemini_api_key": "same"})
    facts = {"secret_salt": SALT,
             "secrets": {"telegram_bot_token": "x", "gemini_api_key": "y"},
             "secret_hashes": {"telegram_bot_token": secret_digest(SALT, "old"),
                               "gemini_api_key": secret_digest(SALT, "same")}}
    assert changed_names(facts, values) == ["telegram_bot_token"]
    facts["secrets"].pop("gemini_api_key")
    assert changed_names(facts, values) == ["telegram_bot_token", "gemini_api_key"]


def test_without_a_host_key_every_secret_counts_as_changed():
    values = SecretValues({"telegram_bot_token": "a"})
    assert digests_for({}, values) == {}
    assert changed_names({"secrets": {"telegram_bot_token": "t"}}, values) == [
        "telegram_bot_token"]


def test_relabel_unit_changes_only_the_secrets_label():
    unit = "ExecStart=/usr/bin/podman run --label nightguard.secrets=abc123 --label " \
           "nightguard.code=def456 img"
    digests = {"telegram_bot_token": "11", "gemini_api_key": "22"}
    relabelled = relabel_unit(unit, digests)
    assert f"nightguard.secrets={secrets_label(digests)}" in relabelled
    assert "nightguard.code=def456" in relabelled
    assert relabelled.replace(secrets_label(digests), "abc123") == unit


def test_pick_names_rejects_unknown(settings):
    assert pick_names(settings, None) == ["telegram_bot_token", "gemini_api_key"]
    assert pick_names(settings, ["gemini_api_key"]) == ["gemini_api_key"]
    with pytest.raises(ConfigError, match="unknown secret 'nope'"):
        pick_names(settings, ["nope"])


def test_lock_failure_names_holder_and_since():
    error = lock_failure({"acquired": False, "held_by": {
        "who": "ana@laptop", "since": "2026-11-29T10:00:00Z", "command": "deploy"}})
    assert str(error) == ("step 'lock' failed: another deploy holds the lock: ana@laptop "
                          "(deploy) since 2026-11-29T10:00:00Z; if it is gone, run `inv unlock`")


def test_podman_version_gates():
    assert podman_at_least({"podman": "4.7.0"}, (4, 7))
    assert podman_at_least({"podman": "5.4.2"}, (4, 7))
    assert not podman_at_least({"podman": "4.3.1"}, (4, 7))
    assert not podman_at_least({}, (4, 7))


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


def test_health_verdicts(settings):
    answer = {"container": good_container(), "cgroup": {}, "swaps": ["/swapfile"],
              "host": {}, "lock": None}
    assert summarize(settings, answer)["healthy"]
    unhealthy = summarize(settings, dict(answer, container=dict(good_container(),
                                                                health="unhealthy")))
    assert unhealthy["problems"] == ["health is unhealthy"]
    no_swap = summarize(settings, dict(answer, swaps=[]))
    assert no_swap["problems"] == ["swapfile is not active"]
    missing = summarize(settings, dict(answer, container=None))
    assert "container does not exist" in missing["problems"]
    screen = render(settings, unhealthy)
    assert screen.splitlines()[0] == "Night Guard: UNHEALTHY"
    assert "! health is unhealthy" in screen
