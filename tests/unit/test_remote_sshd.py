"""The SSH executor and a host session against a real OpenSSH server on 127.0.0.1.

A throw-away sshd runs with its own host key, config and authorized key on a free loopback
port; the project's known_hosts handling, the one command's pipe, secrets that travel only
inside it, timeouts, progress lines and one-line failures are checked end to end, and so is
the real host helper behind that pipe: its lock, and the audit line it writes itself when
the connection is cut from the host's side. SSH as users configure it is checked against the
same server: an ~/.ssh/config Host alias, ProxyJump and ProxyCommand hops, an ssh-agent's
key, and the user's known_hosts next to the project's. A host being set up is waited for:
a login refused until its key file appears (a new Compute Engine VM's guest agent writing
it), a connection refused until sshd listens.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import paramiko
import pytest

from tasks.config import load_settings
from tasks.deploy.session import HostSession, LockHeld
from tasks.errors import StepFailed
from tasks.gcp import api as gcp
from tasks.gcp import ssh as gcp_ssh
from tasks.ssh import remote as remote_module
from tasks.ssh import sshconfig
from tasks.ssh.address import SshTarget
from tasks.ssh.hostlink import PipeClosed, helper_source
from tasks.ssh.remote import Remote
from tasks.ssh.targets import resolve_target
from tests.fake_gce import FakeGce
from tests.unit.hermetic import tool

SECRET = "tg-7fd1c2a9-secret-only-on-stdin"


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
    subprocess.run([tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", "", "-f",
                    str(path)],
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
    sshd_bin = tool("sshd")  # the real OpenSSH server and client, from the system's folders
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
AuthorizedKeysFile {base}/authorized_keys {base}/authorized_keys_late
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
    # OpenSSH 9.8+ shuts out an address after a few refused logins: the login wait's tests
    # would lock every later test out of 127.0.0.1. Older sshd does not know the option.
    if subprocess.run([sshd_bin, "-t", "-f", str(base / "sshd_config"), "-o",
                       "PerSourcePenalties=no"], capture_output=True).returncode == 0:
        with open(base / "sshd_config", "a") as config:
            config.write("PerSourcePenalties no\n")
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(base / "sshd_config")],
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


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    """No ~/.ssh, agent or system ssh_config of the machine running the tests."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setattr(sshconfig, "SYSTEM_CONFIG", str(tmp_path / "no-ssh_config"))
    monkeypatch.setattr(sshconfig, "GLOBAL_KNOWN_HOSTS", "")
    return home


@pytest.fixture
def remote(sshd):
    out = io.StringIO()
    with Remote(sshd.target(), connect_timeout=5, command_timeout=30, out=out) as handle:
        yield handle


def run(remote: Remote, argv: list[str], data: bytes = b"", timeout: float = 10):
    """One command through a pipe: (stdout lines, exit code)."""
    pipe = remote.open_pipe(argv, step="test")
    if data:
        pipe.send(data)
    pipe.shutdown_write()
    lines = []
    try:
        while True:
            lines.append(pipe.readline(timeout).decode())
    except PipeClosed:
        pass
    return lines, pipe.wait(timeout)


# -- the pipe ---------------------------------------------------------------------------------
def test_a_pipe_carries_lines_both_ways_and_the_exit_code(remote):
    pipe = remote.open_pipe(["sh", "-c", "while read l; do echo \"got $l\"; done; exit 3"],
                            step="echo")
    pipe.send(b"one\n")
    assert pipe.readline(5) == b"got one\n"
    pipe.send(b"two\n")
    assert pipe.readline(5) == b"got two\n"
    pipe.shutdown_write()
    with pytest.raises(PipeClosed):
        pipe.readline(5)
    assert pipe.wait(5) == 3


def test_arguments_travel_unsplit(remote):
    odd = ["a b", "it's", '"q"', "$HOME", "*", ";", ""]
    lines, code = run(remote, ["python3", "-c",
                               "import sys, json; print(json.dumps(sys.argv[1:]))", *odd])
    assert code == 0 and lines == [json.dumps(odd) + "\n"]


