"""Running `inv` against a sandbox the way a user does, and reading the host back.

Every probe that reads the host checks its own exit code first: an empty answer from a
probe that failed (ssh itself failing exits 255) must never pass for "nothing there".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from tasks.config import load_settings
from tasks.deploy.sync import local_manifest, rules_for
from tasks.hostside.base import JOURNAL_LIBRARY_RACE
from tasks.sandbox import machine as sb

ROOT = Path(__file__).resolve().parents[2]
INV = str(Path(sys.executable).parent / "inv")
CONTAINER = "97layer-nightguard"
STATE = "/var/lib/nightguard"
APP_DIR = "/home/ubuntu/97layerOS"
TOKEN = "tg-e2e-9f3c1a7b55d2"
GEMINI = "gem-e2e-4be0c2d97a61"


# The tests' own probes share one SSH connection per VM (OpenSSH's ControlMaster): a new
# login under TCG costs its key exchange, sshd's three processes, sudo's PAM and the motd
# scripts - measured with bench/guest_cpu.py, the probes' logins were ~15% of a drill's
# guest CPU. The master dies with its VM's connection (a reboot, a hang-up, a pause past
# the keepalives) and the next probe opens a new one; the socket's name carries the VM's
# port and known_hosts, so a new VM on an old port never rides an old VM's connection.
_mux_dir: str | None = None


def probe_argv(target, cmd) -> list[str]:
    """OpenSSH argv for `cmd` on `target`, over the VM's shared probe connection."""
    global _mux_dir
    if _mux_dir is None:
        _mux_dir = tempfile.mkdtemp(prefix="ngmux-")  # short: a socket path has 108 bytes
    key = hashlib.sha1(f"{target['port']} {target['known_hosts']}".encode()).hexdigest()[:16]
    mux = ["-o", "ControlMaster=auto", "-o", f"ControlPath={_mux_dir}/{key}",
           "-o", "ControlPersist=120", "-o", "ServerAliveInterval=5",
           "-o", "ServerAliveCountMax=4"]
    argv = sb.build_ssh_argv(target["port"], target["key_filename"], target["known_hosts"], cmd)
    return argv[:1] + mux + argv[1:]


