"""Typed settings for every task, with the source of each value kept for error messages.

Layers, in rising precedence (Invoke's own order; ``tasks.invoke_config`` finds the files):
  1. defaults (``DEFAULTS`` below; also the root collection's Invoke configuration, so
     ``c.config.nightguard`` has every key)
  2. the ``nightguard:`` section of Invoke's config files: system ``/etc/invoke.yaml``,
     user ``~/.invoke.yaml``, then the project's ``invoke.yaml`` (checked in, no secrets)
  3. environment variables ``INVOKE_NIGHTGUARD_<PATH>`` (Invoke's names) or the shorter
     alias ``NIGHTGUARD_<PATH>``, e.g. ``NIGHTGUARD_SSH_HOST``, ``NIGHTGUARD_LIMITS_MEMORY``
     (the key path joined by ``_``, upper case; both set and different is an error). Read
     with the rules below, not Invoke's casts: ``false`` is false, a list is comma-separated,
     a mapping is a JSON object.
  4. the runtime file ``inv -f FILE`` (or ``INVOKE_RUNTIME_CONFIG``)
  5. command-line flags of the task being run

A mapping setting (``secrets``, ``agent_env``) given in a layer replaces the one below it
(Invoke would merge the two). Secret values never live here: they come from ``.env`` (see
``tasks.deploy.envfile``). Every bad value, and every unknown key in any layer, raises
``ConfigError`` with one line naming the key and where it came from, before anything
connects to a host.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def project_root(cwd: Path | None = None, checkout: Path | None = None) -> Path:
    """The project the tasks act on: this checkout (the package beside tasks.py); for an
    installed copy (the `nightguard` command), the nearest folder from the current one up
    that holds an invoke.yaml or a tasks.py, else the current folder."""
    checkout = checkout or Path(__file__).resolve().parents[1]
    if (checkout / "tasks.py").is_file():
        return checkout
    cwd = (cwd or Path.cwd()).resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / "invoke.yaml").is_file() or (folder / "tasks.py").is_file():
            return folder
    return cwd


PROJECT_ROOT = project_root()
CONFIG_FILE_NAME = "invoke.yaml"
ENV_PREFIX = "NIGHTGUARD_"
INVOKE_ENV_PREFIX = "INVOKE_"  # Invoke's prefix: INVOKE_NIGHTGUARD_SSH_HOST
FILE_LEVELS = ("system", "user", "project", "runtime")  # Invoke's config files, lowest first

DEFAULTS: dict[str, Any] = {
    "target": "sandbox",  # sandbox | ssh | gcp
    "sandbox": {"name": "default", "os": "bookworm"},
    "ssh": {
        "host": "",
        "port": 22,
        "user": "ubuntu",
        "key_filename": "",
        "known_hosts": ".ssh/known_hosts",
        "connect_timeout": 15,
        "command_timeout": 600,
        # a VM created minutes ago refuses logins until its guest agent has made the user
        # and written the key: retry authentication this long (0s: never)
        "login_wait": "5m",
    },
    "gcp": {
        "project": "",
        "zone": "us-west1-b",
        "instance": "nightguard",
        "machine_type": "e2-micro",
        # Debian 12: what every lab VM boots (README: "Which image"); Ubuntu 24.04 is
        # ubuntu-os-cloud / ubuntu-2404-lts-amd64
        "image_project": "debian-cloud",
        "image_family": "debian-12",
        "disk_gb": 30,
        "disk_type": "pd-standard",
        "network_tag": "nightguard",
        "credentials_file": "",
        "api_endpoint": "",
    },
    # a new VM's startup script, apt-daily or unattended-upgrades may hold apt's and dpkg's
    # locks: wait this long for them before the deploy installs anything (never kills them)
    "host": {"apt_wait": "15m"},
    "app_dir": "/home/ubuntu/97layerOS",  # the agent's code, mounted read-only at /app
    "data_dir": "/home/ubuntu/97layerOS-data",  # the agent's only writable dir, at /data
    "source_dir": ".",
    # what travels to app_dir: declared, not guessed (see tasks/deploy/sync.py)
    "sync": {
        "include": ["execution", "directives", "knowledge", "deployment"],
        "exclude": [],
        "allow": [],
    },
    "container_name": "97layer-nightguard",
    "image_name": "localhost/nightguard",
    "base_image": "docker.io/library/python:3.11-slim",
    # an archive on the host to import base_image from when its storage lacks it (for hosts
    # that reach no registry, like the sandbox; `podman import`)
    "base_image_archive": "",
    "agent_command": "",
    # extra environment for the agent (name -> value); NOT for secrets, which go in .env and
    # reach the agent as files: these values show in `podman inspect`
    "agent_env": {},
    "rootless": False,
    # the agent's network: auto = slirp4netns on Podman 4, pasta on Podman 5 (user-mode
    # stacks: no iptables rules per start, no way to the host's loopback); or bridge, host
    "network": "auto",
    "compose_file": "deployment/podman-compose.nightguard.yml",
    "env_file": ".env",
    "keep_images": 3,
    "limits": {
        "memory": "700m",
        "memory_reservation": "500m",
        "memory_swap": "2700m",
        "cpus": 1.0,
        "swap_size": "2g",
        "swappiness": 10,
    },
    "health": {
        "interval": "30s",
        "timeout": "10s",
        "retries": 3,
        "start_period": "60s",
        "heartbeat_max_age": 30,
        "deadline": 240,
    },
    # messages to the owner from a watcher on the host (see tasks/deploy/alerts.py); off
    # until enabled with a chat id. The bot's token is the one the agent uses (token_secret,
    # read on the host when a message goes out), so it is never configured here.
    "alerts": {
        "enabled": False,
        "chat_id": "",  # the owner's chat: a number (negative for groups) or @channel
        "api_base": "https://api.telegram.org",
        "token_secret": "telegram_bot_token",
        "interval": "30s",  # one watch pass this often (a systemd timer)
        "ping_url": "",  # a dead-man switch (healthchecks.io style), optional
        "ping_every": "5m",
        "crash_loop": {"restarts": 3, "minutes": 10},
        "swap_percent": 80,  # host swap used above this: an alert (0: never)
        "disk_free_mb": 1024,  # host disk free below this: an alert (0: never)
        "rate_limit": {"messages": 10, "minutes": 60},
    },
    # `inv kube.export`: the image a cluster pulls (a registry's name, without a tag)
    "kube": {"image": ""},
    # Podman secret name -> key in .env
    "secrets": {
        "telegram_bot_token": "TELEGRAM_BOT_TOKEN",
        "gemini_api_key": "GEMINI_API_KEY",
    },
}

TARGETS = ("sandbox", "ssh", "gcp")
NETWORKS = ("auto", "slirp4netns", "pasta", "bridge", "host")
SANDBOX_BASE_IMAGE = "localhost/nightguard-base:latest"
SANDBOX_BASE_ARCHIVE = "/var/lib/nightguard-sandbox/base.tar"
SANDBOX_OS = ("bookworm", "trixie", "bookworm-cloud")
_SIZE = re.compile(r"^(\d+)([bkmg]?)$", re.IGNORECASE)
_DURATION = re.compile(r"^(\d+)(ms|s|m|h)$")
_SECRET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# Podman's grammar for names; nothing else may reach a unit file or an argv.
_CONTAINER_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_NAME = re.compile(rf"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*$")
_IMAGE_REF = re.compile(rf"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
                        r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")
_HOST_PATH = re.compile(r"^(/[A-Za-z0-9._@+-]+)+/?$")  # no spaces, ':' or ',' (volume syntax)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SANDBOX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # a directory name
_CHAT_ID = re.compile(r"^(-?[0-9]{1,20}|@[A-Za-z][A-Za-z0-9_]{3,62})$")
# http(s), a host (and port), a path: no credentials, query or fragment (the bot token is
# added to the path when a message is sent)
_URL = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%!$&'()*+,;=:@/-]*)?$")
_UNIT = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str | int) -> int:
    """'700m' -> bytes; the suffixes Podman accepts (b, k, m, g). Raises ValueError."""
    match = _SIZE.match(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a size (use e.g. 700m or 2g)")
    return int(match.group(1)) * _UNIT[match.group(2).lower()]


def parse_duration(text: str) -> float:
    """'30s' / '5m' / '500ms' -> seconds, the forms Podman's --health-* flags take."""
    match = _DURATION.match(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration (use e.g. 30s or 5m)")
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    return int(match.group(1)) * factor


MAPPING_KEYS = {("secrets",), ("agent_env",)}  # settings whose value is a whole mapping


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple, Any]:
    flat: dict[tuple, Any] = {}
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, Mapping) and path not in MAPPING_KEYS:
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def env_var_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "_".join(path).upper()


