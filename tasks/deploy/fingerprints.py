"""Fingerprints of secret values read from a store, so that tasks which never read the
store (``inv health``, ``logs``, ``exec``, ``history``) still mask those values.

A value from a command or Google Secret Manager exists on the laptop only in the process
that read it. Such a process records a keyed hash of each value (BLAKE2b keyed with a
random salt kept in the same file) and its length; a later task slides a window of that
length over each run of text it is about to print and masks the windows whose hash is
recorded. No value is ever written; the last ``KEEP`` fingerprints per secret are kept
(rollback may bring an older value back on the host).

Config key: ``nightguard.fingerprints_file`` (default ``.nightguard/secret-fingerprints.json``,
mode 0600).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

KEEP = 10
REDACTED = "[REDACTED]"


def _digest(salt: bytes, text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), key=salt, digest_size=16).hexdigest()


@dataclass
class Fingerprints:
    """Recorded fingerprints: length -> digests, with the salt that keys them."""

    salt: bytes = b""
    by_length: dict[int, set[str]] = field(default_factory=dict)
    spaced: set[int] = field(default_factory=set)  # lengths of values with whitespace

    def __bool__(self) -> bool:
        return bool(self.by_length)

    @classmethod
    def from_document(cls, document: dict) -> Fingerprints:
        prints = cls(bytes.fromhex(document.get("salt", "")))
        for entries in (document.get("secrets") or {}).values():
            for entry in entries:
                length = int(entry["length"])
                prints.by_length.setdefault(length, set()).add(entry["digest"])
                if entry.get("spaced"):
                    prints.spaced.add(length)
        return prints

    @classmethod
    def load(cls, path: Path) -> Fingerprints:
        """What ``path`` holds; none when it is missing or unreadable (masking .env values
        and read values goes on regardless)."""
        try:
            return cls.from_document(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()

    def spans(self, text: str) -> list[tuple[int, int]]:
        found = []
        for length, digests in self.by_length.items():
            runs = [(0, text)] if length in self.spaced else \
                [(m.start(), m.group()) for m in re.finditer(rf"\S{{{length},}}", text)]
            for base, run in runs:
                for i in range(len(run) - length + 1):
                    if _digest(self.salt, run[i:i + length]) in digests:
                        found.append((base + i, base + i + length))
        return found

    def redact(self, text: str) -> str:
        if not self.by_length or not text:
            return text
        merged: list[list[int]] = []
        for start, end in sorted(self.spans(text)):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        for start, end in reversed(merged):
            text = text[:start] + REDACTED + text[end:]
        return text


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record(path: Path, values: dict[str, str]) -> None:
    """Add the fingerprints of ``values`` (secret name -> value) to ``path``."""
    if not values:
        return
    with _locked(path):
        try:
            document = json.loads(path.read_text())
            salt = bytes.fromhex(document["salt"])
        except (OSError, ValueError, KeyError, TypeError):
            salt = os.urandom(16)
            document = {"salt": salt.hex(), "secrets": {}}
        secrets = document.setdefault("secrets", {})
        for name, value in values.items():
            entry = {"length": len(value), "digest": _digest(salt, value),
                     "spaced": bool(re.search(r"\s", value))}
            kept = [e for e in secrets.get(name, []) if e != entry]
            secrets[name] = (kept + [entry])[-KEEP:]
        temporary = path.with_name(path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=1, sort_keys=True)
        os.replace(temporary, path)
