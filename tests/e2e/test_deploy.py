"""`inv deploy` end to end on both sandbox flavours (Debian 12 / Podman 4.3, Debian 13 /
Podman 5.4): real sshd, real Podman, real systemd, real swap.

The tests of this file run in order on one shared VM per flavour: cold deploy, no-op,
dry run, one-file change, bad input, lock, history and rollback, a broken release (code and
a secret) rolled back.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.e2e.deploy_helpers import (
    APP_DIR,
    CONTAINER,
    GEMINI,
    STATE,
    TOKEN,
    agent_starts,
    audit,
    checked,
    copy_source,
    figure,
    healthy_now,
    inspect,
    inv,
    inv_env,
    make_env_file,
    markers,
    output,
    start_inv,
)

MiB = 1024 * 1024
BAD_TOKEN = "tg-this-one-makes-the-agent-unhealthy"
# An agent that refuses a token it considers bad, as a real one would when Telegram rejects it
PICKY = ('case "$(cat /run/secrets/telegram_bot_token)" in *unhealthy*) exit 1;; esac\n'
         "exec python3 /app/execution/system/night_guard.py\n")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("deploy")


def env_for(target, workdir):
    """inv's environment for one VM: its own .env and its own copy of the tree."""
    base = workdir / target["name"]
    if not base.exists():
        base.mkdir()
        copy_source(base / "src")
        (base / "src/execution/drill").mkdir(parents=True)
        (base / "src/execution/drill/picky_agent.sh").write_text(PICKY)
        make_env_file(base)
    return inv_env(target, base / ".env", base / "src",
                   NIGHTGUARD_AGENT_COMMAND="sh /app/execution/drill/picky_agent.sh")


@pytest.fixture
def env(sandbox, workdir):
    return env_for(sandbox, workdir)


@pytest.fixture
def bookworm_env(sandbox_bookworm, workdir):
    """For scenarios whose logic is ours alone (lock, history): one flavour is enough."""
    return env_for(sandbox_bookworm, workdir)


def fingerprint(ssh_run, target) -> str:
    """Everything a deploy could change, in one listing (sizes and times of our files, the
    secret and image ids, the unit, the swap)."""
    return checked(ssh_run, target, (
        "sudo -n sh -c 'find /var/lib/nightguard /home/ubuntu/97layerOS "
        "/home/ubuntu/97layerOS-data /etc/systemd/system -xdev -printf \"%p %s %T@\\n\" "
        "| sort; podman secret ls -q | sort; podman images -q --no-trunc | sort; "
        "cat /proc/swaps; podman ps -q --no-trunc'"))


def timed_deploy(env, name: str):
    started = time.monotonic()
    done = inv(["deploy"], env)
    figure(name, time.monotonic() - started)
    return done


def test_cold_deploy_is_healthy_with_swap_limits_and_secrets(sandbox, env, ssh_run):
    done = timed_deploy(env, f"{sandbox['name']}: cold deploy (image build included)")
    assert done.returncode == 0, output(done)
    assert TOKEN not in output(done) and GEMINI not in output(done)
    assert "ssh connections: 1, remote commands: 1," in done.stdout
    data = inspect(ssh_run, sandbox)
    assert data["State"]["Running"]
    assert healthy_now(ssh_run, sandbox)
    host = data["HostConfig"]
    assert host["Memory"] == 700 * MiB
    assert host["MemorySwap"] == 2700 * MiB
    assert host["MemoryReservation"] == 500 * MiB
    swap = checked(ssh_run, sandbox, "sudo -n swapon --show=NAME --noheadings; "
                   "grep -c '^/swapfile ' /etc/fstab; stat -c '%s %a' /swapfile")
    assert swap.split() == ["/swapfile", "1", str(2048 * MiB), "600"], swap
    # The kernel enforces what inspect claims (cgroup v2: swap.max is swap on top of RAM).
    cgroup = checked(ssh_run, sandbox, f"sudo -n podman exec {CONTAINER} cat "
                     "/sys/fs/cgroup/memory.max /sys/fs/cgroup/memory.swap.max").split()
    assert cgroup == [str(700 * MiB), str(2000 * MiB)]
    mounted = checked(ssh_run, sandbox, f"sudo -n podman exec {CONTAINER} sh -c "
                      "'test -s /run/secrets/telegram_bot_token && "
                      "test -s /run/secrets/gemini_api_key && echo mounted'")
    assert mounted.strip() == "mounted"
    leaks = checked(ssh_run, sandbox, f"sudo -n podman inspect {CONTAINER}; ls -a {APP_DIR}")
    assert TOKEN not in leaks and GEMINI not in leaks
    assert ".env" not in leaks.split()
    assert checked(ssh_run, sandbox, f"systemctl is-enabled container-{CONTAINER}.service"
                   ).strip() == "enabled"
    release = markers(ssh_run, sandbox)
    assert set(release) == {"NG_RELEASE_CODE", "NG_RELEASE_IMAGE", "NG_RELEASE_SECRETS",
                            "NG_RELEASE_SPEC", "NG_RELEASE_VERSION"}
    last = audit(ssh_run, sandbox)[-1]
    assert last["outcome"] == "ok" and last["version"] == release["NG_RELEASE_VERSION"]


