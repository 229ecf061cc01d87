"""The unit tier reads nothing of the machine it runs on (tests/unit/hermetic.py).

``leaks`` lists what of the machine shows through in a test's surroundings; a unit test
here sees none. Then pytest is started with a hostile machine around it - NIGHTGUARD_*,
NG_*, INVOKE_*, GOOGLE_* and proxy variables set to junk, a HOME whose ~/.ssh/config sends
every host elsewhere, a PATH whose podman, ssh and gcloud answer garbage, CI set, another
current folder, umask 077, SIGINT and SIGHUP ignored (as under nohup) - and a few
representative files of the tier (ssh_config and settings resolution, this file's check)
must pass in it. A self-test feeds ``leaks`` a machine's surroundings and watches it find
them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.unit import hermetic

ALLOWED = {"HOME", "PATH", *hermetic.FIXED}
MACHINE_PROGRAMS = ("podman", "gcloud", "qemu-system-x86_64", "qemu-img", "mmdebstrap",
                    "sudo", "systemctl", "apt-get")
PROBE = "NG_HERMETIC_PROBE"
HOSTILE_SSH_CONFIG = """Host *
  User nobody
  Port 2222
  HostName 203.0.113.9
  IdentityFile /nonexistent/key
  ProxyCommand false
  UserKnownHostsFile /nonexistent/known_hosts
"""
REPRESENTATIVE = ("test_hermetic.py::test_a_unit_test_sees_nothing_of_the_machine",
                  "test_sshconfig.py", "test_config.py")


def leaks(environ: dict[str, str], cwd: str) -> list[str]:
    """What of the machine shows through: variables, HOME's content, programs, folders."""
    found = [f"variable {name}" for name in sorted(environ) if name not in ALLOWED and not (
        name.startswith(hermetic.KEPT_PREFIXES) or name in hermetic.KEPT_NAMES)]
    found += [f"{name}={environ.get(name)}" for name, value in hermetic.FIXED.items()
              if environ.get(name) != value]
    home = Path(environ.get("HOME", "/nonexistent"))
    if str(home) == hermetic.MACHINE_ENV.get("HOME") or not home.is_dir() or \
            sorted(p.name for p in home.iterdir()) != [".ssh"] or any((home / ".ssh").iterdir()):
        found.append(f"HOME {home} is not an empty folder with an empty .ssh")
    path = environ.get("PATH", "")
    found += [f"{program} on PATH" for program in MACHINE_PROGRAMS
              if shutil.which(program, path=path)]
    # only this venv's bin and folders made for the run (the links, a test's fakes)
    found += [f"PATH has {folder}" for folder in path.split(os.pathsep)
              if folder != str(Path(sys.executable).parent)
              and not folder.startswith(tempfile.gettempdir() + os.sep)]
    if Path(cwd) != hermetic.ROOT:
        found.append(f"current folder {cwd}")
    return found


def test_a_unit_test_sees_nothing_of_the_machine():
    assert leaks(dict(os.environ), os.getcwd()) == []
    assert time.localtime(0).tm_gmtoff == 0  # TZ=UTC is in force, not only set
    assert os.umask(hermetic.UMASK) == hermetic.UMASK
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    # the programs a test needs for real are still there, from the system's folders
    assert Path(shutil.which("sh")).resolve() == Path(hermetic.tool("sh")).resolve()
    print(f"{PROBE} as pytest found it: {hermetic.MACHINE_ENV.get(PROBE)}")


def test_leaks_finds_a_machine_s_surroundings(tmp_path):
    fakes = tmp_path / "bin"
    fakes.mkdir()
    (fakes / "podman").write_text("#!/bin/sh\necho garbage\n")
    (fakes / "podman").chmod(0o755)
    machine = {PROBE: "1", "HOME": str(tmp_path), "TZ": "Pacific/Kiritimati",
               "PATH": f"{fakes}:/usr/local/bin:/usr/bin"}
    found = leaks(machine, "/tmp")
    assert f"variable {PROBE}" in found and "TZ=Pacific/Kiritimati" in found
    assert "LANG=None" in found and "podman on PATH" in found
    assert "PATH has /usr/local/bin" in found and "PATH has /usr/bin" in found
    assert f"HOME {tmp_path} is not an empty folder with an empty .ssh" in found
    assert "current folder /tmp" in found


def test_a_missing_program_is_a_skip_but_a_failure_on_ci(monkeypatch):
    monkeypatch.delitem(hermetic.MACHINE_ENV, "CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-program-ng is not in /usr/sbin"):
        hermetic.tool("no-such-program-ng")
    monkeypatch.setitem(hermetic.MACHINE_ENV, "CI", "1")  # as .ci/run sets it
    with pytest.raises(pytest.fail.Exception, match="CI needs no-such-program-ng"):
        hermetic.tool("no-such-program-ng")


def hostile_machine(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(HOSTILE_SSH_CONFIG)
    (home / ".ssh" / "known_hosts").write_text("garbage\n")
    (home / ".config" / "gcloud").mkdir(parents=True)
    (home / ".config" / "gcloud" / "application_default_credentials.json").write_text("{junk")
    (home / ".invoke.yaml").write_text("nightguard: [not, a, mapping\n")
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    for program in ("podman", "ssh", "ssh-keygen", "gcloud", "git", "true"):
        (fakes / program).write_text("#!/bin/sh\necho garbage; exit 1\n")
        (fakes / program).chmod(0o755)
    junk = str(home / ".config" / "gcloud" / "application_default_credentials.json")
    return {**os.environ, PROBE: "set-before-pytest", "HOME": str(home), "CI": "1",
            "PATH": f"{fakes}:{os.environ['PATH']}:/usr/local/bin:/usr/bin:/bin",
            "NIGHTGUARD_SSH_HOST": "evil.example", "NIGHTGUARD_SSH_PORT": "notaport",
            "INVOKE_NIGHTGUARD_SSH_USER": "nobody", "INVOKE_RUNTIME_CONFIG": junk,
            "NG_SANDBOX_DIR": "/nonexistent", "GOOGLE_APPLICATION_CREDENTIALS": junk,
            "SSH_AUTH_SOCK": "/nonexistent/agent.sock", "XDG_CONFIG_HOME": "/nonexistent",
            "HTTPS_PROXY": "http://127.0.0.1:9", "TZ": "Pacific/Kiritimati", "USER": "nobody"}


def hostile_process() -> None:
    """Run in the child before pytest starts: what a background job or nohup gives it."""
    os.umask(0o077)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def test_representative_unit_tests_pass_on_a_hostile_machine(tmp_path):
    unit = hermetic.UNIT_DIR
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(hermetic.ROOT / "pyproject.toml"),
         "--rootdir", str(hermetic.ROOT), "-p", "no:cacheprovider", "-n", "0", "-q", "-s",
         "--durations=0", "--durations-min=60", *(str(unit / test) for test in REPRESENTATIVE)],
        cwd=tmp_path, env=hostile_machine(tmp_path), preexec_fn=hostile_process,
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"{PROBE} as pytest found it: set-before-pytest" in done.stdout  # it was there
    assert " passed" in done.stdout and "skipped" not in done.stdout
