"""Our settings through Invoke's configuration: the files Invoke read, each named as a source.

Invoke finds and loads the config files: system ``/etc/invoke.yaml``, user
``~/.invoke.yaml``, the project's ``invoke.yaml`` (next to tasks.py) and the runtime file
(``inv -f FILE`` or ``INVOKE_RUNTIME_CONFIG``); ``.yml``, ``.json`` and ``.py`` work too.
``config_files`` hands their ``nightguard:`` sections, as Invoke loaded them, to
``tasks.config.load_settings``, each with the label `inv config` shows and errors name:
``invoke.yaml``, ``~/.invoke.yaml (user)``, ``/etc/invoke.yaml (system)``,
``other.yaml (-f)``. The environment is read by ``tasks.config`` itself, from the same
``INVOKE_NIGHTGUARD_*`` names: Invoke's casts turn ``false`` into true and refuse lists.

Invoke dies with a traceback, before any task runs, on a file that is not YAML, on a
mapping where the defaults hold a value (or the reverse, ``nightguard:`` left empty
included) and on an ``INVOKE_`` variable it cannot cast (a list, a number that is not).
``refuse_what_invoke_cannot_merge`` looks for these while Invoke loads tasks.py, so they
end like every other configuration error: one line, exit 2. A missing ``-f`` file, which
Invoke skips in silence, is refused too.

Config keys: every ``nightguard.*`` key (``tasks.config.DEFAULTS``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .config import (
    CONFIG_FILE_NAME,
    DEFAULTS,
    ENV_NAMES,
    ENV_PREFIX,
    FILE_LEVELS,
    INVOKE_ENV_PREFIX,
    MAPPING_KEYS,
    PROJECT_ROOT,
    ConfigFile,
    nightguard_section,
    project_file,
    syntax_error,
)
from .errors import ConfigError

SUFFIXES = ("yaml", "yml", "json", "py")  # Invoke's order: the first one found is read
SYSTEM_PREFIX = "/etc/invoke"
USER_PREFIX = "~/.invoke"


def _home(path: str) -> str:
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if home != "~" and path.startswith(home + os.sep) else path


def label_for(level: str, path: str, environ: Mapping[str, str] | None = None) -> str:
    """How sources name a config file: invoke.yaml, ~/.invoke.yaml (user), ..."""
    environ = os.environ if environ is None else environ
    if level == "project":
        return Path(path).name
    if level == "runtime":
        given = "INVOKE_RUNTIME_CONFIG" if environ.get("INVOKE_RUNTIME_CONFIG") == path else "-f"
        return f"{path} ({given})"
    return f"{_home(path)} ({level})"


def config_files(config: Any, environ: Mapping[str, str] | None = None
                 ) -> tuple[Path, list[ConfigFile]]:
    """(project root, the files this Invoke ``Config`` read, lowest first). A Config that
    never looked for the project's file (a bare ``Context()``) gets the project's
    invoke.yaml read directly."""
    files: list[ConfigFile] = []
    root = PROJECT_ROOT
    prefix = getattr(config, "_project_prefix", None)
    if getattr(config, "_project_found", None) is not None and prefix:
        root = Path(prefix)
    for level in FILE_LEVELS:
        found = getattr(config, f"_{level}_found", None)
        path = getattr(config, f"_{level}_path", None)
        if level == "project" and found is None:
            files.append(project_file(root))
        elif level == "runtime" and path and found is not None and \
                not os.path.exists(os.path.expanduser(path)):  # Invoke skips it in silence
            raise ConfigError(f"{label_for(level, str(path), environ)}: no such file")
        elif found and os.path.exists(path):  # Invoke "finds" an absent .py (as {})
            label = label_for(level, str(path), environ)
            data = getattr(config, f"_{level}", None) or {}
            files.append(ConfigFile(level, label, nightguard_section(data, label)))
    return root, files


# -- before Invoke merges ------------------------------------------------------------------
def _parse(path: Path, label: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise syntax_error(exc, label, "JSON" if path.suffix == ".json" else "YAML") from None
    except OSError as exc:
        raise ConfigError(f"{label}: {exc.strerror or exc}") from None


def _first_found(prefix: str) -> Path | None:
    for suffix in SUFFIXES:
        path = Path(os.path.expanduser(f"{prefix}.{suffix}"))
        if path.is_file():
            return path
    return None


def running_runtime_path(environ: Mapping[str, str]) -> str | None:
    """The ``-f FILE`` of the running `inv` (Invoke reads that file only after loading
    tasks.py), else INVOKE_RUNTIME_CONFIG."""
    for module in ("invoke.main", "fabric.main"):
        program = getattr(sys.modules.get(module), "program", None)
        try:
            given = program.args.config.value
        except (AttributeError, KeyError, IndexError, TypeError):
            continue
        if given:
            return str(given)
    return environ.get("INVOKE_RUNTIME_CONFIG") or None


def _check_shape(section: Any, defaults: Mapping[str, Any], where: str, prefix: str) -> None:
    """A mapping where the defaults have one, a value where they have a value: Invoke's
    merge raises on anything else. Keys we do not know are left to load_settings."""
    if not isinstance(section, Mapping):
        what = "nothing" if section is None else repr(section)[:40]
        raise ConfigError(f"{where}: {prefix}: expected a mapping, not {what} (Invoke cannot "
                          "merge it with the defaults)")
    for key, value in section.items():
        if key not in defaults:
            continue
        dotted = f"{prefix}.{key}"
        if isinstance(defaults[key], dict):
            _check_shape(value, defaults[key], where, dotted)
        elif isinstance(value, Mapping):
            raise ConfigError(f"{where}: {dotted}: expected a value, not a mapping")


def _leaf(section: Any, path: tuple[str, ...]) -> tuple[bool, Any]:
    for part in path:
        if not isinstance(section, Mapping) or part not in section:
            return False, None
        section = section[part]
    return True, section


def refuse_what_invoke_cannot_merge(root: Path = PROJECT_ROOT,
                                    environ: Mapping[str, str] | None = None,
                                    runtime: str | None = None) -> None:
    """Raise ConfigError (one line) for whatever would make Invoke die with a traceback
    once it merges our defaults with the config files and the environment."""
    environ = os.environ if environ is None else environ
    located = [("system", _first_found(SYSTEM_PREFIX)), ("user", _first_found(USER_PREFIX)),
               ("project", _first_found(str(root / Path(CONFIG_FILE_NAME).stem)))]
    if runtime:
        if not Path(runtime).expanduser().is_file():
            raise ConfigError(f"{label_for('runtime', runtime, environ)}: no such file")
        located.append(("runtime", Path(runtime).expanduser()))
    sections = []
    for level, path in located:
        if path is None or path.suffix == ".py":  # Python files are Python's business
            continue
        label = label_for(level, runtime if level == "runtime" else str(path), environ)
        document = _parse(path, label)
        if isinstance(document, Mapping) and "nightguard" in document:
            _check_shape(document["nightguard"], DEFAULTS, label, "nightguard")
            sections.append(document["nightguard"])
    for name in sorted(environ):
        if not name.startswith(INVOKE_ENV_PREFIX + ENV_PREFIX):
            continue
        short = name[len(INVOKE_ENV_PREFIX):]
        path = ENV_NAMES.get(short)
        if path is None or path in MAPPING_KEYS:
            continue  # unknown: load_settings says so; a mapping: Invoke ignores the name
        # Invoke casts to the type of the value the files and defaults leave for the key
        found, current = False, DEFAULTS
        for part in path:
            current = current[part]
        for section in sections:
            there, value = _leaf(section, path)
            if there:
                found, current = True, value
        where = f"environment ({name}): nightguard.{'.'.join(path)}"
        if isinstance(current, list | tuple):
            raise ConfigError(f"{where}: Invoke cannot read a list from the environment; use "
                              f"{short}=a,b or a config file")
        if isinstance(current, int | float) and not isinstance(current, bool):
            try:
                type(current)(environ[name])
            except ValueError:
                kind = "an integer" if isinstance(current, int) else "a number"
                source = " (the type a config file gave it)" if found else ""
                raise ConfigError(f"{where}: {environ[name]!r} is not {kind}{source}") \
                    from None