def close_probe_connections() -> None:
    if _mux_dir is None:
        return
    for sock in os.listdir(_mux_dir):
        subprocess.run(["ssh", "-o", f"ControlPath={_mux_dir}/{sock}", "-O", "exit", "x"],
                       capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
    shutil.rmtree(_mux_dir, ignore_errors=True)


def make_env_file(directory: Path, token: str = TOKEN, gemini: str = GEMINI) -> Path:
    path = directory / ".env"
    path.write_text(f"TELEGRAM_BOT_TOKEN={token}\nGEMINI_API_KEY={gemini}\n")
    path.chmod(0o600)
    return path


def copy_source(destination: Path) -> Path:
    """The project's deployment files and what the deploy syncs, as a tree a test edits."""
    settings = load_settings(environ={})
    wanted = set(local_manifest(ROOT, rules_for(settings)))
    wanted |= {"deployment/Dockerfile.nightguard", "deployment/requirements-agent.txt",
               "deployment/podman-compose.nightguard.yml", "invoke.yaml"}
    for rel in sorted(wanted):
        target = destination / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    return destination


def inv_env(target: dict, env_file: Path, source: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTGUARD_")}
    env.update({"NIGHTGUARD_TARGET": "sandbox", "NIGHTGUARD_SANDBOX_NAME": target["name"],
                "NIGHTGUARD_ENV_FILE": str(env_file), "NIGHTGUARD_SOURCE_DIR": str(source),
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def inv(args: list[str], env: dict, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([INV, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def start_inv(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([INV, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def checked(ssh_run, target, command: str, expect: int = 0) -> str:
    """stdout of a probe whose exit code must be `expect` (255 is ssh itself failing)."""
    done = ssh_run(target, command)
    assert done.returncode == expect, (command, done.returncode, done.stdout, done.stderr)
    return done.stdout


def past_journal_race(run, tries: int = 3):
    """A `podman logs` probe's result (`run()`), run again only while it fails with Podman
    4's journal library race (podman issue 20569), as the host helper does; never past any
    other failure."""
    for _ in range(tries):
        done = run()
        said = done.stdout + done.stderr
        said = said.decode(errors="replace") if isinstance(said, bytes) else said
        if done.returncode == 0 or not any(sign in said for sign in JOURNAL_LIBRARY_RACE):
            break
    return done


def podman_logs(ssh_run, target, options: str = "", merged: bool = False) -> str:
    """What the agent's container printed (`podman logs OPTIONS`); the probe must succeed."""
    command = f"sudo -n podman logs {options} {CONTAINER}".replace("  ", " ")
    command += " 2>&1" if merged else ""
    done = past_journal_race(lambda: ssh_run(target, command))
    assert done.returncode == 0, (command, done.returncode, done.stdout, done.stderr)
    return done.stdout


def inspect(ssh_run, target) -> dict | None:
    done = ssh_run(target, f"sudo -n podman container inspect {CONTAINER}")
    assert done.returncode in (0, 125), done.stderr  # 125: no such container
    return json.loads(done.stdout)[0] if done.returncode == 0 else None


def markers(ssh_run, target) -> dict:
    """The NG_RELEASE_* values of what the container runs: those it was started with, or,
    when the agent was restarted in place since (a code-only change), those the host
    recorded for that restart against this container."""
    data = inspect(ssh_run, target) or {}
    env = dict(e.split("=", 1) for e in (data.get("Config") or {}).get("Env") or [] if "=" in e)
    found = {k: v for k, v in env.items() if k.startswith("NG_RELEASE_")}
    done = ssh_run(target, f"sudo -n cat {STATE}/reload.json")
    assert done.returncode in (0, 1), done.stderr  # 1: no restart in place yet
    reload = json.loads(done.stdout) if done.returncode == 0 else {}
    return dict(reload["markers"]) if reload.get("cid") == data.get("Id") else found


def agent_starts(ssh_run, target) -> int:
    """How many times the agent process started in the current container."""
    logs = podman_logs(ssh_run, target, merged=True)
    return logs.count("night_guard: starting")


def audit(ssh_run, target) -> list[dict]:
    """The host's audit log; it must exist (an absent file is not "no new line")."""
    text = checked(ssh_run, target, f"sudo -n cat {STATE}/audit.log")
    return [json.loads(line) for line in text.splitlines()]


def wait_until(predicate, timeout: float, interval: float = 3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def healthy_now(ssh_run, target) -> bool:
    done = ssh_run(target, f"sudo -n podman healthcheck run {CONTAINER}")
    assert done.returncode != 255, done.stderr
    return done.returncode == 0


def health_status(ssh_run, target, data: dict | None = None) -> str:
    """Podman's recorded health, read passively (no check run that would count), from
    `data` (an inspect already made) or from a new inspect."""
    data = (data if data is not None else inspect(ssh_run, target)) or {}
    state = data.get("State") or {}
    return (state.get("Health") or state.get("Healthcheck") or {}).get("Status", "")


def started_at(ssh_run, target) -> str | None:
    data = inspect(ssh_run, target)
    return data["State"]["StartedAt"] if data and data["State"]["Running"] else None


def back_healthy(ssh_run, target, before: str, since: float, bound: float) -> float | None:
    """Seconds from `since` (the fault) until a new container is healthy, as Podman's own
    timer recorded it; None if not within `bound`."""
    def recovered():  # one podman call a poll: under TCG each costs the agent a second
        data = inspect(ssh_run, target)
        running = data and data["State"]["Running"]
        return running and data["State"]["StartedAt"] != before and \
            health_status(ssh_run, target, data) == "healthy"

    if wait_until(recovered, bound - (time.monotonic() - since), 2):
        return time.monotonic() - since
    return None


def journal_time(ssh_run, target, args: str) -> datetime | None:
    """The time of the first journal entry of this boot that matches `args`."""
    lines = checked(ssh_run, target, f"sudo -n journalctl -b -o short-iso-precise --no-pager "
                                     f"{args} | head -3").splitlines()
    lines = [line for line in lines if line.strip() and not line.startswith("-- ")]
    return datetime.fromisoformat(lines[0].split()[0]) if lines else None


def fault_then_back(ssh_run, target, fault: str, bound: float) -> float:
    """Makes the agent `fault` ("crash", "hang"); the seconds until a new container is
    healthy, which must be within `bound`, watched passively, recorded as a figure."""
    before = started_at(ssh_run, target)
    control(ssh_run, target, fault)
    since = time.monotonic()  # the agent acts on it at its next loop turn (within 5 s)
    seconds = back_healthy(ssh_run, target, before, since, bound)
    assert seconds is not None, f"not back and healthy within {bound:.0f} s after a {fault}"
    figure(f"{target['name']}: {fault} -> healthy", seconds)
    return seconds


def reboot_and_check_back(ssh_run, target) -> datetime:
    """Reboots the sandbox VM `target`; checks the agent comes back on its own - healthy, on
    the same release, with the swapfile on. The only logins after the boot are this
    check's, which only read (the first is the reboot's own `ssh true`): the agent is
    started by systemd, not by anything a login runs. Returns the first login's time."""
    before = markers(ssh_run, target)
    sb.reboot(target["name"], timeout=900)
    login = journal_time(ssh_run, target, "-u ssh -g 'Accepted publickey'")
    assert login is not None
    assert wait_until(lambda: journal_time(ssh_run, target, f"-u container-{CONTAINER}.service "
                                                            "-g 'night_guard: running'"),
                      timeout=300, interval=5), "the agent did not start after the reboot"
    assert wait_until(lambda: healthy_now(ssh_run, target), timeout=300, interval=5)
    assert markers(ssh_run, target) == before
    swap = checked(ssh_run, target, "sudo -n swapon --show=NAME --noheadings").split()
    assert swap == ["/swapfile"]
    return login


def control(ssh_run, target, name: str, value: str = "1") -> None:
    done = ssh_run(target, f"sudo -n podman exec {CONTAINER} sh -c "
                           f"'mkdir -p /tmp/nightguard/control && echo {value} > "
                           f"/tmp/nightguard/control/.{name} && mv /tmp/nightguard/control/.{name}"
                           f" /tmp/nightguard/control/{name}'")
    assert done.returncode == 0, done.stderr


def figure(name: str, value: float, unit: str = "s") -> None:
    """A measured figure of this run, for the README's table: one JSON line in
    $NG_E2E_FIGURES (default .sandbox/e2e-figures.jsonl), and on stdout."""
    path = Path(os.environ.get("NG_E2E_FIGURES") or ROOT / ".sandbox" / "e2e-figures.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps({"name": name, "value": round(value, 1), "unit": unit,
                                 "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                     + "\n")
    print(f"{name}: {value:.1f} {unit}")


def output(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr
