"""The real host helper (tasks/hostside, as one bundle), op by op, on a fake host: a temp
folder for its state, the app dir and Podman's storage, and stand-ins for podman,
systemctl, apt-get, dpkg and the swap tools (tests/unit/hostfake). Each test starts its own
helper processes through hostlink's LocalPipe, as HostSession does over SSH."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import marshal
import os
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from tasks.deploy import commands as cmd
from tasks.deploy.plan import secret_digest
from tasks.errors import StepFailed
from tasks.hostside.bundle import helper_program
from tasks.ssh.hostlink import HostStepFailed, helper_source
from tests.unit import hostfake
from tests.unit.hostfake import (
    CONTAINER,
    IMAGE,
    UNIT,
    FakeHost,
    Isolation,
    check_isolated,
    check_path,
)

TAG = "0123456789ab"
REF = f"{IMAGE}:{TAG}"
MiB = 1024 * 1024


# -- small tools ---------------------------------------------------------------------------
def tarball(files: dict[str, tuple[bytes, int]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for rel, (data, mode) in files.items():
            info = tarfile.TarInfo(rel)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sync(helper, files: dict[str, tuple[bytes, int]], *, delete=(), links=(),
         all_files=None) -> dict:
    return helper.call("sync", data=tarball(files) if files else None, files=sorted(files),
                       delete=list(delete), links=list(links),
                       all_files=sorted(all_files if all_files is not None else files))


def tree(root: Path) -> dict[str, tuple]:
    """rel -> ("file", bytes, mode) / ("link", target) / ("dir", mode), links not followed."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            full = Path(folder) / name
            rel = str(full.relative_to(root))
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                found[rel] = ("file", full.read_bytes(), stat.S_IMODE(st.st_mode))
    return found


def files_of(root: Path) -> dict[str, tuple[bytes, int]]:
    return {rel: (entry[1], entry[2]) for rel, entry in tree(root).items()
            if entry[0] == "file"}


def unit_text(host: FakeHost, image: str = REF) -> str:
    spec = cmd.ContainerSpec(
        name=CONTAINER, image=image, app_dir=str(host.app_dir), data_dir=str(host.data_dir),
        markers_file=f"{cmd.STATE_DIR}/{CONTAINER}.release.env", memory="700m",
        memory_reservation="500m", memory_swap="2700m", cpus=1.0, network="slirp4netns",
        secrets=("telegram_bot_token", "gemini_api_key"),
        health_cmd="python3 /app/execution/system/health_check.py", health_interval="30s",
        health_timeout="10s", health_retries=3, health_start_period="60s")
    return cmd.systemd_unit(spec)


CODE_V1 = {"deployment/Dockerfile.nightguard": (b"FROM python\n", 0o644),
           "execution/agent.py": (b"print('v1')\n", 0o644),
           "execution/run.sh": (b"#!/bin/sh\n", 0o755)}
SECRETS_V1 = {"telegram_bot_token": "tok-1111", "gemini_api_key": "gem-1111"}


def bring_up(helper, host: FakeHost, secrets=None, version: str = "v1") -> dict:
    """What a deploy does, op by op: secrets, code, image, dirs, markers, unit, restart."""
    facts = helper.call("facts")
    for name, value in (secrets or SECRETS_V1).items():
        helper.call("secret_put", step=f"secret {name}", name=name, data=value.encode())
    sync(helper, CODE_V1)
    context = f"{host.app_dir}/deployment"
    helper.call("run", step="image", argv=cmd.image_build(
        REF, f"{context}/Dockerfile.nightguard", context, "python", False))
    helper.call("dirs", record=False)
    helper.call("write_file", step="markers", key="markers",
                text=f"NG_RELEASE_VERSION={version}\nNG_RELEASE_CODE=c-{version}\n")
    helper.call("install_unit", step="unit", text=unit_text(host))
    helper.call("run", step="restart", argv=cmd.systemctl("restart", UNIT),
                on_interrupt="finish")
    return facts


