"""The tasks' orchestration (tasks.deploy.pipeline.run_deploy, secrets.rotate) against the
real host helper on a fake host (tests/unit/hostfake): a copy of the project tree, a .env,
and a LocalRemote whose one pipe is the helper process instead of an SSH channel (the
fixtures `project`, `host` and `deploy`: conftest.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
from pathlib import Path

import pytest
from invoke import Context
from invoke.exceptions import Exit

from tasks.deploy import apply
from tasks.deploy import deploy as deploy_tasks
from tasks.deploy import health as health_tasks
from tasks.deploy import history as history_tasks
from tasks.deploy import secrets as secrets_tasks
from tasks.deploy.pipeline import HostUnfit
from tasks.deploy.session import LockHeld
from tasks.errors import StepFailed
from tasks.ssh.hostlink import HostStepFailed
from tests.unit.hostfake import UNIT, FakeHost
from tests.unit.hostfake.deployer import GEMINI, TOKEN, Deployer, write_env

ROOT = Path(__file__).resolve().parents[2]
AGENT = "execution/system/health_check.py"  # a file of the synced tree
BASE = "localhost/nightguard-base:latest"


def mirror(host: FakeHost):
    """A package mirror the host can reach: a listening socket on 127.0.0.1."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    (host.paths["apt_sources"] / "sources.list").write_text(
        f"deb http://127.0.0.1:{server.getsockname()[1]}/debian bookworm main\n")
    return server


# -- a new VM's first minutes: its startup script holds apt ----------------------------------------
def test_a_deploy_waits_for_the_startup_script_and_installs_nothing_it_installed(deploy, host):
    from tests.unit.test_host_helper import STARTUP_UNIT, apt_busy

    host.remove_tool("crun")
    with mirror(host), apt_busy(host, 4, installs=["crun"]) as holder:
        result = deploy()
    out = deploy.last.text
    assert result["changed"] and f"deployed {result['version']}" in out
    assert f"host.apt: waiting for apt-get (pid {holder.pid}, the VM's startup script) (up " \
        "to 15m)" in out
    assert re.search(rf"host: waited \d+s for apt's locks, held by apt-get \(pid {holder.pid},"
                     r" the VM's startup script\)", out), out
    assert "plan: host: install" not in out  # the facts were read again after the wait
    assert host.calls("apt-get") == []
    assert host.audit()[-1]["outcome"] == "ok"
    assert STARTUP_UNIT not in out or "startup script" in out


def test_a_holder_s_command_line_is_shown_redacted(deploy, host):
    from tests.unit.test_host_helper import apt_busy

    host.remove_tool("crun")
    line = f"apt-get\0-o\0Acquire::http::Proxy=http://u:{TOKEN}@proxy\0update\0".encode()
    with mirror(host), apt_busy(host, 3, cmdline=line) as holder:
        deploy()
    out = deploy.last.text
    assert "host: waited" in out and f"pid {holder.pid}" in out  # the holder was shown
    assert TOKEN not in out
    host.remove_tool("crun")
    with mirror(host), apt_busy(host, 60, cmdline=line), pytest.raises(StepFailed) as failed:
        deploy(deploy.settings(**{"host.apt_wait": "1s"}))
    assert "Acquire::http::Proxy=http://u:[REDACTED]@proxy" in str(failed.value)  # the whole
    assert TOKEN not in str(failed.value) + deploy.last.text  # command line, redacted


def test_apt_busy_past_the_bound_fails_in_one_line_before_any_change(deploy, host):
    from tests.unit.test_host_helper import apt_busy

    host.remove_tool("crun")
    with mirror(host), apt_busy(host, 60) as holder, pytest.raises(StepFailed) as failed:
        deploy(deploy.settings(**{"host.apt_wait": "2s"}))
    line = str(failed.value)
    assert "\n" not in line and line.startswith("step 'wait for apt' failed: apt is still busy "
                                                 f"after 2s: pid {holder.pid}")
    assert "systemctl status google-startup-scripts.service" in line
    audit = host.audit()
    assert [a["outcome"] for a in audit] == [f"failed: {line}"]
    assert audit[0]["steps"] == ["wait for apt (failed)"]  # nothing else: no swap, no sync
    assert not host.paths["swapfile"].exists() and host.calls("apt-get") == []


