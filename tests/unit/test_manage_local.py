"""`inv exec` and `inv remove` on the fake host (tests/unit/hostfake): the real host helper's
`exec`, `remove_plan` and `remove` ops against the stand-ins, then the tasks' orchestration
(tasks.deploy.manage) through a LocalRemote: deploy, remove, remove again, deploy again."""

from __future__ import annotations

import json
import os
import socket

import pytest
from invoke import Context
from invoke.exceptions import Exit

from tasks.deploy import commands as cmd
from tasks.deploy import manage
from tasks.errors import ConfigError
from tasks.hostside.bundle import watcher_source
from tasks.ssh.address import SshTarget
from tasks.ssh.hostlink import HostStepFailed
from tests.unit.hostfake import CONTAINER, IMAGE, UNIT
from tests.unit.test_host_helper import REF, SECRETS_V1, MiB, bring_up

SECRETS = list(SECRETS_V1)
HOSTNAME = socket.gethostname()


def install_watcher(helper) -> None:
    program, version = watcher_source()
    helper.call("watcher", step="alerts", action="install", config={"chat_id": "1"},
                service=cmd.watcher_service(), timer=cmd.watcher_timer(30),
                dropin=cmd.watcher_dropin(), version=version, data=program)


def remove(host, *, data=False, swap=False, who="ana@laptop") -> dict:
    """The two sessions of `inv remove`: a look, then the removal and its audit line."""
    with host.helper(mode="read") as look:
        plan = look.call("remove_plan", secrets=SECRETS, delete_data=data, swap=swap)
    if not plan["found"]:
        return {"plan": plan, "answer": None}
    with host.helper(who=who, command="remove") as helper:
        answer = helper.call("remove", secrets=SECRETS, delete_data=data, swap=swap)
        helper.call("finish", audit={"outcome": "ok"})
    return {"plan": plan, "answer": answer}


# -- the helper's ops ----------------------------------------------------------------------
def test_remove_takes_the_deployment_off_and_keeps_data_swap_audit_and_others(fake_host):
    host = fake_host
    with host.helper() as helper:
        bring_up(helper, host)
        # keeps tok-1111 as telegram_bot_token__<hash>
        helper.call("secret_put", name="telegram_bot_token", data=b"tok-2222")
        helper.call("secret_put", name="someone_elses", data=b"x")
        helper.call("swap", size=16 * MiB, swappiness=10)
        install_watcher(helper)
        helper.call("finish", audit={"outcome": "ok"})
    (host.data_dir / "memory.db").write_text("the agent's data")
    kept_copy, = [n for n in host.secret_values() if n.startswith("telegram_bot_token__")]
    done = remove(host)
    assert done["plan"]["found"] == [
        f"the systemd unit {UNIT} (stopped, disabled, its file)",
        f"the container {CONTAINER}",
        "the alert watcher (nightguard-watch.timer and .service)",
        f"1 image(s) {IMAGE}:*",
        f"3 Podman secret(s): gemini_api_key, telegram_bot_token, {kept_copy}",
        f"the app dir {host.app_dir} (the synced code)",
        f"the deploy state in {host.paths['state']} (releases, records; its audit.log stays)"]
    assert done["plan"]["kept"] == [
        f"the data dir {host.data_dir} (`inv remove --data` deletes it)",
        f"the swapfile {host.paths['swapfile']} (`inv remove --swap` removes it)"]
    assert done["plan"]["hostname"] == HOSTNAME
    assert done["answer"] == {"removed": done["plan"]["found"], "kept": done["plan"]["kept"]}
    systemctl = host.calls("systemctl")
    assert ["stop", UNIT] in systemctl and ["disable", "--quiet", UNIT] in systemctl
    assert not host.paths["unit"].exists() and not os.path.lexists(host.paths["unit_wants"])
    assert not host.paths["watch_timer"].exists() and not host.paths["watcher"].exists()
    assert not host.paths["watch_dropin"].exists()
    assert host.container() is None
    assert [n for n in host.image_names() if n.startswith(IMAGE + ":")] == []
    assert set(host.secret_values()) == {"someone_elses"}
    assert not host.app_dir.exists()
    assert (host.data_dir / "memory.db").read_text() == "the agent's data"
    assert host.paths["swapfile"].exists()
    assert sorted(os.listdir(host.paths["state"])) == ["audit.log", "lock"]
    assert [(a["command"], a["outcome"]) for a in host.audit()] == \
        [("deploy", "ok"), ("remove", "ok")]
    again = remove(host)
    assert again["answer"] is None and again["plan"]["found"] == []
    assert again["plan"]["kept"] == done["plan"]["kept"]


