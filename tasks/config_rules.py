"""The rules every setting must pass, and the units they are written in.

``validate`` checks every value that can be checked without a host and raises
``ConfigError`` with one line naming the key and where it came from (``Settings.source``).
``parse_size``/``parse_duration`` read the units Podman's flags take. Imported by
``tasks.config``, which loads the settings; nothing here reads a file or the environment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import secret_spec
from .errors import ConfigError
from .units import CONTROL, ENV_KEY, parse_duration, parse_size

if TYPE_CHECKING:
    from .config import Settings

TARGETS = ("sandbox", "ssh", "gcp")
NETWORKS = ("auto", "slirp4netns", "pasta", "bridge", "host")
SANDBOX_BASE_IMAGE = "localhost/nightguard-base:latest"
SANDBOX_BASE_ARCHIVE = "/var/lib/nightguard-sandbox/base.tar"
SANDBOX_OS = ("bookworm", "trixie", "bookworm-cloud")
_SECRET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# Podman's grammar for names; nothing else may reach a unit file or an argv.
_CONTAINER_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_NAME = re.compile(rf"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*$")
_IMAGE_REF = re.compile(rf"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
                        r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")
_HOST_PATH = re.compile(r"^(/[A-Za-z0-9._@+-]+)+/?$")  # no spaces, ':' or ',' (volume syntax)
_SANDBOX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # a directory name
_CHAT_ID = re.compile(r"^(-?[0-9]{1,20}|@[A-Za-z][A-Za-z0-9_]{3,62})$")
# http(s), a host (and port), a path: no credentials, query or fragment (the bot token is
# added to the path when a message is sent)
_URL = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%!$&'()*+,;=:@/-]*)?$")
_HOUR = re.compile(r"^([01][0-9]|2[0-3]):00$")  # a snapshot schedule starts on the hour




MAPPING_KEYS = {("secrets",), ("agent_env",)}  # settings whose value is a whole mapping



def validate(settings: Settings) -> None:
    """Check every value that can be checked without a host; one line per problem."""

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{settings.source(key)}: nightguard.{key}: {why}")

    for part in (_validate_choices, _validate_limits, _validate_durations_and_counts,
                 _validate_paths_and_names, _validate_target, _validate_env_and_secrets,
                 _validate_alerts, _validate_snapshots):
        part(settings, fail)


def _validate_choices(settings: Settings, fail) -> None:
    if settings["target"] not in TARGETS:
        fail("target", f"{settings['target']!r} is not one of {', '.join(TARGETS)}")
    if settings["network"] not in NETWORKS:
        fail("network", f"{settings['network']!r} is not one of {', '.join(NETWORKS)}")
    if settings["sandbox.os"] not in SANDBOX_OS:
        fail("sandbox.os", f"{settings['sandbox.os']!r} is not one of {', '.join(SANDBOX_OS)}")
    if not _SANDBOX_NAME.match(settings["sandbox.name"]):
        fail("sandbox.name", f"{settings['sandbox.name']!r} is not a valid name (letters, "
             "digits, _ . -; starting with a letter or digit)")


def _validate_limits(settings: Settings, fail) -> None:
    sizes = {}
    for key in ("limits.memory", "limits.memory_reservation", "limits.memory_swap",
                "limits.swap_size"):
        try:
            sizes[key] = parse_size(settings[key])
        except ValueError as exc:
            fail(key, str(exc))
    if sizes["limits.memory"] < 6 * 1024**2:
        fail("limits.memory", "below Podman's minimum of 6m")
    if sizes["limits.memory_reservation"] > sizes["limits.memory"]:
        fail("limits.memory_reservation",
             f"{settings['limits.memory_reservation']} is above limits.memory "
             f"{settings['limits.memory']}")
    if sizes["limits.memory_swap"] < sizes["limits.memory"]:
        fail("limits.memory_swap",
             f"{settings['limits.memory_swap']} (RAM+swap) is below limits.memory "
             f"{settings['limits.memory']}")
    if not 0 < settings["limits.cpus"] <= 64:
        fail("limits.cpus", f"{settings['limits.cpus']} is not between 0 and 64")
    if not 0 <= settings["limits.swappiness"] <= 100:
        fail("limits.swappiness", "must be between 0 and 100")


def _validate_durations_and_counts(settings: Settings, fail) -> None:
    for key in ("health.interval", "health.timeout", "health.start_period",
                "host.apt_wait", "ssh.login_wait"):
        try:
            parse_duration(settings[key])
        except ValueError as exc:
            fail(key, str(exc))
    watchdog = str(settings["health.watchdog"]).strip()
    if watchdog != "off":
        try:
            seconds = parse_duration(watchdog)
        except ValueError as exc:
            fail("health.watchdog", f"{exc}, or off")
        if seconds != int(seconds) or not 2 <= seconds <= 3600:
            fail("health.watchdog", f"{watchdog}: whole seconds from 2s to 1h, or off")
    for key in ("health.retries", "health.heartbeat_max_age", "health.deadline",
                "ssh.port", "ssh.connect_timeout", "ssh.command_timeout", "keep_images",
                "data.keep"):
        if settings[key] < 1:
            fail(key, "must be at least 1")
    for key in _string_keys(settings.values):
        if CONTROL.search(str(settings[key])):
            fail(key, "contains a control character (a newline, a tab...)")


def _validate_paths_and_names(settings: Settings, fail) -> None:
    archive = settings["base_image_archive"]
    if archive and (not _HOST_PATH.match(archive) or "/../" in archive):
        fail("base_image_archive", f"{archive!r} is not a plain absolute path")
    for key in ("app_dir", "data_dir"):
        path = settings[key]
        if not _HOST_PATH.match(path) or "/../" in path + "/" or "/./" in path + "/":
            fail(key, f"{path!r} is not a plain absolute path (letters, digits, . _ - @ +)")
        if path.rstrip("/") in ("", "/etc", "/usr", "/var", "/root", "/home", "/boot"):
            fail(key, f"{path!r} is a system directory")
    if settings["app_dir"].rstrip("/") == settings["data_dir"].rstrip("/") or \
            settings["data_dir"].startswith(settings["app_dir"].rstrip("/") + "/") or \
            settings["app_dir"].startswith(settings["data_dir"].rstrip("/") + "/"):
        fail("data_dir", "must be apart from app_dir (the agent writes one, reads the other)")
    if not _CONTAINER_NAME.match(settings["container_name"]):
        fail("container_name", f"{settings['container_name']!r} is not a valid container "
             "name (letters, digits, _ . -; starting with a letter or digit)")
    if not _IMAGE_NAME.match(settings["image_name"]):
        fail("image_name", f"{settings['image_name']!r} is not a valid image name without "
             "a tag (e.g. localhost/nightguard)")
    if not _IMAGE_REF.match(settings["base_image"]):
        fail("base_image", f"{settings['base_image']!r} is not a valid image reference")


def _validate_target(settings: Settings, fail) -> None:
    for key in ("sync.include", "sync.exclude", "sync.allow"):
        for item in settings[key]:
            if CONTROL.search(item):
                fail(key, "an entry contains a control character")
            if not item or item.startswith("/") or ".." in item.split("/"):
                fail(key, f"{item!r} must be a relative path inside source_dir")
    if not settings["sync.include"]:
        fail("sync.include", "lists nothing to sync")
    if settings["target"] == "ssh" and not settings["ssh.host"]:
        fail("ssh.host", "is required when target is ssh (give --host HOST or set "
             "nightguard.ssh.host)")
    if settings["target"] == "gcp" and not settings["gcp.project"]:
        fail("gcp.project", "is required when target is gcp")


def _validate_env_and_secrets(settings: Settings, fail) -> None:
    for name, value in settings["agent_env"].items():
        if not ENV_KEY.match(name) or name.startswith(("NG_RELEASE_", "NG_DATA_DIR")):
            fail("agent_env", f"{name!r} is not a name the agent may be given")
        if CONTROL.search(value):
            fail("agent_env", f"{name}: the value contains a control character")
    if not settings["secrets"]:
        fail("secrets", "at least one secret is required")
    for name, entry in settings["secrets"].items():
        if not _SECRET_NAME.match(name):
            fail("secrets", f"{name!r} is not a valid secret name (lower case, digits, _)")
        try:
            secret_spec.parse_source(name, entry)
        except ValueError as exc:
            fail("secrets", str(exc))


def _validate_alerts(settings: Settings, fail) -> None:
    """``alerts.*``: checked whether enabled or not (a typo should not wait for the day
    alerts are switched on); the chat id only matters once they are."""
    durations = {}
    for key in ("alerts.interval", "alerts.ping_every"):
        try:
            durations[key] = parse_duration(settings[key])
        except ValueError as exc:
            fail(key, str(exc))
    if not 10 <= durations["alerts.interval"] <= 3600:
        fail("alerts.interval", "must be between 10s and 1h")
    if durations["alerts.ping_every"] < durations["alerts.interval"]:
        fail("alerts.ping_every", f"{settings['alerts.ping_every']} is shorter than "
             f"alerts.interval {settings['alerts.interval']}")
    for key in ("alerts.api_base", "alerts.ping_url"):
        value = settings[key]
        if (value or key == "alerts.api_base") and not _URL.match(value):
            fail(key, f"{value!r} is not an http(s) URL without credentials, query or "
                 "fragment")
    if settings["alerts.enabled"] and settings["alerts.token_secret"] not in settings["secrets"]:
        fail("alerts.token_secret", f"{settings['alerts.token_secret']!r} is not one of "
             f"nightguard.secrets ({', '.join(settings['secrets'])})")
    for key in ("alerts.crash_loop.restarts", "alerts.crash_loop.minutes",
                "alerts.rate_limit.messages", "alerts.rate_limit.minutes"):
        if settings[key] < 1:
            fail(key, "must be at least 1")
    if not 0 <= settings["alerts.swap_percent"] <= 100:
        fail("alerts.swap_percent", "must be between 0 and 100 (0: no swap alert)")
    if settings["alerts.disk_free_mb"] < 0:
        fail("alerts.disk_free_mb", "must be 0 or more (0: no disk alert)")
    chat = settings["alerts.chat_id"]
    if chat and not _CHAT_ID.match(chat):
        fail("alerts.chat_id", f"{chat!r} is not a Telegram chat id (a number, or @channel)")
    if settings["alerts.enabled"] and not chat:
        fail("alerts.chat_id", "is required when alerts.enabled is true (the owner's chat "
             "id: send the bot a message, then read it from getUpdates)")


def _validate_snapshots(settings: Settings, fail) -> None:
    if not 1 <= settings["gcp.snapshots.keep_days"] <= 365:
        fail("gcp.snapshots.keep_days", "must be between 1 and 365")
    start = settings["gcp.snapshots.start_time"]
    if not _HOUR.match(start):
        fail("gcp.snapshots.start_time", f"{start!r} is not a whole hour in UTC (HH:00, e.g. "
             "03:00): the Compute API starts snapshot schedules on the hour")


def _string_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and (key,) not in MAPPING_KEYS:
            keys += _string_keys(value, dotted + ".")
        elif isinstance(value, str):
            keys.append(dotted)
    return keys
