"""`inv data.backup` / `inv data.restore`: the tree reader and writer of the host side
(tasks/hostside/datatree.py) on a temp dir the "agent" filled with traps, the backup file's
check (tasks/deploy/backup.py), and both tasks through a LocalRemote on the fake host
(tests/unit/hostfake): paused for the copy, restored by rename, the old tree back when the
agent is not healthy, an interrupted restore undone by the next run."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import socket
import stat
import tarfile
import threading
from pathlib import Path

import pytest

from tasks.config import load_settings
from tasks.deploy import backup as bk
from tasks.deploy import data, manage
from tasks.errors import ConfigError, StepFailed
from tasks.hostside import datatree
from tests.unit.hostfake import CONTAINER, UNIT

SECRET = b"root-only secret: never in a backup\n"
IDENTITY = {"container": CONTAINER, "image_name": "localhost/nightguard", "data_dir": "/d"}


# -- small tools ---------------------------------------------------------------------------
def agent_tree(root: Path, outside: Path) -> None:
    """What an agent might leave: files, a nested dir, links out of the tree, a FIFO, a
    socket, a hard link."""
    (root / "memory").mkdir(parents=True)
    (root / "memory" / "notes.json").write_text('{"remember": "the milk"}')
    (root / "state.db").write_bytes(os.urandom(300_000))
    (root / "empty").mkdir()
    outside.parent.mkdir(parents=True, exist_ok=True)
    outside.write_bytes(SECRET)
    outside.chmod(0o600)
    (root / "shadow").symlink_to(outside)
    (root / "rootdir").symlink_to(outside.parent)
    os.mkfifo(root / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "agent.sock"))
    sock.close()
    (root / "hard-a").write_text("two names")
    os.link(root / "hard-a", root / "hard-b")


def write_tree(root: Path, identity: dict = IDENTITY) -> bytes:
    """The host side's archive of ``root`` (as data_backup streams it), as bytes."""
    buffer = io.BytesIO()
    zipped = gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0)
    tar = tarfile.open(fileobj=zipped, mode="w|", format=tarfile.PAX_FORMAT)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        writer = datatree.TreeWriter(tar)
        writer.add_tree(fd)
    finally:
        os.close(fd)
    manifest = dict(writer.manifest_part(), format=1, identity=identity, created="now",
                    host={"hostname": "h"}, release={"version": "v1"}, owner=[0, 0])
    blob = json.dumps(manifest).encode()
    info = tarfile.TarInfo(datatree.MANIFEST_NAME)
    info.size = len(blob)
    tar.addfile(info, io.BytesIO(blob))
    tar.close()
    zipped.close()
    return buffer.getvalue()


