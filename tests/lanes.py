"""The suite's lanes on pytest-xdist (loaded by ``-p tests.lanes``, pyproject.toml): with
three workers or more, the last one runs the unit tier only, beside the VM drills; the
others take the VM groups (``vm-...``, tests/e2e/conftest.py) in their order, and help
with the unit tier once no VM group is left.

Why: a broken unit test fails the run in its first minutes instead of after the drills.
Not for speed: each lab VM keeps one core busy (single-threaded TCG), and on two cores the
unit tier beside the drills slows them by about what it saves (measured in the README's
CI figures). A worker never drives a third VM: with three VMs on two cores every drill is
slower by more than it gains.

With fewer than three workers (``-n 2``, ``-n 0``) nothing changes: loadgroup as it is.
"""

from __future__ import annotations

import pytest
from xdist.scheduler.loadgroup import LoadGroupScheduling

VM_GROUP_PREFIX = "vm-"


def is_vm_scope(scope: str) -> bool:
    """A scope is a VM group's name, or a test's node id (no group: the unit tier)."""
    return scope.startswith(VM_GROUP_PREFIX)


def unit_lane_id(workers) -> str | None:
    """The worker id that runs the unit tier only, or None (fewer than three workers)."""
    return f"gw{workers - 1}" if isinstance(workers, int) and workers >= 3 else None


def pick(scopes, unit_lane: bool) -> str | None:
    """The scope a worker takes next from ``scopes`` (in their order): the unit lane any
    non-VM scope; a VM worker the first VM group, else (none left) any scope."""
    own = next((s for s in scopes if is_vm_scope(s) != unit_lane), None)
    return own if own is not None or unit_lane else next(iter(scopes), None)


class LaneScheduling(LoadGroupScheduling):
    def _is_unit_lane(self, node) -> bool:
        return node.gateway.id == unit_lane_id(self.config.getoption("numprocesses"))

    def _assign_work_unit(self, node) -> None:
        scope = pick(self.workqueue, self._is_unit_lane(node))
        if scope is None:
            return
        self.workqueue.move_to_end(scope, last=False)  # the base class takes the first
        super()._assign_work_unit(node)

    def _reschedule(self, node) -> None:
        if node.shutting_down or not self.workqueue:
            super()._reschedule(node)
            return
        if pick(self.workqueue, self._is_unit_lane(node)) is None:
            if self._pending_of(self.assigned_work[node]) == 0:
                node.shutdown()  # only VM groups are left: not this lane's
            return
        super()._reschedule(node)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadgroup":
        return None
    return LaneScheduling(config, log)