def test_the_agent_reads_its_code_and_writes_only_its_data_dir(sandbox, env, ssh_run):
    probe = (f"sudo -n podman exec {CONTAINER} sh -c 'touch /app/x 2>&1; echo code=$?; "
             "touch /data/x && echo data=0; id -u'")
    said = checked(ssh_run, sandbox, probe)
    assert "Read-only file system" in said and "code=1" in said
    assert "data=0" in said and said.split()[-1] == "1000"


def test_second_deploy_changes_nothing(sandbox, env, ssh_run):
    before = inspect(ssh_run, sandbox)["State"]["StartedAt"]
    lines = len(audit(ssh_run, sandbox))
    done = timed_deploy(env, f"{sandbox['name']}: no-op deploy")
    assert done.returncode == 0, output(done)
    assert "no changes" in done.stdout
    assert "ssh connections: 1, remote commands: 1," in done.stdout
    assert inspect(ssh_run, sandbox)["State"]["StartedAt"] == before
    after = audit(ssh_run, sandbox)
    assert len(after) == lines + 1 and after[-1]["outcome"] == "no changes"


def test_dry_run_changes_nothing_on_the_host(sandbox, env, ssh_run):
    changed = env["NIGHTGUARD_SOURCE_DIR"] + "/knowledge/README.md"
    with open(changed, "a") as handle:
        handle.write(f"dry run {time.time()}\n")
    before = fingerprint(ssh_run, sandbox)
    done = inv(["deploy", "--dry-run"], env)
    assert done.returncode == 0, output(done)
    assert "plan: sync: 1 file(s) to send" in done.stdout
    assert "would: sync" in done.stdout and "dry run: nothing was changed" in done.stdout
    assert fingerprint(ssh_run, sandbox) == before


def test_one_line_change_sends_about_that_file_and_restarts_the_agent(sandbox, env, ssh_run):
    container = inspect(ssh_run, sandbox)["Id"]
    starts = agent_starts(ssh_run, sandbox)
    done = timed_deploy(env, f"{sandbox['name']}: one-file change deploy")  # from the dry run
    assert done.returncode == 0, output(done)
    assert "sync: 1 file(s) to send, 0 to remove" in done.stdout
    steps = [line.split(":")[0].strip(" -") for line in done.stdout.splitlines()
             if line.startswith("  - ")]
    assert "image" not in steps and "unit" not in steps  # code only: no rebuild, no reload
    assert "agent" in steps and "container" not in steps  # restarted in its container
    sent = int(done.stdout.rsplit("bytes sent: ", 1)[1].split()[0])
    assert sent < 6_000, done.stdout  # the file and small requests, not the tree or the helper
    assert inspect(ssh_run, sandbox)["Id"] == container  # the same container...
    assert agent_starts(ssh_run, sandbox) == starts + 1  # ...with a new agent process
    # gated by that process's own first beat (the kernel's start time of ng-supervise's new
    # child), not by a `podman healthcheck run`: the change did not touch the check
    assert "healthy: the restarted agent's first heartbeat" in done.stdout, done.stdout
    assert markers(ssh_run, sandbox)["NG_RELEASE_VERSION"] == \
        audit(ssh_run, sandbox)[-1]["version"]
    assert "no changes" in inv(["deploy"], env).stdout
    remote = checked(ssh_run, sandbox, f"tail -1 {APP_DIR}/knowledge/README.md")
    assert remote.startswith("dry run")


