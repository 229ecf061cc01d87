#!/usr/bin/env python3
"""Stand-in for apt-get: `update` prints what apt prints; `install` puts stand-ins for the
packages' programs into the fake host's tool dir (config "bin"), so facts see them.
Run as dpkg-query (`-W -f=...`): a package counts as installed when its programs are there.
Control files: fail-apt-get-update, fail-apt-get-install."""

from __future__ import annotations

import os
import sys

from common import CONFIG, fail_if_told, record

# package -> the programs the host helper looks for
PROGRAMS = {"podman": ["podman"], "crun": ["crun"], "conmon": ["conmon"],
            "netavark": ["netavark"], "aardvark-dns": ["aardvark-dns"],
            "iptables": ["iptables"], "nftables": ["nft"], "slirp4netns": ["slirp4netns"],
            "passt": ["pasta"], "uidmap": ["newuidmap"]}
HERE = os.path.dirname(os.path.realpath(__file__))


def install(packages: list[str]) -> None:
    for package in packages:
        if package not in PROGRAMS:
            sys.stderr.write(f"E: Unable to locate package {package}\n")
            sys.exit(100)
    for package in packages:
        print(f"Setting up {package} (1.0-1) ...", flush=True)
        for program in PROGRAMS[package]:
            source = os.path.join(HERE, "podman.py" if program == "podman" else "tool.py")
            link = os.path.join(CONFIG["bin"], program)
            if not os.path.lexists(link):
                os.symlink(source, link)


def query(argv: list[str]) -> None:
    """`dpkg-query -W -f='${Package} ${db:Status-Status}\\n' PKG...`, as dpkg answers it."""
    for package in [w for w in argv if not w.startswith("-")]:
        programs = PROGRAMS.get(package)
        if programs is None:
            sys.stderr.write(f"dpkg-query: no packages found matching {package}\n")
            continue
        there = all(os.path.lexists(os.path.join(CONFIG["bin"], p)) for p in programs)
        print(f"{package} {'installed' if there else 'not-installed'}")


def main(argv: list[str]) -> None:
    if os.path.basename(sys.argv[0]) == "dpkg-query":
        record("dpkg-query", argv)
        query(argv)
        return
    record("apt-get", argv)
    words = [w for w in argv if not w.startswith("-") and "::" not in w]
    if words[:1] == ["update"]:
        fail_if_told("apt-get-update", argv)
        print("Hit:1 http://deb.debian.org/debian bookworm InRelease\nReading package lists...")
    elif words[:1] == ["install"]:
        fail_if_told("apt-get-install", argv)
        install(words[1:])
    else:
        sys.stderr.write(f"E: the apt-get stand-in does not know {words[:1]}\n")
        sys.exit(100)


if __name__ == "__main__":
    main(sys.argv[1:])
