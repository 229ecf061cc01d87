"""The installed distribution: no top-level `tasks` (a name any project may use), the package
as nightguard_deploy with the sandbox's guest files, and the `nightguard` command reading the
project folder it runs in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tasks.config import project_root

ROOT = Path(__file__).resolve().parents[2]


def test_the_project_is_the_checkout_else_the_nearest_folder_with_invoke_yaml(tmp_path):
    assert project_root() == ROOT  # a checkout: tasks.py beside the package
    elsewhere = tmp_path / "site-packages"  # an installed copy: no tasks.py beside it
    elsewhere.mkdir()
    project = tmp_path / "project"
    (project / "deep" / "er").mkdir(parents=True)
    (project / "invoke.yaml").write_text("nightguard: {}\n")
    assert project_root(project / "deep" / "er", checkout=elsewhere) == project
    alone = tmp_path / "alone"
    alone.mkdir()
    assert project_root(alone, checkout=elsewhere) == alone


def test_an_installed_copy_has_no_top_level_tasks_and_runs_in_the_project_folder(tmp_path):
    site = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            "--no-build-isolation", "--no-index", "--disable-pip-version-check",
                            "--target", str(site), str(ROOT)],
                           capture_output=True, text=True, cwd=tmp_path)
    assert built.returncode == 0, built.stdout + built.stderr
    installed = {p.name for p in site.iterdir()}
    assert "nightguard_deploy" in installed and "tasks" not in installed, installed
    assert not (site / "tasks.py").exists()
    cloud = site / "nightguard_deploy/sandbox/guest-cloud/usr/local/sbin/ng-guest-agent"
    assert cloud.is_file() and (site / "nightguard_deploy/hostside/server.py").is_file()
    assert (site / "nightguard_deploy/contract.py").is_file()
    [info] = site.glob("nightguard_deploy-*.dist-info")
    assert "nightguard = nightguard_deploy.program:main" in \
        (info / "entry_points.txt").read_text()
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "invoke.yaml").write_text("nightguard:\n  sandbox:\n    name: elsewhere\n")
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); import nightguard_deploy; "
            "print(nightguard_deploy.__file__); "
            "from nightguard_deploy.program import main; main(['nightguard', 'config'])")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=project / "sub", timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert shown.stdout.splitlines()[0].startswith(str(site))  # the installed copy ran
    assert "sandbox.name = 'elsewhere'  [invoke.yaml]" in shown.stdout
