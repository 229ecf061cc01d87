#!/usr/bin/env python3
"""Stand-ins for fallocate, dd, mkswap, swapon and swapoff (one script, named by its link).

  fallocate -l SIZE FILE         a sparse file of SIZE bytes
  dd if=/dev/zero of=FILE bs=1M count=N   the same, the slow way
  mkswap FILE                    writes the swap signature (SWAPSPACE2 at 4086)
  swapon FILE                    refuses a file without the signature or already on;
                                 else adds its line to the fake /proc/swaps (config
                                 "proc_swaps"), under the name the host would show
                                 (config "swap_names", default the file's path)
  swapoff FILE                   takes its line out of the fake /proc/swaps
Control files: fail-fallocate, fail-mkswap, fail-swapon, fail-swapoff, fail-dd.
"""

from __future__ import annotations

import os
import sys

from common import CONFIG, fail_if_told, parse_size, record

SIGNATURE_AT, SIGNATURE = 4086, b"SWAPSPACE2"


def die(message: str, code: int = 1) -> None:
    sys.stderr.write(message + "\n")
    sys.exit(code)


def make_file(path: str, size: int) -> None:
    with open(path, "wb") as handle:
        handle.truncate(size)


def swapon(path: str) -> None:
    name = CONFIG.get("swap_names", {}).get(path, path)
    with open(CONFIG["proc_swaps"]) as handle:
        lines = handle.read().splitlines()
    if any(line.split()[:1] == [name] for line in lines[1:]):
        die(f"swapon: {path}: swapon failed: Device or resource busy", 255)
    with open(path, "rb") as handle:
        handle.seek(SIGNATURE_AT)
        if handle.read(len(SIGNATURE)) != SIGNATURE:
            die(f"swapon: {path}: read swap header failed", 255)
    size_kb = os.path.getsize(path) // 1024 - 4
    with open(CONFIG["proc_swaps"], "a") as handle:
        handle.write(f"{name}\tfile\t\t{size_kb}\t\t0\t\t-2\n")


def swapoff(path: str) -> None:
    name = CONFIG.get("swap_names", {}).get(path, path)
    with open(CONFIG["proc_swaps"]) as handle:
        lines = handle.read().splitlines()
    kept = [line for line in lines[1:] if line.split()[:1] != [name]]
    if len(kept) == len(lines) - 1:
        die(f"swapoff: {path}: swapoff failed: Invalid argument", 255)
    with open(CONFIG["proc_swaps"], "w") as handle:
        handle.write("\n".join([lines[0], *kept]) + "\n")


def main(tool: str, argv: list[str]) -> None:
    record(tool, argv)
    fail_if_told(tool, argv)
    if tool == "fallocate":
        make_file(argv[-1], parse_size(argv[argv.index("-l") + 1]))
    elif tool == "dd":
        opts = dict(word.split("=", 1) for word in argv if "=" in word)
        make_file(opts["of"], parse_size(opts.get("bs", "512")) * int(opts.get("count", 0)))
    elif tool == "mkswap":
        with open(argv[-1], "r+b") as handle:
            handle.seek(SIGNATURE_AT)
            handle.write(SIGNATURE)
        print(f"Setting up swapspace version 1, size = {os.path.getsize(argv[-1])} bytes")
    elif tool == "swapon":
        swapon(argv[-1])
    elif tool == "swapoff":
        swapoff(argv[-1])
    else:
        die(f"the swap stand-in does not know {tool}")


if __name__ == "__main__":
    main(os.path.basename(sys.argv[0]), sys.argv[1:])
