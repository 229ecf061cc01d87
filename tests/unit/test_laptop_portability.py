"""The laptop side runs on any Unix with Python 3.11+, not only on Debian.

The slow part bootstraps a copy of the project (so the real .venv is untouched) with a PATH
of symlinks to a handful of tools: no apt-get, dpkg, dpkg-query, mmdebstrap or QEMU, like a
Mac. Then the laptop-side tasks must work, a deploy must get as far as the connection, and
`inv sandbox.up` must refuse with one line. It takes about half a minute (pip installs from
its cache or the index; nothing is built).
The fast part checks the packaging (every import declared, every declaration pinned), the
Python version check, and the sandbox's checks and process lookup off Linux.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tasks.sandbox import qemu, support
from tests.unit import hermetic

ROOT = Path(__file__).resolve().parents[2]
# What a laptop without apt has that bootstrap and the tasks use; ssh comes with macOS.
TOOLS = ("bash", "dirname", "uname", "id", "rm", "sed", "grep", "tail", "cat", "cksum", "ssh",
         "ssh-keygen")
ABSENT = ("apt-get", "dpkg", "dpkg-query", "mmdebstrap", "qemu-system-x86_64", "qemu-img")
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", ".sandbox", ".ssh", ".env", "*.egg-info", "build", "__pycache__",
    ".pytest_cache", ".ruff_cache", "results", "*.img", "*.qcow2", "*.tar",
)  # fmt: skip


def _name(requirement: str) -> str:
    """'PyYAML==6.0.3' or 'python-dotenv' -> 'pyyaml' / 'python-dotenv' (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]).lower()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+", line), line
            pins[_name(line)] = line
    return pins


