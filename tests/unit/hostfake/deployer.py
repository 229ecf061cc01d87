"""`inv deploy` against the fake host: a copy of the project tree with a .env, and a
``Deployer`` that runs tasks.deploy.pipeline.run_deploy through a LocalRemote (the fixtures
``project``, ``host`` and ``deploy`` in tests/unit/conftest.py hand them to tests).

    deploy = Deployer(project, host)
    deploy()                                   # the project's settings
    deploy(deploy.settings(keep_images=1))     # others; refresh=True, dry_run=True
    deploy.last.text, deploy.last.ops          # what the last run printed and asked for
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tasks.config import load_settings
from tasks.deploy.pipeline import run_deploy
from tasks.deploy.secretstore import load_secret_values
from tasks.deploy.sync import local_manifest, rules_for
from tests.unit.hostfake import FakeHost, LocalRemote

ROOT = Path(__file__).resolve().parents[3]
TOKEN, GEMINI = "tg-local-9f3c1a7b55d2", "gem-local-4be0c2d97a61"


def write_env(project: Path, token: str = TOKEN, gemini: str = GEMINI) -> None:
    path = project / ".env"
    path.write_text(f"TELEGRAM_BOT_TOKEN={token}\nGEMINI_API_KEY={gemini}\n")
    path.chmod(0o600)


def copy_project(root: Path) -> Path:
    """The project's syncable files and invoke.yaml under root, with a .env."""
    for rel in local_manifest(ROOT, rules_for(load_settings(environ={}))):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, root / rel)
    shutil.copy2(ROOT / "invoke.yaml", root / "invoke.yaml")
    write_env(root)
    return root


class Deployer:
    """`inv deploy` without preflight's SSH target: settings from the copied tree."""

    def __init__(self, project: Path, host: FakeHost):
        self.project, self.host = project, host
        self.remotes: list[LocalRemote] = []

    def settings(self, **overrides):
        return load_settings(root=self.project, environ={}, overrides={
            "app_dir": str(self.host.app_dir), "data_dir": str(self.host.data_dir),
            "limits.swap_size": "16m", "health.deadline": 5, **overrides})

    def remote(self, **kwargs) -> LocalRemote:
        kwargs.setdefault("redact", load_secret_values(self.settings()).redact)
        remote = LocalRemote(self.host, **kwargs)
        self.remotes.append(remote)
        return remote

    def __call__(self, settings=None, refresh: bool = False, **kwargs) -> dict:
        settings = settings or self.settings()
        values = load_secret_values(settings)
        manifest = local_manifest(settings.path("source_dir"), rules_for(settings, values.values))
        return run_deploy(settings, values, manifest, self.remote(**kwargs), refresh=refresh)

    @property
    def last(self) -> LocalRemote:
        return self.remotes[-1]