def test_one_connection_serves_many_commands(remote):
    seen = {run(remote, ["sh", "-c", "echo $SSH_CONNECTION"])[0][0] for _ in range(8)}
    assert len(seen) == 1  # the same client port every time
    assert remote.stats.connections == 1
    assert remote.stats.commands == 8


def test_a_secret_in_the_pipe_never_shows_in_the_process_list(remote, tmp_path):
    target = tmp_path / "secret.out"
    samples: list[str] = []
    stop = threading.Event()
    ps = tool("ps")

    def sample() -> None:
        while not stop.is_set():
            samples.append(subprocess.run([ps, "-eo", "args"], capture_output=True,
                                          text=True).stdout)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _, code = run(remote, ["sh", "-c", f"sleep 1.5; cat > {target}"], SECRET.encode())
    finally:
        stop.set()
        sampler.join()
    assert code == 0 and target.read_text() == SECRET
    assert len(samples) >= 5
    assert any("sleep 1.5" in s for s in samples)  # the sampler did see the remote command
    assert not [s for s in samples if SECRET in s]
    assert remote.stats.bytes_sent >= len(SECRET)


def test_large_data_is_delivered_exactly_and_quickly(remote):
    payload = helper_source()[0] * 4 + b"".join(f"line {i}\n".encode() for i in range(50000))
    started = time.monotonic()
    lines, code = run(remote, ["sha256sum"], payload, timeout=20)
    assert time.monotonic() - started < 5
    assert code == 0 and lines[0].split()[0] == hashlib.sha256(payload).hexdigest()


def test_silence_is_a_timeout_not_a_hang(remote):
    pipe = remote.open_pipe(["sleep", "10"], step="wait")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        pipe.readline(1)
    assert time.monotonic() - started < 3


def test_stderr_is_kept_apart_for_the_error_message(remote):
    pipe = remote.open_pipe(["sh", "-c", "echo out; echo 'sudo: a password is required' >&2"],
                            step="s")
    assert pipe.readline(5) == b"out\n"
    assert pipe.wait(5) == 0
    assert "a password is required" in pipe.stderr_tail()


# -- connecting -------------------------------------------------------------------------------
def test_a_refused_connection_is_said_to_be_refused_not_unreachable(sshd):
    port = free_port()
    started = time.monotonic()
    with Remote(sshd.target(port=port), connect_timeout=15, out=io.StringIO()) as handle:
        with pytest.raises(StepFailed) as info:
            handle.open_pipe(["true"], step="facts")
    assert time.monotonic() - started < 5  # refused at once, not after the 15 s timeout
    assert info.value.step == "connect"
    assert str(info.value) == (
        f"step 'connect' failed: root@127.0.0.1:{port}: connection refused (the host "
        f"answered, but nothing listens on port {port}: is sshd running, is the port right?)")


def test_wrong_host_key_is_refused(sshd, tmp_path):
    other = keygen(tmp_path / "other_ed25519")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    with Remote(sshd.target(known_hosts=str(known_hosts)), connect_timeout=5,
                out=io.StringIO()) as handle:
        with pytest.raises(StepFailed) as info:
            handle.open_pipe(["touch", str(tmp_path / "never")], step="facts")
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
            handle.open_pipe(["true"], step="facts")
    assert info.value.step == "connect"
    assert "host key unknown" in str(info.value)
    assert known_hosts.read_text() == ""


def test_wrong_client_key_fails_to_authenticate(sshd, tmp_path):
    keygen(tmp_path / "stranger")
    with Remote(sshd.target(key_filename=str(tmp_path / "stranger")), connect_timeout=5,
                out=io.StringIO()) as handle:
        with pytest.raises(StepFailed) as info:
            handle.open_pipe(["true"], step="facts")
    assert info.value.step == "connect"
    assert "\n" not in str(info.value)


# -- a host being set up: the login wait ---------------------------------------------------------
@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote_module, "LOGIN_RETRY_EVERY", 0.2)


def after(seconds: float, action) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()
    return timer


@pytest.fixture
def late_keys(sshd):
    """The authorized_keys file the test server also reads, written late by the test; the
    way a VM's guest agent writes the login key a while after sshd answers."""
    path = sshd.dir / "authorized_keys_late"
    yield path
    path.unlink(missing_ok=True)


