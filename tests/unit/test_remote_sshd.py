"""The SSH executor against a real OpenSSH server on 127.0.0.1 (no mocks).

A throw-away sshd runs with its own host key, config and authorized key on a free loopback
port; the project's known_hosts handling, stdin-only secrets, dry-run, timeouts and the
one-line failures are checked end to end.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.deploy.envfile import SecretValues
from tasks.deploy.facts import helper_source
from tasks.deploy.remote import Remote, SshTarget
from tasks.errors import StepFailed

SSHD = "/usr/sbin/sshd"
SECRET = "tg-7fd1c2a9-secret-only-on-stdin"

pytestmark = pytest.mark.skipif(
    not os.path.exists(SSHD),
    reason=f"{SSHD} is absent (install openssh-server; scripts/bootstrap.sh does)")


@dataclass(frozen=True)
class Server:
    port: int
    dir: Path
    client_key: Path
    known_hosts: Path

    def target(self, **changes) -> SshTarget:
        values = {"host": "127.0.0.1", "port": self.port, "user": "root",
                  "key_filename": str(self.client_key), "known_hosts": str(self.known_hosts)}
        values.update(changes)
        return SshTarget(**values)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)],
                   check=True, capture_output=True)
    return path.with_suffix(".pub").read_text().strip()


def wait_for_port(port: int, proc: subprocess.Popen, deadline: float = 10.0) -> None:
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited {proc.returncode}: {proc.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                if sock.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on {port} within {deadline}s")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> Server:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is absent (install openssh-client)")
    base = tmp_path_factory.mktemp("sshd")
    host_pub = keygen(base / "host_ed25519")
    client_pub = keygen(base / "client_ed25519")
    (base / "authorized_keys").write_text(client_pub + "\n")
    port = free_port()
    (base / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {base}/host_ed25519
PidFile {base}/sshd.pid
AuthorizedKeysFile {base}/authorized_keys
UsePAM no
PermitRootLogin yes
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
Subsystem sftp internal-sftp
# bash sources ~/.bashrc for commands run by sshd unless it is a nested shell; a slow
# .bashrc on the test machine would otherwise cost every command half a second.
SetEnv SHLVL=1
MaxSessions 100
MaxStartups 100
LogLevel ERROR
""")
    known_hosts = base / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(base / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, proc)
        yield Server(port=port, dir=base, client_key=base / "client_ed25519",
                     known_hosts=known_hosts)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def remote(sshd):
    out = io.StringIO()
    with Remote(sshd.target(), connect_timeout=5, command_timeout=30, out=out) as handle:
        yield handle


# -- running commands -------------------------------------------------------------------------
def test_run_returns_stdout_and_exit_code(remote):
    result = remote.run(["echo", "hello world"], step="echo")
    assert result.stdout == "hello world\n"
    assert result.exited == 0 and result.ok
    failed = remote.run(["sh", "-c", "echo out; echo err >&2; exit 3"], step="exit", check=False)
    assert (failed.stdout, failed.stderr, failed.exited, failed.ok) == ("out\n", "err\n", 3, False)


def test_arguments_travel_unsplit(remote):
    odd = ["a b", "it's", '"q"', "$HOME", "*", ";", ""]
    result = remote.run(["python3", "-c", "import sys, json; print(json.dumps(sys.argv[1:]))",
                         *odd], step="argv")
    assert result.stdout.strip() == json.dumps(odd)


def test_one_connection_serves_many_commands(remote):
    seen = {remote.run(["sh", "-c", "echo $SSH_CONNECTION"], step=f"n{i}").stdout
            for i in range(12)}
    assert len(seen) == 1  # the same client port every time
    assert remote.stats.connections == 1
    assert remote.stats.commands == 12


def test_stdin_secret_reaches_the_command_and_never_the_process_list(remote, sshd, tmp_path):
    target = tmp_path / "secret.out"
    samples: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                          text=True).stdout)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        remote.run(["sh", "-c", f"sleep 1.5; cat > {target}"], step="secret", stdin=SECRET)
    finally:
        stop.set()
        sampler.join()
    assert target.read_text() == SECRET
    assert len(samples) >= 5
    assert any("sleep 1.5" in s for s in samples)  # the sampler did see the remote command
    assert not [s for s in samples if SECRET in s]
    assert remote.stats.bytes_sent >= len(SECRET)


def test_stdin_secret_is_not_in_the_remote_environment(remote):
    result = remote.run(["sh", "-c", "cat >/dev/null; env"], step="env", stdin=SECRET)
    assert result.ok and SECRET not in result.stdout


def test_large_stdin_is_delivered_exactly_and_quickly(remote):
    # The host helper travels on stdin; it must not trickle in byte by byte.
    payload = helper_source()[0] + "".join(f"line {i} äöü\n" for i in range(20000))
    started = time.monotonic()
    result = remote.run(["sha256sum"], step="hash", stdin=payload, timeout=20)
    assert time.monotonic() - started < 5
    assert result.stdout.split()[0] == hashlib.sha256(payload.encode()).hexdigest()


