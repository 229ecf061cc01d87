"""Fixtures for end-to-end tests against real sandbox VMs (QEMU, see tasks/sandbox.py).

One shared VM per flavour per test session (booting one costs about a minute under TCG):
    sandbox_bookworm, sandbox_trixie   session-scoped, names e2e-bookworm / e2e-trixie
    sandbox                            parametrized over both (ids bookworm, trixie)
    fresh_sandbox(os_flavour)          factory for a throw-away VM a test may reboot or
                                       break; destroyed after the test
    fresh_sandbox_module(os_flavour)   the same, shared by the tests of one file
    ssh_run(target, cmd)               runs cmd over OpenSSH, returns CompletedProcess
Each VM fixture yields the dict from tasks.sandbox.target(). Everything here is marked
`e2e`. Outside CI the tests skip where the sandbox cannot run (no QEMU; no image yet and
no way to build one: tasks/sandbox/support.py says why); in CI (the CI environment
variable is set) that fails the run instead of turning it green with skips. The first run
on a machine builds the images (a few minutes per flavour), later runs only boot.
Environment: NG_E2E_KEEP=1 leaves the shared VMs running after the session (faster reruns).
"""

import itertools
import os
import subprocess

import pytest

from tasks.sandbox import image, support
from tasks.sandbox import machine as sb

BOOT_TIMEOUT = 600  # TCG on a busy 2-core CI machine; a normal boot takes ~1 min


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test against a sandbox VM (QEMU, slow)")


# The shared VMs carry state from file to file: the checks of a pristine sandbox come
# first, the reboot drills last.
FILE_ORDER = ("test_sandbox.py", "test_deploy.py", "test_security.py", "test_secrets.py",
              "test_interrupts.py", "test_agent_telegram.py", "test_alerts.py",
              "test_rootless.py",
              "test_kube.py", "test_recovery.py", "test_bare_host.py")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.e2e)

    def rank(item):
        name = os.path.basename(str(item.fspath))
        inside = str(item.fspath).startswith(here)
        return (inside, FILE_ORDER.index(name) if name in FILE_ORDER else len(FILE_ORDER))

    items.sort(key=rank)  # stable: the order inside each file stays


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
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs
    )


@pytest.fixture(scope="session")
def ssh_run():
    return run_over_ssh


def _shared(name, flavour):
    _require_sandbox(flavour)
    target = sb.ensure_up(name, os_flavour=flavour, timeout=BOOT_TIMEOUT)
    target["name"] = name
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

    def make(os_flavour="bookworm", name=None):
        _require_sandbox(os_flavour)
        name = name or f"e2e-fresh-{os.getpid()}-{next(_fresh_ids)}"
        made.append(name)
        target = sb.ensure_up(name, os_flavour=os_flavour, fresh=True, timeout=BOOT_TIMEOUT)
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
