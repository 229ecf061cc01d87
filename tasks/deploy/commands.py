"""Pure builders: each returns the argv list (or file text) for one thing to do on a host.

Nothing here connects anywhere: the host helper runs what these return (sent by
``tasks.deploy.apply`` through ``tasks.deploy.session``). Unit tests compare the lists.
A new Podman flag touches this file and its test only.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass

from ..contract import ALERTS_ARGS_FILE, ROOTLESS_STATE, STATE_DIR, WATCH_UNIT, WATCHER_FILE

# the rootless state dir as a systemd user unit names it (%h: the user's home)
ROOTLESS_STATE_DIR = "%h/" + ROOTLESS_STATE.removeprefix("~/")


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
    """Everything the unit starts the container with. Its hash is part of the release's
    version, which the container carries (``NG_RELEASE_*`` from ``markers_file``), so the
    next run can tell whether the running container is the one wanted."""

    name: str
    image: str
    app_dir: str
    data_dir: str
    markers_file: str
    memory: str
    memory_reservation: str
    memory_swap: str
    cpus: float
    network: str
    secrets: tuple[str, ...]
    health_cmd: str
    health_interval: str
    health_timeout: str
    health_retries: int
    health_start_period: str
    environment: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] = ()
    health_on_failure: str = "kill"
    # systemd's watchdog (WatchdogSec=) on the unit; 0: none, the container only says READY
    # through conmon and liveness is the health check's alone
    watchdog_sec: int = 0

    def spec_hash(self) -> str:
        return content_hash(json.dumps(self.__dict__, sort_keys=True, default=list))


APP_MOUNT = "/app"
DATA_MOUNT = "/data"


def run_args(spec: ContainerSpec) -> list[str]:
    """The ``podman run`` flags (after ``run``) for the Night Guard container.

    The agent is internet-facing and runs an LLM: it gets its code read-only, one
    writable data dir, no capabilities and no way to gain privileges."""
    argv = [
        "--name", spec.name,
        "--memory", spec.memory,
        "--memory-reservation", spec.memory_reservation,
        "--memory-swap", spec.memory_swap,
        "--cpus", f"{spec.cpus:g}",
        "--network", spec.network,
        "--volume", f"{spec.app_dir}:{APP_MOUNT}:ro,Z",
        "--volume", f"{spec.data_dir}:{DATA_MOUNT}:Z,U",
        "--cap-drop", "all",
        "--security-opt", "no-new-privileges",
        "--health-cmd", spec.health_cmd,
        "--health-interval", spec.health_interval,
        "--health-timeout", spec.health_timeout,
        "--health-retries", str(spec.health_retries),
        "--health-start-period", spec.health_start_period,
    ]  # fmt: skip
    if spec.health_on_failure:
        argv += ["--health-on-failure", spec.health_on_failure]
    for secret in spec.secrets:
        # File-mounted under /run/secrets: env-type secrets would show in `podman inspect`.
        argv += ["--secret", f"{secret},type=mount,mode=0400,uid=1000"]
    for key, value in (("NG_DATA_DIR", DATA_MOUNT), *spec.environment):
        argv += ["--env", f"{key}={value}"]
    # read when the container is created: what it carries is what it was started with
    argv += ["--env-file", spec.markers_file]
    argv.append(spec.image)
    argv += list(spec.command)
    return argv


def unit_name(container: str) -> str:
    return f"container-{container}.service"


def liveness_lines(spec: ContainerSpec) -> list[str]:
    """With a watchdog: the container's PID 1 (ng-supervise) kills a hung or deaf agent
    itself (the container exits 120/121 and Restart=always restarts it), says READY=1
    after the agent's first heartbeat and WATCHDOG=1 at each check (conmon forwards both,
    NotifyAccess=all); without a ping for WatchdogSec - the container frozen as a whole, or
    ng-supervise stuck - systemd kills conmon (SIGKILL: no core dump) and restarts the
    unit. The container, in a scope of its own, outlives
    conmon: after a watchdog kill ($SERVICE_RESULT) ExecStopPost removes it at once (else
    --replace would wait out its stop timeout); after any other stop it is already gone,
    and a podman process there would only cost seconds of every restart. ExecStartPost
    runs the full health check once, so Podman reads "healthy" from the start instead of
    after the first (long) interval."""
    if not spec.watchdog_sec:
        return []
    name = shlex.quote(spec.name)
    return [f"WatchdogSec={spec.watchdog_sec}", "WatchdogSignal=SIGKILL",
            f"ExecStartPost=-/usr/bin/podman healthcheck run {name}",
            "ExecStopPost=-/bin/sh -c 'test \"$$SERVICE_RESULT\" != watchdog || exec "
            "/usr/bin/podman rm --force --ignore --time 0 --cidfile=%t/%n.ctr-id'"]


def systemd_unit(spec: ContainerSpec, *, rootful: bool = True) -> str:
    """A unit like ``podman generate systemd --new`` writes: every (re)start creates a
    fresh container, so secrets, code and release markers are re-read; Restart=always
    brings it back after a crash, after --health-on-failure=kill, after the watchdog's
    kill (a hung or deaf agent) and after a reboot."""
    notify = "--sdnotify=container" if spec.watchdog_sec else "--sdnotify=conmon"
    run = shlex.join(["/usr/bin/podman", "run", "--cidfile=%t/%n.ctr-id",
                      "--cgroups=no-conmon", "--rm", notify, "--replace",
                      "--detach", *run_args(spec)])
    stop = "/usr/bin/podman stop --ignore --time 10 --cidfile=%t/%n.ctr-id"
    # Without a watchdog no ExecStopPost `podman rm`: --rm removes the container when it
    # stops, and --replace takes over a name a crash left behind.
    wanted_by = "multi-user.target" if rootful else "default.target"
    # systemd expands % and $ in ExecStart; a literal % or $ in a flag must be doubled.
    run = run.replace("%", "%%").replace("%%t/%%n", "%t/%n").replace("%%h/", "%h/")
    run = run.replace("$", "$$")
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
        "Type=notify",
        "NotifyAccess=all",
        *liveness_lines(spec),
        "",
        "[Install]",
        f"WantedBy={wanted_by}",
        "",
    ])


def markers_text(markers: dict[str, str]) -> str:
    """The release markers file the unit hands to ``podman run --env-file``."""
    return "".join(f"{key}={markers[key]}\n" for key in sorted(markers))


def systemctl(*args: str, rootful: bool = True) -> list[str]:
    return ["systemctl", *args] if rootful else ["systemctl", "--user", *args]


def bootstrap(code: str, rootful: bool = True) -> list[str]:
    """The one command a task runs on the host: the helper's bootstrap (see hostlink)."""
    return sudo(["python3", "-c", code], rootful)


