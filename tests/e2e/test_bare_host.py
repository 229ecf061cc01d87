"""From a brand-new VM to a healthy agent, and the host's own lifecycle, on a sandbox that
boots like a new Compute Engine VM (the bookworm-cloud flavour): Debian 12 without Podman,
apt-daily and unattended-upgrades on, and stand-ins of Google's guest software asking a
local fake of the Compute API (the real google-cloud-compute client talks to it; it is also
the VM's metadata server). The user's journey: `inv vm.create`, then `inv deploy` at once,
while the VM's first minutes happen - the startup script that `vm.create` sent installs
Podman, and the guest agent's stand-in makes the login user only half a minute after the VM
came to exist. Then what a VM's first hour brings: a lock held past the bound, a lock held
for 90 s, unattended-upgrades really upgrading during a deploy. Then: a rootless deploy, a
reboot brings the agents back before anyone logs in, and a stopped and started sandbox
keeps its disk.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from tasks.sandbox import machine as sb
from tests.e2e.deploy_helpers import (
    CONTAINER,
    audit,
    checked,
    copy_source,
    figure,
    healthy_now,
    inspect,
    inv,
    journal_time,
    make_env_file,
    output,
    reboot_and_check_back,
    wait_until,
)
from tests.fake_gce import FakeGce

MiB = 1024 * 1024
NAME = "e2e-bare"
FLAVOUR = "bookworm-cloud"
# who holds apt's locks now: "pid unit" lines (the probe runs as root, reads F_GETLK)
LOCK_PROBE = ("sudo -n python3 -c 'import fcntl, os, struct\n"
              "for p in (\"/var/lib/dpkg/lock-frontend\", \"/var/lib/dpkg/lock\",\n"
              "          \"/var/lib/apt/lists/lock\", \"/var/cache/apt/archives/lock\"):\n"
              "    try:\n"
              "        fd = os.open(p, os.O_RDONLY)\n"
              "    except FileNotFoundError:\n"
              "        print(0, p)\n"
              "        continue\n"
              "    t, _, _, _, pid = struct.unpack(\"hhqqi4x\", fcntl.fcntl(fd, fcntl.F_GETLK,\n"
              "        struct.pack(\"hhqqi4x\", fcntl.F_WRLCK, 0, 0, 0, 0)))\n"
              "    print(pid if t != fcntl.F_UNLCK else 0, p)'")


@pytest.fixture(scope="module")
def gcp_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("bare")
    fake = FakeGce().start()
    fake.nat_ip = "127.0.0.1"
    yield fake, base
    fake.stop()


@pytest.fixture(scope="module")
def bare(fresh_sandbox_module, gcp_env, ssh_run):
    fake, _ = gcp_env
    target = fresh_sandbox_module(FLAVOUR, name=NAME, metadata=fake.endpoint)
    return target


@pytest.fixture(scope="module")
def env(bare, gcp_env):
    fake, base = gcp_env
    copy_source(base / "src")
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("NIGHTGUARD_")},
        "NIGHTGUARD_TARGET": "gcp",
        "NIGHTGUARD_GCP_PROJECT": fake.project,
        "NIGHTGUARD_GCP_API_ENDPOINT": fake.endpoint,
        "NIGHTGUARD_GCP_INSTANCE": "nightguard",
        "NIGHTGUARD_SSH_PORT": str(bare["port"]),
        "NIGHTGUARD_SSH_KEY_FILENAME": bare["key_filename"],
        "NIGHTGUARD_SSH_KNOWN_HOSTS": str(base / "known_hosts"),
        "NIGHTGUARD_ENV_FILE": str(make_env_file(base)),
        "NIGHTGUARD_SOURCE_DIR": str(base / "src"),
        # the sandbox cannot pull python:3.x-slim from a registry; it preloads this base
        "NIGHTGUARD_BASE_IMAGE": "localhost/nightguard-base:latest",
        "NIGHTGUARD_BASE_IMAGE_ARCHIVE": "/var/lib/nightguard-sandbox/base.tar",
        "PYTHONUNBUFFERED": "1",
    }


def memory(ssh_run, target) -> dict:
    """The lab probe's peaks since boot (ng-memwatch: memory and swap in use, OOM kills)."""
    return json.loads(checked(ssh_run, target, "cat /run/ng-memwatch.json"))


def lock_holders(ssh_run, target) -> dict[str, int]:
    lines = checked(ssh_run, target, LOCK_PROBE).split("\n")
    found = {path: int(pid) for pid, path in (line.split() for line in lines if line.strip())}
    assert len(found) == 4, found  # every lock file was probed
    return found


