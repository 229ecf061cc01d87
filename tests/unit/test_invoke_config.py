"""Settings through Invoke's configuration: its files (system, user, project, -f) and
INVOKE_NIGHTGUARD_* variables feed the typed settings, each value with its source; what
Invoke cannot merge is one line and exit 2; the sandbox tasks honour the configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Config, Context

from tasks import ns
from tasks.config import DEFAULTS, KNOWN_KEYS, MAPPING_KEYS, load_settings
from tasks.errors import ConfigError
from tasks.invoke_config import config_files, refuse_what_invoke_cannot_merge
from tasks.sandbox import tasks as sandbox_tasks

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A HOME of the test's own (for ~/.invoke.yaml) and no configuration variables."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HOME", str(path))
    for name in [n for n in os.environ if n.startswith(("NIGHTGUARD_", "INVOKE_"))]:
        monkeypatch.delenv(name)
    return path


def inv(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("NIGHTGUARD_", "INVOKE_"))}
    environ.update(HOME=str(home), **env)
    return subprocess.run([str(BIN / "inv"), *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=60)


def shown(done) -> dict:
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def one_line_error(done) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ")
    return line


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def invoke_config(project: Path, runtime: Path | None = None, system: Path | None = None
                  ) -> Config:
    """A Config loaded as `inv` loads it for a task of the root collection."""
    config = Config(project_location=str(project), runtime_path=str(runtime) if runtime else None,
                    system_prefix=f"{system}/" if system else f"{project}/no-system/")
    config.load_project()
    config.load_runtime()
    config.load_collection(ns.configuration())
    config.load_shell_env()
    return config


# -- `inv` itself ---------------------------------------------------------------------------
def test_inv_f_reads_the_other_file_and_names_it(home, tmp_path):
    other = write(tmp_path / "other.yaml",
                  "nightguard:\n  limits:\n    memory: 650m\n  sandbox:\n    os: trixie\n")
    done = shown(inv(home, "-f", str(other), "config", "--json"))
    label = f"{other} (-f)"
    assert done["config"]["limits"]["memory"] == "650m"
    assert done["sources"]["limits.memory"] == label
    assert done["config"]["sandbox"]["os"] == "trixie"
    assert done["sources"]["sandbox.os"] == label  # above the project's invoke.yaml
    assert done["sources"]["target"] == "invoke.yaml"  # what -f leaves alone stays
    assert done["files"] == ["invoke.yaml", label]
    lines = inv(home, "-f", str(other), "config").stdout.splitlines()
    assert f"limits.memory = '650m'  [{label}]" in lines
    assert f"config files (lowest first): invoke.yaml, {label}" in lines
    # without -f: the project's value
    assert shown(inv(home, "config", "--json"))["config"]["sandbox"]["os"] == "bookworm"


def test_inv_honours_the_user_file_below_the_project_file(home):
    write(home / ".invoke.yaml", "nightguard:\n  ssh:\n    user: deployer\n"
                                 "  sandbox:\n    os: trixie\n")
    done = shown(inv(home, "config", "--json"))
    assert done["config"]["ssh"]["user"] == "deployer"
    assert done["sources"]["ssh.user"] == "~/.invoke.yaml (user)"
    assert done["config"]["sandbox"]["os"] == "bookworm"  # invoke.yaml sets it: it wins
    assert done["sources"]["sandbox.os"] == "invoke.yaml"
    assert done["files"] == ["~/.invoke.yaml (user)", "invoke.yaml"]


def test_inv_environment_under_both_names_between_project_and_f(home, tmp_path):
    other = write(tmp_path / "other.yaml", "nightguard:\n  ssh:\n    port: 2201\n")
    done = shown(inv(home, "-f", str(other), "config", "--json",
                     INVOKE_NIGHTGUARD_SSH_PORT="2202", INVOKE_NIGHTGUARD_ROOTLESS="false",
                     NIGHTGUARD_SANDBOX_OS="trixie", INVOKE_NIGHTGUARD_SSH_USER="envuser"))
    assert done["config"]["ssh"]["port"] == 2201  # -f is above the environment
    assert done["config"]["rootless"] is False  # not Invoke's cast ("false" is true there)
    assert done["sources"]["rootless"] == "environment (INVOKE_NIGHTGUARD_ROOTLESS)"
    assert done["config"]["sandbox"]["os"] == "trixie"  # the alias beats invoke.yaml
    assert done["sources"]["sandbox.os"] == "environment (NIGHTGUARD_SANDBOX_OS)"
    assert done["sources"]["ssh.user"] == "environment (INVOKE_NIGHTGUARD_SSH_USER)"


@pytest.mark.parametrize("layer", ["user", "-f", "INVOKE_", "NIGHTGUARD_"])
def test_an_unknown_key_in_any_layer_is_one_line_exit_2(home, tmp_path, layer):
    args, env = ["config"], {}
    if layer == "user":
        write(home / ".invoke.yaml", "nightguard:\n  limits:\n    memroy: 1g\n")
        expected = "error: ~/.invoke.yaml (user): unknown key nightguard.limits.memroy " \
            "(did you mean nightguard.limits.memory?)"
    elif layer == "-f":
        other = write(tmp_path / "o.yaml", "nightguard:\n  limits:\n    memroy: 1g\n")
        args = ["-f", str(other), "config"]
        expected = f"error: {other} (-f): unknown key nightguard.limits.memroy (did you " \
            "mean nightguard.limits.memory?)"
    else:
        name = f"{'INVOKE_' if layer == 'INVOKE_' else ''}NIGHTGUARD_LIMITS_MEMROY"
        env[name] = "1g"
        expected = f"error: environment: unknown variable {name} (did you mean " \
            f"{name.removesuffix('MEMROY')}MEMORY?)"
    assert one_line_error(inv(home, *args, **env)) == expected


@pytest.mark.parametrize(("body", "expected"), [
    ("nightguard:\n  limits: 5\n", "nightguard.limits: expected a mapping, not 5"),
    ("nightguard:\n", "nightguard: expected a mapping, not nothing"),
    ("nightguard:\n  target: {a: 1}\n", "nightguard.target: expected a value, not a mapping"),
    ("nightguard:\n  limits: [\n", "not valid YAML: line 3, column 1: expected the node "
     "content, but found '<stream end>' (while parsing a flow node)"),
])
def test_what_invoke_cannot_merge_is_one_line_not_a_traceback(home, tmp_path, body, expected):
    other = write(tmp_path / "o.yaml", body)
    assert expected in one_line_error(inv(home, "-f", str(other), "config"))
    if "YAML" in expected:
        return  # Invoke reads ~/.invoke.yaml before it loads tasks.py, and dies: not ours
    write(home / ".invoke.yaml", body)
    line = one_line_error(inv(home, "config"))
    assert line.startswith("error: ~/.invoke.yaml (user):") and expected in line


def test_a_missing_f_file_is_refused_not_skipped(home, tmp_path):
    line = one_line_error(inv(home, "-f", str(tmp_path / "nope.yaml"), "config"))
    assert line == f"error: {tmp_path / 'nope.yaml'} (-f): no such file"


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("INVOKE_NIGHTGUARD_SYNC_INCLUDE", "a,b", "Invoke cannot read a list from the environment; "
     "use NIGHTGUARD_SYNC_INCLUDE=a,b"),
    ("INVOKE_NIGHTGUARD_SSH_PORT", "ssh", "nightguard.ssh.port: 'ssh' is not an integer"),
    ("INVOKE_NIGHTGUARD_LIMITS_CPUS", "one", "nightguard.limits.cpus: 'one' is not a number"),
])
def test_environment_values_invoke_cannot_cast(home, name, value, expected):
    assert expected in one_line_error(inv(home, "config", **{name: value}))


def test_both_names_with_different_values_is_an_error(home):
    line = one_line_error(inv(home, "config", INVOKE_NIGHTGUARD_SSH_PORT="2201",
                              NIGHTGUARD_SSH_PORT="2202"))
    assert "INVOKE_NIGHTGUARD_SSH_PORT and NIGHTGUARD_SSH_PORT differ" in line


# -- the same, in process ---------------------------------------------------------------------
def test_our_layers_agree_with_invokes_merge(home, tmp_path):
    project = tmp_path / "project"
    write(project / "invoke.yaml", "nightguard:\n  target: ssh\n  ssh:\n    host: h\n"
                                   "    port: 2201\n  limits:\n    memory: 650m\n")
    write(home / ".invoke.yaml", "nightguard:\n  ssh:\n    user: u\n    port: 2200\n")
    system = write(tmp_path / "etc" / "invoke.yaml", "nightguard:\n  keep_images: 5\n").parent
    runtime = write(tmp_path / "run.yaml", "nightguard:\n  limits:\n    cpus: 0.5\n")
    config = invoke_config(project, runtime, system)
    root, files = config_files(config)
    settings = load_settings(root=root, environ={}, files=files)
    assert root == project
    assert [f.label for f in files] == [f"{system}/invoke.yaml (system)",
                                         "~/.invoke.yaml (user)", "invoke.yaml",
                                         f"{runtime} (-f)"]
    merged = config.nightguard
    for path in KNOWN_KEYS:
        if path in MAPPING_KEYS:
            continue
        node = merged
        for part in path:
            node = node[part]
        dotted = ".".join(path)
        if dotted not in ("base_image", "base_image_archive"):  # the sandbox switch
            assert settings[dotted] == node, dotted
    assert settings.source("keep_images") == f"{system}/invoke.yaml (system)"
    assert settings.source("ssh.port") == "invoke.yaml"
    assert settings.source("ssh.user") == "~/.invoke.yaml (user)"
    assert settings.source("limits.cpus") == f"{runtime} (-f)"


def test_the_root_collection_carries_the_defaults():
    assert ns.configuration()["nightguard"] == DEFAULTS


def test_a_bare_context_reads_the_projects_invoke_yaml(home):
    root, files = config_files(Context().config)
    assert root == ROOT
    assert [f.label for f in files] == ["invoke.yaml"]


def test_the_checks_before_invoke_merges(home, tmp_path):
    refuse_what_invoke_cannot_merge(tmp_path, {})  # nothing there: nothing to say
    write(tmp_path / "invoke.yaml", "nightguard:\n  ssh: box\n")
    with pytest.raises(ConfigError, match=r"^invoke.yaml: nightguard.ssh: expected a mapping"):
        refuse_what_invoke_cannot_merge(tmp_path, {})
    write(tmp_path / "invoke.yaml", "nightguard:\n  ssh:\n    port: '2222'\n")
    # a string in a file makes Invoke keep the variable a string: nothing to cast
    refuse_what_invoke_cannot_merge(tmp_path, {"INVOKE_NIGHTGUARD_SSH_PORT": "x"})
    write(tmp_path / "invoke.json", "{")  # invoke.yaml comes first, as in Invoke
    refuse_what_invoke_cannot_merge(tmp_path, {})
    (tmp_path / "invoke.yaml").unlink()
    with pytest.raises(ConfigError, match=r"^invoke.json: not valid JSON: line 1, column 2: "
                       r"Expecting property name enclosed in double quotes$"):
        refuse_what_invoke_cannot_merge(tmp_path, {})


# -- the sandbox tasks take name and os from the configuration --------------------------------
@pytest.fixture
def booted(monkeypatch):
    calls = []
    monkeypatch.setattr(sandbox_tasks, "status", lambda name: "absent")
    monkeypatch.setattr(sandbox_tasks, "ensure_up",
                        lambda name, os_flavour, fresh, timeout, metadata:
                        calls.append((name, os_flavour)))
    return calls


def test_sandbox_up_boots_the_configured_os_and_name(home, tmp_path, booted):
    project = tmp_path / "project"
    write(project / "invoke.yaml", "nightguard:\n  sandbox:\n    os: trixie\n    name: second\n")
    context = Context(invoke_config(project))
    sandbox_tasks.up(context)
    assert booted == [("second", "trixie")]
    sandbox_tasks.up(context, os="bookworm", name="third")  # a flag given wins
    assert booted[-1] == ("third", "bookworm")


def test_sandbox_up_takes_the_os_from_f_and_the_environment(home, tmp_path, booted,
                                                            monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    runtime = write(tmp_path / "run.yaml", "nightguard:\n  sandbox:\n    os: trixie\n")
    sandbox_tasks.up(Context(invoke_config(project, runtime)))
    assert booted == [("default", "trixie")]
    monkeypatch.setenv("NIGHTGUARD_SANDBOX_NAME", "from-env")
    sandbox_tasks.up(Context(invoke_config(project)))
    assert booted[-1] == ("from-env", "bookworm")


def test_sandbox_tasks_refuse_a_bad_configured_value_in_one_line(home, tmp_path, booted):
    from invoke.exceptions import Exit

    project = tmp_path / "project"
    write(project / "invoke.yaml", "nightguard:\n  sandbox:\n    os: sid\n")
    with pytest.raises(Exit) as info:
        sandbox_tasks.up(Context(invoke_config(project)))
    assert info.value.code == 2
    assert info.value.message == ("error: invoke.yaml: nightguard.sandbox.os: 'sid' is not one "
                                  "of bookworm, trixie, bookworm-cloud")
    write(project / "invoke.yaml", "")
    with pytest.raises(Exit) as info:
        sandbox_tasks.status_task(Context(invoke_config(project)), name="../../etc")
    assert "nightguard.sandbox.name: '../../etc' is not a valid name" in info.value.message
    assert booted == []


def test_sandbox_status_uses_the_configured_name(home, tmp_path, monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(sandbox_tasks, "status", lambda name: asked.append(name) or "absent")
    project = tmp_path / "project"
    write(project / "invoke.yaml", "nightguard:\n  sandbox:\n    name: second\n")
    sandbox_tasks.status_task(Context(invoke_config(project)))
    assert asked == ["second"] and capsys.readouterr().out == "absent\n"
