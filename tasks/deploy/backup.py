"""The backup file on the laptop: its name, its check, how many are kept, and taking one
through a host session (``take_backup``: `inv data.backup`, and a deploy that builds or pulls
an image when ``nightguard.data.backup_before_deploy`` is on).

A backup is ``nightguard-data-<host>-<UTC time>.tar.gz``: the data dir's tree under
``data/`` and, as the last member, ``nightguard-backup.json`` - the manifest the host wrote
(tasks/hostside/ops_data.py): the sha256, size and mode of every file, the links as links,
what was skipped and why, the release the agent ran, the time, the host, and the
deployment's identity. ``read_backup`` checks a file against its own manifest, reading it
once as a stream; ``check_identity`` refuses a backup of another deployment. Both raise
``BackupRefused`` (one line, exit 2) before anything on a host changes.

The manifest finds damage - a truncated download, a changed byte, a file added or taken
out - not a forgery made with care (anyone who can write the file can write a matching
manifest): keep backups where only you can write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tarfile
import zlib
from datetime import UTC, datetime
from pathlib import Path

from ..config import PROJECT_ROOT, Settings
from ..errors import ConfigError

ARCHIVE_ROOT = "data"
MANIFEST_NAME = "nightguard-backup.json"
PREFIX = "nightguard-data-"
SUFFIX = ".tar.gz"
FORMAT = 1
_TIME = re.compile(r"^\d{8}T\d{6}Z$")
UPLOAD_CHUNK = 4 << 20  # a restore travels in pieces of this size (the host's memory)


class BackupRefused(ConfigError):
    """A backup file that must not be restored: one line, nothing changed."""


def deployment_identity(settings: Settings) -> dict:
    """What a backup must match to be restored here: the agent's container, its image's
    name and its data dir (the host may differ: a restore onto a new VM is the point)."""
    return {"container": settings["container_name"], "image_name": settings["image_name"],
            "data_dir": settings["data_dir"].rstrip("/")}


def safe_host(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9.-]+", "-", name or "host").strip("-.")
    return cleaned[:63] or "host"


def backup_name(host: str, when: datetime | None = None) -> str:
    when = when or datetime.now(UTC)
    return f"{PREFIX}{safe_host(host)}-{when.strftime('%Y%m%dT%H%M%SZ')}{SUFFIX}"


def kept_backups(folder: Path, host: str) -> list[Path]:
    """This host's backups in ``folder``, oldest first (the name holds the time)."""
    head = f"{PREFIX}{safe_host(host)}-"
    found = []
    for path in folder.glob(f"{head}*{SUFFIX}"):
        stamp = path.name[len(head):-len(SUFFIX)]
        if _TIME.match(stamp) and path.is_file() and not path.is_symlink():
            found.append(path)
    return sorted(found, key=lambda p: p.name)


def prune(folder: Path, host: str, keep: int) -> list[Path]:
    """Delete this host's backups beyond the newest ``keep``; returns the deleted."""
    found = kept_backups(folder, host)
    gone = found[:-keep] if keep > 0 else []
    for path in gone:
        path.unlink(missing_ok=True)
    return gone


# -- reading one back -------------------------------------------------------------------------
def _refuse(path: Path, why: str) -> BackupRefused:
    return BackupRefused(f"{path.name}: {why}; nothing was changed")


def _member_rel(path: Path, member: tarfile.TarInfo) -> str | None:
    """The member's path under data/ ("" for data/ itself); None for the manifest."""
    if member.name == MANIFEST_NAME and member.isfile():
        return None
    parts = member.name.split("/")
    if parts[0] != ARCHIVE_ROOT or any(p in ("", ".", "..") for p in parts[1:]):
        raise _refuse(path, f"altered: unexpected member {member.name!r}")
    if not (member.isfile() or member.isdir() or member.issym()):
        raise _refuse(path, f"altered: {member.name} is not a file, directory or link")
    return "/".join(parts[1:])


