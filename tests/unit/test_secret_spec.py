"""Where a secret's value comes from: the entries of nightguard.secrets, parsed and refused."""

from __future__ import annotations

import pytest

from tasks.config import load_settings
from tasks.errors import ConfigError
from tasks.secret_spec import SecretSource, env_keys, parse_source, parse_sources


def test_a_string_is_a_dotenv_key():
    assert parse_source("token", "TELEGRAM_BOT_TOKEN") == SecretSource("token", "env",
                                                                       "TELEGRAM_BOT_TOKEN")
    assert parse_source("token", {"env": "TOKEN"}).ref == "TOKEN"


def test_a_command_is_split_like_a_shell_and_run_without_one():
    source = parse_source("gemini", {"command": "op read 'op://night guard/gemini/key'"})
    assert source.kind == "command"
    assert source.argv == ("op", "read", "op://night guard/gemini/key")
    assert source.describe() == "command: op read 'op://night guard/gemini/key'"
    assert source.timeout == 30.0
    listed = parse_source("gemini", {"command": ["pass", "show", "ng/gemini"], "timeout": "2m"})
    assert listed.argv == ("pass", "show", "ng/gemini")
    assert listed.timeout == 120.0
    # a shell only where the user writes one
    shell = parse_source("x", {"command": "sh -c 'cat ~/k | tr -d x'"})
    assert shell.argv == ("sh", "-c", "cat ~/k | tr -d x")


def test_gcp_names_a_secret_or_one_version():
    latest = parse_source("key", {"gcp": "projects/my-proj/secrets/gemini-key"})
    assert latest.ref == "projects/my-proj/secrets/gemini-key/versions/latest"
    assert latest.project == "my-proj"
    pinned = parse_source("key", {"gcp": "projects/p1/secrets/s/versions/7"})
    assert pinned.ref == "projects/p1/secrets/s/versions/7"
    assert pinned.describe() == "Google Secret Manager projects/p1/secrets/s/versions/7"


@pytest.mark.parametrize(("entry", "reason"), [
    ({"vault": "kv/ng"}, "unknown source kind 'vault'"),
    ({"command": "op read x", "gcp": "projects/p/secrets/s"}, "name one source, not 2"),
    ({}, "name one source, not 0"),
    ({"command": ""}, "command is empty"),
    ({"command": "op read 'unclosed"}, "cannot be split into words"),
    ({"command": "printf 'a\nb'"}, "control character"),
    ({"gcp": "my-secret"}, "is not projects/PROJECT/secrets/NAME"),
    ({"gcp": "projects/p/secrets/s/versions/0"}, "is not projects/PROJECT/secrets/NAME"),
    ({"command": "op read x", "timeout": "forever"}, "is not a duration"),
    ({"command": "op read x", "timeout": "11m"}, "at most 10m"),
    ("MY-KEY", "not a valid .env key"),
    (["op", "read"], "expected a .env key"),
])
def test_bad_entries_say_why_in_one_line(entry, reason):
    with pytest.raises(ValueError) as caught:
        parse_source("gemini_api_key", entry)
    message = str(caught.value)
    assert message.startswith("gemini_api_key: ") and reason in message
    assert "\n" not in message


def test_env_keys_names_only_the_dotenv_entries():
    secrets = {"a": "A_KEY", "b": {"command": "x"}, "c": {"gcp": "projects/p/secrets/c"}}
    assert env_keys(secrets) == {"a": "A_KEY"}
    assert [s.kind for s in parse_sources(secrets).values()] == ["env", "command", "gcp"]


def test_settings_keep_each_entry_as_written(tmp_path):
    (tmp_path / "invoke.yaml").write_text(
        "nightguard:\n  secrets:\n    telegram_bot_token: TELEGRAM_BOT_TOKEN\n"
        "    gemini_api_key: {command: op read op://ng/gemini}\n"
        "    other_key: {gcp: projects/p/secrets/other, timeout: 5s}\n")
    settings = load_settings(root=tmp_path, environ={})
    assert settings["secrets"] == {
        "telegram_bot_token": "TELEGRAM_BOT_TOKEN",
        "gemini_api_key": {"command": "op read op://ng/gemini"},
        "other_key": {"gcp": "projects/p/secrets/other", "timeout": "5s"}}


def test_a_bad_entry_fails_loading_with_its_source(tmp_path):
    (tmp_path / "invoke.yaml").write_text(
        "nightguard:\n  secrets:\n    gemini_api_key: {keychain: gemini}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(root=tmp_path, environ={})
    assert str(caught.value) == (
        "invoke.yaml: nightguard.secrets: gemini_api_key: unknown source kind 'keychain' "
        "(use a .env key, {command: ...} or {gcp: projects/P/secrets/S})")


def test_the_environment_gives_entries_as_json(tmp_path):
    settings = load_settings(root=tmp_path, environ={
        "NIGHTGUARD_SECRETS": '{"t": {"command": ["pass", "show", "t"]}}'})
    assert settings["secrets"] == {"t": {"command": ["pass", "show", "t"]}}
    assert parse_source("t", settings["secrets"]["t"]).argv == ("pass", "show", "t")
