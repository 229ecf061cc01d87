"""The app dir, written as root without ever following a symbolic link: every path
is walked with openat(O_NOFOLLOW) from the app dir's own descriptor, files are created
O_EXCL under a random name, fchmod/fchown act on the open file, and renameat replaces a
planted link instead of writing through it."""

import errno
import os
import secrets as random
import stat

from .base import OpError, sha256_bytes


def open_dir_nofollow(path, create_owner=None):
    """A descriptor on an absolute directory path, refusing links at every level below /."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in [p for p in path.split("/") if p]:
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if create_owner is None:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.fchown(child, *create_owner)
            os.close(fd)
            fd = child
        return fd
    except OSError:
        os.close(fd)
        raise


def walk_to_parent(root_fd, rel, owner=None):
    """The descriptor of rel's parent directory under root_fd, made if missing. A link
    or a non-directory where a directory belongs is removed, never followed."""
    fd = os.dup(root_fd)
    parts = rel.split("/")
    for part in parts[:-1]:
        if part in ("", ".", ".."):
            os.close(fd)
            raise OpError(f"refusing path {rel!r}")
        try:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as exc:
            if owner is None:
                os.close(fd)
                raise
            if exc.errno != errno.ENOENT:  # ELOOP/ENOTDIR: a link or a file in the way
                os.unlink(part, dir_fd=fd)
            os.mkdir(part, 0o755, dir_fd=fd)
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.fchown(child, *owner)
        os.close(fd)
        fd = child
    if parts[-1] in ("", ".", ".."):
        os.close(fd)
        raise OpError(f"refusing path {rel!r}")
    return fd


def read_nofollow(root_fd, rel, limit=-1):
    """(bytes, mode) of a regular file under root_fd, or None (absent, a link, a dir, a
    FIFO: opened O_NONBLOCK, so none can hold the reader); at most ``limit`` bytes."""
    try:
        parent = walk_to_parent(root_fd, rel)
    except OSError:
        return None
    try:
        fd = os.open(rel.rsplit("/", 1)[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
                     dir_fd=parent)
    except OSError:
        return None
    finally:
        os.close(parent)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(limit), stat.S_IMODE(st.st_mode)
    finally:
        os.close(fd)


def write_nofollow(root_fd, rel, data, mode, owner):
    parent = walk_to_parent(root_fd, rel, owner)
    name = rel.rsplit("/", 1)[-1]
    tmp = f".{name}.ng-{random.token_hex(6)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                     dir_fd=parent)
        try:
            os.write(fd, data) if len(data) < 1 << 20 else _write_all(fd, data)
            os.fchown(fd, *owner)
            os.fchmod(fd, mode & 0o777)
        finally:
            os.close(fd)
        try:  # a directory in the file's place (e.g. planted): take it away first
            if stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                remove_tree_at(parent, name)
        except FileNotFoundError:
            pass
        os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=parent)
        except OSError:
            pass
        raise
    finally:
        os.close(parent)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def remove_nofollow(root_fd, rel):
    try:
        parent = walk_to_parent(root_fd, rel)
    except OSError:
        return False
    try:
        os.unlink(rel.rsplit("/", 1)[-1], dir_fd=parent)
        return True
    except IsADirectoryError:
        return False
    except OSError:
        return False
    finally:
        os.close(parent)


def remove_tree_at(dir_fd, name):
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError:
        os.unlink(name, dir_fd=dir_fd)
        return
    try:
        for entry in os.listdir(fd):
            if stat.S_ISDIR(os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode):
                remove_tree_at(fd, entry)
            else:
                os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def tree_manifest(root_fd, skip=()):
    """rel -> sha256 of regular files; links are listed apart, never followed."""
    found, links = {}, []

    def walk(fd, prefix):
        for name in sorted(os.listdir(fd)):
            rel = prefix + name
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links.append(rel)
            elif stat.S_ISDIR(st.st_mode):
                if name in skip:
                    continue
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                dir_fd=fd)
                try:
                    walk(child, rel + "/")
                finally:
                    os.close(child)
            elif stat.S_ISREG(st.st_mode):
                got = read_nofollow(fd, name)
                if got is not None:
                    found[rel] = f"{sha256_bytes(got[0])}:{got[1]:o}"

    walk(root_fd, "")
    return found, links