def waiting_lines(out: io.StringIO) -> list[str]:
    return [line for line in out.getvalue().splitlines() if line.startswith("waiting for")]


def test_a_refused_login_is_retried_until_the_key_is_installed(sshd, tmp_path, late_keys,
                                                              quick_retries):
    public = keygen(tmp_path / "vm_key")
    timer = after(1.5, lambda: late_keys.write_text(public + "\n"))
    out = io.StringIO()
    target = sshd.target(key_filename=str(tmp_path / "vm_key"), login_wait=20,
                         login_wait_reason="the VM's guest agent to install the key for root")
    started = time.monotonic()
    with Remote(target, connect_timeout=5, out=out) as handle:
        assert whoami(handle) == f"root {sshd.port}"
    timer.join()
    assert 1.5 <= time.monotonic() - started < 8
    assert waiting_lines(out) == ["waiting for the VM's guest agent to install the key for root "
                                  "(login refused; retrying up to 20s)"]
    assert out.getvalue().splitlines()[-1].startswith("  - wait: login refused (")
    assert handle.stats.connections == 1


def test_without_a_login_wait_a_refused_key_fails_at_once(sshd, tmp_path, late_keys,
                                                         quick_retries):
    public = keygen(tmp_path / "vm_key")
    timer = after(0.5, lambda: late_keys.write_text(public + "\n"))  # too late: no retry
    out = io.StringIO()
    started = time.monotonic()
    with Remote(sshd.target(key_filename=str(tmp_path / "vm_key")), connect_timeout=5,
                out=out) as handle:
        with pytest.raises(StepFailed) as info:
            handle.open_pipe(["true"], step="facts")
    assert time.monotonic() - started < 0.5
    timer.join()
    assert str(info.value) == (f"step 'connect' failed: root@127.0.0.1:{sshd.port}: "
                               "Authentication failed.")
    assert out.getvalue() == ""


def test_a_login_still_refused_after_the_wait_fails_in_one_line(sshd, tmp_path,
                                                               quick_retries):
    keygen(tmp_path / "vm_key")
    out = io.StringIO()
    target = sshd.target(key_filename=str(tmp_path / "vm_key"), login_wait=1.2,
                         login_hint="add it with `inv vm.authorize-key`")
    started = time.monotonic()
    with Remote(target, connect_timeout=5, out=out) as handle:
        with pytest.raises(StepFailed) as info:
            handle.open_pipe(["true"], step="facts")
    assert 1.2 <= time.monotonic() - started < 5
    assert str(info.value) == (f"step 'connect' failed: root@127.0.0.1:{sshd.port}: login as "
                               f"root with {tmp_path}/vm_key refused for 1.2s: add it with "
                               "`inv vm.authorize-key`")
    assert waiting_lines(out) == ["waiting for root's login to be accepted (login refused; "
                                  "retrying up to 1.2s)"]
    assert out.getvalue().splitlines()[-1].startswith("  x wait: login refused (")
    assert handle._opened == []  # every refused attempt's connection was closed


@pytest.fixture
def new_vm(sshd, tmp_path):
    """A Compute Engine VM (the fake API) created just now, whose address is the test
    server's and whose guest agent published that server's host key; (settings, gce)."""
    fake = FakeGce(nat_ip="127.0.0.1").start()
    fake.add_instance("nightguard")
    kind, blob = (sshd.dir / "host_ed25519.pub").read_text().split()[:2]
    fake.guest_attributes["nightguard"] = {"hostkeys": {kind: blob}}
    settings = load_settings(root=tmp_path, environ={}, overrides={
        "gcp.project": fake.project, "gcp.api_endpoint": fake.endpoint, "ssh.port": sshd.port,
        "ssh.user": "root", "ssh.key_filename": str(tmp_path / "vm_key"),
        "ssh.login_wait": "20s"})
    keygen(tmp_path / "vm_key")
    yield settings, gcp.connect(settings)
    fake.stop()


