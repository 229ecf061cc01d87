#!/usr/bin/env python3
"""Stand-in for journalctl: prints the lines of the control file "journal" (a list), as
`journalctl -o cat` would print the unit's messages; an empty journal without one.
Control files: fail-journalctl."""

from __future__ import annotations

import sys

from common import control, fail_if_told, record

if __name__ == "__main__":
    record("journalctl", sys.argv[1:])
    fail_if_told("journalctl", sys.argv[1:])
    for line in control("journal", []):
        print(line)
