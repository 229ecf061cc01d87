"""Secret values from wherever ``nightguard.secrets`` says: ``.env``, a command's stdout,
or Google Secret Manager. Every task that needs values reads them here, once, in the
process that sends them (the deploy's one SSH channel into ``podman secret create``).

A command runs without a shell (``tasks.secret_spec`` split it), with the user's
environment, in a session of its own (so a time-out or Ctrl-C ends it with its children)
and so with no terminal and stdin closed: it cannot prompt, and one that would gets EOF
at once instead of waiting out its time-out (unlock the password manager first: `op
signin`, `bw unlock`). Its stdout is the value (one trailing newline dropped), its stderr
is kept only for the one-line error. A failure - not found, non-zero exit, time-out, empty or
multi-line value, store unreachable or denied - is ``ConfigError``/``GcpError``: one line
naming the secret, raised before anything connects to a host.

Config keys: ``nightguard.secrets``, ``nightguard.env_file``, ``nightguard.gcp.*``,
``nightguard.fingerprints_file``.
"""

from __future__ import annotations

import os
import signal
import subprocess

from ..config import Settings
from ..errors import ConfigError, StepFailed
from ..secret_spec import SecretSource, parse_sources
from . import fingerprints
from .envfile import SecretValues, read_env_values, redact_text


def sources(settings: Settings, names: list[str] | None = None) -> dict[str, SecretSource]:
    """The sources of ``names`` (all secrets when None), in the configured order."""
    every = parse_sources(settings["secrets"])  # validated when the settings loaded
    return every if names is None else {name: every[name] for name in names}


def _last_line(text: str, value: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return redact_text(lines[-1], [value])[:200] if lines else ""


def run_command(source: SecretSource) -> str:
    """The command's stdout as the value; one line naming the secret on any failure."""
    what = f"secret {source.name}: command `{source.ref}`"
    try:
        proc = subprocess.Popen(list(source.argv), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except FileNotFoundError:
        raise ConfigError(f"secret {source.name}: {source.argv[0]} not found (install it, "
                          "or fix nightguard.secrets)") from None
    except OSError as exc:
        raise ConfigError(f"{what} could not start ({exc.strerror})") from None
    try:
        out, err = proc.communicate(timeout=source.timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise ConfigError(f"{what} gave no value within {source.timeout:g}s") from None
    except KeyboardInterrupt:
        _kill_group(proc)
        raise
    value = out.decode("utf-8", "replace")
    value = value[:-2] if value.endswith("\r\n") else value.removesuffix("\n")
    reason = _last_line(err.decode("utf-8", "replace"), value)
    if proc.returncode != 0:
        tail = f": {reason}" if reason else ""
        raise ConfigError(f"{what} failed (exit {proc.returncode}){tail}")
    if not value.strip():
        raise ConfigError(f"{what} printed no value")
    if "\n" in value or "\r" in value:
        raise ConfigError(f"{what} printed several lines; a secret must be one line")
    return value


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def read_store(settings: Settings, wanted: dict[str, SecretSource]) -> dict[str, str]:
    """Values of the command and Secret Manager entries of ``wanted``."""
    values = {name: run_command(s) for name, s in wanted.items() if s.kind == "command"}
    remote = {name: (s.ref, s.timeout) for name, s in wanted.items() if s.kind == "gcp"}
    if remote:
        from ..gcp import secretmanager  # the client loads in about a second: only when used

        try:
            read = secretmanager.access(settings, remote)
        except StepFailed as exc:  # bad input like any other: nothing has touched a host
            raise ConfigError(exc.reason) from None
        for name, value in read.items():
            if not value.strip():
                raise ConfigError(f"secret {name}: {wanted[name].ref} holds an empty value")
            if "\n" in value or "\r" in value:
                raise ConfigError(f"secret {name}: {wanted[name].ref} holds several lines; "
                                  "a secret must be one line")
            values[name] = value
    return values


SOURCE_WORDS = {"env": ".env", "command": "its command", "gcp": "Secret Manager"}


def source_word(settings: Settings, name: str) -> str:
    """Where ``name``'s value comes from, in a word or two (``matches .env``)."""
    return SOURCE_WORDS[sources(settings, [name])[name].kind]


def load_secret_values(settings: Settings, names: list[str] | None = None) -> SecretValues:
    """Read and check the secrets (all of them unless ``names``), each from its source."""
    wanted = sources(settings, names)
    values = read_env_values(settings, {n: s.ref for n, s in wanted.items() if s.kind == "env"})
    stored = read_store(settings, wanted)
    values.update(stored)
    # A task that never reads the store must still mask these values (inv logs, health).
    fingerprints.record(settings.path("fingerprints_file"), stored)
    return SecretValues({name: values[name] for name in wanted},
                        fingerprints=fingerprints.Fingerprints.load(
                            settings.path("fingerprints_file")))
