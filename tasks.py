"""Entry point for ``inv``: hands over the root collection built in the ``tasks/`` package.

Invoke loads this file as a plain module named ``tasks``, which hides the package of the
same name; so the package is loaded here under that name before anything imports it.
"""

import importlib.util
import sys
from pathlib import Path

_package_dir = Path(__file__).resolve().with_name("tasks")
_spec = importlib.util.spec_from_file_location(
    "tasks", _package_dir / "__init__.py", submodule_search_locations=[str(_package_dir)]
)
_package = importlib.util.module_from_spec(_spec)
sys.modules["tasks"] = _package
_spec.loader.exec_module(_package)

ns = _package.ns