def rebuilt(blob: bytes, change) -> bytes:
    """The same archive with ``change(name, data) -> data`` applied to each file's bytes."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as src, \
            tarfile.open(fileobj=out, mode="w:gz") as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else None
            if data is not None:
                data = change(member.name, data)
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


# -- the host side's tree ------------------------------------------------------------------
def test_backup_stores_links_as_links_and_skips_special_files(tmp_path):
    root = tmp_path / "data"
    agent_tree(root, tmp_path / "root-only" / "shadow")
    done = []
    thread = threading.Thread(target=lambda: done.append(write_tree(root)), daemon=True)
    thread.start()
    thread.join(20)
    assert done, "the FIFO held the reader"
    blob = done[0]
    assert SECRET not in gzip.decompress(blob)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        members = {m.name: m for m in tar}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        manifest = json.loads(tar.extractfile(datatree.MANIFEST_NAME).read())
    assert members["data/shadow"].issym()
    assert members["data/shadow"].linkname == str(tmp_path / "root-only" / "shadow")
    assert members["data/rootdir"].issym()
    assert "data/pipe" not in members and "data/agent.sock" not in members
    assert "data/hard-a" not in members and "data/hard-b" not in members
    assert members["data/empty"].isdir()
    assert sorted(manifest["files"]) == ["memory/notes.json", "state.db"]
    digest = hashlib.sha256((root / "state.db").read_bytes()).hexdigest()
    assert manifest["files"]["state.db"]["sha256"] == digest
    assert manifest["links"] == {"rootdir": str(tmp_path / "root-only"),
                                 "shadow": str(tmp_path / "root-only" / "shadow")}
    assert sorted((s["path"], s["why"]) for s in manifest["skipped"]) == [
        ("agent.sock", "special file (socket)"),
        ("hard-a", "hard link (2 names): not copied"),
        ("hard-b", "hard link (2 names): not copied"),
        ("pipe", "special file (fifo)")]


def unpack(blob: bytes, into: Path, expected: dict) -> None:
    into.mkdir()
    fd = os.open(into, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r|gz") as tar:
            datatree.TreeReader(fd, expected).unpack(tar)
    finally:
        os.close(fd)


def test_a_snapshot_copy_makes_the_same_archive_as_a_direct_one(tmp_path):
    root = tmp_path / "data"
    agent_tree(root, tmp_path / "root-only" / "shadow")
    (tmp_path / "snap").mkdir()
    direct = write_tree(root)
    buffer = io.BytesIO()
    tar = tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    snap = os.open(tmp_path / "snap", os.O_RDONLY | os.O_DIRECTORY)
    try:
        writer = datatree.TreeWriter(tar, snapshot_fd=snap)
        writer.add_tree(fd)
        assert len(list((tmp_path / "snap").iterdir())) == 2  # the copies, before the tar
        assert buffer.getvalue() == b""
        writer.flush()
    finally:
        os.close(fd)
        os.close(snap)
    tar.close()
    assert list((tmp_path / "snap").iterdir()) == []
    with tarfile.open(fileobj=io.BytesIO(direct), mode="r:gz") as one, \
            tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as two:
        first = [(m.name, m.type, m.size, m.mode, m.linkname) for m in one
                 if m.name != datatree.MANIFEST_NAME]
        second = [(m.name, m.type, m.size, m.mode, m.linkname) for m in two]
    assert first == second
    assert writer.files["state.db"]["sha256"] == hashlib.sha256(
        (root / "state.db").read_bytes()).hexdigest()


def test_a_tree_comes_back_whole_and_links_stay_links(tmp_path):
    root = tmp_path / "data"
    agent_tree(root, tmp_path / "root-only" / "shadow")
    blob = write_tree(root)
    manifest = bk.read_backup(_file(tmp_path, blob))
    unpack(blob, tmp_path / "back", {r: e["sha256"] for r, e in manifest["files"].items()})
    back = tmp_path / "back"
    assert (back / "state.db").read_bytes() == (root / "state.db").read_bytes()
    assert json.loads((back / "memory" / "notes.json").read_text()) == {"remember": "the milk"}
    assert os.readlink(back / "shadow") == str(tmp_path / "root-only" / "shadow")
    assert (back / "empty").is_dir() and not (back / "pipe").exists()


def test_the_host_refuses_a_file_that_differs_from_the_manifest_and_a_member_through_a_link(
        tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.txt").write_text("one")
    blob = write_tree(root)
    with pytest.raises(datatree.OpError, match="a.txt: its content differs"):
        unpack(blob, tmp_path / "b1", {"a.txt": "0" * 64})
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        link = tarfile.TarInfo("data/etc")
        link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path / "victim")
        tar.addfile(link)
        info = tarfile.TarInfo("data/etc/passwd")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"pwn"))
    (tmp_path / "victim").mkdir()
    with pytest.raises(datatree.OpError, match="not a directory"):
        unpack(evil.getvalue(), tmp_path / "b2", {"etc/passwd": hashlib.sha256(b"pwn")
                                                  .hexdigest()})
    assert list((tmp_path / "victim").iterdir()) == []
    dotdot = io.BytesIO()
    with tarfile.open(fileobj=dotdot, mode="w:gz") as tar:
        info = tarfile.TarInfo("data/../x")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(datatree.OpError, match="refusing archive member"):
        unpack(dotdot.getvalue(), tmp_path / "b3", {})


# -- the file's check on the laptop ----------------------------------------------------------
def _file(tmp_path: Path, blob: bytes, name: str = "b.tar.gz") -> Path:
    path = tmp_path / name
    path.write_bytes(blob)
    return path


def test_a_truncated_altered_or_foreign_backup_is_refused_in_one_line(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.txt").write_text("one" * 10000)
    (root / "b.txt").write_text("two")
    blob = write_tree(root)
    good = bk.read_backup(_file(tmp_path, blob))
    assert sorted(good["files"]) == ["a.txt", "b.txt"]
    cases = {
        "cut": blob[:len(blob) // 2],
        "end": blob[:-30],
        "changed": rebuilt(blob, lambda n, d: b"TWO" if n == "data/b.txt" else d),
        "added": rebuilt(blob, lambda n, d: d) + b"",
        "junk": b"not an archive at all",
    }
    added = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as src, \
            tarfile.open(fileobj=added, mode="w:gz") as dst:
        extra = tarfile.TarInfo("data/planted.txt")
        extra.size = 1
        dst.addfile(extra, io.BytesIO(b"x"))
        for member in src:
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    cases["added"] = added.getvalue()
    words = {}
    for name, bad in cases.items():
        with pytest.raises(bk.BackupRefused) as refused:
            bk.read_backup(_file(tmp_path, bad, f"{name}.tar.gz"))
        line = str(refused.value)
        assert "\n" not in line and line.endswith("nothing was changed"), line
        words[name] = line
    assert "truncated" in words["cut"] and "truncated" in words["end"] or \
        "damaged" in words["end"]
    assert "altered: data/b.txt differs from its manifest" in words["changed"]
    assert "altered: data/planted.txt is in the archive but not in the manifest" in \
        words["added"]
    assert "damaged" in words["junk"] or "truncated" in words["junk"]
    with pytest.raises(bk.BackupRefused, match="a backup of another deployment .*container "
                       "'other' \\(here '97layer-nightguard'\\)"):
        bk.check_identity(tmp_path / "b.tar.gz", dict(good, identity=dict(IDENTITY,
                          container="other")), IDENTITY)
    bk.check_identity(tmp_path / "b.tar.gz", good, IDENTITY)
    assert isinstance(bk.BackupRefused("x"), ConfigError)  # exit 2, like bad input


def test_names_and_keeping_the_last_n(tmp_path):
    for stamp in ("20261201T000000Z", "20261202T000000Z", "20261203T000000Z"):
        (tmp_path / f"nightguard-data-vm1-{stamp}.tar.gz").write_bytes(b"x")
    (tmp_path / "nightguard-data-vm2-20261201T000000Z.tar.gz").write_bytes(b"x")
    (tmp_path / "nightguard-data-vm1-notatime.tar.gz").write_bytes(b"x")
    gone = bk.prune(tmp_path, "vm1", 2)
    assert [p.name for p in gone] == ["nightguard-data-vm1-20261201T000000Z.tar.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "nightguard-data-vm1-20261202T000000Z.tar.gz",
        "nightguard-data-vm1-20261203T000000Z.tar.gz",
        "nightguard-data-vm1-notatime.tar.gz",
        "nightguard-data-vm2-20261201T000000Z.tar.gz"]
    assert bk.safe_host("a b/../c") == "a-b-..-c"
    with pytest.raises(ConfigError, match="nightguard.data.keep: must be at least 1"):
        load_settings(environ={}, overrides={"data.keep": 0})


# -- the tasks on the fake host ----------------------------------------------------------------
def fill(data_dir: Path, outside: Path) -> dict:
    (data_dir / "memory").mkdir(parents=True, exist_ok=True)
    (data_dir / "memory" / "chat.json").write_text('{"last": 42}')
    (data_dir / "big.bin").write_bytes(os.urandom(700_000))
    outside.write_bytes(SECRET)
    (data_dir / "shadow").symlink_to(outside)
    os.mkfifo(data_dir / "pipe")
    return {"memory/chat.json": (data_dir / "memory" / "chat.json").read_bytes(),
            "big.bin": (data_dir / "big.bin").read_bytes()}


def test_backup_then_restore_through_the_gate(deploy, host, tmp_path):
    deploy()
    settings = deploy.settings()
    files = fill(host.data_dir, tmp_path / "secret")
    path = data.run_backup(settings, deploy.remote(), tmp_path / "backups")
    text = deploy.last.text
    assert path.name.startswith(f"nightguard-data-{bk.safe_host(socket.gethostname())}-")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SECRET not in gzip.decompress(path.read_bytes())
    assert "skipped: pipe: special file (fifo)" in text
    assert f"link kept as a link (not followed): shadow -> {tmp_path / 'secret'}" in text
    assert "the agent was paused" in text and "while it copied the files on the host" in text
    assert not (host.paths["state"] / "data-snapshot").exists()
    podman = [c[0] for c in host.calls("podman") if c[:1] in (["pause"], ["unpause"])]
    assert podman == ["pause", "unpause"]
    assert not (host.paths["state"] / "data-paused.json").exists()
    assert host.audit()[-1]["command"] == "data.backup" and host.audit()[-1]["outcome"] == "ok"
    manifest = bk.read_backup(path)
    assert manifest["identity"] == bk.deployment_identity(settings)
    assert manifest["release"]["version"] == host.state()["verified"]
    # the agent loses its memory; the backup brings it back
    (host.data_dir / "memory" / "chat.json").write_text("garbage")
    (host.data_dir / "big.bin").unlink()
    data.run_restore(settings, deploy.remote(), path, manifest)
    assert (host.data_dir / "memory" / "chat.json").read_bytes() == files["memory/chat.json"]
    assert (host.data_dir / "big.bin").read_bytes() == files["big.bin"]
    assert os.readlink(host.data_dir / "shadow") == str(tmp_path / "secret")
    previous = Path(str(host.data_dir) + ".ng-previous")
    assert (previous / "memory" / "chat.json").read_text() == "garbage"
    assert not (host.paths["state"] / "data-restore.json").exists()
    last = host.audit()[-1]
    assert (last["command"], last["outcome"], last["backup"]) == \
        ("data.restore", "ok", path.name)
    assert ["stop", UNIT] in host.calls("systemctl") and ["start", UNIT] in \
        host.calls("systemctl")
    manage.run_remove(settings, deploy.remote(), data=True, yes=True)
    assert f"and {previous} (kept aside by a restore)" in deploy.last.text
    assert not host.data_dir.exists() and not previous.exists()


def test_a_restore_onto_a_host_without_the_agent_is_one_line_and_changes_nothing(
        deploy, host, tmp_path):
    deploy()
    settings = deploy.settings()
    fill(host.data_dir, tmp_path / "secret")
    path = data.run_backup(settings, deploy.remote(), tmp_path / "backups")
    manage.run_remove(settings, deploy.remote(), data=True, yes=True)
    with pytest.raises(StepFailed, match="step 'upload' failed: the agent is not deployed on "
                       "this host .*nothing was changed"):
        data.run_restore(settings, deploy.remote(), path, bk.read_backup(path))
    assert not host.data_dir.exists()
    assert sorted(p.name for p in host.paths["state"].iterdir()) == ["audit.log", "lock"]


def test_a_backup_before_a_deploy_that_builds_an_image_and_none_before_a_no_op(
        deploy, project, host, tmp_path):
    settings = deploy.settings(**{"data.backup_before_deploy": True,
                                  "data.out": str(tmp_path / "auto")})
    deploy(settings)
    assert "backup before deploy: no data dir on the host yet" in deploy.last.text
    fill(host.data_dir, tmp_path / "secret")
    deploy(settings)
    assert "backup before deploy" not in deploy.last.text  # nothing changed: no backup
    dockerfile = project / "deployment" / "Dockerfile.nightguard"
    dockerfile.write_text(dockerfile.read_text() + "\n# a change\n")
    deploy(settings)
    made = sorted((tmp_path / "auto").glob("nightguard-data-*.tar.gz"))
    assert len(made) == 1 and f"backup before deploy: {made[0]}" in deploy.last.text
    assert sorted(bk.read_backup(made[0])["files"]) == ["big.bin", "memory/chat.json"]
    assert host.audit()[-1]["command"] == "deploy" and "backup" in host.audit()[-1]["steps"]


def test_an_unhealthy_agent_on_the_restored_tree_gets_the_old_one_back(deploy, host, tmp_path):
    deploy()
    settings = deploy.settings(**{"health.deadline": 2})
    fill(host.data_dir, tmp_path / "secret")
    path = data.run_backup(settings, deploy.remote(), tmp_path / "backups")
    (host.data_dir / "now.txt").write_text("the current data")
    host.control("health", {"fail": True})
    with pytest.raises(StepFailed, match="not healthy on the restored data .*the data dir "
                       "from before is back"):
        data.run_restore(settings, deploy.remote(), path, bk.read_backup(path))
    assert (host.data_dir / "now.txt").read_text() == "the current data"
    assert (Path(str(host.data_dir) + ".ng-failed") / "big.bin").exists()
    assert host.audit()[-1]["outcome"] == "rolled-back"
    assert not (host.paths["state"] / "data-restore.json").exists()


def test_a_restore_cut_after_its_swap_is_undone_by_the_next_run(deploy, host, tmp_path):
    deploy()
    settings = deploy.settings()
    fill(host.data_dir, tmp_path / "secret")
    path = data.run_backup(settings, deploy.remote(), tmp_path / "backups")
    (host.data_dir / "now.txt").write_text("the current data")
    manifest = bk.read_backup(path)
    with host.helper(command="data.restore") as helper:
        helper.call("data_upload", data=path.read_bytes(), first=True)
        helper.call("data_unpack", files={r: e["sha256"] for r, e in manifest["files"].items()},
                    owner=None)
        helper.call("data_swap")
        # the client goes away here: no gate, no settle
    assert not (host.data_dir / "now.txt").exists()
    assert host.audit()[-1]["outcome"] == "interrupted"
    with host.helper(mode="read") as look:
        assert look.call("facts")["data_unfinished"] == ["restore"]
    deploy()  # a deploy notices it first (as would the next data.backup or data.restore)
    assert "an interrupted restore was undone" in deploy.last.text
    assert (host.data_dir / "now.txt").read_text() == "the current data"
    assert not (host.paths["state"] / "data-restore.json").exists()


def test_a_backup_cut_half_way_leaves_no_file_and_the_agent_unpaused(deploy, host, tmp_path,
                                                                      monkeypatch):
    deploy()
    settings = deploy.settings()
    fill(host.data_dir, tmp_path / "secret")
    (host.paths["state"] / "data-paused.json").write_text("{}")  # a helper killed mid-copy

    def broken(path):
        raise bk.BackupRefused("b: truncated; nothing was changed")

    monkeypatch.setattr(bk, "read_backup", broken)
    with pytest.raises(ConfigError, match="truncated"):
        data.run_backup(settings, deploy.remote(), tmp_path / "backups")
    monkeypatch.undo()
    assert list((tmp_path / "backups").iterdir()) == []
    assert not (host.paths["state"] / "data-paused.json").exists()
    assert host.audit()[-1]["outcome"].startswith("failed")


# -- the SSH pipe under a large request and a framed stream -----------------------------------
class SlowChannel:
    """A channel whose sendall fails as a socket does when its timeout is shorter than the
    host's pause in reading (a full window), and whose recv hands out what it was given."""

    def __init__(self, incoming: bytes):
        self.timeout, self.incoming, self.sent = None, incoming, b""

    def settimeout(self, value):
        self.timeout = value

    def sendall(self, data):
        if self.timeout is not None and self.timeout < 5:
            raise TimeoutError("timed out")
        self.sent += data

    def recv(self, size):
        chunk, self.incoming = self.incoming[:min(size, 1000)], self.incoming[min(size, 1000):]
        return chunk

    def recv_stderr_ready(self):
        return False


