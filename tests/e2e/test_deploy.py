"""`inv deploy` end to end on both sandbox flavours (Debian 12 / Podman 4.3, Debian 13 /
Podman 5.4): real sshd, real Podman, real systemd, real swap.

The tests of this file run in order on one shared VM per flavour: cold deploy, no-op,
one-file change, bad input, lock, cut connection, broken release with rollback.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.deploy_helpers import (
    CONTAINER,
    GEMINI,
    TOKEN,
    copy_source,
    healthy_now,
    inspect,
    inv,
    inv_env,
    kill_group,
    make_env_file,
    start_inv,
    wait_until,
)

MiB = 1024 * 1024


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("deploy")


def env_for(target, workdir):
    """inv's environment for one VM: its own .env and its own copy of the tree."""
    base = workdir / target["name"]
    if not base.exists():
        base.mkdir()
        copy_source(base / "src")
        make_env_file(base)
    return inv_env(target, base / ".env", base / "src")


@pytest.fixture
def env(sandbox, workdir):
    return env_for(sandbox, workdir)


@pytest.fixture
def bookworm_env(sandbox_bookworm, workdir):
    """For scenarios whose logic is ours alone (lock, cut connection): one flavour is
    enough, and each costs minutes under emulation."""
    return env_for(sandbox_bookworm, workdir)


def audit_lines(ssh_run, sandbox) -> int:
    done = ssh_run(sandbox, "sudo -n sh -c 'cat /var/lib/nightguard/audit.log 2>/dev/null'")
    return len(done.stdout.splitlines())


