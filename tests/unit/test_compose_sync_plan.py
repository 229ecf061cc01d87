"""The compose check, the code sync manifest and delta, and planning from recorded facts."""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from tasks.config import load_settings
from tasks.deploy.compose import check_compose, health_command, load_compose
from tasks.deploy.plan import (
    IMAGE_INPUTS,
    desired_state,
    host_needs,
    make_plan,
    rotated_release,
    secret_digest,
    secrets_label,
)
from tasks.deploy.sync import (
    NEVER,
    Delta,
    SyncRules,
    compute_delta,
    delta_tarball,
    file_entry,
    is_excluded,
    local_manifest,
    rules_for,
    tree_hash,
)
from tasks.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
COMPOSE = ROOT / "deployment" / "podman-compose.nightguard.yml"
TOKEN = "123456:tg-token-value"
GEMINI = "AIzaSy-gemini-value"


# -- compose ----------------------------------------------------------------------------------
@pytest.fixture
def compose_settings(tmp_path):
    return load_settings(root=tmp_path, environ={}, overrides={"compose_file": str(COMPOSE)})


@pytest.fixture
def shipped():
    return load_compose(COMPOSE)


def compose_error(settings, document) -> str:
    with pytest.raises(ConfigError) as info:
        check_compose(settings, document)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("podman-compose.nightguard.yml: ")
    return message


def test_shipped_compose_file_matches_the_defaults(compose_settings):
    check_compose(compose_settings)  # reads the file itself


def test_health_command_of_the_shipped_file(shipped):
    assert health_command(shipped) == "python3 /app/execution/system/health_check.py"
    doc = copy.deepcopy(shipped)
    doc["services"]["nightguard"]["healthcheck"]["test"] = ["CMD-SHELL", "exit 0"]
    assert health_command(doc) == "exit 0"
    doc["services"]["nightguard"]["healthcheck"]["test"] = "true"
    assert health_command(doc) == "true"


def _service(document):
    return document["services"]["nightguard"]


def test_memswap_limit_differs(compose_settings, shipped):
    _service(shipped)["memswap_limit"] = "1400m"
    message = compose_error(compose_settings, shipped)
    assert "services.nightguard.memswap_limit: 1400m differs from " \
           "nightguard.limits.memory_swap 2700m (defaults)" in message


def test_equal_sizes_in_other_units_pass(compose_settings, shipped):
    _service(shipped)["memswap_limit"] = str(2700 * 1024**2)
    check_compose(compose_settings, shipped)


def test_setting_from_the_environment_is_named(tmp_path, shipped):
    settings = load_settings(root=tmp_path, environ={"NIGHTGUARD_LIMITS_MEMORY": "650m"},
                             overrides={"compose_file": str(COMPOSE)})
    message = compose_error(settings, shipped)
    assert "mem_limit: 700m differs from nightguard.limits.memory 650m" in message
    assert "(environment (NIGHTGUARD_LIMITS_MEMORY))" in message


@pytest.mark.parametrize("key", ["memswap_limit", "mem_limit", "restart", "healthcheck",
                                 "secrets", "volumes"])
def test_missing_key(compose_settings, shipped, key):
    del _service(shipped)[key]
    assert compose_error(compose_settings, shipped).endswith(f"services.nightguard.{key}: "
                                                             "is missing")


def test_restart_unless_stopped(compose_settings, shipped):
    _service(shipped)["restart"] = "unless-stopped"
    message = compose_error(compose_settings, shipped)
    assert "services.nightguard.restart: 'unless-stopped': use 'always'" in message


def test_code_volume_that_the_agent_could_write(compose_settings, shipped):
    _service(shipped)["volumes"] = ["/home/ubuntu/97layerOS:/app:Z",
                                    "/home/ubuntu/97layerOS-data:/data:Z,U"]
    message = compose_error(compose_settings, shipped)
    assert "services.nightguard.volumes: expected '/home/ubuntu/97layerOS:/app:ro,Z'" in message


def test_secret_not_external(compose_settings, shipped):
    shipped["secrets"]["gemini_api_key"] = {"file": "../.env"}
    message = compose_error(compose_settings, shipped)
    assert message.startswith("podman-compose.nightguard.yml: secrets.gemini_api_key: "
                              "must be external: true")


