#!/usr/bin/env python3
"""Reference Night Guard agent: the image's default command.

    python3 execution/system/night_guard.py        (cwd /app)

What it shows a real agent how to do:
  * read secrets from files (NG_SECRETS_DIR, names in NG_REQUIRED_SECRETS) and
    exit 2 with a clear message when one is missing or empty; only secret
    NAMES are ever logged;
  * write the heartbeat from the MAIN loop every NG_HEARTBEAT_INTERVAL seconds,
    so a stuck loop makes the health check fail;
  * stop at once on SIGTERM/SIGINT with exit 0 (as PID 1 in a container Python
    ignores SIGTERM unless it handles it, and every stop would wait for SIGKILL);
  * log to stdout with UTC timestamps, flushed line by line.

Environment: NG_SECRETS_DIR (/run/secrets), NG_REQUIRED_SECRETS
("telegram_bot_token,gemini_api_key"), NG_HEARTBEAT_FILE
(/tmp/nightguard/heartbeat), NG_HEARTBEAT_INTERVAL (5 s), NG_CONTROL_DIR
(/tmp/nightguard/control).

Control files for tests and drills, looked at once per loop iteration in
NG_CONTROL_DIR (each is removed before it acts, so a restarted container does
not repeat it):
  hang         the main loop blocks: the process stays alive (and still stops on
               SIGTERM) but the heartbeat goes stale.
  allocate_mb  containing N: allocate and touch N MB more, in 64 MB chunks, and
               keep them; logs "allocated N MB".
  crash        exit with code 3.
"""

import os
import select
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from heartbeat import beat

DEFAULT_SECRETS_DIR = "/run/secrets"
DEFAULT_REQUIRED_SECRETS = "telegram_bot_token,gemini_api_key"
DEFAULT_HEARTBEAT_FILE = "/tmp/nightguard/heartbeat"
DEFAULT_CONTROL_DIR = "/tmp/nightguard/control"
DEFAULT_INTERVAL = 5.0

EXIT_CONFIG = 2
EXIT_CRASH = 3
PAGE = 4096
CHUNK_MB = 64
MB = 1024 * 1024


def log(message, stream=None):
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    stream = stream or sys.stdout
    millis = int(now % 1 * 1000)
    stream.write(f"{stamp}.{millis:03d}Z night_guard: {message}\n")
    stream.flush()


class Stopper:
    """Turns SIGTERM/SIGINT into a flag and lets the loop sleep until one arrives.

    The handler only records the signal; the kernel-level wakeup fd ends the
    select() sleep at once, so no exception is ever raised in the middle of the
    agent's work.
    """

    def __init__(self):
        self.signum = None
        self._rfd, wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(wfd, False)
        signal.set_wakeup_fd(wfd)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    @property
    def stopping(self):
        return self.signum is not None

    def sleep(self, timeout):
        """Sleep up to ``timeout`` s (None: until a signal); True if stopping."""
        if not self.stopping:
            select.select([self._rfd], [], [], timeout)
            try:
                os.read(self._rfd, 512)
            except BlockingIOError:
                pass
        return self.stopping


def safe_beat(heartbeat_file):
    """Beat; a failed write is logged (the health check will notice), never fatal."""
    try:
        beat(heartbeat_file)
    except OSError as exc:
        log(f"heartbeat write failed: {exc}", sys.stderr)


def load_secrets(secrets_dir, names):
    """{name: value} for every required secret; raises ValueError naming the bad ones."""
    secrets, problems = {}, []
    for name in names:
        path = os.path.join(secrets_dir, name)
        try:
            with open(path, encoding="utf-8") as fh:
                value = fh.read().strip()
        except FileNotFoundError:
            problems.append(f"{name} is missing (expected file {path})")
            continue
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{name} is unreadable ({type(exc).__name__})")
            continue
        if not value:
            problems.append(f"{name} is empty (file {path})")
            continue
        secrets[name] = value
    if problems:
        raise ValueError("; ".join(problems))
    return secrets


