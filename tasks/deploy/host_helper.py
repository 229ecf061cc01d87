"""Runs ON THE HOST (as root, through ``sudo -n python3``), never imported by the tasks.

The tasks send this file's text and one JSON line of arguments on stdin (so nothing of it
shows in the host's process list) and read one JSON document back. Standard library only:
the host needs nothing but python3, which Debian and Ubuntu cloud images ship.

Subcommands (``args["op"]``):
  facts   read the host's state in one round trip; with ``lock`` also take the deploy lock
  sync    apply an uploaded delta tarball to the app dir, keeping what it replaced
  restore put back the files the last sync replaced (code rollback)
  gate    read back the container's effective limits, then wait until it is healthy
  record  append the audit line, remember the deployed version, release the lock
  unlock  release the deploy lock
  health  container, health log, limits in force, host memory, lock: for `inv health`
  secret_backup / secret_restore / secret_drop_backup
          keep, put back, forget the last known-good secret values during a rotation
"""

import base64
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tarfile
import time

STATE = "/var/lib/nightguard"
LOCK = STATE + "/deploy.lock"
SKIP_DIRS = {"__pycache__", ".git", ".pytest_cache", ".ruff_cache"}


def sh(argv, timeout=120):
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)
    return done.returncode, done.stdout, done.stderr


def podman(args, a, timeout=120):
    return sh(["podman"] + args, timeout)


def read_json(path, default):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return default


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(65536), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest(app_dir):
    found = {}
    for root, dirs, files in os.walk(app_dir):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            full = os.path.join(root, name)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            found[os.path.relpath(full, app_dir)] = sha256_file(full)
    return found


def session_pid():
    """The sshd process of this connection: the lock is stale once it is gone."""
    pid = os.getppid()
    for _ in range(8):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)
            comm = open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            return 0
        if comm.startswith("sshd"):
            return pid
        pid = int(fields[1].split()[1])
    return 0


def lock_info():
    info = read_json(LOCK + "/info.json", None)
    if info is None:
        return None if not os.path.isdir(LOCK) else {"holder": "unknown", "since": "?"}
    pid = info.get("session_pid", 0)
    info["stale"] = bool(pid) and not os.path.exists(f"/proc/{pid}")
    return info


def take_lock(holder):
    os.makedirs(STATE, mode=0o700, exist_ok=True)
    current = lock_info()
    broke = None
    if current and current.get("stale"):
        shutil.rmtree(LOCK, ignore_errors=True)
        broke = current
    try:
        os.mkdir(LOCK, 0o700)
    except FileExistsError:
        return {"acquired": False, "held_by": lock_info()}
    holder = dict(holder, session_pid=session_pid())
    write_json(LOCK + "/info.json", holder)
    return {"acquired": True, "broke_stale": broke}