def test_secret_list_differs(compose_settings, shipped):
    _service(shipped)["secrets"] = ["telegram_bot_token"]
    message = compose_error(compose_settings, shipped)
    assert "services.nightguard.secrets:" in message


def test_long_form_secrets_are_understood(compose_settings, shipped):
    _service(shipped)["secrets"] = [{"source": "telegram_bot_token"}, "gemini_api_key"]
    check_compose(compose_settings, shipped)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("interval", "60s", "healthcheck.interval: 60s differs from nightguard.health.interval 10m"),
    ("interval", "30", "healthcheck.interval: '30' is not a duration"),
    ("timeout", "5s", "healthcheck.timeout: 5s differs from nightguard.health.timeout 10s"),
    ("start_period", "2m",
     "healthcheck.start_period: 2m differs from nightguard.health.start_period 60s"),
    ("retries", 5, "healthcheck.retries: 5 differs from nightguard.health.retries 2"),
])
def test_healthcheck_differs(compose_settings, shipped, key, value, expected):
    _service(shipped)["healthcheck"][key] = value
    assert expected in compose_error(compose_settings, shipped)


def test_healthcheck_interval_in_minutes_is_equal(compose_settings, shipped):
    _service(shipped)["healthcheck"]["start_period"] = "1m"
    check_compose(compose_settings, shipped)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("cpus", 2, "cpus: 2 differs from nightguard.limits.cpus 1.0"),
    ("cpus", "many", "cpus: 'many' is not a number"),
    ("container_name", "other", "container_name: 'other' differs"),
    ("mem_reservation", "lots", "mem_reservation: 'lots' is not a size"),
])
def test_other_differences(compose_settings, shipped, key, value, expected):
    _service(shipped)[key] = value
    assert expected in compose_error(compose_settings, shipped)


def test_bad_healthcheck_retries_is_one_line(compose_settings, shipped):
    _service(shipped)["healthcheck"]["retries"] = "three"
    assert compose_error(compose_settings, shipped).endswith(
        "services.nightguard.healthcheck.retries: 'three' is not a number")


