"""Code sync: send only the files that differ, over the run's one SSH connection.

The local tree (``nightguard.source_dir``) is hashed file by file; the host's tree is
hashed by the facts call. Changed and new files travel as one gzip tarball over SFTP and
are unpacked by the host helper (temp file + rename each, so a cut connection never leaves
a half-written file). Files that an earlier sync put there and that are gone locally are
removed; files the agent made on the host itself are left alone.

Never synced: ``.env`` and ``.env.*``, ``.git``, virtualenvs, caches, the sandbox's disks,
and whatever ``.deployignore`` lists (one glob per line, matched against the relative path
and against each path component).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

ALWAYS_EXCLUDED = (
    ".env", ".env.*", ".git", ".venv", "venv", "env", "__pycache__", "*.pyc",
    ".pytest_cache", ".ruff_cache", ".mypy_cache", "node_modules", ".sandbox", ".ssh",
    "*.img", "*.qcow2",
)
# .env.example documents the keys and holds no values; it may travel.
ALWAYS_INCLUDED = (".env.example",)


def read_ignore_file(root: Path) -> list[str]:
    path = root / ".deployignore"
    if not path.exists():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line.rstrip("/") for line in lines if line and not line.startswith("#")]


def is_excluded(rel: str, patterns: list[str]) -> bool:
    if rel in ALWAYS_INCLUDED:
        return False
    parts = rel.split("/")
    for pattern in patterns:
        if fnmatch.fnmatch(rel, pattern) or any(fnmatch.fnmatch(p, pattern) for p in parts):
            return True
    return False


def local_manifest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file that would be synced."""
    patterns = [*ALWAYS_EXCLUDED, *read_ignore_file(root)]
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if not is_excluded(rel_dir + d, patterns))
        for name in sorted(filenames):
            rel = rel_dir + name
            full = os.path.join(dirpath, name)
            if is_excluded(rel, patterns) or os.path.islink(full):
                continue
            found[rel] = hashlib.sha256(Path(full).read_bytes()).hexdigest()
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
    changed = tuple(sorted(rel for rel, digest in local.items() if remote.get(rel) != digest))
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
