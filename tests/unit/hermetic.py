"""The unit tier's fixed surroundings: whatever the machine has, every unit test runs with
the same environment, PATH, home folder, time zone and current folder.

tests/unit/conftest.py puts them in place around each unit test (its setup, call and
teardown, so the module and session fixtures it starts - a throw-away sshd, a bootstrapped
copy of the project - get them too) and puts the machine's back after it:
  - environment: only pytest's and coverage's own variables (PYTEST_*, COV_CORE_*,
    COVERAGE_*) and TMPDIR are kept; every other one (NIGHTGUARD_*, NG_*, INVOKE_*,
    GOOGLE_*, CLOUDSDK_*, SSH_*, XDG_*, proxies, CI, USER, PYTHON*...) is gone. A test
    that wants one sets it itself (monkeypatch.setenv);
  - LANG=C.UTF-8, TZ=UTC, umask 022, and SIGINT, SIGHUP, SIGTERM handled as by default
    even where the run was started with them ignored (nohup, a background job);
  - HOME: an empty folder with an empty .ssh (conftest's not_this_machine gives each test
    its own), so no ~/.ssh/config, known_hosts, ~/.config/gcloud, ~/.invoke.yaml or git
    config of the user's is read;
  - PATH: this venv's bin, then a folder of links to the programs of the system's own
    folders (SYSTEM_DIRS, never the user's PATH), without the ones the code drives on a
    real machine or that reach outside it (HIDDEN: podman, gcloud, qemu, sudo,
    systemctl...). A test that runs one of those provides a fake of its own;
  - the current folder: the project's root.
A test that needs a real program (sshd, ssh-keygen, systemd-analyze) says so with
``tool(name)``: it is looked up in SYSTEM_DIRS; without it the test is skipped, or fails
when the machine's environment has CI set (as tests/e2e does: CI never turns green by
skipping).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT_DIR = Path(__file__).resolve().parent
# The environment pytest was started with. Read only by tool() (CI) and machine_pip_env().
MACHINE_ENV = dict(os.environ)
SYSTEM_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
HIDDEN = ("podman", "docker", "buildah", "skopeo", "gcloud", "gsutil", "bq", "kubectl",
          "mmdebstrap", "sudo", "systemctl", "apt", "apt-get", "dpkg", "swapon", "swapoff")
HIDDEN_PREFIXES = ("qemu-",)
KEPT_PREFIXES = ("PYTEST_", "COV_CORE_", "COVERAGE_")
KEPT_NAMES = ("TMPDIR",)
FIXED = {"LANG": "C.UTF-8", "TZ": "UTC"}
UMASK = 0o022
# what each signal does in a process started normally (an ignored one stays ignored in
# every child, so a test stopping a child with it would hang or pass for the wrong reason)
SIGNALS = {signal.SIGINT: signal.default_int_handler, signal.SIGHUP: signal.SIG_DFL,
           signal.SIGTERM: signal.SIG_DFL}


def on_ci() -> bool:
    return bool(MACHINE_ENV.get("CI"))


def hidden(name: str) -> bool:
    return name in HIDDEN or name.startswith(HIDDEN_PREFIXES)


def make_toolbin(folder: Path) -> Path:
    """Links to the programs of SYSTEM_DIRS (the first of a name wins), HIDDEN left out."""
    folder.mkdir(parents=True, exist_ok=True)
    for directory in SYSTEM_DIRS:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            link = folder / name
            if not hidden(name) and not os.path.lexists(link):
                os.symlink(os.path.join(directory, name), link)
    return folder


class Surroundings:
    """One per pytest process: a folder with the links (bin) and a home for the module and
    session fixtures (home), made at the first unit test, removed at the end."""

    def __init__(self) -> None:
        self.base: Path | None = None

    def folder(self) -> Path:
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="ng-unit-"))
            make_toolbin(self.base / "bin")
            (self.base / "home" / ".ssh").mkdir(parents=True, mode=0o700)
        return self.base

    def environ(self) -> dict[str, str]:
        base = self.folder()
        kept = {name: value for name, value in os.environ.items()
                if name.startswith(KEPT_PREFIXES) or name in KEPT_NAMES}
        venv_bin = str(Path(sys.executable).parent)
        return {**kept, **FIXED, "HOME": str(base / "home"),
                "PATH": os.pathsep.join((venv_bin, str(base / "bin")))}

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """In the surroundings while inside; the machine's back after."""
        saved, cwd, umask = dict(os.environ), os.getcwd(), os.umask(UMASK)
        handlers = {number: signal.getsignal(number) for number in SIGNALS}
        os.environ.clear()
        os.environ.update(self.environ())
        time.tzset()
        os.chdir(ROOT)
        for number, handler in SIGNALS.items():
            signal.signal(number, handler)
        try:
            yield
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
            os.environ.clear()
            os.environ.update(saved)
            time.tzset()
            os.chdir(cwd)
            os.umask(umask)

    def remove(self) -> None:
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None


def tool(name: str) -> str:
    """The real program a test needs, from SYSTEM_DIRS: skipped without it, failed on CI."""
    for directory in SYSTEM_DIRS:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    problem = f"{name} is not in {':'.join(SYSTEM_DIRS)} (scripts/bootstrap.sh installs it)"
    if on_ci():
        pytest.fail(f"CI needs {name}: {problem}", pytrace=False)
    pytest.skip(problem)


def machine_pip_env() -> dict[str, str]:
    """pip's own settings on this machine (PIP_* and the user's pip.conf): for a test that
    installs packages, where to find them is the machine's to say."""
    found = {name: value for name, value in MACHINE_ENV.items() if name.startswith("PIP_")}
    home = MACHINE_ENV.get("HOME", "")
    config_home = MACHINE_ENV.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    for path in (os.path.join(config_home, "pip", "pip.conf"),
                 os.path.join(home, ".pip", "pip.conf")):
        if home and "PIP_CONFIG_FILE" not in found and os.path.isfile(path):
            found["PIP_CONFIG_FILE"] = path
    return found