def test_load_compose_errors(tmp_path):
    with pytest.raises(ConfigError, match="^missing.yml: not found$"):
        load_compose(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("services: [\n")
    with pytest.raises(ConfigError, match="^bad.yml: is not valid YAML$"):
        load_compose(bad)
    other = tmp_path / "other.yml"
    other.write_text("services:\n  web:\n    image: x\n")
    with pytest.raises(ConfigError, match="^other.yml: services.nightguard is missing$"):
        load_compose(other)


# -- sync: what travels ------------------------------------------------------------------------
@pytest.mark.parametrize(("rel", "excluded"), [
    (".env", True),
    (".env.local", True),
    (".env.production", True),
    ("deployment/.env", True),
    (".env.example", False),
    ("deployment/.env.example", False),
    (".git", True),
    (".git/config", True),
    ("pkg/__pycache__/mod.cpython-311.pyc", True),
    ("pkg/mod.pyc", True),
    (".venv/bin/python", True),
    (".sandbox/disk.qcow2", True),
    (".ssh/known_hosts", True),
    ("knowledge/.netrc", True),
    ("deployment/key.pem", True),
    ("execution/system/night_guard.py", False),
    ("environment.md", False),
    ("docs/env.txt", False),
])
def test_never_synced(rel, excluded):
    assert is_excluded(rel, NEVER) is excluded


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


SOURCE_FILES = {
    "execution/system/night_guard.py": "print('guard')\n",
    "execution/system/health_check.py": "print('ok')\n",
    "directives/README.md": "# agent\n",
    "knowledge/README.md": "# notes\n",
}
ROOTS = SyncRules(roots=("execution", "directives", "knowledge", "deployment"))


def entry(text: str, mode: int = 0o644) -> str:
    return file_entry(text.encode(), mode)


def test_only_the_declared_folders_travel(tmp_path):
    make_tree(tmp_path, {
        **SOURCE_FILES,
        ".env": "TELEGRAM_BOT_TOKEN=secret\n",
        "prod.env": "TELEGRAM_BOT_TOKEN=secret\n",
        "secrets.env": "X=1\n",
        "tasks/deploy.py": "laptop only\n",
        "service-account.json": "{}\n",
        "execution/__pycache__/x.cpython-311.pyc": "bytecode",
        ".git/HEAD": "ref: refs/heads/main\n",
    })
    for path in tmp_path.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
    os.symlink(tmp_path / "prod.env", tmp_path / "knowledge" / "link.md")
    manifest = local_manifest(tmp_path, ROOTS)
    assert sorted(manifest) == sorted(SOURCE_FILES)
    assert manifest["directives/README.md"] == entry("# agent\n")


def test_exclude_globs_and_the_env_file_under_any_name(tmp_path):
    make_tree(tmp_path, {**SOURCE_FILES, "knowledge/logs/today.log": "noise\n",
                         "knowledge/local.cfg": "A=1\n"})
    rules = SyncRules(roots=ROOTS.roots, exclude=("*.log",),
                      never_paths=((tmp_path / "knowledge/local.cfg").resolve(),))
    manifest = local_manifest(tmp_path, rules)
    assert "knowledge/logs/today.log" not in manifest
    assert "knowledge/local.cfg" not in manifest  # the configured env_file, renamed


@pytest.mark.parametrize(("name", "content", "why"), [
    ("knowledge/key.txt", "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n", "private key"),
    ("knowledge/tls.txt", "-----BEGIN RSA PRIVATE KEY-----\nabc\n", "private key"),
    ("knowledge/sa.json", '{"type": "service_account", "private_key": "x"}', "credentials"),
    ("knowledge/_netrc", "machine a login b password c\n", ".netrc"),
    ("knowledge/notes.md", f"token is {TOKEN}\n", "value from .env"),
])
def test_a_file_that_looks_like_a_credential_stops_the_sync(tmp_path, name, content, why):
    make_tree(tmp_path, {**SOURCE_FILES, name: content})
    rules = SyncRules(roots=ROOTS.roots, values=(TOKEN.encode(),))
    with pytest.raises(ConfigError) as info:
        local_manifest(tmp_path, rules)
    message = str(info.value)
    assert message.startswith(name) and why in message
    assert "nightguard.sync.exclude" in message and "nightguard.sync.allow" in message
    assert TOKEN not in message and "\n" not in message
    allowed = SyncRules(roots=ROOTS.roots, values=(TOKEN.encode(),), allow=(name,))
    assert name in local_manifest(tmp_path, allowed)


def test_modes_are_part_of_the_manifest(tmp_path):
    make_tree(tmp_path, SOURCE_FILES)
    path = tmp_path / "execution/system/night_guard.py"
    path.chmod(0o600)
    private = local_manifest(tmp_path, ROOTS)["execution/system/night_guard.py"]
    path.chmod(0o755)
    assert local_manifest(tmp_path, ROOTS)["execution/system/night_guard.py"] != private
    assert private.endswith(":600")


def test_rules_from_settings_never_send_env_or_credentials(tmp_path):
    (tmp_path / "creds.json").write_text("{}")
    settings = load_settings(root=tmp_path, environ={}, overrides={
        "env_file": "config/my.env", "gcp.credentials_file": "creds.json",
        "sync.exclude": "*.tmp", "sync.allow": "knowledge/sample.pem"})
    rules = rules_for(settings, {"telegram_bot_token": TOKEN})
    assert rules.roots == ("execution", "directives", "knowledge", "deployment")
    assert (tmp_path / "config/my.env").resolve() in rules.never_paths
    assert (tmp_path / "creds.json").resolve() in rules.never_paths
    assert rules.exclude == ("*.tmp",) and rules.allow == ("knowledge/sample.pem",)
    assert rules.values == (TOKEN.encode(),)


def test_tree_hash_depends_on_names_and_contents():
    base = {"a": "1" * 64, "b": "2" * 64}
    assert tree_hash(base) == tree_hash(dict(reversed(list(base.items()))))
    assert tree_hash(base) != tree_hash({"a": "1" * 64, "b": "3" * 64})
    assert tree_hash(base) != tree_hash({"a": "1" * 64, "c": "2" * 64})
    assert len(tree_hash(base)) == 12


def test_compute_delta():
    local = {"same.py": "1", "changed.py": "2", "new.py": "3"}
    remote = {"same.py": "1", "changed.py": "old", "gone.py": "4", "agent_made.db": "5",
              "agent_note.txt": "6"}
    synced = ["same.py", "changed.py", "gone.py", "gone_already.py"]
    delta = compute_delta(local, remote, synced)
    assert delta.changed == ("changed.py", "new.py")
    assert delta.deleted == ("gone.py",)  # files we never synced and already-gone ones stay out
    assert delta.describe() == "2 file(s) to send, 1 to remove"
    assert delta


def test_compute_delta_in_sync_is_falsy():
    files = {"a.py": "1", "b.py": "2"}
    delta = compute_delta(files, dict(files, extra="9"), list(files))
    assert delta == Delta((), ())
    assert not delta


def test_delta_tarball_round_trip(tmp_path):
    make_tree(tmp_path, SOURCE_FILES)
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "execution/system/night_guard.py").chmod(0o755)
    files = ("blob.bin", "execution/system/night_guard.py", "directives/README.md")
    data = delta_tarball(tmp_path, files)
    assert data[:2] == b"\x1f\x8b"  # gzip
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == list(files)
        for member in members:
            assert member.uid == 0 and member.gid == 0 and member.uname == ""
            assert tar.extractfile(member).read() == (tmp_path / member.name).read_bytes()
        assert members[1].mode & 0o777 == 0o755