def take_control_file(control_dir, name):
    """Contents of a control file that existed (removed first), else None."""
    path = os.path.join(control_dir, name)
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError as exc:
        log(f"cannot read control file {name}: {exc}")
        return None
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    return text


def allocate(mb, ballast, stopper, heartbeat_file):
    """Allocate and touch ``mb`` MB in chunks, appending them to ``ballast``."""
    done = 0
    while done < mb and not stopper.stopping:
        size = min(CHUNK_MB, mb - done) * MB
        try:
            chunk = bytearray(size)
            chunk[::PAGE] = b"\x01" * (size // PAGE)  # write every page: make it resident
        except MemoryError:
            log(f"allocation failed after {done} of {mb} MB")
            return
        ballast.append(chunk)
        done += size // MB
        safe_beat(heartbeat_file)
        held = sum(len(c) for c in ballast) // MB
        log(f"allocating: {done}/{mb} MB (holding {held} MB)")
    if done == mb:
        log(f"allocated {mb} MB")


def handle_controls(control_dir, ballast, stopper, heartbeat_file):
    """Act on control files; returns an exit code when the agent must exit."""
    if take_control_file(control_dir, "crash") is not None:
        log(f"control: crash requested, exiting with code {EXIT_CRASH}")
        return EXIT_CRASH
    if take_control_file(control_dir, "hang") is not None:
        log("control: hang requested, main loop blocked, heartbeat stops")
        while not stopper.sleep(None):
            pass
        return None
    text = take_control_file(control_dir, "allocate_mb")
    if text is not None:
        try:
            mb = int(text.strip())
            if mb <= 0:
                raise ValueError
        except ValueError:
            log("control: ignoring allocate_mb, not a positive integer")
        else:
            log(f"control: allocating {mb} MB")
            allocate(mb, ballast, stopper, heartbeat_file)
    return None


def main():
    env = os.environ
    secrets_dir = env.get("NG_SECRETS_DIR") or DEFAULT_SECRETS_DIR
    names = [
        n.strip()
        for n in env.get("NG_REQUIRED_SECRETS", DEFAULT_REQUIRED_SECRETS).split(",")
        if n.strip()
    ]
    heartbeat_file = env.get("NG_HEARTBEAT_FILE") or DEFAULT_HEARTBEAT_FILE
    control_dir = env.get("NG_CONTROL_DIR") or DEFAULT_CONTROL_DIR
    try:
        interval = float(env.get("NG_HEARTBEAT_INTERVAL") or DEFAULT_INTERVAL)
        if not 0 < interval <= 3600:
            raise ValueError
    except ValueError:
        log("NG_HEARTBEAT_INTERVAL must be a number of seconds in (0, 3600]", sys.stderr)
        return EXIT_CONFIG

    stopper = Stopper()  # before anything slow: a stop request is never lost
    log(f"starting (pid {os.getpid()})")
    try:
        secrets = load_secrets(secrets_dir, names)
    except ValueError as exc:
        log(f"required secret problem: {exc}", sys.stderr)
        return EXIT_CONFIG
    for name in secrets:
        log(f"secret {name} loaded")
    try:
        os.makedirs(control_dir, exist_ok=True)
    except OSError as exc:
        log(f"control dir {control_dir} unavailable: {exc}")

    ballast = []  # memory held on request of the allocate_mb control file
    log(f"running, heartbeat every {interval:g}s to {heartbeat_file}")
    while not stopper.stopping:
        code = handle_controls(control_dir, ballast, stopper, heartbeat_file)
        if code is not None:
            return code
        if stopper.stopping:
            break
        safe_beat(heartbeat_file)
        # The real agent's work (poll Telegram, ask Gemini, ...) goes here.
        stopper.sleep(interval)
    log(f"received {signal.Signals(stopper.signum).name}, stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