def hold_lock(ssh_run, target, seconds: int, unit: str = "ng-lock-holder") -> int:
    """A process holding dpkg's frontend lock (a transient unit); returns its pid."""
    checked(ssh_run, target, f"sudo -n systemd-run --unit={unit} --collect python3 -c "
                             "'import fcntl, os, time; fd = os.open(\"/var/lib/dpkg/lock-frontend"
                             "\", os.O_RDWR); fcntl.lockf(fd, fcntl.LOCK_EX); "
                             f"time.sleep({seconds})' >/dev/null 2>&1")
    assert wait_until(lambda: lock_holders(ssh_run, target)["/var/lib/dpkg/lock-frontend"],
                      timeout=60, interval=1)
    return lock_holders(ssh_run, target)["/var/lib/dpkg/lock-frontend"]


def remove_slirp4netns(ssh_run, target) -> None:
    """Something the deploy must install again (a recommends of Podman's: removed alone)."""
    checked(ssh_run, target, "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get remove -y -q "
                             "slirp4netns >/dev/null 2>&1; command -v slirp4netns", expect=1)


def test_vm_create_then_deploy_at_once_waits_for_the_login_and_the_startup_script(
        bare, gcp_env, env, ssh_run):
    fake, base = gcp_env
    created = inv(["vm.create"], env)
    assert created.returncode == 0, output(created)
    born = time.monotonic()
    [insert] = fake.sent("POST", "/instances")
    assert insert.body["machineType"].endswith("/machineTypes/e2-micro")
    assert "/debian-cloud/global/images/debian-12" in \
        insert.body["disks"][0]["initializeParams"]["sourceImage"]
    items = {i["key"]: i["value"] for i in insert.body["metadata"]["items"]}
    assert "podman" in items["startup-script"]
    refused = ssh_run(bare, "true")
    assert refused.returncode == 255 and "Permission denied" in refused.stderr  # no user yet
    deployed = inv(["deploy"], env, timeout=1800)
    seconds = time.monotonic() - born
    text = output(deployed)
    assert deployed.returncode == 0, text
    print(text)  # the first minutes as the user saw them
    assert "waiting for the VM's guest agent" in text
    waited = re.search(r"host: waited (\d+)s for apt's locks, held by apt-get \(pid \d+, the "
                       r"VM's startup script\)", text)
    assert waited, text
    assert "plan: host: set up the 2g swapfile" in text
    startup = checked(ssh_run, bare, "sudo -n journalctl -b -u google-startup-scripts "
                                     "--no-pager -o cat")
    assert "startup-script exit status 0" in startup  # it ran to its end, untouched
    figure("first deploy right after vm.create: waited for apt", float(waited.group(1)))
    figure("vm.create -> healthy agent (guest agent, startup script, deploy)", seconds)
    version = checked(ssh_run, bare, "podman --version").split()[-1]
    assert tuple(int(x) for x in version.split(".")[:2]) >= (4, 3)
    data = inspect(ssh_run, bare)
    assert data["State"]["Running"] and healthy_now(ssh_run, bare)
    host = data["HostConfig"]
    assert (host["Memory"], host["MemorySwap"]) == (700 * MiB, 2700 * MiB)
    mounted = checked(ssh_run, bare, f"sudo -n podman exec {CONTAINER} sh -c "
                                     "'test -s /run/secrets/telegram_bot_token && echo ok'")
    assert mounted.strip() == "ok"
    pinned = (base / "known_hosts").read_text()
    assert open(bare["known_hosts"]).read().split()[2] in pinned  # the VM's own key
    peaks = memory(ssh_run, bare)
    assert peaks["samples"] > 60 and peaks["oom_kills"] == 0, peaks
    figure("first boot race: peak memory in use", peaks["mem_used_peak"] / MiB, "MiB")
    figure("first boot race: peak swap in use", peaks["swap_used_peak"] / MiB, "MiB")
    again = inv(["deploy"], env)
    assert again.returncode == 0 and "no changes" in again.stdout, output(again)
    assert audit(ssh_run, bare)[-1]["outcome"] == "no changes"


def test_apt_held_past_the_bound_is_one_line_and_the_agent_keeps_running(bare, env, ssh_run):
    before = inspect(ssh_run, bare)
    remove_slirp4netns(ssh_run, bare)
    holder = hold_lock(ssh_run, bare, 600)
    try:
        done = inv(["deploy"], dict(env, NIGHTGUARD_HOST_APT_WAIT="20s"))
        assert done.returncode != 0, output(done)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output(done)
        assert errors[0].startswith(f"error: step 'wait for apt' failed: apt is still busy "
                                    f"after 20s: pid {holder} (/usr/bin/python3 -c ")
        assert "[ng-lock-holder.service]" in errors[0]
        assert "`systemctl status ng-lock-holder.service`" in errors[0]
        after = inspect(ssh_run, bare)
        assert (after["Id"], after["State"]["StartedAt"]) == \
            (before["Id"], before["State"]["StartedAt"])
        assert after["State"]["Running"] and healthy_now(ssh_run, bare)
        checked(ssh_run, bare, "command -v slirp4netns", expect=1)  # nothing was changed
        assert audit(ssh_run, bare)[-1]["outcome"].startswith("failed: step 'wait for apt'")
        assert lock_holders(ssh_run, bare)["/var/lib/dpkg/lock-frontend"] == holder  # alive
    finally:
        checked(ssh_run, bare, "sudo -n systemctl stop ng-lock-holder.service")


