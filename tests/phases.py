"""A pytest plugin that records when each test's setup, call and teardown ran, on which
xdist worker and in which VM group, to the JSON-lines file ``NG_PHASES_FILE`` names (CI
sets it; unset, it records nothing). The variable is read once, when pytest starts: the
unit tier runs each test without it. ``bench/ci_phases.py`` turns the file into the suite's
phase table: bootstrap, the unit tier, each VM's boot and drills. Each line also carries the
host's CPU counters (/proc/stat: busy and total jiffies) at its end, so the table can say how
busy the machine's cores were while the drills ran."""

from __future__ import annotations

import json
import os

import pytest

_PATH = pytest.StashKey[str]()
_WORKER = pytest.StashKey[str]()


def pytest_configure(config):
    config.stash[_PATH] = os.environ.get("NG_PHASES_FILE", "")
    # read once: the unit tier runs each test in an environment of its own
    config.stash[_WORKER] = os.environ.get("PYTEST_XDIST_WORKER", "main")


def host_cpu() -> list[int]:
    """[busy, total] jiffies of all the host's cores since boot ([] where unreadable)."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return []
    idle = sum(fields[3:5])  # idle, iowait
    return [sum(fields) - idle, sum(fields)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    path = item.config.stash.get(_PATH, "")
    if not path:
        return
    group = item.get_closest_marker("xdist_group")
    line = json.dumps({
        "test": item.nodeid, "when": call.when, "start": call.start, "stop": call.stop,
        "worker": item.config.stash.get(_WORKER, "main"),
        "group": group.args[0] if group and group.args else "unit",
        "failed": call.excinfo is not None and call.when == "call", "cpu": host_cpu()})
    # one short append per line: workers writing at once do not interleave
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
