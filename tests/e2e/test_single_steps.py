"""The single steps of a deploy, each alone, on the shared Debian 12 sandbox: `inv host.swap`,
`inv sync`, `inv secrets.push`, `inv compose.up`, and `inv unlock --force` stopping a
deploy that holds the lock. Each changes only what differs and says so in the audit.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.deploy_helpers import (
    APP_DIR,
    CONTAINER,
    GEMINI,
    STATE,
    audit,
    checked,
    copy_source,
    inv,
    inv_env,
    make_env_file,
    markers,
    output,
    start_inv,
    wait_until,
)

TOKEN = "tg-single-steps-0b7e42"
PUSHED = "tg-single-steps-pushed-9d1f"


@pytest.fixture(scope="module")
def env(sandbox_bookworm, tmp_path_factory):
    base = tmp_path_factory.mktemp("steps")
    copy_source(base / "src")
    env = inv_env(sandbox_bookworm, make_env_file(base, TOKEN, GEMINI), base / "src")
    done = inv(["deploy"], env)
    assert done.returncode == 0, output(done)
    return env


def test_host_swap_repairs_a_removed_swapfile_and_is_otherwise_a_no_op(sandbox_bookworm, env,
                                                                      ssh_run):
    assert "already in place" in inv(["host.swap"], env).stdout
    checked(ssh_run, sandbox_bookworm, "sudo -n sh -c 'swapoff /swapfile && rm /swapfile'")
    done = inv(["host.swap"], env)
    assert done.returncode == 0, output(done)
    swap = checked(ssh_run, sandbox_bookworm, "sudo -n swapon --show=NAME --noheadings; "
                                              "stat -c %a /swapfile")
    assert swap.split() == ["/swapfile", "600"]
    assert audit(ssh_run, sandbox_bookworm)[-1]["command"] == "host.swap"


def test_sync_sends_the_code_and_the_next_deploy_restarts_the_agent(sandbox_bookworm, env,
                                                                    ssh_run):
    with open(env["NIGHTGUARD_SOURCE_DIR"] + "/directives/README.md", "a") as handle:
        handle.write(f"synced alone {time.time()}\n")
    before = markers(ssh_run, sandbox_bookworm)
    done = inv(["sync"], env)
    assert done.returncode == 0 and "sync: done" in done.stdout, output(done)
    assert checked(ssh_run, sandbox_bookworm, f"tail -1 {APP_DIR}/directives/README.md"
                   ).startswith("synced alone")
    assert markers(ssh_run, sandbox_bookworm) == before  # the agent was not touched
    assert "no changes" in inv(["sync"], env).stdout
    deployed = inv(["deploy"], env)
    assert "why: code changed" in deployed.stdout and "sync" not in [
        line.split(":")[0].strip(" -") for line in deployed.stdout.splitlines()
        if line.startswith("  - ")], output(deployed)


def test_secrets_push_stores_the_value_and_the_next_deploy_mounts_it(sandbox_bookworm, env,
                                                                     ssh_run):
    with open(env["NIGHTGUARD_ENV_FILE"], "w") as handle:
        handle.write(f"TELEGRAM_BOT_TOKEN={PUSHED}\nGEMINI_API_KEY={GEMINI}\n")
    done = inv(["secrets.push", "--name", "telegram_bot_token"], env)
    assert done.returncode == 0 and PUSHED not in output(done), output(done)
    mounted = f"sudo -n podman exec {CONTAINER} cat /run/secrets/telegram_bot_token"
    assert checked(ssh_run, sandbox_bookworm, mounted) == TOKEN  # not until recreated
    assert "not in the running container" in inv(["secrets.list"], env).stdout
    assert inv(["deploy"], env).returncode == 0
    assert checked(ssh_run, sandbox_bookworm, mounted) == PUSHED


def test_compose_up_is_the_deploy(env):
    done = inv(["compose.up"], env)
    assert done.returncode == 0 and "no changes" in done.stdout, output(done)


def test_unlock_force_stops_a_deploy_and_it_says_interrupted(sandbox_bookworm, env, ssh_run):
    with open(env["NIGHTGUARD_SOURCE_DIR"] + "/deployment/requirements-agent.txt", "a") as f:
        f.write(f"# unlock test {time.time()}\n")  # a new image: a deploy that takes a while
    first = start_inv(["deploy"], env)
    assert wait_until(lambda: ssh_run(sandbox_bookworm, f"sudo -n test -s {STATE}/lock.json")
                      .returncode == 0, timeout=120, interval=0.5)
    told = inv(["unlock"], env)
    assert "the lock is held by" in told.stdout and "--force" in told.stdout, output(told)
    forced = inv(["unlock", "--force"], env)
    assert forced.returncode == 0 and "stopped the deploy of" in forced.stdout, output(forced)
    out, _ = first.communicate(timeout=300)
    assert first.returncode != 0, out
    last = audit(ssh_run, sandbox_bookworm)[-1]
    assert last["command"] == "deploy" and last["outcome"] == "interrupted", last
    assert "no lock is held" in inv(["unlock"], env).stdout
    done = inv(["deploy"], env)
    assert done.returncode == 0, output(done)
