"""Lint as part of the test command: ruff, shellcheck, hadolint, and the compose file."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(argv):
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)


def test_ruff_clean():
    result = _run([str(BIN / "ruff"), "check", "."])
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_clean():
    scripts = sorted(str(p) for p in [*ROOT.glob("deployment/*.sh"), *ROOT.glob("scripts/*.sh")])
    if not any("deployment/" in s for s in scripts):
        pytest.fail("deployment/*.sh missing")
    result = _run([str(BIN / "shellcheck"), "--severity=style", *scripts])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_clean():
    dockerfile = ROOT / "deployment" / "Dockerfile.nightguard"
    assert dockerfile.exists()
    result = _run([str(BIN / "hadolint"), "--ignore", "DL3008", str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr
