"""bench/deploy_bench.py's options, without booting anything: the yardstick is an argument
(a fresh clone has none), and without one the bench measures `inv deploy` alone and says
so."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("deploy_bench", ROOT / "bench/deploy_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_yardstick_ours_is_measured_alone(bench):
    args = bench.parse_args([])
    assert (args.yardstick, args.runs, args.os) == (None, 3, "bookworm")
    rows = {("ours", k): [{"seconds": s}] for k, s in (("cold", 70.0), ("no-op", 9.4))}
    rows.update({("script", k): [] for k in ("cold", "no-op")})
    assert bench.table(rows, ("cold", "no-op")) == [
        "kind         ours s  script s  ratio",
        "cold           70.0         -      -",
        "no-op           9.4         -      -",
        "(script: no yardstick given (--yardstick PATH, e.g. ../shared/bench/manual-deploy.sh): "
        "measuring `inv deploy` alone)"]


def test_a_yardstick_is_compared_with(bench):
    rows = {("ours", "cold"): [{"seconds": 78.2}], ("script", "cold"): [{"seconds": 76.1}]}
    assert bench.table(rows, ("cold",))[1:] == ["cold           78.2      76.1   1.03"]


def test_a_yardstick_that_is_not_there_stops_in_one_line(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(["--yardstick", str(tmp_path / "manual-deploy.sh")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"--yardstick {tmp_path}/manual-deploy.sh: no such file\n"
    script = tmp_path / "manual-deploy.sh"
    script.write_text("#!/bin/bash\n")
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(["--yardstick", str(script)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (f"--yardstick {script}: no app/ beside it (the tree the "
                                       "script deploys)\n")
    (tmp_path / "app").mkdir()
    assert bench.parse_args(["--yardstick", str(script), "--runs", "1"]).yardstick == script