# -- plan from recorded facts ----------------------------------------------------------------
@pytest.fixture
def project(tmp_path):
    """A project root with the deployment files, and a separate source tree to sync."""
    root = tmp_path / "project"
    source = make_tree(tmp_path / "source", SOURCE_FILES)
    for rel in (*IMAGE_INPUTS, "deployment/podman-compose.nightguard.yml"):
        for base in (root, source):
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, base / rel)
    return root, source


def plan_settings(root: Path, source: Path, **overrides):
    flags = {"target": "ssh", "ssh.host": "203.0.113.7", "source_dir": str(source), **overrides}
    return load_settings(root=root, environ={}, overrides=flags)


def load_fixture(name: str) -> dict:
    facts = json.loads((FIXTURES / name).read_text())
    facts.pop("_comment", None)
    return facts


def digests_for(salt: str, token: str = TOKEN, gemini: str = GEMINI) -> dict[str, str]:
    return {"telegram_bot_token": secret_digest(salt, token),
            "gemini_api_key": secret_digest(salt, gemini)}


BASE_ID = "5b2e0f6a" * 8  # the base image's id on the recorded host (as images.json has it)


def desired_for(settings, digests, podman="4.3.1", base_id=BASE_ID):
    return desired_state(settings, digests, podman=podman, base_id=base_id)


def deployed_facts(desired, digests) -> dict:
    """The recorded deployed host, with the tree-dependent fields taken from desired_state."""
    facts = load_fixture("deployed_host.json")
    facts["manifest"] = dict(desired.manifest, **{"data/agent_state.db": "f" * 64})
    facts["synced"] = sorted(desired.manifest)
    facts["image_tags"] = sorted({*facts["image_tags"], desired.image_tag})
    facts["base_image"] = {"name": "docker.io/library/python:3.11-slim", "id": BASE_ID,
                           "digest": "sha256:" + "9" * 64,
                           "created": "2026-11-20T04:11:02.123456789Z"}
    facts["unit_text"] = desired.unit_text
    facts["markers_text"] = desired.markers_text
    facts["secret_hashes"] = dict(digests)
    facts["container"]["markers"] = dict(desired.markers)
    facts["container"]["image"] = desired.image_ref
    facts["state"] = {"history": [desired.release("2026-11-29T00:00:00Z")],
                      "verified": desired.version}
    return facts


@pytest.fixture
def deployed(project):
    root, source = project
    settings = plan_settings(root, source)
    salt = load_fixture("deployed_host.json")["secret_salt"]
    digests = digests_for(salt)
    desired = desired_for(settings, digests)
    return settings, desired, digests, deployed_facts(desired, digests), source


def test_recorded_fixture_is_a_real_podman_host():
    facts = load_fixture("deployed_host.json")
    assert facts["podman"] == "4.3.1" and facts["container"]["source"] == "files"
    assert set(facts["container"]["markers"]) == {
        "NG_RELEASE_CODE", "NG_RELEASE_IMAGE", "NG_RELEASE_SECRETS", "NG_RELEASE_SPEC",
        "NG_RELEASE_VERSION"}
    assert {m["destination"] for m in facts["container"]["mounts"]} >= {"/app", "/data"}