# -- images -------------------------------------------------------------------------------
def image_build(tag: str, dockerfile: str, context: str, base_image: str,
                needs_network: bool = True) -> list[str]:
    """Runs as the helper's user (root, or the SSH user when rootless): no sudo here.
    --format docker: the OCI format silently drops HEALTHCHECK. --layers=false: one
    commit for the whole image, not one per instruction (seconds on a small VM).
    --pull=never: the deploy has pulled (or imported) the base first and put its id in the
    tag, so the build uses exactly that base (a `--pull=missing` build would keep an old
    base for ever, and a pull here could bring one the tag does not name).
    --network=none when nothing is to be downloaded: faster, and nothing can leak."""
    network = [] if needs_network else ["--network=none"]
    return ["podman", "build", "--format", "docker", "--layers=false", "--pull=never",
            *network,
            "--file", dockerfile, "--build-arg", f"BASE_IMAGE={base_image}", "--tag", tag,
            context]


def image_pull(name: str) -> list[str]:
    """The base image from its registry (a deploy whose host lacks it, or --refresh)."""
    return ["podman", "pull", name]


def image_import(archive: str, name: str) -> list[str]:
    """The base image from an archive on the host, for a storage that lacks it and a host
    that reaches no registry (the sandbox's rootless user)."""
    return ["podman", "import", archive, name]


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


# -- the alert watcher ----------------------------------------------------------------------
def watcher_paths(rootful: bool = True) -> tuple[str, str]:
    """(the watcher's program, its arguments file) as a unit file names them."""
    state = STATE_DIR if rootful else ROOTLESS_STATE_DIR
    return f"{state}/{WATCHER_FILE}", f"{state}/{ALERTS_ARGS_FILE}"


def watcher_code(folder: str) -> str:
    """`python3 -c` code for one pass: the watcher imported as a module from `folder`
    (appended to the path: the standard library comes first), so Python keeps its compiled
    bytecode in `folder`/__pycache__ - run as a script, its lines would be compiled
    again every pass (about twice the CPU)."""
    return (f"import sys; sys.path.append('{folder}'); import watcher; "
            "sys.exit(watcher.watch_main(sys.argv[1:]))")


def watcher_service(*, rootful: bool = True) -> str:
    """One watch pass (the host helper's watcher mode): Type=oneshot, started by the
    timer. No secret in it: the watcher reads the bot's token from Podman when it sends.
    -I -S: the standard library only, nothing from the environment or site-packages."""
    script, args = watcher_paths(rootful)
    return "\n".join([
        "# Written by nightguard-deploy; changes here are overwritten by the next deploy.",
        "[Unit]",
        "Description=Night Guard alerts: one watch pass (health, restarts, swap, disk)",
        "",
        "[Service]",
        "Type=oneshot",
        f'ExecStart=/usr/bin/python3 -I -S -c "{watcher_code(script.rsplit("/", 1)[0])}" '
        f"{args}",
        "TimeoutStartSec=120",
        "Nice=10",
        "",
    ])


def watcher_dropin(*, rootful: bool = True) -> str:
    """The watcher's drop-in for the agent's unit: a pass right after each start (a crash's
    restart, a watchdog's or a health check's kill, a reboot), after the unit's own
    ExecStartPost health check, and one when the unit fails for good. --no-block: the
    agent's start never waits for a pass, nor for Telegram."""
    systemctl_path = "/usr/bin/systemctl" + ("" if rootful else " --user")
    return "\n".join([
        "# Written by nightguard-deploy (alerts); removed when alerts are turned off.",
        "[Unit]",
        f"OnFailure={WATCH_UNIT}.service",
        "",
        "[Service]",
        f"ExecStartPost=-{systemctl_path} start --no-block {WATCH_UNIT}.service",
        "",
    ])


def watcher_timer(interval_seconds: int) -> str:
    """A pass every ``interval_seconds``: the first one shortly after the timer starts (at
    boot, or when a deploy installs it), then relative to the last pass. AccuracySec: the
    default of one minute would blur a 30 s interval."""
    return "\n".join([
        "# Written by nightguard-deploy; changes here are overwritten by the next deploy.",
        "[Unit]",
        f"Description=Night Guard alerts: a watch pass every {interval_seconds}s",
        "",
        "[Timer]",
        "OnActiveSec=15s",
        f"OnUnitActiveSec={interval_seconds}s",
        "AccuracySec=1s",
        f"Unit={WATCH_UNIT}.service",
        "",
        "[Install]",
        "WantedBy=timers.target",
        "",
    ])
