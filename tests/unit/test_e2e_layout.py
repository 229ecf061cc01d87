"""How the e2e drills are laid out over the shared VMs and the xdist workers
(tests/e2e/conftest.py): a renamed file must not silently move to another VM."""

from __future__ import annotations

from pathlib import Path

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
