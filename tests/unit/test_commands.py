"""The argv builders, the systemd unit text and the swap script, compared in full."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.deploy import commands
from tasks.deploy.commands import ContainerSpec
from tests.unit.hermetic import tool

ROOT = Path(__file__).resolve().parents[2]
HEALTH = "python3 /app/execution/system/health_check.py"


def default_spec(**changes) -> ContainerSpec:
    spec = ContainerSpec(
        name="97layer-nightguard",
        image="localhost/nightguard:abc123def456",
        app_dir="/home/ubuntu/97layerOS",
        data_dir="/home/ubuntu/97layerOS-data",
        markers_file="/var/lib/nightguard/97layer-nightguard.release.env",
        memory="700m",
        memory_reservation="500m",
        memory_swap="2700m",
        cpus=1.0,
        network="slirp4netns",
        secrets=("telegram_bot_token", "gemini_api_key"),
        health_cmd=HEALTH,
        health_interval="30s",
        health_timeout="10s",
        health_retries=3,
        health_start_period="60s",
        environment=(("NG_HEARTBEAT_MAX_AGE", "30"),
                     ("NG_REQUIRED_SECRETS", "telegram_bot_token,gemini_api_key")),
    )
    return dataclasses.replace(spec, **changes)


def exec_start(unit: str) -> list[str]:
    lines = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1
    return shlex.split(lines[0].removeprefix("ExecStart="))


# -- podman run -------------------------------------------------------------------------------
def test_run_args_for_the_default_spec():
    spec = default_spec()
    assert commands.run_args(spec) == [
        "--name", "97layer-nightguard",
        "--memory", "700m",
        "--memory-reservation", "500m",
        "--memory-swap", "2700m",
        "--cpus", "1",
        "--network", "slirp4netns",
        "--volume", "/home/ubuntu/97layerOS:/app:ro,Z",
        "--volume", "/home/ubuntu/97layerOS-data:/data:Z,U",
        "--cap-drop", "all",
        "--security-opt", "no-new-privileges",
        "--health-cmd", HEALTH,
        "--health-interval", "30s",
        "--health-timeout", "10s",
        "--health-retries", "3",
        "--health-start-period", "60s",
        "--health-on-failure", "kill",
        "--secret", "telegram_bot_token,type=mount,mode=0400,uid=1000",
        "--secret", "gemini_api_key,type=mount,mode=0400,uid=1000",
        "--env", "NG_DATA_DIR=/data",
        "--env", "NG_HEARTBEAT_MAX_AGE=30",
        "--env", "NG_REQUIRED_SECRETS=telegram_bot_token,gemini_api_key",
        "--env-file", "/var/lib/nightguard/97layer-nightguard.release.env",
        "localhost/nightguard:abc123def456",
    ]  # fmt: skip


def test_run_args_with_command_fractional_cpus_and_no_health_action():
    spec = default_spec(cpus=0.5, command=("python3", "-m", "agent"), health_on_failure="",
                        secrets=("one",), environment=(), network="pasta")
    argv = commands.run_args(spec)
    assert argv[argv.index("--cpus") + 1] == "0.5"
    assert argv[argv.index("--network") + 1] == "pasta"
    assert "--health-on-failure" not in argv
    assert argv.count("--secret") == 1
    assert argv[-4:] == ["localhost/nightguard:abc123def456", "python3", "-m", "agent"]


def test_the_agent_gets_its_code_read_only_and_no_privileges():
    argv = commands.run_args(default_spec())
    volumes = [argv[i + 1] for i, flag in enumerate(argv) if flag == "--volume"]
    assert volumes == ["/home/ubuntu/97layerOS:/app:ro,Z", "/home/ubuntu/97layerOS-data:/data:Z,U"]
    assert argv[argv.index("--cap-drop") + 1] == "all"
    assert argv[argv.index("--security-opt") + 1] == "no-new-privileges"


def test_secrets_are_never_environment_variables():
    argv = commands.run_args(default_spec())
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--env":
            assert not value.startswith(("TELEGRAM_BOT_TOKEN", "GEMINI_API_KEY"))
        if flag == "--secret":
            assert "type=mount" in value and "type=env" not in value


# -- spec hash --------------------------------------------------------------------------------
def test_spec_hash_is_short_hex_and_deterministic():
    spec = default_spec()
    value = spec.spec_hash()
    assert len(value) == 12 and int(value, 16) >= 0
    assert default_spec().spec_hash() == value


def test_spec_hash_is_stable_across_processes():
    spec = default_spec()
    code = ("import dataclasses, json, sys; from tasks.deploy.commands import ContainerSpec; "
            "d = json.loads(sys.argv[1]); "
            "d = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) "
            "if isinstance(v, list) else v for k, v in d.items()}; "
            "print(ContainerSpec(**d).spec_hash())")
    data = json.dumps(dataclasses.asdict(spec))
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, data], cwd=ROOT, check=True,
                             capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        assert out == spec.spec_hash()


@pytest.mark.parametrize("change", [
    {"memory": "800m"},
    {"memory_swap": "3g"},
    {"memory_reservation": "400m"},
    {"cpus": 0.5},
    {"health_retries": 4},
    {"health_on_failure": "restart"},
    {"secrets": ("telegram_bot_token",)},
    {"image": "localhost/nightguard:other"},
    {"environment": (("NG_HEARTBEAT_MAX_AGE", "60"),)},
    {"network": "pasta"},
    {"data_dir": "/srv/data"},
])
def test_spec_hash_changes_with_what_the_container_runs_with(change):
    assert default_spec(**change).spec_hash() != default_spec().spec_hash()


# -- systemd unit -----------------------------------------------------------------------------
def test_systemd_unit_restarts_always_and_notifies():
    unit = commands.systemd_unit(default_spec())
    lines = unit.splitlines()
    for line in ("Restart=always", "Type=notify", "NotifyAccess=all",
                 "WantedBy=multi-user.target", "[Unit]", "[Service]", "[Install]"):
        assert line in lines
    assert unit.endswith("\n")


def test_systemd_unit_exec_start_is_the_full_podman_run():
    spec = default_spec()
    argv = exec_start(commands.systemd_unit(spec))
    assert argv[:8] == ["/usr/bin/podman", "run", "--cidfile=%t/%n.ctr-id",
                        "--cgroups=no-conmon", "--rm", "--sdnotify=conmon", "--replace",
                        "--detach"]
    assert argv[8:] == commands.run_args(spec)
    assert argv[argv.index("--memory-swap") + 1] == "2700m"
    assert argv[argv.index("--health-on-failure") + 1] == "kill"
    assert "sudo" not in argv


def test_with_a_watchdog_the_container_feeds_it_and_a_kill_leaves_nothing_behind():
    spec = default_spec(watchdog_sec=10)
    unit = commands.systemd_unit(spec)
    lines = unit.splitlines()
    assert "--sdnotify=container" in exec_start(unit)
    assert "--sdnotify=conmon" not in unit
    for line in ("WatchdogSec=10", "WatchdogSignal=SIGKILL", "NotifyAccess=all",
                 "ExecStartPost=-/usr/bin/podman healthcheck run " + spec.name,
                 "ExecStopPost=-/bin/sh -c 'test \"$$SERVICE_RESULT\" != watchdog || exec "
                 "/usr/bin/podman rm --force --ignore --time 0 --cidfile=%t/%n.ctr-id'"):
        assert line in lines, line
    assert lines.index("ExecStart=" + unit.split("ExecStart=")[1].split("\n")[0]) < \
        lines.index("ExecStartPost=-/usr/bin/podman healthcheck run " + spec.name)


def test_without_a_watchdog_the_unit_is_as_before():
    unit = commands.systemd_unit(default_spec(watchdog_sec=0))
    assert "--sdnotify=conmon" in exec_start(unit)
    assert "Watchdog" not in unit and "ExecStartPost" not in unit and "ExecStopPost" not in unit


def test_systemd_unit_escapes_a_literal_percent():
    spec = default_spec(health_cmd="test $(date +%s) -gt 0",
                        environment=(("RATE", "50%"),))
    unit = commands.systemd_unit(spec)
    start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert "+%%s" in start
    assert "RATE=50%%" in start
    assert "--cidfile=%t/%n.ctr-id" in start  # systemd's own specifiers stay single
    assert "%%t" not in start and "%%n" not in start
    # the rest of the unit keeps its specifiers as written
    assert "Environment=PODMAN_SYSTEMD_UNIT=%n" in unit.splitlines()


def test_systemd_unit_escapes_a_literal_dollar():
    spec = default_spec(health_cmd="test -n $HOME", environment=(("PRICE", "$5"),))
    start = next(line for line in commands.systemd_unit(spec).splitlines()
                 if line.startswith("ExecStart="))
    assert "$$HOME" in start and "PRICE=$$5" in start


def test_systemd_unit_for_rootless_podman():
    unit = commands.systemd_unit(default_spec(), rootful=False)
    assert "WantedBy=default.target" in unit.splitlines()
    assert "WantedBy=multi-user.target" not in unit


def test_unit_name():
    assert commands.unit_name("97layer-nightguard") == "container-97layer-nightguard.service"


# -- sudo and rootless ------------------------------------------------------------------------
def test_sudo_prefix_is_non_interactive():
    assert commands.sudo(["id", "-u"]) == ["sudo", "-n", "id", "-u"]
    assert commands.sudo(["id", "-u"], rootful=False) == ["id", "-u"]


def test_sudo_returns_a_new_list():
    argv = ["id"]
    commands.sudo(argv, rootful=False).append("x")
    assert argv == ["id"]


def test_podman_and_systemctl_variants():
    assert commands.podman("ps") == ["sudo", "-n", "podman", "ps"]
    assert commands.podman("ps", rootful=False) == ["podman", "ps"]
    assert commands.systemctl("daemon-reload") == ["systemctl", "daemon-reload"]
    assert commands.systemctl("enable", "x.service", rootful=False) == [
        "systemctl", "--user", "enable", "x.service"]


# -- images -----------------------------------------------------------------------------------
def test_image_build_from_a_registry_base_never_pulls_it():
    # the deploy pulled the base first and put its id in the tag: a pull here could build
    # from another base than the one the tag names
    assert commands.image_build("localhost/nightguard:abc", "/app/deployment/Dockerfile",
                                "/app", "docker.io/library/python:3.11-slim") == [
        "podman", "build", "--format", "docker", "--layers=false", "--pull=never",
        "--file", "/app/deployment/Dockerfile",
        "--build-arg", "BASE_IMAGE=docker.io/library/python:3.11-slim",
        "--tag", "localhost/nightguard:abc", "/app"]


def test_image_build_from_a_local_base_without_requirements_needs_no_network():
    argv = commands.image_build("localhost/nightguard:abc", "Dockerfile", ".",
                                "localhost/nightguard-base:latest", needs_network=False)
    assert argv == [
        "podman", "build", "--format", "docker", "--layers=false", "--pull=never",
        "--network=none", "--file", "Dockerfile",
        "--build-arg", "BASE_IMAGE=localhost/nightguard-base:latest",
        "--tag", "localhost/nightguard:abc", "."]


def test_bootstrap_is_the_only_command_and_holds_no_argument_of_the_task():
    assert commands.bootstrap("CODE") == ["sudo", "-n", "python3", "-c", "CODE"]
    assert commands.bootstrap("CODE", rootful=False) == ["python3", "-c", "CODE"]


def test_markers_text_is_sorted_key_value_lines():
    assert commands.markers_text({"B": "2", "A": "1"}) == "A=1\nB=2\n"


def test_logs():
    assert commands.logs("c") == ["sudo", "-n", "podman", "logs", "--timestamps", "c"]
    assert commands.logs("c", tail=50, since="10m", follow=True, rootful=False) == [
        "podman", "logs", "--timestamps", "--tail", "50", "--since", "10m", "--follow", "c"]


def test_content_hash_separates_parts():
    assert commands.content_hash("ab", "c") != commands.content_hash("a", "bc")
    assert commands.content_hash("x", b"y") == commands.content_hash(b"x", "y")
    assert len(commands.content_hash("x", length=20)) == 20


# -- the alert watcher's units ---------------------------------------------------------------
def test_watcher_units_hold_no_secret_and_import_the_watcher():
    service = commands.watcher_service()
    [line] = [li for li in service.splitlines() if li.startswith("ExecStart=")]
    assert shlex.split(line[len("ExecStart="):]) == [
        "/usr/bin/python3", "-I", "-S", "-c",
        "import sys; sys.path.append('/var/lib/nightguard'); import watcher; "
        "sys.exit(watcher.watch_main(sys.argv[1:]))", "/var/lib/nightguard/alerts.json"]
    assert "Type=oneshot" in service and "Environment" not in service
    assert "%h/.local/state/nightguard/alerts.json" in commands.watcher_service(rootful=False)
    timer = commands.watcher_timer(30)
    assert "OnUnitActiveSec=30s" in timer and "AccuracySec=1s" in timer
    assert "Unit=nightguard-watch.service" in timer and "WantedBy=timers.target" in timer


def test_systemd_accepts_the_watcher_units(tmp_path):
    analyze = tool("systemd-analyze")
    (tmp_path / "nightguard-watch.service").write_text(commands.watcher_service())
    (tmp_path / "nightguard-watch.timer").write_text(commands.watcher_timer(30))
    (tmp_path / "broken.service").write_text('[Service]\nExecStart=/bin/true "x\n')
    done = subprocess.run([analyze, "verify", "--man=no", "nightguard-watch.timer",
                           "nightguard-watch.service"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    broken = subprocess.run([analyze, "verify", "--man=no", "./broken.service"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert broken.returncode != 0  # the check itself can fail
