"""bench/watch_cost.py's pure parts, without Podman: the per-hour arithmetic of the two
designs, the tables it prints, its options, and the refusal where Podman cannot run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import watch_cost as wc  # noqa: E402
from bench import watch_cost_lab as lab  # noqa: E402

FIG = {"check_s": 0.060, "pass_s": 0.030, "supervisor_h": 0.40, "conmon_h": 0.10}


def s(median, low, high, n):
    return {"median": median, "min": low, "max": high, "n": n}


def found():
    return {"check": {"total": s(0.0605, 0.0539, 0.0858, 40), "client": s(0.0417, 0.04, 0.05, 40),
                      "conmon": s(0.0051, 0.004, 0.006, 40),
                      "container": s(0.0138, 0.012, 0.02, 40)},
            "pass": {"pass": s(0.0323, 0.0307, 0.034, 20), "floor": s(0.0068, 0.006, 0.007, 20)},
            "pings": {"supervisor_h": s(0.4, 0.39, 0.41, 4),
                      "supervisor_ping": s(0.000278, 0.00027, 0.00029, 4),
                      "conmon_h": s(0.1, 0.09, 0.11, 4), "conmon_ping": s(7e-05, 6e-05, 8e-05, 4),
                      "agent_h": s(0.31, 0.3, 0.32, 4)},
            "memory": {"new": {"rss_kib": 10788, "hwm_kib": 10800}, "old": {"rss_kib": 1732}}}


def test_per_hour_and_share_of_an_e2_micro():
    assert wc.per_hour(0.060, 30) == pytest.approx(7.2)
    assert wc.per_hour(0.060, 300) == pytest.approx(0.72)
    assert wc.per_hour(0.060, None) == 0.0  # an event that does not happen at rest
    assert wc.share(900) == pytest.approx(100)
    assert wc.share(1.8) == pytest.approx(0.2)


def test_stats_are_median_min_max_and_n():
    assert wc.stats([3, 1, 2, 10]) == {"median": 2.5, "min": 1, "max": 10, "n": 4}
    assert wc.stats([]) == {"median": None, "min": None, "max": None, "n": 0}


def test_old_design_is_a_check_and_a_pass_every_30_s():
    rows = {(r["design"], r["what"]): r for r in wc.design_rows(FIG)}
    old = rows[("old", "total")]
    assert old["cpu_s_h"] == pytest.approx(0.060 * 120 + 0.030 * 120)  # 10.8
    assert old["share_pct"] == pytest.approx(1.2)
    assert rows[("old", "health check every 30 s")]["per_hour"] == 120


def test_new_design_is_both_every_10_min_plus_the_pings_and_nothing_at_rest_for_starts():
    rows = {(r["design"], r["what"]): r for r in wc.design_rows(FIG)}
    starts = rows[("new", "check + pass at each start (none at rest)")]
    assert (starts["per_event_ms"], starts["cpu_s_h"]) == (pytest.approx(90.0), 0.0)
    new = rows[("new", "total")]
    assert new["cpu_s_h"] == pytest.approx(0.060 * 6 + 0.030 * 6 + 0.40 + 0.10)  # 1.04
    assert new["share_pct"] == pytest.approx(1.04 / 9)
    assert rows[("new", "watcher pass every 10 min")]["per_hour"] == 6


def test_the_design_table_is_markdown_with_one_row_each():
    text = wc.design_table(wc.design_rows(FIG))
    lines = text.splitlines()
    assert lines[0] == ("| design | what | CPU per event | events/h | CPU-s/h | "
                        "share of 900 CPU-s/h |")
    assert lines[1] == "| --- | --- | --- | --- | --- | --- |"
    assert "| old | health check every 30 s | 60.0 ms | 120 | 7.20 | 0.80% |" in lines
    assert "| new | ng-supervise: a check and a WATCHDOG=1 at rest | - | - | 0.40 | 0.044% |" \
        in lines
    assert "| old | total | - | - | 10.8 | 1.20% |" in lines
    assert len(lines) == 2 + 10


def test_spread_prints_median_min_max_and_n():
    assert wc.spread(s(0.0605, 0.0539, 0.0858, 40)) == "60.5 ms (53.9-85.8, n=40)"
    assert wc.spread(s(0.000278, 0.00027, 0.00029, 4), 1e6, 0, " µs") == "278 µs (270-290, n=4)"
    assert wc.spread(wc.stats([])) == "-"


def test_the_report_has_the_header_the_three_tables_and_what_is_not_measured():
    text = wc.report(found(), ["Natively on a test machine."])
    assert text.startswith("Natively on a test machine.\n\n| event |")
    assert "| `podman healthcheck run`, all of it | 60.5 ms (53.9-85.8, n=40) |" in text
    assert "| · per WATCHDOG=1 ping | 278 µs (270-290, n=4) |" in text
    assert "| new | 10,788 kB | 10,800 kB |" in text
    assert "| old | 1,732 kB | - |" in text
    assert text.rstrip().endswith("systemd is not PID 1 on this machine.")


def test_quick_is_short():
    args = wc.parse_args(["--quick"])
    assert (args.checks, args.passes, args.windows, args.window) == (5, 5, 2, 15.0)
    args = wc.parse_args([])
    assert (args.checks, args.passes, args.windows, args.window) == (20, 20, 4, 30.0)


def test_without_podman_it_says_why_and_exits_non_zero(monkeypatch, capsys):
    monkeypatch.setattr(lab.shutil, "which", lambda name: None)
    assert wc.main(["--quick"]) == 2
    err = capsys.readouterr().err
    assert "Podman cannot run a container on this machine" in err
    assert "not installed: podman, crun, conmon" in err
