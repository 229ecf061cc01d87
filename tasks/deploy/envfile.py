"""Secret values from the local ``.env`` file (python-dotenv), and the masking of every
secret value in what a task prints.

Config keys: ``nightguard.env_file`` (default ``.env``) and the ``.env`` entries of
``nightguard.secrets`` (Podman secret name -> .env key; the other sources are read by
``tasks.deploy.secretstore``). The values are returned to the caller and never printed;
``SecretValues.redact`` masks them - and, through ``tasks.deploy.fingerprints``, values a
store gave an earlier task - in any text that is about to be shown.
"""

from __future__ import annotations

import io
import stat
from dataclasses import dataclass
from pathlib import Path

from dotenv.parser import parse_stream

from ..config import Settings
from ..errors import ConfigError
from ..secret_spec import env_keys
from .fingerprints import Fingerprints

REDACTED = "[REDACTED]"
# every value this process has read from .env or been typed (secrets.rotate --prompt): the
# one-line error of any task is redacted with them too (tasks.cli.one_line_errors)
_KNOWN: set[str] = set()
_PRINTS: list[Fingerprints] = []  # and the fingerprints any task of this process loaded


def redact_text(text: str, values) -> str:
    """``text`` with each of ``values`` replaced, the longest first (by value, wherever it
    stands: a .env value in agent_env, a log line, an error)."""
    for value in sorted((v for v in values if v), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


def redact_known(text: str) -> str:
    text = redact_text(text, _KNOWN)
    for prints in _PRINTS:
        text = prints.redact(text)
    return text


def redact_tree(tree, redact):
    """A copy of a JSON-like tree with every string passed through ``redact`` - a function,
    or the values to mask (before it is dumped: JSON's escapes would hide a value with a
    quote, a backslash or a non-ASCII character)."""
    if not callable(redact):
        values = list(redact)
        return redact_tree(tree, lambda text: redact_text(text, values))
    if isinstance(tree, str):
        return redact(tree)
    if isinstance(tree, dict):
        return {redact_tree(k, redact): redact_tree(v, redact) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [redact_tree(v, redact) for v in tree]
    return tree


@dataclass(frozen=True)
class SecretValues:
    """Podman secret name -> value. ``repr`` never shows a value. ``hidden``: other .env
    values that are masked too but never sent anywhere; ``fingerprints``: values a store
    gave an earlier task, masked by their fingerprints."""

    values: dict[str, str]
    hidden: tuple[str, ...] = ()
    fingerprints: Fingerprints | None = None

    def __post_init__(self) -> None:
        _KNOWN.update(v for v in (*self.values.values(), *self.hidden) if v)
        if self.fingerprints and self.fingerprints not in _PRINTS:
            _PRINTS.append(self.fingerprints)

    def __repr__(self) -> str:
        return f"SecretValues({sorted(self.values)})"

    def _all(self) -> list[str]:
        return [*self.values.values(), *self.hidden]

    def redact(self, text: str) -> str:
        text = redact_text(text, self._all())
        return self.fingerprints.redact(text) if self.fingerprints else text

    def redact_tree(self, tree):
        return redact_tree(tree, self.redact)


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


def read_env_values(settings: Settings, wanted: dict[str, str]) -> dict[str, str]:
    """Secret name -> value for ``wanted`` (secret name -> .env key), read and checked from
    .env; the file is needed only when something is wanted from it."""
    if not wanted:
        return {}
    path: Path = settings.path("env_file")
    shown = path.name
    if not path.exists():
        raise ConfigError(f"{shown}: not found (copy .env.example to .env and fill it in, "
                          "or name another source in nightguard.secrets)")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        who = "world" if mode & stat.S_IRWXO else "group"
        raise ConfigError(f"{shown}: is {who}-accessible (run: chmod 600 {path})")
    parsed = parse_env_text(decode_env_bytes(path.read_bytes(), shown), shown)
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
    return values


MIN_HIDDEN = 4  # a .env value this short that is not a secret ("1", "on") is not masked


def redaction(settings: Settings) -> SecretValues:
    """The .env values to hide from anything a task prints: every value .env holds (the
    secrets whatever their length), read as far as it can be (a missing key, loose
    permissions or a bad line elsewhere must not turn the redaction off); none when there is
    no .env (health and logs work without it)."""
    keys = env_keys(settings["secrets"])
    prints = Fingerprints.load(settings.path("fingerprints_file"))
    path: Path = settings.path("env_file")
    try:
        data = path.read_bytes()
    except OSError:
        return SecretValues({}, fingerprints=prints)
    text = data.decode("utf-8", "replace").removeprefix("\ufeff")
    found: dict[str, str] = {}
    for binding in parse_stream(io.StringIO(text)):
        if binding.key is not None and binding.value:
            found[binding.key] = binding.value
    try:
        secrets = read_env_values(settings, keys)
    except ConfigError:
        secrets = {name: found[key] for name, key in keys.items() if key in found}
    others = tuple(v for k, v in found.items() if k not in keys.values()
                   and len(v) >= MIN_HIDDEN)
    return SecretValues(secrets, hidden=others, fingerprints=prints)
