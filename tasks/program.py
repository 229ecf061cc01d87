"""`nightguard TASK ...`: the same tasks as `inv TASK ...`, from an installed copy.

`pip install .` (or `pipx install PATH`) installs this project as the package
``nightguard_deploy`` - no top-level ``tasks``, a name any other project may use - and the
command ``nightguard``. Run in a project's folder (one holding invoke.yaml, .env, the
agent's code: ``tasks.config.project_root`` looks from the current folder up), it reads the
same configuration `inv` reads there: Invoke's project file is that folder's invoke.yaml,
as if a tasks.py stood beside it. Inside a checkout, `inv` and `nightguard` are the same.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

from invoke import Program

from . import ns
from .config import PROJECT_ROOT
from .errors import EXIT_CONFIG, ConfigError
from .invoke_config import refuse_what_invoke_cannot_merge, running_runtime_path


class NightGuardProgram(Program):
    def parse_collection(self) -> None:
        super().parse_collection()
        # Invoke loads a project's invoke.yaml from where it found tasks.py; the installed
        # command brings its collection along, so the project is the folder it runs in
        self.config.set_project_location(str(PROJECT_ROOT))
        self.config.load_project()


def version() -> str:
    try:
        return metadata.version("nightguard-deploy")
    except metadata.PackageNotFoundError:
        return "unknown"


program = NightGuardProgram(namespace=ns, name="Night Guard Deploy", binary="nightguard",
                            binary_names=["nightguard"], version=version())


def main(argv: list[str] | None = None) -> None:
    try:  # what tasks.py refuses before Invoke merges its config, refused here too
        refuse_what_invoke_cannot_merge(PROJECT_ROOT, os.environ,
                                        running_runtime_path(os.environ))
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(EXIT_CONFIG)
    program.run(argv)
