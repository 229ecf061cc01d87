"""Secret values from the local ``.env`` file (python-dotenv), and nowhere else.

Config keys: ``nightguard.env_file`` (default ``.env``) and ``nightguard.secrets`` (Podman
secret name -> .env key). The values are returned to the caller and never printed;
``SecretValues.redact`` masks them in any text that is about to be shown.
"""

from __future__ import annotations

import io
import stat
from dataclasses import dataclass
from pathlib import Path

from dotenv.parser import parse_stream

from tasks.config import Settings
from tasks.errors import ConfigError


@dataclass(frozen=True)
class SecretValues:
    """Podman secret name -> value. ``repr`` never shows a value."""

    values: dict[str, str]

    def __repr__(self) -> str:
        return f"SecretValues({sorted(self.values)})"

    def redact(self, text: str) -> str:
        for value in self.values.values():
            if value:
                text = text.replace(value, "[REDACTED]")
        return text


def decode_env_bytes(data: bytes, file_name: str) -> str:
    """UTF-8 (a byte-order mark is dropped); a byte that is not is named by its line."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{file_name}: line {line} is not UTF-8 (save the file as UTF-8)") \
            from None


def parse_env_text(text: str, file_name: str) -> dict[str, str]:
    """Parse .env content; a line python-dotenv cannot read is an error, not a skip, and so
    is a key set twice (which value would win is not obvious to the reader)."""
    parsed: dict[str, str] = {}
    seen: dict[str, int] = {}
    for binding in parse_stream(io.StringIO(text)):
        # A binding's text starts with the blank lines before it; count from its content.
        original = binding.original.string
        leading = original[:len(original) - len(original.lstrip())]
        line_no = binding.original.line + leading.count("\n")
        if binding.error:
            raise ConfigError(f"{file_name}: line {line_no} is not KEY=VALUE")
        if binding.key is not None:
            if binding.value is None:
                # Not echoed: a bare word on a line is often a pasted secret value.
                raise ConfigError(f"{file_name}: line {line_no} has no '=' (expected KEY=VALUE)")
            if binding.key in seen:
                raise ConfigError(f"{file_name}: {binding.key} is set twice (lines "
                                  f"{seen[binding.key]} and {line_no})")
            seen[binding.key] = line_no
            parsed[binding.key] = binding.value
    return parsed


def load_secret_values(settings: Settings, names: list[str] | None = None) -> SecretValues:
    """Read and check the required secrets from .env (all of them unless ``names``)."""
    path: Path = settings.path("env_file")
    shown = path.name
    if not path.exists():
        raise ConfigError(f"{shown}: not found (copy .env.example to .env and fill it in)")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        who = "world" if mode & stat.S_IRWXO else "group"
        raise ConfigError(f"{shown}: is {who}-accessible (run: chmod 600 {path})")
    parsed = parse_env_text(decode_env_bytes(path.read_bytes(), shown), shown)
    wanted = settings["secrets"] if names is None else {
        name: settings["secrets"][name] for name in names}
    values: dict[str, str] = {}
    for secret_name, env_key in wanted.items():
        value = parsed.get(env_key)
        if value is None:
            raise ConfigError(f"{shown}: {env_key} is missing (needed for secret {secret_name})")
        if not value.strip():
            raise ConfigError(f"{shown}: {env_key} is empty (needed for secret {secret_name})")
        if "\n" in value or "\r" in value:
            raise ConfigError(f"{shown}: {env_key} spans several lines; secrets must be one line")
        values[secret_name] = value
    return SecretValues(values)


def redaction(settings: Settings) -> SecretValues:
    """The .env values to hide from anything a read-only task prints; none if .env cannot
    be read (health and logs work without it)."""
    try:
        return load_secret_values(settings)
    except ConfigError:
        return SecretValues({})
