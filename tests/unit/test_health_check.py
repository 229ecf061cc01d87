"""Unit tests for execution/system/health_check.py (the container HEALTHCHECK)."""

import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "execution" / "system" / "health_check.py"
MB = 1024 * 1024
SECRET_VALUE = "123456:AAF-very-secret-token-value"


def _load():
    spec = importlib.util.spec_from_file_location("ng_health_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hc = _load()


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def env(tmp_path):
    """A healthy configuration: fresh heartbeat, secrets, dirs, a v2 cgroup."""
    app = tmp_path / "app"
    (app / "directives").mkdir(parents=True)
    (app / "knowledge").mkdir()
    secrets = tmp_path / "secrets"
    write(secrets / "telegram_bot_token", SECRET_VALUE + "\n")
    write(secrets / "gemini_api_key", "gemini-secret-key\n")
    heartbeat = write(tmp_path / "hb" / "heartbeat", "1\n")
    cgroup = tmp_path / "cgroup"
    write(cgroup / "memory.current", f"{100 * MB}\n")
    write(cgroup / "memory.max", f"{700 * MB}\n")
    write(cgroup / "memory.swap.current", "0\n")
    write(cgroup / "memory.swap.max", f"{2000 * MB}\n")
    return {
        "NG_APP_DIR": str(app),
        "NG_SECRETS_DIR": str(secrets),
        "NG_HEARTBEAT_FILE": str(heartbeat),
        "NG_CGROUP_ROOT": str(cgroup),
    }


def run_main(env, now=None):
    out = io.StringIO()
    code = hc.main(env=env, now=now, out=out)
    text = out.getvalue()
    return code, text, json.loads(text)


# --- heartbeat ----------------------------------------------------------------


def test_heartbeat_fresh(tmp_path):
    path = write(tmp_path / "hb", "x")
    result = hc.check_heartbeat(str(path), now=path.stat().st_mtime + 3.14, max_age=30)
    assert result == {"ok": True, "age_s": 3.1}


def test_heartbeat_stale(tmp_path):
    path = write(tmp_path / "hb", "x")
    result = hc.check_heartbeat(str(path), now=path.stat().st_mtime + 31, max_age=30)
    assert result["ok"] is False
    assert result["age_s"] == 31.0


def test_heartbeat_missing(tmp_path):
    result = hc.check_heartbeat(str(tmp_path / "nope"), now=time.time(), max_age=30)
    assert result == {"ok": False, "error": "missing"}


def test_heartbeat_mtime_in_future_counts_as_fresh(tmp_path):
    path = write(tmp_path / "hb", "x")
    result = hc.check_heartbeat(str(path), now=path.stat().st_mtime - 5, max_age=30)
    assert result == {"ok": True, "age_s": 0.0}


# --- polling --------------------------------------------------------------------


def polling(tmp_path, content, now, margin=30):
    path = write(tmp_path / "hb", content)
    return hc.check_polling(str(path), now=now, margin=margin)


def test_polling_progress_within_timeout_plus_margin(tmp_path):
    beat = '{"polled_at":1000.0,"poll_timeout":10}\n'
    assert polling(tmp_path, beat, now=1039.94) == {"ok": True, "state": "polling", "age_s": 39.9}
    assert polling(tmp_path, beat, now=1040.0)["ok"] is True
    assert polling(tmp_path, beat, now=1040.1) == {
        "ok": False,
        "state": "stalled",
        "age_s": 40.1,
        "max_age_s": 40.0,
    }
    assert polling(tmp_path, beat, now=1012.0, margin=1)["state"] == "stalled"


def test_polling_without_a_timeout_allows_the_margin_only(tmp_path):
    assert polling(tmp_path, '{"polled_at": 1000}', now=1031)["state"] == "stalled"
    assert polling(tmp_path, '{"polled_at": 1000, "poll_timeout": "x"}', now=1029)["ok"]


@pytest.mark.parametrize(
    "content",
    [
        "1733561234.567\n",
        "",
        "x",
        "{}",
        '{"beat": 1}',
        '{"polled_at": "soon"}',
        '{"polled_at": 1000',
        '{"polled_at": {"t": 1}}',
        "[1000]",
        "\xff\xfe",
    ],
)
def test_polling_not_reported_never_fails(tmp_path, content):
    # The reference agent writes a bare time; a user's own agent may write anything.
    assert polling(tmp_path, content, now=10**10) == {"ok": True, "state": "not_reported"}


def test_polling_missing_heartbeat_is_left_to_the_heartbeat_check(tmp_path):
    result = hc.check_polling(str(tmp_path / "nope"), now=time.time(), margin=30)
    assert result == {"ok": True, "state": "not_reported"}


def test_token_rejected_is_reported_not_failed(tmp_path):
    content = '{"token":"rejected","polled_at":1000.0,"poll_timeout":10}'
    assert polling(tmp_path, content, now=10**10) == {"ok": True, "state": "token_rejected"}


def test_parse_flat_object_agrees_with_json():
    for value in [
        {},
        {"polled_at": 1733561234.567, "poll_timeout": 10},
        {"token": "rejected"},
        {"s": 'q"\\\n\té€😀', "n": None, "t": True, "f": False, "e": -1.5e-3},
    ]:
        for text in (json.dumps(value), json.dumps(value, separators=(",", ":")) + "\n"):
            assert hc.parse_flat_object(text) == json.loads(text)
    for text in [
        "",
        "1.5",
        "[]",
        '{"a":{"b":1}}',
        '{"a":[1]}',
        '{"a":1',
        '{"a":1}x',
        "{a:1}",
        '{"a":NaN}',
        '{"a":"x}',
        '{"a":1,}',
        '{"a" 1}',
    ]:
        assert hc.parse_flat_object(text) is None, text


# --- secrets ------------------------------------------------------------------


def test_secrets_ok_missing_empty(tmp_path):
    write(tmp_path / "good", "value")
    write(tmp_path / "blank", " \n")
    result = hc.check_secrets(str(tmp_path), ["good", "blank", "absent"])
    assert result == {"ok": False, "problems": {"blank": "empty", "absent": "missing"}}
    assert hc.check_secrets(str(tmp_path), ["good"]) == {"ok": True}


def test_secret_name_cannot_escape_the_dir(tmp_path):
    result = hc.check_secrets(str(tmp_path), ["../etc/passwd"])
    assert result["problems"] == {"../etc/passwd": "invalid-name"}


def test_secret_values_never_appear_in_output(env, tmp_path):
    # Unhealthy run with every check reporting, including an empty and a missing secret.
    write(Path(env["NG_SECRETS_DIR"]) / "empty_one", "")
    env = dict(env, NG_REQUIRED_SECRETS="telegram_bot_token,gemini_api_key,empty_one,nope")
    code, text, report = run_main(env, now=time.time() + 999)
    assert code == 1
    assert report["checks"]["secrets"]["problems"] == {"empty_one": "empty", "nope": "missing"}
    assert SECRET_VALUE not in text
    assert "very-secret" not in text
    assert "gemini-secret-key" not in text


# --- dirs ---------------------------------------------------------------------


def test_dirs_ok_and_missing(tmp_path):
    (tmp_path / "directives").mkdir()
    write(tmp_path / "knowledge", "a file, not a dir")
    result = hc.check_dirs(str(tmp_path))
    assert result == {"ok": False, "problems": {"knowledge": "not-a-dir"}}
    (tmp_path / "knowledge").unlink()
    assert hc.check_dirs(str(tmp_path))["problems"] == {"knowledge": "missing"}
    (tmp_path / "knowledge").mkdir()
    assert hc.check_dirs(str(tmp_path)) == {"ok": True}


def test_dirs_unreadable(tmp_path, monkeypatch):
    # A permission error as a non-root user would get it (root lists anything).
    (tmp_path / "directives").mkdir()
    (tmp_path / "knowledge").mkdir()
    real_listdir = os.listdir

    def listdir(path):
        if str(path).endswith("directives"):
            raise PermissionError(13, "Permission denied", path)
        return real_listdir(path)

    monkeypatch.setattr(hc.os, "listdir", listdir)
    assert hc.check_dirs(str(tmp_path))["problems"] == {"directives": "unreadable"}


# --- memory -------------------------------------------------------------------


def test_memory_v2_with_swap(tmp_path):
    write(tmp_path / "memory.current", f"{650 * MB}\n")
    write(tmp_path / "memory.stat", f"anon 1\ninactive_file {20 * MB}\nactive_file 3\n")
    write(tmp_path / "memory.max", f"{700 * MB}\n")
    write(tmp_path / "memory.swap.current", f"{300 * MB}\n")
    write(tmp_path / "memory.swap.max", f"{2000 * MB}\n")
    mem = hc.read_cgroup_memory(str(tmp_path))
    assert mem["version"] == 2
    result, warnings = hc.check_memory(mem, warn_percent=90)
    assert result == {
        "ok": True,
        "used_mb": 630,
        "limit_mb": 700,
        "pct": 90.0,
        "swap_mb": 300,
        "swap_limit_mb": 2000,
    }
    assert warnings == ["memory 90% of 700 MB limit"]


def test_memory_v2_unlimited(tmp_path):
    write(tmp_path / "memory.current", f"{650 * MB}\n")
    write(tmp_path / "memory.max", "max\n")
    write(tmp_path / "memory.swap.max", "max\n")
    result, warnings = hc.check_memory(hc.read_cgroup_memory(str(tmp_path)), 90)
    assert result == {"ok": True, "used_mb": 650, "limit_mb": None}
    assert warnings == []


def test_memory_v1_memsw_near_oom(tmp_path):
    v1 = tmp_path / "memory"
    write(v1 / "memory.usage_in_bytes", f"{690 * MB}\n")
    write(v1 / "memory.limit_in_bytes", f"{700 * MB}\n")
    write(v1 / "memory.memsw.usage_in_bytes", f"{2600 * MB}\n")
    write(v1 / "memory.memsw.limit_in_bytes", f"{2700 * MB}\n")
    write(v1 / "memory.stat", "cache 5\ntotal_inactive_file 0\n")
    mem = hc.read_cgroup_memory(str(tmp_path))
    assert mem["version"] == 1
    result, warnings = hc.check_memory(mem, 90)
    assert result["swap_mb"] == 1910
    assert result["swap_limit_mb"] == 2000
    assert len(warnings) == 2
    assert warnings[1] == "memory+swap 96% of 2700 MB limit, OOM kill near"


def test_memory_v1_huge_limit_means_unlimited(tmp_path):
    v1 = tmp_path / "memory"
    write(v1 / "memory.usage_in_bytes", f"{100 * MB}\n")
    write(v1 / "memory.limit_in_bytes", "9223372036854771712\n")
    write(v1 / "memory.memsw.usage_in_bytes", f"{100 * MB}\n")
    write(v1 / "memory.memsw.limit_in_bytes", "9223372036854771712\n")
    result, warnings = hc.check_memory(hc.read_cgroup_memory(str(tmp_path)), 90)
    assert result == {"ok": True, "used_mb": 100, "limit_mb": None}
    assert warnings == []


def test_memory_no_cgroup(tmp_path):
    assert hc.read_cgroup_memory(str(tmp_path)) is None
    assert hc.check_memory(None, 90) == ({"ok": True, "limit_mb": None}, [])


def test_memory_warning_keeps_status_healthy(env):
    write(Path(env["NG_CGROUP_ROOT"]) / "memory.current", f"{680 * MB}\n")
    code, _, report = run_main(env)
    assert code == 0
    assert report["status"] == "healthy"
    assert report["warnings"] == ["memory 97% of 700 MB limit"]


# --- disk ---------------------------------------------------------------------


def test_disk(tmp_path):
    ok = hc.check_disk(str(tmp_path), 0)
    assert ok["ok"] is True and ok["free_mb"] >= 0
    full = hc.check_disk(str(tmp_path), 10**12)
    assert full["ok"] is False and full["min_mb"] == 10**12
    assert hc.check_disk(str(tmp_path / "gone"), 0) == {"ok": False, "error": "FileNotFoundError"}


# --- main: status, exit code, output shape --------------------------------------


def test_main_healthy_one_short_json_line(env):
    code, text, report = run_main(env)
    assert code == 0
    assert text.endswith("\n") and text.count("\n") == 1
    assert len(text) < 400
    assert report["status"] == "healthy"
    assert list(report["checks"]) == ["heartbeat", "polling", "secrets", "dirs", "memory", "disk"]
    assert report["checks"]["polling"] == {"ok": True, "state": "not_reported"}
    assert all(check["ok"] for check in report["checks"].values())
    assert report["warnings"] == []


@pytest.mark.parametrize(
    "change, later, failed",
    [
        ({}, 31, "heartbeat"),
        ({"NG_HEARTBEAT_MAX_AGE": "5"}, 6, "heartbeat"),
        ({"NG_REQUIRED_SECRETS": "telegram_bot_token,other"}, 0, "secrets"),
        ({"NG_MIN_FREE_DISK_MB": str(10**12)}, 0, "disk"),
    ],
)
def test_main_unhealthy(env, change, later, failed):
    code, _, report = run_main(dict(env, **change), now=time.time() + later)
    assert code == 1
    assert report["status"] == "unhealthy"
    assert [name for name, c in report["checks"].items() if not c["ok"]] == [failed]


def test_main_deaf_agent_unhealthy_while_it_beats(env):
    write(Path(env["NG_HEARTBEAT_FILE"]), f'{{"polled_at":{time.time() - 41},"poll_timeout":10}}')
    code, text, report = run_main(env)
    assert code == 1
    assert [name for name, c in report["checks"].items() if not c["ok"]] == ["polling"]
    assert report["checks"]["heartbeat"]["ok"] is True
    assert report["checks"]["polling"]["state"] == "stalled"
    assert run_main(dict(env, NG_POLL_MARGIN="60"))[0] == 0


def test_main_token_rejected_healthy_with_a_warning(env):
    write(Path(env["NG_HEARTBEAT_FILE"]), '{"token":"rejected"}\n')
    code, _, report = run_main(env)
    assert code == 0 and report["status"] == "healthy"
    assert report["checks"]["polling"] == {"ok": True, "state": "token_rejected"}
    assert report["warnings"] == ["telegram rejected the bot token: the agent stopped polling"]


def test_main_missing_dirs_unhealthy(env):
    (Path(env["NG_APP_DIR"]) / "knowledge").rmdir()
    code, _, report = run_main(env)
    assert code == 1
    assert report["checks"]["dirs"]["problems"] == {"knowledge": "missing"}


def test_bad_number_falls_back_with_warning(env):
    code, _, report = run_main(dict(env, NG_HEARTBEAT_MAX_AGE="soon"))
    assert code == 0
    assert report["warnings"] == ["bad NG_HEARTBEAT_MAX_AGE, using 30"]
    code, _, report = run_main(dict(env, NG_POLL_MARGIN="-5"))
    assert code == 0
    assert report["warnings"] == ["bad NG_POLL_MARGIN, using 30"]


def test_broken_check_still_prints_json(env, monkeypatch):
    def boom(*args):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(hc, "check_dirs", boom)
    code, _, report = run_main(env)
    assert code == 1
    assert report["checks"]["dirs"] == {"ok": False, "error": "RuntimeError"}


def test_to_json_matches_json_module():
    value = {"a": [1, 2.5, None, True, False], "b": 'q"\\\n\x01é€😀', "c": {}, "d": []}
    assert json.loads(hc.to_json(value)) == value
    assert "\n" not in hc.to_json(value)
    assert hc.to_json(float("nan")) == "null"


def test_script_as_subprocess(env, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=dict(os.environ, **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    assert json.loads(proc.stdout)["status"] == "healthy"

    env = dict(env, NG_REQUIRED_SECRETS="missing_one")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], env=dict(os.environ, **env), capture_output=True
    )
    assert proc.returncode == 1
    assert proc.stdout.count(b"\n") == 1


def test_default_app_dir_is_two_levels_up():
    assert Path(hc.default_app_dir()) == ROOT


def test_imports_stay_light():
    # json pulls in re and enum and doubles the start-up time of each health check run.
    code = (
        "import sys; before = set(sys.modules);"
        f"path = {str(SCRIPT)!r};"
        "exec(compile(open(path).read(), path, 'exec'), {'__name__': 'hc', '__file__': path});"
        "heavy = {'json', 're', 'argparse', 'enum', 'threading'} & (set(sys.modules) - before);"
        "print(sorted(heavy))"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=10
    )
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
