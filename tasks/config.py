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
(Invoke would merge the two). Secret values never live here: ``secrets`` says where each
comes from (``tasks.secret_spec``; read by ``tasks.deploy.secretstore``). Every bad value
(the rules: ``tasks.config_rules``), and every unknown key in any layer, raises
``ConfigError`` with one line naming the key and where it came from, before anything
connects to a host.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# re-exported: callers import these from here
from . import secret_spec
from .config_rules import (  # noqa: F401
    _IMAGE_NAME,
    MAPPING_KEYS,
    SANDBOX_BASE_ARCHIVE,
    SANDBOX_BASE_IMAGE,
    parse_duration,
    parse_size,
    validate,
)
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
        # Secret Manager's address for {gcp: ...} secrets ("": Google's; http://: a fake)
        "secrets_endpoint": "",
        # a daily snapshot of the boot disk (the agent's /data lives only there): a schedule
        # `vm.create` attaches. start_time is UTC and on the hour, as the API requires.
        "snapshots": {"enabled": True, "keep_days": 7, "start_time": "03:00"},
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
    # keyed hashes of values read from a command or Secret Manager (never a value), so that
    # tasks which do not read the store still mask them (tasks/deploy/fingerprints.py)
    "fingerprints_file": ".nightguard/secret-fingerprints.json",
    # `inv vm.move`'s journal: each step recorded before and after, so a cut move is
    # finished (or undone) by the next run
    "move_journal": ".nightguard/move.json",
    "keep_images": 3,
    # `inv data.backup`: where the backups go (relative: to the project) and how many of a
    # host's are kept there; backup_before_deploy: a backup there before every deploy that
    # builds or pulls an image (a deploy that changes nothing costs nothing more)
    "data": {"keep": 7, "out": "backups", "backup_before_deploy": False},
    "limits": {
        "memory": "700m",
        "memory_reservation": "500m",
        "memory_swap": "2700m",
        "cpus": 1.0,
        "swap_size": "2g",
        "swappiness": 10,
    },
    "health": {
        # liveness: the container's PID 1 kills a hung or deaf agent (heartbeat older than
        # heartbeat_max_age s) and feeds systemd's watchdog, which restarts a container
        # frozen as a whole after this long ("off": the health check alone)
        "watchdog": "30s",
        "heartbeat_max_age": 15,
        # the full health check (secrets, dirs, memory, disk, and the heartbeat again):
        # liveness is the supervisor's, so this can be slow - 6 short processes an hour
        "interval": "10m",
        "timeout": "10s",
        "retries": 2,
        "start_period": "60s",
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
        # a pass after each start of the agent, and one this often (a systemd timer)
        "interval": "10m",
        "ping_url": "",  # a dead-man switch (healthchecks.io style), optional
        "ping_every": "10m",
        "crash_loop": {"restarts": 3, "minutes": 10},
        "swap_percent": 80,  # host swap used above this: an alert (0: never)
        "disk_free_mb": 1024,  # host disk free below this: an alert (0: never)
        "rate_limit": {"messages": 10, "minutes": 60},
    },
    # `inv kube.export`: the image a cluster pulls (a registry's name, without a tag)
    "kube": {"image": ""},
    # Podman secret name -> where its value comes from: a key in .env, {command: ...} or
    # {gcp: projects/P/secrets/S} (see tasks/secret_spec.py)
    "secrets": {
        "telegram_bot_token": "TELEGRAM_BOT_TOKEN",
        "gemini_api_key": "GEMINI_API_KEY",
    },
}


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
            if key == "secrets":
                return secret_spec.coerce(raw)
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


def redacted_tree(settings: Settings) -> dict[str, Any]:
    """The effective configuration, safe to print (it never holds secret values)."""
    return copy.deepcopy(settings.values)
