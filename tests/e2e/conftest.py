"""Fixtures for end-to-end tests against real sandbox VMs (QEMU, see tasks/sandbox.py).

One shared VM per flavour per test session (booting one costs about a minute under TCG):
    sandbox_bookworm, sandbox_trixie   session-scoped, names e2e-bookworm / e2e-trixie
    sandbox                            parametrized over both (ids bookworm, trixie)
    fresh_sandbox(os_flavour)          factory for a throw-away VM a test may reboot or
                                       break; destroyed after the test (keywords go to
                                       ensure_up, e.g. metadata= for bookworm-cloud)
    fresh_sandbox_module(os_flavour)   the same, shared by the tests of one file
    ssh_run(target, cmd)               runs cmd over OpenSSH, returns CompletedProcess
Each VM fixture yields the dict from tasks.sandbox.target(). Everything here is marked
`e2e`. Outside CI the tests skip where the sandbox cannot run (no QEMU; no image yet and
no way to build one: tasks/sandbox/support.py says why); in CI (the CI environment
variable is set) that fails the run instead of turning it green with skips. The first run
on a machine builds the images (a few minutes per flavour), later runs only boot.

The suite runs on two pytest-xdist workers (`-n 2 --dist loadgroup`, pyproject.toml): every
test of one VM is in one xdist group - the Debian 12 VM's, the Debian 13 VM's, the fresh
VMs' - so each VM is driven by one worker in one stretch, in FILE_ORDER, while the other
worker drives another VM (most of a drill is waiting on the guest's clocks: health checks,
restart delays, timers). `-n 0` runs everything in one process, in the same order.
Environment: NG_E2E_KEEP=1 leaves the shared VMs running after the session (faster reruns);
NG_E2E_PAUSE=0 never pauses an idle shared VM (for two test runs at once).
"""

import itertools
import os
import subprocess

import pytest

from tasks.sandbox import image, qemu, support
from tasks.sandbox import machine as sb

BOOT_TIMEOUT = 600  # TCG on a busy 2-core CI machine; a normal boot takes ~1 min


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test against a sandbox VM (QEMU, slow)")
    config.addinivalue_line("markers", "reboots: reboots its shared VM, so runs last on it")


# The shared VMs carry state from file to file: the checks of a pristine sandbox come
# first, the reboot drills last.
FILE_ORDER = ("test_sandbox.py", "test_deploy.py", "test_single_steps.py", "test_security.py",
              "test_data.py", "test_secrets.py", "test_interrupts.py", "test_agent_telegram.py",
              "test_alerts.py", "test_rootless.py",
              "test_kube_play.py", "test_recovery.py", "test_bare_host.py", "test_move.py")


def pytest_itemcollected(item):
    if str(item.fspath).startswith(os.path.dirname(__file__)):
        item.add_marker(pytest.mark.e2e)
        item.add_marker(pytest.mark.xdist_group(_group(item)))  # read by xdist's loadgroup


@pytest.hookimpl(trylast=True)  # after pytest grouped the tests by their fixtures' params
def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)

    def rank(item):
        name = os.path.basename(str(item.fspath))
        inside = str(item.fspath).startswith(here)
        # every file's tests on the Debian 12 VM, then on the Debian 13 one, then the tests
        # that make VMs of their own: each shared VM busy in one stretch (see _wanted)
        wanted = _wanted(item)
        flavour = 0 if SHARED["bookworm"] in wanted else 1 if wanted else 2
        return (inside, flavour,
                FILE_ORDER.index(name) if name in FILE_ORDER else len(FILE_ORDER),
                item.get_closest_marker("reboots") is not None)  # the VM's last test

    items.sort(key=rank)  # stable: the order inside each file stays


# A shared VM that the running test does not use is paused (QEMU's `stop`): an idle guest
# under emulation still costs a core's worth of CPU now and then (its timers, Podman's
# health checks), which the 2-core machine needs for the VM under test.
SHARED = {"bookworm": "e2e-bookworm", "trixie": "e2e-trixie"}
_paused: set[str] = set()
_mine: set[str] = set()  # the shared VMs this process booted


