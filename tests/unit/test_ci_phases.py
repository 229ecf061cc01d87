"""The suite's phase table (bench/ci_phases.py) from records like tests/phases.py writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import ci_phases  # noqa: E402


def rec(test, when, start, stop, group="unit", worker="gw0"):
    return {"test": test, "when": when, "start": start, "stop": stop, "worker": worker,
            "group": group, "failed": False}


def test_the_table_names_boots_groups_files_and_the_slowest():
    tests = [rec("tests/unit/test_a.py::t", "call", 0, 30),
             rec("tests/e2e/test_deploy.py::d", "setup", 5, 65, "vm-bookworm", "gw1"),
             rec("tests/e2e/test_deploy.py::d", "call", 65, 165, "vm-bookworm", "gw1"),
             rec("tests/e2e/test_alerts.py::h", "call", 165, 205, "vm-bookworm", "gw1")]
    phases = [{"phase": "bootstrap", "start": 0, "stop": 42}]
    lines = ci_phases.table(tests, phases, top=1)
    text = "\n".join(lines)
    assert lines[1].split() == ["bootstrap", "42"]
    assert "tests (wall, first start to last stop)" in lines[2] and lines[2].endswith(" 205")
    assert "group vm-bookworm (span)" in text
    boots = next(line for line in lines if "long setups" in line)
    assert "(VM boots, deploys: 1)" in boots and boots.endswith(" 60")
    assert next(line for line in lines if "test_deploy.py" in line).endswith(" 160")
    assert lines[-1].split() == ["160", "tests/e2e/test_deploy.py::d"]


def test_idle_cores_go_to_the_drills_running_at_the_time():
    cpu = lambda busy, total: {"cpu": [busy, total]}  # noqa: E731 - jiffies, 100 a second
    tests = [dict(rec("tests/e2e/test_wait.py::w", "call", 0, 10, "vm-a", "gw0"),
                  **cpu(1000, 2000)),
             dict(rec("tests/e2e/test_busy.py::b", "call", 0, 10, "vm-b", "gw1"),
                  **cpu(1000, 2000)),  # 0-10 s: both cores busy
             dict(rec("tests/e2e/test_wait.py::v", "call", 10, 20, "vm-a", "gw0"),
                  **cpu(1500, 4000)),  # 10-20 s: 15 of 20 core-s idle, two tests running
             dict(rec("tests/e2e/test_last.py::l", "call", 10, 30, "vm-b", "gw1"),
                  **cpu(1600, 6000))]  # 20-30 s: 19 core-s idle, one test running
    idle = ci_phases.idle_by_file(tests)
    assert idle == {"vm-a test_wait.py": 7.5, "vm-b test_last.py": 7.5 + 19}
    text = "\n".join(ci_phases.table(tests, [], top=5))
    assert "idle core-seconds while a file's drills ran (total 34):" in text
    assert "     26  vm-b test_last.py" in text


def test_the_plugin_records_and_the_script_reads_a_real_run(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_one():\n    assert True\n")
    phases = tmp_path / "phases.jsonl"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "tests.phases",
                           "-p", "no:cacheprovider", str(tmp_path / "test_x.py")], cwd=ROOT,
                          env={"NG_PHASES_FILE": str(phases), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(line) for line in phases.read_text().splitlines()]
    assert [r["when"] for r in records] == ["setup", "call", "teardown"]
    assert all(r["group"] == "unit" and r["worker"] == "main" for r in records)
    busy, total = records[-1]["cpu"]
    assert 0 < busy < total and total >= records[0]["cpu"][1]
    shown = subprocess.run([sys.executable, str(ROOT / "bench" / "ci_phases.py"), str(phases)],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "test_x.py::test_one" in shown.stdout
    missing = subprocess.run([sys.executable, str(ROOT / "bench" / "ci_phases.py"),
                              str(tmp_path / "none.jsonl")], capture_output=True, text=True)
    assert missing.returncode == 1 and "not found" in missing.stdout


def test_the_host_cpu_line_is_the_busy_share_between_the_first_and_last_counters():
    # 200 s on 2 cores at 100 ticks a second: 40,000 ticks, 30,000 of them busy
    tests = [dict(rec("tests/unit/test_a.py::t", "call", 0, 10), cpu=[1000, 4000]),
             dict(rec("tests/e2e/test_b.py::u", "call", 10, 110, "vm-trixie"), cpu=[9000, 20000]),
             dict(rec("tests/e2e/test_b.py::v", "call", 110, 210, "vm-trixie"),
                  cpu=[31000, 44000])]
    assert ci_phases.host_busy(tests) == (75.0, 2.0)
    line = next(line for line in ci_phases.table(tests, [], top=1) if "host CPU" in line)
    assert "% of 2 cores" in line and line.endswith(" 75")
    assert ci_phases.host_busy([rec("a", "call", 0, 1)]) is None  # older files: no counters
