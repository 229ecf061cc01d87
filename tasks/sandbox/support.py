"""Can this machine run the sandbox? What it lacks, as one line, or None.

Checked before anything starts, so that `inv sandbox.up` on a Mac, or on a Linux machine
without QEMU, ends with one line saying what it needs instead of a traceback halfway through
an image build. Booting needs QEMU and OpenSSH's client (any Unix); building the image, once
per machine, needs Linux, root and mmdebstrap. An image built on a Linux machine boots
elsewhere too: its cache folder (``tasks.sandbox.image.cache_dir()``, with the login key)
can be copied over.

Without a sandbox the deploy goes to a real VM (``REAL_VM``).
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path


class SandboxUnavailable(RuntimeError):
    """This machine cannot boot or build the sandbox; ``str()`` is one line."""


BOOT_TOOLS = ("qemu-system-x86_64", "qemu-img", "ssh", "ssh-keygen")
BUILD_TOOLS = ("mmdebstrap", "mkfs.ext4", "chroot")
REAL_VM = "or deploy to a real VM: `inv deploy --host HOST` (or nightguard.target: gcp)"


def _hint() -> str:
    """How to get the missing tools on this system."""
    if platform.system() == "Darwin":
        return "brew install qemu"  # ssh and ssh-keygen come with macOS
    if shutil.which("apt-get"):
        return "`bash scripts/bootstrap.sh` installs them"
    return "install them with the system's package manager"


def boot_problem() -> str | None:
    """Why a sandbox cannot boot here, or None."""
    missing = [tool for tool in BOOT_TOOLS if shutil.which(tool) is None]
    if not missing:
        return None
    return f"the sandbox needs {', '.join(missing)} on PATH ({_hint()}); {REAL_VM}"


def build_problem(cache: Path) -> str | None:
    """Why the sandbox image cannot be built here, or None."""
    system = platform.system()
    if system != "Linux":  # mmdebstrap and chroot into a Debian tree: Linux only
        return (f"no sandbox image here yet, and building one needs Linux with mmdebstrap "
                f"(this is {system}): build it on a Linux host or VM and copy {cache} here, "
                f"{REAL_VM}")
    if os.geteuid() != 0:
        return (f"building the sandbox image needs root (mmdebstrap --mode=root, chroot); "
                f"{REAL_VM}")
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        return (f"building the sandbox image needs {', '.join(missing)} on PATH "
                f"({_hint()}); {REAL_VM}")
    return None


def require_boot() -> None:
    if problem := boot_problem():
        raise SandboxUnavailable(problem)


def require_build(cache: Path) -> None:
    if problem := build_problem(cache):
        raise SandboxUnavailable(problem)
