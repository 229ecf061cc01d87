"""From a brand-new VM to a healthy agent, and the host's own lifecycle, on a fresh Debian 12
sandbox this file may break: Podman is purged first (as on Google's Ubuntu image, which has
none), then the user's journey runs through the Google Cloud path - `inv vm.create` against
a local fake of the Compute API (the real google-cloud-compute client), whose VM's address
is this sandbox - and one `inv deploy` installs what is missing (the guest reaches
Debian's packages through the sandbox's network) and brings the agent up. Then: a reboot
brings it back before anyone logs in, and a stopped and started sandbox keeps its disk.
"""

from __future__ import annotations

import os
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


@pytest.fixture(scope="module")
def bare(fresh_sandbox_module, ssh_run):
    target = fresh_sandbox_module("bookworm", name=NAME)
    purge = ssh_run(target, "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q "
                            "podman >/dev/null && command -v podman", timeout=900)
    assert purge.returncode == 1, purge.stdout + purge.stderr  # podman is gone
    return target


@pytest.fixture(scope="module")
def gcp_env(bare, tmp_path_factory):
    base = tmp_path_factory.mktemp("bare")
    fake = FakeGce().start()
    fake.nat_ip = "127.0.0.1"
    host_key = open(bare["known_hosts"]).read().split()[1:3]
    fake.guest_attributes["nightguard"] = {"hostkeys": {host_key[0]: host_key[1]}}
    copy_source(base / "src")
    env = {
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
    yield fake, env, base
    fake.stop()


def test_vm_create_then_one_deploy_provisions_a_bare_host(bare, gcp_env, ssh_run):
    fake, env, base = gcp_env
    created = inv(["vm.create"], env)
    assert created.returncode == 0, output(created)
    [insert] = fake.sent("POST", "/instances")
    assert insert.body["machineType"].endswith("/machineTypes/e2-micro")
    items = {i["key"]: i["value"] for i in insert.body["metadata"]["items"]}
    assert "podman" in items["startup-script"]  # offered, but not run here: deploy must cope
    started = time.monotonic()
    deployed = inv(["deploy"], env, timeout=1800)
    seconds = time.monotonic() - started
    text = output(deployed)
    assert deployed.returncode == 0, text
    assert "pinned host key of [127.0.0.1]" in text
    assert "plan: host: install podman" in text
    assert "plan: host: set up the 2g swapfile" in text
    figure("cold deploy from a bare host (Podman installed)", seconds)
    (base / "bare-cold-seconds").write_text(f"{seconds:.1f}\n")
    version = checked(ssh_run, bare, "podman --version").split()[-1]
    assert tuple(int(x) for x in version.split(".")[:2]) >= (4, 3)
    data = inspect(ssh_run, bare)
    assert data["State"]["Running"] and healthy_now(ssh_run, bare)
    host = data["HostConfig"]
    assert (host["Memory"], host["MemorySwap"]) == (700 * MiB, 2700 * MiB)
    mounted = checked(ssh_run, bare, f"sudo -n podman exec {CONTAINER} sh -c "
                                     "'test -s /run/secrets/telegram_bot_token && echo ok'")
    assert mounted.strip() == "ok"
    again = inv(["deploy"], env)
    assert again.returncode == 0 and "no changes" in again.stdout, output(again)
    assert audit(ssh_run, bare)[-1]["outcome"] == "no changes"


ROOTLESS = "ng-rootless"


def test_a_rootless_deploy_has_its_limits_secrets_and_linger(bare, gcp_env, ssh_run):
    fake, env, base = gcp_env
    compose = (base / "src/deployment/podman-compose.nightguard.yml").read_text()
    compose = compose.replace("97layer-nightguard", ROOTLESS).replace(
        "/home/ubuntu/97layerOS", f"/home/ubuntu/{ROOTLESS}")
    (base / "rootless-compose.yml").write_text(compose)
    rootless = dict(env, NIGHTGUARD_ROOTLESS="true", NIGHTGUARD_CONTAINER_NAME=ROOTLESS,
                    NIGHTGUARD_APP_DIR=f"/home/ubuntu/{ROOTLESS}",
                    NIGHTGUARD_DATA_DIR=f"/home/ubuntu/{ROOTLESS}-data",
                    NIGHTGUARD_COMPOSE_FILE=str(base / "rootless-compose.yml"))
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
    manager = journal_time(ssh_run, bare, "_SYSTEMD_UNIT=user@1000.service")
    assert manager is not None and manager < login, (manager, login)
    assert wait_until(lambda: journal_time(ssh_run, bare, "_UID=1000 -g 'night_guard: "
                                                          "running'"), timeout=300, interval=5)


def test_a_stopped_and_started_sandbox_keeps_its_disk(bare, ssh_run):
    checked(ssh_run, bare, "echo kept | sudo -n tee /var/lib/ng-marker >/dev/null")
    sb.down(NAME)
    assert sb.status(NAME) == "down"
    with pytest.raises(RuntimeError, match="not up"):
        sb.target(NAME)
    again = sb.ensure_up(NAME, timeout=900)
    assert checked(ssh_run, again, "cat /var/lib/ng-marker") == "kept\n"
