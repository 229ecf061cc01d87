"""The boot disk's daily snapshots: the settings, the schedule's pure parts, and the API calls
through the real google-cloud-compute client against the fake (tests/fake_gce.py), the
`vm.create` and `vm.snapshots` tasks included."""

from __future__ import annotations

import pytest

from tasks.config import ConfigError, load_settings


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


# -- settings -------------------------------------------------------------------------
def test_snapshot_settings_default_to_a_daily_0300_utc_schedule_kept_7_days(tmp_path):
    s = load_settings(root=tmp_path, environ={})
    assert (s["gcp.snapshots.enabled"], s["gcp.snapshots.keep_days"],
            s["gcp.snapshots.start_time"]) == (True, 7, "03:00")
    s = load_settings(root=tmp_path, environ={"NIGHTGUARD_GCP_SNAPSHOTS_KEEP_DAYS": "365",
                                              "NIGHTGUARD_GCP_SNAPSHOTS_START_TIME": "23:00",
                                              "NIGHTGUARD_GCP_SNAPSHOTS_ENABLED": "false"})
    assert (s["gcp.snapshots.enabled"], s["gcp.snapshots.keep_days"],
            s["gcp.snapshots.start_time"]) == (False, 365, "23:00")


@pytest.mark.parametrize("key, value, expected", [
    ("KEEP_DAYS", "0", "nightguard.gcp.snapshots.keep_days: must be between 1 and 365"),
    ("KEEP_DAYS", "366", "nightguard.gcp.snapshots.keep_days: must be between 1 and 365"),
    ("START_TIME", "03:30", "nightguard.gcp.snapshots.start_time: '03:30' is not a whole hour "
     "in UTC (HH:00, e.g. 03:00): the Compute API starts snapshot schedules on the hour"),
    ("START_TIME", "24:00", "'24:00' is not a whole hour"),
    ("START_TIME", "3:00", "'3:00' is not a whole hour"),
])
def test_bad_snapshot_settings_are_one_line(tmp_path, key, value, expected):
    with pytest.raises(ConfigError) as caught:
        load_settings(root=tmp_path, environ={f"NIGHTGUARD_GCP_SNAPSHOTS_{key}": value})
    assert one_line(caught).startswith(f"environment (NIGHTGUARD_GCP_SNAPSHOTS_{key}): ")
    assert expected in str(caught.value)