# -- a cold host, then nothing to do ------------------------------------------------------------
def test_a_cold_deploy_installs_sets_up_and_records_the_release(deploy, host):
    host.remove_tool("podman")
    host.remove_tool("crun")
    with mirror(host):
        result = deploy()
    version = result["version"]
    assert result == {"changed": True, "version": version}
    out = deploy.last.text
    for line in ("plan: host: install podman, crun (apt-get)",
                 "plan: host: set up the 16m swapfile (fstab, swappiness)",
                 "plan: secrets: create or update telegram_bot_token, gemini_api_key",
                 "plan: image: build", "plan: unit: write the systemd unit and enable it",
                 "plan: container: (re)start and wait until healthy", f"deployed {version}"):
        assert line in out
    assert TOKEN not in out and GEMINI not in out
    audit = host.audit()
    assert len(audit) == 1
    assert (audit[0]["outcome"], audit[0]["command"], audit[0]["version"]) == \
        ("ok", "deploy", version)
    assert audit[0]["steps"] == ["swap", "provision", "sync", "secret telegram_bot_token",
                                 "secret gemini_api_key", "base image", "image", "markers",
                                 "unit", "restart", "health"]
    assert [
        "import", "/var/lib/nightguard-sandbox/base.tar", "localhost/nightguard-base:latest"] \
        in host.calls("podman")  # the sandbox's preloaded base, for a storage without it
    state = host.state()
    assert state["verified"] == version
    assert [r["version"] for r in state["history"]] == [version]
    assert set(state["history"][0]["secrets"]) == {"telegram_bot_token", "gemini_api_key"}
    container = host.container()
    assert container["env"]["NG_RELEASE_VERSION"] == version
    assert container["secrets"] == {"telegram_bot_token": TOKEN, "gemini_api_key": GEMINI}
    assert (host.app_dir / AGENT).read_bytes() == (deploy.project / AGENT).read_bytes()
    assert (host.paths["state"] / "releases" / f"{version}.tar.gz").exists()
    assert deploy.last.ops[0] == "facts" and deploy.last.ops[-1] == "finish"
    assert deploy.last.stats.connections == 1 and deploy.last.stats.commands == 1


def test_a_second_deploy_with_nothing_changed_is_one_facts_call(deploy, host):
    first = deploy()
    calls = len(host.calls())
    second = deploy()
    assert second == {"changed": False, "version": first["version"]}
    assert deploy.last.ops == ["facts", "finish"]
    assert deploy.last.stats.steps == 1
    assert host.calls()[calls:] == []  # no podman, no systemctl: Podman's files told all
    assert f"no changes: the fake host runs {first['version']}" in deploy.last.text
    assert [a["outcome"] for a in host.audit()] == ["ok", "no changes"]


def test_a_one_file_change_syncs_that_file_and_restarts_the_agent_in_place(deploy, host):
    first = deploy()
    builds = [c for c in host.calls("podman") if c[0] == "build"]
    created = host.container()["id"]
    (deploy.project / AGENT).write_text("print('changed')\n")
    calls = len(host.calls())
    second = deploy()
    assert second["changed"] and second["version"] != first["version"]
    assert "plan: sync: 1 file(s) to send, 0 to remove" in deploy.last.text
    assert "why: code changed" in deploy.last.text
    assert deploy.last.ops == ["facts", "sync", "write_file", "reload", "gate",
                               "finish"]  # no new container, no unit, no systemctl
    assert not [c for c in host.calls()[calls:] if c[0] in ("run", "restart")]
    assert host.container()["id"] == created  # the same container
    assert [c for c in host.calls("podman") if c[0] == "build"] == builds  # no rebuild
    assert (host.app_dir / AGENT).read_text() == "print('changed')\n"
    reload = json.loads((host.paths["state"] / "reload.json").read_text())
    assert reload["markers"]["NG_RELEASE_VERSION"] == second["version"]
    assert [r["version"] for r in host.state()["history"]] == [second["version"],
                                                               first["version"]]
    third = deploy()
    assert third == {"changed": False, "version": second["version"]}  # it knows the reload


