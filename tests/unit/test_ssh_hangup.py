"""A connection hung up before or during the SSH greeting - a laptop's network gone for a
moment, a VM's sshd restarting - is a host to try again while it may still come up, said in
one line, never as paramiko's traceback."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest

from tasks.errors import StepFailed
from tasks.ssh.remote import connect_failure
from tests.unit.sshstub import hanging_up

ROOT = Path(__file__).resolve().parents[2]


def banner_error(context: BaseException | None) -> paramiko.SSHException:
    """What paramiko raises when the greeting fails: the cause kept as its context."""
    exc = paramiko.SSHException("Error reading SSH protocol banner")
    exc.__context__ = context
    return exc


@pytest.mark.parametrize("context", [EOFError(), ConnectionResetError(errno.ECONNRESET, "x"),
                                     ConnectionAbortedError(errno.ECONNABORTED, "x"),
                                     BrokenPipeError(errno.EPIPE, "x"),
                                     OSError(errno.EBADF, "Bad file descriptor"), None,
                                     StepFailed("copy", "connection to the host lost")])
def test_every_hang_up_during_the_greeting_is_one_retryable_reason(context):
    """The last: paramiko re-raises its thread's exception in ours, and Python makes the
    exception being handled there its context (an undo that runs in an ``except:``)."""
    exc = banner_error(context)
    assert exc.__context__ is context
    assert connect_failure(exc, 5) == "connection closed before the SSH greeting"


def test_other_failures_keep_their_own_words():
    assert connect_failure(ConnectionRefusedError(errno.ECONNREFUSED, "x"), 5) == \
        "connection refused"
    assert connect_failure(TimeoutError(), 7) == "no answer within 7s"
    assert connect_failure(paramiko.SSHException("Indecipherable protocol version"), 5) == ""


TRY = """
import sys
from tasks.errors import StepFailed
from tasks.ssh.address import SshTarget
from tasks.ssh.remote import Remote
target = SshTarget(host="127.0.0.1", port=int(sys.argv[1]), user="ubuntu", label="lab",
                   key_filename=sys.argv[2], known_hosts=sys.argv[3], login_wait=4)
try:
    with Remote(target, connect_timeout=3, command_timeout=10) as remote:
        remote.open_pipe(["true"], step="x")
except StepFailed as exc:
    print(exc)
"""


def test_a_host_that_hangs_up_is_tried_again_then_one_line(tmp_path):
    """In a process of its own, as `inv` runs it: no logging set up by anyone (pytest's
    would catch paramiko's log here)."""
    with hanging_up() as (port, taken):
        done = subprocess.run([sys.executable, "-c", TRY, str(port),
                               str(tmp_path / "no-key"), str(tmp_path / "known_hosts")],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == ("step 'connect' failed: lab: connection closed "
                                            "before the SSH greeting on every try for 4s")
    assert len(taken) >= 2  # tried again, not given up at the first hang-up
    assert "waiting for sshd at 127.0.0.1" in done.stdout
    assert done.stderr == "", done.stderr  # no traceback, no "Exception (client)"