# -- dry run ----------------------------------------------------------------------------------
def test_dry_run_prints_and_does_not_change_anything(sshd, tmp_path):
    marker = tmp_path / "marker"
    out = io.StringIO()
    with Remote(sshd.target(), dry_run=True, connect_timeout=5, out=out) as handle:
        result = handle.run(["touch", str(marker)], step="touch")
        handle.run(["podman", "secret", "create", "t", "-"], step="secret", stdin=SECRET)
        handle.put(b"data", str(tmp_path / "uploaded"), step="upload")
        assert result.ok and result.stdout == ""
        assert handle.stats.connections == 0  # nothing needed the host yet
        read = handle.run(["echo", "read only"], step="read", changes=False)
        assert read.stdout == "read only\n"
        assert handle.stats.connections == 1
    shown = out.getvalue()
    assert f"would run: touch {marker}" in shown
    assert "would run: podman secret create t -  (stdin: redacted)" in shown
    assert "would upload 4 bytes" in shown
    assert SECRET not in shown
    assert not marker.exists()
    assert not (tmp_path / "uploaded").exists()
    assert handle.stats.dry_run_commands == [f"touch {marker}", "podman secret create t -"]


# -- failures ---------------------------------------------------------------------------------
def test_timeout_names_the_step(remote):
    started = time.monotonic()
    with pytest.raises(StepFailed) as info:
        remote.run(["sleep", "10"], step="wait-healthy", timeout=1)
    assert time.monotonic() - started < 5
    assert info.value.step == "wait-healthy"
    assert str(info.value) == "step 'wait-healthy' failed: `sleep 10` timed out after 1s"


def test_non_zero_exit_is_one_line_with_command_and_stderr_tail(sshd):
    secrets = SecretValues({"telegram_bot_token": SECRET})
    script = f"echo first >&2; echo 'rejected token {SECRET}' >&2; exit 4"
    with Remote(sshd.target(), connect_timeout=5, redact=secrets.redact,
                out=io.StringIO()) as handle:
        with pytest.raises(StepFailed) as info:
            handle.run(["sh", "-c", script], step="secrets")
    message = str(info.value)
    assert "\n" not in message
    assert SECRET not in message
    assert info.value.step == "secrets"
    assert message.startswith("step 'secrets' failed: `sh -c ")
    assert "rejected token [REDACTED]" in message.split("exited 4:")[0]  # command, redacted
    assert message.endswith("exited 4: rejected token [REDACTED]")
    assert "first" not in message.split("exited 4:")[1]  # only the tail


def test_non_zero_exit_without_stderr_uses_stdout(remote):
    with pytest.raises(StepFailed) as info:
        remote.run(["sh", "-c", "echo only-stdout; exit 2"], step="s")
    assert str(info.value).endswith("exited 2: only-stdout")


def test_unreachable_port(sshd):
    port = free_port()
    with Remote(sshd.target(port=port), connect_timeout=2, out=io.StringIO()) as handle:
        with pytest.raises(StepFailed) as info:
            handle.run(["true"], step="facts")
    assert info.value.step == "connect"
    assert f"root@127.0.0.1:{port} unreachable within 2s" in str(info.value)
    assert "\n" not in str(info.value)


def test_wrong_host_key_is_refused(sshd, tmp_path):
    other = keygen(tmp_path / "other_ed25519")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    with Remote(sshd.target(known_hosts=str(known_hosts)), connect_timeout=5,
                out=io.StringIO()) as handle:
        with pytest.raises(StepFailed) as info:
            handle.run(["touch", str(tmp_path / "never")], step="facts")
    assert info.value.step == "connect"
    assert "host key does not match" in str(info.value)
    assert str(known_hosts) in str(info.value)
    assert not (tmp_path / "never").exists()


def test_unknown_host_key_is_refused_not_added(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    with Remote(sshd.target(known_hosts=str(known_hosts)), connect_timeout=5,
                out=io.StringIO()) as handle:
        with pytest.raises(StepFailed) as info:
            handle.run(["true"], step="facts")
    assert info.value.step == "connect"
    assert "host key unknown" in str(info.value)
    assert known_hosts.read_text() == ""


def test_wrong_client_key_fails_to_authenticate(sshd, tmp_path):
    keygen(tmp_path / "stranger")
    with Remote(sshd.target(key_filename=str(tmp_path / "stranger")), connect_timeout=5,
                out=io.StringIO()) as handle:
        with pytest.raises(StepFailed) as info:
            handle.run(["true"], step="facts")
    assert info.value.step == "connect"
    assert "\n" not in str(info.value)


# -- upload -----------------------------------------------------------------------------------
def test_put_uploads_over_the_same_connection(remote, tmp_path):
    remote.run(["true"], step="first")
    data = bytes(range(256)) * 1024
    path = tmp_path / "delta.tar.gz"
    remote.put(data, str(path), step="upload", mode=0o640)
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o640
    assert remote.stats.connections == 1
    assert remote.stats.bytes_sent >= len(data)
    assert remote.run(["stat", "-c", "%s", str(path)], step="size").stdout.strip() == \
        str(len(data))


def test_put_to_a_missing_directory_is_a_step_failure(remote, tmp_path):
    with pytest.raises(StepFailed) as info:
        remote.put(b"x", str(tmp_path / "no" / "such" / "dir" / "f"), step="upload")
    assert info.value.step == "upload"
    assert "upload to" in str(info.value) and "failed" in str(info.value)


def test_step_progress_lines(remote):
    with remote.step("sync", "2 files"):
        remote.run(["true"], step="sync")
    with pytest.raises(StepFailed), remote.step("image"):
        remote.run(["false"], step="image")
    lines = remote.out.getvalue().splitlines()
    assert lines[0].startswith("  - sync: 2 files (") and lines[0].endswith("s)")
    assert lines[1].startswith("  x image (")
