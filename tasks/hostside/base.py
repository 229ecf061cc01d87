"""Small helpers every host module uses: time, reading and writing the state dir's
files (root only, atomic), running a program, and a step's error (``OpError``)."""

import hashlib
import json
import os
import subprocess
import threading
import time


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_text(path, limit=None):
    try:
        with open(path, "rb") as handle:
            data = handle.read() if limit is None else handle.read(limit)
    except OSError:
        return None
    return data.decode("utf-8", "replace").strip()


def read_text_bytes(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def read_json(path, default):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return default


def write_private(path, data, mode=0o600):
    """Atomic write of a root-only file in a directory only root can write."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data if isinstance(data, bytes) else data.encode())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_json(path, data):
    write_private(path, json.dumps(data, sort_keys=True))


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def version_tuple(text):
    try:
        return tuple(int(p) for p in str(text).split("-")[0].split(".")[:2])
    except ValueError:
        return (0, 0)


def pid_alive(pid):
    try:
        return int(pid) > 0 and os.path.exists(f"/proc/{int(pid)}")
    except (TypeError, ValueError):
        return False


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def _unlink(path):
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


class OpError(Exception):
    """A step that failed on the host: one line, plus the tail of what the command said."""

    def __init__(self, message, tail=None):
        super().__init__(message)
        self.tail = tail or []


def sh(argv, timeout=120, data=None, env=None):
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, input=data,
                              env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)
    return (done.returncode, done.stdout.decode("utf-8", "replace"),
            done.stderr.decode("utf-8", "replace"))


# Podman < 5 reads the journal through go-systemd, whose dlerror() check can see another
# thread's error (podman issue 20569): "podman logs" then fails at random, and at once again
# in another process is the known way past it.
JOURNAL_LIBRARY_RACE = ("error resolving symbol", "unable to open a handle to the library")


def podman_logs(argv, timeout=120, tries=3):
    """`podman logs ...` as sh() runs it, run again when it failed with Podman's journal
    library race, never for any other failure."""
    for _ in range(tries):
        code, out, err = sh(argv, timeout)
        if code == 0 or not any(sign in err for sign in JOURNAL_LIBRARY_RACE):
            break
    return code, out, err


def end_process(proc):
    """SIGTERM, and SIGKILL after 10 s: a command this helper started, ended."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_streaming(session, request_id, argv, timeout, on_interrupt="kill", data=None,
                  env=None, keep=40):
    """Runs argv, sends its output as progress, keeps the last lines. When the client
    goes away the command is killed (a build) or left to finish (a restart), as asked."""
    full_env = dict(os.environ, **(env or {}))
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if data is not None else
                                subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=full_env)
    except OSError as exc:
        raise OpError(f"{argv[0]}: {exc.strerror or exc}") from None
    if data is not None:
        try:
            proc.stdin.write(data)
            proc.stdin.close()
        except BrokenPipeError:
            pass
    tail = []

    def pump():
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            tail.append(line)
            del tail[:-keep]
            session.progress(request_id, line)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    deadline = time.monotonic() + timeout
    killed = None
    while proc.poll() is None:
        if time.monotonic() > deadline:
            killed = f"timed out after {timeout}s"
        elif session.gone.is_set() and on_interrupt == "kill":
            killed = "interrupted"
        if killed:
            end_process(proc)
            break
        time.sleep(0.1)
    pumper.join(5)
    return proc.returncode, tail, killed
