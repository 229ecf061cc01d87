"""Pure builders: each returns the argv list (or file text) for one thing to do on a host.

Nothing here connects anywhere; ``tasks.remote`` runs what these return. Unit tests
compare the lists. A new Podman flag touches this file and its test only.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field

STATE_DIR = "/var/lib/nightguard"


def sudo(argv: list[str], rootful: bool = True) -> list[str]:
    """Prefix with non-interactive sudo: a password prompt would hang the run."""
    return ["sudo", "-n", *argv] if rootful else list(argv)


def podman(*args: str, rootful: bool = True) -> list[str]:
    return sudo(["podman", *args], rootful)


def content_hash(*parts: str | bytes, length: int = 12) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:length]


# -- container spec ---------------------------------------------------------------------
@dataclass(frozen=True)
class ContainerSpec:
    """Everything the container is started with. Its hash goes into a label, so the
    next run can tell whether the running container matches what is wanted."""

    name: str
    image: str
    app_dir: str
    memory: str
    memory_reservation: str
    memory_swap: str
    cpus: float
    secrets: tuple[str, ...]
    health_cmd: str
    health_interval: str
    health_timeout: str
    health_retries: int
    health_start_period: str
    environment: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] = ()
    health_on_failure: str = "kill"
    labels: tuple[tuple[str, str], ...] = field(default=())

    def spec_hash(self) -> str:
        data = {k: v for k, v in self.__dict__.items() if k != "labels"}
        return content_hash(json.dumps(data, sort_keys=True, default=list))


def run_args(spec: ContainerSpec) -> list[str]:
    """The ``podman run`` flags (after ``run``) for the Night Guard container."""
    argv = [
        "--name", spec.name,
        "--memory", spec.memory,
        "--memory-reservation", spec.memory_reservation,
        "--memory-swap", spec.memory_swap,
        "--cpus", f"{spec.cpus:g}",
        "--volume", f"{spec.app_dir}:/app:Z",
        "--health-cmd", spec.health_cmd,
        "--health-interval", spec.health_interval,
        "--health-timeout", spec.health_timeout,
        "--health-retries", str(spec.health_retries),
        "--health-start-period", spec.health_start_period,
    ]
    if spec.health_on_failure:
        argv += ["--health-on-failure", spec.health_on_failure]
    for secret in spec.secrets:
        # File-mounted under /run/secrets: env-type secrets would show in `podman inspect`.
        argv += ["--secret", f"{secret},type=mount,mode=0400,uid=1000"]
    for key, value in spec.environment:
        argv += ["--env", f"{key}={value}"]
    for key, value in (("nightguard.spec", spec.spec_hash()), *spec.labels):
        argv += ["--label", f"{key}={value}"]
    argv.append(spec.image)
    argv += list(spec.command)
    return argv


def unit_name(container: str) -> str:
    return f"container-{container}.service"


def systemd_unit(spec: ContainerSpec, *, rootful: bool = True) -> str:
    """A unit like ``podman generate systemd --new`` writes: every (re)start creates a
    fresh container, so secrets and code are re-read; Restart=always brings it back after
    a crash, after --health-on-failure=kill, and after a reboot."""
    run = shlex.join(["/usr/bin/podman", "run", "--cidfile=%t/%n.ctr-id",
                      "--cgroups=no-conmon", "--rm", "--sdnotify=conmon", "--replace",
                      "--detach", *run_args(spec)])
    stop = "/usr/bin/podman stop --ignore --time 10 --cidfile=%t/%n.ctr-id"
    remove = "/usr/bin/podman rm --force --ignore --time 10 --cidfile=%t/%n.ctr-id"
    wanted_by = "multi-user.target" if rootful else "default.target"
    # systemd expands % and $ in ExecStart; a literal % or $ in a flag must be doubled.
    run = run.replace("%", "%%").replace("%%t/%%n", "%t/%n").replace("$", "$$")
    return "\n".join([
        "# Written by nightguard-deploy; changes here are overwritten by the next deploy.",
        "[Unit]",
        f"Description=Night Guard agent ({spec.name})",
        "Wants=network-online.target",
        "After=network-online.target",
        "RequiresMountsFor=%t/containers",
        "",
        "[Service]",
        "Environment=PODMAN_SYSTEMD_UNIT=%n",
        "Restart=always",
        "RestartSec=2",
        "TimeoutStartSec=300",
        "TimeoutStopSec=30",
        # Podman 4.3 refuses to start while a stale id file from the last run exists.
        "ExecStartPre=/bin/rm -f %t/%n.ctr-id",
        f"ExecStart={run}",
        f"ExecStop={stop}",
        f"ExecStopPost={remove}",
        "Type=notify",
        "NotifyAccess=all",
        "",
        "[Install]",
        f"WantedBy={wanted_by}",
        "",
    ])


# -- host set-up --------------------------------------------------------------------------
def swap_script(size_bytes: int, swappiness: int, path: str = "/swapfile") -> str:
    """Idempotent swapfile set-up: create only if absent or of the wrong size, mode 600,
    one fstab line, swappiness persisted."""
    size_mb = size_bytes // (1024 * 1024)
    return f"""set -eu
