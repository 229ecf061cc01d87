"""Automatic recovery on the Debian 12 sandbox (Podman 4.3, the oldest supported), with the
production settings (check every 30 s, 3 retries, heartbeat older than 30 s = hung):
crash -> back within 60 s; hang -> back within 5 minutes; RAM limit crossed -> alive on
swap; RAM+swap limit crossed -> OOM-killed and back; host reboot -> back without a login.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.deploy_helpers import (
    CONTAINER,
    control,
    copy_source,
    healthy_now,
    inspect,
    inv,
    inv_env,
    make_env_file,
    wait_until,
)


@pytest.fixture(scope="module")
def deployed(sandbox_bookworm, tmp_path_factory, ssh_run):
    base = tmp_path_factory.mktemp("recovery")
    copy_source(base / "src")
    env = inv_env(sandbox_bookworm, make_env_file(base), base / "src")
    done = inv(["deploy"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    return sandbox_bookworm


def started_at(ssh_run, target) -> str | None:
    data = inspect(ssh_run, target)
    return data["State"]["StartedAt"] if data and data["State"]["Running"] else None


def back_healthy(ssh_run, target, before: str, timeout: float) -> float | None:
    """Seconds until a new container (other start time) is healthy, or None."""
    started = time.monotonic()

    def recovered():
        now = started_at(ssh_run, target)
        return now and now != before and healthy_now(ssh_run, target)

    return time.monotonic() - started if wait_until(recovered, timeout, 2) else None


def test_crash_is_back_within_60_seconds(deployed, ssh_run):
    before = started_at(ssh_run, deployed)
    control(ssh_run, deployed, "crash")
    seconds = back_healthy(ssh_run, deployed, before, timeout=60)
    assert seconds is not None, "not back and healthy within 60 s after a crash"
    print(f"crash -> healthy in {seconds:.0f} s")


def test_hang_is_restarted_within_5_minutes(deployed, ssh_run):
    before = started_at(ssh_run, deployed)
    control(ssh_run, deployed, "hang")
    # The process stays alive: only the health check can notice.
    assert wait_until(lambda: not healthy_now(ssh_run, deployed), 90, 5)
    assert started_at(ssh_run, deployed) == before
    seconds = back_healthy(ssh_run, deployed, before, timeout=300)
    assert seconds is not None, "hung agent not restarted and healthy within 5 minutes"
    print(f"hang -> healthy in {seconds:.0f} s")


def test_swap_carries_the_agent_past_its_ram_limit_and_oom_is_recovered(deployed, ssh_run):
    before = started_at(ssh_run, deployed)
    control(ssh_run, deployed, "allocate_mb", "1200")  # 700m RAM: 500 MB must go to swap
    logs = wait_until(lambda: "allocated 1200 MB" in ssh_run(
        deployed, f"sudo -n podman logs --tail 5 {CONTAINER}").stdout, timeout=300, interval=5)
    assert logs, "the agent did not finish allocating 1200 MB"
    assert started_at(ssh_run, deployed) == before  # same container: not OOM-killed
    swap_used = ssh_run(deployed, f"sudo -n podman exec {CONTAINER} "
                                  "cat /sys/fs/cgroup/memory.swap.current").stdout.strip()
    assert int(swap_used) > 400 * 1024 * 1024
    assert healthy_now(ssh_run, deployed)
    control(ssh_run, deployed, "allocate_mb", "1700")  # 2900 MB > 2700m RAM+swap
    seconds = back_healthy(ssh_run, deployed, before, timeout=300)
    assert seconds is not None, "not back after crossing the RAM+swap limit"
    events = ssh_run(deployed, "sudo -n journalctl -k --no-pager | grep -ci 'out of memory\\|oom'")
    assert int(events.stdout.strip() or 0) >= 1


def test_reboot_brings_the_agent_back_without_a_login(deployed, ssh_run):
    from tasks.sandbox import machine as sandbox

    before = started_at(ssh_run, deployed)
    sandbox.reboot(deployed["name"], timeout=600)
    # No session is opened except these checks, which only read.
    seconds = back_healthy(ssh_run, deployed, before, timeout=300)
    assert seconds is not None
    swap = ssh_run(deployed, "sudo -n swapon --show=NAME --noheadings").stdout.split()
    assert swap == ["/swapfile"]