def test_a_new_gcp_vm_is_waited_for_until_its_guest_agent_installs_the_key(
        new_vm, tmp_path, late_keys, quick_retries):
    settings, gce = new_vm
    out = io.StringIO()
    target = gcp_ssh.ssh_target(settings, gce, out)
    after(1.0, lambda: late_keys.write_text((tmp_path / "vm_key.pub").read_text()))
    with Remote(target, connect_timeout=5, out=out) as handle:
        assert whoami(handle).startswith("root ")
    assert waiting_lines(out) == ["waiting for the VM's guest agent to install the key for root "
                                  "(login refused; retrying up to 20s)"]


def test_a_new_gcp_vm_that_never_takes_the_key_fails_in_one_line(new_vm, tmp_path,
                                                                quick_retries):
    settings, gce = new_vm
    target = replace(gcp_ssh.ssh_target(settings, gce, io.StringIO()), login_wait=1)
    with Remote(target, connect_timeout=5, out=io.StringIO()) as handle:
        with pytest.raises(StepFailed) as info:
            handle.open_pipe(["true"], step="facts")
    assert str(info.value) == (
        f"step 'connect' failed: gcp nightguard (127.0.0.1): login as root with "
        f"{tmp_path}/vm_key refused for 1s: the key is not in the VM's ssh-keys metadata or "
        "OS Login is on: `inv vm.authorize-key` adds it (and says if OS Login is on)")


def forward_later(seconds: float, port: int, to_port: int) -> threading.Timer:
    """From ``seconds`` on, 127.0.0.1:port carries connections to to_port: an sshd that
    starts listening a while after the VM got its address."""
    def pump(src: socket.socket, dst: socket.socket) -> None:
        with src, dst, contextlib.suppress(OSError):  # a side reset at the end: done
            while data := src.recv(65536):
                dst.sendall(data)

    def serve() -> None:
        listener = socket.create_server(("127.0.0.1", port))
        conn, _ = listener.accept()
        listener.close()
        upstream = socket.create_connection(("127.0.0.1", to_port))
        threading.Thread(target=pump, args=(conn, upstream.dup()), daemon=True).start()
        pump(upstream, conn.dup())

    return after(seconds, serve)


def test_a_refused_connection_is_retried_until_sshd_listens(sshd, tmp_path, quick_retries):
    port = free_port()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(host_line(sshd).replace(f":{sshd.port} ", f":{port} "))
    forward_later(1.0, port, sshd.port)
    out = io.StringIO()
    with Remote(sshd.target(port=port, known_hosts=str(known_hosts), login_wait=20),
                connect_timeout=5, out=out) as handle:
        assert whoami(handle) == f"root {sshd.port}"
    assert waiting_lines(out) == [f"waiting for sshd at 127.0.0.1:{port} (connection refused; "
                                  "retrying up to 20s)"]


def test_after_the_wait_a_refused_connection_is_told_apart_from_a_silent_one(sshd,
                                                                            quick_retries):
    refused = free_port()
    with Remote(sshd.target(port=refused, login_wait=0.5), connect_timeout=1,
                out=io.StringIO()) as handle:
        with pytest.raises(StepFailed) as info:
            handle.open_pipe(["true"], step="facts")
    assert str(info.value) == (f"step 'connect' failed: root@127.0.0.1:{refused}: connection "
                               "refused on every try for 0.5s")
    with socket.create_server(("127.0.0.1", 0)) as silent:  # takes connections, says nothing
        port = silent.getsockname()[1]
        with Remote(sshd.target(port=port, login_wait=0.5), connect_timeout=1,
                    out=io.StringIO()) as handle:
            with pytest.raises(StepFailed) as info:
                handle.open_pipe(["true"], step="facts")
    assert str(info.value) == (f"step 'connect' failed: root@127.0.0.1:{port}: no answer "
                               "within 1s on every try for 0.5s")


# -- progress ---------------------------------------------------------------------------------
def test_step_lines_and_a_plain_line_every_few_seconds_when_not_a_terminal(remote):
    with remote.step("sync", "2 files"):
        pass
    with pytest.raises(StepFailed), remote.step("image"):
        raise StepFailed("image", "broken")
    with remote.step("health"):
        time.sleep(5.6)
    lines = remote.out.getvalue().splitlines()
    assert lines[0].startswith("  - sync: 2 files (") and lines[0].endswith("s)")
    assert lines[1].startswith("  x image (")
    assert lines[2] == "  ~ health: running (5s)"
    assert lines[3].startswith("  - health (5.")