def test_a_removal_cut_half_way_is_finished_by_the_next(fake_host):
    host = fake_host
    with host.helper() as helper:
        bring_up(helper, host)
        helper.call("finish", audit={"outcome": "ok"})
    host.fail("secret-rm")
    with host.helper(command="remove") as helper:
        with pytest.raises(HostStepFailed, match=r"`podman secret rm \.\.\.` failed"):
            helper.call("remove", secrets=SECRETS)
    assert host.container() is None and not host.paths["unit"].exists()  # done before it
    assert set(host.secret_values()) == set(SECRETS) and host.app_dir.exists()
    assert host.audit()[-1]["outcome"] == "interrupted"
    assert host.audit()[-1]["steps"] == ["remove (failed)"]
    done = remove(host)
    assert done["plan"]["found"] == [
        "2 Podman secret(s): gemini_api_key, telegram_bot_token",
        f"the app dir {host.app_dir} (the synced code)",
        f"the deploy state in {host.paths['state']} (releases, records; its audit.log stays)"]
    assert host.secret_values() == {} and not host.app_dir.exists()
    assert remove(host)["plan"]["found"] == []


def test_remove_with_data_and_swap_never_follows_a_link_out_of_the_data_dir(fake_host,
                                                                             tmp_path):
    host = fake_host
    with host.helper() as helper:
        bring_up(helper, host)
        helper.call("swap", size=16 * MiB, swappiness=10)
        helper.call("finish", audit={"outcome": "ok"})
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    (host.data_dir / "sub").mkdir()
    (host.data_dir / "sub" / "link").symlink_to(outside)
    (host.data_dir / "notes.txt").write_text("data")
    assert str(host.paths["swapfile"]) in host.paths["proc_swaps"].read_text()
    done = remove(host, data=True, swap=True)
    assert done["plan"]["found"][-2:] == [
        f"the data dir {host.data_dir} (the agent's data)",
        f"the swapfile {host.paths['swapfile']} (swapoff, fstab, swappiness)"]
    assert done["plan"]["kept"] == []
    assert not host.data_dir.exists() and outside.read_text() == "not ours"
    assert ["swapoff", str(host.paths["swapfile"])] in [["swapoff", *c]
                                                         for c in host.calls("swapoff")]
    assert not host.paths["swapfile"].exists()
    assert str(host.paths["swapfile"]) not in host.paths["fstab"].read_text()
    assert "UUID=1234 / ext4 defaults 0 1" in host.paths["fstab"].read_text()
    assert str(host.paths["swapfile"]) not in host.paths["proc_swaps"].read_text()
    assert not host.paths["sysctl_conf"].exists()
    assert remove(host, data=True, swap=True)["plan"] == {"found": [], "kept": [],
                                                          "hostname": HOSTNAME}


def test_exec_runs_as_the_agent_user_or_root_and_passes_output_and_exit_code(fake_host):
    host = fake_host
    with host.helper() as helper:
        bring_up(helper, host)
        helper.call("finish", audit={"outcome": "ok"})
    host.control("exec", {"out": "out line\nno newline", "err": "err line\n", "code": 3})
    with host.helper(mode="read", command="exec") as helper:
        assert helper.call("exec", argv=["id", "-u"]) == {"exit": 0}
        assert helper.progress == ["o1000\n"]
        assert helper.call("exec", argv=["id", "-u"], root=True) == {"exit": 0}
        assert helper.progress[1:] == ["o0\n"]
        assert helper.call("exec", argv=["sh", "-c", "exit 3; $(reboot)"]) == {"exit": 3}
        assert [t for t in helper.progress[2:] if t[0] == "o"] == ["oout line\n", "ono newline"]
        assert [t for t in helper.progress[2:] if t[0] == "e"] == ["eerr line\n"]
    assert host.calls("podman")[-3:] == [
        ["exec", "--user", "1000:1000", CONTAINER, "id", "-u"],
        ["exec", "--user", "0:0", CONTAINER, "id", "-u"],
        ["exec", "--user", "1000:1000", CONTAINER, "sh", "-c", "exit 3; $(reboot)"]]
    assert len(host.audit()) == 1  # read-only: no lock, no audit line