def _wanted(item) -> set[str]:
    names = set(getattr(item, "fixturenames", ()))
    wanted = {vm for flavour, vm in SHARED.items() if f"sandbox_{flavour}" in names}
    for value in getattr(getattr(item, "callspec", None), "params", {}).values():
        if isinstance(value, str) and value in SHARED:
            wanted.add(SHARED[value])
    return wanted


def _group(item) -> str:
    """The VM a test drives: one xdist group each, so one worker drives it."""
    wanted = _wanted(item)
    for flavour, vm in SHARED.items():
        if vm in wanted:
            return f"vm-{flavour}"
    return "vm-fresh"


def _resume(vm: str) -> None:
    qemu.monitor(vm, "cont")
    _paused.discard(vm)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if not str(item.fspath).startswith(os.path.dirname(__file__)) or \
            os.environ.get("NG_E2E_PAUSE") == "0":  # two runs at once share the VMs
        return
    wanted = _wanted(item)
    for vm in _mine:  # another worker's VM is that worker's business
        if vm in wanted and vm in _paused:
            _resume(vm)
        elif vm not in wanted and vm not in _paused and qemu.pid(vm) is not None:
            qemu.monitor(vm, "stop")
            _paused.add(vm)


def pytest_sessionfinish(session, exitstatus):
    for vm in list(_paused):  # kept VMs (NG_E2E_KEEP=1) must answer the next run
        _resume(vm)


def _require_sandbox(flavour="bookworm"):
    problem = support.boot_problem()
    if problem is None and not image.image_dir(flavour).is_dir():
        problem = support.build_problem(image.cache_dir())
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the sandbox: {problem}")
        pytest.skip(problem)


def run_over_ssh(target, cmd, timeout=300, **kwargs):
    """Runs `cmd` on the sandbox `target` (a dict from sandbox.target()) with OpenSSH."""
    argv = sb.build_ssh_argv(target["port"], target["key_filename"], target["known_hosts"], cmd)
    if "input" not in kwargs:  # a value to search for travels on stdin, never in an argv
        kwargs["stdin"] = subprocess.DEVNULL
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def ssh_run():
    return run_over_ssh


def _shared(name, flavour):
    _require_sandbox(flavour)
    if qemu.pid(name) is not None:
        _resume(name)  # left paused by an earlier run
    target = sb.ensure_up(name, os_flavour=flavour, timeout=BOOT_TIMEOUT)
    target["name"] = name
    _mine.add(name)
    yield target
    if os.environ.get("NG_E2E_KEEP") != "1":
        sb.down(name, destroy=True)


@pytest.fixture(scope="session")
def sandbox_bookworm():
    yield from _shared("e2e-bookworm", "bookworm")


@pytest.fixture(scope="session")
def sandbox_trixie():
    yield from _shared("e2e-trixie", "trixie")


@pytest.fixture(params=["bookworm", "trixie"])
def sandbox(request):
    return request.getfixturevalue(f"sandbox_{request.param}")


_fresh_ids = itertools.count(1)


def _fresh():
    """Factory: make("bookworm") boots a new VM on a new disk; destroyed afterwards."""
    _require_sandbox()
    made = []

    def make(os_flavour="bookworm", name=None, **boot):
        _require_sandbox(os_flavour)
        name = name or f"e2e-fresh-{os.getpid()}-{next(_fresh_ids)}"
        made.append(name)
        target = sb.ensure_up(name, os_flavour=os_flavour, fresh=True, timeout=BOOT_TIMEOUT,
                              **boot)
        target["name"] = name
        return target

    yield make
    if os.environ.get("NG_E2E_KEEP") != "1":
        for name in made:
            sb.down(name, destroy=True)


@pytest.fixture
def fresh_sandbox():
    """A VM a single test may reboot or break."""
    yield from _fresh()


@pytest.fixture(scope="module")
def fresh_sandbox_module():
    """A VM the tests of one file break together, in order (one boot instead of several)."""
    yield from _fresh()