# -- packaging -------------------------------------------------------------------------
def test_every_declared_dependency_has_exactly_one_pin():
    project = _project()
    assert project["requires-python"] == ">=3.11"
    declared = [_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    assert len(declared) == len(set(declared))
    assert sorted(declared) == sorted(_pins())


def _imports(path: Path) -> set[tuple[str, bool]]:
    """(module, certain): `from a.b import c` gives a.b, and a.b.c in case c is a module
    (what counts in a namespace package such as google.cloud)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update((alias.name, True) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module, True))
            found.update((f"{node.module}.{alias.name}", False) for alias in node.names)
    return found


@functools.cache
def _providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _owner(origin: str, top: str) -> str | None:
    """The distribution that installed the file `origin` (module `top`.*)."""
    origin_path = Path(origin).resolve()
    for name in _providers().get(top, []):
        dist = importlib.metadata.distribution(name)
        if any(Path(dist.locate_file(f)).resolve() == origin_path for f in dist.files or ()):
            return _name(name)
    return None


def _origin(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a.b.c where c is a class, not a module
        return None
    except ValueError:  # imported already, without a spec
        return getattr(sys.modules.get(module), "__file__", None) or ""
    return None if spec is None else spec.origin or ""


def _third_party(paths) -> dict[str, set[str]]:
    """{distribution: modules} for the non-stdlib, non-project imports of these files."""
    local = {p.stem for p in ROOT.rglob("*.py") if ".venv" not in p.parts} | {"tasks", "tests",
                                                                            "bench"}
    found = {}
    for path in paths:
        for module, certain in _imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names | local:
                continue
            origin = _origin(module)
            if origin is None:
                assert not certain, f"{path}: imports {module}, which is not installed"
                continue
            if not origin:  # a namespace package: its modules count
                continue
            dist = _owner(origin, top)
            assert dist, f"{path}: no installed distribution provides {module}"
            found.setdefault(dist, set()).add(module)
    return found


def test_every_module_the_code_imports_is_declared_directly():
    project = _project()
    runtime = {_name(r) for r in project["dependencies"]}
    # optional features import their extra's packages (and say how to get them when absent)
    optional = {_name(r) for name, reqs in project["optional-dependencies"].items()
                if name != "dev" for r in reqs}
    dev = {_name(r) for r in project["optional-dependencies"]["dev"]}
    tasks = [p for p in (ROOT / "tasks").rglob("*.py") if "guest" not in p.parts]
    undeclared = {d: m for d, m in _third_party([*tasks, ROOT / "tasks.py"]).items()
                  if d not in runtime | optional}
    assert not undeclared, f"imported by tasks/ but not in [project] dependencies: {undeclared}"
    tests = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "execution" / "examples").rglob("*.py")]
    undeclared = {d: m for d, m in _third_party(tests).items() if d not in runtime | dev}
    assert not undeclared, f"imported by the tests but declared nowhere: {undeclared}"


# -- bootstrap's Python check ----------------------------------------------------------
def _bootstrap_copy(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", tmp_path / "scripts")
    return tmp_path / "scripts" / "bootstrap.sh"


@pytest.mark.parametrize("python", ["old", "missing"])
def test_bootstrap_stops_with_one_line_on_an_unfit_python(tmp_path, python):
    script = _bootstrap_copy(tmp_path)
    fake = tmp_path / "python3.9"  # answers like Python 3.9 does to bootstrap's check
    fake.write_text('#!/bin/sh\necho 3.9\nexit 1\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake) if python == "old" else str(tmp_path / "nope")}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 1
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("bootstrap: ") and "3.11 or newer" in line and "PYTHON=" in line
    assert "brew install" in line  # names how to get one
    if python == "old":
        assert "is Python 3.9" in line
    assert not (tmp_path / ".venv").exists()


def test_bootstrap_refuses_unknown_arguments(tmp_path):
    done = subprocess.run(["bash", str(_bootstrap_copy(tmp_path)), "--sandbox-please"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1


# -- the sandbox off Linux -------------------------------------------------------------
def test_sandbox_checks_on_a_mac(monkeypatch, tmp_path):
    monkeypatch.setattr(support.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(support.shutil, "which", lambda tool: None if "qemu" in tool else tool)
    boot = support.boot_problem()
    assert "qemu-system-x86_64, qemu-img on PATH" in boot and "brew install qemu" in boot
    build = support.build_problem(tmp_path)
    assert "Linux" in build and "mmdebstrap" in build and str(tmp_path) in build
    for text in (boot, build):
        assert "\n" not in text and "--host" in text and "nightguard.target: gcp" in text
    with pytest.raises(support.SandboxUnavailable):
        support.require_boot()


def test_sandbox_checks_on_linux(monkeypatch, tmp_path):
    monkeypatch.setattr(support.platform, "system", lambda: "Linux")
    monkeypatch.setattr(support.os, "geteuid", lambda: 0)
    monkeypatch.setattr(support.shutil, "which", lambda tool: tool)
    assert support.boot_problem() is None and support.build_problem(tmp_path) is None
    monkeypatch.setattr(support.shutil, "which", lambda tool: None if tool == "mmdebstrap"
                        else tool)  # fmt: skip
    assert "needs mmdebstrap on PATH" in support.build_problem(tmp_path)
    monkeypatch.setattr(support.os, "geteuid", lambda: 1000)
    assert "needs root" in support.build_problem(tmp_path)


def test_qemu_pid_without_proc_asks_ps(monkeypatch, tmp_path):
    hermetic.tool("ps")
    monkeypatch.setattr(qemu, "PROCFS", False)  # as on macOS
    monkeypatch.setenv("NG_SANDBOX_DIR", str(tmp_path))
    state = tmp_path / "mac"
    state.mkdir()
    disk = state / "disk.qcow2"
    # stands in for QEMU: the disk's path in its command line is what pid() looks for
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"file={disk}"])
    try:
        (state / "qemu.pid").write_text(f"{proc.pid}\n")
        assert qemu.pid("mac") == proc.pid
        assert qemu.process(proc.pid)[0] in "RS"
        (state / "qemu.pid").write_text(f"{os.getpid()}\n")  # alive, but not this sandbox's
        assert qemu.pid("mac") is None
    finally:
        proc.kill()
        proc.wait()
    (state / "qemu.pid").write_text(f"{proc.pid}\n")
    assert qemu.pid("mac") is None


# -- the laptop side without apt, end to end --------------------------------------------
def _base_python() -> str:
    """A plain interpreter (not this venv's), as a laptop has."""
    candidate = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return str(candidate if candidate.exists() else Path(sys.executable).resolve())


def _pip_cache() -> str | None:
    """The machine's pip cache (not the test's empty HOME's): packages come from there."""
    machine = {**os.environ, "HOME": hermetic.MACHINE_ENV.get("HOME", ""),
               **hermetic.machine_pip_env()}
    done = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True,
                          text=True, env=machine)
    return done.stdout.strip() if done.returncode == 0 else None


@pytest.fixture(scope="module")
def laptop(tmp_path_factory):
    """A copy of the project bootstrapped with a PATH that has no apt, dpkg or QEMU."""
    tmp = tmp_path_factory.mktemp("laptop")
    repo = tmp / "repo"
    shutil.copytree(ROOT, repo, ignore=COPY_IGNORE, symlinks=True)
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        if found := shutil.which(tool):
            (bin_dir / tool).symlink_to(found)
    (bin_dir / "python3").symlink_to(_base_python())
    for tool in ABSENT:
        assert shutil.which(tool, path=str(bin_dir)) is None
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NIGHTGUARD_", "NG_", "PYTHON", "VIRTUAL_ENV"))}
    cache = _pip_cache()
    env.update(hermetic.machine_pip_env())  # where packages come from is the machine's to say
    env.update(PATH=str(bin_dir), XDG_CACHE_HOME=str(tmp / "cache"),
               **({"PIP_CACHE_DIR": cache} if cache else {}))
    done = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    env_file = repo / ".env"  # what preflight checks: keys present, not world-readable
    env_file.write_text("TELEGRAM_BOT_TOKEN=laptop-token-1\nGEMINI_API_KEY=laptop-key-2\n")
    env_file.chmod(stat.S_IRUSR | stat.S_IWUSR)

    def inv(*args, extra_env=None):
        return subprocess.run([str(repo / ".venv" / "bin" / "inv"), *args], cwd=repo,
                              env={**env, **(extra_env or {})}, capture_output=True, text=True,
                              timeout=120)

    return {"repo": repo, "env": env, "bootstrap": done, "inv": inv}


def _one_line_error(done) -> str:
    assert "Traceback" not in done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    return line


def test_bootstrap_without_apt_makes_the_venv_and_says_what_the_sandbox_needs(laptop):
    out = laptop["bootstrap"].stdout.splitlines()
    [note] = [line for line in out if "sandbox" in line]
    assert note.startswith("bootstrap: no apt-get here") and "mmdebstrap" in note
    assert "qemu" in note.lower() and "--host" in note
    assert out[-1].startswith("bootstrap: ready (.venv, Python 3.")
    # the project is installed (editable), and `inv` still loads tasks.py from the root
    show = subprocess.run([str(laptop["repo"] / ".venv" / "bin" / "pip"), "show",
                           "nightguard-deploy"], capture_output=True, text=True)
    assert "Name: nightguard-deploy" in show.stdout
    # a rerun with nothing changed installs nothing, so it needs no index
    offline = {**laptop["env"], "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "",
               "PIP_INDEX_URL": "http://127.0.0.1:9/"}
    again = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=laptop["repo"], env=offline,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == out[-1]


def test_laptop_tasks_load_and_show_the_config(laptop):
    listed = laptop["inv"]("--list")
    assert listed.returncode == 0, listed.stderr
    for name in ("deploy", "health", "logs", "config", "secrets.rotate", "sandbox.up",
                 "vm.create"):
        assert re.search(rf"^\s+{re.escape(name)}\b", listed.stdout, re.M), name
    shown = laptop["inv"]("config")
    assert shown.returncode == 0, shown.stderr
    assert "target = 'sandbox'" in shown.stdout


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_deploy_dry_run_gets_to_the_connection_and_stops_with_one_line(laptop):
    port = str(_closed_port())
    done = laptop["inv"]("deploy", "--dry-run", "--host", "127.0.0.1",
                         extra_env={"NIGHTGUARD_SSH_PORT": port})
    assert done.returncode == 1
    assert f"deploy to ubuntu@127.0.0.1:{port} (dry run)" in done.stdout  # preflight passed
    line = _one_line_error(done)
    assert line == f"error: step 'connect' failed: ubuntu@127.0.0.1:{port}: connection " \
        f"refused (the host answered, but nothing listens on port {port}: is sshd running, " \
        "is the port right?)"
    for task in ("health", "logs", "secrets.list"):
        done = laptop["inv"](task, "--host", "127.0.0.1", extra_env={"NIGHTGUARD_SSH_PORT": port})
        assert done.returncode == 1, task
        assert _one_line_error(done).startswith("error: step 'connect' failed:"), task


def test_sandbox_refuses_with_one_line_without_qemu(laptop):
    done = laptop["inv"]("sandbox.up")
    assert done.returncode == 2
    line = _one_line_error(done)
    assert line.startswith("sandbox.up: the sandbox needs qemu-system-x86_64")
    assert "--host" in line
    assert not (laptop["repo"] / ".sandbox" / "default").exists()  # nothing was started
    status = laptop["inv"]("sandbox.status")
    assert (status.returncode, status.stdout.strip()) == (0, "absent")
    # the default target is the sandbox: a deploy says where else to go, in one line
    done = laptop["inv"]("deploy")
    assert done.returncode == 2
    assert "cannot run here" in _one_line_error(done)
