"""The agent's data survives its host: `inv data.backup`, the deployment thrown away, a
deploy, `inv data.restore` - on the shared Debian 12 sandbox.

The agent's files are written on the host into the data dir, owned as the agent (uid 1000),
with a link to a root-only file planted beside them (and one to /etc/shadow, and a FIFO).
The backup must hold the files, the links as links, and nothing of what they point to.

Thrown away: `inv remove --data --yes` takes off the unit, container, images, secrets, app
dir, deploy state and the data dir, and the next `inv deploy` is a cold one (image built
again, an empty data dir). That is what a new disk means to the deployment; the issue's
`sandbox.up --fresh` (a new VM disk) would cost a boot and Podman's first start on top,
several minutes under TCG, for no more of our code exercised. The restore then brings
the files back identical, the agent healthy, and `inv history` shows it; a backup with one
byte changed is refused in one line with the host's data dir and audit log unchanged.
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
import time
from pathlib import Path

import pytest

from tests.e2e.deploy_helpers import (
    checked,
    copy_source,
    figure,
    healthy_now,
    inv,
    inv_env,
    make_env_file,
    output,
)

DATA_DIR = "/home/ubuntu/97layerOS-data"
MARKER = "root-only-7c1d5e0aa9 do not copy"
SECRET_FILE = "/root/ng-data-drill-secret"
# the agent's data: a few known files, one of 20 MB (random: it does not compress)
WRITE = f"""set -e
sudo -n sh -c 'umask 077; printf "%s\\n" "{MARKER}" > {SECRET_FILE}'
sudo -n -u '#1000' sh -c 'cd {DATA_DIR} && mkdir -p memory/chats &&
  printf "{{\\"remember\\": \\"the milk\\"}}\\n" > memory/notes.json &&
  printf "chat 1\\n" > memory/chats/1.txt &&
  head -c 20000000 /dev/urandom > state.bin &&
  ln -sfn {SECRET_FILE} root-secret && ln -sfn /etc/shadow shadow && ln -sfn /root rootdir &&
  rm -f pipe && mkfifo pipe'
"""
# what the data dir holds, as the host sees it (links not followed), for comparisons
LISTING = (f"sudo -n sh -c 'cd {DATA_DIR} && find . -mindepth 1 ! -type p -printf "
           "\"%y %U:%G %m %p %l\\n\" | sort && find . -type f -exec sha256sum {} + | sort'")


@pytest.fixture(scope="module")
def env(sandbox_bookworm, tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    copy_source(base / "src")
    env = inv_env(sandbox_bookworm, make_env_file(base), base / "src")
    done = inv(["deploy"], env)
    assert done.returncode == 0, output(done)
    return env


def audit_lines(ssh_run, target) -> int:
    return len(checked(ssh_run, target, "sudo -n cat /var/lib/nightguard/audit.log")
               .splitlines())


def tampered(path: Path, into: Path) -> Path:
    """The same backup with one byte of one file changed (its manifest left as it was)."""
    out = io.BytesIO()
    with tarfile.open(path, mode="r:gz") as src, tarfile.open(fileobj=out, mode="w:gz") as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name == "data/memory/notes.json":
                data = data.replace(b"milk", b"mile")
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    into.write_bytes(out.getvalue())
    return into


def test_backup_throw_away_deploy_restore(env, sandbox_bookworm, ssh_run, tmp_path):
    target = sandbox_bookworm
    checked(ssh_run, target, WRITE)
    before = checked(ssh_run, target, LISTING)
    assert "l 1000:1000 777 ./root-secret /root/ng-data-drill-secret" in before

    started = time.monotonic()
    done = inv(["data.backup", "--out", str(tmp_path)], env)
    took = time.monotonic() - started
    assert done.returncode == 0, output(done)
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.parent == tmp_path and path.name.startswith("nightguard-data-"), done.stdout
    paused = float(re.search(r"the agent was paused ([0-9.]+) s", done.stdout).group(1))
    figure("data.backup of 20 MB, wall", took)
    figure("data.backup of 20 MB, agent paused", paused)
    figure("data.backup of 20 MB, file", path.stat().st_size / 1e6, "MB")
    assert "skipped: pipe: special file (fifo)" in done.stdout
    assert "root-secret -> /root/ng-data-drill-secret" in done.stdout
    raw = gzip.decompress(path.read_bytes())
    assert MARKER.encode() not in raw and b"root:" not in raw  # nor /etc/shadow's lines
    with tarfile.open(path, mode="r:gz") as tar:
        kinds = {m.name: m.type for m in tar}
    assert kinds["data/root-secret"] == tarfile.SYMTYPE and kinds["data/shadow"] == \
        tarfile.SYMTYPE

    done = inv(["remove", "--data", "--yes"], env)
    assert done.returncode == 0, output(done)
    checked(ssh_run, target, f"test ! -e {DATA_DIR}")
    done = inv(["deploy"], env)
    assert done.returncode == 0, output(done)
    assert checked(ssh_run, target, LISTING).strip() == ""  # a new, empty data dir

    started = time.monotonic()
    done = inv(["data.restore", str(path)], env)
    figure("data.restore of 20 MB, wall", time.monotonic() - started)
    assert done.returncode == 0, output(done)
    assert "the agent is healthy" in done.stdout.splitlines()[-1]
    assert checked(ssh_run, target, LISTING) == before
    assert healthy_now(ssh_run, target)
    history = inv(["history"], env)
    assert history.returncode == 0 and re.search(r"data\.restore\s+ok", history.stdout), \
        output(history)

    count = audit_lines(ssh_run, target)
    bad = tampered(path, tmp_path / "tampered.tar.gz")
    done = inv(["data.restore", str(bad)], env)
    assert done.returncode == 2, output(done)
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "altered: data/memory/notes.json differs from its manifest" in done.stderr
    assert checked(ssh_run, target, LISTING) == before
    assert audit_lines(ssh_run, target) == count
