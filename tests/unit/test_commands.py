"""The argv builders, the systemd unit text and the swap script, compared in full."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.deploy import commands
from tasks.deploy.commands import ContainerSpec

ROOT = Path(__file__).resolve().parents[2]
HEALTH = "python3 /app/execution/system/health_check.py"


def default_spec(**changes) -> ContainerSpec:
    spec = ContainerSpec(
        name="97layer-nightguard",
        image="localhost/nightguard:abc123def456",
        app_dir="/home/ubuntu/97layerOS",
        memory="700m",
        memory_reservation="500m",
        memory_swap="2700m",
        cpus=1.0,
        secrets=("telegram_bot_token", "gemini_api_key"),
        health_cmd=HEALTH,
        health_interval="30s",
        health_timeout="10s",
        health_retries=3,
        health_start_period="60s",
        environment=(("NG_HEARTBEAT_MAX_AGE", "30"),
                     ("NG_REQUIRED_SECRETS", "telegram_bot_token,gemini_api_key")),
        labels=(("nightguard.code", "c0de"), ("nightguard.image", "abc123def456")),
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
        "--volume", "/home/ubuntu/97layerOS:/app:Z",
        "--health-cmd", HEALTH,
        "--health-interval", "30s",
        "--health-timeout", "10s",
        "--health-retries", "3",
        "--health-start-period", "60s",
        "--health-on-failure", "kill",
        "--secret", "telegram_bot_token,type=mount,mode=0400,uid=1000",
        "--secret", "gemini_api_key,type=mount,mode=0400,uid=1000",
        "--env", "NG_HEARTBEAT_MAX_AGE=30",
        "--env", "NG_REQUIRED_SECRETS=telegram_bot_token,gemini_api_key",
        "--label", f"nightguard.spec={spec.spec_hash()}",
        "--label", "nightguard.code=c0de",
        "--label", "nightguard.image=abc123def456",
        "localhost/nightguard:abc123def456",
    ]


def test_run_args_with_command_fractional_cpus_and_no_health_action():
    spec = default_spec(cpus=0.5, command=("python3", "-m", "agent"), health_on_failure="",
                        secrets=("one",), environment=(), labels=())
    assert commands.run_args(spec) == [
        "--name", "97layer-nightguard",
        "--memory", "700m",
        "--memory-reservation", "500m",
        "--memory-swap", "2700m",
        "--cpus", "0.5",
        "--volume", "/home/ubuntu/97layerOS:/app:Z",
        "--health-cmd", HEALTH,
        "--health-interval", "30s",
        "--health-timeout", "10s",
        "--health-retries", "3",
        "--health-start-period", "60s",
        "--secret", "one,type=mount,mode=0400,uid=1000",
        "--label", f"nightguard.spec={spec.spec_hash()}",
        "localhost/nightguard:abc123def456",
        "python3", "-m", "agent",
    ]


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
])
def test_spec_hash_changes_with_what_the_container_runs_with(change):
    assert default_spec(**change).spec_hash() != default_spec().spec_hash()


def test_spec_hash_ignores_labels():
    relabelled = default_spec(labels=(("nightguard.code", "other"), ("x", "y")))
    assert relabelled.spec_hash() == default_spec().spec_hash()
    assert default_spec(labels=()).spec_hash() == default_spec().spec_hash()


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
    assert commands.systemctl("daemon-reload") == ["sudo", "-n", "systemctl", "daemon-reload"]
    assert commands.systemctl("enable", "x.service", rootful=False) == [
        "systemctl", "--user", "enable", "x.service"]


# -- secrets ----------------------------------------------------------------------------------
def test_secret_create_reads_the_value_from_stdin():
    assert commands.secret_create("gemini_api_key") == [
        "sudo", "-n", "podman", "secret", "create", "gemini_api_key", "-"]


def test_secret_create_replace_and_rootless():
    assert commands.secret_create("gemini_api_key", replace=True) == [
        "sudo", "-n", "podman", "secret", "create", "--replace", "gemini_api_key", "-"]
    assert commands.secret_create("t", replace=True, rootful=False) == [
        "podman", "secret", "create", "--replace", "t", "-"]


def test_secret_rm():
    assert commands.secret_rm("t") == ["sudo", "-n", "podman", "secret", "rm", "t"]


# -- images -----------------------------------------------------------------------------------
def test_image_build_from_a_registry_base():
    assert commands.image_build("localhost/nightguard:abc", "/app/deployment/Dockerfile",
                                "/app", "docker.io/library/python:3.11-slim") == [
        "sudo", "-n", "podman", "build", "--format", "docker", "--pull=missing",
        "--file", "/app/deployment/Dockerfile",
        "--build-arg", "BASE_IMAGE=docker.io/library/python:3.11-slim",
        "--tag", "localhost/nightguard:abc", "/app"]


def test_image_build_from_a_local_base_never_pulls():
    argv = commands.image_build("localhost/nightguard:abc", "Dockerfile", ".",
                                "localhost/nightguard-base:latest", rootful=False)
    assert argv == [
        "podman", "build", "--format", "docker", "--pull=never", "--file", "Dockerfile",
        "--build-arg", "BASE_IMAGE=localhost/nightguard-base:latest",
        "--tag", "localhost/nightguard:abc", "."]


def test_image_rm_and_read_backs():
    assert commands.image_rm(["a:1", "a:2"]) == [
        "sudo", "-n", "podman", "rmi", "--ignore", "a:1", "a:2"]
    assert commands.inspect_container("c", rootful=False) == ["podman", "container", "inspect",
                                                              "c"]
    assert commands.healthcheck_run("c") == ["sudo", "-n", "podman", "healthcheck", "run", "c"]


def test_logs():
    assert commands.logs("c") == ["sudo", "-n", "podman", "logs", "--timestamps", "c"]
    assert commands.logs("c", tail=50, since="10m", follow=True, rootful=False) == [
        "podman", "logs", "--timestamps", "--tail", "50", "--since", "10m", "--follow", "c"]


# -- files on the host ------------------------------------------------------------------------
def test_write_file_writes_stdin_atomically_with_the_mode(tmp_path):
    target = tmp_path / "dir with space" / "unit.service"
    target.parent.mkdir()
    argv = commands.write_file(str(target), mode="0640")
    assert argv[:2] == ["sh", "-c"]
    subprocess.run(argv, input="[Unit]\nx=1\n", text=True, check=True)
    assert target.read_text() == "[Unit]\nx=1\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in target.parent.iterdir()] == ["unit.service"]  # no temp left


def test_swap_script_contents():
    script = commands.swap_script(2 * 1024**3, 10)
    lines = [line.strip() for line in script.splitlines()]
    assert "f=/swapfile" in lines
    assert "want=2147483648" in lines
    assert 'chmod 600 "$f"' in lines
    assert lines.count('chmod 600 "$f"') == 2  # also fixed on an existing swapfile
    assert any(line.startswith("fallocate -l 2048M") for line in lines)
    assert 'grep -qE "^$f[[:space:]]" /etc/fstab || echo "$f none swap sw 0 0" >> /etc/fstab' \
        in lines
    assert "echo \"vm.swappiness=10\" > /etc/sysctl.d/99-nightguard.conf" in lines
    assert "sysctl -q -w vm.swappiness=10" in lines
    assert lines[0] == "set -eu"


def test_swap_script_uses_its_arguments():
    script = commands.swap_script(512 * 1024**2, 60, path="/var/swap")
    assert "f=/var/swap" in script
    assert "fallocate -l 512M" in script and "count=512" in script
    assert "vm.swappiness=60" in script
    assert "swappiness=10" not in script


def test_swap_script_is_valid_sh():
    script = commands.swap_script(2 * 1024**3, 10)
    subprocess.run(["sh", "-n"], input=script, text=True, check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed")
    # SC1087 is about bash arrays; in sh "$f[[:space:]]" is $f followed by a bracket class.
    result = subprocess.run([shellcheck, "-s", "sh", "-e", "SC1087", "-"], input=script, text=True,
                            capture_output=True)
    assert result.returncode == 0, result.stdout


def test_content_hash_separates_parts():
    assert commands.content_hash("ab", "c") != commands.content_hash("a", "bc")
    assert commands.content_hash("x", b"y") == commands.content_hash(b"x", "y")
    assert len(commands.content_hash("x", length=20)) == 20
