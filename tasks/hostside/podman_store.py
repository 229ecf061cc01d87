"""Readers of Podman's own files: images, secrets (names, and a value read on the
host only) and the agent's container (its OCI config, pid file and health log), with
the podman CLI as the fallback where a file is not where this Podman keeps it."""

import base64
import datetime
import json
import os
import re

from ..contract import HEARTBEAT_FILE, OUR_MOUNTS
from .base import pid_alive, read_json, read_text, sh, version_tuple


def storage_names(paths):
    """Image names, secret names and container ids from Podman's own JSON files; None for a
    part whose file is absent or unreadable (the caller then asks the podman CLI)."""
    images = read_json(os.path.join(paths["graphroot"], "overlay-images", "images.json"),
                       None)
    secrets = read_json(os.path.join(paths["graphroot"], "secrets", "secrets.json"), None)
    folder = os.path.join(paths["graphroot"], "overlay-containers")
    # Podman 5 keeps --rm ("volatile") containers apart, in volatile-containers.json
    found = [read_json(os.path.join(folder, name), None)
             for name in ("containers.json", "volatile-containers.json")]
    if any(isinstance(part, list) for part in found):
        containers = [c for part in found if isinstance(part, list) for c in part]
    else:  # none yet: an empty store (its lock exists), or one this helper cannot read
        containers = [] if os.path.exists(os.path.join(folder, "containers.lock")) else None
    return images, secrets, containers


