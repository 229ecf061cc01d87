"""bench/systemd_share.py's pure parts, without Podman: the per-event arithmetic (busy
window less the idle rate), the journal count, the 1 kB entry, the summary of rounds, the
hour at 5 and 10 min, the tables, its options, and the refusal where it cannot run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import systemd_share as ss  # noqa: E402
from bench import systemd_share_lab as lab  # noqa: E402

COST = {"check": 0.004, "watch": 0.005, "journal": 0.0002, "show": 0.0003, "ping": 0.00002}


def test_per_event_takes_the_idle_rate_off_the_busy_window_and_divides_by_the_events():
    busy = {"systemd": 0.50, "systemd-journal": 0.20, "container": 1.10}
    idle = {"systemd": 0.02, "systemd-journal": 0.01, "container": 0.05}
    got = ss.per_event(busy, 20.0, idle, 10.0, 100)
    assert got["systemd"] == pytest.approx((0.50 - 0.04) / 100)  # idle over 20 s: 0.04
    assert got["systemd-journal"] == pytest.approx((0.20 - 0.02) / 100)
    assert got["container"] == pytest.approx((1.10 - 0.10) / 100)
    assert got["daemons"] == pytest.approx((0.46 + 0.18) / 100)  # not the container's
    assert got["events"] == 100


def test_per_event_skips_a_daemon_missing_from_one_window_and_a_round_without_events():
    got = ss.per_event({"systemd": 0.3, "dbus-daemon": 0.1}, 10, {"systemd": 0.0}, 10, 3)
    assert set(got) == {"systemd", "daemons", "events"}
    assert got["daemons"] == pytest.approx(0.1)
    assert ss.per_event({"systemd": 0.3}, 10, {"systemd": 0.0}, 10, 0) is None


def test_count_entries_counts_the_lines_inside_the_window_only():
    lines = [json.dumps({"__REALTIME_TIMESTAMP": str(int(t * 1e6)), "MESSAGE_ID": "x"})
             for t in (99.9, 100.0, 100.5, 109.999, 110.0)]
    assert ss.count_entries(lines + ["", "not json", "{}"], 100.0, 110.0) == 3


def test_the_journal_entry_is_1_kB_of_podman_event_fields_none_compressed():
    entry = ss.podman_event_entry()
    assert len(entry.encode()) + ss.TIME_BYTES == 1024  # with the driver's PODMAN_TIME line
    assert len((ss.TIME_LINE % 12345) + "\n") == ss.TIME_BYTES
    fields = entry.splitlines()
    assert fields[0].startswith("MESSAGE=")
    assert "PODMAN_EVENT=health_status" in fields and "SYSLOG_IDENTIFIER=podman" in fields
    assert all("=" in f for f in fields)
    assert max(len(f) for f in fields) < 512  # journald compresses a field over 512 bytes
    assert len(ss.podman_event_entry(2000)) + ss.TIME_BYTES == 2000
    with pytest.raises(ValueError):
        ss.podman_event_entry(100)


def test_summary_gives_an_activation_the_cgroup_less_bin_true_and_others_the_daemons():
    rounds = [ss.per_event({"systemd": 0.2, "container": 0.5}, 10, {"systemd": 0, "container": 0},
                           10, 100),
              ss.per_event({"systemd": 0.3, "container": 0.7}, 10, {"systemd": 0, "container": 0},
                           10, 100)]
    pings = [ss.per_event({"systemd": 0.01, "container": 0.9}, 10,
                          {"systemd": 0, "container": 0}, 10, 1000)]
    got = ss.summarise({"check": rounds + [None], "ping": pings}, [0.0004, 0.0005, 0.0006])
    assert got["true"]["median"] == pytest.approx(0.0005)
    check = got["check"]
    assert check["share"]["median"] == pytest.approx(0.006 - 0.0005)  # (0.005 + 0.007) / 2
    assert (check["share"]["min"], check["share"]["n"]) == (pytest.approx(0.0045), 2)
    assert check["parts"]["forked child"]["median"] == pytest.approx(0.0035)  # 0.006 - 0.0025
    assert check["events"] == 200
    assert got["ping"]["share"]["median"] == pytest.approx(1e-5)  # the container's not counted


def test_the_hour_at_5_min_is_12_of_each_and_240_pings():
    rows = {r["what"]: r for r in ss.hourly(COST, 300)}
    total = rows["total"]
    expected = 12 * (0.004 + 0.0002 + 0.005 + 0.0003 + 0.0002) + 240 * 0.00002  # 0.1212
    assert total["cpu_s_h"] == pytest.approx(expected)
    assert total["share_pct"] == pytest.approx(expected / 9)
    assert total["of_target_pct"] == pytest.approx(expected / 1.8 * 100)
    assert rows["WATCHDOG=1 from conmon every 15 s"]["per_hour"] == 240
    assert rows["health check: its transient timer fires its service"]["per_hour"] == 12


def test_the_hour_at_10_min_halves_all_but_the_pings():
    total = ss.hourly(COST, 600)[-1]
    assert total["cpu_s_h"] == pytest.approx(6 * 0.0097 + 240 * 0.00002)  # 0.0630
    assert len(ss.hourly(COST, 600)) == 7


def test_the_hour_takes_the_slow_rate_where_it_was_measured():
    def kind(share):
        return {"parts": {}, "share": ss.stats([share]), "events": 1}

    summary = {k: kind(v) for k, v in COST.items()}
    assert ss.costs(summary) == pytest.approx(COST)
    summary["check_slow"], summary["ping_slow"] = kind(0.009), kind(0.0001)
    got = ss.costs(summary)
    assert (got["check"], got["ping"], got["watch"]) == (0.009, 0.0001, 0.005)


def test_the_tables_print_microseconds_and_the_shares():
    assert ss.micro(ss.stats([0.0035, 0.004, 0.0052])) == "4,000 µs (3,500-5,200, n=3)"
    assert ss.micro(ss.stats([2e-5, 3e-5])) == "25.0 µs (20.0-30.0, n=2)"
    assert ss.micro(ss.stats([])) == "-"
    text = ss.hourly_table(ss.hourly(COST, 300), 300)
    assert text.startswith("A health check and a watcher pass every 5 min:")
    assert "| total | - | - | 0.1212 | 0.0135% | 6.73% |" in text
    assert "| WATCHDOG=1 from conmon every 15 s | 240 | 20.0 µs | 0.0048 | 0.0005% | 0.27% |" \
        in text


def test_the_report_has_the_header_events_both_hours_and_the_caveats():
    def kind(share):
        return {"parts": {"systemd": ss.stats([share])}, "share": ss.stats([share]),
                "events": 10}

    summary = {k: kind(v) for k, v in COST.items()}
    summary["ping_slow"] = kind(0.00003)
    summary["true"] = ss.stats([0.0004])
    rates = ss.rates(ss.parse_args([]))
    text = ss.report(summary, ["Natively on a test machine."], rates)
    assert text.startswith("Natively on a test machine.\n\n| event: systemd's share |")
    assert "every 5 min:" in text and "every 10 min:" in text
    assert "| /bin/true, on the host (fork, exec, exit) | 400 µs (400-400, n=1) |  |" in text
    assert text.rstrip().endswith("whose wake-ups come from colder caches.")
    lines = text.splitlines()
    fast = lines.index("| **one WATCHDOG=1 (NotifyAccess=all, WatchdogSec=30)** (every 0.01 s): "
                       "the daemons | 20.0 µs (20.0-20.0, n=1) | 10 |")
    assert lines[fast + 2].startswith("| **one WATCHDOG=1 (NotifyAccess=all, WatchdogSec=30)** "
                                      "(every 1 s): the daemons | 30.0 µs")
    assert "| WATCHDOG=1 from conmon every 15 s | 240 | 30.0 µs | 0.0072 |" in text


def test_quick_is_short():
    args = ss.parse_args(["--quick"])
    assert (args.rounds, args.window, args.lines, args.shows) == (2, 8.0, 100, 50)
    args = ss.parse_args([])
    assert (args.rounds, args.window, args.every, args.period) == (5, 20.0, 0.2, 0.01)
    assert (args.slow_every, args.slow_period) == (2.0, 1.0)


def test_without_podman_it_says_why_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(lab.os, "geteuid", lambda: 0)
    monkeypatch.setattr(lab.shutil, "which", lambda name: None)
    assert ss.main(["--quick"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "systemd_share: cannot run here: not installed: podman, crun, conmon"
