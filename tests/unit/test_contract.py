"""The contract both sides read (tasks/contract.py): the laptop sends only ops the host's
table has, reads only facts the contract declares, and neither side keeps its own copy of
a host path or constant. A renamed op or fact, or a second definition, fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tasks import contract
from tasks.deploy import commands, plan
from tasks.hostside import server
from tasks.hostside.bundle import CONTRACT

TASKS = Path(contract.__file__).parent
HOSTSIDE = TASKS / "hostside"
LAPTOP = [p for p in TASKS.rglob("*.py") if HOSTSIDE not in p.parents and p != CONTRACT]
SENT_OP = re.compile(r"\.call\(\s*\"(\w+)\"")
READ_FACT = re.compile(r"\bfacts(?:_seen)?(?:\.get\(|\[)\s*\"(\w+)\"")


def found(pattern: re.Pattern, paths) -> dict[str, set[str]]:
    where: dict[str, set[str]] = {}
    for path in paths:
        for name in pattern.findall(path.read_text()):
            where.setdefault(name, set()).add(path.name)
    return where


def test_the_hosts_table_of_ops_is_the_contracts():
    assert set(server.OPS) == contract.OP_NAMES
    assert server.READ_ONLY == contract.READ_ONLY_OPS <= contract.OP_NAMES


def test_every_op_the_laptop_sends_is_in_the_contract():
    sent = found(SENT_OP, LAPTOP)
    assert {"facts", "secret_put", "watcher", "finish", "health"} <= set(sent)  # it reads
    unknown = {op: files for op, files in sent.items() if op not in contract.OP_NAMES}
    assert unknown == {}


def test_every_fact_the_laptop_reads_is_declared():
    read = found(READ_FACT, LAPTOP)
    assert {"podman", "container", "manifest", "apt_busy"} <= set(read)  # it reads
    undeclared = {key: files for key, files in read.items()
                  if key not in contract.Facts.__annotations__}
    assert undeclared == {}


def test_the_facts_the_host_answers_are_the_declared_ones(fake_host):
    with fake_host.helper() as helper:
        facts = helper.call("facts")
        health = helper.call("health")
    declared = set(contract.Facts.__annotations__)
    assert set(facts) <= declared
    # the apt reachability facts come only when a basic tool is missing
    assert declared - set(facts) <= {"apt_sources", "apt_reachable"}
    assert set(health) == set(contract.Health.__annotations__)
    assert set(health["verdict"]) == set(contract.Verdict.__annotations__)
    assert health["verdict"]["status"] in contract.STATUSES


def test_the_laptop_takes_the_constants_from_the_contract():
    assert plan.MIN_PODMAN is contract.MIN_PODMAN and plan.SWAPFILE is contract.SWAPFILE
    assert commands.STATE_DIR is contract.STATE_DIR
    assert commands.WATCH_UNIT is contract.WATCH_UNIT
    assert commands.ROOTLESS_STATE_DIR == "%h/.local/state/nightguard"
    assert commands.watcher_paths() == ("/var/lib/nightguard/watcher.py",
                                        "/var/lib/nightguard/alerts.json")


def strings(path: Path) -> list[str]:
    """The string constants of a module's code, its docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docs]


def test_host_paths_and_names_are_written_once():
    once = (contract.STATE_DIR, contract.HEARTBEAT_FILE, contract.WATCH_UNIT,
            ".local/state/nightguard")
    code = [p for p in TASKS.glob("deploy/*.py")] + list(HOSTSIDE.glob("*.py"))
    again = {f"{path.name}: {text!r}" for path in code for text in strings(path)
             if any(value in text for value in once)}
    assert again == set()
    defined = {f"{path.name}: {name}" for path in code
               for node in ast.parse(path.read_text()).body if isinstance(node, ast.Assign)
               for target in node.targets if isinstance(target, ast.Name)
               for name in [target.id] if name in ("MIN_PODMAN", "WATCH_UNIT", "COPY_SEP",
                                                   "OUR_MOUNTS", "SWAPFILE", "STATE_DIR")}
    assert defined == set()
