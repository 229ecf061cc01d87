"""Entry point for ``inv``: hands over the root collection built in the ``tasks/`` package.

Invoke loads this file as a plain module named ``tasks``, which hides the package of the
same name; so the package is loaded here under that name before anything imports it.
"""

import importlib.util
import sys
from pathlib import Path


def _refuse_broken_project_config() -> None:
    """Invoke reads invoke.yaml after loading this file and dies with a traceback on a
    syntax error; say it in one line (exit 2) instead."""
    import yaml

    path = Path(__file__).resolve().with_name("invoke.yaml")
    try:
        yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        sys.stderr.write(f"error: invoke.yaml:{where} is not valid YAML\n")
        sys.exit(2)


_refuse_broken_project_config()

_package_dir = Path(__file__).resolve().with_name("tasks")
_spec = importlib.util.spec_from_file_location(
    "tasks", _package_dir / "__init__.py", submodule_search_locations=[str(_package_dir)]
)
_package = importlib.util.module_from_spec(_spec)
sys.modules["tasks"] = _package
_spec.loader.exec_module(_package)

ns = _package.ns
