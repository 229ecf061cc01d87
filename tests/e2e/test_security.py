"""The agent is the least trusted thing on the host, and nothing secret leaves by accident.

On the shared Debian 12 sandbox, the agent is played as compromised: from inside its
container it tries to write its code and plants links in the one place it may write,
pointing at root-owned paths; links are also planted in the app dir itself, as an agent
of an older, read-write layout could have done. A deploy and a rollback must leave every
target alone. The agent then prints its token: every way the tool shows the agent's
output (`inv logs`, `inv health`, a failed gate) must show "[REDACTED]" instead.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.deploy_helpers import (
    APP_DIR,
    CONTAINER,
    STATE,
    checked,
    copy_source,
    inv,
    inv_env,
    make_env_file,
    output,
    podman_logs,
)

DATA_DIR = "/home/ubuntu/97layerOS-data"
# values of this file alone: the agent here prints its token into the journal on purpose,
# which other files' searches (for their own values) must not find
TOKEN = "tg-leaky-agent-5a1e07"
GEMINI = "gem-leaky-agent-c0ffee"
PROBES = ("/etc/agent-escape-probe", "/etc/agent-escape-dir", "/root/agent-escape-probe")
# The agent prints its own token at start: what a compromised or careless agent would do.
LEAKY = ("echo \"my token is $(cat /run/secrets/telegram_bot_token)\"\n"
         "exec python3 /app/execution/system/night_guard.py\n")


@pytest.fixture(scope="module")
def env(sandbox_bookworm, tmp_path_factory):
    base = tmp_path_factory.mktemp("security")
    copy_source(base / "src")
    (base / "src/execution/drill").mkdir()
    (base / "src/execution/drill/leaky_agent.sh").write_text(LEAKY)
    env = inv_env(sandbox_bookworm, make_env_file(base, TOKEN, GEMINI), base / "src",
                  NIGHTGUARD_AGENT_COMMAND="sh /app/execution/drill/leaky_agent.sh")
    done = inv(["deploy"], env)
    assert done.returncode == 0, output(done)
    return env


def in_container(ssh_run, target, script: str) -> str:
    return checked(ssh_run, target, f"sudo -n podman exec {CONTAINER} sh -c '{script}'")


def probes_absent(ssh_run, target) -> None:
    listing = ssh_run(target, "sudo -n ls -d " + " ".join(PROBES))
    assert listing.returncode == 2, listing.stdout  # ls: every probe is absent
    assert not listing.stdout.strip()
    # Podman hands the data dir to the agent's user at every start (`:U`): through the
    # agent's link to /etc it must not have handed over /etc too
    owners = checked(ssh_run, target, "stat -c %u /etc /root /var/lib/nightguard").split()
    assert owners == ["0", "0", "0"], owners


def test_the_compromised_agent_cannot_make_root_write_anywhere(sandbox_bookworm, env,
                                                                 ssh_run):
    target = sandbox_bookworm
    tried = in_container(ssh_run, target, (
        "touch /app/knowledge/README.md.ng-tmp 2>&1; "
        "ln -s /etc/agent-escape-probe /app/knowledge/x 2>&1; "
        "ln -s /etc/agent-escape-probe /data/README.md && "
        "ln -s /etc /data/etc && mkdir -p /data/knowledge && "
        "ln -s /root/agent-escape-probe /data/knowledge/README.md && echo planted"))
    assert tried.count("Read-only file system") == 2 and "planted" in tried
    # links of an older read-write layout, in the app dir itself
    checked(ssh_run, target, (
        f"ln -s /etc/agent-escape-probe {APP_DIR}/knowledge/.README.md.ng-000000000000 && "
        f"ln -sfn /etc/agent-escape-dir {APP_DIR}/directives/sub && "
        f"mv {APP_DIR}/knowledge/README.md /tmp/keep.md && "
        f"ln -s /etc/agent-escape-probe {APP_DIR}/knowledge/README.md"))
    probes_absent(ssh_run, target)
    with open(env["NIGHTGUARD_SOURCE_DIR"] + "/knowledge/README.md", "a") as handle:
        handle.write(f"one-line change {time.time()}\n")
    (open(env["NIGHTGUARD_SOURCE_DIR"] + "/directives/sub", "w")).close()
    done = inv(["deploy"], env)
    assert done.returncode == 0, output(done)
    assert "symbolic link(s)" in done.stdout  # they were seen and removed, not followed
    probes_absent(ssh_run, target)
    kinds = checked(ssh_run, target, f"stat -c '%F' {APP_DIR}/knowledge/README.md "
                                     f"{APP_DIR}/directives/sub")
    assert kinds.split("\n")[:2] == ["regular file", "regular empty file"], kinds
    back = inv(["rollback"], env)
    assert back.returncode == 0, output(back)
    probes_absent(ssh_run, target)
    assert checked(ssh_run, target, f"stat -c '%F' {APP_DIR}/knowledge/README.md").strip() \
        == "regular file"
    # the agent's own links stay where it put them: root never walks its data dir
    assert checked(ssh_run, target, f"sudo -n stat -c '%F' {DATA_DIR}/README.md").strip() \
        == "symbolic link"
    again = inv(["deploy"], env)
    assert again.returncode == 0, output(again)
    probes_absent(ssh_run, target)


def test_synced_files_keep_their_modes_and_nothing_is_world_readable_in_state(
        sandbox_bookworm, env, ssh_run):
    source = env["NIGHTGUARD_SOURCE_DIR"]
    private = f"{source}/knowledge/private-notes.md"
    with open(private, "w") as handle:
        handle.write("only for the agent\n")
    import os

    os.chmod(private, 0o600)
    done = inv(["deploy"], env)
    assert done.returncode == 0, output(done)
    mode = checked(ssh_run, sandbox_bookworm, f"stat -c %a {APP_DIR}/knowledge/private-notes.md")
    assert mode.strip() == "600"
    loose = checked(ssh_run, sandbox_bookworm,
                    f"sudo -n find {STATE} -perm /o=rwx -o -perm /g=rwx; sudo -n stat -c %a "
                    f"{STATE}; sudo -n find /tmp -maxdepth 1 -name 'nightguard*'")
    assert loose.split() == ["700"], loose


def test_whatever_the_agent_prints_is_redacted_on_the_laptop(sandbox_bookworm, env, ssh_run):
    logged = podman_logs(ssh_run, sandbox_bookworm)
    assert f"my token is {TOKEN}" in logged  # precondition: the agent did leak it
    shown = inv(["logs", "--tail", "50"], env)
    assert shown.returncode == 0, output(shown)
    assert "my token is [REDACTED]" in shown.stdout
    for task in (["logs", "--tail", "50"], ["health"], ["health", "--json"], ["history"],
                 ["history", "--json"], ["secrets.list"], ["config"]):
        done = inv(task, env)
        assert TOKEN not in output(done) and GEMINI not in output(done), task
    # the value on stdin (grep -f -): a search must not log what it looks for (sudo would)
    host = ssh_run(sandbox_bookworm, f"sudo -n grep -rlF -f - {STATE} /tmp /home/ubuntu "
                                     "/etc/systemd/system; echo searched $?", input=TOKEN)
    assert host.stdout.strip() == "searched 1", host.stdout  # grep ran and found nothing