def test_a_code_change_is_gated_by_the_new_agents_first_beat_unless_it_touches_the_check(
        deploy, host):
    deploy()
    checks = len([c for c in host.calls("podman") if c[0] == "healthcheck"])
    agent = deploy.project / "execution/system/night_guard.py"
    agent.write_text(agent.read_text() + "# changed\n")
    deploy()
    assert "healthy: the restarted agent's first heartbeat (the code changed, not the " \
           "check)" in deploy.last.text
    assert len([c for c in host.calls("podman") if c[0] == "healthcheck"]) == checks
    (deploy.project / AGENT).write_text("print('the check changed')\n")  # health_check.py
    deploy()
    assert "first heartbeat" not in deploy.last.text
    assert len([c for c in host.calls("podman") if c[0] == "healthcheck"]) == checks + 1


def test_a_unit_written_but_never_read_by_systemd_is_finished_by_the_next_deploy(deploy,
                                                                                 host):
    """A run killed between writing a new unit and its daemon-reload: the file says the new
    text, systemd still runs the old one. The next deploy sees it (the writer's mark), not
    "no changes": it reloads and restarts the agent under the unit it was meant to have."""
    first = deploy()
    unit = host.paths["unit"]
    wanted = unit.read_text()
    older = wanted + "# an older definition\n"
    systemd = Path(host.standin_config["systemd_state"])
    with host.helper() as helper:
        helper.call("install_unit", text=older)  # in force: systemd read it
        host.fail("daemon-reload")  # the cut: written, never read
        with pytest.raises(HostStepFailed, match="daemon-reload failed"):
            helper.call("install_unit", text=wanted)
        assert helper.call("facts")["systemd_reload_owed"] == ["unit"]
    assert unit.read_text() == wanted
    loaded = json.loads(systemd.read_text())["loaded"]
    assert loaded.get(UNIT, older) == older  # systemd has not read the new text
    reloads = json.loads(systemd.read_text())["reloads"]
    again = deploy()
    assert again["changed"] and again["version"] == first["version"]
    assert "install_unit" in deploy.last.ops and host.audit()[-1]["outcome"] == "ok"
    state = json.loads(systemd.read_text())
    assert state["reloads"] == reloads + 1 and state["loaded"][UNIT] == wanted
    with host.helper(mode="read") as reader:
        assert reader.call("facts")["systemd_reload_owed"] == []
    assert deploy() == {"changed": False, "version": first["version"]}


def test_a_deleted_file_is_removed_from_the_host(deploy, host):
    deploy()
    (deploy.project / AGENT).unlink()
    deploy()
    assert "plan: sync: 0 file(s) to send, 1 to remove" in deploy.last.text
    assert not (host.app_dir / AGENT).exists()


def test_a_link_planted_in_the_app_dir_is_replaced_by_the_synced_file(deploy, host, tmp_path):
    deploy()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0\n")
    (host.app_dir / AGENT).unlink()
    (host.app_dir / AGENT).symlink_to(outside / "passwd")
    deploy()
    assert "plan: sync: remove 1 symbolic link(s) from the app dir" in deploy.last.text
    assert not (host.app_dir / AGENT).is_symlink()
    assert (host.app_dir / AGENT).read_bytes() == (deploy.project / AGENT).read_bytes()
    assert (outside / "passwd").read_text() == "root:x:0:0\n"


# -- failures --------------------------------------------------------------------------------------
def test_a_failed_gate_rolls_back_to_the_previous_release_secrets_included(deploy, host):
    first = deploy()
    write_env(deploy.project, gemini="gem-bad-0000000000")
    (deploy.project / AGENT).write_text("print('broken')\n")
    host.control("health", {"fail_if_secret": {"gemini_api_key": "gem-bad-0000000000"},
                            "output": "Gemini said 400", "kill": True})
    with pytest.raises(StepFailed) as failed:
        deploy()
    assert str(failed.value).endswith(f"rolled back to {first['version']}, which is healthy "
                                      "again")
    out = deploy.last.text
    assert "health check (exit 1): Gemini said 400" in out
    assert "gem-bad-0000000000" not in out and "gem-bad" not in str(failed.value)
    last = host.audit()[-1]
    assert last["outcome"] == "rolled-back" and "rolled back" in last["error"]
    assert "restore code" in last["steps"] and "restore secrets" in last["steps"]
    assert host.secret_values()["gemini_api_key"] == GEMINI
    assert host.container()["secrets"]["gemini_api_key"] == GEMINI
    assert host.container()["env"]["NG_RELEASE_VERSION"] == first["version"]
    assert (host.app_dir / AGENT).read_bytes() == (ROOT / AGENT).read_bytes()
    assert host.state()["verified"] == first["version"]
    assert [r["version"] for r in host.state()["history"]] == [first["version"]]
    # once .env and the code are as before, the host has nothing to do
    write_env(deploy.project)
    shutil.copy2(ROOT / AGENT, deploy.project / AGENT)
    assert deploy() == {"changed": False, "version": first["version"]}


