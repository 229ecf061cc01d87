"""Fixtures of the host tier (tests/unit/hostfake): the real host helper against a fake
host in a temp folder; `project`, `host` and `deploy` for run_deploy against it.

These tests run as root on CI, where the machine's real systemctl, swapon or apt-get would
change the machine. `fake_host` therefore fails the test loudly, before any helper starts,
unless the stand-ins come first on the helper's PATH, nothing outside the temp folder is on
it, and every path the helper knows points into the temp folder.

Every unit test runs in the fixed surroundings of tests/unit/hermetic.py (environment, PATH,
HOME, time zone, umask, signals, current folder), whatever the machine has: see its docstring.
"""

import subprocess
import sys

import pytest

from tasks import invoke_config
from tasks.ssh import sshconfig
from tests.unit import hermetic
from tests.unit.hostfake import FakeHost, Isolation, check_isolated
from tests.unit.hostfake.deployer import Deployer, copy_project

# The container's PID 1 stand-in: sleeps; on SIGHUP (an agent restarted in place) it shows
# a new child in the fake host's /proc, as the kernel would (task/PID/children, the child's
# stat with its start time since boot), and then touches the heartbeat file named in
# HUP_TARGET (<proc>/PID/root/...), as the restarted agent would beat. It ends with pytest,
# even a killed one, so an aborted run leaves no process behind.
PID1 = """import os, signal, sys, time
NEW_CHILD = 4000000
def hup(signum, frame):
    try:
        target = open(sys.argv[1]).read().strip()
        piddir = target.split("/root/")[0]
        pid = os.path.basename(piddir)
        proc = os.path.dirname(piddir)
        os.makedirs(f"{piddir}/task/{pid}", exist_ok=True)
        os.makedirs(f"{proc}/{NEW_CHILD}", exist_ok=True)
        ticks = int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))
        with open(f"{proc}/{NEW_CHILD}/stat", "w") as handle:
            handle.write(f"{NEW_CHILD} (python3 x) S 1 " + "0 " * 17 + f"{ticks} 0 0\\n")
        with open(f"{piddir}/task/{pid}/children", "w") as handle:
            handle.write(f"{NEW_CHILD} ")
        time.sleep(0.1)  # the new agent starts up before its first beat
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as handle:
            handle.write(str(time.time()))
    except OSError:
        pass
signal.signal(signal.SIGHUP, hup)
parent = os.getppid()
while os.getppid() == parent:
    time.sleep(1)
"""


SURROUNDINGS = hermetic.Surroundings()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A unit test's setup, call and teardown run in hermetic's surroundings; the machine's
    environment, current folder, umask and signal handlers come back after it (an e2e test
    in the same run gets them)."""
    if not item.path.is_relative_to(hermetic.UNIT_DIR):
        yield
        return
    with SURROUNDINGS.applied():
        yield


def pytest_unconfigure(config):
    SURROUNDINGS.remove()


@pytest.fixture(autouse=True)
def not_this_machine(tmp_path_factory, monkeypatch):
    """Each unit test its own HOME: an empty folder with an empty .ssh, so nothing one test
    leaves there (a known_hosts line, a key) reaches another. The machine's /etc/ssh and
    /etc/invoke.yaml are not read either (a test wanting one writes its own)."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ssh").mkdir(mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    etc = SURROUNDINGS.folder() / "etc"  # never made: nothing in it
    monkeypatch.setattr(sshconfig, "SYSTEM_CONFIG", str(etc / "ssh" / "ssh_config"))
    monkeypatch.setattr(sshconfig, "GLOBAL_KNOWN_HOSTS", str(etc / "ssh" / "ssh_known_hosts"))
    monkeypatch.setattr(invoke_config, "SYSTEM_PREFIX", str(etc / "invoke"))
    return home


@pytest.fixture(scope="session")
def container_pids(tmp_path_factory):
    """(live, dead): a long-sleeping process that stands for the container's, and the pid
    of one that has ended (a stopped container's pid file)."""
    target = tmp_path_factory.mktemp("pid1") / "hup-target"
    target.write_text("")
    live = subprocess.Popen([sys.executable, "-S", "-c", PID1, str(target)])
    ended = subprocess.Popen([sys.executable, "-S", "-c", ""])
    ended.wait()
    yield live.pid, ended.pid, target
    live.kill()
    live.wait()


@pytest.fixture
def make_fake_host(tmp_path, container_pids):
    """make_fake_host(podman="4.9.3"): a fake host in the test's folder, checked."""
    made = []

    def make(podman: str = "4.9.3") -> FakeHost:
        live, dead, hup_target = container_pids
        host = FakeHost(tmp_path / f"host{len(made)}", live, dead, podman=podman)
        beat = host.paths["proc"] / str(live) / "root/tmp/nightguard/heartbeat"
        hup_target.write_text(str(beat))
        try:
            check_isolated(host)
        except Isolation as exc:
            pytest.fail(f"refusing to run the host helper: {exc} (these tests run as root: "
                        "the machine's own systemctl or swapon would change the machine)",
                        pytrace=False)
        made.append(host)
        return host

    return make


@pytest.fixture
def fake_host(make_fake_host):
    return make_fake_host()


@pytest.fixture
def project(tmp_path):
    """The project's syncable files, in a tree a test may edit, with a .env."""
    return copy_project(tmp_path / "project")


@pytest.fixture
def host(fake_host) -> FakeHost:
    # the host's /swapfile lives in the temp folder; its kernel shows it as /swapfile
    fake_host.configure(swap_names={str(fake_host.paths["swapfile"]): "/swapfile"})
    return fake_host


@pytest.fixture
def deploy(project, host) -> Deployer:
    return Deployer(project, host)