def test_a_lock_held_for_90_seconds_is_waited_for_and_named(bare, env, ssh_run):
    before = inspect(ssh_run, bare)
    holder = hold_lock(ssh_run, bare, 90)
    started = time.monotonic()
    done = inv(["deploy"], env, timeout=1800)
    text = output(done)
    assert done.returncode == 0, text
    assert f"host.apt: waiting for python3 (pid {holder}, ng-lock-holder.service)" in text
    waited = re.search(rf"host: waited (\d+)s for apt's locks, held by python3 \(pid {holder}",
                       text)
    assert waited and int(waited.group(1)) >= 60, text
    assert "plan: host: install slirp4netns" in text
    figure("deploy with dpkg's lock held 90 s: total", time.monotonic() - started)
    checked(ssh_run, bare, "command -v slirp4netns")
    after = inspect(ssh_run, bare)
    assert after["Id"] == before["Id"] and healthy_now(ssh_run, bare)


def test_a_deploy_while_unattended_upgrades_really_upgrades(bare, env, ssh_run):
    remove_slirp4netns(ssh_run, bare)
    checked(ssh_run, bare, "echo 60 | sudo -n tee /etc/ng-drill-seconds >/dev/null && "
                           "sudo -n systemctl start --no-block apt-daily-upgrade.service")
    # unattended-upgrade takes dpkg's locks once it has computed what to upgrade
    assert wait_until(lambda: any(lock_holders(ssh_run, bare).values()), timeout=300,
                      interval=2), "unattended-upgrades never took apt's locks"
    done = inv(["deploy"], env, timeout=1800)
    text = output(done)
    assert done.returncode == 0, text
    assert re.search(r"host: waited \d+s for apt's locks, held by [^\n]*unattended-upgrades",
                     text), text
    upgraded = checked(ssh_run, bare, "dpkg-query -W -f='${Version}' ng-drill-upgrade")
    assert upgraded == "2"  # it really installed the security upgrade
    checked(ssh_run, bare, "command -v slirp4netns")
    assert healthy_now(ssh_run, bare)
    assert memory(ssh_run, bare)["oom_kills"] == 0


ROOTLESS = "ng-rootless"


