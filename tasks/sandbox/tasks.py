"""`inv sandbox.*`: boot, stop, reboot and enter the local sandbox VMs (see
``tasks.sandbox.machine``).

Config keys: ``nightguard.sandbox.name``, ``nightguard.sandbox.os``: what `--name` and
`--os` default to (a flag given wins), read like every task's settings (``inv config``).
Where the sandbox cannot run (no QEMU; no Linux, root or mmdebstrap for the first image
build) `sandbox.up` prints one line on what it needs and exits 2 (``tasks.sandbox.support``).
"""

from __future__ import annotations

import subprocess

from invoke import Collection, Exit, task

from ..cli import one_line_errors, settings_for
from ..errors import EXIT_CONFIG
from .machine import down, ensure_up, reboot, ssh_argv, status, target
from .support import SandboxUnavailable

NAME_HELP = "sandbox name (default: nightguard.sandbox.name); several can run at once"
TIMEOUT_HELP = "seconds to wait for ssh (default 300; an image build comes on top)"


def sandbox_settings(c, name: str | None = None, os: str | None = None) -> tuple[str, str]:
    """(name, os) of the sandbox a task acts on: the flags, else the configuration."""
    settings = settings_for(c, "sandbox", sandbox__name=name, sandbox__os=os)
    return settings["sandbox.name"], settings["sandbox.os"]


@task(
    help={
        "name": NAME_HELP,
        "os": "bookworm (Debian 12, Podman 4.3), trixie (Debian 13, Podman 5.4), or "
              "bookworm-cloud (Debian 12 booting like a new Compute Engine VM: no Podman, "
              "unattended-upgrades, the login user made late from the metadata) "
              "(default: nightguard.sandbox.os)",
        "fresh": "throw the sandbox's disk away first",
        "timeout": TIMEOUT_HELP,
        "metadata": "bookworm-cloud: the metadata server its guest asks (a local fake of the "
                    "Compute API, e.g. http://127.0.0.1:PORT)",
    }
)
@one_line_errors
def up(c, name=None, os=None, fresh=False, timeout=300, metadata=None):
    """Boot a sandbox VM (1 GB, 2 vCPUs, Podman), building its image once; wait for ssh."""
    name, os = sandbox_settings(c, name, os)
    if not fresh and status(name) == "up":
        print(f"sandbox {name}: already up (ssh port {target(name)['port']})")
        return
    try:
        ensure_up(name, os_flavour=os, fresh=fresh, timeout=float(timeout), metadata=metadata)
    except SandboxUnavailable as err:  # nothing was started: say what this machine lacks
        raise Exit(f"sandbox.up: {err}", code=EXIT_CONFIG) from None
    except (ValueError, RuntimeError, TimeoutError, OSError,
            subprocess.CalledProcessError) as err:
        raise Exit(f"sandbox.up: {err}", code=1) from None


@task(name="down", help={"name": NAME_HELP, "destroy": "also remove the sandbox's disk and state"})
@one_line_errors
def down_task(c, name=None, destroy=False):
    """Shut a sandbox VM down (clean poweroff, killed after a timeout)."""
    name, _ = sandbox_settings(c, name)
    down(name, destroy=destroy)


@task(name="status", help={"name": NAME_HELP})
@one_line_errors
def status_task(c, name=None):
    """Print one of: absent, down, booting, up (up: ssh answers)."""
    name, _ = sandbox_settings(c, name)
    print(status(name))


@task(help={"name": NAME_HELP, "command": "run this one command and exit with its exit code"})
@one_line_errors
def ssh(c, name=None, command=None):
    """Open a shell as ubuntu on a sandbox VM, or run one command."""
    name, _ = sandbox_settings(c, name)
    try:
        argv = ssh_argv(name, command)
    except RuntimeError as err:
        raise Exit(str(err), code=2) from None
    rc = subprocess.call(argv)
    if rc:
        raise Exit(code=rc)


@task(name="reboot", help={"name": NAME_HELP, "timeout": TIMEOUT_HELP})
@one_line_errors
def reboot_task(c, name=None, timeout=300):
    """Reboot a sandbox VM and wait until ssh is back."""
    name, _ = sandbox_settings(c, name)
    try:
        reboot(name, timeout=float(timeout))
    except (RuntimeError, TimeoutError) as err:
        raise Exit(f"sandbox.reboot: {err}", code=1) from None


ns = Collection("sandbox", up, down_task, status_task, ssh, reboot_task)