def test_a_token_telegram_rejects_fails_the_gate_though_the_agent_stays_up(deploy, host):
    first = deploy()
    write_env(deploy.project, token="tg-revoked-000000")
    host.control("beat", {"if_secret": {"telegram_bot_token": "tg-revoked-000000"},
                          "text": '{"token":"rejected"}\n'})
    with pytest.raises(StepFailed) as failed:
        deploy()
    assert "Telegram rejected the bot token (the agent stopped polling)" in deploy.last.text
    assert str(failed.value).endswith(f"rolled back to {first['version']}, which is healthy "
                                      "again")
    assert "tg-revoked" not in deploy.last.text + str(failed.value)
    assert host.secret_values()["telegram_bot_token"] == TOKEN
    assert host.audit()[-1]["outcome"] == "rolled-back"


def test_a_failed_first_deploy_has_nothing_to_roll_back_to(deploy, host):
    host.control("health", {"fail": True, "kill": True})
    with pytest.raises(StepFailed, match="no earlier release to roll back to"):
        deploy()
    last = host.audit()[-1]
    assert last["outcome"] == "failed"
    assert host.state() == {}


def test_ctrl_c_in_the_middle_leaves_an_interrupted_line_and_the_next_run_completes(deploy,
                                                                                   host):
    host.control("build", {"lines": 40, "sleep": 0.05})

    def ctrl_c(line):
        if line.startswith("STEP 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        deploy(on_progress=ctrl_c)
    assert "! interrupted: the host finishes its current step" in deploy.last.text
    last = host.audit()[-1]
    assert last["outcome"] == "interrupted" and last["during"] == "image"
    assert last["steps"][-1] == "image (failed)" and "sync" in last["steps"]
    assert host.image_names() == [BASE]  # the build was stopped: no image of ours
    with host.helper() as helper:  # the lock went with the process
        assert helper.hello["lock"]["acquired"]
    host.control("build", {"lines": 2})
    result = deploy()
    assert result["changed"] and host.audit()[-1]["outcome"] == "ok"
    assert host.container()["env"]["NG_RELEASE_VERSION"] == result["version"]


def test_a_deploy_while_another_holds_the_lock_is_refused_and_records_nothing(deploy, host):
    with host.helper(who="bo@desk", command="secrets.rotate"):
        with pytest.raises(LockHeld, match=r"bo@desk \(secrets.rotate\) since"):
            deploy()
    assert deploy.last.ops == []
    assert [(a["who"], a["outcome"]) for a in host.audit()] == [("bo@desk", "interrupted")]


def test_a_host_with_too_old_a_podman_is_refused_before_any_change(deploy, host):
    host.configure(version="4.2.0")
    with pytest.raises(HostUnfit, match="Podman 4.2.0 is older than the minimum 4.3"):
        deploy()
    assert deploy.last.ops == ["facts", "finish"]
    assert host.audit() == [] and host.container() is None


def test_a_dry_run_says_what_it_would_do_and_changes_nothing(deploy, host):
    result = deploy(dry_run=True)
    assert result == {"changed": False, "dry_run": True}
    out = deploy.last.text
    assert "would: sync" in out and "would: podman build" in out
    assert "would: systemctl restart container-97layer-nightguard.service" in out
    assert deploy.last.ops == ["facts"]
    assert host.audit() == [] and not host.app_dir.exists()
    assert "lock" not in deploy.last.sent_args[0] and deploy.last.sent_args[0]["mode"] == "read"


def test_a_fresh_debian_13_host_gets_the_network_its_podman_uses(make_fake_host, project):
    host = make_fake_host(podman="5.4.2")
    host.configure(swap_names={str(host.paths["swapfile"]): "/swapfile"})
    host.paths["os_release"].write_text('ID=debian\nVERSION_ID="13"\nVERSION_CODENAME=trixie\n')
    for tool in ("podman", "slirp4netns", "pasta"):
        host.remove_tool(tool)
    deploy = Deployer(project, host)
    with mirror(host):
        result = deploy()
    assert "plan: host: install podman, slirp4netns (apt-get)" in deploy.last.text
    assert "--network slirp4netns" in host.paths["unit"].read_text()  # rootful
    assert host.audit()[-1]["outcome"] == "ok"
    assert deploy() == {"changed": False, "version": result["version"]}  # Podman 5 now


def test_a_rollback_that_is_not_healthy_either_is_a_failure(deploy, host):
    first = deploy()
    (deploy.project / AGENT).write_text("print('v2')\n")
    host.control("health", {"fail": True, "kill": True})
    with pytest.raises(StepFailed, match=f"rolled back to {first['version']}, but it is not "
                                         "healthy either"):
        deploy()
    assert host.audit()[-1]["outcome"] == "failed"
    assert host.container()["env"]["NG_RELEASE_VERSION"] == first["version"]


@pytest.mark.parametrize("v1", [False, True], ids=["cgroup2", "cgroup1"])
def test_limits_not_in_force_fail_the_gate(deploy, host, v1):
    host.control("cgroup_v1", v1)
    host.control("cgroup", {"memory.memsw.limit_in_bytes" if v1 else "memory.swap.max": "0"})
    wanted = "memory.memsw.limit_in_bytes is 0 (want 2831155200)" if v1 else \
        "memory.swap.max is 0 (want 2097152000)"
    with pytest.raises(StepFailed, match=re.escape(f"limits not in force: cgroup {wanted}; "
                                                   "no earlier release to roll back to")):
        deploy()
    assert host.audit()[-1]["outcome"] == "failed"


def test_a_real_sigint_anywhere_stops_the_task_and_the_host_records_it(deploy, host):
    """SIGINT, not an exception raised by the test: whatever the main thread is doing when
    it lands (Python may swallow a KeyboardInterrupt raised in a garbage-collector callback),
    the host side is told at once and the task stops at its next step."""
    host.control("build", {"lines": 200, "sleep": 0.05})
    signals = []

    def on_progress(line):
        if line.startswith("STEP 3/") and not signals:
            signals.append(line)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        deploy(on_progress=on_progress)
    assert signals, "the build never reached its third step"
    last = host.audit()[-1]
    assert (last["outcome"], last["during"]) == ("interrupted", "image")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_ctrl_c_during_the_gate_then_the_next_run_only_checks_health(deploy, host,
                                                                     monkeypatch):
    real = apply.wait_healthy

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(apply, "wait_healthy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        deploy()
    last = host.audit()[-1]
    assert last["outcome"] == "interrupted" and last["steps"][-1] == "restart"
    assert host.state() == {}  # the release was never recorded
    monkeypatch.setattr(apply, "wait_healthy", real)
    result = deploy()
    assert "health: the last deploy did not finish its health gate; check it" in \
        deploy.last.text
    assert deploy.last.ops == ["facts", "gate", "finish"]
    assert host.state()["verified"] == result["version"]


def test_a_plain_text_env_in_the_app_dir_is_removed(deploy, host):
    deploy()
    (host.app_dir / ".env").write_text(f"GEMINI_API_KEY={GEMINI}\n")
    deploy()
    assert "plan: host: remove the plain-text .env from the app dir" in deploy.last.text
    assert not (host.app_dir / ".env").exists()


def test_images_and_code_of_releases_no_longer_kept_are_dropped(deploy, host):
    settings = deploy.settings(keep_images=1)
    first = deploy(settings)
    first_image = [n for n in host.image_names() if n != BASE]
    requirements = deploy.project / "deployment" / "requirements-agent.txt"
    requirements.write_text(requirements.read_text() + "# a new image\n")
    second = deploy(settings)
    ours = [n for n in host.image_names() if n != BASE]
    assert ours != first_image and len(ours) == 1
    assert ["rmi", "--ignore", *first_image] in host.calls("podman")
    assert sorted(p.name for p in (host.paths["state"] / "releases").iterdir()) == \
        [f"{second['version']}.tar.gz"]
    assert [r["version"] for r in host.state()["history"]] == [second["version"]]
    assert first["version"] != second["version"]


# -- the tasks themselves -----------------------------------------------------------------------
@pytest.fixture
def tasks_on_fake_host(deploy, host, monkeypatch):
    """`inv deploy` / `inv unlock` / `inv secrets.*` reach the fake host."""
    compose = deploy.project / "deployment" / "podman-compose.nightguard.yml"
    compose.write_text(compose.read_text()
                       .replace("/home/ubuntu/97layerOS-data:", f"{host.data_dir}:")
                       .replace("/home/ubuntu/97layerOS:", f"{host.app_dir}:"))
    for module in (deploy_tasks, secrets_tasks, history_tasks, health_tasks):
        monkeypatch.setattr(module, "settings_for", lambda *a, **k: deploy.settings())
        monkeypatch.setattr(module, "open_remote",
                            lambda settings, **kwargs: deploy.remote(**kwargs))
    return deploy


def test_the_deploy_task_checks_locally_then_deploys(tasks_on_fake_host, host, capsys):
    deploy_tasks.deploy(Context())
    out = tasks_on_fake_host.last.text
    assert out.startswith("deploy to the fake host\n")
    assert "ssh connections: 1, remote commands: 1, steps: 12" in out
    assert host.audit()[-1]["outcome"] == "ok"


def test_the_unlock_task_names_the_holder_and_stops_it_with_force(tasks_on_fake_host, host,
                                                                  capsys):
    holder = host.helper(who="bo@desk", command="deploy")
    deploy_tasks.unlock(Context())
    assert f"the lock is held by bo@desk (deploy) since 2026-11-29T10:00:00Z, pid " \
           f"{holder.pid}; `inv unlock --force` stops it" in capsys.readouterr().out
    deploy_tasks.unlock(Context(), force=True)
    assert "stopped the deploy of bo@desk (deploy)" in capsys.readouterr().out
    assert holder.pipe.wait(10) is not None
    deploy_tasks.unlock(Context())
    assert capsys.readouterr().out == "no lock is held\n"
    assert host.audit()[-1]["outcome"] == "interrupted"


# -- secrets.rotate -----------------------------------------------------------------------------
@pytest.fixture
def rotate(deploy, host, monkeypatch):
    """`inv secrets.rotate` against the fake host."""
    monkeypatch.setattr(secrets_tasks, "settings_for", lambda *a, **k: deploy.settings())
    monkeypatch.setattr(secrets_tasks, "open_remote",
                        lambda settings, **kwargs: deploy.remote(**kwargs))
    return lambda **flags: secrets_tasks.rotate(Context(), **flags)


def test_rotate_replaces_a_value_with_one_restart_and_records_the_release(deploy, host,
                                                                         rotate, capsys):
    first = deploy()
    write_env(deploy.project, gemini="gem-new-1111111111")
    rotate(name=["gemini_api_key"])
    assert "secrets: rotated gemini_api_key; the container is healthy with them" in \
        capsys.readouterr().out
    last = host.audit()[-1]
    assert (last["command"], last["outcome"], last["secrets"]) == \
        ("secrets.rotate", "ok", ["gemini_api_key"])
    assert host.container()["secrets"]["gemini_api_key"] == "gem-new-1111111111"
    history = host.state()["history"]
    assert [r["version"] for r in history] == [last["version"], first["version"]]
    old_copy = f"gemini_api_key__{history[1]['secrets']['gemini_api_key'][:12]}"
    assert host.secret_values()[old_copy] == GEMINI  # kept for a rollback
    assert deploy() == {"changed": False, "version": last["version"]}


def test_a_rotation_that_fails_its_gate_puts_the_old_values_back(deploy, host, rotate):
    first = deploy()
    write_env(deploy.project, gemini="gem-bad-2222222222")
    host.control("health", {"fail_if_secret": {"gemini_api_key": "gem-bad-2222222222"},
                            "kill": True})
    with pytest.raises(Exit) as failed:
        rotate(name=["gemini_api_key"])
    assert failed.value.code == 1
    assert "old values back, healthy" in str(failed.value.message)
    last = host.audit()[-1]
    assert (last["command"], last["outcome"]) == ("secrets.rotate", "rolled-back")
    assert host.secret_values()["gemini_api_key"] == GEMINI
    assert host.container()["secrets"]["gemini_api_key"] == GEMINI
    assert host.container()["env"]["NG_RELEASE_VERSION"] == first["version"]
    assert host.state()["verified"] == first["version"]


def test_rotate_refuses_a_host_that_was_never_deployed(host, rotate):
    with pytest.raises(Exit, match="not deployed here yet"):
        rotate()
    assert not [argv for argv in host.calls("podman") if argv[:2] == ["secret", "create"]]
    assert host.audit()[-1]["outcome"].startswith("failed: step 'rotate' failed")


# -- history, rollback, health, the other secrets tasks ----------------------------------------
def test_history_lists_releases_newest_first_and_rollback_goes_back_whole(
        tasks_on_fake_host, host, capsys):
    deploy = tasks_on_fake_host
    first = deploy()
    (deploy.project / AGENT).write_text("print('second')\n")
    second = deploy()
    capsys.readouterr()
    history_tasks.history(Context(), json_=True)
    shown = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in shown["releases"]] == [second["version"], first["version"]]
    assert shown["verified"] == second["version"]
    assert "unit_text" not in shown["releases"][0]  # long texts stay on the host
    assert [a["command"] for a in shown["audit"]][:2] == ["deploy", "deploy"]
    history_tasks.history(Context())
    screen = capsys.readouterr().out
    assert screen.splitlines()[0] == "releases kept (newest first):"
    assert f" * {second['version']}" in screen
    history_tasks.rollback(Context())
    assert (host.app_dir / AGENT).read_text() != "print('second')\n"  # the code came back
    assert host.state()["verified"] == first["version"]
    assert host.audit()[-1]["command"] == "rollback" and host.audit()[-1]["outcome"] == "ok"
    history_tasks.rollback(Context(), to=second["version"][:5])
    assert (host.app_dir / AGENT).read_text() == "print('second')\n"
    with pytest.raises(Exit) as info:
        history_tasks.rollback(Context(), to="zzzz")
    assert "no such release" in str(info.value) and info.value.code == 2


def test_health_is_healthy_after_a_deploy_and_says_why_not_otherwise(tasks_on_fake_host, host,
                                                                    capsys):
    deploy = tasks_on_fake_host
    deploy()
    capsys.readouterr()
    health_tasks.health(Context(), json_=True)
    report = json.loads(capsys.readouterr().out)
    assert report["healthy"] and report["problems"] == []
    assert report["last_audit"]["outcome"] == "ok"
    host.control("health", {"fail": True})
    with host.helper() as helper:  # one failed check, as Podman's timer would run it
        helper.call("run", argv=["podman", "healthcheck", "run", "97layer-nightguard"],
                    check=False)
    with pytest.raises(Exit) as info:
        health_tasks.health(Context())
    assert info.value.code == health_tasks.EXIT_UNHEALTHY
    screen = capsys.readouterr().out
    assert screen.splitlines()[0] == "Night Guard: UNHEALTHY" and "! " in screen


def test_push_list_and_check_tell_the_truth_about_each_secret(tasks_on_fake_host, host,
                                                             capsys):
    deploy = tasks_on_fake_host
    deploy()
    capsys.readouterr()
    secrets_tasks.push(Context())
    assert "secrets: all up to date" in capsys.readouterr().out
    env_file = deploy.settings().path("env_file")
    env_file.write_text(env_file.read_text().replace(TOKEN, "tg-pushed-value-42"))
    secrets_tasks.push(Context())
    assert "pushed" in capsys.readouterr().out
    assert host.secret_values()["telegram_bot_token"] == "tg-pushed-value-42"
    secrets_tasks.list_(Context())
    listed = capsys.readouterr().out
    assert "telegram_bot_token" in listed and "not in the running container" in listed
    assert "tg-pushed-value-42" not in listed
    secrets_tasks.check(Context())
    assert "secrets: all 2 present" in capsys.readouterr().out
