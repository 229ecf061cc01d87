"""`inv vm.move` between two lab VMs, the Compute API side against the fake (tests/fake_gce):
the agent - a small Telegram poller that keeps its offset in /data - runs on the first VM;
the move is first cut half-way by a dropped connection (every SSH connection hung up while
the data is put in place on the new VM, this machine's network gone for 20 s): the move
undoes itself, and the agent runs on the old VM again; moved once more, it is cut by Ctrl-C
(SIGINT to inv's process group) once the old agent is stopped, and run again, which
finishes it. Throughout: at most one agent process on the two
VMs at every sample, no getUpdates overlapping another at the fake Bot API (no 409), every
message answered once; after it, the data files identical on the new VM, the old VM stopped
through the API and marked, `inv health` on each saying which one is live, and the move in
both VMs' audit logs.

Both VMs answer on this machine's loopback (QEMU's forwarded ports): the fake gives the new
VM the address 127.0.0.2 and the old one 127.0.0.3, and relays here pass those to each VM's
port, so each VM has an address and a port of its own the way two cloud VMs do - and the
relays can drop every connection at once, the way a laptop's network goes away.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import threading
import time

import pytest

from tasks.deploy.commands import unit_name
from tests.e2e.deploy_helpers import (
    CONTAINER,
    audit,
    checked,
    copy_source,
    figure,
    inv,
    make_env_file,
    output,
    start_inv,
)
from tests.e2e.test_agent_telegram import laptop_address
from tests.fake_gce import FakeGce
from tests.fakes.telegram_api import FakeTelegram

BOT_TOKEN = "424242:e2e-move-bot-token-Qp3"
GEMINI_KEY = "gem-e2e-move-7c1d"
DATA_DIR = "/home/ubuntu/97layerOS-data"
AGENT = "python3 /app/execution/e2e_move_poller.py"
POLLER = '''"""The move drill's agent: long-polls getUpdates, answers each message once, keeps its
offset in the data dir (so it travels with the data), beats with its polling progress, and
stops at the end of its current poll on SIGTERM."""
import json, os, signal, sys, time, urllib.parse, urllib.request
sys.path.insert(0, "/app/execution/system")
import heartbeat  # noqa: E402

API = os.environ["NG_TELEGRAM_API_BASE"]
SECRETS = os.environ.get("NG_SECRETS_DIR", "/run/secrets")
TOKEN = open(os.path.join(SECRETS, "telegram_bot_token")).read().strip()
OFFSET = os.path.join(os.environ.get("NG_DATA_DIR", "/data"), "e2e-offset.json")
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))


def call(method, params, timeout):
    body = urllib.parse.urlencode(params).encode()
    with urllib.request.urlopen(API + TOKEN + "/" + method, data=body, timeout=timeout) as r:
        return json.load(r)


try:
    offset = json.load(open(OFFSET))["offset"]
except (OSError, ValueError, KeyError):
    offset = 0
polled = time.time()
heartbeat.beat(fields={"polled_at": polled, "poll_timeout": 5})
while not stopping:
    try:
        answer = call("getUpdates", {"offset": offset, "timeout": 5}, 20)
        for update in answer.get("result", []):
            message = update.get("message") or {}
            if message:
                call("sendMessage", {"chat_id": message["chat"]["id"],
                                     "text": "seen: " + message.get("text", ""),
                                     "reply_to_message_id": message["message_id"]}, 20)
            offset = update["update_id"] + 1
            with open(OFFSET + ".tmp", "w") as handle:
                json.dump({"offset": offset}, handle)
            os.replace(OFFSET + ".tmp", OFFSET)
    except Exception as exc:  # noqa: BLE001
        print("poll failed:", type(exc).__name__, flush=True)
        time.sleep(1)
    polled = time.time()
    heartbeat.beat(fields={"polled_at": polled, "poll_timeout": 5})
'''
KNOWN = {"memory/notes.json": '{"remember": "the milk"}', "state/counter.txt": "41\n",
         "blob.bin": None}  # None: 2 MB of random bytes


class Relay:
    """Passes every connection to ``listen`` on to ``to`` (a thread per connection);
    ``drop(seconds)`` is this machine's network gone for a while: every connection passed
    on is hung up at once, and new ones are hung up on as soon as they come, until it is
    back."""

    def __init__(self, listen: tuple[str, int], to: tuple[str, int]):
        self.to, self.live, self.down_until = to, set(), 0.0
        self.server = socket.create_server(listen)
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self, seconds: float) -> int:
        """Hangs up every connection; returns how many there were."""
        self.down_until = time.monotonic() + seconds
        hung = list(self.live)
        for sock in hung:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(hung) // 2

    def close(self) -> None:
        self.drop(0)
        self.server.shutdown(socket.SHUT_RDWR)  # wakes accept(): a close alone keeps the port
        self.server.close()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 600)
                if not ready:
                    return
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    (b if src is a else a).sendall(data)
        except OSError:
            return
        finally:
            self.live.difference_update((a, b))
            a.close()
            b.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.to, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self.live.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()


class Sampler:
    """How many agent processes run on each VM, sampled over SSH until stopped."""

    def __init__(self, ssh_run, vms: dict):
        self.ssh_run, self.vms, self.rows = ssh_run, vms, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _count(self, target) -> int | None:
        # the agent's own process only: not `podman run ... python3 /app/...` (the unit's),
        # nor ng-supervise above it, nor the shell that runs pgrep
        done = self.ssh_run(target, "pgrep -c -f '^python3 /app/execution/e2e_move_poll[e]r"
                                    "[.]py$' || true", timeout=30)
        return int(done.stdout.strip() or 0) if done.returncode == 0 else None

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.time()
            counts = {name: self._count(target) for name, target in self.vms.items()}
            self.rows.append((began, time.time(), counts))
            self._stop.wait(2.0)  # each sample is a login on an emulated guest

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


def overlaps(intervals: list[tuple[float, float, tuple]]) -> int:
    """getUpdates requests that began before an earlier one had ended."""
    found, end = 0, float("-inf")
    for start, stop, _ in intervals:
        if start < end:
            found += 1
        end = max(end, stop)
    return found


def gap_lengths(rows: list, counts: list[int]) -> list[float]:
    """The length of each run of samples in which no agent ran (its first sample's start to
    its last one's end)."""
    gaps, first, last = [], None, None
    for row, count in zip(rows, counts, strict=True):
        if count == 0:
            first, last = first or row, row
        elif first is not None:
            gaps.append(last[1] - first[0])
            first = None
    if first is not None:
        gaps.append(last[1] - first[0])
    return gaps


def data_digests(ssh_run, target) -> dict[str, str]:
    text = checked(ssh_run, target, f"sudo -n sh -c 'cd {DATA_DIR} && sha256sum "
                                    + " ".join(sorted(KNOWN)) + "'")
    return {line.split()[1]: line.split()[0] for line in text.splitlines()}


@pytest.fixture
def lab(fresh_sandbox, tmp_path):
    """(the old VM, a factory booting the new one, the fake Compute API, the fake Bot API,
    the relays by VM). The new VM boots once the old one runs the agent: two guests under
    emulation share this machine's cores."""
    old = fresh_sandbox("bookworm")
    gce = FakeGce().start()
    gce.nat_ip = "127.0.0.1"
    gce.nat_ips.update({"nightguard": "127.0.0.3", "nightguard-2": "127.0.0.2"})
    gce.add_instance("nightguard", zone="us-west1-b")
    gce.age("nightguard", 3600)
    relays = {"old": Relay(("127.0.0.3", old["port"]), ("127.0.0.1", old["port"]))}

    def boot_new() -> dict:
        new = fresh_sandbox("bookworm")
        relays["new"] = Relay(("127.0.0.2", old["port"]), ("127.0.0.1", new["port"]))
        return new

    telegram = FakeTelegram(BOT_TOKEN, host="0.0.0.0", gemini_key=GEMINI_KEY).start()
    yield old, boot_new, gce, telegram, relays
    telegram.stop()
    for server in relays.values():
        server.close()
    gce.stop()


def move_env(old, gce, telegram, base) -> dict:
    source = copy_source(base / "src")
    (source / "execution" / "e2e_move_poller.py").write_text(POLLER)
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("NIGHTGUARD_")},
        "NIGHTGUARD_TARGET": "gcp", "NIGHTGUARD_GCP_PROJECT": gce.project,
        "NIGHTGUARD_GCP_API_ENDPOINT": gce.endpoint, "NIGHTGUARD_GCP_INSTANCE": "nightguard",
        "NIGHTGUARD_GCP_ZONE": "us-west1-b", "NIGHTGUARD_SSH_PORT": str(old["port"]),
        "NIGHTGUARD_SSH_KEY_FILENAME": old["key_filename"],
        "NIGHTGUARD_SSH_KNOWN_HOSTS": str(base / "known_hosts"),
        "NIGHTGUARD_ENV_FILE": str(make_env_file(base, BOT_TOKEN, GEMINI_KEY)),
        "NIGHTGUARD_SOURCE_DIR": str(source),
        "NIGHTGUARD_BASE_IMAGE": "localhost/nightguard-base:latest",
        "NIGHTGUARD_BASE_IMAGE_ARCHIVE": "/var/lib/nightguard-sandbox/base.tar",
        "NIGHTGUARD_MOVE_JOURNAL": str(base / "move.json"),
        "NIGHTGUARD_DATA_OUT": str(base / "backups"),
        "NIGHTGUARD_AGENT_COMMAND": AGENT,
        "NIGHTGUARD_AGENT_ENV": json.dumps({"NG_TELEGRAM_API_BASE":
                                            telegram.url_for(laptop_address())}),
        "PYTHONUNBUFFERED": "1",
    }


