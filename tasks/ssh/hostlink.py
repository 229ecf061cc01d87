"""The link to the host helper: one helper process on the host per task, spoken to over
one command's stdin/stdout (protocol: ``tasks/hostside/session.py``).

The command is a fixed bootstrap (``sudo -n python3 -c BOOTSTRAP``, or plain ``python3``
when rootless): nothing about a task shows in the host's process list. The bootstrap reads
one JSON line of arguments, runs the helper the host keeps from an earlier run if its
version matches, and otherwise asks for it once ({"need_helper": true}) and keeps what it
receives. A no-op deploy therefore sends a few hundred bytes.

``HostLink`` frames requests, reads progress and answers with timeouts, and turns a
failed answer into ``StepFailed`` (one line, the command's last words kept apart).
The pipe under it is an SSH channel (``tasks.ssh.remote``) or, in the unit tests, a
local process (``LocalPipe``): the same helper runs in both.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import queue
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

from ..errors import StepFailed
from ..hostside.bundle import helper_program

MARKER = "nightguard-host"  # in the bootstrap's argv: `unlock --force` checks it
BOOTSTRAP = f"""import sys,json,os,zlib,hashlib,marshal  # {MARKER}
i=sys.stdin.buffer
A=json.loads(i.readline())
p=os.path.expanduser(A["helper_path"])
k=(A["helper_version"]+" "+sys.version+"\\n").encode()
c=None
try:
    s=open(p,"rb").read()
    if hashlib.sha256(s).hexdigest()[:16]!=A["helper_version"]:
        raise OSError
except OSError:
    sys.stdout.write('{{"need_helper":true}}\\n')
    sys.stdout.flush()
    s=zlib.decompress(i.read(A["helper_size"]))
    if A.get("keep_helper"):
        os.makedirs(os.path.dirname(p),mode=0o700,exist_ok=True)
        t=p+".tmp"
        with open(os.open(t,os.O_WRONLY|os.O_CREAT|os.O_TRUNC,0o600),"wb") as f:
            f.write(s)
        os.replace(t,p)
else:
    try:
        b=open(p[:-3]+".code","rb").read()
        c=marshal.loads(b[len(k):]) if b.startswith(k) else None
    except (OSError,ValueError,EOFError,TypeError):
        pass
if c is None:
    c=compile(s,p,"exec")
    if A.get("keep_helper"):
        try:
            t=p[:-3]+".code.%d"%os.getpid()
            with open(os.open(t,os.O_WRONLY|os.O_CREAT|os.O_TRUNC,0o600),"wb") as f:
                f.write(k+marshal.dumps(c))
            os.replace(t,p[:-3]+".code")
        except OSError:
            pass
