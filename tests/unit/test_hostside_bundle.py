"""The host side's two programs as they travel (tasks/hostside/bundle.py): each one text
joined from the package's modules, which must compile as one, keep every module's names,
never let two modules' names collide, and run on the python3 the targets ship (3.11+)."""

from __future__ import annotations

import ast
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tasks.hostside import bundle
from tasks.ssh.hostlink import helper_source

PACKAGE = Path(bundle.__file__).parent
NOT_BUNDLED = {"__init__", "bundle"}  # the package's docstring and the laptop's joiner
PROGRAMS = {"helper": (bundle.HELPER, bundle.helper_program),
            "watcher": (bundle.WATCHER, bundle.watcher_program)}


def top_level_names(tree: ast.Module) -> set[str]:
    """What a module defines itself (functions, classes, assignments), not what it imports."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("name", PROGRAMS)
def test_each_program_compiles_as_one_text_without_internal_imports(name):
    modules, program = PROGRAMS[name]
    text = program().decode()
    compile(text, f"<{name}>", "exec")
    tree = ast.parse(text)
    internal = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.level > 0 or node.module == "__future__")]
    assert internal == []
    # every module's own names are in the joined text, from the contract on
    joined = top_level_names(tree)
    for path in bundle.module_paths(modules):
        missing = top_level_names(parsed(path)) - joined
        assert not missing, f"{path.name}: {sorted(missing)}"


@pytest.mark.parametrize("name", PROGRAMS)
def test_no_two_modules_of_a_program_define_the_same_name(name):
    modules, _ = PROGRAMS[name]
    owner: dict[str, str] = {}
    clashes = []
    for path in bundle.module_paths(modules):
        for defined in top_level_names(parsed(path)):
            if defined in owner:
                clashes.append(f"{defined}: {owner[defined]} and {path.name}")
            owner[defined] = path.name
    assert clashes == []


def test_every_module_is_in_a_program_and_imports_only_what_comes_before_it():
    """The bundle's order is the layering: a module imports siblings joined before it
    (so there is no cycle), as `from .x import name` only, and the standard library."""
    modules = {p.stem for p in PACKAGE.glob("*.py")} - NOT_BUNDLED
    assert modules == set(bundle.HELPER) | set(bundle.WATCHER)
    for order in (bundle.HELPER, bundle.WATCHER):
        for index, module in enumerate(order):
            for node in ast.walk(parsed(PACKAGE / f"{module}.py")):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        assert alias.name.split(".")[0] in sys.stdlib_module_names, \
                            (module, alias.name)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    assert node.module.split(".")[0] in sys.stdlib_module_names, \
                        (module, node.module)
                elif isinstance(node, ast.ImportFrom):
                    source = "contract" if node.level == 2 else node.module
                    assert node.module and (node.level, source) in ((2, "contract"),
                                                                    (1, node.module)), module
                    assert source == "contract" or source in order[:index], \
                        f"{module} imports {source}, which comes later"


@pytest.mark.parametrize("path", sorted([*PACKAGE.glob("*.py"), bundle.CONTRACT]),
                         ids=lambda p: p.name)
def test_host_code_is_python_311_small_and_says_what_it_holds(path):
    tree = ast.parse(path.read_text(), feature_version=(3, 11))
    assert ast.get_docstring(tree), f"{path.name} opens without a docstring"
    assert len(path.read_text().splitlines()) <= 600
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            and node.end_lineno - node.lineno + 1 > 60]
    assert long == []


def test_each_program_has_its_own_version():
    """An alert reworded changes the watcher's version, not the helper's: the rules are in
    the watcher's text only, the ops in the helper's only."""
    wire, version = helper_source()
    assert zlib.decompress(wire) == bundle.helper_program()
    assert version == bundle.version(bundle.helper_program())
    program, watcher_version = bundle.watcher_source()
    assert zlib.decompress(program) == bundle.watcher_program()
    assert watcher_version == bundle.version(bundle.watcher_program()) != version
    helper_names = top_level_names(ast.parse(bundle.helper_program()))
    watcher_names = top_level_names(ast.parse(bundle.watcher_program()))
    assert "transitions" in watcher_names and "transitions" not in helper_names
    assert "op_sync" in helper_names and "op_sync" not in watcher_names
    # built again, the same text: the version is the text's, not the build's
    assert bundle.build(bundle.HELPER, "host helper").encode() == bundle.helper_program()


def test_the_watcher_program_runs_alone_as_its_service_imports_it(tmp_path):
    (tmp_path / "watcher.py").write_bytes(bundle.watcher_program())
    code = (f"import sys; sys.path.append({str(tmp_path)!r}); import watcher; "
            "sys.exit(watcher.watch_main(sys.argv[1:]))")
    ran = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr == "usage: watcher.py ARGS_FILE (a JSON file the deploy writes)\n"


def test_strip_internal_drops_whole_internal_imports_and_nothing_else():
    text = ("from __future__ import annotations\n"
            "import os\n"
            "from .base import (\n    OpError,\n    sh,\n)\n"
            "from .nofollow import read_nofollow\n"
            "from ..contract import HEARTBEAT_FILE\n"
            "def f():\n    from .late import x  # indented: not top level, kept\n"
            "    return (1,\n            2)\n")
    assert bundle.strip_internal(text) == (
        "import os\n"
        "def f():\n    from .late import x  # indented: not top level, kept\n"
        "    return (1,\n            2)\n")