def test_exec_without_the_container_fails_in_one_line(fake_host):
    with fake_host.helper(mode="read") as helper:
        with pytest.raises(HostStepFailed) as failed:
            helper.call("exec", argv=["id"])
    assert str(failed.value) == (f"step 'exec' failed: the container {CONTAINER} does not "
                                 "exist on this host (`inv deploy` creates it)")
    assert not [c for c in fake_host.calls("podman") if c[:1] == ["exec"]]


# -- the tasks -------------------------------------------------------------------------------
def test_deploy_remove_remove_again_then_deploy_again(deploy, host):
    first = deploy()
    settings = deploy.settings()
    answer = manage.run_remove(settings, deploy.remote())
    out = deploy.last.text.splitlines()
    assert out[:7] == [
        f"plan: remove the systemd unit {UNIT} (stopped, disabled, its file)",
        f"plan: remove the container {CONTAINER}",
        f"plan: remove 1 image(s) {IMAGE}:*",
        "plan: remove 2 Podman secret(s): gemini_api_key, telegram_bot_token",
        f"plan: remove the app dir {host.app_dir} (the synced code)",
        f"plan: remove the deploy state in {host.paths['state']} (releases, records; its "
        "audit.log stays)",
        f"plan: keep the data dir {host.data_dir} (`inv remove --data` deletes it)"]
    assert out[-3:] == [
        "removed from the fake host: 6 part(s); the audit log stays on the host "
        "(`inv history`)",
        f"kept: the data dir {host.data_dir} (`inv remove --data` deletes it)",
        f"kept: the swapfile {host.paths['swapfile']} (`inv remove --swap` removes it)"]
    assert deploy.last.ops == ["remove_plan", "remove", "finish"]
    assert deploy.last.stats.connections == 1 and deploy.last.stats.commands == 2
    assert len(answer["removed"]) == 6
    last = host.audit()[-1]
    assert (last["command"], last["outcome"], last["steps"]) == ("remove", "ok", ["remove"])
    assert host.container() is None and host.secret_values() == {}
    manage.run_remove(settings, deploy.remote())
    assert deploy.last.text.splitlines() == [
        "nothing to remove",
        f"kept: the data dir {host.data_dir} (`inv remove --data` deletes it)",
        out[-1]]
    assert deploy.last.ops == ["remove_plan"] and len(host.audit()) == 2
    again = deploy()  # a new secret key on the host: new digests, so a new version
    assert again["changed"] and f"deployed {again['version']}" in deploy.last.text
    assert host.container()["env"]["NG_RELEASE_VERSION"] == again["version"]
    assert host.state()["verified"] == again["version"] and first["version"]
    assert [(a["command"], a["outcome"]) for a in host.audit()] == \
        [("deploy", "ok"), ("remove", "ok"), ("deploy", "ok")]


def test_remove_data_needs_the_host_name_typed_or_yes(deploy, host):
    deploy()
    settings = deploy.settings()
    asked = []

    def wrong(prompt):
        asked.append(prompt)
        return "not-the-host"

    with pytest.raises(ConfigError) as refused:
        manage.run_remove(settings, deploy.remote(), data=True, ask=wrong)
    assert str(refused.value) == f"the host's name was not typed ({HOSTNAME}): nothing was " \
        "removed"
    assert asked == [f"--data deletes {host.data_dir} on {HOSTNAME} for good; type the "
                     f"host's name ({HOSTNAME}) to go on: "]
    with pytest.raises(ConfigError, match="add --yes; nothing was removed"):
        manage.run_remove(settings, deploy.remote(), data=True, ask=None)
    assert host.container() is not None and host.data_dir.exists()
    assert host.audit()[-1]["command"] == "deploy"
    manage.run_remove(settings, deploy.remote(), data=True, ask=lambda prompt: HOSTNAME)
    assert not host.data_dir.exists() and host.container() is None
    deploy()
    manage.run_remove(settings, deploy.remote(), data=True, yes=True)
    assert not host.data_dir.exists()


