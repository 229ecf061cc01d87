#!/usr/bin/env python3
"""Stand-in for a program the host helper only looks for (crun, conmon, netavark...):
present on the fake host, and recorded if anything ever runs it."""

import os
import sys

from common import record

if __name__ == "__main__":
    record(os.path.basename(sys.argv[0]), sys.argv[1:])
