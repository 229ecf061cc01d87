"""Glue between Invoke tasks and the rest: settings from flags, one-line failures.

Every task that can fail is wrapped in ``one_line_errors``: a ``ConfigError`` or
``StepFailed`` becomes a single ``error: ...`` line on stderr and a non-zero exit code,
never a traceback.
"""

from __future__ import annotations

import functools
from typing import Any

from invoke.exceptions import Exit

from tasks.config import Settings, load_settings
from tasks.errors import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_STEP, ConfigError, StepFailed

TARGET_HELP = {
    "target": "sandbox, ssh or gcp (default from invoke.yaml / NIGHTGUARD_TARGET)",
    "host": "SSH host (implies --target ssh unless --target is given)",
    "dry_run": "print the plan (the commands that would run) and change nothing",
}


def settings_for(target: str | None = None, host: str | None = None,
                 **overrides: Any) -> Settings:
    """Settings with the common flags applied (``--target``, ``--host``)."""
    flags = {key.replace("__", "."): value for key, value in overrides.items()}
    if host:
        flags["ssh.host"] = host
        target = target or "ssh"
    flags["target"] = target
    return load_settings(overrides=flags)


def one_line_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            raise Exit(f"error: {exc}", code=EXIT_CONFIG) from None
        except StepFailed as exc:
            raise Exit(f"error: {exc}", code=EXIT_STEP) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=EXIT_INTERRUPTED) from None

    return wrapper
