"""Running `inv` against a sandbox the way a user does, and reading the host back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tasks.deploy.sync import local_manifest

ROOT = Path(__file__).resolve().parents[2]
INV = str(Path(sys.executable).parent / "inv")
CONTAINER = "97layer-nightguard"
TOKEN = "tg-e2e-9f3c1a7b55d2"
GEMINI = "gem-e2e-4be0c2d97a61"


def make_env_file(directory: Path, token: str = TOKEN, gemini: str = GEMINI) -> Path:
    path = directory / ".env"
    path.write_text(f"TELEGRAM_BOT_TOKEN={token}\nGEMINI_API_KEY={gemini}\n")
    path.chmod(0o600)
    return path


def copy_source(destination: Path) -> Path:
    """The project's syncable files, as a separate tree a test may edit."""
    for rel in local_manifest(ROOT):
        target = destination / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    return destination


def inv_env(target: dict, env_file: Path, source: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTGUARD_")}
    env.update({"NIGHTGUARD_TARGET": "sandbox", "NIGHTGUARD_SANDBOX_NAME": target["name"],
                "NIGHTGUARD_ENV_FILE": str(env_file), "NIGHTGUARD_SOURCE_DIR": str(source)})
    env.update(extra)
    return env


def inv(args: list[str], env: dict, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([INV, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def start_inv(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([INV, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def inspect(ssh_run, target) -> dict | None:
    done = ssh_run(target, f"sudo -n podman container inspect {CONTAINER}")
    if done.returncode != 0:
        return None
    return json.loads(done.stdout)[0]


def wait_until(predicate, timeout: float, interval: float = 3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def healthy_now(ssh_run, target) -> bool:
    return ssh_run(target, f"sudo -n podman healthcheck run {CONTAINER}").returncode == 0


def control(ssh_run, target, name: str, value: str = "1") -> None:
    done = ssh_run(target, f"sudo -n podman exec {CONTAINER} sh -c "
                           f"'mkdir -p /tmp/nightguard/control && echo {value} > "
                           f"/tmp/nightguard/control/.{name} && mv /tmp/nightguard/control/.{name}"
                           f" /tmp/nightguard/control/{name}'")
    assert done.returncode == 0, done.stderr