def test_cold_deploy_is_healthy_with_swap_limits_and_secrets(sandbox, env, ssh_run):
    done = inv(["deploy"], env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert TOKEN not in output and GEMINI not in output
    data = inspect(ssh_run, sandbox)
    assert data["State"]["Running"]
    assert healthy_now(ssh_run, sandbox)
    host = data["HostConfig"]
    assert host["Memory"] == 700 * MiB
    assert host["MemorySwap"] == 2700 * MiB
    assert host["MemoryReservation"] == 500 * MiB
    swap = ssh_run(sandbox, "sudo -n swapon --show=NAME --noheadings; "
                            "grep -c '^/swapfile ' /etc/fstab; stat -c '%s %a' /swapfile")
    assert swap.stdout.split() == ["/swapfile", "1", str(2048 * MiB), "600"], swap.stdout
    # The kernel enforces what inspect claims (cgroup v2: swap.max is swap on top of RAM).
    cgroup = ssh_run(sandbox, f"sudo -n podman exec {CONTAINER} cat /sys/fs/cgroup/memory.max "
                              "/sys/fs/cgroup/memory.swap.max").stdout.split()
    assert cgroup == [str(700 * MiB), str(2000 * MiB)]
    mounted = ssh_run(sandbox, f"sudo -n podman exec {CONTAINER} sh -c "
                               "'test -s /run/secrets/telegram_bot_token && "
                               "test -s /run/secrets/gemini_api_key && echo mounted'")
    assert mounted.stdout.strip() == "mounted"
    leaks = ssh_run(sandbox, f"sudo -n podman inspect {CONTAINER}; ls -a /home/ubuntu/97layerOS")
    assert TOKEN not in leaks.stdout and GEMINI not in leaks.stdout
    assert ".env" not in leaks.stdout.split()
    enabled = ssh_run(sandbox, f"systemctl is-enabled container-{CONTAINER}.service")
    assert enabled.stdout.strip() == "enabled"


def test_second_deploy_changes_nothing(sandbox, env, ssh_run):
    before = inspect(ssh_run, sandbox)["State"]["StartedAt"]
    done = inv(["deploy"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no changes" in done.stdout
    assert "ssh connections: 1, remote commands: 1," in done.stdout
    assert inspect(ssh_run, sandbox)["State"]["StartedAt"] == before


def test_one_line_change_sends_one_file_and_restarts(sandbox, env, ssh_run):
    before = inspect(ssh_run, sandbox)["State"]["StartedAt"]
    changed = env["NIGHTGUARD_SOURCE_DIR"] + "/knowledge/README.md"
    with open(changed, "a") as handle:
        handle.write(f"changed at {time.time()}\n")
    done = inv(["deploy"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sync: 1 file(s) to send, 0 to remove" in done.stdout
    assert "image" not in [line.split(":")[0].strip(" -") for line in done.stdout.splitlines()]
    sent = int(done.stdout.rsplit("bytes sent: ", 1)[1].split()[0])
    assert sent < 40_000, done.stdout  # the file and the helper script, not the tree
    assert inspect(ssh_run, sandbox)["State"]["StartedAt"] != before
    remote = ssh_run(sandbox, "tail -1 /home/ubuntu/97layerOS/knowledge/README.md").stdout
    assert remote.startswith("changed at")


def test_bad_input_fails_in_one_line_and_touches_nothing(sandbox, env, ssh_run, tmp_path):
    lines_before = audit_lines(ssh_run, sandbox)
    missing = tmp_path / ".env"
    missing.write_text(f"TELEGRAM_BOT_TOKEN={TOKEN}\n")
    missing.chmod(0o600)
    cases = [
        (dict(env, NIGHTGUARD_ENV_FILE=str(missing)), "GEMINI_API_KEY is missing"),
        (dict(env, NIGHTGUARD_LIMITS_MEMORY="700mb"), "'700mb' is not a size"),
        (dict(env, NIGHTGUARD_LIMITS_MEMORY_SWAP="600m"), "below limits.memory"),
    ]
    for case_env, message in cases:
        done = inv(["deploy"], case_env)
        assert done.returncode == 2, done.stdout + done.stderr
        assert message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    unreachable = inv(["deploy", "--host", "127.0.0.1"],
                      dict(env, NIGHTGUARD_SSH_PORT="9", NIGHTGUARD_SSH_CONNECT_TIMEOUT="5"))
    assert unreachable.returncode == 1
    assert "unreachable" in unreachable.stderr
    assert audit_lines(ssh_run, sandbox) == lines_before


def test_concurrent_deploy_names_the_lock_holder(sandbox_bookworm, bookworm_env, ssh_run):
    sandbox, env = sandbox_bookworm, bookworm_env
    with open(env["NIGHTGUARD_SOURCE_DIR"] + "/directives/README.md", "a") as handle:
        handle.write(f"lock test {time.time()}\n")
    first = start_inv(["deploy"], env)
    # The first run holds the lock through its restart and health gate (tens of seconds).
    assert wait_until(lambda: ssh_run(sandbox, "sudo -n test -d /var/lib/nightguard/deploy.lock")
                      .returncode == 0, timeout=120, interval=1)
    second = inv(["deploy"], env)
    out, _ = first.communicate(timeout=900)
    assert first.returncode == 0, out
    assert second.returncode == 1, second.stdout + second.stderr
    assert "another deploy holds the lock" in second.stderr
    assert "(deploy) since" in second.stderr
    assert healthy_now(ssh_run, sandbox)


def test_cut_connection_is_repaired_by_the_next_deploy(sandbox_bookworm, bookworm_env, ssh_run):
    sandbox, env = sandbox_bookworm, bookworm_env
    with open(env["NIGHTGUARD_SOURCE_DIR"] + "/directives/README.md", "a") as handle:
        handle.write(f"cut test {time.time()}\n")
    proc = start_inv(["deploy"], env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.strip().startswith("- sync"):
            break  # cut after the files landed, before the restart
    kill_group(proc)
    assert any("sync" in line for line in seen), "".join(seen)
    done = inv(["deploy"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "container: restart" in done.stdout or "container" in done.stdout
    data = inspect(ssh_run, sandbox)
    code = data["Config"]["Labels"]["nightguard.code"]
    again = inv(["deploy"], env)
    assert "no changes" in again.stdout, again.stdout
    assert inspect(ssh_run, sandbox)["Config"]["Labels"]["nightguard.code"] == code
    assert healthy_now(ssh_run, sandbox)


def test_unhealthy_release_is_rolled_back(sandbox, env, ssh_run):
    before = inspect(ssh_run, sandbox)["Config"]["Labels"]["nightguard.spec"]
    broken = dict(env, NIGHTGUARD_AGENT_COMMAND="python3 -c 'import time; time.sleep(10**6)'",
                  NIGHTGUARD_HEALTH_DEADLINE="60")
    done = inv(["deploy"], broken)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "rolled back; the previous version is healthy again" in output
    assert "health check (exit" in output  # what the failing check said is shown
    assert TOKEN not in output
    assert inspect(ssh_run, sandbox)["Config"]["Labels"]["nightguard.spec"] == before
    assert healthy_now(ssh_run, sandbox)
    assert inv(["deploy"], env).stdout.count("no changes") == 1