ARGS=A
exec(c)"""


@lru_cache(maxsize=1)
def helper_source() -> tuple[bytes, str]:
    """The helper (tasks/hostside, joined into one text) compressed for the wire, and its
    version (a hash of its text)."""
    source = helper_program()
    return zlib.compress(source, 9), hashlib.sha256(source).hexdigest()[:16]


class PipeClosed(Exception):
    """The host side of the link is gone (EOF)."""


class LocalPipe:
    """The helper as a local process: the unit tier drives the real helper through it."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.pending = b""  # the rest of a line read into by read_exact
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line.decode("utf-8", "replace"))
            del self.stderr[:-50]

    def send(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise PipeClosed() from None

    def _next(self, timeout: float) -> bytes:
        if self.pending:
            line, self.pending = self.pending, b""
            return line
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None
        if line is None:
            self.lines.put(None)
            raise PipeClosed()
        return line

    def readline(self, timeout: float) -> bytes:
        return self._next(timeout)

    def read_exact(self, size: int, timeout: float) -> bytes:
        """``size`` raw bytes (a frame); the lines they were read as are joined back."""
        data = b""
        while len(data) < size:
            data += self._next(timeout)
        data, self.pending = data[:size], data[size:]
        return data

    def shutdown_write(self) -> None:
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr_tail(self) -> str:
        return "".join(self.stderr)

    def close(self) -> None:
        self.shutdown_write()
        if self.wait(5) is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Answer:
    result: dict
    progress: list[str] = field(default_factory=list)


class HostLink:
    """Requests to one helper process; each answer waits at most ``timeout`` seconds of
    silence (progress lines count as life)."""

    def __init__(self, pipe, *, redact=lambda text: text, on_progress=None):
        self.pipe = pipe
        self.redact = redact
        self.on_progress = on_progress or (lambda step, line: None)
        self.ids = itertools.count(1)
        self.bytes_sent = 0

    def _send(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        self.pipe.send(data)

    def _read(self, timeout: float) -> dict:
        line = self.pipe.readline(timeout)
        try:
            return json.loads(line)
        except ValueError:
            raise StepFailed("host", f"the host helper said something unexpected: "
                             f"{self.redact(line.decode('utf-8', 'replace'))[:200]!r}") \
                from None

    def hello(self, args: dict, step: str, timeout: float) -> dict:
        """Start the helper: send its arguments (and itself, if the host lacks it)."""
        wire, version = helper_source()
        line = dict(args, helper_version=version, helper_size=len(wire))
        try:
            self._send(json.dumps(line).encode() + b"\n")
            answer = self._read(timeout)
            if answer.get("need_helper"):
                self._send(wire)
                answer = self._read(timeout)
        except PipeClosed:
            raise StepFailed(step, self._gone_reason()) from None
        except TimeoutError:
            raise StepFailed(step, f"the host helper did not start within {timeout:.0f}s")\
                from None
        return answer

    def _gone_reason(self) -> str:
        tail = self.redact(self.pipe.stderr_tail().strip())
        if "a password is required" in tail or "a terminal is required" in tail:
            return ("the SSH user cannot run sudo without a password (rootful Podman, "
                    "packages and the state dir need it): add a NOPASSWD sudoers rule, "
                    "or set nightguard.rootless: true")
        if "python3" in tail and ("not found" in tail or "No such file" in tail):
            return "python3 is not installed on the host (Debian and Ubuntu images have it)"
        last = [line for line in tail.splitlines() if line.strip()][-1:] or ["no output"]
        return f"the host helper ended: {last[0][:300]}"

    def call(self, op: str, *, step: str, timeout: float, data: bytes | None = None,
             sink=None, **args) -> Answer:
        """One request and its answer; ``sink`` takes the raw frames the op streams."""
        request_id = next(self.ids)
        request = dict(args, id=request_id, op=op, step=step)
        if data is not None:
            request["data"] = len(data)
        try:
            self._send(json.dumps(request).encode() + b"\n" + (data or b""))
            progress = []
            while True:
                message = self._read(timeout)
                if "bytes" in message and sink is not None:
                    sink(self.pipe.read_exact(int(message["bytes"]), timeout))
                    continue
                if "progress" in message:
                    text = self.redact(message["progress"])
                    progress.append(text)
                    del progress[:-60]
                    self.on_progress(step, text)
                    continue
                if message.get("ok"):
                    return Answer(message.get("result") or {}, progress)
                tail = [self.redact(t) for t in message.get("tail") or []]
                raise HostStepFailed(step, self.redact(message.get("error", "failed")), tail)
        except PipeClosed:
            raise StepFailed(step, f"connection to the host lost ({self._gone_reason()})")\
                from None
        except TimeoutError:
            raise StepFailed(step, f"no answer from the host within {timeout:.0f}s") from None

    def close(self, wait: float = 15.0) -> int | None:
        """End of input: the helper finishes its step, audits, unlocks and exits."""
        self.pipe.shutdown_write()
        return self.pipe.wait(wait)


class HostStepFailed(StepFailed):
    """A step the helper ran and that failed; ``tail`` holds the command's last lines."""

    def __init__(self, step: str, reason: str, tail: list[str]):
        super().__init__(step, reason)
        self.tail = tail


def local_pipe(env: dict | None = None) -> LocalPipe:
    """The helper as a child process of this Python (the unit tier's 'host')."""
    return LocalPipe([sys.executable, "-c", BOOTSTRAP], env=env)

