"""Automatic recovery with the production settings (a heartbeat older than 15 s = hung:
the container's PID 1 kills the agent; the full check every 10 min):
crash -> back within 60 s; hang -> back within 60 s on Debian 13 (45 s the target on
Debian 12, tests/e2e/test_alerts.py); RAM limit
crossed -> alive on swap; RAM+swap limit crossed -> OOM-killed by the kernel in the
container's own cgroup, and back.

Each fault once per flavour: crash and hang here on Debian 13 / Podman 5.4 and, with the
same bounds, in tests/e2e/test_alerts.py on Debian 12 / Podman 4.3 (where the watcher's
messages about them are checked too); the memory drill here on both. A host reboot is the
Debian 13 VM's last test here (nothing runs on that VM after it), and on Debian 12 the fresh
VM's of tests/e2e/test_bare_host.py (with a rootless agent beside the rootful one).

Every clock starts at the moment the fault is made, and the agent is only watched
passively (Podman's recorded health, the container's start time): a `podman healthcheck
run` of the test's own would count towards Podman's failure streak.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.deploy_helpers import (
    CONTAINER,
    back_healthy,
    checked,
    control,
    copy_source,
    fault_then_back,
    figure,
    health_status,
    inspect,
    inv,
    inv_env,
    make_env_file,
    output,
    podman_logs,
    reboot_and_check_back,
    started_at,
    wait_until,
)

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def deployed(request, tmp_path_factory):
    sandbox = request.getfixturevalue(f"sandbox_{request.param}")
    base = tmp_path_factory.mktemp(f"recovery-{sandbox['name']}")
    copy_source(base / "src")
    env = inv_env(sandbox, make_env_file(base), base / "src")
    done = inv(["deploy"], env)
    assert done.returncode == 0, output(done)
    return sandbox


@pytest.mark.parametrize("deployed", ["trixie"], indirect=True)
def test_crash_is_back_within_60_seconds(deployed, ssh_run):
    assert wait_until(lambda: health_status(ssh_run, deployed) == "healthy", 120, 2)
    fault_then_back(ssh_run, deployed, "crash", 60)


@pytest.mark.parametrize("deployed", ["trixie"], indirect=True)
def test_hang_is_killed_by_its_supervisor_and_restarted(deployed, ssh_run):
    assert wait_until(lambda: health_status(ssh_run, deployed) == "healthy", 120, 2)
    seconds = fault_then_back(ssh_run, deployed, "hang", 120)
    journal = checked(ssh_run, deployed, f"sudo -n journalctl -u container-{CONTAINER}.service "
                                         f"-o cat --no-pager --since '-{int(seconds) + 60}s'")
    assert "the agent is hung, killing it (the container exits 120" in journal, \
        journal[-2000:]


@pytest.mark.parametrize("deployed", ["trixie"], indirect=True)
def test_a_container_frozen_as_a_whole_is_restarted_by_systemds_watchdog(deployed, ssh_run):
    """`podman pause` freezes every process of the container, ng-supervise included: no
    more liveness pings, and after WatchdogSec (30 s) systemd kills conmon, the unit's
    ExecStopPost removes the frozen container, and the restart brings a healthy one."""
    assert wait_until(lambda: health_status(ssh_run, deployed) == "healthy", 120, 2)
    before = started_at(ssh_run, deployed)
    checked(ssh_run, deployed, f"sudo -n podman pause {CONTAINER}")
    since = time.monotonic()
    seconds = back_healthy(ssh_run, deployed, before, since, 180)
    assert seconds is not None, "a frozen container was not replaced within 3 minutes"
    assert seconds > 25, f"back after {seconds:.0f} s: before the watchdog's 30 s?"
    figure(f"{deployed['name']}: frozen container -> healthy", seconds)
    journal = checked(ssh_run, deployed, f"sudo -n journalctl -u container-{CONTAINER}.service "
                                         f"-o cat --no-pager --since '-{int(seconds) + 60}s'")
    assert "Watchdog timeout (limit 30s)!" in journal, journal[-2000:]
    assert checked(ssh_run, deployed, "sudo -n podman ps -a --format '{{.Names}} {{.Status}}'"
                   ).count(CONTAINER) == 1  # the frozen one is gone, not left beside


def kernel_oom_lines(ssh_run, target, since_epoch: int) -> str:
    return checked(ssh_run, target, f"sudo -n journalctl -k --since @{since_epoch} --no-pager "
                                    "-o cat | grep -i 'oom' || true")


@pytest.mark.parametrize("deployed", ["bookworm", "trixie"], indirect=True)
def test_swap_carries_the_agent_past_its_ram_limit_and_oom_is_recovered(deployed, ssh_run):
    assert wait_until(lambda: health_status(ssh_run, deployed) == "healthy", 120, 2)
    data = inspect(ssh_run, deployed)
    before, cid = data["State"]["StartedAt"], data["Id"]
    window = int(checked(ssh_run, deployed, "date +%s"))
    control(ssh_run, deployed, "allocate_mb", "1200")  # 700m RAM: 500 MB must go to swap
    logs = wait_until(lambda: "allocated 1200 MB" in podman_logs(
        ssh_run, deployed, "--tail 5"), timeout=300, interval=5)
    assert logs, "the agent did not finish allocating 1200 MB"
    assert started_at(ssh_run, deployed) == before  # same container: not OOM-killed
    swap_used = checked(ssh_run, deployed, f"sudo -n podman exec {CONTAINER} "
                                           "cat /sys/fs/cgroup/memory.swap.current").strip()
    assert int(swap_used) > 400 * MiB
    assert kernel_oom_lines(ssh_run, deployed, window) == ""  # nothing killed yet
    control(ssh_run, deployed, "allocate_mb", "1700")  # 2900 MB > 2700m RAM+swap
    since = time.monotonic()
    seconds = back_healthy(ssh_run, deployed, before, since, 300)
    assert seconds is not None, "not back after crossing the RAM+swap limit"
    killed = kernel_oom_lines(ssh_run, deployed, window)
    # the kernel's OOM killer acted in this container's cgroup, during this test
    assert "oom-kill" in killed and cid in killed, killed
    figure(f"{deployed['name']}: OOM kill -> healthy", seconds)


@pytest.mark.reboots
@pytest.mark.parametrize("deployed", ["trixie"], indirect=True)
def test_a_reboot_brings_the_agent_back_before_anyone_logs_in(deployed, ssh_run):
    reboot_and_check_back(ssh_run, deployed)