def wait_for(predicate, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


# -- the fixture's own guard --------------------------------------------------------------
def test_isolation_check_refuses_a_real_path_or_a_host_path(fake_host):
    with pytest.raises(Isolation, match="not the stand-in dir"):
        check_path(fake_host, f"/usr/bin:{fake_host.bin}")
    with pytest.raises(Isolation, match="outside the test's folder"):
        check_path(fake_host, f"{fake_host.bin}:/usr/sbin")
    fake_host.paths["swappiness"] = Path("/proc/sys/vm/swappiness")
    with pytest.raises(Isolation, match="swappiness"):
        check_isolated(fake_host)


# -- the lock -------------------------------------------------------------------------------
def test_a_second_changing_session_is_told_who_holds_the_lock(fake_host):
    with fake_host.helper(who="ana@laptop", command="deploy") as first:
        assert first.hello["lock"] == {"acquired": True}
        with fake_host.helper(who="bo@desk", command="secrets.rotate") as second:
            held = second.hello["lock"]
            assert second.pipe.wait(10) == 0  # told, then gone: it never ran an op
        assert held["acquired"] is False
        assert held["held_by"] == {"who": "ana@laptop", "command": "deploy",
                                   "since": "2026-11-29T10:00:00Z", "pid": first.pid,
                                   "alive": True}
        with fake_host.helper(mode="read") as reader:  # reading needs no lock
            assert "lock" not in reader.hello
            assert reader.call("health")["lock"]["who"] == "ana@laptop"


def test_a_holder_killed_with_sigkill_frees_the_lock_at_once(fake_host):
    first = fake_host.helper(who="ana@laptop")
    first.call("dirs")
    first.pipe.proc.kill()
    first.pipe.proc.wait()
    assert (fake_host.paths["state"] / "lock.json").exists()  # stale: names a dead holder
    assert not (fake_host.paths["state"] / "audit.log").exists()  # SIGKILL: no last word
    with fake_host.helper(who="bo@desk") as second:
        assert second.hello["lock"] == {"acquired": True}
    assert [(a["who"], a["outcome"]) for a in fake_host.audit()] == \
        [("bo@desk", "interrupted")]


def test_unlock_force_stops_the_holder_which_records_itself_interrupted(fake_host):
    holder = fake_host.helper(who="ana@laptop", command="deploy")
    holder.call("dirs", step="dirs")
    with fake_host.helper(mode="read", who="bo@desk", command="unlock") as unlocker:
        told = unlocker.call("unlock")
        assert told["released"] is None and told["held_by"]["pid"] == holder.pid
        assert holder.pipe.proc.poll() is None  # asking does not stop it
        stopped = unlocker.call("unlock", force=True)
    assert stopped["released"]["who"] == "ana@laptop"
    assert holder.pipe.wait(10) is not None
    last = fake_host.audit()[-1]
    assert (last["outcome"], last["who"], last["command"], last["steps"]) == \
        ("interrupted", "ana@laptop", "deploy", ["dirs"])
    with fake_host.helper() as after:
        assert after.hello["lock"]["acquired"]
    with fake_host.helper(mode="read") as unlocker:
        assert unlocker.call("unlock", force=True) == {"released": None}


def test_unlock_force_will_not_signal_a_process_that_is_no_session(fake_host):
    state = fake_host.paths["state"]
    state.mkdir(parents=True)
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held by pytest itself
    (state / "lock.json").write_text(json.dumps({"who": "x", "pid": os.getpid()}))
    try:
        with fake_host.helper(mode="read") as unlocker:
            with pytest.raises(HostStepFailed, match="is not a nightguard session"):
                unlocker.call("unlock", force=True)
    finally:
        os.close(fd)


# -- the audit says what happened -------------------------------------------------------------
def test_finish_writes_the_clients_outcome_and_the_release_history(fake_host):
    with fake_host.helper(who="ana@laptop", command="deploy") as helper:
        helper.call("facts")
        helper.call("dirs", step="dirs")
        answer = helper.call("finish", step="record",
                             audit={"outcome": "ok", "version": "v1"},
                             release={"version": "v1", "image_tag": "t1", "secrets": {}})
        assert answer["recorded"] and answer["kept"] == ["v1"]
        assert helper.pipe.wait(10) == 0
    audit = fake_host.audit()
    assert len(audit) == 1
    assert {k: audit[0][k] for k in ("outcome", "version", "steps", "who", "command")} == \
        {"outcome": "ok", "version": "v1", "steps": ["dirs"], "who": "ana@laptop",
         "command": "deploy"}
    state = fake_host.state()
    assert state["verified"] == "v1" and [h["version"] for h in state["history"]] == ["v1"]
    assert not (fake_host.paths["state"] / "lock.json").exists()
    assert stat.S_IMODE((fake_host.paths["state"] / "audit.log").stat().st_mode) == 0o600
    assert stat.S_IMODE(fake_host.paths["state"].stat().st_mode) == 0o700


def test_closing_stdin_mid_step_records_interrupted_with_the_step_in_progress(fake_host):
    fake_host.control("build", {"lines": 50, "sleep": 0.05})
    helper = fake_host.helper(who="ana@laptop")
    helper.call("dirs", step="dirs")
    sync(helper, CODE_V1)
    context = f"{fake_host.app_dir}/deployment"
    helper.start("run", step="image", argv=cmd.image_build(
        REF, f"{context}/Dockerfile.nightguard", context, "python", False))
    assert "progress" in helper.next_message()  # the build is running
    assert helper.close(15) == 0
    last = fake_host.audit()[-1]
    assert last["outcome"] == "interrupted"
    assert last["steps"] == ["dirs", "sync", "image (failed)"]
    assert last["during"] == "image"
    assert REF not in fake_host.image_names()  # the build was stopped, not left to finish


def test_a_restart_in_progress_is_left_to_finish_when_the_client_goes(fake_host):
    with fake_host.helper() as helper:
        bring_up(helper, fake_host)
    fake_host.control("restart", {"sleep": 0.5})
    helper = fake_host.helper(who="ana@laptop")
    helper.start("run", step="restart", argv=cmd.systemctl("restart", UNIT),
                 on_interrupt="finish")
    wait_for(lambda: len(fake_host.calls("systemctl")) == 4)  # the restart has begun
    assert helper.close(15) == 0
    last = fake_host.audit()[-1]
    assert (last["outcome"], last["steps"], last["during"]) == \
        ("interrupted", ["restart"], "restart")
    assert fake_host.calls("systemctl")[-1] == ["restart", UNIT]
    assert fake_host.calls("podman")[-1][0] == "run"  # systemd went on: a new container


def test_a_read_only_session_refuses_changing_ops_and_writes_nothing(fake_host):
    with fake_host.helper() as helper:
        bring_up(helper, fake_host)
        helper.call("finish", audit={"outcome": "ok"})
    assert [a["outcome"] for a in fake_host.audit()] == ["ok"]
    assert fake_host.app_dir.is_dir() and fake_host.paths["unit"].exists()
    watched = (fake_host.paths["state"], fake_host.app_dir, fake_host.paths["graphroot"],
               fake_host.paths["unit"].parent)
    before = [tree(folder) for folder in watched]
    calls_before = len(fake_host.calls())
    with fake_host.helper(mode="read") as reader:
        assert "lock" not in reader.hello
        assert reader.call("facts")["container"]["running"]
        for op, args in (("sync", {"files": [], "delete": [".env"], "all_files": []}),
                         ("secret_put", {"name": "gemini_api_key", "data": b"x"}),
                         ("run", {"argv": ["systemctl", "restart", UNIT]}),
                         ("finish", {"audit": {"outcome": "ok"}})):
            with pytest.raises(HostStepFailed, match=f"op '{op}' not allowed"):
                reader.call(op, **args)
        assert reader.close() == 0
    assert [tree(folder) for folder in watched] == before
    assert [a["outcome"] for a in fake_host.audit()] == ["ok"]
    assert fake_host.calls()[calls_before:] == []  # facts came from files alone


# -- facts: Podman's files, and the podman CLI where they are not -----------------------------
def test_facts_from_podmans_files_match_what_the_podman_cli_reports(fake_host):
    with fake_host.helper() as helper:
        bring_up(helper, fake_host)
        assert helper.call("gate", deadline=10)["healthy"]
    calls_before = len(fake_host.calls("podman"))
    with fake_host.helper(mode="read") as reader:
        fast = reader.call("facts")
    assert fake_host.calls("podman")[calls_before:] == []
    elsewhere = {"graphroot": fake_host.root / "no-storage", "runroot": fake_host.root / "none"}
    with fake_host.helper(mode="read", paths=elsewhere) as reader:
        slow = reader.call("facts")
    asked = [argv[:2] for argv in fake_host.calls("podman")[calls_before:]]
    assert asked == [["images", "--format"], ["secret", "ls"], ["container", "inspect"]]
    assert fast["container"]["source"] == "files" and slow["container"]["source"] == "podman"
    for key in ("image_names", "image_tags"):
        assert fast[key] == slow[key] == ([REF] if key == "image_names" else [TAG])
    # the CLI shows a relative creation time ("5 seconds ago"); the names must agree
    assert sorted(fast["secrets"]) == sorted(slow["secrets"]) == sorted(SECRETS_V1)
    for key in ("id", "running", "pid", "status", "image", "markers", "memory", "memory_swap",
                "memory_reservation", "nano_cpus", "health", "health_log"):
        assert fast["container"][key] == slow["container"][key], key
    assert fast["container"]["markers"] == {"NG_RELEASE_VERSION": "v1", "NG_RELEASE_CODE": "c-v1"}
    assert (fast["container"]["memory"], fast["container"]["memory_swap"],
            fast["container"]["nano_cpus"]) == (700 * MiB, 2700 * MiB, 1_000_000_000)
    volumes = {(m["destination"], m["source"]) for m in slow["container"]["mounts"]}
    assert volumes == {("/app", str(fake_host.app_dir)), ("/data", str(fake_host.data_dir))}
    assert volumes <= {(m["destination"], m["source"]) for m in fast["container"]["mounts"]}


def test_podman_5_keeps_removed_on_exit_containers_apart_and_facts_still_read_files(
        fake_host):
    with fake_host.helper() as helper:
        bring_up(helper, fake_host)
    folder = fake_host.paths["graphroot"] / "overlay-containers"
    (folder / "containers.json").rename(folder / "volatile-containers.json")  # as 5.x does
    (folder / "containers.lock").write_text("")
    calls_before = len(fake_host.calls("podman"))
    with fake_host.helper(mode="read") as reader:
        facts = reader.call("facts")
    assert facts["container"]["source"] == "files" and facts["container"]["running"]
    assert fake_host.calls("podman")[calls_before:] == []
    (folder / "volatile-containers.json").unlink()  # an empty store: no container, no CLI
    with fake_host.helper(mode="read") as reader:
        assert reader.call("facts")["container"] is None
    assert fake_host.calls("podman")[calls_before:] == []


def test_facts_of_a_fresh_host(fake_host):
    with fake_host.helper() as helper:
        facts = helper.call("facts")
    assert facts["podman"] == "4.9.3" and facts["systemd"] and facts["cgroup2"]
    assert facts["os"]["id"] == "debian" and facts["os"]["version_id"] == "12"
    assert facts["container"] is None and facts["secrets"] == {} and facts["image_tags"] == []
    assert facts["app_dir_exists"] is False and facts["manifest"] == {}
    assert len(facts["secret_salt"]) == 64  # a changing session makes the host's key
    assert "apt_sources" not in facts  # nothing to install: no mirror was contacted
    with fake_host.helper(mode="read") as reader:
        assert reader.call("facts")["secret_salt"] == facts["secret_salt"]
    # a fresh host has no storage files yet; the version is cached by the binary's identity
    assert [argv[:2] for argv in fake_host.calls("podman")] == [
        ["version", "--format"], ["images", "--format"], ["container", "inspect"],
        ["images", "--format"], ["container", "inspect"]]


# -- sync: only inside the app dir, never through a link --------------------------------------
def test_sync_writes_files_with_their_modes_and_removes_deleted_ones(fake_host):
    files = {"execution/agent.py": (b"print(1)\n", 0o644),
             "execution/run.sh": (b"#!/bin/sh\n", 0o755),
             "knowledge/private.md": (b"notes\n", 0o600),
             "deployment/odd": (b"x\n", 0o4777)}
    with fake_host.helper() as helper:
        assert sync(helper, files) == {"written": 4, "deleted": 0}
        found = tree(fake_host.app_dir)
        assert files_of(fake_host.app_dir) == {**files, "deployment/odd": (b"x\n", 0o777)}
        assert all(found[d][0] == "dir" for d in ("execution", "knowledge", "deployment"))
        assert (fake_host.app_dir / "execution/agent.py").stat().st_uid == os.getuid()
        assert sync(helper, {"execution/agent.py": (b"print(2)\n", 0o640)},
                    delete=["knowledge/private.md"],
                    all_files=["execution/agent.py", "execution/run.sh", "deployment/odd"]) \
            == {"written": 1, "deleted": 1}
        facts = helper.call("facts")
    assert files_of(fake_host.app_dir) == {"execution/agent.py": (b"print(2)\n", 0o640),
                                           "execution/run.sh": (b"#!/bin/sh\n", 0o755),
                                           "deployment/odd": (b"x\n", 0o777)}
    assert facts["manifest"]["execution/agent.py"] == \
        f"{hashlib.sha256(b'print(2)' + bytes([10])).hexdigest()}:640"
    assert facts["synced"] == ["deployment/odd", "execution/agent.py", "execution/run.sh"]
    assert not [n for n in os.listdir(fake_host.app_dir / "execution") if ".ng-" in n]


@pytest.fixture
def outside(fake_host):
    """A folder standing for /etc: what a planted link points at."""
    folder = fake_host.root / "outside"
    (folder / "deep").mkdir(parents=True)
    (folder / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (folder / "deep" / "agent.py").write_text("not the agent\n")
    return folder


def plant_links(app_dir: Path, outside: Path) -> None:
    (app_dir / "execution" / "lib").mkdir(parents=True)
    (app_dir / "execution" / "run.sh").mkdir()  # a directory where a file goes
    (app_dir / "execution" / "run.sh" / "x").symlink_to(outside / "passwd")
    (app_dir / "execution" / "run.sh" / "deeper").mkdir()
    (app_dir / "execution" / "agent.py").symlink_to(outside / "passwd")  # a file's name
    (app_dir / "execution" / ".run.sh.ng-0123456789ab").symlink_to(outside / "passwd")
    (app_dir / "execution" / "lib" / "sub").symlink_to(outside / "deep")  # a parent dir
    (app_dir / "knowledge").symlink_to(outside)  # the app dir's subdir


LINKED_FILES = {"execution/agent.py": (b"print('mine')\n", 0o644),
                "execution/run.sh": (b"#!/bin/sh\n", 0o755),
                "execution/lib/sub/agent.py": (b"print('sub')\n", 0o644),
                "knowledge/passwd": (b"notes\n", 0o644)}


def test_sync_replaces_planted_links_and_never_writes_through_them(fake_host, outside):
    plant_links(fake_host.app_dir, outside)
    before = tree(outside)
    with fake_host.helper() as helper:
        facts = helper.call("facts")
        assert sorted(facts["links"]) == ["execution/.run.sh.ng-0123456789ab",
                                          "execution/agent.py", "execution/lib/sub",
                                          "execution/run.sh/x", "knowledge"]
        sync(helper, LINKED_FILES, links=facts["links"])
        assert tree(outside) == before
        found = tree(fake_host.app_dir)
        assert files_of(fake_host.app_dir) == LINKED_FILES
        assert [rel for rel, entry in found.items() if entry[0] == "link"] == []
        # and back: the restore of the files this sync replaced goes through no link either
        (fake_host.app_dir / "execution/lib/sub").rename(fake_host.root / "moved")
        (fake_host.app_dir / "execution/lib/sub").symlink_to(outside / "deep")
        helper.call("restore_code")  # removes what the sync added, and no file out there
    assert tree(outside) == before
    assert [rel for rel, e in tree(fake_host.app_dir).items() if e[0] == "link"] == \
        ["execution/lib/sub"]


def test_restore_code_writes_no_file_through_a_link_planted_after_the_sync(fake_host,
                                                                          outside):
    before = tree(outside)
    with fake_host.helper() as helper:
        sync(helper, CODE_V1)
        sync(helper, {"execution/agent.py": (b"print('v2')\n", 0o644),
                      "deployment/Dockerfile.nightguard": (b"FROM v2\n", 0o644)},
             all_files=list(CODE_V1))
        (fake_host.app_dir / "execution/agent.py").unlink()
        (fake_host.app_dir / "execution/agent.py").symlink_to(outside / "passwd")
        (fake_host.app_dir / "deployment").rename(fake_host.root / "moved")
        (fake_host.app_dir / "deployment").symlink_to(outside)
        helper.call("restore_code")
    assert tree(outside) == before
    assert files_of(fake_host.app_dir)["execution/agent.py"] == CODE_V1["execution/agent.py"]
    assert tree(fake_host.app_dir)["deployment"][0] == "dir"


def test_sync_refuses_an_app_dir_that_is_a_link(fake_host, outside):
    fake_host.app_dir.parent.mkdir(parents=True)
    fake_host.app_dir.symlink_to(outside)
    before = tree(outside)
    with fake_host.helper() as helper:
        with pytest.raises(HostStepFailed) as failed:
            sync(helper, CODE_V1)
    assert "Errno" in str(failed.value) and "'app'" in str(failed.value)  # ENOTDIR / ELOOP
    assert "\n" not in str(failed.value)
    assert tree(outside) == before


def test_restore_code_puts_back_the_last_sync(fake_host):
    v2 = {"execution/agent.py": (b"print('v2')\n", 0o600),
          "execution/new.py": (b"new\n", 0o644)}
    with fake_host.helper() as helper:
        sync(helper, CODE_V1)
        v1_synced = helper.call("facts")["synced"]
        sync(helper, v2, delete=["execution/run.sh"],
             all_files=["deployment/Dockerfile.nightguard", *v2])
        assert "execution/run.sh" not in files_of(fake_host.app_dir)
        assert helper.call("restore_code") == {"restored": 2, "removed": 1}
        assert files_of(fake_host.app_dir) == CODE_V1
        assert helper.call("facts")["synced"] == v1_synced  # as the host was before


def release(helper, version, keep, secrets=None):
    entry = {"version": version, "image": f"localhost/nightguard:{version}",
             "image_tag": version, "code": version, "secrets": secrets or {}}
    return helper.call("release", entry=entry, keep=keep)


def test_finish_records_the_release_and_the_audit_line_together(fake_host):
    with fake_host.helper() as helper:
        bring_up(helper, fake_host)
        entry = {"version": "v9", "image": f"{IMAGE}:v9", "image_tag": "v9", "code": "c9",
                 "secrets": {}}
        answer = helper.call("finish", audit={"outcome": "ok", "version": "v9"},
                             release=entry, keep=3)
    assert answer["recorded"] and answer["kept"] == ["v9"]
    assert fake_host.state()["verified"] == "v9" and fake_host.audit()[-1]["version"] == "v9"


def test_a_release_keeps_its_code_and_restore_code_brings_its_whole_tree_back(fake_host):
    v2 = {"execution/agent.py": (b"print('v2')\n", 0o600),
          "execution/new.py": (b"new\n", 0o644)}
    with fake_host.helper() as helper:
        sync(helper, CODE_V1)
        release(helper, "v1", keep=3)
        sync(helper, v2, delete=["execution/run.sh"],
             all_files=["deployment/Dockerfile.nightguard", *v2])
        assert release(helper, "v2", keep=3)["kept"] == ["v2", "v1"]
        assert helper.call("facts")["releases"] == ["v1", "v2"]
        state = helper.call("facts")["state"]
        assert state["verified"] == "v2" and [h["version"] for h in state["history"]] == [
            "v2", "v1"]
        assert all("unit_text" in h and "markers_text" in h for h in state["history"])
        assert helper.call("restore_code", version="v1") == {"restored": 3, "removed": 1}
        assert files_of(fake_host.app_dir) == CODE_V1
        assert helper.call("facts")["synced"] == sorted(CODE_V1)
        assert release(helper, "v3", keep=1)["kept"] == ["v3"]
        assert helper.call("facts")["releases"] == ["v3"]
        with pytest.raises(HostStepFailed, match="release v1 is no longer kept"):
            helper.call("restore_code", version="v1")
    kept = fake_host.paths["state"] / "releases" / "v3.tar.gz"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600


# -- secrets ------------------------------------------------------------------------------------
def put(helper, facts, name, value):
    """secret_put after `facts` (a changing session's facts make the host's secret key); the
    host reads its own Podman version, nothing of it is sent."""
    return helper.call("secret_put", step=f"secret {name}", name=name, data=value.encode())


def secret_creates(host):
    return [argv for argv in host.calls("podman") if argv[:2] == ["secret", "create"]]


def test_secret_put_records_the_digest_podman_has_and_keeps_the_value_it_replaces(fake_host):
    with fake_host.helper() as helper:
        facts = helper.call("facts")
        salt = facts["secret_salt"]
        first = put(helper, facts, "gemini_api_key", "gem-1111")
        assert first == {"digest": secret_digest(salt, "gem-1111"), "kept": None}
        second = put(helper, facts, "gemini_api_key", "gem-2222")
        assert second["kept"] == first["digest"]
        hashes = helper.call("facts")["secret_hashes"]
    copy = f"gemini_api_key__{first['digest'][:12]}"
    assert fake_host.secret_values() == {"gemini_api_key": "gem-2222", copy: "gem-1111"}
    assert hashes == {"gemini_api_key": secret_digest(salt, "gem-2222")}
    assert secret_creates(fake_host) == [["secret", "create", "gemini_api_key", "-"],
                                         ["secret", "create", copy, "-"],
                                         ["secret", "create", "--replace", "gemini_api_key", "-"]]
    assert not any("gem-" in word for argv in fake_host.calls() for word in argv)


def test_a_failed_replace_records_no_digest_and_leaves_the_old_value(fake_host):
    with fake_host.helper() as helper:
        facts = helper.call("facts")
        first = put(helper, facts, "gemini_api_key", "gem-1111")
        fake_host.fail("secret-create", match="gemini_api_key", message="Error: disk full")
        with pytest.raises(HostStepFailed, match="podman secret create gemini_api_key failed: "
                                                 "Error: disk full"):
            put(helper, facts, "gemini_api_key", "gem-2222")
        assert helper.call("facts")["secret_hashes"] == {"gemini_api_key": first["digest"]}
    assert fake_host.secret_values()["gemini_api_key"] == "gem-1111"


def test_podman_before_4_7_replaces_by_rm_and_create_and_undoes_a_failed_create(make_fake_host):
    host = make_fake_host(podman="4.3.1")
    with host.helper() as helper:
        facts = helper.call("facts")
        assert facts["podman"] == "4.3.1"
        first = put(helper, facts, "gemini_api_key", "gem-1111")
        host.fail("secret-create", match="gemini_api_key")
        with pytest.raises(HostStepFailed, match="secret create gemini_api_key failed"):
            put(helper, facts, "gemini_api_key", "gem-2222")
        assert helper.call("facts")["secret_hashes"] == {"gemini_api_key": first["digest"]}
        assert host.secret_values()["gemini_api_key"] == "gem-1111"  # put back from the copy
        second = put(helper, facts, "gemini_api_key", "gem-3333")
        assert second["kept"] == first["digest"]
    podman = host.calls("podman")
    assert not any("--replace" in argv or "--showsecret" in argv for argv in podman)
    assert ["secret", "rm", "gemini_api_key"] in podman
    assert host.secret_values()["gemini_api_key"] == "gem-3333"


def test_secret_ops_use_the_hosts_own_podman_version(make_fake_host):
    host = make_fake_host(podman="4.3.1")
    with host.helper() as helper:
        helper.call("facts")
        # what a laptop of an older release sent back is not what decides
        helper.call("secret_put", name="gemini_api_key", data=b"gem-1", podman="5.4.2")
        helper.call("secret_put", name="gemini_api_key", data=b"gem-2", podman="5.4.2")
    creates = secret_creates(host)
    assert creates and not any("--replace" in argv for argv in creates)
    assert ["secret", "rm", "gemini_api_key"] in host.calls("podman")


def test_secret_restore_puts_a_kept_value_back_and_forget_drops_unneeded_copies(fake_host):
    with fake_host.helper() as helper:
        facts = helper.call("facts")
        d1 = put(helper, facts, "gemini_api_key", "gem-1111")["digest"]
        d2 = put(helper, facts, "gemini_api_key", "gem-2222")["digest"]
        restored = helper.call("secret_restore", digests={"gemini_api_key": d1,
                                                          "telegram_bot_token": "ab" * 32})
        assert restored == {"restored": ["gemini_api_key"], "missing": ["telegram_bot_token"]}
        assert fake_host.secret_values()["gemini_api_key"] == "gem-1111"
        assert fake_host.secret_values()[f"gemini_api_key__{d2[:12]}"] == "gem-2222"
        assert helper.call("facts")["secret_hashes"] == {"gemini_api_key": d1}
        again = helper.call("secret_restore", digests={"gemini_api_key": d1})
        assert again == {"restored": [], "missing": []}
        kept = release(helper, "v1", keep=3, secrets={"gemini_api_key": d1})
        assert f"gemini_api_key__{d2[:12]}" not in fake_host.secret_values()  # on release
        put(helper, facts, "gemini_api_key", "gem-3333")
        put(helper, facts, "gemini_api_key", "gem-1111")  # gem-3333 is kept, unused
        dropped = helper.call("secret_forget")
    assert kept["kept"] == ["v1"]
    assert [name for name in dropped["dropped"] if "__" in name] == dropped["dropped"]
    assert len(dropped["dropped"]) == 1
    assert fake_host.secret_values() == {"gemini_api_key": "gem-1111",
                                         f"gemini_api_key__{d1[:12]}": "gem-1111"}


# -- provision, swap -----------------------------------------------------------------------------
def test_provision_repairs_dpkg_then_installs_without_questions(fake_host):
    fake_host.remove_tool("crun")
    fake_host.remove_tool("conmon")
    with fake_host.helper() as helper:
        facts = helper.call("facts")
        assert facts["tools"]["crun"] is None and facts["apt_sources"] == []
        listed = fake_host.paths["apt_sources"] / "sources.list.d"
        listed.mkdir()
        (listed / "debian.sources").write_text("Types: deb\nURIs: http://127.0.0.1:9/debian\n")
        facts = helper.call("facts")
        assert facts["apt_sources"] == [["http", "127.0.0.1", 9]]
        assert facts["apt_reachable"] == {"127.0.0.1:9": False}
        helper.call("provision", packages=["crun", "conmon"])
        assert helper.call("facts")["tools"]["crun"] == str(fake_host.bin / "crun")
        fake_host.fail("apt-get-install", message="E: Unable to fetch some archives")
        fake_host.remove_tool("crun")
        with pytest.raises(HostStepFailed) as failed:
            helper.call("provision", packages=["crun"])
    assert str(failed.value) == "step 'provision' failed: `apt-get -q ...` exited 125"
    assert failed.value.tail[-1] == "E: Unable to fetch some archives"
    calls = [e for e in fake_host.call_log() if e["tool"] in ("apt-get", "dpkg")][:3]
    assert [(e["tool"], e["argv"]) for e in calls] == [
        ("dpkg", ["--configure", "-a"]), ("apt-get", ["-q", "update"]),
        ("apt-get", ["-q", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=1",
                     "-o", "Dpkg::Options::=--force-confdef", "-o",
                     "Dpkg::Options::=--force-confold", "install", "crun", "conmon"])]
    assert all(e["env"] == {"DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}
               for e in calls)


# -- apt's and dpkg's locks: a new VM's startup script or unattended-upgrades holds them ---------
STARTUP_UNIT = "google-startup-scripts.service"


@contextlib.contextmanager
def apt_busy(host: FakeHost, seconds: float, lock: str = "lock-frontend", installs=(),
             cmdline: bytes = b"apt-get\0-q\0-y\0install\0podman\0"):
    """A real process holding a real fcntl lock on one of apt's lock files for ``seconds``,
    shown in the fake host's /proc as the VM's startup script running apt-get; it "installs"
    ``installs`` (their stand-ins appear) just before it lets go, as apt would."""
    path = next(p for p in host.paths["apt_locks"] if p.name == lock)
    links = [(str(host.bin / name), str(Path(hostfake.STANDINS) / "tool.py")) for name in installs]
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(path)!r}, os.O_RDWR)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            f"time.sleep({seconds})\n"
            f"for link, target in {links!r}:\n"
            "    os.symlink(target, link)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"  # the lock is held from here on
        proc = host.paths["proc"] / str(holder.pid)
        proc.mkdir(parents=True)
        (proc / "cmdline").write_bytes(cmdline)
        (proc / "cgroup").write_text(f"0::/system.slice/{STARTUP_UNIT}\n")
        (proc / "stat").write_text(Path(f"/proc/{holder.pid}/stat").read_text())
        (host.paths["proc"] / "uptime").write_text(Path("/proc/uptime").read_text())
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_facts_name_who_holds_apt_and_provision_waits_then_installs_only_what_is_missing(
        fake_host):
    fake_host.remove_tool("crun")
    fake_host.remove_tool("conmon")
    with apt_busy(fake_host, 4, installs=["crun"]) as holder, fake_host.helper() as helper:
        [busy] = helper.call("facts")["apt_busy"]
        assert busy["pid"] == holder.pid and busy["unit"] == STARTUP_UNIT
        assert (busy["what"], busy["command"]) == ("the VM's startup script",
                                                   "apt-get -q -y install podman")
        assert busy["locks"] == [str(fake_host.paths["apt_locks"][0])]
        assert 0 <= busy["running"] < 30
        started = time.monotonic()
        answer = helper.call("provision", packages=["crun", "conmon"], wait=60)
        waited = time.monotonic() - started
    assert answer["installed"] == ["conmon"]  # crun came with what it waited for
    assert [h["pid"] for h in answer["waited"]] == [holder.pid]
    assert waited >= 2  # it did wait: the holder kept the lock for 4 s
    shown = [line for line in helper.progress if line.startswith("waiting for apt")]
    assert shown and f"pid {holder.pid} (apt-get -q -y install podman), the VM's startup " \
        f"script [{STARTUP_UNIT}], running" in shown[0]
    installs = [c for c in fake_host.calls("apt-get") if "install" in c]
    assert installs and installs[0][-1:] == ["conmon"]
    assert not [c for c in installs if "crun" in c]


def test_facts_name_apt_s_holder_even_when_nothing_basic_is_missing(fake_host):
    fake_host.remove_tool("slirp4netns")  # not a basic: facts skip the mirror probe
    with apt_busy(fake_host, 3) as holder, fake_host.helper() as helper:
        facts = helper.call("facts")
    assert "apt_sources" not in facts
    assert [h["pid"] for h in facts["apt_busy"]] == [holder.pid]


def test_provision_after_the_holder_installed_everything_runs_no_apt_at_all(fake_host):
    fake_host.remove_tool("crun")
    with apt_busy(fake_host, 2, lock="lock", installs=["crun"]), \
            fake_host.helper() as helper:
        answer = helper.call("provision", packages=["crun"], wait=60)
    assert answer["installed"] == []
    assert fake_host.calls("apt-get") == [] and fake_host.calls("dpkg") == []


def test_a_lock_held_past_the_bound_is_one_line_naming_it_and_nothing_runs(fake_host):
    fake_host.remove_tool("crun")
    with apt_busy(fake_host, 60, lock="lock") as holder, fake_host.helper() as helper:
        with pytest.raises(HostStepFailed) as failed:
            helper.call("provision", packages=["crun"], wait=2)
        with pytest.raises(HostStepFailed) as waited:
            helper.call("apt_wait", wait=1)
        assert holder.poll() is None  # never killed
    line = str(failed.value)
    assert "\n" not in line and line.startswith("step 'provision' failed: apt is still busy "
                                                 f"after 2s: pid {holder.pid} (apt-get")
    assert f"holds {fake_host.paths['apt_locks'][1]}; look at it with `systemctl status " \
        f"{STARTUP_UNIT}`" in line and "nothing was changed" in line
    assert "apt is still busy after 1s" in str(waited.value)
    assert fake_host.calls("apt-get") == [] and fake_host.calls("dpkg") == []


def test_apt_losing_the_race_for_a_lock_is_tried_again(fake_host):
    fake_host.remove_tool("crun")
    fake_host.fail("apt-get-update", message="E: Could not get lock /var/lib/apt/lists/lock. "
                                             "It is held by process 1270 (apt-get)")
    with fake_host.helper() as helper:
        answer = helper.call("provision", packages=["crun"], wait=60)
    assert answer["installed"] == ["crun"]
    assert [c for c in fake_host.calls("apt-get") if "update" in c] == [["-q", "update"]] * 2


def test_apt_wait_on_a_quiet_host_answers_at_once(fake_host):
    with fake_host.helper(mode="read") as helper:
        started = time.monotonic()
        answer = helper.call("apt_wait", wait=60)
    assert answer == {"waited": answer["waited"], "holders": []}
    assert time.monotonic() - started < 1.5


def test_swap_makes_an_active_600_swapfile_in_fstab_with_swappiness(fake_host):
    swapfile = fake_host.paths["swapfile"]
    with fake_host.helper() as helper:
        helper.call("swap", size=16 * MiB, swappiness=10)
        facts = helper.call("facts")
        helper.call("swap", size=16 * MiB, swappiness=10)  # in place: nothing is redone
    assert [e["tool"] for e in fake_host.call_log() if e["tool"] != "podman"] == \
        ["fallocate", "mkswap", "swapon"]
    assert facts["swaps"] == [{"path": str(swapfile), "size": 16 * MiB - 4096}]
    assert (facts["swapfile_size"], facts["swapfile_mode"], facts["swap_in_fstab"]) == \
        (16 * MiB, "0o600", True)
    assert (facts["swappiness"], facts["swappiness_persisted"]) == (10, "vm.swappiness=10")
    fstab = fake_host.paths["fstab"].read_text()
    assert fstab.count(f"{swapfile} none swap sw 0 0") == 1
    assert fstab.startswith("# /etc/fstab\nUUID=1234 / ext4 defaults 0 1\n")


def test_swap_falls_back_to_dd_when_fallocate_fails(fake_host):
    fake_host.fail("fallocate", message="fallocate: fallocate failed: Operation not supported")
    with fake_host.helper() as helper:
        helper.call("swap", size=8 * MiB, swappiness=10)
    assert [e["tool"] for e in fake_host.call_log()] == ["fallocate", "dd", "mkswap", "swapon"]
    assert fake_host.paths["swapfile"].stat().st_size == 8 * MiB


# -- units, the health gate --------------------------------------------------------------------
def test_install_unit_reloads_systemd_only_when_the_unit_changed(fake_host):
    with fake_host.helper() as helper:
        assert helper.call("install_unit", text=unit_text(fake_host)) == {"changed": True}
        assert helper.call("install_unit", text=unit_text(fake_host)) == {"changed": False}
        assert helper.call("install_unit", text=unit_text(fake_host, f"{IMAGE}:x")) == \
            {"changed": True}
    assert fake_host.calls("systemctl") == [["daemon-reload"],
                                            ["enable", "--no-reload", "--quiet", UNIT],
                                            ["daemon-reload"]]
    systemd = json.loads(Path(fake_host.standin_config["systemd_state"]).read_text())
    assert systemd["reloads"] == 2  # one per change: enabling adds none
    wants = fake_host.paths["unit_wants"]
    assert wants.is_symlink() and wants.resolve() == fake_host.paths["unit"]
    assert stat.S_IMODE(fake_host.paths["unit"].stat().st_mode) == 0o644


def test_a_rootless_unit_makes_systemd_linger_for_its_user(fake_host):
    linger = fake_host.paths["linger_dir"] / fake_host.owner
    assert not linger.exists()
    with fake_host.helper(rootless=True) as helper:
        assert helper.call("facts")["linger"] is False
        helper.call("install_unit", text=unit_text(fake_host))
        assert helper.call("facts")["linger"] is True
    assert linger.exists()
    assert ["enable-linger", fake_host.owner] in fake_host.calls("loginctl")
    assert fake_host.calls("systemctl")[:2] == [["--user", "daemon-reload"],
                                                ["--user", "enable", "--no-reload", "--quiet",
                                                 UNIT]]


def test_a_user_who_may_not_linger_is_told_the_one_command(fake_host):
    fake_host.fail("loginctl", times=-1, message="Access denied")
    with fake_host.helper(rootless=True) as helper:
        with pytest.raises(HostStepFailed) as info:
            helper.call("install_unit", text=unit_text(fake_host))
    message = str(info.value)
    assert f"run `sudo loginctl enable-linger {fake_host.owner}` on the host once" in message
    assert "\n" not in message


def test_gate_passes_a_healthy_container_with_the_limits_in_force(fake_host):
    with fake_host.helper() as helper:
        bring_up(helper, fake_host)
        answer = helper.call("gate", deadline=10)
    assert answer["healthy"] is True
    assert answer["container"]["markers"]["NG_RELEASE_VERSION"] == "v1"
    assert answer["container"]["health"] == "healthy"
    assert answer["cgroup"]["memory"] == str(700 * MiB)
    assert answer["cgroup"]["swap"] == str(2000 * MiB)
    container = fake_host.container()
    assert container["secrets"] == SECRETS_V1
    assert container["env"]["NG_RELEASE_CODE"] == "c-v1"


def test_gate_reads_the_limits_of_a_cgroup_v1_host(fake_host):
    fake_host.control("cgroup_v1", True)
    with fake_host.helper() as helper:
        bring_up(helper, fake_host)
        answer = helper.call("gate", deadline=10)
    assert answer["healthy"] is True
    assert answer["cgroup"] == {"memory": str(700 * MiB), "memsw": str(2700 * MiB),
                                "memory_usage": "52428800"}


def test_gate_reports_an_unhealthy_container_with_its_health_log_and_logs(fake_host):
    fake_host.control("health", {"fail": True, "output": "heartbeat is 93 s old"})
    fake_host.control("logs", ["agent: started", "agent: Telegram said 401"])
    with fake_host.helper() as helper:
        bring_up(helper, fake_host)
        started = time.monotonic()
        answer = helper.call("gate", deadline=1)
    assert time.monotonic() - started < 3
    assert answer["healthy"] is False
    assert answer["reason"] == "not healthy within 1s: unhealthy"
    assert answer["container"]["health_log"][-1] == {"exit": 1,
                                                     "output": "heartbeat is 93 s old"}
    assert "agent: Telegram said 401" in answer["logs"]


def test_gate_stops_waiting_when_the_container_is_killed_for_failing(fake_host):
    fake_host.control("health", {"fail": True, "kill": True})
    with fake_host.helper() as helper:
        bring_up(helper, fake_host)
        answer = helper.call("gate", deadline=30)
    assert answer["healthy"] is False
    assert answer["container"]["running"] is False
    assert len([a for a in fake_host.calls("podman") if a[0] == "healthcheck"]) == 1


def test_gate_without_a_container(fake_host):
    with fake_host.helper() as helper:
        answer = helper.call("gate", deadline=0.5)
    assert (answer["healthy"], answer["reason"], answer["container"]) == \
        (False, "container is not running", None)


def test_health_logs_and_history_for_the_read_only_tasks(fake_host):
    with fake_host.helper() as helper:
        bring_up(helper, fake_host)
        helper.call("gate", deadline=10)
        helper.call("swap", size=8 * MiB, swappiness=10)
        helper.call("finish", audit={"outcome": "ok", "version": "v1"},
                    release={"version": "v1", "image_tag": "t1", "secrets": {}})
    with fake_host.helper(mode="read") as reader:
        health = reader.call("health")
        logs = reader.call("logs", tail=1)
        history = reader.call("history", limit=5)
    assert health["container"]["health"] == "healthy"
    assert health["unit"]["ActiveState"] == "active"
    assert health["cgroup"]["memory"] == str(700 * MiB)
    assert health["swaps"] == [str(fake_host.paths["swapfile"])]
    assert health["lock"] is None
    assert health["deployed"] == {"version": "v1", "image_tag": "t1", "secrets": {}}
    assert health["last_audit"]["outcome"] == "ok"
    assert logs["exit"] == 0 and logs["text"].strip().endswith("agent: heartbeat ok")
    assert len(logs["text"].strip().splitlines()) == 1
    assert [a["outcome"] for a in history["audit"]] == ["ok"]
    assert history["state"]["verified"] == "v1"


RACE = ('Error: error resolving symbol "sd_journal_open": libsystemd-journal.so.0: cannot open '
        "shared object file: No such file or directory")


def logs_calls(fake_host) -> int:
    return sum(1 for argv in fake_host.calls("podman") if argv[:1] == ["logs"])


@pytest.mark.parametrize("message, times, exit_code, calls", [
    (RACE, 2, 0, 3),                      # Podman's journal race twice: the third run answers
    (RACE, 3, 125, 3),                    # still failing after three runs: that is the answer
    ("Error: no such container", 1, 125, 1),  # any other failure: said at once, never rerun
])
def test_logs_are_read_again_only_past_podmans_journal_library_race(
        fake_host, message, times, exit_code, calls):
    with fake_host.helper() as helper:
        bring_up(helper, fake_host)
    before = logs_calls(fake_host)
    fake_host.fail("logs", times=times, message=message)
    with fake_host.helper(mode="read") as reader:
        logs = reader.call("logs", tail=1)
    assert logs_calls(fake_host) - before == calls
    assert logs["exit"] == exit_code
    if exit_code:
        assert message in logs["text"]
    else:
        assert logs["text"].strip().endswith("agent: heartbeat ok")


# -- errors come back as one line --------------------------------------------------------------
def test_op_errors_come_back_as_one_line_and_the_session_goes_on(fake_host):
    fake_host.fail("build", message="Error: creating build container: no space left on device")
    with fake_host.helper() as helper:
        sync(helper, CODE_V1)
        context = f"{fake_host.app_dir}/deployment"
        with pytest.raises(HostStepFailed) as build:
            helper.call("run", step="image", argv=cmd.image_build(
                REF, f"{context}/Dockerfile.nightguard", context, "python", False))
        with pytest.raises(HostStepFailed) as unexpected:
            helper.call("write_file", key="no-such-path", text="x")
        with pytest.raises(HostStepFailed) as unknown:
            helper.call("format_disk")
        assert helper.call("run", argv=["podman", "version"], check=False)["exit"] == 0
        helper.call("finish", audit={"outcome": "failed"})
    assert str(build.value) == "step 'image' failed: `podman build --format ...` exited 125"
    assert build.value.tail == ["Error: creating build container: no space left on device"]
    assert str(unexpected.value) == "step 'write_file' failed: KeyError: 'no-such-path'"
    assert str(unknown.value) == "step 'format_disk' failed: op 'format_disk' not allowed"
    assert fake_host.audit()[-1]["steps"] == ["sync", "image (failed)", "write_file (failed)",
                                              "run"]


# -- the link: a helper that does not start, or goes away --------------------------------------
def test_a_helper_that_dies_at_start_is_one_line(fake_host):
    from tasks.ssh.hostlink import HostLink, local_pipe

    link = HostLink(local_pipe(fake_host.env()))
    args = fake_host.args()
    del args["unit"]  # the helper cannot work out its paths
    with pytest.raises(StepFailed) as failed:
        link.hello(args, step="connect", timeout=20)
    assert str(failed.value) == "step 'connect' failed: the host helper ended: KeyError: 'unit'"
    link.close()


def test_a_helper_killed_mid_session_is_a_lost_connection(fake_host):
    with fake_host.helper() as helper:
        helper.pipe.proc.kill()
        with pytest.raises(StepFailed, match=r"^step 'dirs' failed: connection to the host "
                                             r"lost \(the host helper ended: no output\)$"):
            helper.call("dirs")


# -- the bootstrap ---------------------------------------------------------------------------------
def test_the_host_gets_the_helper_once_and_keeps_it(fake_host):
    kept = fake_host.paths["state"] / "helper" / f"{helper_source()[1]}.py"
    with fake_host.helper(helper_path=str(kept), keep_helper=True) as first:
        assert first.hello["lock"]["acquired"]
        first_bytes = first.link.bytes_sent
    assert kept.read_bytes() == helper_program()
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    with fake_host.helper(helper_path=str(kept), keep_helper=True) as second:
        assert second.hello["lock"]["acquired"]
        assert second.link.bytes_sent < len(helper_source()[0]) < first_bytes



def test_the_host_keeps_the_helpers_compiled_code_and_runs_it_next_time(fake_host):
    """Compiling the 3,400-line helper costs ~40 ms natively and ~0.5 s under TCG, on every
    task: the kept code object (marshal, keyed by the helper's version and the host's
    Python) is run instead, while the source is still checked against its version."""
    version = helper_source()[1]
    kept = fake_host.paths["state"] / "helper" / f"{version}.py"
    code = kept.with_suffix(".code")
    key = f"{version} {sys.version}\n".encode()
    with fake_host.helper(helper_path=str(kept), keep_helper=True) as first:
        assert first.hello["lock"]["acquired"]
    assert code.read_bytes().startswith(key)
    assert stat.S_IMODE(code.stat().st_mode) == 0o600
    assert marshal.loads(code.read_bytes()[len(key):]).co_filename == str(kept)
    marked = compile(b"import sys; sys.stderr.write('ran the kept code\\n')\n"
                     + helper_program(), str(kept), "exec")
    code.write_bytes(key + marshal.dumps(marked))
    with fake_host.helper(helper_path=str(kept), keep_helper=True) as second:
        assert second.hello["lock"]["acquired"]
        assert "ran the kept code\n" in second.pipe.stderr
    assert code.read_bytes() == key + marshal.dumps(marked)  # used, not rewritten


@pytest.mark.parametrize("kept_code", [b"garbage", "other-version", "other-python", "cut"])
def test_kept_code_of_another_version_or_python_or_broken_is_compiled_afresh(fake_host,
                                                                           kept_code):
    version = helper_source()[1]
    kept = fake_host.paths["state"] / "helper" / f"{version}.py"
    code = kept.with_suffix(".code")
    marked = marshal.dumps(compile(b"import sys; sys.stderr.write('ran the kept code\\n')\n"
                                   + helper_program(), str(kept), "exec"))
    key = f"{version} {sys.version}\n".encode()
    blob = {"other-version": f"0123456789abcdef {sys.version}\n".encode() + marked,
            "other-python": f"{version} 3.0.0 (elsewhere)\n".encode() + marked,
            "cut": key + marked[: len(marked) // 2]}.get(kept_code, kept_code)
    with fake_host.helper(helper_path=str(kept), keep_helper=True):
        pass  # the helper is kept
    code.write_bytes(blob)
    with fake_host.helper(helper_path=str(kept), keep_helper=True) as again:
        assert again.hello["lock"]["acquired"]
        assert "ran the kept code\n" not in again.pipe.stderr
    assert code.read_bytes().startswith(key) and code.read_bytes() != key + marked


def test_a_read_only_session_does_not_write_kept_code(fake_host):
    kept = fake_host.paths["state"] / "helper" / f"{helper_source()[1]}.py"
    with fake_host.helper(helper_path=str(kept), keep_helper=True):
        pass
    kept.with_suffix(".code").unlink()
    with fake_host.helper("read", helper_path=str(kept), keep_helper=False) as reader:
        assert reader.hello
    assert not kept.with_suffix(".code").exists()
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name]

def test_the_gate_reads_a_rejected_token_only_from_the_agents_own_regular_file(tmp_path):
    from tasks.hostside.ops_unit import token_rejected

    outside = tmp_path / "host-file"
    outside.write_text('{"token":"rejected"}\n')
    beat = tmp_path / "7" / "root" / "tmp" / "nightguard" / "heartbeat"
    beat.parent.mkdir(parents=True)
    where = {"proc": str(tmp_path)}, {"pid": 7}
    beat.write_text('{"token":"rejected"}\n')
    assert token_rejected(*where)  # the positive case, so the refusals below mean something
    beat.write_text('{"polled_at":1.0,"poll_timeout":10}\n')
    assert not token_rejected(*where)
    beat.unlink()
    beat.symlink_to(outside)  # a link the agent planted is not followed
    assert not token_rejected(*where)
    beat.unlink()
    os.mkfifo(beat)  # nor can a FIFO with no writer hold the gate
    started = time.monotonic()
    assert not token_rejected(*where)
    assert time.monotonic() - started < 5
    beat.unlink()
    beat.parent.rmdir()
    beat.parent.symlink_to(outside.parent)  # nor a linked directory on the way
    (outside.parent / "heartbeat").write_text('{"token":"rejected"}\n')
    assert not token_rejected(*where)


def test_gate_takes_the_units_own_check_at_start_instead_of_running_another(fake_host):
    with fake_host.helper() as helper:
        bring_up(helper, fake_host)
        # the unit's ExecStartPost check, once the agent said READY
        helper.call("run", step="check", argv=["podman", "healthcheck", "run", CONTAINER])
        checks = len([a for a in fake_host.calls("podman") if a[0] == "healthcheck"])
        answer = helper.call("gate", deadline=10)
        assert answer["healthy"] is True
        assert len([a for a in fake_host.calls("podman") if a[0] == "healthcheck"]) == checks
        # a restart in place after that check: the gate checks the new process itself
        answer = helper.call("gate", deadline=10, since=time.time() + 1)
    assert answer["healthy"] is True
    assert len([a for a in fake_host.calls("podman") if a[0] == "healthcheck"]) == checks + 1


def test_after_a_restart_in_place_the_gate_waits_for_the_new_agents_own_beat(fake_host):
    with fake_host.helper() as helper:
        bring_up(helper, fake_host)
        checks = len([a for a in fake_host.calls("podman") if a[0] == "healthcheck"])
        at = helper.call("reload", step="reload")["at"]  # SIGHUP: a new child, then its beat
        answer = helper.call("gate", deadline=10, since=at)
    assert answer["healthy"] is True, answer
    assert answer["checked"] == "the restarted agent's first heartbeat"
    assert len([a for a in fake_host.calls("podman") if a[0] == "healthcheck"]) == checks


def test_a_beat_older_than_the_new_agent_is_not_its_beat(tmp_path):
    from tasks.hostside.ops_unit import agent_started, new_agent_beat

    proc, pid1, child = tmp_path / "proc", 7, 4000001
    beat = proc / str(pid1) / "root/tmp/nightguard/heartbeat"
    beat.parent.mkdir(parents=True)
    (proc / str(pid1) / "task" / str(pid1)).mkdir(parents=True)
    paths, container = {"proc": str(proc)}, {"pid": pid1}
    assert agent_started(paths, pid1) is None  # no children file: /proc cannot tell
    assert not new_agent_beat(paths, container, 0, time.monotonic() + 5, threading.Event())
    ticks = int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))
    (proc / str(child)).mkdir()
    (proc / str(child) / "stat").write_text(f"{child} (a (b) c) S 1 " + "0 " * 17 +
                                            f"{ticks} 0\n")  # a command name with ")" in it
    (proc / str(pid1) / "task" / str(pid1) / "children").write_text(f"{child} ")
    started = agent_started(paths, pid1)
    assert abs(started - time.time()) < 0.5
    beat.write_text("1")
    os.utime(beat, (started - 1, started - 1))  # the old process's last beat
    until = time.monotonic() + 0.5
    assert not new_agent_beat(paths, container, started - 2, until, threading.Event())
    assert time.monotonic() >= until  # it waited for a newer one to its bound
    os.utime(beat, (started + 1, started + 1))
    assert new_agent_beat(paths, container, started - 2, time.monotonic() + 5,
                          threading.Event())
    # a child older than the restart is not the restarted agent
    assert not new_agent_beat(paths, container, started + 60, time.monotonic() + 0.3,
                              threading.Event())


def test_podmans_times_are_read_with_nanoseconds_and_offsets():
    from tasks.hostside.podman_store import iso_epoch, passed_at

    assert iso_epoch("1970-01-01T00:00:10.5Z") == 10.5
    assert iso_epoch("1970-01-01T01:00:10.123456789+01:00") == pytest.approx(10.123456789)
    assert iso_epoch("yesterday") is None and iso_epoch(None) is None
    log = {"Log": [{"Start": "1970-01-01T00:00:10Z", "ExitCode": 1},
                   {"Start": "1970-01-01T00:00:20Z", "ExitCode": 0}]}
    assert passed_at(log) == 20.0
    assert passed_at({"Log": log["Log"][:1]}) is None and passed_at(None) is None