KNOWN_KEYS = _flatten(DEFAULTS)
ENV_NAMES = {env_var_name(path): path for path in KNOWN_KEYS}
SECTIONS = {path[:i] for path in KNOWN_KEYS for i in range(1, len(path))}  # ("limits",), ...


def _coerce(raw: Any, default: Any, where: str, key: str) -> Any:
    """Bring a value from a file, the environment or a flag to the default's type."""
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            lowered = str(raw).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{raw!r} is not true or false")
        if isinstance(default, int):
            return int(str(raw).strip())
        if isinstance(default, float):
            return float(str(raw).strip())
        if isinstance(default, dict):
            if isinstance(raw, str):  # from the environment: a JSON object
                try:
                    raw = json.loads(raw) if raw.strip() else {}
                except ValueError:
                    raise ValueError('expected a JSON object, e.g. {"KEY": "value"}') from None
            if not isinstance(raw, Mapping):
                raise ValueError("expected a mapping")
            return {str(k): str(v) for k, v in raw.items()}
        if isinstance(default, list):
            if isinstance(raw, str):  # from the environment: comma-separated
                raw = [part.strip() for part in raw.split(",") if part.strip()]
            if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
                raise ValueError("expected a list of strings")
            return list(raw)
        return "" if raw is None else str(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: nightguard.{key}: {exc}") from None


@dataclass(frozen=True)
class Settings:
    """The effective configuration. ``values`` holds the merged tree, ``sources`` where
    each leaf came from (for error messages and ``inv config``)."""

    values: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    root: Path = PROJECT_ROOT
    files: tuple[str, ...] = ()  # the config files read, lowest first (as sources name them)

    def __getitem__(self, dotted: str) -> Any:
        node: Any = self.values
        for part in dotted.split("."):
            node = node[part]
        return node

    def get(self, dotted: str, default: Any = None) -> Any:
        try:
            return self[dotted]
        except KeyError:
            return default

    def source(self, dotted: str) -> str:
        return self.sources.get(dotted, "defaults")

    def path(self, dotted: str) -> Path:
        """A path setting resolved against the project root."""
        value = Path(os.path.expanduser(self[dotted]))
        return value if value.is_absolute() else self.root / value

    def size(self, dotted: str) -> int:
        return parse_size(self[dotted])

    @property
    def secret_names(self) -> list[str]:
        return list(self["secrets"])


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


@dataclass(frozen=True)
class ConfigFile:
    """One config file's part in the settings: its Invoke level (``FILE_LEVELS``), the name
    sources and errors give it, and what it holds under ``nightguard:``."""

    level: str
    label: str
    section: Any


def nightguard_section(document: Any, label: str) -> dict[str, Any]:
    """The ``nightguard:`` mapping of a parsed config file ({} if it has none)."""
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise ConfigError(f"{label}: expected a mapping at the top level")
    section = document.get("nightguard", {}) or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{label}: nightguard: expected a mapping")
    return dict(section)


def read_config_file(path: Path, label: str | None = None) -> dict[str, Any]:
    """The ``nightguard:`` section of a YAML config file ({} if the file is absent)."""
    label = label or path.name
    if not path.exists():
        return {}
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise syntax_error(exc, label, "YAML") from None
    return nightguard_section(document, label)


def syntax_error(exc: Exception, label: str, kind: str) -> ConfigError:
    """A file YAML or JSON cannot read, with the parser's own reason, line and column:
    ``invoke.yaml: not valid YAML: line 3, column 9: mapping values are not allowed
    here``."""
    if isinstance(exc, UnicodeDecodeError):
        return ConfigError(f"{label}: not UTF-8 (byte {exc.start}); save the file as UTF-8")
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}"
    elif getattr(exc, "lineno", None):  # json.JSONDecodeError
        where = f"line {exc.lineno}, column {exc.colno}"
    else:
        where = ""
    reason = getattr(exc, "problem", None) or getattr(exc, "msg", None) or ""
    context = getattr(exc, "context", None)
    if context and getattr(exc, "problem", None):
        reason = f"{reason} ({context})"
    detail = ": ".join(part for part in (where, reason.strip()) if part)
    return ConfigError(f"{label}: not valid {kind}" + (f": {detail}" if detail else ""))


