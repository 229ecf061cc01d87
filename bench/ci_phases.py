"""The test suite's phase times, from the file ``tests/phases.py`` writes (CI writes it to
``build/ci/phases.jsonl``; ``.ci/run`` adds the bootstrap's line and prints this table at
the end of every run).

    .venv/bin/python bench/ci_phases.py [build/ci/phases.jsonl] [--top N]

Prints, in seconds: the wall time of the bootstrap and of the test run; how busy the
machine's cores were meanwhile (percent, from the /proc/stat counters each line carries);
per worker, its busy time; per VM group (the xdist groups of tests/e2e/conftest.py), its
span, the time its VMs took to come up (the setups that booted one) and each file's drills; the unit
tier's time; the N slowest tests (setup + call + teardown); and the N files during whose drills
the host's cores stood idle longest.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

BOOT_SETUP = 20.0  # a setup this long started a VM (or deployed to a fresh one)


def load(path: Path) -> tuple[list[dict], list[dict]]:
    tests, phases = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            (phases if "phase" in record else tests).append(record)
    return tests, phases


def span(records: list[dict]) -> float:
    return max(r["stop"] for r in records) - min(r["start"] for r in records) if records else 0


def busy(records: list[dict]) -> float:
    return sum(r["stop"] - r["start"] for r in records)


def host_busy(records: list[dict]) -> tuple[float, float] | None:
    """(percent busy, cores) of the host between the first and the last line that carries
    CPU counters; None when fewer than two do."""
    counted = sorted((r for r in records if len(r.get("cpu") or ()) == 2),
                     key=lambda r: r["stop"])
    if len(counted) < 2:
        return None
    first, last = counted[0], counted[-1]
    busy_ticks = last["cpu"][0] - first["cpu"][0]
    total_ticks = last["cpu"][1] - first["cpu"][1]
    seconds = last["stop"] - first["stop"]
    if total_ticks <= 0 or seconds <= 0:
        return None
    return 100 * busy_ticks / total_ticks, total_ticks / 100 / seconds  # USER_HZ is 100


def idle_by_file(tests: list[dict]) -> dict[str, float]:
    """Idle core-seconds of the host while each file's drills ran ("group file"): between
    two consecutive lines that carry CPU counters, the idle share goes in equal parts to
    the tests running at that moment (one per worker). It points at drills that wait
    (sleeps, timers) while the run is otherwise CPU-bound."""
    counted = sorted((r for r in tests if len(r.get("cpu") or ()) == 2), key=lambda r: r["stop"])
    idle: dict[str, float] = defaultdict(float)
    for before, after in zip(counted, counted[1:], strict=False):
        idle_ticks = (after["cpu"][1] - after["cpu"][0]) - (before["cpu"][1] - before["cpu"][0])
        if idle_ticks <= 0:
            continue
        middle = (before["stop"] + after["stop"]) / 2
        running = {r["worker"]: r for r in tests if r["start"] <= middle < r["stop"]}
        for record in running.values():
            name = record["test"].split("::")[0].rsplit("/", 1)[-1]
            idle[f"{record['group']} {name}"] += idle_ticks / 100 / len(running)
    return idle


def table(tests: list[dict], phases: list[dict], top: int) -> list[str]:
    lines = [f"{'phase':48} {'seconds':>9}"]
    for phase in phases:
        lines.append(f"{phase['phase']:48} {phase['stop'] - phase['start']:9.0f}")
    lines.append(f"{'tests (wall, first start to last stop)':48} {span(tests):9.0f}")
    cpu = host_busy(tests)
    if cpu:
        lines.append(f"{f'  host CPU busy meanwhile, % of {cpu[1]:.0f} cores':48} {cpu[0]:9.0f}")
    by_worker = defaultdict(list)
    by_group = defaultdict(list)
    for record in tests:
        by_worker[record["worker"]].append(record)
        by_group[record["group"]].append(record)
    for worker, records in sorted(by_worker.items()):
        groups = sorted({r["group"] for r in records})
        lines.append(f"  worker {worker} busy ({', '.join(groups)})"[:49].ljust(49) +
                     f"{busy(records):9.0f}")
    for group, records in sorted(by_group.items(), key=lambda kv: -busy(kv[1])):
        boots = [r for r in records if r["when"] == "setup" and
                 r["stop"] - r["start"] >= BOOT_SETUP]
        lines.append(f"{'group ' + group + ' (span)':48} {span(records):9.0f}")
        lines.append(f"{'  busy':48} {busy(records):9.0f}")
        if boots:
            lines.append(f"{f'  long setups (VM boots, deploys: {len(boots)})':48} "
                         f"{busy(boots):9.0f}")
        by_file = defaultdict(list)
        for record in records:
            by_file[record["test"].split("::")[0].rsplit("/", 1)[-1]].append(record)
        for name, file_records in sorted(by_file.items(), key=lambda kv: -busy(kv[1])):
            if group != "unit" or busy(file_records) >= 10:
                lines.append(f"{'  ' + name:48} {busy(file_records):9.0f}")
    per_test = defaultdict(float)
    for record in tests:
        per_test[record["test"]] += record["stop"] - record["start"]
    lines.append(f"slowest {top} tests (setup + call + teardown):")
    for test, seconds in sorted(per_test.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {seconds:7.0f}  {test}")
    idle = idle_by_file(tests)
    if idle:
        total = sum(idle.values())
        lines.append(f"idle core-seconds while a file's drills ran (total {total:.0f}):")
        for name, seconds in sorted(idle.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {seconds:7.0f}  {name}")
    failed = [r["test"] for r in tests if r.get("failed")]
    if failed:
        lines.append(f"failed: {len(failed)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default="build/ci/phases.jsonl")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    path = Path(args.file)
    if not path.is_file():
        print(f"ci_phases: {path} not found (CI writes it; or set NG_PHASES_FILE for pytest)")
        return 1
    tests, phases = load(path)
    print("\n".join(table(tests, phases, args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