def _digest(source) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: source.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _scan(path: Path) -> tuple[dict, dict, set, bytes | None]:
    """One pass over the archive: files' digests, links, dirs, the manifest's bytes."""
    files, links, dirs, manifest = {}, {}, set(), None
    with tarfile.open(path, mode="r|gz") as tar:
        for member in tar:
            rel = _member_rel(path, member)
            if rel is None:
                manifest = tar.extractfile(member).read()
            elif member.isfile():
                files[rel] = _digest(tar.extractfile(member))
            elif member.issym():
                links[rel] = member.linkname
            elif rel:
                dirs.add(rel)
    return files, links, dirs, manifest


def read_backup(path: Path) -> dict:
    """The manifest of a whole, unaltered backup; BackupRefused otherwise."""
    if not path.is_file():
        raise _refuse(path, "no such file")
    try:
        files, links, _, blob = _scan(path)
    except BackupRefused:
        raise
    except (EOFError, zlib.error, OSError, tarfile.TarError) as exc:
        words = "truncated" if isinstance(exc, EOFError) or "unexpected end" in str(exc) \
            else "damaged"
        raise _refuse(path, f"{words} ({exc or type(exc).__name__}): not a whole Night Guard "
                            "backup") from None
    if blob is None:
        raise _refuse(path, "no manifest (truncated, or not a Night Guard backup)")
    try:
        manifest = json.loads(blob)
        listed = {rel: entry["sha256"] for rel, entry in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _refuse(path, "its manifest is not readable (altered)") from None
    if manifest.get("format") != FORMAT:
        raise _refuse(path, f"backup format {manifest.get('format')!r} is not one this "
                            f"version reads ({FORMAT})")
    for rel in sorted(set(listed) | set(files)):
        if rel not in files:
            raise _refuse(path, f"altered: data/{rel} is in the manifest but not in the "
                                "archive")
        if rel not in listed:
            raise _refuse(path, f"altered: data/{rel} is in the archive but not in the "
                                "manifest")
        if files[rel] != listed[rel]:
            raise _refuse(path, f"altered: data/{rel} differs from its manifest (sha256)")
    if links != (manifest.get("links") or {}):
        raise _refuse(path, "altered: its links differ from the manifest")
    return manifest


def check_identity(path: Path, manifest: dict, identity: dict,
                   moved_from: dict | None = None) -> None:
    """Refuse a backup of another deployment, naming what differs. ``moved_from``: the
    identity of the deployment on the VM the agent moves from (`inv vm.move`), which the
    backup must match instead - deliberately, and only for a move."""
    theirs = manifest.get("identity") or {}
    identity = moved_from if moved_from is not None else identity
    differs = [f"{key} {theirs.get(key)!r} (here {identity[key]!r})" for key in identity
               if theirs.get(key) != identity[key]]
    if differs:
        host = (manifest.get("host") or {}).get("hostname", "?")
        raise _refuse(path, f"a backup of another deployment (from {host}: "
                            f"{'; '.join(differs)})")


def describe(manifest: dict) -> str:
    """One line about a backup: when, from where, what it holds."""
    files = manifest.get("files") or {}
    size = sum(int(entry.get("size", 0)) for entry in files.values())
    release = (manifest.get("release") or {}).get("version") or "no release"
    host = (manifest.get("host") or {}).get("hostname", "?")
    return (f"{len(files)} file(s), {size / 1e6:.1f} MB, {len(manifest.get('links') or {})} "
            f"link(s), from {host} at {manifest.get('created', '?')} ({release})")


# -- taking one (the host's stream into a checked file) ----------------------------------------
def out_folder(settings: Settings, out: str | None = None) -> Path:
    """``--out`` (relative: to the current folder), else ``nightguard.data.out``
    (relative: to the project)."""
    folder = Path(out) if out else Path(settings["data.out"])
    return folder if folder.is_absolute() else (Path.cwd() if out else PROJECT_ROOT) / folder


def take_backup(session, settings: Settings, folder: Path,
                missing_ok: bool = False) -> tuple[Path | None, dict, dict]:
    """The data dir streamed by the host helper of ``session`` (a HostSession) into a file
    in ``folder``, checked against its manifest, then named; a cut stream leaves no file.
    With ``missing_ok`` a host without a data dir yet gives (None, answer, {})."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{backup_name('partial')}.{secrets.token_hex(4)}.partial"
    remote = session.remote
    try:
        with remote.step("backup", settings["data_dir"]), \
                open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                     "wb") as sink:
            answer = session.call("data_backup", step="backup", sink=sink.write,
                                  identity=deployment_identity(settings),
                                  missing_ok=missing_ok)
        if answer.get("absent"):
            return None, answer, {}
        with remote.step("check", "the file against its manifest"):
            manifest = read_backup(partial)
        final = folder / backup_name(answer["host"]["hostname"])
        partial.rename(final)
    finally:
        partial.unlink(missing_ok=True)
    return final, answer, manifest


def send_backup(session, path: Path) -> int:
    """The backup file to the host's state dir, in pieces; returns its size."""
    sent, first = 0, True
    with open(path, "rb") as source:
        while True:
            chunk = source.read(UPLOAD_CHUNK)
            if not chunk and not first:
                return sent
            answer = session.call("data_upload", step="upload", data=chunk, first=first,
                                  record=first)
            for words in answer.get("healed") or []:
                print(f"  ! {words}", file=session.remote.out)
            sent, first = answer["size"], False
            session.remote.progress(f"{sent / 1e6:.1f} MB sent")
            if not chunk:
                return sent


def backup_audit(final: Path, answer: dict) -> dict:
    paused = answer.get("paused_s")
    return {"backup": final.name, "files": answer.get("files"),
            "paused_s": None if paused is None else round(paused, 3),
            "skipped": len(answer.get("skipped") or [])}


def report_backup(out, settings: Settings, folder: Path, final: Path, answer: dict,
                  manifest: dict) -> None:
    """What was kept as a link, skipped, how long the agent was paused; older backups of
    the host beyond ``nightguard.data.keep`` removed."""
    for words in answer.get("healed") or []:
        print(f"  ! {words}", file=out)
    for rel, target in sorted((answer.get("links") or {}).items()):
        print(f"  link kept as a link (not followed): {rel} -> {target}", file=out)
    for item in answer.get("skipped") or []:
        print(f"  skipped: {item['path']}: {item['why']}", file=out)
    paused = answer.get("paused_s")
    how = "while it copied the files on the host" if answer.get("copy") == "snapshot" else \
        "while the archive was made and sent (no room on the host's disk for a copy)"
    agent = "the agent was not running" if paused is None else \
        f"the agent was paused {paused:.2f} s {how}"
    print(f"backup: {describe(manifest)}; {final.stat().st_size / 1e6:.1f} MB written; "
          f"{agent}; helper peak memory {answer.get('peak_rss_kb', 0) / 1024:.0f} MB",
          file=out)
    for gone in prune(folder, answer["host"]["hostname"], settings["data.keep"]):
        print(f"  removed an older backup (data.keep={settings['data.keep']}): {gone.name}",
              file=out)


def backup_before_deploy(session, settings: Settings) -> None:
    """``nightguard.data.backup_before_deploy``: the data dir to ``nightguard.data.out``
    inside the deploy's own session, before a new image replaces the agent."""
    folder = out_folder(settings)
    final, answer, manifest = take_backup(session, settings, folder, missing_ok=True)
    if final is None:
        print("  backup before deploy: no data dir on the host yet", file=session.remote.out)
        return
    report_backup(session.remote.out, settings, folder, final, answer, manifest)
    print(f"  backup before deploy: {final}", file=session.remote.out)