def container_facts(a):
    code, out, _ = podman(["container", "inspect", a["container"]], a)
    if code != 0:
        return None
    data = json.loads(out)[0]
    host, state = data.get("HostConfig", {}), data.get("State", {})
    health = state.get("Health") or state.get("Healthcheck") or {}
    return {
        "running": state.get("Running", False),
        "status": state.get("Status"),
        "started_at": state.get("StartedAt"),
        "restarts": data.get("RestartCount", 0),
        "health": health.get("Status", ""),
        "health_log": [{"exit": e.get("ExitCode"), "output": (e.get("Output") or "")[-300:]}
                       for e in (health.get("Log") or [])[-3:]],
        "image": data.get("ImageName", ""),
        "labels": (data.get("Config") or {}).get("Labels") or {},
        "memory": host.get("Memory", 0),
        "memory_swap": host.get("MemorySwap", 0),
        "memory_reservation": host.get("MemoryReservation", 0),
        "nano_cpus": host.get("NanoCpus", 0) or int(host.get("CpuQuota", 0) * 1e9
                                                      // max(host.get("CpuPeriod", 1), 1)),
        "pid": state.get("Pid", 0),
        "secrets": sorted(x.get("Name", "") for x in (data.get("Config") or {}).get("Secrets")
                          or data.get("Secrets") or []),
    }


def cgroup_limits(pid):
    """The limits the kernel enforces, read from the container's cgroup (v2 or v1)."""
    try:
        with open(f"/proc/{pid}/cgroup") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return {}
    limits = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = "/sys/fs/cgroup" + path
            for key, name in (("memory", "memory.max"), ("swap", "memory.swap.max"),
                              ("memory_usage", "memory.current"),
                              ("swap_usage", "memory.swap.current")):
                limits[key] = read_text(os.path.join(base, name))
        elif "memory" in controllers.split(","):
            base = "/sys/fs/cgroup/memory" + path
            limits["memory"] = read_text(base + "/memory.limit_in_bytes")
            limits["memsw"] = read_text(base + "/memory.memsw.limit_in_bytes")
            limits["memory_usage"] = read_text(base + "/memory.usage_in_bytes")
    return limits


def read_text(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def host_memory():
    info = {}
    for line in (read_text("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0]) * 1024 if rest.split() else 0
    disk = shutil.disk_usage("/")
    return {"mem_total": info.get("MemTotal"), "mem_available": info.get("MemAvailable"),
            "swap_total": info.get("SwapTotal"), "swap_free": info.get("SwapFree"),
            "disk_free": disk.free, "disk_total": disk.total}


def list_secrets(a):
    """Name -> creation time. (Podman 4.3 prints the word "json" for --format json here.)"""
    code, out, _ = podman(["secret", "ls", "--noheading", "--format",
                           "{{.Name}}|{{.CreatedAt}}"], a)
    if code != 0:
        return {}
    pairs = (line.split("|", 1) for line in out.splitlines() if "|" in line)
    return {name: created for name, created in pairs}


def op_facts(a):
    facts = {"lock": None}
    if a.get("lock"):
        facts["lock"] = take_lock(a["lock"])
        if not facts["lock"]["acquired"]:
            return facts
    else:
        facts["lock_holder"] = lock_info()
    code, out, err = podman(["version", "--format", "json"], a)
    facts["podman"] = json.loads(out).get("Client", {}).get("Version") if code == 0 else None
    facts["systemd"] = os.path.isdir("/run/systemd/system")
    swaps = (read_text("/proc/swaps") or "").splitlines()[1:]
    facts["swaps"] = [{"path": s.split()[0], "size": int(s.split()[2]) * 1024} for s in swaps]
    facts["swapfile_size"] = os.path.getsize("/swapfile") if os.path.exists("/swapfile") else 0
    facts["swapfile_mode"] = (oct(os.stat("/swapfile").st_mode & 0o777)
                              if os.path.exists("/swapfile") else None)
    fstab = read_text("/etc/fstab") or ""
    facts["swap_in_fstab"] = any(line.split()[:1] == ["/swapfile"] for line in fstab.splitlines())
    facts["swappiness"] = int(read_text("/proc/sys/vm/swappiness") or -1)
    facts["swappiness_persisted"] = read_text("/etc/sysctl.d/99-nightguard.conf")
    facts["secrets"] = list_secrets(a)
    facts["secret_hashes"] = read_json(STATE + "/secrets.json", {})
    salt_path = STATE + "/secret.salt"
    if a.get("ensure_salt") and not os.path.exists(salt_path):
        os.makedirs(STATE, mode=0o700, exist_ok=True)
        with open(os.open(salt_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(os.urandom(32).hex())
    facts["secret_salt"] = read_text(salt_path)
    code, out, _ = podman(["images", "--format", "json", a["image_name"]], a)
    tags = []
    for image in json.loads(out or "[]") if code == 0 else []:
        tags += [n.rsplit(":", 1)[1] for n in image.get("Names") or [] if ":" in n]
    facts["image_tags"] = sorted(set(tags))
    facts["container"] = container_facts(a)
    facts["unit_text"] = read_text(a["unit_path"])
    code, out, _ = sh(["systemctl", "is-enabled", a["unit"]])
    facts["unit_enabled"] = out.strip()
    app_dir = a["app_dir"]
    facts["app_dir_exists"] = os.path.isdir(app_dir)
    facts["manifest"] = manifest(app_dir) if os.path.isdir(app_dir) else {}
    facts["synced"] = read_json(STATE + "/synced.json", [])
    facts["env_file_on_host"] = os.path.exists(os.path.join(app_dir, ".env"))
    facts["state"] = read_json(STATE + "/state.json", {"history": []})
    facts["host"] = host_memory()
    return facts


def op_sync(a):
    """Unpack the delta into the app dir file by file (temp + rename, so a cut never
    leaves a half-written file), keeping the replaced files for a code rollback."""
    app_dir, owner = a["app_dir"], pwd.getpwnam(a["owner"])
    os.makedirs(app_dir, exist_ok=True)
    os.chown(app_dir, owner.pw_uid, owner.pw_gid)
    backup_path = STATE + "/rollback-code.tar"
    os.makedirs(STATE, mode=0o700, exist_ok=True)
    touched = list(a["files"]) + list(a["delete"])
    with tarfile.open(backup_path + ".tmp", "w") as backup:
        for rel in touched:
            full = os.path.join(app_dir, rel)
            if os.path.isfile(full):
                backup.add(full, arcname=rel)
    write_json(STATE + "/rollback-added.json",
               [r for r in a["files"] if not os.path.exists(os.path.join(app_dir, r))])
    os.chmod(backup_path + ".tmp", 0o600)
    os.replace(backup_path + ".tmp", backup_path)
    if a.get("tarball"):
        with tarfile.open(a["tarball"], "r:gz") as delta:
            for member in delta.getmembers():
                if not member.isfile():
                    continue
                place(app_dir, member.name, delta.extractfile(member).read(), member.mode, owner)
        os.remove(a["tarball"])
    for rel in a["delete"]:
        full = os.path.join(app_dir, rel)
        if os.path.isfile(full):
            os.remove(full)
    write_json(STATE + "/synced.json", sorted(a["all_files"]))
    return {"written": len(a["files"]), "deleted": len(a["delete"])}


def place(app_dir, rel, data, mode, owner):
    full = os.path.realpath(os.path.join(app_dir, rel))
    if not full.startswith(os.path.realpath(app_dir) + os.sep):
        raise SystemExit(f"refusing path outside the app dir: {rel}")
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
        walk = parent
        while walk.startswith(os.path.realpath(app_dir) + os.sep):
            os.chown(walk, owner.pw_uid, owner.pw_gid)
            walk = os.path.dirname(walk)
    tmp = full + ".nightguard-tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode & 0o755 | 0o644)
    os.chown(tmp, owner.pw_uid, owner.pw_gid)
    os.replace(tmp, full)


def op_restore(a):
    app_dir = a["app_dir"]
    backup = STATE + "/rollback-code.tar"
    restored = 0
    for rel in read_json(STATE + "/rollback-added.json", []):
        full = os.path.join(app_dir, rel)
        if os.path.isfile(full):
            os.remove(full)
    if os.path.exists(backup):
        owner = pwd.getpwnam(a["owner"])
        with tarfile.open(backup) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    place(app_dir, member.name, tar.extractfile(member).read(), member.mode,
                          owner)
                    restored += 1
    return {"restored": restored}


def op_gate(a):
    """Limits first (they are wrong whatever the health says), then health."""
    deadline = time.monotonic() + a["deadline"]
    container = None
    while time.monotonic() < deadline:
        container = container_facts(a)
        if container and container["running"]:
            break
        time.sleep(1)
    if not container or not container["running"]:
        return {"healthy": False, "reason": "container is not running", "container": container,
                "logs": logs_tail(a)}
    result = {"container": container, "cgroup": cgroup_limits(container["pid"])}
    last = ""
    while time.monotonic() < deadline:
        code, out, err = podman(["healthcheck", "run", a["container"]], a, timeout=60)
        last = (out + err).strip()
        if code == 0:
            result["healthy"] = True
            result["container"] = container_facts(a)
            return result
        time.sleep(2)
    result.update(healthy=False, reason=f"not healthy within {a['deadline']}s: {last[-200:]}",
                  container=container_facts(a), logs=logs_tail(a))
    return result


def logs_tail(a):
    _, out, err = podman(["logs", "--tail", "20", a["container"]], a)
    return (out + err)[-3000:]


def op_record(a):
    os.makedirs(STATE, mode=0o700, exist_ok=True)
    with open(STATE + "/audit.log", "a") as handle:
        handle.write(json.dumps(a["audit"], sort_keys=True) + "\n")
    os.chmod(STATE + "/audit.log", 0o600)
    if a.get("state"):
        write_json(STATE + "/state.json", a["state"])
    if a.get("secret_hashes") is not None:
        write_json(STATE + "/secrets.json", a["secret_hashes"])
    if a.get("unlock"):
        shutil.rmtree(LOCK, ignore_errors=True)
    return {"recorded": True}


def op_health(a):
    """Everything `inv health` shows, read-only, in one round trip."""
    container = container_facts(a)
    audit = (read_text(STATE + "/audit.log") or "").splitlines()[-1:]
    return {
        "container": container,
        "cgroup": cgroup_limits(container["pid"]) if container and container["pid"] else {},
        "host": host_memory(),
        "swaps": [line.split()[0] for line in (read_text("/proc/swaps") or "").splitlines()[1:]],
        "lock": lock_info(),
        "unit_active": sh(["systemctl", "is-active", a["unit"]])[1].strip(),
        "last_deploy": json.loads(audit[0]) if audit else None,
        "deployed": (read_json(STATE + "/state.json", {}).get("history") or [{}])[0],
    }


BACKUP_SUFFIX = "__previous"


def secret_value(name, a):
    """A secret's value, read on the host only (never sent back): Podman >= 4.7 shows it
    to root; older Podman keeps it in its file driver's store."""
    code, out, _ = podman(["secret", "inspect", "--showsecret", "--format",
                           "{{.SecretData}}", name], a)
    if code == 0 and out.strip():
        return out.rstrip("\n")
    code, out, _ = podman(["secret", "inspect", "--format", "{{.ID}}", name], a)
    if code != 0:
        return None
    root = (os.path.expanduser("~/.local/share/containers/storage") if a.get("rootless")
            else "/var/lib/containers/storage")
    store = read_json(root + "/secrets/filedriver/secretsdata.json", {})
    encoded = store.get(out.strip())
    if encoded is None:
        return None
    return base64.b64decode(encoded).decode()


def put_secret(name, value, a):
    podman(["secret", "rm", name], a)
    done = subprocess.run(["podman", "secret", "create", name, "-"], input=value, text=True,
                          capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"podman secret create {name} failed: {done.stderr.strip()[-200:]}")


def existing_secrets(a):
    return set(list_secrets(a))


def op_secret_backup(a):
    """Keep the last known-good value as NAME__previous; an existing backup is kept, so a
    rotation cut half-way still knows the value that last worked."""
    present = existing_secrets(a)
    kept = []
    for name in a["names"]:
        backup = name + BACKUP_SUFFIX
        if backup in present or name not in present:
            continue
        value = secret_value(name, a)
        if value is None:
            raise SystemExit(f"cannot read the current value of {name} to back it up")
        put_secret(backup, value, a)
        kept.append(name)
    return {"backed_up": kept}


def op_secret_restore(a):
    present = existing_secrets(a)
    restored = []
    for name in a["names"]:
        backup = name + BACKUP_SUFFIX
        if backup in present:
            put_secret(name, secret_value(backup, a), a)
            podman(["secret", "rm", backup], a)
            restored.append(name)
    return {"restored": restored}


def op_secret_drop_backup(a):
    present = existing_secrets(a)
    dropped = [n for n in present if n.endswith(BACKUP_SUFFIX)]
    for name in dropped:
        podman(["secret", "rm", name], a)
    return {"dropped": dropped}


def op_unlock(a):
    held = lock_info()
    shutil.rmtree(LOCK, ignore_errors=True)
    return {"released": held}


OPS = {"facts": op_facts, "sync": op_sync, "restore": op_restore, "gate": op_gate,
       "record": op_record, "unlock": op_unlock, "health": op_health,
       "secret_backup": op_secret_backup, "secret_restore": op_secret_restore,
       "secret_drop_backup": op_secret_drop_backup}


def ensure_state_dir():
    """Root only: it holds the secret key, the HMACs and the audit log."""
    os.makedirs(STATE, mode=0o700, exist_ok=True)
    if os.stat(STATE).st_mode & 0o077:
        os.chmod(STATE, 0o700)


def main(a):
    global STATE, LOCK
    STATE = a.get("state_dir") or STATE
    LOCK = STATE + "/deploy.lock"
    if a["op"] != "facts" or a.get("lock") or a.get("ensure_salt"):
        ensure_state_dir()
    result = OPS[a["op"]](a)
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main(ARGS)  # noqa: F821 - ARGS is set by the bootstrap line that runs this text
