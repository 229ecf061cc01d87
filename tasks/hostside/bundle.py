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

import ast
import hashlib
import zlib
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).parent
CONTRACT = HERE.parent / "contract.py"

# readers both programs need, lowest first
SHARED = ("base", "statedir", "host_facts", "podman_store", "verdict")
HELPER = (*SHARED, "aptlock", "nofollow", "session", "watch_send", "ops_alerts", "ops_facts",
          "ops_provision", "ops_sync", "ops_secrets", "ops_image", "ops_unit", "ops_history",
          "ops_remove", "server")
WATCHER = (*SHARED, "watch_send", "watch_rules", "watch_main")

HEADER = ('# Night Guard: the {name}, one file built from tasks/contract.py and tasks/hostside/\n'
          '# (tasks/hostside/bundle.py). Runs on the host; standard library only.\n')


def module_paths(modules: tuple[str, ...]) -> list[Path]:
    """The files of one program, in the order they are joined."""
    return [CONTRACT, *(HERE / f"{name}.py" for name in modules)]


def is_internal(node: ast.stmt) -> bool:
    """An import the joined text does without: a sibling's (relative) or __future__'s."""
    return isinstance(node, ast.ImportFrom) and (node.level > 0 or node.module == "__future__")


def strip_internal(text: str) -> str:
    """The module's text without its package-internal import statements (whole lines)."""
    dropped = set()
    for node in ast.parse(text).body:
        if is_internal(node):
            dropped.update(range(node.lineno, node.end_lineno + 1))
    return "".join(line for number, line in enumerate(text.splitlines(keepends=True), 1)
                   if number not in dropped)


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