def test_a_dry_run_removes_nothing(deploy, host):
    deploy()
    manage.run_remove(deploy.settings(), deploy.remote(dry_run=True))
    assert deploy.last.text.splitlines()[-1] == "dry run: nothing was removed"
    assert host.container() is not None and deploy.last.ops == ["remove_plan"]


@pytest.fixture
def on_fake_host(deploy, host, monkeypatch):
    monkeypatch.setattr(manage, "settings_for", lambda *a, **k: deploy.settings())
    monkeypatch.setattr(manage, "open_remote", lambda settings, **kwargs: deploy.remote(**kwargs))
    return deploy


def test_the_exec_task_prints_the_output_and_exits_with_the_command_code(on_fake_host, host,
                                                                          capsys, monkeypatch):
    with pytest.raises(Exit) as failed:
        monkeypatch.setattr("sys.argv", ["inv", "exec", "--", "id", "-u"])
        manage.exec_(Context())
    assert failed.value.code == 1
    assert failed.value.message == (f"error: step 'exec' failed: the container {CONTAINER} "
                                    "does not exist on this host (`inv deploy` creates it)")
    on_fake_host()
    capsys.readouterr()
    manage.exec_(Context())
    assert capsys.readouterr() == ("1000\n", "")
    manage.exec_(Context(), root=True)
    assert capsys.readouterr().out == "0\n"
    host.control("exec", {"out": "partial", "err": "it broke\n", "code": 7})
    monkeypatch.setattr("sys.argv", ["inv", "exec", "--", "false"])
    with pytest.raises(Exit) as failed:
        manage.exec_(Context())
    assert failed.value.code == 7
    assert capsys.readouterr() == ("partial", "it broke\n")
    monkeypatch.setattr("sys.argv", ["inv", "exec"])
    with pytest.raises(Exit) as failed:
        manage.exec_(Context())
    assert failed.value.code == 2 and failed.value.message == (
        "error: nothing to run: name the command after `--`, e.g. `inv exec -- python3 -V`")


def test_exec_tty_prints_the_one_ssh_command(on_fake_host, monkeypatch, capsys, tmp_path):
    key = tmp_path / "id_ed25519"
    monkeypatch.setattr(manage, "resolve_target", lambda settings: SshTarget(
        "203.0.113.7", 2222, "ubuntu", key_filename=str(key)))
    monkeypatch.setattr("sys.argv", ["inv", "exec", "--tty"])
    manage.exec_(Context(), tty=True, root=True)
    assert capsys.readouterr().out.splitlines() == [
        "this tool's SSH channel has no terminal; for an interactive one run:",
        f"ssh -t -p 2222 -i {key} -o IdentitiesOnly=yes ubuntu@203.0.113.7 "
        f"'sudo podman exec -it --user 0:0 {CONTAINER} sh'"]
    monkeypatch.setattr("sys.argv", ["inv", "exec", "--tty", "--", "python3", "-c", "print(1)"])
    manage.exec_(Context(), tty=True)
    assert capsys.readouterr().out.splitlines()[1].endswith(
        f"'sudo podman exec -it --user 1000:1000 {CONTAINER} python3 -c '\"'\"'print(1)'\"'\"''")


def test_the_remove_task_says_nothing_to_remove_the_second_time(on_fake_host, host, capsys):
    on_fake_host()
    manage.remove(Context())
    assert host.audit()[-1]["command"] == "remove"
    manage.remove(Context())
    assert on_fake_host.last.text.splitlines()[0] == "nothing to remove"
    with pytest.raises(Exit) as refused:
        manage.remove(Context(), data=True)  # stdin is no terminal under pytest: no question
    assert refused.value.code == 2 and "add --yes" in refused.value.message
    manage.remove(Context(), data=True, yes=True)
    assert not host.data_dir.exists()
    assert json.loads(json.dumps(host.audit()[-1]["removed"])) == [
        f"the data dir {host.data_dir} (the agent's data)"]


def test_remainder_is_the_argv_after_the_double_dash():
    assert manage.remainder(["inv", "exec", "--root", "--", "ls", "-l", "a b"]) == \
        ["ls", "-l", "a b"]
    assert manage.remainder(["inv", "exec"]) == []
    assert REF.startswith(IMAGE)
