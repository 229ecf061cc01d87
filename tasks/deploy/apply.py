"""Operations: each function changes one thing on the host, only when the plan says so.

The orchestrator (``tasks.deploy``) decides order, locking and rollback; these functions
only translate a planned change into commands for the one ``Remote``.
"""

from __future__ import annotations

import secrets as random_names

from tasks.config import Settings
from tasks.deploy import commands as cmd
from tasks.deploy.facts import call, unit_path
from tasks.deploy.plan import Desired
from tasks.deploy.remote import Remote
from tasks.deploy.sync import Delta, delta_tarball


def podman_at_least(facts: dict, wanted: tuple[int, int]) -> bool:
    version = facts.get("podman") or "0.0"
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= wanted


def setup_swap(remote: Remote, settings: Settings) -> None:
    script = cmd.swap_script(settings.size("limits.swap_size"), settings["limits.swappiness"])
    remote.run(cmd.sudo(["sh", "-c", script]), step="host.swap")


def remove_env_file(remote: Remote, settings: Settings) -> None:
    remote.run(cmd.sudo(["rm", "-f", f"{settings['app_dir']}/.env"]), step="host.env")


def sync_code(remote: Remote, settings: Settings, desired: Desired, delta: Delta) -> dict:
    tarball = ""
    if delta.changed:
        data = delta_tarball(settings.path("source_dir"), delta.changed)
        tarball = f"/tmp/nightguard-delta-{random_names.token_hex(6)}.tar.gz"
        remote.put(data, tarball, step="sync")
    return call(remote, settings, "sync", step="sync", changes=True, tarball=tarball,
                files=list(delta.changed), delete=list(delta.deleted),
                all_files=sorted(desired.manifest))


def push_secrets(remote: Remote, settings: Settings, facts: dict, names: list[str],
                 values: dict[str, str]) -> None:
    rootful = not settings["rootless"]
    replace = podman_at_least(facts, (4, 7))
    for name in names:
        if not replace and name in facts.get("secrets", {}):
            remote.run(cmd.secret_rm(name, rootful=rootful), step=f"secrets.{name}")
        remote.run(cmd.secret_create(name, replace=replace and name in facts.get("secrets", {}),
                                     rootful=rootful),
                   step=f"secrets.{name}", stdin=values[name])


def build_image(remote: Remote, settings: Settings, desired: Desired) -> None:
    context = f"{settings['app_dir']}/deployment"
    remote.run(cmd.image_build(desired.image_ref, f"{context}/Dockerfile.nightguard", context,
                               settings["base_image"], rootful=not settings["rootless"]),
               step="image", timeout=1800)


def install_unit(remote: Remote, settings: Settings, unit_text: str) -> None:
    rootful = not settings["rootless"]
    path = unit_path(settings, remote.target.user)
    if not rootful:
        remote.run(["mkdir", "-p", path.rsplit("/", 1)[0]], step="unit")
        remote.run(["loginctl", "enable-linger", remote.target.user], step="unit")
    # One remote command: every process start costs on a small VM.
    remote.run(cmd.sudo(cmd.install_unit(path, cmd.unit_name(settings["container_name"]),
                                         rootful=rootful), rootful),
               step="unit", stdin=unit_text)


def restart_container(remote: Remote, settings: Settings) -> None:
    remote.run(cmd.systemctl("restart", cmd.unit_name(settings["container_name"]),
                             rootful=not settings["rootless"]), step="container", timeout=360)


def limit_drift(settings: Settings, container: dict, cgroup: dict) -> list[str]:
    """Differences between the limits asked for and those really in force."""
    memory = settings.size("limits.memory")
    swap_total = settings.size("limits.memory_swap")
    wanted = {"memory": memory, "memory_swap": swap_total,
              "memory_reservation": settings.size("limits.memory_reservation"),
              "nano_cpus": int(float(settings["limits.cpus"]) * 1e9)}
    drift = [f"{key} is {container.get(key)} (want {value})" for key, value in wanted.items()
             if container.get(key) != value]
    if cgroup.get("swap") not in (None, "") and cgroup.get("memory") is not None:
        if cgroup["memory"] != str(memory):
            drift.append(f"cgroup memory.max is {cgroup['memory']} (want {memory})")
        if cgroup["swap"] != str(swap_total - memory):
            drift.append(f"cgroup memory.swap.max is {cgroup['swap']} "
                         f"(want {swap_total - memory})")
    elif cgroup.get("memsw") is not None and cgroup["memsw"] != str(swap_total):
        drift.append(f"cgroup memory.memsw.limit_in_bytes is {cgroup['memsw']} "
                     f"(want {swap_total})")
    return drift


def wait_healthy(remote: Remote, settings: Settings) -> dict:
    """Verify the limits in force, then wait for healthy; returns the gate's answer."""
    deadline = settings["health.deadline"]
    answer = call(remote, settings, "gate", step="health", changes=False,
                  deadline=deadline, timeout=deadline + 60)
    if answer.get("container") and answer.get("cgroup") is not None:
        drift = limit_drift(settings, answer["container"], answer.get("cgroup") or {})
        if drift:
            answer["healthy"] = False
            answer["reason"] = "limits not in force: " + "; ".join(drift)
    return answer


def prune_images(remote: Remote, settings: Settings, facts: dict, keep: set[str]) -> int:
    stale = [f"{settings['image_name']}:{tag}" for tag in facts.get("image_tags", [])
             if tag not in keep]
    if stale:
        remote.run(cmd.image_rm(stale, rootful=not settings["rootless"]), step="prune",
                   check=False)
    return len(stale)