def test_desired_state_reads_the_project_files(project):
    root, source = project
    settings = plan_settings(root, source)
    desired = desired_for(settings, {})
    assert sorted(desired.manifest) == sorted([*SOURCE_FILES, *IMAGE_INPUTS,
                                               "deployment/podman-compose.nightguard.yml"])
    assert desired.code_hash == tree_hash(desired.manifest)
    assert desired.image_ref == f"localhost/nightguard:{desired.image_tag}"
    assert desired.markers["NG_RELEASE_CODE"] == desired.code_hash
    assert desired.markers["NG_RELEASE_SECRETS"] == secrets_label({})
    assert desired.markers_text.startswith("NG_RELEASE_CODE=")
    assert desired.spec.memory_swap == "2700m"
    assert "--memory-swap 2700m" in desired.unit_text
    assert "--network slirp4netns" in desired.unit_text
    # Podman 5 allows pasta only rootless: rootful stays on slirp4netns until Podman 6
    assert "--network slirp4netns" in desired_for(settings, {}, podman="5.4.2").unit_text
    assert "--network bridge" in desired_for(settings, {}, podman="6.0.0").unit_text


def test_fresh_host_plans_every_step(project):
    root, source = project
    settings = plan_settings(root, source)
    digests = digests_for("00" * 32)
    desired = desired_for(settings, digests, base_id=None)  # no base on the host yet
    plan = make_plan(settings, desired, load_fixture("fresh_host.json"), digests)
    assert plan.base == "pull" and not plan.refresh
    assert "base: pull docker.io/library/python:3.11-slim (not on the host)" in \
        plan.lines(settings)
    assert plan.swap
    assert not plan.remove_env_file and not plan.install
    assert sorted(plan.delta.changed) == sorted(desired.manifest)
    assert plan.delta.deleted == ()
    assert plan.secrets == ["telegram_bot_token", "gemini_api_key"]
    assert plan.build_image and plan.write_unit and plan.write_markers and plan.restart
    assert "container is not running" in plan.reasons
    assert len(plan.lines()) == 7
    assert plan


def test_up_to_date_host_plans_nothing(deployed):
    settings, desired, digests, facts, _ = deployed
    plan = make_plan(settings, desired, facts, digests)
    assert not plan, plan.lines()
    assert plan.lines() == []
    assert plan.reasons == []


def test_unverified_release_gets_a_health_gate(deployed):
    settings, desired, digests, facts, _ = deployed
    facts["state"]["verified"] = "0" * 12  # the last deploy was cut during its gate
    plan = make_plan(settings, desired, facts, digests)
    assert plan.gate and not plan.restart
    assert plan.lines() == ["health: the last deploy did not finish its health gate; check it"]


def test_one_changed_file_is_a_delta_of_one_and_a_restart_in_place(deployed):
    settings, _, digests, facts, source = deployed
    (source / "execution/system/night_guard.py").write_text("print('guard v2')\n")
    desired = desired_for(settings, digests)
    plan = make_plan(settings, desired, facts, digests)
    assert plan.delta.changed == ("execution/system/night_guard.py",)
    assert plan.delta.deleted == ()
    assert plan.reload and plan.gate and plan.write_markers and not plan.restart
    assert plan.reasons == ["code changed"]
    assert plan.lines()[-1] == "agent: restart in its container (code only) and wait until " \
        "healthy"
    assert not plan.write_unit  # the code hash travels in the markers file, not the unit
    assert not (plan.swap or plan.secrets or plan.build_image or plan.remove_env_file)


def test_a_container_started_before_the_markers_changed_is_restarted(deployed):
    settings, desired, digests, facts, _ = deployed
    facts["container"]["markers"]["NG_RELEASE_CODE"] = "0" * 12  # cut after the markers
    plan = make_plan(settings, desired, facts, digests)
    assert plan.reload and not plan.write_markers and plan.reasons == ["code changed"]
    facts["container"]["running"] = False
    plan = make_plan(settings, desired, facts, digests)
    assert plan.restart and not plan.reload  # nothing to restart in place


