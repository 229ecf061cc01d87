"""A deploy cut at every step boundary tells the truth, and the next one repairs the host.

On the shared Debian 12 sandbox, a deploy that changes code, the image and one secret is
interrupted after the lock, after the sync, after the secrets, during the image build,
after the unit is written, and during the health gate - by SIGINT to `inv` (Ctrl-C) or by
cutting its SSH connection from the host's side, the two kinds alternating (both end the
host helper's input, the one path the host side has; the unit tier sends both at more
points). After each:
  * the host really was left half-way (a dry run still plans work);
  * the audit line says "interrupted" (written by the host side itself);
  * the agent that was running still runs, or is back within one restart;
  * the next `inv deploy` completes, a third says "no changes", and `inv secrets.list`
    says every secret matches .env.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.e2e.deploy_helpers import (
    STATE,
    audit,
    checked,
    copy_source,
    healthy_now,
    inv,
    inv_env,
    kill_group,
    make_env_file,
    output,
    start_inv,
    wait_until,
)

# (name, the stdout line the deploy must have printed, seconds to wait after it, how)
BOUNDARIES = [
    ("after the lock", "  - facts", 0, "cut"),
    ("after the sync", "  - sync", 0, "sigint"),
    ("after the secrets", "  - secrets", 0, "cut"),
    ("during the image build", "  - secrets", 3, "sigint"),
    ("after the unit", "  - unit", 0, "cut"),
    ("during the health gate", "  - container", 0, "sigint"),
]
# Cuts the deploy's SSH connection on the host: the sshd process above the helper.
CUT = r"""
pid=$(sudo -n sed -n 's/.*"pid": \([0-9]*\).*/\1/p' /var/lib/nightguard/lock.json)
while [ -n "$pid" ] && [ "$pid" != 1 ]; do
  case "$(cat /proc/$pid/comm)" in sshd*) sudo -n kill -9 "$pid"; echo "cut $pid"; exit 0;; esac
  pid=$(awk '{print $4}' /proc/$pid/stat)
done
exit 1
"""


@pytest.fixture(scope="module")
def env(sandbox_bookworm, tmp_path_factory):
    base = tmp_path_factory.mktemp("interrupts")
    copy_source(base / "src")
    # an agent that takes a few seconds to beat: the health gate lasts long enough for a
    # cut to land inside it, not after the release was recorded
    env = inv_env(sandbox_bookworm, make_env_file(base), base / "src",
                  NIGHTGUARD_AGENT_COMMAND="sh -c 'sleep 8; exec python3 "
                                           "/app/execution/system/night_guard.py'")
    done = inv(["deploy"], env)
    assert done.returncode == 0, output(done)
    return env


def change_everything(env, round_no: int) -> str:
    """A code change, an image change (requirements comment) and a new token."""
    source = env["NIGHTGUARD_SOURCE_DIR"]
    with open(f"{source}/knowledge/README.md", "a") as handle:
        handle.write(f"round {round_no} {time.time()}\n")
    with open(f"{source}/deployment/requirements-agent.txt", "a") as handle:
        handle.write(f"# round {round_no}\n")
    token = f"tg-round-{round_no}-{int(time.time())}"
    text = open(env["NIGHTGUARD_ENV_FILE"]).read().splitlines()
    text = [f"TELEGRAM_BOT_TOKEN={token}" if line.startswith("TELEGRAM_BOT_TOKEN=") else line
            for line in text]
    with open(env["NIGHTGUARD_ENV_FILE"], "w") as handle:
        handle.write("\n".join(text) + "\n")
    return token


def interrupt(proc, marker: str, delay: float, how: str, ssh_run, target) -> list[str]:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(marker):
            break
    else:
        pytest.fail(f"the deploy ended before {marker!r}:\n{''.join(seen)}")
    time.sleep(delay)
    if how == "sigint":
        proc.send_signal(signal.SIGINT)
    else:
        assert checked(ssh_run, target, CUT).startswith("cut ")
    rest, _ = proc.communicate(timeout=300)
    return seen + [rest]


@pytest.mark.parametrize(("where", "marker", "delay", "how"), BOUNDARIES,
                         ids=[f"{b[0]}-{b[3]}".replace(" ", "-") for b in BOUNDARIES])
def test_an_interrupted_deploy_is_recorded_and_repaired(sandbox_bookworm, env, ssh_run,
                                                        where, marker, delay, how):
    target = sandbox_bookworm
    lines_before = len(audit(ssh_run, target))
    change_everything(env, len(audit(ssh_run, target)))
    proc = start_inv(["deploy"], env)
    try:
        said = "".join(interrupt(proc, marker, delay, how, ssh_run, target))
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode != 0, said
    if how == "sigint":
        assert "interrupted" in said and proc.returncode == 130, said
    # the host side records the end itself once the helper process is gone
    assert wait_until(lambda: ssh_run(target, f"sudo -n test -e {STATE}/lock.json")
                      .returncode == 1, timeout=120, interval=1)
    lines = audit(ssh_run, target)
    assert len(lines) == lines_before + 1, lines[lines_before:]
    assert lines[-1]["outcome"] == "interrupted", lines[-1]
    assert "verified" not in lines[-1]
    # the host really was left half-way
    planned = inv(["deploy", "--dry-run"], env)
    assert planned.returncode == 0 and "no changes" not in planned.stdout, output(planned)
    # the agent runs (the old one, or the new one after one restart)
    assert wait_until(lambda: healthy_now(ssh_run, target), timeout=120, interval=3), \
        f"the agent is not healthy after an interruption {where}"
    done = inv(["deploy"], env)
    assert done.returncode == 0, output(done)
    assert "no changes" in inv(["deploy"], env).stdout
    listed = inv(["secrets.list"], env)
    assert listed.stdout.count("matches .env") == 2, listed.stdout
