"""What a new user meets in the first hour: flags, hosts, typed values, --json on failure,
redaction by value, the health screen, and a unit tier that does not read their machine.
Every check compares whole lines and exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from invoke import Context, Program
from invoke.exceptions import Exit

from tasks import ns
from tasks.cli import SHORT_FLAGS, StepFailed, one_line_errors, settings_for
from tasks.config import read_config_file
from tasks.deploy import health as health_tasks
from tasks.deploy.envfile import SecretValues, redact_tree
from tasks.errors import ConfigError
from tasks.hostside.verdict import verdict
from tasks.ssh.sshconfig import HostSpec, parse_host

ROOT = Path(__file__).resolve().parents[2]
INV = str(ROOT / ".venv" / "bin" / "inv")
FORMS = ("HOST, USER@HOST, HOST:PORT, USER@HOST:PORT, [IPV6]:PORT, USER@[IPV6]:PORT or an "
         "~/.ssh/config Host alias")


def run_program(*argv: str) -> int:
    """`inv ARGV...` in this process; its exit code."""
    with pytest.raises(SystemExit) as done:
        Program(namespace=ns, binary="inv").run(["inv", *argv])
    return done.value.code or 0


def arguments(name: str):
    return ns[name].get_arguments(ignore_unknown_help=True)


# -- flags ------------------------------------------------------------------------------------
def test_every_task_leaves_h_to_help_and_each_letter_means_one_long_flag():
    seen: dict[str, str] = {}
    for name in ns.task_names:
        for arg in arguments(name):
            long_name, *short = arg.names
            assert "h" not in short, f"{name}: -h is --{long_name}"
            assert short == ([SHORT_FLAGS[long_name]] if long_name in SHORT_FLAGS else []), \
                f"{name}: --{long_name} has {short}"
            for letter in short:
                assert seen.setdefault(letter, long_name) == long_name, \
                    f"{name}: -{letter} is --{long_name}, elsewhere --{seen[letter]}"
    assert len(set(SHORT_FLAGS.values())) == len(SHORT_FLAGS)
    assert seen["f"] == "follow" and seen["H"] == "host" and seen["t"] == "target"
    assert all(arg.help for arg in arguments("logs"))  # asked again: the help texts stay


@pytest.mark.parametrize("task", sorted(ns.task_names))
def test_inv_task_dash_h_prints_its_help_and_exits_0(task, capsys):
    assert run_program(task, "-h") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Usage: inv [--core-opts] {task} [--options]")
    assert "Short flags (the same in every task; -h is --help): -t --target, -H --host," in out


def test_inv_config_dash_h_as_a_command():
    done = subprocess.run([INV, "config", "-h"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert "  -H STRING, --host=STRING" in done.stdout


def test_logs_dash_f_is_follow():
    program = Program(namespace=ns, binary="inv")
    program.create_config()
    program.parse_core(["inv", "logs", "-f", "-H", "me@box:2222"])
    program.parse_collection()
    program.parse_tasks()
    args = program.tasks[0].args
    assert (args["follow"].value, args["host"].value) == (True, "me@box:2222")


def test_every_typed_flag_given_a_word_is_one_line_and_exit_2(capsys):
    typed = [(name, arg.name) for name in ns.task_names for arg in arguments(name)
             if arg.kind in (int, float)]
    assert ("logs", "tail") in typed and ("health", "watch") in typed
    for task, flag in typed:
        assert run_program(task, f"--{flag}", "abc") == 2, (task, flag)
        err = capsys.readouterr().err
        assert err == f"error: --{flag}: 'abc' is not a whole number\n", (task, flag)


# -- hosts ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("typed", "expected"), [
    ("203.0.113.7", HostSpec("203.0.113.7")),
    ("ubuntu@203.0.113.7", HostSpec("203.0.113.7", "ubuntu")),
    ("203.0.113.7:2222", HostSpec("203.0.113.7", None, 2222)),
    ("ubuntu@203.0.113.7:2222", HostSpec("203.0.113.7", "ubuntu", 2222)),
    ("[2001:db8::1]:2222", HostSpec("2001:db8::1", None, 2222)),
    ("me@[2001:db8::1]:2222", HostSpec("2001:db8::1", "me", 2222)),
    ("[2001:db8::1]", HostSpec("2001:db8::1")),
    ("2001:db8::1", HostSpec("2001:db8::1")),
    ("ssh://me@box:2200", HostSpec("box", "me", 2200)),
    ("my-vm", HostSpec("my-vm")),  # an ssh_config alias
])
def test_hosts_as_ssh_understands_them(typed, expected):
    assert parse_host(typed) == expected


@pytest.mark.parametrize(("typed", "line"), [
    ("a b", f"--host: 'a b' is not a host; use {FORMS}"),
    ("@box", f"--host: '@box' is not a host; use {FORMS}"),
    ("[2001:db8::1", f"--host: '[2001:db8::1' is not a host; use {FORMS}"),
    ("box:", "--host box:: '' is not a port number (1-65535)"),
    ("box:70000", "--host box:70000: '70000' is not a port number (1-65535)"),
    ("[::1]:x", "--host [::1]:x: 'x' is not a port number (1-65535)"),
])
def test_a_host_no_form_fits_is_one_line_naming_the_forms(typed, line):
    with pytest.raises(ConfigError) as info:
        parse_host(typed)
    assert str(info.value) == line


def test_port_and_user_flags_go_with_host_and_must_agree(monkeypatch):
    from tasks import cli

    def settings(host, **given):
        token = cli._HOST_FLAGS.set(given)
        try:
            return settings_for(Context(), None, host)
        finally:
            cli._HOST_FLAGS.reset(token)

    done = settings("ubuntu@203.0.113.7:2222")
    assert (done["target"], done["ssh.host"], done["ssh.port"], done["ssh.user"]) == \
        ("ssh", "203.0.113.7", 2222, "ubuntu")
    done = settings("203.0.113.7", port="2200", user="me")
    assert (done["ssh.host"], done["ssh.port"], done["ssh.user"]) == ("203.0.113.7", 2200, "me")
    for host, given, line in [
        ("box:2222", {"port": "22"}, "--host box:2222 and --port 22 name two ports; give one"),
        ("a@box", {"user": "b"}, "--host a@box and --user b name two users; give one"),
        ("box", {"port": "ssh"}, "--port: 'ssh' is not a port number (1-65535)"),
        (None, {"port": "22"}, "--port goes with --host"),
    ]:
        with pytest.raises(ConfigError) as info:
            settings(host, **given)
        assert str(info.value) == line


def test_a_configured_host_goes_through_the_same_parser(monkeypatch):
    from tasks.ssh import sshconfig

    monkeypatch.setenv("NIGHTGUARD_SSH_HOST", "me@[2001:db8::1]:2222")
    monkeypatch.setattr(sshconfig, "SYSTEM_CONFIG", "/nonexistent")
    found = sshconfig.ssh_target(settings_for(Context(), "ssh"))
    assert found.describe() == "me@[2001:db8::1]:2222"
    monkeypatch.setenv("NIGHTGUARD_SSH_HOST", "me@box:x")
    with pytest.raises(ConfigError) as info:
        sshconfig.ssh_target(settings_for(Context(), "ssh"))
    assert str(info.value) == "environment (NIGHTGUARD_SSH_HOST): nightguard.ssh.host " \
        "me@box:x: 'x' is not a port number (1-65535)"


def test_host_with_user_at_is_one_line_not_a_traceback_from_the_command_line():
    done = subprocess.run([INV, "deploy", "--dry-run", "--host", "ubuntu@[2001:db8::1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == \
        (2, f"error: --host: 'ubuntu@[2001:db8::1' is not a host; use {FORMS}\n")


# -- --json on failure --------------------------------------------------------------------------
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_health_json_stays_json_when_the_host_refuses(capsys):
    port = closed_port()
    with pytest.raises(Exit) as info:
        ns["health"](Context(), host="127.0.0.1", port=str(port), json_=True)
    assert info.value.code == 1
    message = (f"step 'connect' failed: ubuntu@127.0.0.1:{port}: connection refused (the "
               f"host answered, but nothing listens on port {port}: is sshd running, is the "
               "port right?)")
    assert json.loads(capsys.readouterr().out) == {"error": {"step": "connect",
                                                              "message": message}}
    assert info.value.message == f"error: {message}"


@pytest.mark.parametrize("task", ["config", "health", "history"])
def test_every_json_task_says_a_config_error_as_json(task, capsys):
    with pytest.raises(Exit) as info:
        ns[task](Context(), target="moon", json_=True)
    line = "command line: nightguard.target: 'moon' is not one of sandbox, ssh, gcp"
    assert info.value.code == 2 and info.value.message == f"error: {line}"
    assert json.loads(capsys.readouterr().out) == {"error": {"step": "config",
                                                              "message": line}}


def test_the_tasks_with_json_are_the_ones_tested():
    with_json = sorted(n for n in ns.task_names if any(a.names[0] == "json" for a in arguments(n)))
    # vm.snapshots' JSON, on failure too, is tested in test_snapshots.py
    assert with_json == ["config", "health", "history", "vm.snapshots"]


# -- errors -----------------------------------------------------------------------------------
def test_yaml_gives_its_own_reason_line_and_column(tmp_path):
    path = tmp_path / "invoke.yaml"
    path.write_text("nightguard:\n  ssh:\n    host: a\n   port: 22\n")
    with pytest.raises(ConfigError) as info:
        read_config_file(path)
    assert str(info.value) == "invoke.yaml: not valid YAML: line 4, column 4: expected " \
        "<block end>, but found '<block mapping start>' (while parsing a block mapping)"


def test_an_unknown_key_close_to_a_known_one_gets_did_you_mean(monkeypatch):
    monkeypatch.setenv("NIGHTGUARD_SSH_HSOT", "box")
    with pytest.raises(ConfigError) as info:
        settings_for(Context())
    assert str(info.value) == "environment: unknown variable NIGHTGUARD_SSH_HSOT (did you " \
        "mean NIGHTGUARD_SSH_HOST?)"
    monkeypatch.delenv("NIGHTGUARD_SSH_HSOT")
    with pytest.raises(ConfigError) as info:
        settings_for(Context(), limits__memroy="1g")
    assert str(info.value) == "command line: unknown key nightguard.limits.memroy (did you " \
        "mean nightguard.limits.memory?)"
    with pytest.raises(ConfigError) as info:
        settings_for(Context(), limits__ram="1g")
    assert str(info.value) == "command line: unknown key nightguard.limits.ram"


# -- redaction by value -----------------------------------------------------------------------
TOKEN = "123456:tg-secret-\u00e9-value"


@pytest.fixture
def env_file(tmp_path, monkeypatch):
    path = tmp_path / ".env"
    path.write_text(f"TELEGRAM_BOT_TOKEN={TOKEN}\nGEMINI_API_KEY=gem-secret-0000\n"
                    "OTHER_THING=not-a-secret-but-private\n")
    path.chmod(0o600)
    monkeypatch.setenv("NIGHTGUARD_ENV_FILE", str(path))
    return path


@pytest.mark.parametrize("as_json", [False, True])
def test_config_never_prints_a_env_value_even_where_agent_env_repeats_it(env_file, monkeypatch,
                                                                         capsys, as_json):
    monkeypatch.setenv("NIGHTGUARD_AGENT_ENV", json.dumps({"BOT": TOKEN,
                                                           "X": "not-a-secret-but-private"}))
    ns["config"](Context(), json_=as_json)
    out = capsys.readouterr().out
    assert TOKEN not in out and "not-a-secret-but-private" not in out
    if as_json:
        assert json.loads(out)["config"]["agent_env"] == {"BOT": "[REDACTED]",
                                                          "X": "[REDACTED]"}
    else:
        assert "agent_env = {'BOT': '[REDACTED]', 'X': '[REDACTED]'}  " \
            "[environment (NIGHTGUARD_AGENT_ENV)]" in out.splitlines()


def test_redaction_holds_when_env_is_not_all_there(env_file, capsys, monkeypatch):
    env_file.write_text(f"TELEGRAM_BOT_TOKEN={TOKEN}\n")  # the Gemini key is missing
    monkeypatch.setenv("NIGHTGUARD_AGENT_ENV", json.dumps({"BOT": TOKEN}))
    ns["config"](Context())
    out = capsys.readouterr().out
    assert TOKEN not in out
    assert "secrets check: .env: GEMINI_API_KEY is missing (needed for secret gemini_api_key)" \
        in out.splitlines()


def test_errors_and_json_are_redacted_by_value(capsys):
    SecretValues({"t": "s3cr\"et\\\u00e9"})
    assert json.dumps(redact_tree({"a": ["x s3cr\"et\\\u00e9 y"]}, ["s3cr\"et\\\u00e9"])) == \
        '{"a": ["x [REDACTED] y"]}'

    @one_line_errors
    def failing(c, json_=False):
        raise StepFailed("logs", "the agent printed s3cr\"et\\\u00e9")

    with pytest.raises(Exit) as info:
        failing(None, json_=True)
    assert info.value.message == "error: step 'logs' failed: the agent printed [REDACTED]"
    assert json.loads(capsys.readouterr().out) == {
        "error": {"step": "logs", "message": "step 'logs' failed: the agent printed [REDACTED]"}}


# -- the health screen ------------------------------------------------------------------------
def test_health_screen_says_last_exit_once_and_each_check_once(monkeypatch):
    settings = settings_for(Context())
    container = {"running": True, "status": "running", "health": "unhealthy",
                 "health_log": [{"exit": 0, "output": ""},
                                {"exit": 1, "output": "agent: heartbeat is stale\n"},
                                {"exit": 1, "output": "agent: heartbeat is stale"}]}
    unit = {"ActiveState": "active", "NRestarts": "0", "ExecMainCode": "0",
            "ExecMainStatus": "0", "ActiveEnterTimestamp": "Mon 2026-12-07 04:54:46 UTC"}
    report = health_tasks.summarize(settings, {
        "container": container, "verdict": verdict(container, unit), "swaps": ["/swapfile"],
        "unit": unit})
    lines = health_tasks.render(settings, report).splitlines()
    assert "  unit        active since Mon 2026-12-07 04:54:46 UTC; restarts 0, last exit -" \
        in lines
    assert [line for line in lines if line.startswith("  check")] == [
        "  check       exit 0",
        "  check       exit 1 (x2): agent: heartbeat is stale"]
    assert health_tasks.exit_reason({"ExecMainCode": "1", "ExecMainStatus": "3"}) == "exited 3"


# -- the unit tier and the developer's machine --------------------------------------------------
def test_the_unit_tier_reads_nothing_of_this_machine(not_this_machine):
    assert not [n for n in os.environ if n.startswith(("NIGHTGUARD_", "INVOKE_"))]
    assert Path.home() == not_this_machine
    assert [p.name for p in not_this_machine.iterdir()] == [".ssh"]  # an empty ~/.ssh only
    assert not any((not_this_machine / ".ssh").iterdir())
    assert "SSH_AUTH_SOCK" not in os.environ
