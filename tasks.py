"""Entry point for ``inv``: hands over the root collection built in the ``tasks/`` package.

Invoke loads this file as a plain module named ``tasks``, which hides the package of the
same name; so the package is loaded here under that name before anything imports it.
Invoke then merges its config files and INVOKE_* variables with the collection's defaults
and dies with a traceback on what it cannot merge (a file that is not YAML, a mapping in
the place of a value); that is refused here first, in one line (exit 2).
"""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

_root = Path(__file__).resolve().parent
_package_dir = _root / "tasks"
_spec = importlib.util.spec_from_file_location(
    "tasks", _package_dir / "__init__.py", submodule_search_locations=[str(_package_dir)]
)
_package = importlib.util.module_from_spec(_spec)
sys.modules["tasks"] = _package
_spec.loader.exec_module(_package)


def _refuse_broken_config() -> None:
    checks = importlib.import_module("tasks.invoke_config")
    errors = importlib.import_module("tasks.errors")
    try:
        checks.refuse_what_invoke_cannot_merge(
            _root, os.environ, checks.running_runtime_path(os.environ))
    except errors.ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(errors.EXIT_CONFIG)


_refuse_broken_config()

ns = _package.ns
