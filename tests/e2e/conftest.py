"""Fixtures for end-to-end tests against real sandbox VMs (QEMU, see tasks/sandbox.py).

Shared VMs, booted once per test session (a boot costs about a minute under TCG):
    sandbox_bookworm, sandbox_trixie   the Debian 12 / Debian 13 VM of the requesting file:
                                       e2e-trixie; e2e-bookworm, or e2e-bookworm-b for the
                                       files in SECOND_BOOKWORM (see shared_vm)
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

The suite runs on three pytest-xdist workers (`-n 3 --dist loadgroup --no-loadscope-reorder
-p tests.lanes`, pyproject.toml): every test of one VM is in one xdist group - the two
Debian 12 VMs', the Debian 13 VM's, each file's fresh VMs' - so each VM is driven by one
worker in one stretch, in FILE_ORDER. Two workers drive VMs, the groups handed out in
GROUP_ORDER to whichever is free: the two Debian 12 halves first, then the cloud-like fresh
VMs and Debian 13 to whichever half ends first. The third runs the unit tier beside them
(tests/lanes.py). Never more than two VMs at once: the machine has two cores and each VM
(single-threaded TCG, tasks/sandbox/qemu.py) keeps one busy; four VMs at once made every
drill 2.5-3.5x slower.
`-n 0` runs everything in one process, in the same order.
Environment: NG_E2E_KEEP=1 leaves the shared VMs running after the session (faster reruns);
NG_E2E_PAUSE=0 never pauses an idle shared VM (for two test runs at once).
"""

import itertools
import os
import subprocess
import sys

import pytest

from tasks.sandbox import image, qemu, support
from tasks.sandbox import machine as sb
from tests.e2e.deploy_helpers import ROOT, close_probe_connections, probe_argv

sys.path.insert(0, str(ROOT / "bench"))
import guest_cpu  # noqa: E402

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


# Handed out in this order (xdist's loadgroup, no reordering by size): the longest first,
# then any other file's fresh VMs; the unit tier's tests (no group) go to their own worker
# (tests/lanes.py).
GROUP_ORDER = ("vm-bookworm", "vm-bookworm-b", "vm-fresh-bare_host", "vm-trixie")


@pytest.hookimpl(trylast=True)  # after pytest grouped the tests by their fixtures' params
def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)

    def rank(item):
        name = os.path.basename(str(item.fspath))
        if not str(item.fspath).startswith(here):
            return (len(GROUP_ORDER) + 1, 0, False)
        group = _group(item)
        # each shared VM busy in one stretch: its files in FILE_ORDER, reboots last
        return (GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER),
                FILE_ORDER.index(name) if name in FILE_ORDER else len(FILE_ORDER),
                item.get_closest_marker("reboots") is not None)  # the VM's last test

    items.sort(key=rank)  # stable: the order inside each file stays


# Debian 12's drills take twice as long as Debian 13's, so they run on two VMs at once:
# these files drive e2e-bookworm-b (each deploys what it needs first), the others
# e2e-bookworm.
SECOND_BOOKWORM = frozenset({"test_interrupts.py", "test_agent_telegram.py", "test_alerts.py"})
FLAVOURS = ("bookworm", "trixie")


def shared_vm(path, flavour: str) -> str:
    """The shared VM of `flavour` that the tests of the file at `path` drive."""
    if flavour == "bookworm" and os.path.basename(str(path)) in SECOND_BOOKWORM:
        return "e2e-bookworm-b"
    return f"e2e-{flavour}"


# A shared VM that the running test does not use is paused (QEMU's `stop`): an idle guest
# under emulation still costs a core's worth of CPU now and then (its timers, Podman's
# health checks), which the 2-core machine needs for the VM under test.
_paused: set[str] = set()
_mine: set[str] = set()  # the shared VMs this process booted
_up: dict[str, dict] = {}  # name -> target, for the whole session


def _wanted(item) -> set[str]:
    names = set(getattr(item, "fixturenames", ()))
    flavours = {flavour for flavour in FLAVOURS if f"sandbox_{flavour}" in names}
    for value in getattr(getattr(item, "callspec", None), "params", {}).values():
        if isinstance(value, str) and value in FLAVOURS:
            flavours.add(value)
    return {shared_vm(item.fspath, flavour) for flavour in flavours}


def _group(item) -> str:
    """The VM a test drives: one xdist group each, so one worker drives it; the tests that
    make VMs of their own, one group per file (vm-fresh-bare_host, ...)."""
    wanted = sorted(_wanted(item))
    if wanted:
        return "vm-" + wanted[0].removeprefix("e2e-")
    return "vm-fresh-" + os.path.basename(str(item.fspath))[:-3].removeprefix("test_")


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


def _guest_cpu_report(vm: str) -> None:
    """Where the shared VM's CPU went this session (bench/guest_cpu.py), beside the phase
    times: .sandbox/guest-cpu-<vm>.txt, printed by .ci/run. A reboot drill ends the guest's
    accounting, so the table covers the session up to its first reboot."""
    path = qemu.state_dir(vm).parent / f"guest-cpu-{vm}.txt"
    try:
        text = guest_cpu.report(_up[vm], top=20)
    except (RuntimeError, subprocess.SubprocessError, ValueError, SystemExit) as exc:
        text = f"no table: {exc}"
    path.write_text(f"{vm}: {text}\n")


def pytest_sessionfinish(session, exitstatus):
    close_probe_connections()
    for vm in list(_paused):  # kept VMs (NG_E2E_KEEP=1) must answer the next run
        _resume(vm)
    for vm in sorted(_mine):
        _guest_cpu_report(vm)
    if os.environ.get("NG_E2E_KEEP") != "1":
        for vm in sorted(_mine):
            sb.down(vm, destroy=True)


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
    argv = probe_argv(target, cmd)
    if "input" not in kwargs:  # a value to search for travels on stdin, never in an argv
        kwargs["stdin"] = subprocess.DEVNULL
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def ssh_run():
    return run_over_ssh


def _shared(request, flavour: str) -> dict:
    """The requesting file's shared VM of `flavour`, booted at its first use."""
    name = shared_vm(request.path, flavour)
    if name not in _up:
        _require_sandbox(flavour)
        if qemu.pid(name) is not None:
            _resume(name)  # left paused by an earlier run
        target = sb.ensure_up(name, os_flavour=flavour, timeout=BOOT_TIMEOUT)
        target["name"] = name
        try:  # costs nothing measurable: 64 bytes per process exit
            guest_cpu.start(target)
        except (RuntimeError, subprocess.SubprocessError) as exc:  # a figure, not a drill
            print(f"guest_cpu: {name}: accounting not started: {exc}")
        _mine.add(name)
        _up[name] = target
    return _up[name]


# Module-scoped, so that each file gets its own VM; the VMs themselves live for the
# session (pytest_sessionfinish takes them down).
@pytest.fixture(scope="module")
def sandbox_bookworm(request):
    return _shared(request, "bookworm")


@pytest.fixture(scope="module")
def sandbox_trixie(request):
    return _shared(request, "trixie")


@pytest.fixture(params=list(FLAVOURS))
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
