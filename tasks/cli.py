"""Glue between Invoke tasks and the rest: settings from Invoke's config and the task's
flags, one-line failures.

``settings_for(c, ...)`` is how every task gets its settings: the config files Invoke read
for this run (``tasks.invoke_config``), the environment and the flags the task was given,
layered and checked by ``tasks.config.load_settings``. A flag left out is ``None``: the
configured value stands.

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
from tasks.invoke_config import config_files

TARGET_HELP = {
    "target": "sandbox, ssh or gcp (default: nightguard.target, see `inv config`)",
    "host": "SSH host or ~/.ssh/config Host alias (implies --target ssh unless --target "
            "is given)",
    "dry_run": "print the plan (the commands that would run) and change nothing",
}


def settings_for(c, target: str | None = None, host: str | None = None,
                 **overrides: Any) -> Settings:
    """Settings from the task's Invoke context ``c`` with the common flags applied
    (``--target``, ``--host``) and any other as ``section__key=value`` (None: not given)."""
    flags = {key.replace("__", "."): value for key, value in overrides.items()}
    if host:
        flags["ssh.host"] = host
        target = target or "ssh"
    flags["target"] = target
    root, files = config_files(getattr(c, "config", None))
    return load_settings(root=root, overrides=flags, files=files)


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