@pytest.mark.parametrize(("setup", "message"), [
    ("missing_key", "GEMINI_API_KEY is missing"),
    ("bad_size", "'700mb' is not a size"),
    ("swap_below", "below limits.memory"),
    ("newline_image", "image_name: contains a control character"),
    ("not_utf8", "line 2 is not UTF-8"),
    ("duplicate_key", "TELEGRAM_BOT_TOKEN is set twice (lines 1 and 3)"),
    ("group_readable", "chmod 600"),
    ("key_in_tree", "holds a private key"),
])
def test_bad_input_fails_in_one_line_and_touches_nothing(sandbox_bookworm, bookworm_env,
                                                         ssh_run, tmp_path, setup, message):
    # what is checked here is checked on the laptop: one Podman generation is enough
    sandbox, env = sandbox_bookworm, bookworm_env
    lines_before = len(audit(ssh_run, sandbox))
    case = dict(env)
    env_file = tmp_path / ".env"
    env_file.write_text(f"TELEGRAM_BOT_TOKEN={TOKEN}\nGEMINI_API_KEY={GEMINI}\n")
    env_file.chmod(0o600)
    case["NIGHTGUARD_ENV_FILE"] = str(env_file)
    planted = None
    if setup == "missing_key":
        env_file.write_text(f"TELEGRAM_BOT_TOKEN={TOKEN}\n")
    elif setup == "bad_size":
        case["NIGHTGUARD_LIMITS_MEMORY"] = "700mb"
    elif setup == "swap_below":
        case["NIGHTGUARD_LIMITS_MEMORY_SWAP"] = "600m"
    elif setup == "newline_image":
        case["NIGHTGUARD_IMAGE_NAME"] = "localhost/ng\nExecStartPre=/bin/touch /tmp/pwned"
    elif setup == "not_utf8":
        env_file.write_bytes(f"TELEGRAM_BOT_TOKEN={TOKEN}\n".encode() + b"GEMINI_API_KEY=\xff\n")
    elif setup == "duplicate_key":
        env_file.write_text(f"TELEGRAM_BOT_TOKEN={TOKEN}\nGEMINI_API_KEY={GEMINI}\n"
                            f"TELEGRAM_BOT_TOKEN=other\n")
    elif setup == "group_readable":
        env_file.chmod(0o640)
    elif setup == "key_in_tree":
        planted = tmp_path.parent / "planted_key.txt"
        planted = env["NIGHTGUARD_SOURCE_DIR"] + "/knowledge/id_backup.txt"
        with open(planted, "w") as handle:
            handle.write("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEA\n")
    try:
        done = inv(["deploy"], case)
    finally:
        if planted:
            import os

            os.remove(planted)
    assert done.returncode == 2, output(done)
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in output(done)
    assert len(audit(ssh_run, sandbox)) == lines_before


def test_an_unreachable_host_is_one_line(bookworm_env):
    env = bookworm_env
    done = inv(["deploy", "--host", "127.0.0.1"],
               dict(env, NIGHTGUARD_SSH_PORT="9", NIGHTGUARD_SSH_CONNECT_TIMEOUT="5"))
    assert done.returncode == 1
    assert "connection refused" in done.stderr  # told apart from no answer and no route
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_concurrent_deploy_names_the_lock_holder(sandbox_bookworm, bookworm_env, ssh_run):
    sandbox, env = sandbox_bookworm, bookworm_env
    with open(env["NIGHTGUARD_SOURCE_DIR"] + "/directives/README.md", "a") as handle:
        handle.write(f"lock test {time.time()}\n")
    first = start_inv(["deploy"], env)
    # A code-only deploy is over in seconds: the first is frozen on the laptop once its
    # first step is done (its host helper, and so the lock, waits for it), then thawed.
    seen = []
    while not any(line.startswith("  - ") for line in seen):
        line = first.stdout.readline()
        assert line, "".join(seen)  # the first deploy ended before any step
        seen.append(line)
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        checked(ssh_run, sandbox, f"sudo -n test -s {STATE}/lock.json")
        second = inv(["deploy"], env)
        shown = inv(["unlock"], env)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    out, _ = first.communicate(timeout=900)
    assert first.returncode == 0, "".join(seen) + out
    assert second.returncode == 1, output(second)
    assert "another deploy holds the lock" in second.stderr
    assert "(deploy) since" in second.stderr
    assert "the lock is held by" in shown.stdout and "(deploy)" in shown.stdout, output(shown)
    assert healthy_now(ssh_run, sandbox)
    assert "no lock is held" in inv(["unlock"], env).stdout


