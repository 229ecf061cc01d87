"""Secrets end to end: exposure searches and rotation, on the shared Debian 12 sandbox.

Each exposure test searches for a known value where it must not be; each would fail if the
value got there (the positive control checks that the search itself finds a planted value).
Shell history is not searched: the tool never runs an interactive shell on the host, and a
non-interactive ssh command writes no history, so such a search could never fail; what a
history would have held - the command lines - is covered by the process-list samples and
by sudo's log in the journal, both searched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from tests.e2e.deploy_helpers import (
    CONTAINER,
    GEMINI,
    TOKEN,
    audit,
    checked,
    copy_source,
    healthy_now,
    inspect,
    inv,
    inv_env,
    kill_group,
    make_env_file,
    podman_logs,
    start_inv,
)
from tests.fake_secretmanager import FakeSecretManager

NEW_TOKEN = "tg-rotated-71c0de5a"
BAD_TOKEN = "tg-makes-agent-unhealthy"
CUT_TOKEN = "tg-cut-rotation-5e61"


@pytest.fixture(scope="module")
def env(sandbox_bookworm, tmp_path_factory):
    base = tmp_path_factory.mktemp("secrets")
    copy_source(base / "src")
    # An agent that refuses to start with a key it considers bad, as a real one would
    # when Telegram rejects its token.
    (base / "src" / "execution" / "drill").mkdir()
    (base / "src" / "execution" / "drill" / "picky_agent.sh").write_text(
        'case "$(cat /run/secrets/telegram_bot_token)" in *unhealthy*) exit 1;; esac\n'
        "exec python3 /app/execution/system/night_guard.py\n")
    env_file = make_env_file(base)
    env = inv_env(sandbox_bookworm, env_file, base / "src",
                  NIGHTGUARD_AGENT_COMMAND="sh /app/execution/drill/picky_agent.sh")
    done = inv(["deploy"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    return env


def write_env(env, token):
    with open(env["NIGHTGUARD_ENV_FILE"], "w") as handle:
        handle.write(f"TELEGRAM_BOT_TOKEN={token}\nGEMINI_API_KEY={GEMINI}\n")


def host_search(ssh_run, target, value) -> str:
    """Every place on the host a value must never be, searched in one go: podman inspect,
    the whole journal, our state, the unit files, the app and data dirs, /tmp. Each part
    must run (exit 0 or grep's 1 for "not found"), or the search proves nothing. The value
    travels on stdin (`grep -f -`): a search must not log what it looks for (sudo would)."""
    script = (
        f"sudo -n podman inspect {CONTAINER} || exit 90; "
        "sudo -n journalctl --no-pager -o cat || exit 91; "
        "sudo -n grep -rF -f - /home/ubuntu /var/lib/nightguard /etc/systemd/system /tmp; "
        "test $? -le 1 || exit 92"
    )
    done = ssh_run(target, script, input=value + "\n")
    assert done.returncode == 0, (done.returncode, done.stderr)
    return done.stdout


def sample_processes(ssh_run, target, stop: threading.Event, seen: list[str]):
    while not stop.is_set():
        seen.append(ssh_run(target, "ps -eo args").stdout)


def test_search_finds_a_planted_value(sandbox_bookworm, ssh_run):
    ssh_run(sandbox_bookworm, "echo planted-canary-123 > /home/ubuntu/canary.txt")
    try:
        assert "planted-canary-123" in host_search(ssh_run, sandbox_bookworm,
                                                  "planted-canary-123")
    finally:
        ssh_run(sandbox_bookworm, "rm -f /home/ubuntu/canary.txt")


def test_secret_files_on_host_are_root_only(sandbox_bookworm, ssh_run, env):
    # Podman's value store and our state (salt, HMACs, audit log, kept code) are root only
    store = "/var/lib/containers/storage/secrets/filedriver/secretsdata.json"
    checked(ssh_run, sandbox_bookworm, f"sudo -n test -s {store}")  # precondition
    found = checked(ssh_run, sandbox_bookworm,
                    "sudo -n find /var/lib/containers/storage/secrets /var/lib/nightguard "
                    "-type f -size +0 -perm /o=rwx ! -name base.tar; "
                    "sudo -n stat -c %a /var/lib/nightguard")
    assert found.split() == ["700"], found
    readable = ssh_run(sandbox_bookworm, f"cat {store}")
    assert readable.returncode == 1  # the ssh user without sudo cannot read the store


def test_rotate_mounts_new_value_and_exposes_nothing(sandbox_bookworm, ssh_run, env):
    write_env(env, NEW_TOKEN)
    stop, seen = threading.Event(), []
    sampler = threading.Thread(target=sample_processes,
                               args=(ssh_run, sandbox_bookworm, stop, seen))
    sampler.start()
    try:
        done = inv(["secrets.rotate", "--name", "telegram_bot_token"], env)
    finally:
        stop.set()
        sampler.join()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert len(seen) >= 3  # the process list was really sampled while it ran
    assert any("nightguard-host" in sample for sample in seen)  # ...and saw the helper
    for value in (NEW_TOKEN, TOKEN, GEMINI):
        assert value not in output
        assert not any(value in sample for sample in seen)
        assert value not in host_search(ssh_run, sandbox_bookworm, value)
    mounted = ssh_run(sandbox_bookworm, f"sudo -n podman exec {CONTAINER} "
                                        "cat /run/secrets/telegram_bot_token").stdout
    assert mounted == NEW_TOKEN
    assert healthy_now(ssh_run, sandbox_bookworm)
    listed = inv(["secrets.list"], env)
    assert "telegram_bot_token" in listed.stdout and "matches .env" in listed.stdout
    assert NEW_TOKEN not in listed.stdout
    assert inv(["deploy"], env).stdout.count("no changes") == 1


def test_dry_run_and_errors_show_no_value(sandbox_bookworm, env):
    write_env(env, "tg-dry-run-only-0042")
    done = inv(["secrets.rotate", "--dry-run"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "would: secret_put" in done.stdout
    assert "tg-dry-run-only-0042" not in done.stdout + done.stderr
    bad = inv(["secrets.rotate", "--name", "nope"], env)
    assert bad.returncode == 2 and "unknown secret 'nope'" in bad.stderr
    write_env(env, NEW_TOKEN)


def mounted_token(ssh_run, target) -> str:
    return ssh_run(target, f"sudo -n podman exec {CONTAINER} "
                           "cat /run/secrets/telegram_bot_token").stdout


def kept_copies(ssh_run, target) -> list[str]:
    names = checked(ssh_run, target, "sudo -n podman secret ls --format '{{.Name}}'").split()
    return sorted(n for n in names if "__" in n)


def test_rotation_cut_half_way_is_repaired_by_the_next_deploy(sandbox_bookworm, ssh_run, env):
    write_env(env, CUT_TOKEN)
    proc = start_inv(["secrets.rotate", "--name", "telegram_bot_token"], env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.strip().startswith("- secrets:"):
            break  # the new value exists, the old one is kept: cut here
    kill_group(proc)
    assert any(line.strip().startswith("- secrets:") for line in seen), "".join(seen)
    assert mounted_token(ssh_run, sandbox_bookworm) != CUT_TOKEN  # really cut half-way
    last = audit(ssh_run, sandbox_bookworm)[-1]
    assert last["command"] == "secrets.rotate" and last["outcome"] == "interrupted", last
    done = inv(["deploy"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert mounted_token(ssh_run, sandbox_bookworm) == CUT_TOKEN
    again = inv(["secrets.rotate"], env)
    assert "already has these values" in again.stdout, again.stdout + again.stderr


def test_rotate_to_a_value_that_breaks_the_agent_puts_the_old_one_back(
        sandbox_bookworm, ssh_run, env):
    before = mounted_token(ssh_run, sandbox_bookworm)
    write_env(env, BAD_TOKEN)
    broken = dict(env, NIGHTGUARD_HEALTH_DEADLINE="60")
    done = inv(["secrets.rotate", "--name", "telegram_bot_token"], broken)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "old values back, healthy" in output
    assert BAD_TOKEN not in output
    assert mounted_token(ssh_run, sandbox_bookworm) == before
    assert healthy_now(ssh_run, sandbox_bookworm)
    assert audit(ssh_run, sandbox_bookworm)[-1]["outcome"] == "rolled-back"
    # every kept value belongs to a kept release: the bad one (never healthy) is gone
    state = json.loads(checked(ssh_run, sandbox_bookworm,
                               "sudo -n cat /var/lib/nightguard/state.json"))
    referenced = {f"telegram_bot_token__{h['secrets']['telegram_bot_token'][:12]}"
                  for h in state["history"]}
    copies = kept_copies(ssh_run, sandbox_bookworm)
    assert copies and set(copies) <= referenced, (copies, referenced)
    write_env(env, before)


def test_secrets_check_and_no_env_on_host(sandbox_bookworm, ssh_run, env):
    assert inv(["secrets.check"], env).returncode == 0
    data = inspect(ssh_run, sandbox_bookworm)
    assert all(e.split("=", 1)[0] not in ("TELEGRAM_BOT_TOKEN", "GEMINI_API_KEY")
               for e in data["Config"]["Env"])
    assert ssh_run(sandbox_bookworm, "test -e /home/ubuntu/97layerOS/.env").returncode == 1


# -- values from a password manager's command and from Secret Manager (no .env) -------------
STORE_TOKEN = "tg-from-a-command-3e9d1c"
STORE_GEMINI = "gem-from-secret-manager-77ab21"
STORE_GEMINI_2 = "gem-rotated-in-the-store-5c0f"


def sample_laptop(stop: threading.Event, seen: list[str]):
    while not stop.is_set():
        seen.append(subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                   text=True).stdout)
        time.sleep(0.2)


def mounted(ssh_run, target, name) -> str:
    return checked(ssh_run, target, f"sudo -n podman exec {CONTAINER} cat /run/secrets/{name}")


def test_values_from_a_command_and_secret_manager_deploy_rotate_and_never_show(
        sandbox_bookworm, ssh_run, env, tmp_path):
    fake = FakeSecretManager().start()
    try:
        fake.add("ng-e2e", "gemini-key", STORE_GEMINI)
        vault = tmp_path / "vault"
        vault.mkdir()
        (vault / "night-guard-telegram").write_text(STORE_TOKEN + "\n")
        manager = tmp_path / "pm.py"  # a password manager's CLI: `pm.py ITEM` prints it
        manager.write_text("import sys, pathlib\n"
                           f"print(pathlib.Path({str(vault)!r}, sys.argv[1]).read_text()"
                           ".strip())\n")
        secrets = {"telegram_bot_token": {"command": [sys.executable, str(manager),
                                                      "night-guard-telegram"]},
                   "gemini_api_key": {"gcp": "projects/ng-e2e/secrets/gemini-key"}}
        stored = dict(env, NIGHTGUARD_SECRETS=json.dumps(secrets),
                      NIGHTGUARD_GCP_SECRETS_ENDPOINT=fake.endpoint,
                      NIGHTGUARD_ENV_FILE=str(tmp_path / "no.env"),
                      NIGHTGUARD_FINGERPRINTS_FILE=str(tmp_path / "prints.json"),
                      # an agent that writes its token to its log, as careless code does
                      NIGHTGUARD_AGENT_COMMAND="sh -c 'echo \"agent: token "
                      "$(cat /run/secrets/telegram_bot_token) ready\"; "
                      "exec python3 /app/execution/system/night_guard.py'")
        stop, laptop, host = threading.Event(), [], []
        samplers = [threading.Thread(target=sample_laptop, args=(stop, laptop)),
                    threading.Thread(target=sample_processes,
                                     args=(ssh_run, sandbox_bookworm, stop, host))]
        for sampler in samplers:
            sampler.start()
        try:
            deployed = inv(["deploy"], stored)
            fake.add("ng-e2e", "gemini-key", STORE_GEMINI_2)  # rotated in the store
            rotated = inv(["secrets.rotate"], stored)
        finally:
            stop.set()
            for sampler in samplers:
                sampler.join()
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        assert "rotated gemini_api_key" in rotated.stdout
        assert mounted(ssh_run, sandbox_bookworm, "telegram_bot_token") == STORE_TOKEN
        assert mounted(ssh_run, sandbox_bookworm, "gemini_api_key") == STORE_GEMINI_2
        assert healthy_now(ssh_run, sandbox_bookworm)
        assert fake.accessed == 2  # one read per task, none of it from a file
        assert not (tmp_path / "no.env").exists()
        # the agent did write the token to its log; inv logs reads no store, yet masks it
        raw_log = podman_logs(ssh_run, sandbox_bookworm)
        assert f"agent: token {STORE_TOKEN} ready" in raw_log  # precondition
        logs = inv(["logs", "--tail", "50"], stored)
        assert logs.returncode == 0, logs.stderr
        assert "agent: token [REDACTED] ready" in logs.stdout
        config = inv(["config"], stored)
        assert "secret gemini_api_key <- Google Secret Manager projects/ng-e2e/secrets/" \
               "gemini-key/versions/latest: [REDACTED]" in config.stdout
        listed = inv(["secrets.list"], stored)
        assert "matches its command" in listed.stdout and "matches Secret Manager" in \
            listed.stdout
        outputs = "".join(d.stdout + d.stderr for d in (deployed, rotated, logs, config,
                                                        listed))
        assert len(laptop) >= 10 and len(host) >= 3  # both process lists really sampled
        assert any("nightguard-host" in sample for sample in host)
        for value in (STORE_TOKEN, STORE_GEMINI, STORE_GEMINI_2):
            assert value not in outputs
            assert not any(value in sample for sample in laptop + host)
            assert value not in (tmp_path / "prints.json").read_text()
        for value in (STORE_GEMINI, STORE_GEMINI_2):  # the token is in the agent's own log
            assert value not in host_search(ssh_run, sandbox_bookworm, value)
        assert STORE_TOKEN not in checked(ssh_run, sandbox_bookworm,
                                          f"sudo -n podman inspect {CONTAINER}")
        bad_inputs_change_nothing(ssh_run, sandbox_bookworm, stored, secrets, fake)
    finally:
        fake.stop()
    done = inv(["deploy"], env)  # back to the module's .env values for whatever follows
    assert done.returncode == 0, done.stdout + done.stderr


def bad_inputs_change_nothing(ssh_run, target, stored, secrets, fake):
    """Each bad source: one line, exit 2, no session on the host, the agent untouched."""
    started = checked(ssh_run, target, f"sudo -n podman inspect -f '{{{{.State.StartedAt}}}}' "
                                       f"{CONTAINER}")
    entries = len(audit(ssh_run, target))
    gone = FakeSecretManager().start()
    unreachable = gone.endpoint
    gone.stop()
    fake.deny.add("denied")
    gem = secrets["gemini_api_key"]
    cases = [
        ({"gemini_api_key": {"keychain": "gemini"}}, {}, "unknown source kind 'keychain'"),
        ({"gemini_api_key": {"command": "false"}}, {}, "command `false` failed (exit 1)"),
        ({"gemini_api_key": {"command": "true"}}, {}, "command `true` printed no value"),
        ({"gemini_api_key": {"gcp": "projects/ng-e2e/secrets/absent"}}, {},
         "not found in Google Secret Manager"),
        ({"gemini_api_key": {"gcp": "projects/ng-e2e/secrets/denied"}}, {},
         "permission denied reading"),
        ({"gemini_api_key": gem}, {"NIGHTGUARD_GCP_SECRETS_ENDPOINT": unreachable},
         "cannot reach Google Secret Manager"),
    ]
    for change, extra, reason in cases:
        case = dict(stored, NIGHTGUARD_SECRETS=json.dumps({**secrets, **change}), **extra)
        for task in (["deploy"], ["secrets.rotate"]):
            done = inv(task, case)
            last = done.stderr.strip().splitlines()[-1]
            assert done.returncode == 2 and reason in last, (task, done.stdout, done.stderr)
            assert last.startswith("error: ") and "Traceback" not in done.stderr
    assert len(audit(ssh_run, target)) == entries  # not even a session was opened
    assert checked(ssh_run, target, f"sudo -n podman inspect -f '{{{{.State.StartedAt}}}}' "
                                    f"{CONTAINER}") == started
    assert healthy_now(ssh_run, target)