def test_the_ssh_pipe_sends_a_large_request_after_a_short_read_and_reads_frames_exactly():
    from tasks.ssh.remote import SshPipe, Stats

    frame = bytes(range(256)) * 40 + b"\n\n"
    channel = SlowChannel(b'{"hello": true}\n' + b'{"id": 1, "bytes": %d}\n' % len(frame) +
                          frame + b'{"id": 1, "ok": true}\n')
    pipe = SshPipe(channel, Stats())
    assert pipe.readline(10) == b'{"hello": true}\n'  # leaves the channel at a short timeout
    pipe.send(b"x" * (4 << 20))
    assert len(channel.sent) == 4 << 20
    assert json.loads(pipe.readline(10)) == {"id": 1, "bytes": len(frame)}
    assert pipe.read_exact(len(frame), 10) == frame
    assert json.loads(pipe.readline(10)) == {"id": 1, "ok": True}


def test_a_client_gone_mid_stream_leaves_the_agent_running_and_no_copy_behind(deploy, host):
    deploy()
    (host.data_dir / "big").mkdir()
    for n in range(8):
        (host.data_dir / "big" / f"{n}.bin").write_bytes(os.urandom(1 << 20))
    with host.helper(command="data.backup") as helper:
        helper.start("data_backup", identity=IDENTITY)
        while "bytes" not in (message := helper.next_message(20)):
            assert "progress" in message, message
        helper.pipe.shutdown_write()  # Ctrl-C: the task ends the helper's input
        assert helper.pipe.wait(20) == 0
    assert [c[0] for c in host.calls("podman") if c[:1] in (["pause"], ["unpause"])] == \
        ["pause", "unpause"]
    assert not (host.paths["state"] / "data-snapshot").exists()
    assert not (host.paths["state"] / "data-paused.json").exists()
    last = host.audit()[-1]
    assert (last["command"], last["outcome"]) == ("data.backup", "interrupted")
