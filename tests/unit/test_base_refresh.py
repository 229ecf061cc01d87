"""Base image updates: the image's tag holds the base image's id on the host, so `inv deploy
--refresh` (pull the base) rebuilds exactly when the base changed, through the same health
gate and rollback. The plan rules, then the pull path through run_deploy on the fake host
(tests/unit/hostfake: its podman stand-in's "registry" control says what a pull brings)."""

from __future__ import annotations

import pytest

from tasks.config import load_settings
from tasks.deploy.health import age_days, base_line, render, summarize
from tasks.deploy.plan import base_action, desired_state
from tasks.errors import StepFailed

PYTHON = "docker.io/library/python:3.11-slim"
NEW_ID = "7d" * 32


# -- the plan rules -----------------------------------------------------------------------------
def settings_for(**overrides):
    return load_settings(environ={}, overrides={"target": "ssh", "ssh.host": "h", **overrides})


@pytest.mark.parametrize(("overrides", "facts", "refresh", "expected"), [
    ({}, {}, False, "pull"),  # the host lacks the base: pull it before the build
    ({}, {"base_image": {"id": "a"}}, False, None),
    ({}, {"base_image": {"id": "a"}}, True, "pull"),  # --refresh
    ({}, {"image_names": [PYTHON]}, False, None),
    ({"base_image": "localhost/base:1"}, {}, False, None),  # host_needs says it is missing
    ({"base_image": "localhost/base:1", "base_image_archive": "/srv/base.tar"}, {}, False,
     "import"),
    ({"base_image": "localhost/base:1"}, {"base_image": {"id": "a"}}, True, None),  # no registry
])
def test_base_action(overrides, facts, refresh, expected):
    assert base_action(settings_for(**overrides), facts, refresh) == expected


def test_the_tag_follows_the_base_images_id_and_nothing_else_new():
    settings = settings_for()
    old = desired_state(settings, {}, {"a.py": "1" * 64}, base_id="sha256:" + "1" * 64)
    same = desired_state(settings, {}, {"a.py": "1" * 64}, base_id="sha256:" + "1" * 64)
    new = desired_state(settings, {}, {"a.py": "1" * 64}, base_id="sha256:" + "2" * 64)
    assert old.image_tag == same.image_tag and old.version == same.version
    assert new.image_tag != old.image_tag
    assert new.markers["NG_RELEASE_IMAGE"] == new.image_tag and new.version != old.version
    assert new.code_hash == old.code_hash and new.spec.memory == old.spec.memory
    without = desired_state(settings, {}, {"a.py": "1" * 64})  # kube.export: no host
    assert without.image_tag not in (old.image_tag, new.image_tag)


def test_the_base_images_age_for_inv_health():
    from datetime import UTC, datetime

    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    assert age_days("2026-11-20T04:11:02.123456789Z", now) == 9
    assert age_days("2026-10-30T12:00:00+00:00", now) == 30
    assert age_days("2026-11-29 11:00:00", now) == 0
    assert age_days("", now) is None and age_days("last tuesday", now) is None
    base = {"name": PYTHON, "id": "sha256:" + "ab" * 32, "created": "2026-11-20T04:11:02Z"}
    assert base_line(base, 9) == f"{PYTHON} {'ab' * 6}, built 2026-11-20 (9 days old)"
    assert base_line(None, None) == "not on the host"


# -- the pull path on the fake host ---------------------------------------------------------------
@pytest.fixture
def registry(deploy):
    """Settings with a registry base (not the sandbox's preloaded one)."""
    return deploy.settings(base_image=PYTHON, base_image_archive="")


def builds(host):
    return [argv for argv in host.calls("podman") if argv[0] == "build"]


def test_a_host_without_the_base_pulls_it_then_builds_from_exactly_it(deploy, host,
                                                                      registry):
    first = deploy(registry)
    out = deploy.last.text
    assert f"plan: base: pull {PYTHON} (not on the host)" in out
    podman = host.calls("podman")
    pull = podman.index(["pull", PYTHON])
    [build] = builds(host)
    assert podman.index(build) > pull and "--pull=never" in build
    assert "base image" in host.audit()[-1]["steps"]
    base = host.read("graphroot", "overlay-images", "images.json")
    base_id = next(i["id"] for i in base if PYTHON in i["names"])
    assert f"    base: {PYTHON} is {base_id[:12]}" in out
    assert deploy(registry) == {"changed": False, "version": first["version"]}
    assert ["pull", PYTHON] not in host.calls("podman")[len(podman):]  # no pull without need