def test_history_lists_releases_and_rollback_goes_back(sandbox_bookworm, bookworm_env, ssh_run):
    sandbox, env = sandbox_bookworm, bookworm_env
    current = markers(ssh_run, sandbox)["NG_RELEASE_VERSION"]
    shown = inv(["history", "--json"], env)
    assert shown.returncode == 0, output(shown)
    import json

    data = json.loads(shown.stdout)
    versions = [r["version"] for r in data["releases"]]
    assert versions[0] == current and len(versions) >= 2
    assert data["audit"][0]["command"] in ("deploy", "unlock")  # newest first
    back = inv(["rollback"], env)
    assert back.returncode == 0, output(back)
    assert markers(ssh_run, sandbox)["NG_RELEASE_VERSION"] == versions[1]
    assert healthy_now(ssh_run, sandbox)
    forward = inv(["rollback", "--to", current[:6]], env)
    assert forward.returncode == 0, output(forward)
    assert markers(ssh_run, sandbox)["NG_RELEASE_VERSION"] == current
    assert audit(ssh_run, sandbox)[-1]["outcome"] == "ok"
    assert "no changes" in inv(["deploy"], env).stdout


def test_a_broken_release_is_rolled_back_with_its_secret(sandbox, env, ssh_run):
    before = markers(ssh_run, sandbox)
    with open(env["NIGHTGUARD_SOURCE_DIR"] + "/directives/README.md", "a") as handle:
        handle.write(f"broken release {time.time()}\n")
    env_file = env["NIGHTGUARD_ENV_FILE"]
    good = open(env_file).read()
    with open(env_file, "w") as handle:
        handle.write(good.replace(TOKEN, BAD_TOKEN))
    try:
        done = inv(["deploy"], dict(env, NIGHTGUARD_HEALTH_DEADLINE="45"))
    finally:
        with open(env_file, "w") as handle:
            handle.write(good)
    assert done.returncode == 1, output(done)
    assert f"rolled back to {before['NG_RELEASE_VERSION']}, which is healthy again" in \
        output(done)
    assert "health check (exit" in output(done) or "log:" in output(done)
    assert BAD_TOKEN not in output(done)
    assert markers(ssh_run, sandbox) == before
    mounted = checked(ssh_run, sandbox, f"sudo -n podman exec {CONTAINER} "
                      "cat /run/secrets/telegram_bot_token")
    assert mounted == TOKEN  # the value that worked is back, not only the old spec
    assert healthy_now(ssh_run, sandbox)
    assert audit(ssh_run, sandbox)[-1]["outcome"] == "rolled-back"
    listed = inv(["secrets.list"], env)
    assert listed.stdout.count("matches .env") == 2, listed.stdout
    again = inv(["deploy"], env)  # the code change alone is fine
    assert again.returncode == 0, output(again)


def test_exec_runs_as_the_agent_user_and_its_exit_code_comes_through(sandbox, env, ssh_run):
    assert healthy_now(ssh_run, sandbox)
    user = inv(["exec", "--", "id", "-u"], env)
    assert user.returncode == 0, output(user)
    assert user.stdout.splitlines() == ["1000"]  # the agent's own user, not root
    root = inv(["exec", "--root", "--", "id", "-u"], env)
    assert root.returncode == 0, output(root)
    assert root.stdout.splitlines() == ["0"]
    failed = inv(["exec", "--", "sh", "-c", "echo to-stderr >&2; exit 7"], env)
    assert failed.returncode == 7, output(failed)
    assert failed.stderr.splitlines() == ["to-stderr"] and failed.stdout == ""
    secret = inv(["exec", "--", "cat", "/run/secrets/telegram_bot_token"], env)
    assert secret.returncode == 0, output(secret)
    assert TOKEN not in secret.stdout and secret.stdout.strip() == "[REDACTED]"
    shell = inv(["exec", "--tty"], env)
    assert shell.returncode == 0, output(shell)
    assert shell.stdout.splitlines()[-1].startswith("ssh -t ")
    assert f"sudo podman exec -it --user 1000:1000 {CONTAINER} sh" in shell.stdout
