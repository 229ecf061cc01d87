"""The agent's data dir as a tar stream and back, never following anything the agent made.

The data dir is the agent's: the least trusted writer on the host. Reading it for a backup,
every entry is looked at with lstat relative to its directory's descriptor and opened
``O_NOFOLLOW | O_NONBLOCK`` (a FIFO cannot hold the reader), then checked again on the open
descriptor (same inode, still a regular file). A symbolic link is stored as a link (its
target as text, never what it points to); a FIFO, socket or device is skipped and reported,
and so is a regular file with more than one name (a hard link may be another file's name).
Writing a tree back, every name is created under its directory's descriptor (``O_EXCL``,
``mkdirat``, ``symlinkat``), so a link in the archive is never written through.
"""

import hashlib
import os
import stat
import tarfile

from .base import OpError

ARCHIVE_ROOT = "data"  # the tree's members are data/...; the manifest sits beside it
MANIFEST_NAME = "nightguard-backup.json"
CHUNK = 256 * 1024


class HashingReader:
    """A file read once: its bytes go to the tar, their sha256 is kept."""

    def __init__(self, fd, on_read=None):
        self.fd = fd
        self.digest = hashlib.sha256()
        self.on_read = on_read or (lambda n: None)

    def read(self, size=CHUNK):
        data = os.read(self.fd, min(size, CHUNK) if size and size > 0 else CHUNK)
        self.digest.update(data)
        self.on_read(len(data))
        return data


def _member(rel, st, kind):
    info = tarfile.TarInfo(f"{ARCHIVE_ROOT}/{rel}" if rel else ARCHIVE_ROOT)
    info.type, info.mode = kind, stat.S_IMODE(st.st_mode)
    info.uid, info.gid, info.mtime = st.st_uid, st.st_gid, int(st.st_mtime)
    info.uname = info.gname = ""
    return info


def copy_fd(source, target):
    """All of ``source`` into ``target`` (kernel-side when it can); returns the bytes."""
    done = 0
    while True:
        try:
            n = os.copy_file_range(source, target, 1 << 24)
        except OSError:  # another filesystem on an old kernel, or none at all
            data = os.read(source, 1 << 20)
            n = len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(target, view):]
        if n == 0:
            return done
        done += n


class TreeWriter:
    """Writes the tree under ``root_fd`` into ``tar`` and keeps its manifest.

    With ``snapshot_fd`` (a root-only directory) the walk only copies each file there
    (``add_tree``, the agent paused: a copy at disk speed), and ``flush`` makes the tar from
    those copies afterwards (the agent running again: compression and the network do not
    lengthen its pause). Without it, ``add_tree`` writes the tar as it walks."""

    def __init__(self, tar, on_read=None, stop=None, snapshot_fd=None):
        self.tar = tar
        self.on_read = on_read
        self.stop = stop or (lambda: False)
        self.snapshot_fd = snapshot_fd
        self.pending = []  # (member, rel, copy's name or None) while a snapshot is taken
        self.files, self.links, self.dirs, self.skipped = {}, {}, [], []

    def skip(self, rel, why):
        self.skipped.append({"path": rel, "why": why})

    def add_tree(self, root_fd):
        st = os.fstat(root_fd)
        self._emit(_member("", st, tarfile.DIRTYPE))
        self._walk(root_fd, "")

    def _emit(self, info):
        if self.snapshot_fd is None:
            self.tar.addfile(info)
        else:
            self.pending.append((info, None, None))

    def flush(self):
        """The snapshot's copies into the tar, in the walk's order; each copy removed
        once it is in."""
        for info, rel, copy in self.pending:
            if copy is None:
                self.tar.addfile(info)
                continue
            if self.stop():
                raise OpError("interrupted")
            fd = os.open(copy, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.snapshot_fd)
            try:
                self._add_from(fd, info, rel)
            finally:
                os.close(fd)
            os.unlink(copy, dir_fd=self.snapshot_fd)
        self.pending = []

    def _add_from(self, fd, info, rel):
        reader = HashingReader(fd, self.on_read)
        self.tar.addfile(info, reader)
        self.files[rel] = {"sha256": reader.digest.hexdigest(), "size": info.size,
                           "mode": info.mode}

    def _walk(self, fd, prefix):
        for name in sorted(os.listdir(fd)):
            if self.stop():
                raise OpError("interrupted")
            rel = prefix + name
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                info = _member(rel, st, tarfile.SYMTYPE)
                info.linkname = os.readlink(name, dir_fd=fd)
                self.links[rel] = info.linkname
                self._emit(info)
            elif stat.S_ISDIR(st.st_mode):
                self._add_dir(fd, name, rel, st)
            elif stat.S_ISREG(st.st_mode):
                self._add_file(fd, name, rel, st)
            else:
                self.skip(rel, "special file (" + ("fifo" if stat.S_ISFIFO(st.st_mode) else
                                                   "socket" if stat.S_ISSOCK(st.st_mode) else
                                                   "device") + ")")

    def _add_dir(self, fd, name, rel, st):
        try:
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as exc:
            self.skip(rel, f"directory not readable ({exc.strerror})")
            return
        try:
            self._emit(_member(rel, st, tarfile.DIRTYPE))
            self.dirs.append(rel)
            self._walk(child, rel + "/")
        finally:
            os.close(child)

    def _add_file(self, fd, name, rel, st):
        if st.st_nlink > 1:
            self.skip(rel, f"hard link ({st.st_nlink} names): not copied")
            return
        try:
            opened = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except OSError as exc:
            self.skip(rel, f"not readable ({exc.strerror})")
            return
        try:
            now = os.fstat(opened)
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != \
                    (st.st_dev, st.st_ino) or now.st_nlink > 1:
                self.skip(rel, "changed while read")
                return
            info = _member(rel, now, tarfile.REGTYPE)
            info.size = now.st_size
            if self.snapshot_fd is None:
                self._add_from(opened, info, rel)
            else:
                self._copy(opened, info, rel)
        finally:
            os.close(opened)

    def _copy(self, opened, info, rel):
        copy = f"{len(self.pending):08d}"
        target = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                         dir_fd=self.snapshot_fd)
        try:
            info.size = copy_fd(opened, target)  # what was there at this moment
        finally:
            os.close(target)
        self.pending.append((info, rel, copy))

    def manifest_part(self):
        return {"files": self.files, "links": self.links, "dirs": self.dirs,
                "skipped": self.skipped}