# -- the host helper behind the pipe ---------------------------------------------------------
def session_settings(tmp_path):
    # rootless: no sudo on this machine; the helper runs as the SSH user (root here)
    return load_settings(root=tmp_path, environ={}, overrides={
        "target": "ssh", "ssh.host": "127.0.0.1", "rootless": True,
        "app_dir": str(tmp_path / "app"), "data_dir": str(tmp_path / "data")})


def host_paths(tmp_path) -> dict:
    state = tmp_path / "state"
    return {"state": str(state), "graphroot": str(tmp_path / "storage"),
            "runroot": str(tmp_path / "run"), "unit": str(tmp_path / "unit.service"),
            "unit_wants": str(tmp_path / "wants"), "markers": str(state / "markers.env"),
            "tool_path": str(tmp_path / "no-tools"),
            "tool_root": str(tmp_path / "nothing")}  # not this machine's /usr/bin/podman


def audit(tmp_path) -> list[dict]:
    path = tmp_path / "state" / "audit.log"
    assert path.exists(), "the helper wrote no audit log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_session_locks_and_a_second_one_is_told_who_holds_it(sshd, tmp_path):
    settings = session_settings(tmp_path)
    with Remote(sshd.target(), connect_timeout=5, out=io.StringIO()) as first_remote, \
            HostSession(first_remote, settings, command="deploy",
                        paths=host_paths(tmp_path)) as first:
        facts = first.facts()
        assert facts["tools"]["podman"] is None and facts["container"] is None
        with Remote(sshd.target(), connect_timeout=5, out=io.StringIO()) as other:
            with pytest.raises(LockHeld) as info:
                with HostSession(other, settings, command="deploy", paths=host_paths(tmp_path)):
                    pass
        assert "another deploy holds the lock" in str(info.value)
        assert "(deploy) since" in str(info.value)
        first.finish("no changes")
    assert [line["outcome"] for line in audit(tmp_path)] == ["no changes"]
    assert (tmp_path / "state" / "helper").is_dir()  # kept: the next run sends a few bytes


