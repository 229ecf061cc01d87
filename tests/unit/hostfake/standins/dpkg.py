#!/usr/bin/env python3
"""Stand-in for dpkg: `--configure -a` finishes nothing (no half-installed package here).
Control file: fail-dpkg."""

import sys

from common import fail_if_told, record

if __name__ == "__main__":
    record("dpkg", sys.argv[1:])
    fail_if_told("dpkg", sys.argv[1:])