def tree_size(root_fd):
    """Bytes of regular files under root_fd (lstat only: the progress's total)."""
    total = 0
    for name in os.listdir(root_fd):
        try:
            st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
        elif stat.S_ISDIR(st.st_mode):
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                dir_fd=root_fd)
            except OSError:
                continue
            try:
                total += tree_size(child)
            finally:
                os.close(child)
    return total


# -- back onto the host ---------------------------------------------------------------------
def _safe_parts(name):
    parts = name.split("/")
    if parts[0] != ARCHIVE_ROOT or any(p in ("", ".", "..") for p in parts[1:]):
        raise OpError(f"refusing archive member {name!r}")
    return parts[1:]


def _parent_fd(root_fd, parts):
    fd = os.dup(root_fd)
    for part in parts[:-1]:
        try:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError:
            os.close(fd)
            raise OpError(f"archive member under {part!r}, which is not a directory") \
                from None
        os.close(fd)
        fd = child
    return fd


class TreeReader:
    """Unpacks data/... members under ``root_fd`` (an empty directory): files checked against
    ``expected`` (rel -> sha256), owned by ``owner`` (uid, gid) when given."""

    def __init__(self, root_fd, expected, owner=None, stop=None):
        self.root_fd = root_fd
        self.expected = expected
        self.owner = owner
        self.stop = stop or (lambda: False)
        self.seen = set()

    def unpack(self, tar):
        for member in tar:
            if self.stop():
                raise OpError("interrupted")
            if member.name == MANIFEST_NAME:
                continue
            if member.name == ARCHIVE_ROOT:
                self._own(self.root_fd, member)
                continue
            self._one(tar, member, _safe_parts(member.name))
        missing = sorted(set(self.expected) - self.seen)
        if missing:
            raise OpError(f"the archive lacks {len(missing)} file(s) of its manifest "
                          f"(first: {missing[0]})")

    def _one(self, tar, member, parts):
        rel = "/".join(parts)
        parent = _parent_fd(self.root_fd, parts)
        name = parts[-1]
        try:
            if member.isdir():
                os.mkdir(name, 0o700, dir_fd=parent)
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
                try:
                    self._own(fd, member)
                finally:
                    os.close(fd)
            elif member.issym():
                os.symlink(member.linkname, name, dir_fd=parent)
                if self.owner is not None:
                    os.chown(name, *self.owner, dir_fd=parent, follow_symlinks=False)
            elif member.isfile():
                self._file(tar, member, parent, name, rel)
            else:
                raise OpError(f"refusing archive member {member.name!r} (not a file, "
                              "directory or link)")
        finally:
            os.close(parent)

    def _file(self, tar, member, parent, name, rel):
        if rel not in self.expected:
            raise OpError(f"{rel}: in the archive but not in its manifest")
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                     dir_fd=parent)
        digest = hashlib.sha256()
        try:
            source = tar.extractfile(member)
            while True:
                data = source.read(CHUNK)
                if not data:
                    break
                digest.update(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            self._own(fd, member)
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)
        if digest.hexdigest() != self.expected[rel]:
            raise OpError(f"{rel}: its content differs from the manifest (altered or "
                          "damaged in transit)")
        self.seen.add(rel)

    def _own(self, fd, member):
        if self.owner is not None:
            os.fchown(fd, *self.owner)
        os.fchmod(fd, member.mode & 0o777)  # never setuid, setgid or sticky