def list_images(paths, name, images=None):
    if images is None:
        images, _, _ = storage_names(paths)
    if isinstance(images, list):
        names = [n for image in images for n in image.get("names") or []]
    else:
        code, out, _ = sh(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"])
        names = out.split() if code == 0 else []
    tags = sorted({n.rsplit(":", 1)[1] for n in names if n.rsplit(":", 1)[0] == name})
    return names, tags


def image_info(paths, name, images=None):
    """Id, digest and creation time of image NAME (the base image): from Podman's
    images.json, else `podman image inspect`. None when the storage lacks it. "created" is
    when the image was built (its config's date), so it tells how old a base image is."""
    if not name:
        return None
    if images is None:
        images, _, _ = storage_names(paths)
    wanted = {name} if ":" in name.rsplit("/", 1)[-1] or "@" in name else {name,
                                                                          f"{name}:latest"}
    if isinstance(images, list):
        image = next((i for i in images if wanted & set(i.get("names") or [])), None)
        return None if image is None else {
            "name": name, "id": image.get("id"), "digest": image.get("digest"),
            "created": image.get("created")}
    code, out, _ = sh(["podman", "image", "inspect", name])
    if code != 0:
        return None
    try:
        data = json.loads(out)[0]
    except (ValueError, IndexError):
        return None
    return {"name": name, "id": data.get("Id"), "digest": data.get("Digest"),
            "created": data.get("Created")}


def list_secrets(paths, secrets=None):
    """Name -> creation time."""
    if secrets is None:
        _, secrets, _ = storage_names(paths)
    if isinstance(secrets, dict) and isinstance(secrets.get("secrets"), dict):
        return {s.get("name"): s.get("createdAt", "") for s in secrets["secrets"].values()}
    if not os.path.exists(os.path.join(paths["graphroot"], "secrets")):
        if secrets is None and os.path.isdir(paths["graphroot"]):
            return {}
    code, out, _ = sh(["podman", "secret", "ls", "--noheading", "--format",
                       "{{.Name}}|{{.CreatedAt}}"])
    pairs = (line.split("|", 1) for line in out.splitlines() if "|" in line)
    return {name: created for name, created in pairs} if code == 0 else {}


def secret_value(paths, name, podman_version_text):
    """A secret's value, read on the host only (never sent back): Podman >= 4.7 shows it
    to its owner; older Podman keeps it in its file driver's store."""
    if version_tuple(podman_version_text) >= (4, 7):
        code, out, _ = sh(["podman", "secret", "inspect", "--showsecret", "--format",
                           "{{.SecretData}}", name])
        if code == 0:
            return out.rstrip("\n").encode()
    store = read_json(os.path.join(paths["graphroot"], "secrets", "secrets.json"), {})
    secret_id = (store.get("nameToID") or {}).get(name)
    if secret_id is None:
        return None
    data = read_json(os.path.join(paths["graphroot"], "secrets", "filedriver",
                                  "secretsdata.json"), {})
    encoded = data.get(secret_id)
    return None if encoded is None else base64.b64decode(encoded)


_ISO_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def iso_epoch(text):
    """Podman's RFC 3339 times (nanoseconds, Z or an offset) as Unix time; None if not one."""
    found = _ISO_TIME.match(str(text or "").strip())
    if not found:
        return None
    whole, fraction, zone = found.groups()
    stamp = datetime.datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    return stamp.timestamp() + float("0" + (fraction or ".0"))


def passed_at(health):
    """When the last health check started, if it passed (None otherwise)."""
    log = (health or {}).get("Log") or []
    if not log or log[-1].get("ExitCode") != 0:
        return None
    return iso_epoch(log[-1].get("Start"))


def container_from_files(paths, name, containers):
    """The container's state from its OCI config, pid file and health log: what crun was
    really given (env, limits, mounts), without a podman process. None if not found."""
    entry = next((c for c in containers if name in (c.get("names") or [])), None)
    if entry is None:
        return {"absent": True}
    cid = entry["id"]
    config = read_json(os.path.join(paths["graphroot"], "overlay-containers", cid,
                                    "userdata", "config.json"), None)
    if not isinstance(config, dict):
        return None
    run_dir = os.path.join(paths["runroot"], "overlay-containers", cid)
    pid = read_text(os.path.join(run_dir, "userdata", "pidfile"))
    alive = pid_alive(pid)
    if alive:  # pid reuse: the pid must still be in this container's cgroup
        alive = cid in (read_text(f"{paths['proc']}/{pid}/cgroup") or cid)
    health = None
    for candidate in (os.path.join(run_dir, "healthcheck.log"),
                      os.path.join(run_dir, "userdata", "healthcheck.log"),
                      os.path.join(paths["graphroot"], "overlay-containers", cid, "userdata",
                                   "healthcheck.log")):
        health = read_json(candidate, None)
        if health is not None:
            break
    resources = (config.get("linux") or {}).get("resources") or {}
    memory = resources.get("memory") or {}
    cpu = resources.get("cpu") or {}
    env = dict(item.split("=", 1) for item in (config.get("process") or {}).get("env", [])
               if "=" in item)
    mounts = [{"destination": m.get("destination"), "source": m.get("source"),
               "options": m.get("options") or []} for m in config.get("mounts") or []
              if (m.get("destination") or "").startswith(OUR_MOUNTS)]
    quota, period = cpu.get("quota") or 0, cpu.get("period") or 0
    return {
        "id": cid, "running": bool(alive), "pid": int(pid) if alive else 0,
        "status": "running" if alive else "exited",
        "image": json.loads(entry.get("metadata") or "{}").get("image-name", ""),
        "created": entry.get("created"),
        "markers": {k: v for k, v in env.items() if k.startswith("NG_RELEASE_")},
        "heartbeat_file": env.get("NG_HEARTBEAT_FILE", HEARTBEAT_FILE),
        "memory": memory.get("limit", 0), "memory_swap": memory.get("swap", 0),
        "memory_reservation": memory.get("reservation", 0),
        "nano_cpus": int(quota * 1e9 // period) if period else 0,
        "mounts": mounts,
        "health": (health or {}).get("Status", "") if health is not None else None,
        "failing_streak": int((health or {}).get("FailingStreak") or 0),
        "health_log": [{"exit": e.get("ExitCode"), "output": (e.get("Output") or "")[-300:]}
                       for e in ((health or {}).get("Log") or [])[-3:]],
        "health_passed_at": passed_at(health),
        "source": "files",
    }


def container_from_podman(name):
    code, out, _ = sh(["podman", "container", "inspect", name])
    if code != 0:
        return {"absent": True}
    data = json.loads(out)[0]
    host, state = data.get("HostConfig", {}), data.get("State", {})
    health = state.get("Health") or state.get("Healthcheck") or {}
    env = dict(item.split("=", 1) for item in (data.get("Config") or {}).get("Env") or []
               if "=" in item)
    return {
        "id": data.get("Id"), "running": state.get("Running", False),
        "pid": state.get("Pid", 0), "status": state.get("Status"),
        "image": data.get("ImageName", ""), "created": data.get("Created"),
        "markers": {k: v for k, v in env.items() if k.startswith("NG_RELEASE_")},
        "heartbeat_file": env.get("NG_HEARTBEAT_FILE", HEARTBEAT_FILE),
        "memory": host.get("Memory", 0), "memory_swap": host.get("MemorySwap", 0),
        "memory_reservation": host.get("MemoryReservation", 0),
        "nano_cpus": host.get("NanoCpus", 0) or int(host.get("CpuQuota", 0) * 1e9
                                                     // max(host.get("CpuPeriod", 1), 1)),
        "mounts": [{"destination": m.get("Destination"), "source": m.get("Source"),
                    "options": m.get("Options") or []} for m in data.get("Mounts") or []
                   if (m.get("Destination") or "").startswith(OUR_MOUNTS)],
        "health": health.get("Status", ""),
        "failing_streak": int(health.get("FailingStreak") or 0),
        "health_log": [{"exit": e.get("ExitCode"), "output": (e.get("Output") or "")[-300:]}
                       for e in (health.get("Log") or [])[-3:]],
        "health_passed_at": passed_at(health),
        "started_at": state.get("StartedAt"),
        "source": "podman",
    }


def container_state(paths, name, want_health=False, containers=None):
    if containers is None:
        _, _, containers = storage_names(paths)
    found = container_from_files(paths, name, containers) \
        if isinstance(containers, list) else None
    if found is None or (want_health and found.get("running") and found.get("health") is None):
        found = container_from_podman(name)
    if found.get("absent"):
        return None
    reload = read_json(os.path.join(paths["state"], "reload.json"), {})
    if reload.get("cid") == found.get("id") and reload.get("markers"):
        # restarted in place (SIGHUP) since it was created: it runs what the reload said
        found["markers"] = dict(reload["markers"])
        found["reloaded_at"] = reload.get("at")
    return found