def test_a_rootless_deploy_has_its_limits_secrets_and_linger(bare, gcp_env, env, ssh_run):
    _, base = gcp_env
    compose = (base / "src/deployment/podman-compose.nightguard.yml").read_text()
    compose = compose.replace("97layer-nightguard", ROOTLESS).replace(
        "/home/ubuntu/97layerOS", f"/home/ubuntu/{ROOTLESS}")
    (base / "rootless-compose.yml").write_text(compose)
    rootless = dict(env, NIGHTGUARD_ROOTLESS="true", NIGHTGUARD_CONTAINER_NAME=ROOTLESS,
                    NIGHTGUARD_APP_DIR=f"/home/ubuntu/{ROOTLESS}",
                    NIGHTGUARD_DATA_DIR=f"/home/ubuntu/{ROOTLESS}-data",
                    NIGHTGUARD_COMPOSE_FILE=str(base / "rootless-compose.yml"))
    # rootless installs nothing: the VM's startup script brought no uidmap, and the deploy
    # says the one command to run, before changing anything
    refused = inv(["deploy"], rootless)
    assert refused.returncode == 1, output(refused)
    assert refused.stderr.strip() == ("error: step 'host' failed: uidmap missing: rootless "
                                      "mode installs no packages; run `sudo apt-get install "
                                      "uidmap` on the host once")
    checked(ssh_run, bare, "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                           "uidmap >/dev/null 2>&1")
    done = inv(["deploy"], rootless, timeout=1800)
    assert done.returncode == 0, output(done)
    limits = checked(ssh_run, bare, f"podman exec {ROOTLESS} cat /sys/fs/cgroup/memory.max "
                                    "/sys/fs/cgroup/memory.swap.max").split()
    assert limits == [str(700 * MiB), str(2000 * MiB)]  # cgroup v2 delegation works
    mounted = checked(ssh_run, bare, f"podman exec {ROOTLESS} sh -c "
                                     "'test -s /run/secrets/telegram_bot_token && echo ok'")
    assert mounted.strip() == "ok"
    checked(ssh_run, bare, "test -e /var/lib/systemd/linger/ubuntu")
    enabled = checked(ssh_run, bare, f"systemctl --user is-enabled container-{ROOTLESS}.service")
    assert enabled.strip() == "enabled"
    store = checked(ssh_run, bare, "ls ~/.local/share/containers/storage/secrets")
    assert "secrets.json" in store  # the user's own store, not root's
    again = inv(["deploy"], rootless)
    assert again.returncode == 0 and "no changes" in again.stdout, output(again)


def test_a_reboot_brings_the_agent_back_before_anyone_logs_in(bare, ssh_run):
    login = reboot_and_check_back(ssh_run, bare)
    # the rootless agent too: systemd lingers for its user, so the user's manager (which
    # starts the agent's user unit) was started at boot, before the first login, not by it
    uid = checked(ssh_run, bare, "id -u").strip()
    manager = journal_time(ssh_run, bare, f"_SYSTEMD_UNIT=user@{uid}.service")
    assert manager is not None and manager < login, (manager, login)
    assert wait_until(lambda: journal_time(ssh_run, bare, f"_UID={uid} -g 'night_guard: "
                                                          "running'"), timeout=300, interval=5)


def test_a_stopped_and_started_sandbox_keeps_its_disk(bare, ssh_run):
    checked(ssh_run, bare, "echo kept | sudo -n tee /var/lib/ng-marker >/dev/null")
    sb.down(NAME)
    assert sb.status(NAME) == "down"
    with pytest.raises(RuntimeError, match="not up"):
        sb.target(NAME)
    again = sb.ensure_up(NAME, os_flavour=FLAVOUR, timeout=900)
    assert wait_until(lambda: ssh_run(again, "cat /var/lib/ng-marker").stdout == "kept\n",
                      timeout=120, interval=3)


def test_remove_takes_the_deployment_off_and_keeps_the_data_dir(bare, env, ssh_run):
    target = sb.ensure_up(NAME, os_flavour=FLAVOUR, timeout=900)  # the last test restarted it
    env = dict(env, NIGHTGUARD_SSH_PORT=str(target["port"]))
    unit = f"container-{CONTAINER}.service"
    data_dir = "/home/ubuntu/97layerOS-data"
    checked(ssh_run, target, f"sudo -n podman container exists {CONTAINER}")
    checked(ssh_run, target, f"sudo -n test -d {data_dir}")
    entries = len(audit(ssh_run, target))
    done = inv(["remove"], env, timeout=900)
    assert done.returncode == 0, output(done)
    assert f"plan: keep the data dir {data_dir} (`inv remove --data` deletes it)" in \
        done.stdout.splitlines()
    checked(ssh_run, target, f"test -e /etc/systemd/system/{unit}", expect=1)
    checked(ssh_run, target, f"test -e /etc/systemd/system/multi-user.target.wants/{unit}",
            expect=1)
    assert checked(ssh_run, target, f"systemctl is-active {unit}", expect=3).strip() == \
        "inactive"
    checked(ssh_run, target, f"sudo -n podman container exists {CONTAINER}", expect=1)
    images = checked(ssh_run, target, "sudo -n podman images --format '{{.Repository}}'")
    assert "localhost/nightguard" not in images.split()
    secrets = checked(ssh_run, target, "sudo -n podman secret ls --format '{{.Name}}'")
    assert [n for n in secrets.split()
            if n.split("__")[0] in ("telegram_bot_token", "gemini_api_key")] == []
    checked(ssh_run, target, "test -e /home/ubuntu/97layerOS", expect=1)
    checked(ssh_run, target, "test -e /etc/systemd/system/nightguard-watch.timer", expect=1)
    checked(ssh_run, target, f"sudo -n test -d {data_dir}")  # kept
    assert checked(ssh_run, target, "sudo -n ls /var/lib/nightguard").split() == \
        ["audit.log", "lock"]
    lines = audit(ssh_run, target)
    assert len(lines) == entries + 1
    assert (lines[-1]["command"], lines[-1]["outcome"]) == ("remove", "ok")
    checked(ssh_run, target, "sudo -n swapon --show=NAME --noheadings | grep -qx /swapfile")
    again = inv(["remove"], env)
    assert again.returncode == 0, output(again)
    assert "nothing to remove" in again.stdout.splitlines()
    assert len(audit(ssh_run, target)) == entries + 1
    gone = inv(["remove", "--data", "--yes"], env)
    assert gone.returncode == 0, output(gone)
    checked(ssh_run, target, f"sudo -n test -e {data_dir}", expect=1)
    last = inv(["remove"], env)
    assert last.returncode == 0 and "nothing to remove" in last.stdout.splitlines(), \
        output(last)
