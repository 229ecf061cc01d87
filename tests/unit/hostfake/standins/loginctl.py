#!/usr/bin/env python3
"""Stand-in for `loginctl enable-linger USER`: makes the linger flag file systemd would
(config "linger_dir"), unless the control file fail-loginctl says the user may not (as
polkit answers an unprivileged user on some hosts)."""

from __future__ import annotations

import os
import sys

from common import CONFIG, fail_if_told, record

if __name__ == "__main__":
    record("loginctl", sys.argv[1:])
    fail_if_told("loginctl", sys.argv[1:])
    if sys.argv[1:2] != ["enable-linger"] or len(sys.argv) != 3:
        sys.stderr.write(f"the loginctl stand-in does not know {sys.argv[1:]}\n")
        sys.exit(1)
    os.makedirs(CONFIG["linger_dir"], exist_ok=True)
    open(os.path.join(CONFIG["linger_dir"], sys.argv[2]), "w").close()