def did_you_mean(name: str, known, prefix: str = "") -> str:
    """' (did you mean PREFIX+X?)' when one of ``known`` is close to ``name`` (a typo, not
    a shared prefix: both are compared without ``prefix``), else ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.8)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def project_file(root: Path) -> ConfigFile:
    """The project's invoke.yaml, read directly (when no Invoke config says what it read)."""
    path = root / CONFIG_FILE_NAME
    return ConfigFile("project", CONFIG_FILE_NAME, read_config_file(path))


def environment_values(environ: Mapping[str, str]) -> dict[tuple[str, ...], tuple[str, str]]:
    """key path -> (variable, raw value) from INVOKE_NIGHTGUARD_* and NIGHTGUARD_*; an
    unknown name, or both names of a key with different values, is an error."""
    found: dict[tuple[str, ...], tuple[str, str]] = {}
    for name in sorted(environ):  # INVOKE_... sorts first: it names the source if both agree
        short = name[len(INVOKE_ENV_PREFIX):] if name.startswith(INVOKE_ENV_PREFIX + ENV_PREFIX) \
            else name
        if not short.startswith(ENV_PREFIX):
            continue
        if short not in ENV_NAMES:
            whole = next((p for p in MAPPING_KEYS if short.startswith(env_var_name(p) + "_")),
                         None)
            hint = f" (nightguard.{'.'.join(whole)} is one setting: a JSON object in " \
                f"{name[:len(name) - len(short)]}{env_var_name(whole)})" if whole else ""
            hint = hint or did_you_mean(short[len(ENV_PREFIX):],
                                        (known[len(ENV_PREFIX):] for known in ENV_NAMES),
                                        name[:len(name) - len(short)] + ENV_PREFIX)
            raise ConfigError(f"environment: unknown variable {name}{hint}")
        path = ENV_NAMES[short]
        if path in found and found[path][1] != environ[name]:
            raise ConfigError(f"environment: {found[path][0]} and {name} differ; set one of "
                              "them")
        found.setdefault(path, (name, environ[name]))
    return found