def cut_when(proc, marker: str, delay: float, cut, timeout: float = 1500) -> str:
    """inv's output until a line starting with ``marker``, then ``cut()`` after ``delay`` s;
    returns everything it printed."""
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(marker):
            time.sleep(delay)
            cut()
            break
        assert time.monotonic() < deadline, "".join(lines)
    lines.append(proc.stdout.read())
    proc.wait(300)
    return "".join(lines)


MOVE = ["vm.move", "--zone", "us-central1-a", "--instance", "nightguard-2"]


def drop_then_undone(env, relays, telegram, tmp_path) -> tuple[str, float]:
    """The first move, cut by a dropped connection while its data is put in place on the
    new VM; returns its output and its wall time. The move must end undone, by itself or
    (when the undo could not reach a VM in time) by the run after it."""
    started = time.monotonic()
    proc = start_inv(MOVE, env)
    dropped = []
    text = cut_when(proc, "  - upload: ", 0.3,
                    lambda: dropped.append(sum(r.drop(20) for r in relays.values())))
    assert dropped and dropped[0] >= 1, text  # a connection was live, and it was hung up
    assert proc.returncode == 1, text
    assert "connection to the host lost" in text, text
    journal = json.loads((tmp_path / "move.json").read_text())
    print(f"dropped in: {[n for n, s in journal['steps'].items() if s.get('error')]}, "
          f"then {journal['state']}")
    assert journal["steps"]["stop_old"].get("done") and not journal["steps"].get(
        "start_new"), text  # the old agent was stopped; the new one was never started
    telegram.send_user_message("during the dropped connection")
    if journal["state"] == "undoing":
        again = inv(["vm.move"], env, timeout=1800)
        text += again.stdout + again.stderr
        assert again.returncode == 0, text
        journal = json.loads((tmp_path / "move.json").read_text())
    assert journal["state"] == "undone", text
    assert "undone: the agent runs on nightguard (us-west1-b" in text, text
    assert "Traceback" not in text and "Exception (client)" not in text, text  # one line
    return text, time.monotonic() - started