def test_a_file_removed_locally_is_removed_on_the_host_but_agent_files_stay(deployed):
    settings, _, digests, facts, source = deployed
    (source / "directives/README.md").unlink()
    plan = make_plan(settings, desired_for(settings, digests), facts, digests)
    assert plan.delta.deleted == ("directives/README.md",)
    assert plan.delta.changed == ()
    assert "data/agent_state.db" not in plan.delta.deleted


def test_links_found_in_the_app_dir_are_removed(deployed):
    settings, desired, digests, facts, _ = deployed
    facts["links"] = ["knowledge/README.md"]
    plan = make_plan(settings, desired, facts, digests)
    assert plan.links == ["knowledge/README.md"]
    assert "sync: remove 1 symbolic link(s) from the app dir" in plan.lines()


def test_rotated_secret_updates_it_and_restarts(deployed):
    settings, _, digests, facts, _ = deployed
    rotated = dict(digests, gemini_api_key=secret_digest(facts["secret_salt"], "rotated"))
    plan = make_plan(settings, desired_for(settings, rotated), facts, rotated)
    assert plan.secrets == ["gemini_api_key"]
    assert plan.restart and "secret values changed" in plan.reasons
    assert not plan.delta and not plan.build_image and not plan.write_unit


def test_secret_removed_on_the_host_is_recreated(deployed):
    settings, desired, digests, facts, _ = deployed
    del facts["secrets"]["telegram_bot_token"]
    plan = make_plan(settings, desired, facts, digests)
    assert plan.secrets == ["telegram_bot_token"]


def test_podman_compose_drift(deployed):
    settings, desired, digests, _, _ = deployed
    facts = load_fixture("podman_compose_host.json")
    plan = make_plan(settings, desired, facts, digests)
    assert plan.write_unit and plan.remove_env_file and plan.restart and plan.build_image
    assert "container spec changed" in plan.reasons
    assert "container is not running" not in plan.reasons
    assert not plan.swap
    assert "host: remove the plain-text .env from the app dir" in plan.lines()


def test_missing_unit_is_written(deployed):
    settings, desired, digests, facts, _ = deployed
    facts["unit_text"] = None
    facts["unit_enabled"] = False
    plan = make_plan(settings, desired, facts, digests)
    assert plan.write_unit and plan.restart
    assert plan.lines() == ["unit: write the systemd unit and enable it",
                            "container: (re)start and wait until healthy"]


def test_disabled_unit_is_enabled(deployed):
    settings, desired, digests, facts, _ = deployed
    facts["unit_enabled"] = False
    assert make_plan(settings, desired, facts, digests).write_unit


def test_stopped_container_is_restarted(deployed):
    settings, desired, digests, facts, _ = deployed
    facts["container"]["running"] = False
    plan = make_plan(settings, desired, facts, digests)
    assert plan.restart and plan.reasons == ["container is not running"]


def test_changed_limit_rewrites_the_unit(project, deployed):
    root, source = project
    _, _, digests, facts, _ = deployed
    settings = plan_settings(root, source, **{"limits.memory_reservation": "400m"})
    plan = make_plan(settings, desired_for(settings, digests), facts, digests)
    assert plan.write_unit and plan.restart
    assert "container spec changed" in plan.reasons
    assert not plan.build_image and not plan.delta


def test_changed_base_image_rebuilds(project, deployed):
    root, source = project
    _, _, digests, facts, _ = deployed
    settings = plan_settings(root, source, base_image="docker.io/library/python:3.12-slim")
    plan = make_plan(settings, desired_for(settings, digests), facts, digests)
    assert plan.build_image
    assert "image changed" in plan.reasons


@pytest.mark.parametrize(("key", "value"), [
    ("swapfile_mode", "0o644"),
    ("swappiness", 60),
    ("swappiness_persisted", None),
    ("swappiness_persisted", "vm.swappiness=60"),
    ("swap_in_fstab", False),
    ("swapfile_size", 1024**3),
    ("swaps", []),
])
def test_swap_drift(deployed, key, value):
    settings, desired, digests, facts, _ = deployed
    facts[key] = value
    plan = make_plan(settings, desired, facts, digests)
    assert plan.swap
    assert not plan.restart


