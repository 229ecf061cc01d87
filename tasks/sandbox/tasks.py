"""`inv sandbox.*`: boot, stop, reboot and enter the local sandbox VMs (see
``tasks.sandbox.machine``).

Config keys: ``nightguard.sandbox.name``, ``nightguard.sandbox.os``.
Where the sandbox cannot run (no QEMU; no Linux, root or mmdebstrap for the first image
build) `sandbox.up` prints one line on what it needs and exits 2 (``tasks.sandbox.support``).
"""

from __future__ import annotations

import subprocess

from invoke import Collection, Exit, task

from tasks.errors import EXIT_CONFIG
from tasks.sandbox.machine import down, ensure_up, reboot, ssh_argv, status, target
from tasks.sandbox.support import SandboxUnavailable

NAME_HELP = "sandbox name (default: default); several can run at once"
TIMEOUT_HELP = "seconds to wait for ssh (default 300; an image build comes on top)"


@task(
    help={
        "name": NAME_HELP,
        "os": "bookworm (Debian 12, Podman 4.3) or trixie (Debian 13, Podman 5.4)",
        "fresh": "throw the sandbox's disk away first",
        "timeout": TIMEOUT_HELP,
    }
)
def up(c, name="default", os="bookworm", fresh=False, timeout=300):
    """Boot a sandbox VM (1 GB, 2 vCPUs, Podman), building its image once; wait for ssh."""
    if not fresh and status(name) == "up":
        print(f"sandbox {name}: already up (ssh port {target(name)['port']})")
        return
    try:
        ensure_up(name, os_flavour=os, fresh=fresh, timeout=float(timeout))
    except SandboxUnavailable as err:  # nothing was started: say what this machine lacks
        raise Exit(f"sandbox.up: {err}", code=EXIT_CONFIG) from None
    except (ValueError, RuntimeError, TimeoutError, OSError,
            subprocess.CalledProcessError) as err:
        raise Exit(f"sandbox.up: {err}", code=1) from None


@task(name="down", help={"name": NAME_HELP, "destroy": "also remove the sandbox's disk and state"})
def down_task(c, name="default", destroy=False):
    """Shut a sandbox VM down (clean poweroff, killed after a timeout)."""
    down(name, destroy=destroy)


@task(name="status", help={"name": NAME_HELP})
def status_task(c, name="default"):
    """Print one of: absent, down, booting, up (up: ssh answers)."""
    print(status(name))


@task(help={"name": NAME_HELP, "command": "run this one command and exit with its exit code"})
def ssh(c, name="default", command=None):
    """Open a shell as ubuntu on a sandbox VM, or run one command."""
    try:
        argv = ssh_argv(name, command)
    except RuntimeError as err:
        raise Exit(str(err), code=2) from None
    rc = subprocess.call(argv)
    if rc:
        raise Exit(code=rc)


@task(name="reboot", help={"name": NAME_HELP, "timeout": TIMEOUT_HELP})
def reboot_task(c, name="default", timeout=300):
    """Reboot a sandbox VM and wait until ssh is back."""
    try:
        reboot(name, timeout=float(timeout))
    except (RuntimeError, TimeoutError) as err:
        raise Exit(f"sandbox.reboot: {err}", code=1) from None


ns = Collection("sandbox", up, down_task, status_task, ssh, reboot_task)