def load_settings(
    root: Path = PROJECT_ROOT,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    files: list[ConfigFile] | None = None,
) -> Settings:
    """Merge defaults, config files, INVOKE_NIGHTGUARD_* / NIGHTGUARD_* variables and flags;
    validate. ``files``: the config files Invoke read (``tasks.invoke_config``); without
    it, the project's invoke.yaml under ``root``."""
    environ = os.environ if environ is None else environ
    files = [project_file(root)] if files is None else files
    files = sorted(files, key=lambda f: FILE_LEVELS.index(f.level))
    values = copy.deepcopy(DEFAULTS)
    sources: dict[str, str] = {}

    def apply(path: tuple[str, ...], raw: Any, where: str) -> None:
        dotted = ".".join(path)
        if path in SECTIONS:
            raise ConfigError(f"{where}: nightguard.{dotted}: expected a mapping")
        if path not in KNOWN_KEYS:
            hint = did_you_mean(dotted, (".".join(p) for p in KNOWN_KEYS), "nightguard.")
            raise ConfigError(f"{where}: unknown key nightguard.{dotted}{hint}")
        _set(values, path, _coerce(raw, KNOWN_KEYS[path], where, dotted))
        sources[dotted] = where

    def apply_file(config_file: ConfigFile) -> None:
        section = config_file.section
        if section is None:
            return
        if not isinstance(section, Mapping):
            raise ConfigError(f"{config_file.label}: nightguard: expected a mapping")
        for path, raw in _flatten(section).items():
            apply(path, raw, config_file.label)

    for config_file in files:
        if config_file.level != "runtime":
            apply_file(config_file)
    for path, (name, raw) in environment_values(environ).items():
        apply(path, raw, f"environment ({name})")
    for config_file in files:
        if config_file.level == "runtime":
            apply_file(config_file)
    for dotted, raw in (overrides or {}).items():
        if raw is None:
            continue
        apply(tuple(dotted.split(".")), raw, "command line")

    if values["target"] == "sandbox" and "base_image" not in sources:
        # The sandbox cannot reach registries; it preloads this base image.
        values["base_image"] = SANDBOX_BASE_IMAGE
        sources["base_image"] = "sandbox default"
        if "base_image_archive" not in sources:
            values["base_image_archive"] = SANDBOX_BASE_ARCHIVE
            sources["base_image_archive"] = "sandbox default"
    settings = Settings(values=values, sources=sources, root=root,
                        files=tuple(f.label for f in files))
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    """Check every value that can be checked without a host; one line per problem."""

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{settings.source(key)}: nightguard.{key}: {why}")

    if settings["target"] not in TARGETS:
        fail("target", f"{settings['target']!r} is not one of {', '.join(TARGETS)}")
    if settings["network"] not in NETWORKS:
        fail("network", f"{settings['network']!r} is not one of {', '.join(NETWORKS)}")
    if settings["sandbox.os"] not in SANDBOX_OS:
        fail("sandbox.os", f"{settings['sandbox.os']!r} is not one of {', '.join(SANDBOX_OS)}")
    if not _SANDBOX_NAME.match(settings["sandbox.name"]):
        fail("sandbox.name", f"{settings['sandbox.name']!r} is not a valid name (letters, "
             "digits, _ . -; starting with a letter or digit)")
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
    for key in ("health.interval", "health.timeout", "health.start_period",
                "host.apt_wait", "ssh.login_wait"):
        try:
            parse_duration(settings[key])
        except ValueError as exc:
            fail(key, str(exc))
    for key in ("health.retries", "health.heartbeat_max_age", "health.deadline",
                "ssh.port", "ssh.connect_timeout", "ssh.command_timeout", "keep_images"):
        if settings[key] < 1:
            fail(key, "must be at least 1")
    for key in _string_keys(settings.values):
        if _CONTROL.search(str(settings[key])):
            fail(key, "contains a control character (a newline, a tab...)")
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
    for key in ("sync.include", "sync.exclude", "sync.allow"):
        for item in settings[key]:
            if _CONTROL.search(item):
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
    for name, value in settings["agent_env"].items():
        if not _ENV_KEY.match(name) or name.startswith(("NG_RELEASE_", "NG_DATA_DIR")):
            fail("agent_env", f"{name!r} is not a name the agent may be given")
        if _CONTROL.search(value):
            fail("agent_env", f"{name}: the value contains a control character")
    if not settings["secrets"]:
        fail("secrets", "at least one secret is required")
    for name, env_key in settings["secrets"].items():
        if not _SECRET_NAME.match(name):
            fail("secrets", f"{name!r} is not a valid secret name (lower case, digits, _)")
        if not _ENV_KEY.match(env_key):
            fail("secrets", f"{env_key!r} is not a valid .env key")
    _validate_alerts(settings, fail)


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


def _string_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and (key,) not in MAPPING_KEYS:
            keys += _string_keys(value, dotted + ".")
        elif isinstance(value, str):
            keys.append(dotted)
    return keys


def redacted_tree(settings: Settings) -> dict[str, Any]:
    """The effective configuration, safe to print (it never holds secret values)."""
    return copy.deepcopy(settings.values)
