"""bench/guest_cpu.py reads the guest kernel's acct_v3 records and sums them per command."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import guest_cpu  # noqa: E402


def record(pid, ppid, comm, utime, stime=0, version=3):
    return struct.pack("<BBHIIIIIIf8H16s", 0, version, 0, 0, 1000, 1000, pid, ppid, 0, 150.0,
                       utime, stime, 0, 0, 0, 0, 0, 0, comm.encode())


def test_comp_t_is_a_base_8_exponent_over_a_13_bit_mantissa():
    assert guest_cpu.comp_t(100) == 100
    assert guest_cpu.comp_t((1 << 13) | 5000) == 40000  # 5000 * 8
    assert guest_cpu.comp_t((2 << 13) | 1) == 64


def test_records_decode_pid_parent_cpu_and_name():
    raw = record(10, 1, "podman", 150, 50) + record(11, 10, "conmon", 7)
    recs = list(guest_cpu.records(raw))
    assert len(raw) == 2 * guest_cpu.RECORD.size == 128
    assert [(r["pid"], r["ppid"], r["comm"]) for r in recs] == [(10, 1, "podman"),
                                                                 (11, 10, "conmon")]
    assert recs[0]["cpu"] == 2.0 and recs[1]["cpu"] == 0.07
    assert recs[0]["etime"] == 1.5


def test_a_record_of_another_version_stops_the_report():
    try:
        list(guest_cpu.records(record(1, 0, "x", 1, version=2)))
    except SystemExit as exc:
        assert "version 2" in str(exc)
    else:
        raise AssertionError("a v2 record was read as v3")


def test_the_table_sums_per_command_and_names_the_parents():
    recs = list(guest_cpu.records(
        record(5, 1, "sshd", 30) + record(6, 5, "sudo", 10) + record(7, 6, "podman", 100)
        + record(8, 6, "podman", 60) + record(9, 99, "podman", 40)))
    lines = guest_cpu.summarize(recs, busy=4.0, top=2)
    assert lines[0].startswith("exited processes 5, their CPU 2 s (60%")
    podman = lines[2].split()
    assert podman[:4] == ["podman", "3", "2.0", "50.0"]
    assert " ".join(podman[4:]) == "sudo 2, (running 99) 0"
    assert lines[3].split()[0] == "sshd" and len(lines) == 4


def fake_report(monkeypatch, boot_then, boot_now):
    import base64

    blob = base64.b64encode(record(5, 1, "podman", 300) + record(6, 1, "sshd", 100)).decode()
    now, then = "cpu 900 0 100 5000 0 0 0 0 0 0", "cpu 600 0 0 4000 0 0 0 0 0 0"
    monkeypatch.setattr(guest_cpu, "ssh", lambda target, script: (
        f"{now}\n{then}\n{boot_then}\n{boot_now}\n==\n{blob}"))
    return guest_cpu.report({}, top=5).splitlines()


def test_the_report_takes_the_guests_busy_time_from_proc_stat(monkeypatch):
    lines = fake_report(monkeypatch, "boot-a", "boot-a")
    assert lines[0] == "guest busy 4 CPU-s over ~7 s"
    assert lines[3].split()[:4] == ["podman", "1", "3.0", "75.0"]


def test_after_a_reboot_the_shares_are_of_the_records_own_sum(monkeypatch):
    lines = fake_report(monkeypatch, "boot-a", "boot-b")
    assert lines[0].startswith("the VM rebooted")
    assert lines[3].split()[:4] == ["podman", "1", "3.0", "75.0"]
    assert lines[1].startswith("exited processes 2, their CPU 4 s (100%")
