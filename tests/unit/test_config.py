"""Layered settings: precedence, recorded sources, and one-line errors for bad input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tasks.config import (
    DEFAULTS,
    ENV_NAMES,
    KNOWN_KEYS,
    SANDBOX_BASE_IMAGE,
    ConfigError,
    env_var_name,
    load_settings,
    parse_duration,
    parse_size,
)

MB = 1024**2


def write_yaml(root: Path, body: str) -> Path:
    path = root / "invoke.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def load(root: Path, environ: dict | None = None, overrides: dict | None = None):
    return load_settings(root=root, environ=environ or {}, overrides=overrides)


def config_error(root: Path, environ: dict | None = None, overrides: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(root, environ, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- precedence and sources -----------------------------------------------------------------
def test_defaults_only_when_nothing_is_given(tmp_path):
    settings = load(tmp_path, overrides={"target": "ssh", "ssh.host": "h"})
    assert settings["limits.memory"] == "700m"
    assert settings["ssh.port"] == 22
    assert settings.source("limits.memory") == "defaults"
    assert settings.root == tmp_path


def test_each_layer_overrides_the_one_below(tmp_path):
    write_yaml(tmp_path, """\
        nightguard:
          target: ssh
          ssh:
            host: from-yaml
            port: 2201
            user: yaml-user
          limits:
            memory: 800m
    """)
    environ = {"NIGHTGUARD_SSH_PORT": "2202", "NIGHTGUARD_SSH_USER": "env-user",
               "HOME": "/ignored", "OTHER_NIGHTGUARD_SSH_PORT": "1"}
    settings = load(tmp_path, environ, overrides={"ssh.user": "flag-user", "ssh.host": None})

    assert settings["limits.memory"] == "800m"
    assert settings.source("limits.memory") == "invoke.yaml"
    assert settings["ssh.host"] == "from-yaml"  # a None flag is "not given"
    assert settings.source("ssh.host") == "invoke.yaml"
    assert settings["ssh.port"] == 2202
    assert settings.source("ssh.port") == "environment (NIGHTGUARD_SSH_PORT)"
    assert settings["ssh.user"] == "flag-user"
    assert settings.source("ssh.user") == "command line"
    assert settings["limits.memory_swap"] == "2700m"
    assert settings.source("limits.memory_swap") == "defaults"


def test_values_are_coerced_to_the_default_type(tmp_path):
    environ = {"NIGHTGUARD_LIMITS_CPUS": "0.5", "NIGHTGUARD_ROOTLESS": "yes",
               "NIGHTGUARD_KEEP_IMAGES": " 5 "}
    settings = load(tmp_path, environ)
    assert settings["limits.cpus"] == 0.5
    assert settings["rootless"] is True
    assert settings["keep_images"] == 5
    assert load(tmp_path, overrides={"rootless": "off"})["rootless"] is False


def test_secrets_mapping_replaces_the_default(tmp_path):
    write_yaml(tmp_path, """\
        nightguard:
          secrets:
            only_one: ONLY_ONE
    """)
    settings = load(tmp_path)
    assert settings["secrets"] == {"only_one": "ONLY_ONE"}
    assert settings.secret_names == ["only_one"]
    assert settings.source("secrets") == "invoke.yaml"


def test_defaults_are_not_mutated_by_loading(tmp_path):
    load(tmp_path, {"NIGHTGUARD_LIMITS_MEMORY": "900m"})
    assert DEFAULTS["limits"]["memory"] == "700m"
    assert load(tmp_path)["limits.memory"] == "700m"


def test_path_settings_resolve_against_root(tmp_path):
    settings = load(tmp_path, {"NIGHTGUARD_ENV_FILE": "/abs/secret.env"})
    assert settings.path("env_file") == Path("/abs/secret.env")
    assert settings.path("compose_file") == tmp_path / DEFAULTS["compose_file"]


# -- sandbox base image switch ----------------------------------------------------------------
def test_sandbox_target_switches_the_base_image(tmp_path):
    settings = load(tmp_path)
    assert settings["target"] == "sandbox"
    assert settings["base_image"] == SANDBOX_BASE_IMAGE
    assert settings.source("base_image") == "sandbox default"


def test_other_targets_keep_the_registry_base_image(tmp_path):
    settings = load(tmp_path, overrides={"target": "ssh", "ssh.host": "203.0.113.7"})
    assert settings["base_image"] == DEFAULTS["base_image"]
    assert settings.source("base_image") == "defaults"


def test_explicit_base_image_wins_on_the_sandbox(tmp_path):
    settings = load(tmp_path, {"NIGHTGUARD_BASE_IMAGE": "localhost/mine:1"})
    assert settings["base_image"] == "localhost/mine:1"
    assert settings.source("base_image") == "environment (NIGHTGUARD_BASE_IMAGE)"


# -- one-line errors naming the key and the source ------------------------------------------
def test_unknown_key_in_invoke_yaml(tmp_path):
    write_yaml(tmp_path, """\
        nightguard:
          limits:
            memroy: 700m
    """)
    message = config_error(tmp_path)
    assert "invoke.yaml" in message
    assert "nightguard.limits.memroy" in message


def test_unknown_environment_variable(tmp_path):
    message = config_error(tmp_path, {"NIGHTGUARD_SSH_HOSTNAME": "x"})
    assert "environment" in message
    assert "NIGHTGUARD_SSH_HOSTNAME" in message


@pytest.mark.parametrize(
    ("layer", "key", "value", "expected_key"),
    [
        ("yaml", "limits.memory", "700mb", "nightguard.limits.memory"),
        ("env", "limits.memory", "700mb", "nightguard.limits.memory"),
        ("flag", "limits.memory", "700mb", "nightguard.limits.memory"),
        ("yaml", "limits.memory_reservation", "800m", "nightguard.limits.memory_reservation"),
        ("env", "limits.memory_swap", "600m", "nightguard.limits.memory_swap"),
        ("yaml", "health.interval", "30", "nightguard.health.interval"),
        ("env", "health.timeout", "ten seconds", "nightguard.health.timeout"),
        ("flag", "health.start_period", "1.5m", "nightguard.health.start_period"),
        ("yaml", "limits.cpus", "lots", "nightguard.limits.cpus"),
        ("env", "limits.cpus", "0", "nightguard.limits.cpus"),
        ("flag", "limits.cpus", "65", "nightguard.limits.cpus"),
        ("env", "ssh.port", "twenty-two", "nightguard.ssh.port"),
        ("env", "ssh.port", "0", "nightguard.ssh.port"),
        ("yaml", "target", "aws", "nightguard.target"),
        ("env", "rootless", "maybe", "nightguard.rootless"),
        ("yaml", "app_dir", "relative/dir", "nightguard.app_dir"),
        ("env", "limits.swappiness", "101", "nightguard.limits.swappiness"),
        ("yaml", "health.watchdog", "never", "nightguard.health.watchdog"),
        ("env", "health.watchdog", "1s", "nightguard.health.watchdog"),
        ("flag", "health.watchdog", "1500ms", "nightguard.health.watchdog"),
        ("env", "health.watchdog", "2h", "nightguard.health.watchdog"),
    ],
)
def test_bad_value_names_key_and_source(tmp_path, layer, key, value, expected_key):
    environ, overrides = {}, {}
    if layer == "yaml":
        section, _, leaf = key.rpartition(".")
        body = f"nightguard:\n  {section}:\n    {leaf}: '{value}'\n" if section \
            else f"nightguard:\n  {leaf}: '{value}'\n"
        (tmp_path / "invoke.yaml").write_text(body)
        expected_source = "invoke.yaml"
    elif layer == "env":
        name = env_var_name(tuple(key.split(".")))
        environ[name] = value
        expected_source = f"environment ({name})"
    else:
        overrides[key] = value
        expected_source = "command line"
    message = config_error(tmp_path, environ, overrides)
    assert message.startswith(expected_source + ": "), message
    assert expected_key in message


def test_reservation_above_limit_mentions_both(tmp_path):
    message = config_error(tmp_path, {"NIGHTGUARD_LIMITS_MEMORY_RESERVATION": "701m"})
    assert message.startswith("environment (NIGHTGUARD_LIMITS_MEMORY_RESERVATION): ")
    assert "nightguard.limits.memory_reservation" in message
    assert "701m" in message and "700m" in message


def test_memory_swap_below_memory_is_rejected(tmp_path):
    message = config_error(tmp_path, overrides={"limits.memory_swap": "512m"})
    assert message.startswith("command line: nightguard.limits.memory_swap:")
    assert "below limits.memory" in message


def test_memory_swap_equal_to_memory_is_allowed(tmp_path):
    settings = load(tmp_path, overrides={"limits.memory_swap": "700m"})
    assert settings.size("limits.memory_swap") == settings.size("limits.memory")


def test_ssh_target_without_host(tmp_path):
    message = config_error(tmp_path, {"NIGHTGUARD_TARGET": "ssh"})
    assert "nightguard.ssh.host" in message
    assert "required when target is ssh" in message
    assert message.startswith("defaults: ")  # where the (empty) host came from


def test_gcp_target_without_project(tmp_path):
    write_yaml(tmp_path, "nightguard:\n  target: gcp\n")
    message = config_error(tmp_path)
    assert "nightguard.gcp.project" in message
    assert "required when target is gcp" in message


def test_gcp_target_with_project_loads(tmp_path):
    write_yaml(tmp_path, "nightguard:\n  target: gcp\n  gcp:\n    project: demo-123\n")
    assert load(tmp_path)["gcp.project"] == "demo-123"


@pytest.mark.parametrize("body", [
    "nightguard:\n  target: [sandbox\n",
    "nightguard:\n  limits:\n    memory: 700m\n   cpus: 1\n",
    "nightguard: {target: 'ssh'\n",
])
def test_invalid_yaml_is_one_line_naming_the_file(tmp_path, body):
    (tmp_path / "invoke.yaml").write_text(body)
    message = config_error(tmp_path)
    assert message.startswith("invoke.yaml: not valid YAML: line ")
    assert ", column " in message and message.count(":") >= 3  # YAML's own reason follows


@pytest.mark.parametrize("body", ["- a\n- b\n", "nightguard: [1, 2]\n"])
def test_yaml_of_the_wrong_shape(tmp_path, body):
    (tmp_path / "invoke.yaml").write_text(body)
    message = config_error(tmp_path)
    assert message.startswith("invoke.yaml:")
    assert "expected a mapping" in message


def test_yaml_without_nightguard_section_is_ignored(tmp_path):
    write_yaml(tmp_path, "tasks:\n  search_root: .\nnightguard:\n")
    assert load(tmp_path)["target"] == "sandbox"


@pytest.mark.parametrize(("name", "env_key"), [
    ("Telegram", "TELEGRAM"),
    ("bad-name", "BAD"),
    ("1st", "FIRST"),
    ("x" * 64, "LONG"),
])
def test_bad_secret_name(tmp_path, name, env_key):
    write_yaml(tmp_path, f"nightguard:\n  secrets:\n    '{name}': {env_key}\n")
    message = config_error(tmp_path)
    assert message.startswith("invoke.yaml: nightguard.secrets:")
    assert repr(name) in message


def test_bad_secret_env_key(tmp_path):
    write_yaml(tmp_path, "nightguard:\n  secrets:\n    token: 'MY-TOKEN'\n")
    message = config_error(tmp_path)
    assert message.startswith("invoke.yaml: nightguard.secrets:")
    assert "'MY-TOKEN'" in message


def test_empty_secrets_mapping(tmp_path):
    write_yaml(tmp_path, "nightguard:\n  secrets: {}\n")
    assert "at least one secret" in config_error(tmp_path)


def test_secrets_from_environment_must_be_a_mapping(tmp_path):
    message = config_error(tmp_path, {"NIGHTGUARD_SECRETS": "token=TOKEN"})
    assert message.startswith("environment (NIGHTGUARD_SECRETS): nightguard.secrets:")


def test_unknown_flag_key(tmp_path):
    message = config_error(tmp_path, overrides={"limits.ram": "1g"})
    assert message == "command line: unknown key nightguard.limits.ram"


# -- parsers --------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("700m", 700 * MB),
    ("2700m", 2700 * MB),
    ("2g", 2 * 1024**3),
    ("2G", 2 * 1024**3),
    ("512k", 512 * 1024),
    ("10b", 10),
    ("4096", 4096),
    (" 700m ", 700 * MB),
    (700, 700),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["700mb", "", "m", "-1m", "1.5g", "2t", "7 00m", "2gb"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("30s", 30),
    ("10s", 10),
    ("5m", 300),
    ("500ms", 0.5),
    ("1h", 3600),
    ("0s", 0),
    (" 60s ", 60),
])
def test_parse_duration(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["30", "30S", "1.5s", "s", "30 s", "1d", "", "-5s"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


# -- environment variable names ----------------------------------------------------------------
def test_env_var_names_are_unique():
    names = [env_var_name(path) for path in KNOWN_KEYS]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates
    assert len(ENV_NAMES) == len(KNOWN_KEYS)


def test_every_known_key_round_trips_through_its_env_name():
    for path in KNOWN_KEYS:
        assert ENV_NAMES[env_var_name(path)] == path
    assert env_var_name(("limits", "memory_swap")) == "NIGHTGUARD_LIMITS_MEMORY_SWAP"
    assert env_var_name(("ssh", "host")) == "NIGHTGUARD_SSH_HOST"


# -- values that reach a unit file, an argv or Podman --------------------------------------------
@pytest.mark.parametrize(("env", "expected"), [
    ({"NIGHTGUARD_IMAGE_NAME": "localhost/ng\nExecStartPre=/bin/sh -c id"},
     "nightguard.image_name: contains a control character"),
    ({"NIGHTGUARD_AGENT_COMMAND": "python3 a.py\x00"}, "agent_command: contains a control"),
    ({"NIGHTGUARD_CONTAINER_NAME": "night guard"}, "not a valid container name"),
    ({"NIGHTGUARD_CONTAINER_NAME": "-x"}, "not a valid container name"),
    ({"NIGHTGUARD_IMAGE_NAME": "localhost/NightGuard"}, "not a valid image name"),
    ({"NIGHTGUARD_IMAGE_NAME": "localhost/nightguard:1"}, "not a valid image name"),
    ({"NIGHTGUARD_BASE_IMAGE": "python:3.11 slim"}, "not a valid image reference"),
    ({"NIGHTGUARD_APP_DIR": "/home/ubuntu/97layerOS:/etc"}, "not a plain absolute path"),
    ({"NIGHTGUARD_APP_DIR": "/home/ubuntu/../../etc"}, "not a plain absolute path"),
    ({"NIGHTGUARD_APP_DIR": "relative/dir"}, "not a plain absolute path"),
    ({"NIGHTGUARD_APP_DIR": "/etc"}, "is a system directory"),
    ({"NIGHTGUARD_DATA_DIR": "/home/ubuntu/97layerOS/data"}, "must be apart from app_dir"),
    ({"NIGHTGUARD_SYNC_INCLUDE": "../secrets"}, "must be a relative path inside"),
    ({"NIGHTGUARD_SYNC_INCLUDE": ""}, "lists nothing to sync"),
    ({"NIGHTGUARD_NETWORK": "macvlan"}, "is not one of auto"),
])
def test_hostile_or_typoed_values_are_refused_in_one_line(tmp_path, env, expected):
    assert expected in config_error(tmp_path, env)


def test_lists_from_yaml_and_the_environment(tmp_path):
    write_yaml(tmp_path, """\
        nightguard:
          sync:
            include: [execution, knowledge]
            exclude: ["*.log"]
    """)
    settings = load(tmp_path, {"NIGHTGUARD_SYNC_ALLOW": "knowledge/a.pem, knowledge/b.pem"})
    assert settings["sync.include"] == ["execution", "knowledge"]
    assert settings["sync.exclude"] == ["*.log"]
    assert settings["sync.allow"] == ["knowledge/a.pem", "knowledge/b.pem"]
    assert "not a list" not in str(settings.sources)
    write_yaml(tmp_path, "nightguard:\n  sync:\n    include: 5\n")
    assert "expected a list of strings" in config_error(tmp_path)


# -- Invoke's layers: files at their level, INVOKE_NIGHTGUARD_* with the alias -----------------
def test_file_layers_in_invokes_order_around_the_environment(tmp_path):
    from tasks.config import ConfigFile

    files = [ConfigFile("runtime", "run.yaml (-f)", {"ssh": {"port": 2203}}),
             ConfigFile("user", "~/.invoke.yaml (user)", {"ssh": {"port": 2201, "user": "u"},
                                                           "keep_images": 4}),
             ConfigFile("project", "invoke.yaml", {"ssh": {"user": "p"}}),
             ConfigFile("system", "/etc/invoke.yaml (system)", {"keep_images": 5})]
    settings = load_settings(root=tmp_path, environ={"INVOKE_NIGHTGUARD_SSH_PORT": "2202",
                                                     "NIGHTGUARD_SSH_USER": "e"}, files=files)
    assert settings["ssh.port"] == 2203 and settings.source("ssh.port") == "run.yaml (-f)"
    assert settings["ssh.user"] == "e"
    assert settings.source("ssh.user") == "environment (NIGHTGUARD_SSH_USER)"
    assert settings["keep_images"] == 4  # user above system
    assert settings.files == ("/etc/invoke.yaml (system)", "~/.invoke.yaml (user)",
                              "invoke.yaml", "run.yaml (-f)")
    without_f = load_settings(root=tmp_path, environ={"INVOKE_NIGHTGUARD_SSH_PORT": "2202"},
                              files=files[1:])
    assert without_f.source("ssh.port") == "environment (INVOKE_NIGHTGUARD_SSH_PORT)"


def test_both_environment_names_agreeing_is_fine(tmp_path):
    settings = load(tmp_path, {"INVOKE_NIGHTGUARD_KEEP_IMAGES": "4",
                               "NIGHTGUARD_KEEP_IMAGES": "4"})
    assert settings.source("keep_images") == "environment (INVOKE_NIGHTGUARD_KEEP_IMAGES)"
    message = config_error(tmp_path, {"INVOKE_NIGHTGUARD_KEEP_IMAGES": "4",
                                      "NIGHTGUARD_KEEP_IMAGES": "5"})
    assert message == ("environment: INVOKE_NIGHTGUARD_KEEP_IMAGES and NIGHTGUARD_KEEP_IMAGES "
                       "differ; set one of them")


def test_a_mapping_setting_is_one_variable(tmp_path):
    settings = load(tmp_path, {"INVOKE_NIGHTGUARD_AGENT_ENV": '{"MODE": "quiet"}'})
    assert settings["agent_env"] == {"MODE": "quiet"}
    message = config_error(tmp_path, {"INVOKE_NIGHTGUARD_SECRETS_TELEGRAM_BOT_TOKEN": "X"})
    assert message == ("environment: unknown variable INVOKE_NIGHTGUARD_SECRETS_TELEGRAM_BOT_TOKEN"
                       " (nightguard.secrets is one setting: a JSON object in "
                       "INVOKE_NIGHTGUARD_SECRETS)")


def test_a_value_where_a_section_belongs(tmp_path):
    write_yaml(tmp_path, "nightguard:\n  limits: 5\n")
    assert config_error(tmp_path) == "invoke.yaml: nightguard.limits: expected a mapping"


def test_sandbox_name_must_be_a_plain_name(tmp_path):
    message = config_error(tmp_path, overrides={"sandbox.name": "../x"})
    assert message.startswith("command line: nightguard.sandbox.name: '../x' is not a valid")


# -- alerts ------------------------------------------------------------------------------------
def test_alerts_are_off_by_default_and_need_a_chat_id_once_enabled(tmp_path):
    settings = load(tmp_path)
    assert settings["alerts.enabled"] is False and settings["alerts.chat_id"] == ""
    assert "nightguard.alerts.chat_id: is required when alerts.enabled is true" in \
        config_error(tmp_path, {"NIGHTGUARD_ALERTS_ENABLED": "true"})
    write_yaml(tmp_path, """\
        nightguard:
          alerts:
            enabled: true
            chat_id: -1001234567890
            crash_loop: {restarts: 4}
    """)
    settings = load(tmp_path)
    assert settings["alerts.chat_id"] == "-1001234567890"  # YAML's number, kept as text
    assert settings["alerts.crash_loop.restarts"] == 4
    assert settings["alerts.crash_loop.minutes"] == 10
    assert settings.source("alerts.chat_id") == "invoke.yaml"


@pytest.mark.parametrize(("env", "expected"), [
    ({"NIGHTGUARD_ALERTS_CHAT_ID": "owner"}, "alerts.chat_id: 'owner' is not a Telegram chat"),
    ({"NIGHTGUARD_ALERTS_INTERVAL": "30"}, "alerts.interval: '30' is not a duration"),
    ({"NIGHTGUARD_ALERTS_INTERVAL": "5s"}, "alerts.interval: must be between 10s and 1h"),
    ({"NIGHTGUARD_ALERTS_PING_EVERY": "10s"}, "alerts.ping_every: 10s is shorter than"),
    ({"NIGHTGUARD_ALERTS_API_BASE": "ftp://api.telegram.org"}, "alerts.api_base: 'ftp://"),
    ({"NIGHTGUARD_ALERTS_API_BASE": "https://user:pw@api.telegram.org"}, "without credentials"),
    ({"NIGHTGUARD_ALERTS_PING_URL": "https://hc-ping.com/x?y=1"}, "alerts.ping_url: "),
    ({"NIGHTGUARD_ALERTS_TOKEN_SECRET": "gemini", "NIGHTGUARD_ALERTS_ENABLED": "1",
      "NIGHTGUARD_ALERTS_CHAT_ID": "42"}, "alerts.token_secret: 'gemini' is not one"),
    ({"NIGHTGUARD_ALERTS_CRASH_LOOP_RESTARTS": "0"}, "crash_loop.restarts: must be at least"),
    ({"NIGHTGUARD_ALERTS_RATE_LIMIT_MESSAGES": "0"}, "rate_limit.messages: must be at least"),
    ({"NIGHTGUARD_ALERTS_SWAP_PERCENT": "101"}, "alerts.swap_percent: must be between 0"),
    ({"NIGHTGUARD_ALERTS_DISK_FREE_MB": "-1"}, "alerts.disk_free_mb: must be 0 or more"),
    ({"NIGHTGUARD_ALERTS_ENABLED": "sometimes"}, "alerts.enabled: 'sometimes' is not true"),
])
def test_bad_alert_settings_are_one_line_naming_the_key(tmp_path, env, expected):
    message = config_error(tmp_path, env)
    assert expected in message
    assert message.startswith("environment (NIGHTGUARD_ALERTS_")


def test_alert_urls_that_are_fine(tmp_path):
    settings = load(tmp_path, {"NIGHTGUARD_ALERTS_PING_URL":
                               "https://hc-ping.com/0f6b5b2e-8a1c-4b7e-9d1e-2f0c6a7b8c9d",
                               "NIGHTGUARD_ALERTS_API_BASE": "http://10.0.2.2:8081"})
    assert settings["alerts.ping_url"].endswith("8c9d")


def test_the_watchdog_is_on_by_default_and_off_turns_it_off():
    from tasks.deploy.plan import watchdog_seconds

    assert watchdog_seconds(load_settings(environ={})) == 30
    assert watchdog_seconds(load_settings(environ={"NIGHTGUARD_HEALTH_WATCHDOG": "off"})) == 0
    assert watchdog_seconds(load_settings(environ={"NIGHTGUARD_HEALTH_WATCHDOG": "1m"})) == 60