def test_a_move_cut_by_a_dropped_connection_then_by_ctrl_c_keeps_one_agent_and_the_data(
        lab, ssh_run, tmp_path):
    old, boot_new, gce, telegram, relays = lab
    env = move_env(old, gce, telegram, tmp_path)
    deployed = inv(["deploy"], env, timeout=1800)
    assert deployed.returncode == 0, output(deployed)
    new = boot_new()
    for rel, text in KNOWN.items():
        maker = "head -c 2000000 /dev/urandom" if text is None else f"printf %s '{text}'"
        checked(ssh_run, old, f"sudo -n mkdir -p {DATA_DIR}/$(dirname {rel}) && {maker} | "
                              f"sudo -n tee {DATA_DIR}/{rel} >/dev/null")
    before = data_digests(ssh_run, old)
    telegram.send_user_message("before the move")
    assert telegram.wait_for(lambda: not telegram.unanswered(), 120), telegram.unanswered()
    with Sampler(ssh_run, {"old": old, "new": new}) as sampler:
        undone, undone_s = drop_then_undone(env, relays, telegram, tmp_path)
        assert telegram.wait_for(lambda: not telegram.unanswered(), 180), \
            telegram.unanswered()  # answered by the old agent, running again
        assert checked(ssh_run, new, f"systemctl is-active {unit_name(CONTAINER)} || true"
                       ).strip() != "active"
        telegram.send_user_message("between the moves")
        started = time.monotonic()
        proc = start_inv(MOVE, env)
        # the old agent's stop is done (its step's end line): Ctrl-C lands in what follows,
        # most likely the copy
        text = cut_when(proc, "  - agent: stopped and disabled on nightguard (", 3.0,
                        lambda: os.killpg(proc.pid, signal.SIGINT))
        cut = time.monotonic()
        assert proc.returncode in (1, 130), text
        journal = json.loads((tmp_path / "move.json").read_text())
        assert journal["state"] == "moving" and journal["steps"]["stop_old"]["started"], text
        cut_in = [name for name, step in journal["steps"].items() if step.get("error")]
        print(f"cut in: {cut_in}")
        telegram.send_user_message("during the cut")
        time.sleep(5)
        finished = inv(["vm.move"], env, timeout=1800)
        done = time.monotonic()
        assert finished.returncode == 0, text + output(finished)
        telegram.send_user_message("after the move")
        assert telegram.wait_for(lambda: not telegram.unanswered(), 180), telegram.unanswered()
        time.sleep(3)
    print(undone + text + finished.stdout)
    # a sample whose SSH failed (None) counts nothing; most must have answered
    counts = [sum(c or 0 for c in row[2].values()) for row in sampler.rows]
    assert counts and max(counts) == 1, sampler.rows
    answered = [row for row in sampler.rows if None not in row[2].values()]
    assert len(answered) >= 0.9 * len(sampler.rows), sampler.rows
    assert telegram.conflicts == 0 and overlaps(telegram.getupdates_intervals()) == 0
    assert telegram.answered_twice() == [] and telegram.unanswered() == []
    assert data_digests(ssh_run, new) == before
    assert checked(ssh_run, old, f"systemctl is-enabled {unit_name(CONTAINER)} || true"
                   ).strip() == "disabled"
    assert gce.instances["nightguard"]["status"] == "TERMINATED"
    assert gce.instances["nightguard-2"]["status"] == "RUNNING"
    mark = json.loads(checked(ssh_run, old, "sudo -n cat /var/lib/nightguard/moved.json"))
    assert mark["state"] == "moved" and mark["to"].startswith("nightguard-2")
    old_audit = [a["outcome"] for a in audit(ssh_run, old) if a["command"] == "vm.move"]
    assert any(a.startswith("stopped: moving to nightguard-2") for a in old_audit), old_audit
    assert any(a.startswith("rolled-back: the move is undone") for a in old_audit), old_audit
    assert old_audit[-1].startswith("moved to nightguard-2"), old_audit
    new_audit = [a["outcome"] for a in audit(ssh_run, new) if a["command"] == "vm.move"]
    assert new_audit[0] == "staged" and new_audit[-1] == "ok", new_audit
    print(f"audit, old VM: {old_audit}\naudit, new VM: {new_audit}")
    # inv health on either VM says which one is live
    here = inv(["health"], env)
    assert here.returncode != 0 and "the agent moved to nightguard-2" in output(here)
    # the old VM itself (stopped only in the fake API: the lab VM still answers)
    left = inv(["health"], dict(env, NIGHTGUARD_TARGET="sandbox",
                                NIGHTGUARD_SANDBOX_NAME=old["name"]))
    assert left.returncode != 0 and "not the live VM: the agent moved to nightguard-2" in \
        left.stdout, output(left)
    there = inv(["health"], dict(env, NIGHTGUARD_GCP_INSTANCE="nightguard-2",
                                 NIGHTGUARD_GCP_ZONE="us-central1-a"))
    assert there.returncode == 0, output(there)
    history = inv(["history"], dict(env, NIGHTGUARD_GCP_INSTANCE="nightguard-2",
                                    NIGHTGUARD_GCP_ZONE="us-central1-a"))
    assert "vm.move" in history.stdout, output(history)
    for value in (BOT_TOKEN, GEMINI_KEY):
        assert value not in undone + text + output(finished) + output(here) + output(there) + \
            output(left)
    outage = float(re.search(r"the agent was down ([\d.]+) s", finished.stdout).group(1))
    figure("vm.move: the agent's outage, cut by Ctrl-C and finished by a rerun", outage)
    figure("vm.move: the rerun that finished the move", done - cut)
    figure("vm.move: first run until the cut", cut - started)
    figure("vm.move: cut by a dropped connection, until undone", undone_s)
    figure("vm.move: longest sampled time with no agent running",
           max(gap_lengths(sampler.rows, counts), default=0.0))
    assert CONTAINER in checked(ssh_run, new, "sudo -n podman ps --format '{{.Names}}'")
