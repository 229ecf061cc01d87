"""Where each secret's value comes from: the entries of ``nightguard.secrets``, parsed.

Config key ``nightguard.secrets`` maps a Podman secret name to its source::

    telegram_bot_token: TELEGRAM_BOT_TOKEN                           # a key of .env
    gemini_api_key: {command: "op read op://night-guard/gemini/key"}  # a command's stdout
    other_key: {gcp: "projects/P/secrets/S"}                         # Google Secret Manager

A ``command`` is split like a shell would split it (``shlex``) and run without a shell; a
list is taken as the argv itself. ``gcp`` names a secret (its latest version) or one
version (``.../versions/N``). ``timeout`` (command and gcp) bounds the read (default 30s).
Pure: nothing here reads a value; ``tasks.deploy.secretstore`` does.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from .units import CONTROL, ENV_KEY, parse_duration

KINDS = ("env", "command", "gcp")
DEFAULT_TIMEOUT = 30.0
_GCP_NAME = re.compile(r"^projects/([a-z0-9.:-]{1,100})/secrets/([A-Za-z0-9_-]{1,255})"
                       r"(?:/versions/([1-9][0-9]{0,18}|latest))?$")
USAGE = "a .env key, {command: ...} or {gcp: projects/P/secrets/S}"


@dataclass(frozen=True)
class SecretSource:
    """One secret's source. ``ref``: the .env key, the command as written, or the Secret
    Manager version's full name; ``argv``: the command's argv."""

    name: str
    kind: str
    ref: str
    argv: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT

    def describe(self) -> str:
        """Where the value comes from, in words (never the value)."""
        if self.kind == "env":
            return f".env {self.ref}"
        if self.kind == "command":
            return f"command: {self.ref}"
        return f"Google Secret Manager {self.ref}"

    @property
    def project(self) -> str:
        match = _GCP_NAME.match(self.ref)
        return match.group(1) if match else ""


def coerce(raw) -> dict:
    """The setting's value as read from a file, a JSON variable or a flag: name -> a string
    or a mapping of strings (a command may be a list)."""
    if not isinstance(raw, Mapping):
        raise ValueError("expected a mapping")
    out: dict = {}
    for name, entry in raw.items():
        if isinstance(entry, Mapping):
            out[str(name)] = {str(k): (list(map(str, v)) if isinstance(v, list) else
                                       ("" if v is None else str(v)))
                              for k, v in entry.items()}
        else:
            out[str(name)] = "" if entry is None else str(entry)
    return out


def _seconds(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise ValueError(f"timeout {exc}") from None
    if not 0 < seconds <= 600:
        raise ValueError(f"timeout {text!r} must be above 0 and at most 10m")
    return seconds


def _command_argv(value) -> tuple[str, tuple[str, ...]]:
    if isinstance(value, list):
        argv = tuple(value)
        text = shlex.join(argv)
    else:
        text = value.strip()
        try:
            argv = tuple(shlex.split(text))
        except ValueError as exc:  # an unclosed quote
            raise ValueError(f"command {text!r} cannot be split into words ({exc})") from None
    if not argv or not argv[0]:
        raise ValueError("command is empty")
    if any(CONTROL.search(word) for word in argv):
        raise ValueError("command contains a control character (a newline, a tab...)")
    return text, argv


def parse_source(name: str, entry) -> SecretSource:
    """One entry of ``nightguard.secrets``; ``ValueError`` with a one-line reason."""
    if isinstance(entry, str):
        if not ENV_KEY.match(entry):
            raise ValueError(f"{name}: {entry!r} is not a valid .env key (or use {USAGE})")
        return SecretSource(name, "env", entry)
    if not isinstance(entry, Mapping):
        raise ValueError(f"{name}: expected {USAGE}")
    kinds = [k for k in entry if k != "timeout"]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"{name}: unknown source kind {unknown[0]!r} (use {USAGE})")
    if len(kinds) != 1:
        raise ValueError(f"{name}: name one source, not {len(kinds)} (use {USAGE})")
    kind = kinds[0]
    value = entry[kind]
    try:
        timeout = _seconds(entry["timeout"]) if "timeout" in entry else DEFAULT_TIMEOUT
        if kind == "command":
            text, argv = _command_argv(value)
            return SecretSource(name, "command", text, argv, timeout)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    if kind == "env":
        if not isinstance(value, str):
            raise ValueError(f"{name}: env: expected a .env key")
        return parse_source(name, value)
    if not isinstance(value, str) or not _GCP_NAME.match(value.strip()):
        raise ValueError(f"{name}: gcp: {value!r} is not projects/PROJECT/secrets/NAME "
                         "(optionally /versions/N or /versions/latest)")
    ref = value.strip()
    if "/versions/" not in ref:
        ref += "/versions/latest"
    return SecretSource(name, "gcp", ref, timeout=timeout)


def parse_sources(secrets: Mapping) -> dict[str, SecretSource]:
    """Every entry, in order; the first bad one raises ``ValueError``."""
    return {name: parse_source(name, entry) for name, entry in secrets.items()}


def env_keys(secrets: Mapping) -> dict[str, str]:
    """Secret name -> .env key, for the entries that name one (all others are skipped)."""
    out = {}
    for name, entry in secrets.items():
        try:
            source = parse_source(name, entry)
        except ValueError:
            continue
        if source.kind == "env":
            out[name] = source.ref
    return out
