"""deployment/ng-supervise, the container's PID 1, run for real: a real agent process, real
signals, and a real datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SUPERVISE = Path(__file__).resolve().parents[2] / "deployment" / "ng-supervise"

# an agent: beats `BEATS` times every `EVERY` s (the file's content from `CONTENT`), then
# sleeps; prints its pid and whether it saw NOTIFY_SOCKET; exits with EXIT if set
AGENT = r"""
import json, os, sys, time
path = os.environ["NG_HEARTBEAT_FILE"]
print("pid", os.getpid(), "notify", "NOTIFY_SOCKET" in os.environ, flush=True)
if os.environ.get("IGNORE_TERM"):
    import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.environ.get("EXIT"):
    sys.exit(int(os.environ["EXIT"]))
time.sleep(float(os.environ.get("FIRST", "0")))
for _ in range(int(os.environ.get("BEATS", "1000"))):
    content = os.environ.get("CONTENT", "1")
    content = content.replace("NOW", str(time.time()))
    with open(path + ".tmp", "w") as fh:
        fh.write(content)
    os.replace(path + ".tmp", path)
    time.sleep(float(os.environ.get("EVERY", "0.2")))
time.sleep(3600)
"""


class NotifySocket:
    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def drain(self, seconds: float) -> list[str]:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(256).decode()))
            except TimeoutError:
                pass
        return [m for _, m in self.messages]


def start(tmp_path: Path, notify: bool = True, **env) -> tuple[subprocess.Popen, NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock") if notify else None
    environ = {"PATH": os.environ["PATH"], "NG_HEARTBEAT_FILE": str(tmp_path / "heartbeat"),
               "NG_WATCHDOG_SEC": "4", "NG_HEARTBEAT_MAX_AGE": "1.5",
               **({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")} if notify else {}),
               **{k: str(v) for k, v in env.items()}}
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(SUPERVISE), sys.executable,
                             "-c", AGENT], env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, sock


def finish(proc: subprocess.Popen, timeout: float = 10) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_the_agents_exit_code_is_the_containers():
    proc = subprocess.run([sys.executable, str(SUPERVISE), "sh", "-c", "exit 3"],
                          capture_output=True, timeout=10)
    assert proc.returncode == 3
    killed = subprocess.run([sys.executable, str(SUPERVISE), "sh", "-c", "kill -9 $$"],
                            capture_output=True, timeout=10)
    assert killed.returncode == 128 + 9


def test_no_command_and_a_missing_one_are_one_line_each():
    empty = subprocess.run([sys.executable, str(SUPERVISE)], capture_output=True, text=True)
    assert empty.returncode == 2 and empty.stderr.startswith("ng-supervise: usage")
    missing = subprocess.run([sys.executable, str(SUPERVISE), "/nonexistent/agent"],
                             capture_output=True, text=True, timeout=10)
    assert missing.returncode == 127 and "cannot run /nonexistent/agent" in missing.stderr


def test_ready_after_the_first_beat_then_pings_while_it_beats(tmp_path):
    proc, sock = start(tmp_path, FIRST=1.0)
    early = sock.drain(0.8)
    assert early == []  # no beat yet: not ready
    messages = sock.drain(3.5)
    assert messages[0] == "READY=1" and messages.count("READY=1") == 1
    assert messages.count("WATCHDOG=1") >= 2  # every NG_WATCHDOG_SEC/4 = 1 s
    proc.send_signal(signal.SIGTERM)
    code, out, _ = finish(proc)
    assert code == 0
    assert "notify False" in out  # the socket is the supervisor's, not the agent's


def test_a_hung_agent_is_killed_and_the_container_says_hung(tmp_path):
    # three beats, then the agent sleeps on: stale 1.5 s after its last beat -> SIGKILL,
    # exit 120, at that moment rather than at the next regular check
    proc, sock = start(tmp_path, BEATS=3, EVERY=0.2, NG_WATCHDOG_SEC=20)
    code, _, err = finish(proc, timeout=20)
    messages = sock.drain(0.2)
    assert code == 120, err
    assert messages[0] == "READY=1", messages
    assert re.search(r"ng-supervise: the heartbeat is \d+ s old \(limit 1.5 s\): the agent is "
                     r"hung, killing it \(the container exits 120; systemd restarts it\)", err), err
    assert err.count("killing it") == 1


def test_an_agent_that_never_beats_is_hung_after_its_grace(tmp_path):
    proc, sock = start(tmp_path, FIRST=3600, NG_LIVENESS_GRACE=1)
    code, _, err = finish(proc, timeout=20)
    assert code == 120 and "no heartbeat file: the agent is hung" in err, err
    assert "READY=1" not in sock.drain(0.1)  # never ready: systemd's start times out too


@pytest.mark.parametrize("content, code", [
    ('{"polled_at": 1000.0, "poll_timeout": 10}', 121),  # a deaf bot
    ('{"polled_at": NOW, "poll_timeout": 0.5}', None),  # polling: alive
    ('{"token": "rejected"}', None),  # alive: a restart cannot fix a revoked token
])
def test_polling_progress_decides_life_and_death(tmp_path, content, code):
    proc, sock = start(tmp_path, CONTENT=content, NG_POLL_MARGIN=1)
    messages = sock.drain(2.5)
    if code is None:
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
    got, _, err = finish(proc)
    assert messages[0] == "READY=1", messages
    if code is None:
        assert got == 0 and "WATCHDOG=1" in messages and "killing" not in err, err
    else:
        assert got == code and "polling made no progress for" in err and \
            "the agent is deaf, killing it (the container exits 121" in err, err


def test_sighup_restarts_the_agent_in_place_and_sigkills_one_that_ignores_term(tmp_path):
    proc, sock = start(tmp_path, IGNORE_TERM=1, NG_STOP_GRACE=1)
    sock.drain(0.8)
    proc.send_signal(signal.SIGHUP)
    sock.drain(2.5)
    assert proc.poll() is None  # still running: the agent was restarted, not the container
    proc.send_signal(signal.SIGINT)  # the new agent ignores TERM, not INT
    code, out, err = finish(proc)
    pids = [line.split()[1] for line in out.splitlines() if line.startswith("pid ")]
    assert len(pids) == 2 and pids[0] != pids[1], out
    assert "did not stop within 1 s: SIGKILL" in err
    assert code == 0


def test_without_a_notify_socket_it_only_supervises(tmp_path):
    proc, _ = start(tmp_path, notify=False)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 0 and out.startswith("pid ") and err == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace of its own needs root")
def test_orphans_are_reaped_as_pid_1(tmp_path):
    # in a PID namespace of its own, as in the container: a grandchild whose parent is gone
    # is the supervisor's to reap; the agent looks for zombies after it ended
    script = ("(sleep 0.2 &); sleep 1; "
              "for f in /proc/[0-9]*/stat; do read -r pid comm state rest < $f; "
              "echo $pid $state; done")
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                           str(SUPERVISE), "sh", "-c", script],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    states = dict(line.split() for line in done.stdout.splitlines())
    assert states.get("1") == "S", states  # the supervisor is PID 1 there
    assert "Z" not in states.values(), states


def test_heartbeat_json_is_read_as_the_contract_says(tmp_path):
    # the file the reference agents write (execution/system/heartbeat.py) parses here
    beat = json.dumps({"polled_at": time.time(), "poll_timeout": 10})
    proc, sock = start(tmp_path, CONTENT=beat.replace(str(json.loads(beat)["polled_at"]),
                                                      "NOW"))
    messages = sock.drain(1.5)
    proc.send_signal(signal.SIGTERM)
    finish(proc)
    assert "WATCHDOG=1" in messages


@pytest.mark.parametrize("content, age, code, says", [
    ("1", 0, 0, "alive"),
    ("1", 60, 1, "the heartbeat is 60 s old (limit 1.5 s)"),
    ('{"polled_at": 1000.0, "poll_timeout": 10}', 0, 1, "polling made no progress"),
    ('{"token": "rejected"}', 0, 0, "alive"),
])
def test_alive_is_the_same_rule_as_an_exec_probe(tmp_path, content, age, code, says):
    heartbeat = tmp_path / "heartbeat"
    heartbeat.write_text(content)
    os.utime(heartbeat, (time.time() - age, time.time() - age))
    done = subprocess.run([sys.executable, str(SUPERVISE), "--alive"], capture_output=True,
                          text=True, timeout=10,
                          env={"NG_HEARTBEAT_FILE": str(heartbeat), "NG_HEARTBEAT_MAX_AGE": "1.5"})
    assert done.returncode == code and says in done.stdout, done


def test_alive_without_a_heartbeat_is_not(tmp_path):
    done = subprocess.run([sys.executable, str(SUPERVISE), "--alive"], capture_output=True,
                          text=True, timeout=10,
                          env={"NG_HEARTBEAT_FILE": str(tmp_path / "none")})
    assert done.returncode == 1 and done.stdout.strip() == "no heartbeat file"
