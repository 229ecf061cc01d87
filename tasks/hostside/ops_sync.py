"""Ops on the app dir: the sync of the code (keeping what it replaces), putting it
back, the .env file's removal, and the app and data dirs."""

import io
import os
import tarfile

from .base import OpError, read_json, write_json, write_private
from .host_facts import app_owner
from .nofollow import open_dir_nofollow, read_nofollow, remove_nofollow, write_nofollow


def op_rm_env(s, req):
    fd = open_dir_nofollow(s.args["app_dir"])
    try:
        return {"removed": remove_nofollow(fd, ".env")}
    finally:
        os.close(fd)


def op_sync(s, req):
    """Write the sent files (a tarball) and remove the deleted ones, keeping what they
    replace so `restore_code` can put it back. Never follows a link."""
    a, p = s.args, s.paths
    owner = app_owner(a)
    state = p["state"]
    root_fd = open_dir_nofollow(a["app_dir"], create_owner=owner)
    try:
        touched = list(req["files"]) + list(req["delete"])
        backup = io.BytesIO()
        with tarfile.open(fileobj=backup, mode="w") as tar:
            for rel in touched:
                got = read_nofollow(root_fd, rel)
                if got is not None:
                    info = tarfile.TarInfo(rel)
                    info.size, info.mode = len(got[0]), got[1]
                    tar.addfile(info, io.BytesIO(got[0]))
        write_private(os.path.join(state, "rollback-code.tar"), backup.getvalue())
        write_json(os.path.join(state, "rollback-added.json"),
                   [r for r in req["files"] if read_nofollow(root_fd, r) is None])
        write_json(os.path.join(state, "rollback-synced.json"),
                   read_json(os.path.join(state, "synced.json"), []))
        for rel in req.get("links", []):  # links in the tree are never kept; first, so
            remove_nofollow(root_fd, rel)  # a file synced in a link's place stays
        written = 0
        if req.get("data"):
            with tarfile.open(fileobj=io.BytesIO(req["data"]), mode="r:gz") as delta:
                for member in delta.getmembers():
                    if not member.isfile():
                        continue
                    data = delta.extractfile(member).read()
                    write_nofollow(root_fd, member.name, data, member.mode, owner)
                    written += 1
        for rel in req["delete"]:
            remove_nofollow(root_fd, rel)
        if req.get("all_files") is not None:
            write_json(os.path.join(state, "synced.json"), sorted(req["all_files"]))
    finally:
        os.close(root_fd)
    return {"written": written, "deleted": len(req["delete"])}


def op_restore_code(s, req):
    """Put back the files the last sync replaced, or a kept release's whole tree."""
    a, p = s.args, s.paths
    owner = app_owner(a)
    root_fd = open_dir_nofollow(a["app_dir"], create_owner=owner)
    restored = removed = 0
    try:
        if req.get("version"):
            path = os.path.join(p["state"], "releases", f"{req['version']}.tar.gz")
            if not os.path.exists(path):
                raise OpError(f"the code of release {req['version']} is no longer kept")
            with tarfile.open(path, "r:gz") as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                wanted = {m.name for m in members}
                for member in members:
                    write_nofollow(root_fd, member.name, tar.extractfile(member).read(),
                                   member.mode, owner)
                    restored += 1
            for rel in read_json(os.path.join(p["state"], "synced.json"), []):
                if rel not in wanted and remove_nofollow(root_fd, rel):
                    removed += 1
            write_json(os.path.join(p["state"], "synced.json"), sorted(wanted))
        else:
            for rel in read_json(os.path.join(p["state"], "rollback-added.json"), []):
                if remove_nofollow(root_fd, rel):
                    removed += 1
            backup = os.path.join(p["state"], "rollback-code.tar")
            if os.path.exists(backup):
                with tarfile.open(backup) as tar:
                    for member in tar.getmembers():
                        if member.isfile():
                            write_nofollow(root_fd, member.name,
                                           tar.extractfile(member).read(), member.mode, owner)
                            restored += 1
            synced = read_json(os.path.join(p["state"], "rollback-synced.json"), None)
            if synced is not None:  # what the next sync may delete: the files back here
                write_json(os.path.join(p["state"], "synced.json"), synced)
    finally:
        os.close(root_fd)
    return {"restored": restored, "removed": removed}


def op_dirs(s, req):
    """The agent's data dir (its only writable mount) and the app dir, made if missing,
    never through a link. Podman hands the data dir to the container's user (`:U`)."""
    owner = app_owner(s.args)
    for key in ("app_dir", "data_dir"):
        os.close(open_dir_nofollow(s.args[key], create_owner=owner))
    return {"ok": True}