def test_refresh_with_the_same_base_rebuilds_nothing(deploy, host, registry):
    first = deploy(registry)
    calls = len(host.calls("podman"))
    result = deploy(registry, refresh=True)
    out = deploy.last.text
    assert f"plan: base: pull {PYTHON} (refresh: a new one means a rebuild)" in out
    assert f"base: {PYTHON} is unchanged" in out
    assert result["version"] == first["version"]
    assert host.calls("podman")[calls] == ["pull", PYTHON]
    assert not [a for a in host.calls("podman")[calls:] if a[0] in ("build", "run")]
    assert deploy.last.ops == ["facts", "base", "finish"]
    assert host.audit()[-1]["outcome"] == "ok"
    assert host.audit()[-1]["changes"] == [f"base: pull {PYTHON} (refresh: a new one means "
                                           "a rebuild)"]


def test_refresh_with_a_new_base_rebuilds_restarts_and_gates(deploy, host, registry):
    first = deploy(registry)
    old_tag = host.state()["history"][0]["image_tag"]
    host.control("registry", {PYTHON: {"id": NEW_ID, "created": "2026-11-28T03:00:00Z"}})
    second = deploy(registry, refresh=True)
    out = deploy.last.text
    assert second["changed"] and second["version"] != first["version"]
    assert f"base: {PYTHON} is {NEW_ID[:12]} (was " in out
    assert "plan: image: build" in out and "why: image changed" in out
    assert "plan: container: (re)start and wait until healthy" in out
    assert "plan: unit: write the systemd unit and enable it" in out  # it names the image
    assert deploy.last.ops == ["facts", "base", "run", "dirs", "write_file", "install_unit",
                               "run", "gate", "finish"]
    [_, build] = builds(host)
    assert "--pull=never" in build
    history = host.state()["history"]
    assert history[0]["image_tag"] != old_tag and history[1]["image_tag"] == old_tag
    assert host.container()["env"]["NG_RELEASE_IMAGE"] == history[0]["image_tag"]
    assert ["image", "prune", "--force"] in host.calls("podman")  # the old base, once unused
    assert f"localhost/nightguard:{old_tag}" in host.image_names()  # kept for a rollback
    audit = host.audit()[-1]
    assert audit["outcome"] == "ok" and audit["version"] == second["version"]
    assert "image: build" in audit["changes"]


def test_a_new_base_that_fails_the_gate_is_rolled_back(deploy, host, registry):
    first = deploy(registry)
    good = host.state()["history"][0]["image"]
    host.control("registry", {PYTHON: {"id": NEW_ID}})
    host.control("health", {"fail_unless_image": good, "kill": True,
                            "output": "ImportError: libssl.so.3"})
    with pytest.raises(StepFailed, match=f"rolled back to {first['version']}, which is "
                                         "healthy again"):
        deploy(registry, refresh=True)
    assert "health check (exit 1): ImportError: libssl.so.3" in deploy.last.text
    assert host.audit()[-1]["outcome"] == "rolled-back"
    assert host.container()["env"]["NG_RELEASE_VERSION"] == first["version"]
    assert host.state()["verified"] == first["version"]


def test_a_refresh_dry_run_pulls_nothing(deploy, host, registry):
    deploy(registry)
    calls = len(host.calls("podman"))
    assert deploy(registry, refresh=True, dry_run=True) == {"changed": False, "dry_run": True}
    assert f"would: base {{'argv': ['podman', 'pull', '{PYTHON}']" in deploy.last.text
    assert ["pull", PYTHON] not in host.calls("podman")[calls:]


def test_a_local_base_has_nothing_to_refresh(deploy, host):
    first = deploy()  # the sandbox's localhost/ base, imported from its archive
    assert deploy(refresh=True) == {"changed": False, "version": first["version"]}
    assert "refresh: localhost/nightguard-base:latest is a local image: there is nothing " \
           "to pull" in deploy.last.text
    assert not [a for a in host.calls("podman") if a[0] == "pull"]


def test_a_failed_pull_is_one_line_and_changes_nothing_else(deploy, host, registry):
    first = deploy(registry)
    host.fail("pull", message="Error: initializing source docker://python: pinging "
                              "container registry registry-1.docker.io: i/o timeout")
    with pytest.raises(StepFailed) as failed:
        deploy(registry, refresh=True)
    assert str(failed.value) == f"step 'base image' failed: `podman pull {PYTHON}` exited 125"
    assert "| Error: initializing source docker://python: pinging" in deploy.last.text
    assert host.audit()[-1]["outcome"].startswith("failed: step 'base image' failed")
    assert host.container()["env"]["NG_RELEASE_VERSION"] == first["version"]


def test_health_shows_how_old_the_base_image_is(deploy, host, registry):
    host.control("registry", {PYTHON: {"id": NEW_ID, "created": "2026-11-01T00:00:00Z"}})
    deploy(registry)
    with host.helper(mode="read", base_image=PYTHON) as reader:
        answer = reader.call("health")
    assert answer["base_image"]["id"] == NEW_ID
    assert answer["base_image"]["created"] == "2026-11-01T00:00:00Z"
    report = summarize(registry, answer)
    assert report["base_age_days"] == age_days("2026-11-01T00:00:00Z")
    assert f"  base image  {PYTHON} {NEW_ID[:12]}, built 2026-11-01 (" in \
        render(registry, report)