f={path}
want={size_bytes}
if ! swapon --show=NAME --noheadings | grep -qx "$f"; then
  if [ ! -f "$f" ] || [ "$(stat -c %s "$f")" -ne "$want" ]; then
    rm -f "$f"
    fallocate -l {size_mb}M "$f" || dd if=/dev/zero of="$f" bs=1M count={size_mb} status=none
  fi
  chmod 600 "$f"
  mkswap "$f" >/dev/null
  swapon "$f"
fi
chmod 600 "$f"
grep -qE "^$f[[:space:]]" /etc/fstab || echo "$f none swap sw 0 0" >> /etc/fstab
echo "vm.swappiness={swappiness}" > /etc/sysctl.d/99-nightguard.conf
sysctl -q -w vm.swappiness={swappiness}
"""


def write_file(path: str, mode: str = "0644") -> list[str]:
    """Write stdin to ``path`` atomically (temp file, then rename)."""
    script = f'set -eu; t="$(mktemp {shlex.quote(path)}.XXXXXX)"; cat > "$t"; ' \
             f'chmod {mode} "$t"; mv -f "$t" {shlex.quote(path)}'
    return ["sh", "-c", script]


def install_unit(path: str, unit: str, *, rootful: bool = True) -> list[str]:
    """Write the unit from stdin, reload systemd and enable the unit, in one command."""
    user = "" if rootful else " --user"
    script = write_file(path)[2] + f"; systemctl{user} daemon-reload; " \
        f"systemctl{user} enable --quiet {shlex.quote(unit)}"
    return ["sh", "-c", script]


def systemctl(*args: str, rootful: bool = True) -> list[str]:
    if rootful:
        return sudo(["systemctl", *args])
    return ["systemctl", "--user", *args]


# -- secrets ------------------------------------------------------------------------------
def secret_create(name: str, *, replace: bool = False, rootful: bool = True) -> list[str]:
    """The value is read from stdin ('-'), never passed as an argument."""
    return podman("secret", "create", *(["--replace"] if replace else []), name, "-",
                  rootful=rootful)


def secret_rm(name: str, *, rootful: bool = True) -> list[str]:
    return podman("secret", "rm", name, rootful=rootful)


# -- images -------------------------------------------------------------------------------
def image_build(tag: str, dockerfile: str, context: str, base_image: str,
                *, rootful: bool = True) -> list[str]:
    # --format docker: the OCI format silently drops HEALTHCHECK.
    return podman("build", "--format", "docker", "--pull=never" if base_image.startswith(
        "localhost/") else "--pull=missing", "--file", dockerfile, "--build-arg",
        f"BASE_IMAGE={base_image}", "--tag", tag, context, rootful=rootful)


def image_rm(refs: list[str], *, rootful: bool = True) -> list[str]:
    return podman("rmi", "--ignore", *refs, rootful=rootful)


# -- reading back -------------------------------------------------------------------------
def inspect_container(name: str, *, rootful: bool = True) -> list[str]:
    return podman("container", "inspect", name, rootful=rootful)


def healthcheck_run(name: str, *, rootful: bool = True) -> list[str]:
    return podman("healthcheck", "run", name, rootful=rootful)


def logs(name: str, *, tail: int | None = None, since: str | None = None,
         follow: bool = False, rootful: bool = True) -> list[str]:
    argv = ["logs", "--timestamps"]
    if tail is not None:
        argv += ["--tail", str(tail)]
    if since:
        argv += ["--since", since]
    if follow:
        argv.append("--follow")
    return podman(*argv, name, rootful=rootful)
