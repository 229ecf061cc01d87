"""The units settings are written in, and the rules for names and text that settings and
secret sources share (``tasks.config_rules``, ``tasks.secret_spec``). Pure, standard
library only."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^(\d+)([bkmg]?)$", re.IGNORECASE)
_DURATION = re.compile(r"^(\d+)(ms|s|m|h)$")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
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
