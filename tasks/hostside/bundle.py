"""The host side as it travels: each program is ONE source text, built in memory from this
package's modules (and ``tasks/contract.py``) in a fixed dependency order, with the
package-internal import lines taken out. Nothing generated is kept in the checkout.

Runs on the laptop only (it is not part of a bundle). Two programs, two versions (the
sha256 of the text, first 16 hex digits, as hostlink names the helper):
  helper   the request server and every op (``tasks.ssh.hostlink`` sends it)
  watcher  the alert watcher (``tasks.deploy.apply`` installs it with the ``watcher`` op)
Rewording an alert changes the watcher's version only; a new op, the helper's only.

A module here imports its siblings as ``from .x import name`` (never ``import .x`` and
``x.name``) and no two modules define the same top-level name: concatenated, every name
is still the one it meant. ``tests/unit/test_hostside_bundle.py`` checks both.
"""

from __future__ import annotations

import hashlib
import zlib
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).parent
CONTRACT = HERE.parent / "contract.py"

# readers both programs need, lowest first
SHARED = ("base", "nofollow", "statedir", "host_facts", "podman_store", "agent_beat", "verdict")
HELPER = (*SHARED, "aptlock", "session", "watch_send", "ops_alerts", "ops_facts",
          "ops_provision", "ops_sync", "ops_secrets", "ops_image", "ops_unit", "ops_history",
          "ops_remove", "datatree", "ops_data", "ops_move", "server")
WATCHER = (*SHARED, "watch_send", "watch_rules", "watch_main")

HEADER = ('# Night Guard: the {name}, one file built from tasks/contract.py and tasks/hostside/\n'
          '# (tasks/hostside/bundle.py). Runs on the host; standard library only.\n')


def module_paths(modules: tuple[str, ...]) -> list[Path]:
    """The files of one program, in the order they are joined."""
    return [CONTRACT, *(HERE / f"{name}.py" for name in modules)]


INTERNAL = ("from .", "from __future__ ")  # a sibling's import, or __future__'s


def strip_internal(text: str) -> str:
    """The module's text without its package-internal import statements (whole lines, a
    parenthesized one to its closing line). A line scan, not ast: every task that talks to
    the host builds the bundle, and parsing it would cost ~15 ms each time; the bundle's
    tests compile the result and check every module's names survive."""
    kept, inside = [], False
    for line in text.splitlines(keepends=True):
        if inside:
            inside = ")" not in line
        elif line.startswith(INTERNAL):
            inside = "(" in line and ")" not in line
        else:
            kept.append(line)
    return "".join(kept)


def build(modules: tuple[str, ...], name: str) -> str:
    """One program's source text."""
    parts = [HEADER.format(name=name)]
    for path in module_paths(modules):
        where = path.relative_to(HERE.parent).as_posix()
        parts.append(f"\n# ---- {where} " + "-" * max(4, 86 - len(where)) + "\n")
        parts.append(strip_internal(path.read_text()))
    return "".join(parts)


def version(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()[:16]


@lru_cache(maxsize=1)
def helper_program() -> bytes:
    return build(HELPER, "host helper").encode()


@lru_cache(maxsize=1)
def watcher_program() -> bytes:
    return build(WATCHER, "alert watcher").encode()


@lru_cache(maxsize=1)
def watcher_source() -> tuple[bytes, str]:
    """The watcher compressed for the wire, and its version (a hash of its text)."""
    source = watcher_program()
    return zlib.compress(source, 9), version(source)