def test_a_connection_cut_on_the_host_side_is_audited_as_interrupted(sshd, tmp_path):
    settings = session_settings(tmp_path)
    with Remote(sshd.target(), connect_timeout=5, out=io.StringIO()) as handle:
        session = HostSession(handle, settings, command="deploy", paths=host_paths(tmp_path))
        session.__enter__()
        session.facts()
        session.call("dirs", step="dirs")
        helper_pid = int(json.loads((tmp_path / "state" / "lock.json").read_text())["pid"])
        sshd_child = int(open(f"/proc/{helper_pid}/stat").read().rsplit(")", 1)[1].split()[1])
        while "sshd" not in open(f"/proc/{sshd_child}/comm").read():
            sshd_child = int(open(f"/proc/{sshd_child}/stat").read().rsplit(")", 1)[1].split()[1])
        os.kill(sshd_child, 9)  # the session's sshd process: the connection is gone
        with pytest.raises(StepFailed) as info:
            session.call("dirs", step="dirs")
        assert "connection to the host lost" in str(info.value)
        session.__exit__(None, None, None)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{helper_pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = audit(tmp_path)
    assert lines[-1]["outcome"] == "interrupted" and lines[-1]["steps"] == ["dirs"]
    with Remote(sshd.target(), connect_timeout=5, out=io.StringIO()) as handle, \
            HostSession(handle, settings, command="deploy", paths=host_paths(tmp_path)) as again:
        again.finish("no changes")  # the lock went with the process


# -- SSH as the user configures it -------------------------------------------------------------
def ssh_settings(tmp_path, sshd, **more):
    return load_settings(root=tmp_path, environ={}, overrides={
        "target": "ssh", "ssh.known_hosts": str(sshd.known_hosts), **more})


def whoami(remote: Remote) -> str:
    lines, code = run(remote, ["sh", "-c", 'echo "$(id -un) ${SSH_CONNECTION##* }"'])
    assert code == 0
    return lines[0].strip()


def write_ssh_config(home: Path, text: str) -> None:
    (home / ".ssh" / "config").write_text(text)


def test_an_ssh_config_host_alias_is_followed(sshd, tmp_path, own_home):
    write_ssh_config(own_home, f"""\
Host ng-box
    HostName 127.0.0.1
    Port {sshd.port}
    User root
    IdentityFile {sshd.client_key}
""")
    target = resolve_target(ssh_settings(tmp_path, sshd, **{"ssh.host": "ng-box"}))
    assert (target.host, target.port, target.user) == ("127.0.0.1", sshd.port, "root")
    assert target.identity_files == (str(sshd.client_key),) and not target.key_filename
    assert target.describe() == f"root@127.0.0.1:{sshd.port} (ng-box)"
    with Remote(target, connect_timeout=5, out=io.StringIO()) as handle:
        assert whoami(handle) == f"root {sshd.port}"


def test_explicit_settings_win_over_ssh_config(sshd, tmp_path, own_home):
    write_ssh_config(own_home, f"""\
Host ng-box
    HostName 127.0.0.1
    Port 1
    User nobody
    IdentityFile {own_home}/.ssh/nowhere
""")
    (own_home / ".ssh" / "nowhere").write_text("")
    settings = ssh_settings(tmp_path, sshd, **{"ssh.host": "ng-box", "ssh.port": sshd.port,
                                               "ssh.user": "root",
                                               "ssh.key_filename": str(sshd.client_key)})
    target = resolve_target(settings)
    assert (target.port, target.user) == (sshd.port, "root")
    assert target.key_filename == str(sshd.client_key) and target.identity_files == ()
    with Remote(target, connect_timeout=5, out=io.StringIO()) as handle:
        assert whoami(handle) == f"root {sshd.port}"
    # a default (port 22, user ubuntu) gives way to ssh_config
    defaults = resolve_target(ssh_settings(tmp_path, sshd, **{"ssh.host": "ng-box"}))
    assert (defaults.port, defaults.user) == (1, "nobody")


JUMP_CONFIG = """\
Host 127.0.0.1
    IdentityFile {key}
Host jumpbox
    HostName 127.0.0.1
    Port {port}
    User root
    IdentityFile {key}
Host inner
    HostName {inner}
    Port {port}
    User root
    IdentityFile {key}
    ProxyJump {jump}
"""


@pytest.mark.parametrize("jump", ["jumpbox", "root@127.0.0.1:{port},jumpbox"])
def test_proxyjump_goes_through_the_jump_host(sshd, tmp_path, own_home, jump):
    write_ssh_config(own_home, JUMP_CONFIG.format(port=sshd.port, key=sshd.client_key,
                                                  inner="127.0.0.1",
                                                  jump=jump.format(port=sshd.port)))
    target = resolve_target(ssh_settings(tmp_path, sshd, **{"ssh.host": "inner"}))
    assert target.jump is not None and target.jump.host == "127.0.0.1"
    assert (target.jump.jump is not None) == ("," in jump)
    with Remote(target, connect_timeout=5, out=io.StringIO()) as handle:
        assert whoami(handle) == f"root {sshd.port}"
        # the connection's socket is a channel of the jump host's connection, not a socket
        sock = handle._connection.client.get_transport().sock
        assert isinstance(sock, paramiko.Channel)
        assert handle.stats.connections == 1
    assert f" via root@127.0.0.1:{sshd.port} (jumpbox)" in target.describe()


def test_an_unknown_host_behind_a_jump_names_that_host_and_the_line_to_pin(sshd, tmp_path,
                                                                          own_home):
    # the jump host is pinned ([127.0.0.1]:PORT); the inner name ([localhost]:PORT) is not
    write_ssh_config(own_home, JUMP_CONFIG.format(port=sshd.port, key=sshd.client_key,
                                                  inner="localhost", jump="jumpbox"))
    known_hosts = tmp_path / "pins" / "known_hosts"
    known_hosts.parent.mkdir()
    known_hosts.write_text(sshd.known_hosts.read_text())
    settings = ssh_settings(tmp_path, sshd, **{"ssh.host": "inner",
                                               "ssh.known_hosts": str(known_hosts)})
    with Remote(resolve_target(settings), connect_timeout=5, out=io.StringIO()) as handle:
        with pytest.raises(StepFailed) as info:
            handle.open_pipe(["true"], step="facts")
    message = str(info.value)
    assert "\n" not in message
    assert f"root@localhost:{sshd.port} (inner) via root@127.0.0.1:{sshd.port} (jumpbox): " \
           "host key unknown" in message
    command = message.split("pin it with `")[1].rstrip("`")
    assert command.startswith(f"echo '[localhost]:{sshd.port} ssh-ed25519 ")
    subprocess.run(command, shell=True, check=True)
    with Remote(resolve_target(settings), connect_timeout=5, out=io.StringIO()) as handle:
        assert whoami(handle) == f"root {sshd.port}"


RELAY = """\
import os, pathlib, socket, sys, threading
pathlib.Path(sys.argv[3]).touch()
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def upstream():
    while data := os.read(0, 65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
threading.Thread(target=upstream, daemon=True).start()
while data := conn.recv(65536):
    os.write(1, data)
"""


def test_a_proxycommand_carries_the_connection(sshd, tmp_path, own_home):
    """The shape of an IAP tunnel: `gcloud compute start-iap-tunnel %h %p --listen-on-stdin`."""
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    used = tmp_path / "relay-was-used"
    write_ssh_config(own_home, f"""\
Host tunnelled
    HostName 127.0.0.1
    Port {sshd.port}
    User root
    IdentityFile {sshd.client_key}
    ProxyCommand {sys.executable} {relay} %h %p {used}
""")
    target = resolve_target(ssh_settings(tmp_path, sshd, **{"ssh.host": "tunnelled"}))
    assert target.describe().endswith(" via ProxyCommand")
    with Remote(target, connect_timeout=5, out=io.StringIO()) as handle:
        assert whoami(handle) == f"root {sshd.port}"
    assert used.exists()


@pytest.fixture
def agent(tmp_path, monkeypatch):
    """A running ssh-agent of the test's own; SSH_AUTH_SOCK points at it."""
    tool("ssh-add")
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen([tool("ssh-agent"), "-D", "-a", str(sock)],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
    yield sock
    proc.terminate()
    proc.wait(timeout=5)


def ssh_add(*args: str) -> None:
    subprocess.run([tool("ssh-add"), "-q", *args], check=True, capture_output=True)


def test_the_agents_key_logs_in_when_no_key_file_is_set(sshd, tmp_path, agent):
    target = sshd.target(key_filename="")
    with Remote(target, connect_timeout=5, out=io.StringIO()) as handle:  # no key anywhere
        with pytest.raises(StepFailed) as info:
            handle.open_pipe(["true"], step="facts")
    assert info.value.step == "connect"
    ssh_add(str(sshd.client_key))
    with Remote(target, connect_timeout=5, out=io.StringIO()) as handle:
        assert whoami(handle) == f"root {sshd.port}"
    # a key file set in the settings is the only key tried: the agent's is not
    keygen(tmp_path / "stranger")
    with Remote(sshd.target(key_filename=str(tmp_path / "stranger")), connect_timeout=5,
                out=io.StringIO()) as handle:
        with pytest.raises(StepFailed):
            handle.open_pipe(["true"], step="facts")


def test_identities_only_keeps_the_agent_out(sshd, tmp_path, own_home, agent):
    ssh_add(str(sshd.client_key))
    write_ssh_config(own_home, f"Host box\n    HostName 127.0.0.1\n    Port {sshd.port}\n"
                               "    User root\n    IdentitiesOnly yes\n")
    target = resolve_target(ssh_settings(tmp_path, sshd, **{"ssh.host": "box"}))
    with Remote(target, connect_timeout=5, out=io.StringIO()) as handle:
        with pytest.raises(StepFailed):
            handle.open_pipe(["true"], step="facts")


# -- host keys: the project's pins first, then what the user's ssh already knows ----------------
def host_line(sshd, key: str | None = None) -> str:
    return f"[127.0.0.1]:{sshd.port} {key or (sshd.dir / 'host_ed25519.pub').read_text()}"


@pytest.mark.parametrize("hashed", [False, True])  # Debian's ssh_config: HashKnownHosts yes
def test_the_users_known_hosts_serve_when_the_project_has_no_pin(sshd, tmp_path, own_home,
                                                                 hashed):
    user_file = own_home / ".ssh" / "known_hosts"
    user_file.write_text(host_line(sshd))
    if hashed:
        subprocess.run([tool("ssh-keygen"), "-H", "-f", str(user_file)], check=True,
                       capture_output=True)
        assert user_file.read_text().startswith("|1|")
    target = resolve_target(ssh_settings(tmp_path, sshd, **{
        "ssh.host": "127.0.0.1", "ssh.port": sshd.port, "ssh.user": "root",
        "ssh.key_filename": str(sshd.client_key),
        "ssh.known_hosts": str(tmp_path / "empty_known_hosts")}))
    assert target.other_known_hosts[0] == str(user_file)
    with Remote(target, connect_timeout=5, out=io.StringIO()) as handle:
        assert whoami(handle) == f"root {sshd.port}"


def test_a_project_pin_decides_over_the_users_file(sshd, tmp_path, own_home):
    stale = keygen(tmp_path / "stale_ed25519")
    user_file = own_home / ".ssh" / "known_hosts"
    user_file.write_text(host_line(sshd, stale) + "\n")
    with Remote(sshd.target(other_known_hosts=(str(user_file),)), connect_timeout=5,
                out=io.StringIO()) as handle:  # the project's file has the right key
        assert whoami(handle) == f"root {sshd.port}"
    project = tmp_path / "project_known_hosts"
    project.write_text(host_line(sshd, stale) + "\n")
    user_file.write_text(host_line(sshd))
    with Remote(sshd.target(known_hosts=str(project), other_known_hosts=(str(user_file),)),
                connect_timeout=5, out=io.StringIO()) as handle:
        with pytest.raises(StepFailed) as info:
            handle.open_pipe(["true"], step="facts")
    assert f"host key does not match {project}" in str(info.value)


def test_a_revoked_key_is_refused_even_where_it_is_listed(sshd, tmp_path):
    key = (sshd.dir / "host_ed25519.pub").read_text().strip()
    user_file = tmp_path / "user_known_hosts"
    user_file.write_text(f"{host_line(sshd)}@revoked * {key}\n")
    with Remote(sshd.target(known_hosts="", other_known_hosts=(str(user_file),)),
                connect_timeout=5, out=io.StringIO()) as handle:
        with pytest.raises(StepFailed) as info:
            handle.open_pipe(["true"], step="facts")
    assert "is marked @revoked" in str(info.value)


def test_the_unknown_key_error_shows_its_fingerprint_and_the_command_that_pins_it(sshd,
                                                                                  tmp_path):
    tool("ssh-keyscan")  # the command the message names is run as given, from PATH
    known_hosts = tmp_path / "pins" / "known_hosts"  # its directory does not exist yet
    with Remote(sshd.target(known_hosts=str(known_hosts)), connect_timeout=5,
                out=io.StringIO()) as handle:
        with pytest.raises(StepFailed) as info:
            handle.open_pipe(["true"], step="facts")
    message = str(info.value)
    fingerprint = subprocess.run([tool("ssh-keygen"), "-lf",
                                  str(sshd.dir / "host_ed25519.pub")],
                                 capture_output=True, text=True, check=True).stdout.split()[1]
    assert f"it offered ssh-ed25519 {fingerprint}:" in message
    command = message.split("pin it with `")[1].rstrip("`")
    assert command == (f"mkdir -p {known_hosts.parent} && ssh-keyscan -t ed25519 "
                       f"-p {sshd.port} 127.0.0.1 >> {known_hosts}")
    subprocess.run(command, shell=True, check=True, capture_output=True)
    with Remote(sshd.target(known_hosts=str(known_hosts)), connect_timeout=5,
                out=io.StringIO()) as handle:
        assert whoami(handle) == f"root {sshd.port}"
