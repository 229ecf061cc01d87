"""How the e2e drills are laid out over the shared VMs and the xdist workers
(tests/e2e/conftest.py): a renamed file must not silently move to another VM."""

from __future__ import annotations

from pathlib import Path

from tests import lanes
from tests.e2e import conftest as e2e

E2E = Path(e2e.__file__).parent


def test_every_named_file_exists():
    present = {path.name for path in E2E.glob("test_*.py")}
    assert set(e2e.FILE_ORDER) >= present, "a drill file missing from FILE_ORDER"
    assert e2e.SECOND_BOOKWORM <= present


def test_debian_12_files_are_split_over_two_vms_and_debian_13_has_one():
    assert e2e.shared_vm(E2E / "test_alerts.py", "bookworm") == "e2e-bookworm-b"
    assert e2e.shared_vm(E2E / "test_deploy.py", "bookworm") == "e2e-bookworm"
    assert e2e.shared_vm(E2E / "test_alerts.py", "trixie") == "e2e-trixie"
    groups = {"vm-" + e2e.shared_vm(E2E / name, flavour).removeprefix("e2e-")
              for name in e2e.FILE_ORDER for flavour in e2e.FLAVOURS}
    assert groups | {"vm-fresh-bare_host"} == set(e2e.GROUP_ORDER)


def test_with_three_workers_the_last_runs_the_unit_tier_only():
    queue = ["vm-bookworm", "tests/unit/test_a.py::test_x", "vm-trixie",
             "tests/unit/test_b.py::test_y"]
    assert lanes.unit_lane_id(3) == "gw2" and lanes.unit_lane_id(4) == "gw3"
    assert lanes.unit_lane_id(2) is None and lanes.unit_lane_id(0) is None
    assert lanes.pick(queue, unit_lane=True) == "tests/unit/test_a.py::test_x"
    assert lanes.pick(queue, unit_lane=False) == "vm-bookworm"
    assert lanes.pick(queue[1:], unit_lane=False) == "vm-trixie"
    # no VM group left: a VM worker helps with the unit tier; the unit lane never takes a VM
    assert lanes.pick(queue[3:], unit_lane=False) == "tests/unit/test_b.py::test_y"
    assert lanes.pick(["vm-trixie"], unit_lane=True) is None
    assert lanes.pick([], unit_lane=False) is None


def test_every_drill_group_is_a_vm_lane_group():
    assert all(lanes.is_vm_scope(group) for group in e2e.GROUP_ORDER)
    assert lanes.is_vm_scope("vm-fresh-move")
    assert not lanes.is_vm_scope("tests/unit/test_e2e_layout.py::test_every_named_file_exists")