def test_secret_digest_is_keyed():
    assert secret_digest("00" * 32, "v") == secret_digest("00" * 32, "v")
    assert secret_digest("00" * 32, "v") != secret_digest("01" * 32, "v")
    assert GEMINI not in secret_digest("00" * 32, GEMINI)


def test_rotated_release_keeps_code_image_and_unit(deployed):
    settings, desired, digests, facts, _ = deployed
    release = facts["state"]["history"][0]
    new = dict(digests, gemini_api_key=secret_digest(facts["secret_salt"], "rotated"))
    rotated = rotated_release(release, new, "later")
    assert rotated["unit_text"] == release["unit_text"]
    assert rotated["version"] != release["version"]
    assert rotated["secrets"] == new
    again = desired_for(settings, new)
    assert rotated["version"] == again.version  # the same as a deploy of those values
    assert rotated["markers_text"] == again.markers_text


# -- what the host lacks --------------------------------------------------------------------
def bare(facts: dict, *missing: str, **changes) -> dict:
    facts = copy.deepcopy(facts)
    for tool in missing:
        facts["tools"][tool] = None
    if "podman" in missing:
        facts["podman"] = None
    facts.update(changes)
    return facts


def test_a_host_without_podman_gets_it_installed(deployed):
    settings, desired, digests, facts, _ = deployed
    needs = host_needs(settings, bare(facts, "podman", "slirp4netns"))
    assert needs.install == ["podman", "slirp4netns"] and needs.problems == []
    plan = make_plan(settings, desired, bare(facts, "podman"), digests)
    assert plan.lines()[0] == "host: install podman (apt-get)"


def test_trixie_gets_nftables_and_the_user_mode_network_of_its_mode(project, deployed):
    root, source = project
    settings, _, _, facts, _ = deployed
    trixie = bare(facts, "podman", "iptables", "slirp4netns", "pasta", "newuidmap",
                  os={"id": "debian", "version_id": "13", "like": [], "name": "Debian 13"})
    assert host_needs(settings, trixie).install == ["podman", "nftables", "slirp4netns"]
    rootless = plan_settings(root, source, rootless=True)
    assert host_needs(rootless, trixie).problems[0].endswith(
        "run `sudo apt-get install podman nftables passt uidmap` on the host once")


@pytest.mark.parametrize(("changes", "expected"), [
    ({"os": {"id": "fedora", "version_id": "40", "like": [], "name": "Fedora 40"}},
     "is not Debian or Ubuntu"),
    ({"os": {"id": "ubuntu", "version_id": "22.04", "like": ["debian"],
             "name": "Ubuntu 22.04"}}, "ships 3.4.4"),
    ({"apt_reachable": {"deb.debian.org:80": False}}, "reaches no package mirror"),
])
def test_a_host_that_cannot_get_podman_is_refused_in_one_line(deployed, changes, expected):
    settings, _, _, facts, _ = deployed
    needs = host_needs(settings, bare(facts, "podman", **changes))
    assert len(needs.problems) == 1 and expected in needs.problems[0]
    assert "\n" not in needs.problems[0]


def test_old_podman_is_refused(deployed):
    settings, _, _, facts, _ = deployed
    needs = host_needs(settings, bare(facts, podman="3.4.4"))
    assert needs.problems and "older than the minimum 4.3" in needs.problems[0]


def test_rootless_installs_nothing_and_says_the_command(project, deployed):
    root, source = project
    _, _, _, facts, _ = deployed
    settings = plan_settings(root, source, rootless=True)
    needs = host_needs(settings, bare(facts, "podman", "newuidmap"))
    assert needs.problems and "sudo apt-get install podman uidmap" in needs.problems[0]


def test_no_systemd_is_a_problem(deployed):
    settings, _, _, facts, _ = deployed
    assert "systemd is not running" in host_needs(settings, bare(facts, systemd=False)).problems[0]


def test_the_image_tag_follows_the_files_that_travel(project, deployed):
    root, source = project
    settings, desired, digests, facts, _ = deployed
    with open(source / "deployment/requirements-agent.txt", "a") as handle:
        handle.write("python-telegram-bot==22.8\n")
    again = desired_for(settings, digests)
    assert again.image_tag != desired.image_tag
    plan = make_plan(settings, again, facts, digests)
    assert plan.build_image and "image changed" in plan.reasons
