"""Code sync: what travels is declared, and only files that differ are sent.

What travels: the folders and files listed in ``nightguard.sync.include`` (relative to
``nightguard.source_dir``; default the agent's own: execution/, directives/, knowledge/,
deployment/), minus ``nightguard.sync.exclude`` globs (matched against the relative path
and each of its components). Never, whatever the lists say: the configured env_file, the
Google Cloud credentials file, ``.env``/``.env.*``, ``.git``, virtualenvs and caches,
macOS's ``.DS_Store`` and ``._*`` files.

A file that looks like a credential stops the deploy before anything is sent, naming the
file and how to exclude it (or, for a false alarm, ``nightguard.sync.allow``): a PEM or
OpenSSH private key, JSON with a "private_key", a ``.netrc``, or any file containing one of
the .env values. File modes travel as they are (never widened).

The local tree is hashed file by file; the host's tree by the facts. Changed and new files
travel as one gzip tarball inside the session, and the host helper writes them without
following links (see tasks/hostside/nofollow.py).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

NEVER = (".env", ".env.*", ".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache",
         ".ruff_cache", ".mypy_cache", "node_modules", ".sandbox", ".ssh", "*.img", "*.qcow2",
         ".netrc", "*.pem", "id_rsa", "id_ed25519", "id_ecdsa",
         ".DS_Store", "._*")  # macOS Finder's and AppleDouble files: a Mac laptop's litter
ALWAYS_INCLUDED = (".env.example",)  # documents the keys; holds no values
PRIVATE_KEY_MARKERS = (b"-----BEGIN OPENSSH PRIVATE KEY-----", b"PRIVATE KEY-----",
                       b'"private_key"', b'"private_key_id"')


@dataclass(frozen=True)
class SyncRules:
    """What may travel: roots to walk, globs to leave out, files allowed despite a scan hit,
    paths that never travel, and the values no file may contain."""

    roots: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    never_paths: tuple[Path, ...] = ()
    values: tuple[bytes, ...] = ()


def rules_for(settings, secret_values: dict[str, str] | None = None) -> SyncRules:
    never = [settings.path("env_file").resolve()]
    if settings["gcp.credentials_file"]:
        never.append(settings.path("gcp.credentials_file").resolve())
    return SyncRules(roots=tuple(settings["sync.include"]),
                     exclude=tuple(settings["sync.exclude"]),
                     allow=tuple(settings["sync.allow"]), never_paths=tuple(never),
                     values=tuple(v.encode() for v in (secret_values or {}).values() if v))


def declared_roots(settings) -> SyncRules:
    return rules_for(settings)


def is_excluded(rel: str, patterns) -> bool:
    if rel in ALWAYS_INCLUDED or rel.rsplit("/", 1)[-1] in ALWAYS_INCLUDED:
        return False
    parts = rel.split("/")
    for pattern in patterns:
        if fnmatch.fnmatch(rel, pattern) or any(fnmatch.fnmatch(p, pattern) for p in parts):
            return True
    return False


def looks_secret(rel: str, data: bytes, values: tuple[bytes, ...]) -> str | None:
    """Why a file must not travel, or None."""
    if rel.rsplit("/", 1)[-1] in (".netrc", "_netrc"):
        return "is a .netrc (passwords)"
    for marker in PRIVATE_KEY_MARKERS:
        if marker in data:
            kind = "a private key" if b"PRIVATE KEY" in marker else "service-account credentials"
            return f"holds {kind}"
    for value in values:
        if len(value) >= 6 and value in data:
            return "contains a value from .env"
    return None


def file_entry(data: bytes, mode: int) -> str:
    """What the manifest compares: content and permission bits."""
    return f"{hashlib.sha256(data).hexdigest()}:{stat.S_IMODE(mode):o}"


def local_manifest(root: Path, rules: SyncRules) -> dict[str, str]:
    """Relative path -> file_entry of every file that would be synced; raises ConfigError
    for a file that looks like a credential."""
    patterns = (*NEVER, *rules.exclude)
    never = set(rules.never_paths)
    found: dict[str, str] = {}

    def add(full: Path, rel: str) -> None:
        if is_excluded(rel, patterns) or full.is_symlink() or full.resolve() in never:
            return
        data = full.read_bytes()
        if rel not in rules.allow:
            why = looks_secret(rel, data, rules.values)
            if why:
                raise ConfigError(
                    f"{rel} {why}: it would be synced to the host; exclude it "
                    f"(nightguard.sync.exclude) or, if it is safe, allow it "
                    f"(nightguard.sync.allow)")
        found[rel] = file_entry(data, full.stat().st_mode)

    for top in rules.roots:
        start = root / top
        if start.is_symlink() or not start.exists():
            continue
        if start.is_file():
            add(start, top)
            continue
        for dirpath, dirnames, filenames in os.walk(start):
            rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/") + "/"
            dirnames[:] = sorted(d for d in dirnames if not is_excluded(rel_dir + d, patterns)
                                 and not os.path.islink(os.path.join(dirpath, d)))
            for name in sorted(filenames):
                add(Path(dirpath) / name, rel_dir + name)
    return found


def tree_hash(manifest: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for rel in sorted(manifest):
        digest.update(f"{rel}\0{manifest[rel]}\n".encode())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class Delta:
    changed: tuple[str, ...]
    deleted: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.changed or self.deleted)

    def describe(self) -> str:
        return f"{len(self.changed)} file(s) to send, {len(self.deleted)} to remove"


def compute_delta(local: dict[str, str], remote: dict[str, str],
                  previously_synced: list[str]) -> Delta:
    changed = tuple(sorted(rel for rel, entry in local.items() if remote.get(rel) != entry))
    deleted = tuple(sorted(rel for rel in previously_synced
                           if rel not in local and rel in remote))
    return Delta(changed, deleted)


def delta_tarball(root: Path, files: tuple[str, ...]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for rel in files:
            info = tar.gettarinfo(str(root / rel), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(root / rel, "rb") as handle:
                tar.addfile(info, handle)
    return buffer.getvalue()


def check_tree(root: Path, rules: SyncRules) -> None:
    """Raise ConfigError if the declared tree is empty or missing."""
    if not any((root / top).exists() for top in rules.roots):
        raise ConfigError(f"nightguard.sync.include: none of {', '.join(rules.roots)} "
                          f"exists under {root}")
