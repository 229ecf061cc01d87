"""Secrets from .env: file checks, python-dotenv parse errors, and values never shown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.config import load_settings
from tasks.deploy.envfile import SecretValues, parse_env_text
from tasks.deploy.secretstore import load_secret_values
from tasks.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "123456:tg-token-value-Zq9"
GEMINI = "AIzaSy-gemini-value-Xw3"


def settings_in(root: Path, **environ: str):
    return load_settings(root=root, environ=environ, overrides=None)


def write_env(root: Path, text: str, mode: int = 0o600, name: str = ".env") -> Path:
    path = root / name
    path.write_text(text)
    path.chmod(mode)
    return path


def error_of(root: Path, names: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_secret_values(settings_in(root), names)
    message = str(info.value)
    assert "\n" not in message
    assert TOKEN not in message and GEMINI not in message
    return message


def test_happy_path_returns_every_secret(tmp_path):
    write_env(tmp_path, f"# comment\n\nTELEGRAM_BOT_TOKEN={TOKEN}\n"
                        f"export GEMINI_API_KEY='{GEMINI}'  # inline comment\nUNUSED=1\n")
    values = load_secret_values(settings_in(tmp_path))
    assert values.values == {"telegram_bot_token": TOKEN, "gemini_api_key": GEMINI}


def test_names_restricts_what_is_read_and_checked(tmp_path):
    write_env(tmp_path, f"TELEGRAM_BOT_TOKEN={TOKEN}\n")  # GEMINI_API_KEY absent
    values = load_secret_values(settings_in(tmp_path), ["telegram_bot_token"])
    assert values.values == {"telegram_bot_token": TOKEN}


def test_env_file_setting_points_elsewhere(tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    write_env(other, f"TELEGRAM_BOT_TOKEN={TOKEN}\nGEMINI_API_KEY={GEMINI}\n", name="s.env")
    settings = settings_in(tmp_path, NIGHTGUARD_ENV_FILE=str(other / "s.env"))
    assert load_secret_values(settings).values["gemini_api_key"] == GEMINI


def test_missing_file(tmp_path):
    message = error_of(tmp_path)
    assert message.startswith(".env: not found")
    assert ".env.example" in message


@pytest.mark.parametrize(("mode", "who"), [(0o644, "world"), (0o604, "world"), (0o666, "world"),
                                           (0o640, "group"), (0o620, "group")])
def test_a_file_others_can_read_is_refused_with_the_chmod_to_run(tmp_path, mode, who):
    write_env(tmp_path, f"TELEGRAM_BOT_TOKEN={TOKEN}\nGEMINI_API_KEY={GEMINI}\n", mode=mode)
    message = error_of(tmp_path)
    assert message == f".env: is {who}-accessible (run: chmod 600 {tmp_path / '.env'})"


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = write_env(tmp_path, "", mode=0o600)
    path.write_bytes(f"\ufeffTELEGRAM_BOT_TOKEN={TOKEN}\nGEMINI_API_KEY={GEMINI}\n"
                     .encode())
    assert load_secret_values(settings_in(tmp_path)).values["telegram_bot_token"] == TOKEN


def test_a_byte_that_is_not_utf8_is_named_by_its_line(tmp_path):
    path = write_env(tmp_path, "", mode=0o600)
    path.write_bytes(f"TELEGRAM_BOT_TOKEN={TOKEN}\n# note\n".encode()
                     + b"GEMINI_API_KEY=\xe9t\xe9\n")
    assert error_of(tmp_path) == ".env: line 3 is not UTF-8 (save the file as UTF-8)"


def test_a_key_set_twice_names_both_lines(tmp_path):
    write_env(tmp_path, f"TELEGRAM_BOT_TOKEN={TOKEN}\nGEMINI_API_KEY={GEMINI}\n\n"
              "TELEGRAM_BOT_TOKEN=second\n", mode=0o600)
    message = error_of(tmp_path)
    assert message == ".env: TELEGRAM_BOT_TOKEN is set twice (lines 1 and 4)"
    assert "second" not in message


def test_missing_key(tmp_path):
    write_env(tmp_path, f"TELEGRAM_BOT_TOKEN={TOKEN}\n")
    message = error_of(tmp_path)
    assert message == ".env: GEMINI_API_KEY is missing (needed for secret gemini_api_key)"


@pytest.mark.parametrize("line", ["GEMINI_API_KEY=", "GEMINI_API_KEY=''", 'GEMINI_API_KEY="   "'])
def test_empty_key(tmp_path, line):
    write_env(tmp_path, f"TELEGRAM_BOT_TOKEN={TOKEN}\n{line}\n")
    message = error_of(tmp_path)
    assert message == ".env: GEMINI_API_KEY is empty (needed for secret gemini_api_key)"


def test_multi_line_secret_is_refused_without_showing_it(tmp_path):
    write_env(tmp_path, f'TELEGRAM_BOT_TOKEN="{TOKEN}\nsecond-line"\nGEMINI_API_KEY={GEMINI}\n')
    message = error_of(tmp_path)
    assert "TELEGRAM_BOT_TOKEN spans several lines" in message
    assert "second-line" not in message


def test_multi_line_value_of_an_unused_key_is_fine(tmp_path):
    write_env(tmp_path, f'NOTE="line one\nline two"\nTELEGRAM_BOT_TOKEN={TOKEN}\n'
                        f"GEMINI_API_KEY={GEMINI}\n")
    assert load_secret_values(settings_in(tmp_path)).values["gemini_api_key"] == GEMINI


@pytest.mark.parametrize(("text", "expected"), [
    ("A=1\ngarbage line without equals\n", ".env: line 2 is not KEY=VALUE"),
    ("A=1\nKEY\n", ".env: line 2 has no '=' (expected KEY=VALUE)"),
    ("A=1\n=value\n", ".env: line 2 is not KEY=VALUE"),
    ('A=1\nKEY="abc\n', ".env: line 2 is not KEY=VALUE"),
    ("A=1\nKEY='abc\n", ".env: line 2 is not KEY=VALUE"),
    ('A=1\nB="x\ny"\nbad line here\n', ".env: line 4 is not KEY=VALUE"),
    # blank lines and comments before the bad line still count
    ("# c\n\nKEY\n", ".env: line 3 has no '=' (expected KEY=VALUE)"),
    ("A=1\n\n# comment\n\n=oops\n", ".env: line 5 is not KEY=VALUE"),
    ("A=1\n  \n\t\nB=\"abc\n", ".env: line 4 is not KEY=VALUE"),
])
def test_malformed_lines_are_errors_with_their_line(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_env_text(text, ".env")
    assert str(info.value) == expected


def test_a_pasted_bare_value_is_not_echoed(tmp_path):
    write_env(tmp_path, f"GEMINI_API_KEY={GEMINI}\n{TOKEN}\n")
    message = error_of(tmp_path)
    assert message.startswith(".env: line 2 ")


def test_parse_env_text_values():
    text = ('A=1\nexport B="two words"\nC=\'single # not a comment\'\nD=x # comment\n'
            'E="multi\nline"\n')
    assert parse_env_text(text, ".env") == {
        "A": "1", "B": "two words", "C": "single # not a comment", "D": "x",
        "E": "multi\nline"}


# -- values never shown -----------------------------------------------------------------------
def test_secret_values_repr_shows_names_only():
    values = SecretValues({"telegram_bot_token": TOKEN, "gemini_api_key": GEMINI})
    shown = repr(values) + str(values) + f"{values}" + f"{values!r}"
    assert TOKEN not in shown and GEMINI not in shown
    assert "gemini_api_key" in repr(values) and "telegram_bot_token" in repr(values)


def test_redact_masks_every_value_everywhere():
    values = SecretValues({"telegram_bot_token": TOKEN, "gemini_api_key": GEMINI, "unset": ""})
    text = f"echo {TOKEN} | x --key={GEMINI} && again {TOKEN}"
    redacted = values.redact(text)
    assert TOKEN not in redacted and GEMINI not in redacted
    assert redacted == "echo [REDACTED] | x --key=[REDACTED] && again [REDACTED]"
    assert values.redact("nothing secret") == "nothing secret"


def _inv_config(env_file: Path, *args: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTGUARD_")}
    environ["NIGHTGUARD_ENV_FILE"] = str(env_file)
    inv = Path(sys.executable).parent / "inv"
    return subprocess.run([str(inv), "config", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [(), ("--json",)])
def test_inv_config_never_prints_secret_values(tmp_path, args):
    env_file = write_env(tmp_path, f"TELEGRAM_BOT_TOKEN={TOKEN}\nGEMINI_API_KEY={GEMINI}\n",
                         name="secrets.env")
    result = _inv_config(env_file, *args)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert TOKEN not in output and GEMINI not in output
    assert "TELEGRAM_BOT_TOKEN" in output  # the key names are shown, the values are not
    if args:
        assert '"env_file": "ok"' in output
    else:
        assert "secrets check: ok" in output


def test_inv_config_reports_a_bad_env_file_without_failing(tmp_path):
    env_file = write_env(tmp_path, f"TELEGRAM_BOT_TOKEN={TOKEN}\nGEMINI_API_KEY={GEMINI}\n",
                         mode=0o644, name="secrets.env")
    result = _inv_config(env_file)
    assert result.returncode == 0, result.stderr
    assert "secrets.env: is world-accessible" in result.stdout
    assert TOKEN not in result.stdout + result.stderr
