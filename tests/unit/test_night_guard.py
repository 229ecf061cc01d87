"""Run the reference Night Guard agent as a subprocess with temporary dirs."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = ROOT / "execution" / "system"
AGENT = SYSTEM / "night_guard.py"
TOKEN = "987654:telegram-token-never-logged"
GEMINI = "gemini-key-never-logged"
INTERVAL = 0.05


class Agent:
    def __init__(self, tmp_path, secrets=None, **extra_env):
        self.secrets_dir = tmp_path / "secrets"
        self.secrets_dir.mkdir()
        if secrets is None:
            secrets = {"telegram_bot_token": TOKEN, "gemini_api_key": GEMINI}
        for name, value in secrets.items():
            (self.secrets_dir / name).write_text(value + "\n")
        self.heartbeat = tmp_path / "run" / "heartbeat"
        self.control = tmp_path / "run" / "control"
        self.log_path = tmp_path / "agent.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NG_")}
        env.update(
            NG_SECRETS_DIR=str(self.secrets_dir),
            NG_HEARTBEAT_FILE=str(self.heartbeat),
            NG_HEARTBEAT_INTERVAL=str(INTERVAL),
            NG_CONTROL_DIR=str(self.control),
        )
        env.update(extra_env)
        self._log = open(self.log_path, "wb")  # a file, not a pipe: never blocks the agent
        # cwd elsewhere and a plain script path: no "python -m", no package import.
        self.proc = subprocess.Popen(
            [sys.executable, str(AGENT)],
            cwd=tmp_path,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self):
        return self.log_path.read_text()

    def wait_for(self, predicate, timeout=5.0, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        if predicate():
            return
        pytest.fail(f"timed out waiting for {what}; rc={self.proc.poll()}\n{self.output()}")

    def wait_log(self, text, timeout=5.0):
        self.wait_for(lambda: text in self.output(), timeout, repr(text))

    def heartbeat_mtime(self):
        try:
            return self.heartbeat.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def wait_running(self):
        self.wait_log("running")
        self.wait_for(lambda: self.heartbeat_mtime() is not None, what="first heartbeat")

    def control_file(self, name, text=""):
        tmp = self.control / f".{name}.tmp"
        tmp.write_text(text)
        tmp.rename(self.control / name)

    def wait_exit(self, timeout=5.0):
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait_exit()


@pytest.fixture
def start(tmp_path):
    agents = []

    def _start(**kwargs):
        agents.append(Agent(tmp_path, **kwargs))
        return agents[-1]

    yield _start
    for agent in agents:
        agent.stop()


def test_heartbeats_from_the_main_loop(start):
    agent = start()
    agent.wait_running()
    first = agent.heartbeat_mtime()
    agent.wait_for(lambda: agent.heartbeat_mtime() != first, what="a second heartbeat")
    content = float(agent.heartbeat.read_text())
    assert abs(content - time.time()) < 5
    out = agent.output()
    assert "secret telegram_bot_token loaded" in out
    assert "secret gemini_api_key loaded" in out
    assert TOKEN not in out and GEMINI not in out
    assert agent.control.is_dir()


def test_sigterm_exits_zero_fast(start):
    agent = start(NG_HEARTBEAT_INTERVAL="30")  # asleep in a long wait
    agent.wait_running()
    began = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=2) == 0
    assert time.monotonic() - began < 1.0
    assert "received SIGTERM, stopping" in agent.output()


def test_sigint_exits_zero(start):
    agent = start()
    agent.wait_running()
    agent.proc.send_signal(signal.SIGINT)
    assert agent.wait_exit(timeout=2) == 0
    assert "Traceback" not in agent.output()


def test_missing_secret_exits_nonzero_without_values(start):
    agent = start(secrets={"telegram_bot_token": TOKEN})
    assert agent.wait_exit() == 2
    out = agent.output()
    assert "gemini_api_key is missing" in out
    assert TOKEN not in out
    assert not agent.heartbeat.exists()


def test_empty_secret_exits_nonzero(start):
    agent = start(secrets={"telegram_bot_token": TOKEN, "gemini_api_key": "  "})
    assert agent.wait_exit() == 2
    assert "gemini_api_key is empty" in agent.output()
    assert TOKEN not in agent.output()


def test_required_secret_names_from_env(start):
    agent = start(secrets={"only_one": "v4lue"}, NG_REQUIRED_SECRETS="only_one")
    agent.wait_log("secret only_one loaded")
    assert "v4lue" not in agent.output()


def test_crash_control_file_exits_3(start):
    agent = start()
    agent.wait_running()
    agent.control_file("crash")
    assert agent.wait_exit() == 3
    assert not (agent.control / "crash").exists()


def test_hang_makes_heartbeat_stale_while_alive(start):
    agent = start()
    agent.wait_running()
    agent.control_file("hang")
    agent.wait_log("hang requested")
    assert not (agent.control / "hang").exists()  # removed before hanging
    time.sleep(INTERVAL * 2)  # let a beat already under way land
    frozen = agent.heartbeat_mtime()
    time.sleep(INTERVAL * 8)
    assert agent.proc.poll() is None
    assert agent.heartbeat_mtime() == frozen
    agent.proc.send_signal(signal.SIGTERM)  # a hung agent still stops cleanly
    assert agent.wait_exit(timeout=2) == 0


def test_allocate_mb_touches_and_keeps_memory(start):
    agent = start()
    agent.wait_running()
    agent.control_file("allocate_mb", "8\n")
    agent.wait_log("allocated 8 MB")
    assert not (agent.control / "allocate_mb").exists()
    status = Path(f"/proc/{agent.proc.pid}/status").read_text()
    rss_kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
    assert rss_kb > 8 * 1024  # the pages were touched, not just reserved
    before = agent.heartbeat_mtime()
    agent.wait_for(lambda: agent.heartbeat_mtime() != before, what="heartbeat after allocating")


def test_allocate_mb_rejects_garbage(start):
    agent = start()
    agent.wait_running()
    agent.control_file("allocate_mb", "lots")
    agent.wait_log("ignoring allocate_mb")
    assert agent.proc.poll() is None


def _load(name):
    spec = importlib.util.spec_from_file_location(f"ng_{name}", SYSTEM / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_beat_is_atomic_and_leaves_no_temp_files(tmp_path):
    hb = _load("heartbeat")
    path = tmp_path / "deep" / "dir" / "heartbeat"
    hb.beat(str(path), now=1234.5)
    assert path.read_text() == "1234.500\n"
    assert os.listdir(path.parent) == ["heartbeat"]


def test_beat_with_fields_writes_what_the_health_check_reads(tmp_path):
    hb, hc = _load("heartbeat"), _load("health_check")
    path = tmp_path / "heartbeat"
    hb.beat(str(path), fields={"polled_at": 1234.5, "poll_timeout": 10})
    assert path.read_text() == '{"polled_at":1234.5,"poll_timeout":10}\n'
    assert hc.check_polling(str(path), now=1240.0, margin=30)["state"] == "polling"
    hb.beat(str(path), fields={"token": "rejected"})
    assert hc.check_polling(str(path), now=1240.0, margin=30)["state"] == "token_rejected"
    assert os.listdir(tmp_path) == ["heartbeat"]


def test_heartbeat_thread_beats_until_stopped(tmp_path):
    hb = _load("heartbeat")
    path = tmp_path / "heartbeat"
    thread = hb.HeartbeatThread(interval=0.02, path=str(path))
    thread.start()
    try:
        deadline = time.monotonic() + 2
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert path.exists()
        assert thread.daemon
    finally:
        thread.stop(timeout=1)
    assert not thread.is_alive()


@pytest.mark.parametrize("interval", ["0", "-1", "soon", "nan"])
def test_bad_interval_exits_nonzero(start, interval):
    agent = start(NG_HEARTBEAT_INTERVAL=interval)
    assert agent.wait_exit() == 2
    assert "NG_HEARTBEAT_INTERVAL" in agent.output()
