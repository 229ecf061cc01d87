#!/usr/bin/env python3
"""Stand-in for podman 4.x/5.x. It keeps its state in the files real Podman writes, so the
host helper's file-reading fast path reads what this stand-in wrote:

  <graphroot>/overlay-images/images.json              [{id, digest, names, created}]
  <graphroot>/secrets/secrets.json                    {secrets: {id: {...}}, nameToID, idToName}
  <graphroot>/secrets/filedriver/secretsdata.json     {id: base64 value}
  <graphroot>/overlay-containers/containers.json      [{id, names, image, metadata, created}]
  <graphroot>/overlay-containers/<id>/userdata/config.json   the OCI spec crun is given
  <runroot>/overlay-containers/<id>/userdata/pidfile  the container's pid
  <runroot>/overlay-containers/<id>/healthcheck.log   {Status, FailingStreak, Log}
and, for what the helper reads of the container's cgroup, <proc>/<pid>/cgroup and
<cgroup>/machine.slice/libpod-<id>.scope/container/memory.max (and swap, usage).

Commands: version, images, build, pull, import, rmi, image prune/inspect, secret
create/rm/ls/inspect, run, rm, stop, container inspect, healthcheck run, logs, exec, pause,
unpause (a file "paused" beside the container's run files while it is paused). The version
(config "version", or the control file "version") decides what Podman < 4.7 lacks:
`secret create --replace` and `secret inspect --showsecret` are unknown flags there, as on
a real 4.3.
A running container's pid is the test's long-sleeping process (config "live_pid"); a
stopped one's pid file names a process that is gone ("dead_pid").

Control files (JSON, see common.py): fail-<what> for build, pull, run, secret-create,
secret-rm; "registry" ({name: {"id", "created"}}: what a pull of that name brings; without
an entry a pull brings the image already there, or a new one); "health" ({"fail": true}
or {"fail_if_secret": {name: value}} or {"fail_if_file": path under /app} or
{"fail_unless_image": the one image that passes}, "output",
"kill": the container stops, as --health-on-failure=kill does); "build" ({"lines": n,
"sleep": seconds per line}); "logs" (the lines the agent printed); "cgroup" (values that
override the limits the kernel would show, to fake a drift); "cgroup_v1" (true: the
host's cgroup is v1); "beat" ({"if_secret": {name: value}, "text": ...}: the agent's first
heartbeat says this instead of the time, e.g. a token Telegram rejected).
"""

from __future__ import annotations

import base64
import calendar
import json
import os
import shutil
import sys
import time

from common import (
    CONFIG,
    control,
    fail_if_told,
    host_path,
    iso_now,
    parse_size,
    read_json,
    record,
    write_json,
)

G, R = CONFIG["graphroot"], CONFIG["runroot"]
IMAGES = f"{G}/overlay-images/images.json"
SECRETS = f"{G}/secrets/secrets.json"
SECRET_DATA = f"{G}/secrets/filedriver/secretsdata.json"
CONTAINERS = f"{G}/overlay-containers/containers.json"
RUN_VALUE_FLAGS = {
    "--name", "--memory", "--memory-reservation", "--memory-swap", "--cpus", "--network",
    "--volume", "-v", "--cap-drop", "--security-opt", "--health-cmd", "--health-interval",
    "--health-timeout", "--health-retries", "--health-start-period", "--health-on-failure",
    "--secret", "--env", "-e", "--env-file", "--cidfile", "--cgroups", "--sdnotify",
}  # fmt: skip


def die(message: str, code: int = 125) -> None:
    sys.stderr.write(message + "\n")
    sys.exit(code)


def version() -> str:
    return control("version", CONFIG["version"])


def at_least(wanted: tuple[int, int]) -> bool:
    return tuple(int(p) for p in version().split(".")[:2]) >= wanted


def options(args: list[str], with_value=(), stop_at_positional=False):
    """{flag: [values]} (True for a flag without a value) and the positional words."""
    found: dict[str, list] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if stop_at_positional and rest:
            rest.append(word)
        elif word.startswith("--") and "=" in word:
            key, value = word.split("=", 1)
            found.setdefault(key, []).append(value)
        elif word.startswith("-") and word != "-":
            if word in with_value:
                i += 1
                found.setdefault(word, []).append(args[i])
            else:
                found.setdefault(word, []).append(True)
        else:
            rest.append(word)
        i += 1
    return found, rest


def last(found: dict, *keys: str, default=None):
    for key in keys:
        if key in found:
            return found[key][-1]
    return default


# -- images ----------------------------------------------------------------------------
def images() -> list[dict]:
    return read_json(IMAGES, [])


def cmd_version(args):
    found, _ = options(args, {"--format", "-f"})
    if last(found, "--format", "-f") == "{{.Client.Version}}":
        print(version())
    else:
        print(f"Client:       Podman Engine\nVersion:      {version()}")


def cmd_images(args):
    found, _ = options(args, {"--format"})
    template = last(found, "--format", default="{{.Repository}} {{.Tag}}")
    for image in images():
        for name in image.get("names") or []:
            repo, tag = name.rsplit(":", 1)
            print(template.replace("{{.Repository}}", repo).replace("{{.Tag}}", tag))


def cmd_build(args):
    found, rest = options(args, {"--format", "--file", "-f", "--build-arg", "--tag", "-t",
                                 "--network"})
    fail_if_told("build", args)
    dockerfile = host_path(last(found, "--file", "-f", default=f"{rest[-1]}/Containerfile"))
    if not os.path.isfile(dockerfile):
        die(f"Error: the specified Containerfile or Dockerfile does not exist, {dockerfile}")
    how = control("build", {})
    for step in range(1, how.get("lines", 3) + 1):
        print(f"STEP {step}/{how.get('lines', 3)}: (fake build of {dockerfile})", flush=True)
        time.sleep(how.get("sleep", 0))
    tag = last(found, "--tag", "-t")
    kept = []
    for image in images():  # a tag names one image: the new one takes it over
        image["names"] = [n for n in image.get("names") or [] if n != tag]
        if image["names"]:
            kept.append(image)
    image_id = os.urandom(32).hex()
    kept.append({"id": image_id, "digest": f"sha256:{os.urandom(32).hex()}", "names": [tag],
                 "created": iso_now()})
    write_json(IMAGES, kept)
    print(f"COMMIT {tag}\n{image_id}")


def name_image(name: str, image: dict) -> None:
    """Give NAME to image (a new one or one already stored), taking it from any other."""
    kept = []
    for other in images():
        if other["id"] == image["id"]:
            continue
        other["names"] = [n for n in other.get("names") or [] if n != name]
        kept.append(other)  # a base loses its name, not its place: images built on it
    image["names"] = sorted({*(image.get("names") or []), name})
    write_json(IMAGES, [*kept, image])


def cmd_pull(args):
    """`podman pull NAME`: what the registry (control "registry") has under NAME."""
    _, rest = options(args)
    name = rest[0]
    fail_if_told("pull", args)
    if name.startswith("localhost/"):
        die(f"Error: initializing source docker://{name}: pinging container registry "
            "localhost: connection refused")
    offered = control("registry", {}).get(name)
    current = next((i for i in images() if name in (i.get("names") or [])), None)
    if offered is None:
        image = current or {"id": os.urandom(32).hex(), "created": iso_now()}
    elif current is not None and current["id"] == offered["id"]:
        image = current
    else:
        image = next((i for i in images() if i["id"] == offered["id"]), None) or {
            "id": offered["id"], "created": offered.get("created", iso_now())}
    image.setdefault("digest", f"sha256:{image['id'][::-1]}")
    print("Trying to pull " + name + "...\nGetting image source signatures", flush=True)
    print(f"Copying blob sha256:{image['id'][:12]} done\nWriting manifest to image "
          f"destination\n{image['id']}")
    name_image(name, image)


def cmd_image(args):
    sub, rest = args[0], args[1:]
    if sub == "prune":  # images without a name (the stand-in keeps no layers)
        dropped = [i for i in images() if not i.get("names")]
        write_json(IMAGES, [i for i in images() if i.get("names")])
        for image in dropped:
            print(image["id"])
    elif sub == "inspect":
        _, names = options(rest, {"--format", "-f"})
        image = next((i for i in images() if names[0] in (i.get("names") or [])), None)
        if image is None:
            die(f"Error: {names[0]}: image not known")
        print(json.dumps([{"Id": image["id"], "Digest": image.get("digest", ""),
                           "Created": image.get("created"),
                           "RepoTags": image.get("names")}], indent=4))
    else:
        die(f"Error: unknown command image {sub} for the stand-in")


def cmd_import(args):
    """`podman import ARCHIVE NAME`: the archive must exist on the (fake) host."""
    _, rest = options(args)
    archive, name = rest[0], rest[1]
    if not os.path.isfile(host_path(archive)):
        die(f"Error: {archive}: no such file or directory")
    image_id = os.urandom(32).hex()
    name_image(name, {"id": image_id, "digest": f"sha256:{os.urandom(32).hex()}",
                      "created": iso_now()})
    print(image_id)


def cmd_rmi(args):
    found, refs = options(args)
    listed, missing = images(), []
    for ref in refs:
        holders = [i for i in listed if ref in (i.get("names") or [])]
        if not holders and "--ignore" not in found:
            missing.append(ref)
        for image in holders:
            image["names"].remove(ref)
            print(f"Untagged: {ref}")
    write_json(IMAGES, [i for i in listed if i.get("names")])
    if missing:
        die(f"Error: {missing[0]}: image not known", 1)


# -- secrets ---------------------------------------------------------------------------
def secret_store() -> dict:
    return read_json(SECRETS, {"secrets": {}, "nameToID": {}, "idToName": {}})


def drop_secret(store: dict, data: dict, name: str) -> str:
    secret_id = store["nameToID"].pop(name)
    store["idToName"].pop(secret_id, None)
    store["secrets"].pop(secret_id, None)
    data.pop(secret_id, None)
    return secret_id


def ago(stamp: str) -> str:
    then = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
    seconds = max(int(time.time() - then), 1)
    return f"{seconds} seconds ago" if seconds < 60 else f"{seconds // 60} minutes ago"


def cmd_secret(args):
    sub, rest = args[0], args[1:]
    found, names = options(rest, {"--format", "-f", "--driver", "-d", "--label", "-l"})
    store, data = secret_store(), read_json(SECRET_DATA, {})
    if sub == "create":
        if "--replace" in found and not at_least((4, 7)):
            die("Error: unknown flag: --replace")
        fail_if_told("secret-create", names)
        name, source = names
        if source != "-":
            die("Error: the stand-in reads secret values from stdin only")
        value = sys.stdin.buffer.read()
        if name in store["nameToID"]:
            if "--replace" not in found:
                die(f"Error: {name}: secret name in use")
            drop_secret(store, data, name)
        secret_id = os.urandom(13).hex()[:25]
        store["secrets"][secret_id] = {
            "name": name, "id": secret_id, "labels": {}, "metadata": {},
            "createdAt": iso_now(), "updatedAt": iso_now(), "driver": "file",
            "driverOptions": {"path": f"{G}/secrets/filedriver"}}
        store["nameToID"][name], store["idToName"][secret_id] = secret_id, name
        data[secret_id] = base64.b64encode(value).decode()
        write_json(SECRET_DATA, data)
        write_json(SECRETS, store)
        print(secret_id)
    elif sub == "rm":
        fail_if_told("secret-rm", names)
        for name in names:
            if name not in store["nameToID"]:
                die(f'Error: no secret with name or id "{name}": no such secret', 1)
            print(drop_secret(store, data, name))
        write_json(SECRET_DATA, data)
        write_json(SECRETS, store)
    elif sub == "ls":
        template = last(found, "--format", default="{{.ID}} {{.Name}} {{.CreatedAt}}")
        for secret_id, secret in store["secrets"].items():
            print(template.replace("{{.Name}}", secret["name"]).replace("{{.ID}}", secret_id)
                  .replace("{{.CreatedAt}}", ago(secret["createdAt"])))
    elif sub == "inspect":
        if "--showsecret" in found and not at_least((4, 7)):
            die("Error: unknown flag: --showsecret")
        template = last(found, "--format", "-f")
        for name in names:
            secret_id = store["nameToID"].get(name)
            if secret_id is None:
                die(f'Error: inspecting secret: no secret with name or id "{name}": '
                    "no such secret")
            value = base64.b64decode(data[secret_id]).decode() \
                if "--showsecret" in found else ""
            if template:
                print(template.replace("{{.SecretData}}", value).replace("{{.ID}}", secret_id)
                      .replace("{{.Spec.Name}}", name))
            else:
                print(json.dumps([{"ID": secret_id, "Spec": {"Name": name},
                                   "SecretData": value}], indent=4))
    else:
        die(f"Error: unknown command secret {sub} for the stand-in")


# -- containers ------------------------------------------------------------------------
def containers() -> list[dict]:
    return read_json(CONTAINERS, [])


def find(name: str) -> dict | None:
    return next((c for c in containers() if name in c.get("names", [])
                 or (len(name) >= 12 and c["id"].startswith(name))), None)


def userdata(cid: str) -> str:
    return f"{G}/overlay-containers/{cid}/userdata"


def run_dir(cid: str) -> str:
    return f"{R}/overlay-containers/{cid}"


def pid_of(cid: str) -> int:
    try:
        with open(f"{run_dir(cid)}/userdata/pidfile") as handle:
            return int(handle.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def running(cid: str) -> bool:
    pid = pid_of(cid)
    return pid == CONFIG["live_pid"] and os.path.exists(f"/proc/{pid}")


def stop(cid: str) -> None:
    with open(f"{run_dir(cid)}/userdata/pidfile", "w") as handle:
        handle.write(str(CONFIG["dead_pid"]))


def remove(entry: dict) -> None:
    write_json(CONTAINERS, [c for c in containers() if c["id"] != entry["id"]])
    for folder in (f"{G}/overlay-containers/{entry['id']}", run_dir(entry["id"])):
        shutil.rmtree(folder, ignore_errors=True)


def cgroup_path(cid: str) -> str:
    return f"/machine.slice/libpod-{cid}.scope/container"


def start(cid: str, resources: dict) -> None:
    """The container's process: the test's sleeper, in a cgroup with the given limits."""
    pid = CONFIG["live_pid"]
    os.makedirs(f"{run_dir(cid)}/userdata", exist_ok=True)
    with open(f"{run_dir(cid)}/userdata/pidfile", "w") as handle:
        handle.write(str(pid))
    os.makedirs(f"{CONFIG['proc']}/{pid}", exist_ok=True)
    if not control("no_heartbeat", False):  # the agent's first beat, seen through its root
        beat = f"{CONFIG['proc']}/{pid}/root/tmp/nightguard/heartbeat"
        os.makedirs(os.path.dirname(beat), exist_ok=True)
        rule = control("beat", {})  # {"if_secret": {name: value}, "text": what it writes}
        rejected = any(secret_in_container(cid, name) == value
                       for name, value in (rule.get("if_secret") or {}).items())
        with open(beat, "w") as handle:
            handle.write(rule["text"] if rejected else f"{time.time()}\n")
    memory = resources["memory"]
    if control("cgroup_v1", False):  # a host still on cgroup v1: memory controller apart
        line = f"4:memory:{cgroup_path(cid)}\n1:cpu,cpuacct:{cgroup_path(cid)}\n"
        folder = CONFIG["cgroup"] + "/memory" + cgroup_path(cid)
        values = {"memory.limit_in_bytes": str(memory["limit"]),
                  "memory.memsw.limit_in_bytes": str(memory["swap"]),
                  "memory.usage_in_bytes": "52428800"}
    else:
        line = f"0::{cgroup_path(cid)}\n"
        folder = CONFIG["cgroup"] + cgroup_path(cid)
        values = {"memory.max": str(memory["limit"]),
                  "memory.swap.max": str(memory["swap"] - memory["limit"]),
                  "memory.current": "52428800", "memory.swap.current": "0",
                  "memory.peak": "61865984"}
    with open(f"{CONFIG['proc']}/{pid}/cgroup", "w") as handle:
        handle.write(line)
    os.makedirs(folder, exist_ok=True)
    values.update(control("cgroup", {}))
    for name, value in values.items():
        with open(f"{folder}/{name}", "w") as handle:
            handle.write(value + "\n")


def cmd_run(args):
    found, rest = options(args, RUN_VALUE_FLAGS, stop_at_positional=True)
    fail_if_told("run", args)
    image, command = rest[0], rest[1:]
    known = [i for i in images() if image in (i.get("names") or [])]
    if not known:
        die(f"Error: {image}: image not known")
    store = secret_store()
    for spec in found.get("--secret", []):
        name = spec.split(",")[0]
        if name not in store["nameToID"]:
            die(f'Error: no secret with name or id "{name}": no such secret')
    network = last(found, "--network", default="")
    if network in ("slirp4netns", "pasta") and \
            not os.path.exists(os.path.join(CONFIG["bin"], network)):
        die(f"Error: could not find {network}, the network namespace can't be configured: "
            f'exec: "{network}": executable file not found in $PATH')
    name = last(found, "--name")
    existing = find(name)
    if existing:
        if "--replace" not in found:
            die(f'Error: creating container storage: the container name "{name}" is already '
                f"in use by {existing['id']}")
        remove(existing)
    cid = os.urandom(32).hex()
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "container=podman", f"HOSTNAME={cid[:12]}", "HOME=/root"]
    env += found.get("--env", []) + found.get("-e", [])
    for env_file in found.get("--env-file", []):
        try:
            with open(host_path(env_file)) as handle:
                lines = handle.read().splitlines()
        except OSError:
            die(f"Error: open {env_file}: no such file or directory")
        env += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    mounts = [{"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]},
              {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}]
    for volume in found.get("--volume", []) + found.get("-v", []):
        source, destination, *flags = volume.split(":")
        if not os.path.isdir(source):
            die(f'Error: statfs {source}: no such file or directory')
        ro = "ro" in (flags[0].split(",") if flags else [])
        mounts.append({"destination": destination, "type": "bind", "source": source,
                       "options": ["rbind", "ro" if ro else "rw", "rprivate"]})
    os.makedirs(f"{userdata(cid)}/secrets", exist_ok=True)
    data = read_json(SECRET_DATA, {})
    for spec in found.get("--secret", []):
        secret = spec.split(",")[0]
        copy = f"{userdata(cid)}/secrets/{secret}"
        with open(copy, "wb") as handle:
            handle.write(base64.b64decode(data[store["nameToID"][secret]]))
        mounts.append({"destination": f"/run/secrets/{secret}", "type": "bind",
                       "source": copy, "options": ["bind", "rprivate", "ro"]})
    memory = parse_size(last(found, "--memory", default="0"))
    cpus = float(last(found, "--cpus", default="0"))
    resources = {"memory": {"limit": memory,
                            "reservation": parse_size(last(found, "--memory-reservation",
                                                           default="0")),
                            "swap": parse_size(last(found, "--memory-swap", default="0"))},
                 "cpu": {"quota": int(cpus * 100000), "period": 100000}}
    config = {"ociVersion": "1.1.0",
              "process": {"user": {"uid": 0, "gid": 0}, "args": command or ["python3"],
                          "env": env, "cwd": "/"},
              "root": {"path": f"{G}/overlay/{cid}/merged"}, "hostname": cid[:12],
              "mounts": mounts,
              "linux": {"resources": resources,
                        "cgroupsPath": f"machine.slice:libpod:{cid}"}}
    write_json(f"{userdata(cid)}/config.json", config)
    write_json(f"{userdata(cid)}/ngfake.json", {  # what only Podman's database would know
        "health_cmd": last(found, "--health-cmd"), "started": iso_now(),
        "health_on_failure": last(found, "--health-on-failure")})
    entry = {"id": cid, "names": [name], "image": known[0]["id"], "layer": os.urandom(32).hex(),
             "metadata": json.dumps({"image-name": image, "image-id": known[0]["id"],
                                     "name": name, "created-at": int(time.time())}),
             "created": iso_now()}
    write_json(CONTAINERS, [*containers(), entry])
    start(cid, resources)
    cidfile = last(found, "--cidfile")
    if cidfile:
        with open(host_path(cidfile), "w") as handle:
            handle.write(cid)
    print(cid)


def targets(found: dict, names: list[str]) -> list[dict]:
    cidfile = last(found, "--cidfile")
    if cidfile:
        try:
            with open(host_path(cidfile)) as handle:
                names = [handle.read().strip()]
        except OSError:
            if "--ignore" in found:
                return []
            die(f"Error: reading CIDFile: open {cidfile}: no such file or directory")
    entries = []
    for name in names:
        entry = find(name)
        if entry is None and "--ignore" not in found:
            die(f'Error: no container with name or ID "{name}" found: no such container')
        if entry is not None:
            entries.append(entry)
    return entries


def cmd_rm(args):
    found, names = options(args, {"--time", "-t"})
    for entry in targets(found, names):
        if running(entry["id"]) and "--force" not in found and "-f" not in found:
            die(f"Error: cannot remove container {entry['id']} as it is running")
        remove(entry)
        print(entry["id"])


def cmd_stop(args):
    found, names = options(args, {"--time", "-t"})
    for entry in targets(found, names):
        stop(entry["id"])
        print(entry["id"])


def health_log(cid: str) -> dict | None:
    return read_json(f"{run_dir(cid)}/healthcheck.log", None)


def inspect(entry: dict) -> dict:
    """`podman container inspect`'s shape (the fields the helper's fallback reads)."""
    cid = entry["id"]
    config = read_json(f"{userdata(cid)}/config.json", {})
    extra = read_json(f"{userdata(cid)}/ngfake.json", {})
    resources = config["linux"]["resources"]
    alive = running(cid)
    health = health_log(cid) or {"Status": "starting", "FailingStreak": 0, "Log": []}
    volumes = [m for m in config["mounts"] if m["type"] == "bind"
               and not m["destination"].startswith("/run/secrets/")]
    return {
        "Id": cid, "Created": entry["created"], "Path": config["process"]["args"][0],
        "Args": config["process"]["args"][1:],
        "State": {"OciVersion": "1.1.0", "Status": "running" if alive else "exited",
                  "Running": alive, "Paused": False, "Restarting": False, "OOMKilled": False,
                  "Dead": False, "Pid": pid_of(cid) if alive else 0, "ExitCode": 0,
                  "Error": "", "StartedAt": extra.get("started"),
                  "FinishedAt": "0001-01-01T00:00:00Z", "Health": health},
        "Image": entry["image"], "ImageName": json.loads(entry["metadata"])["image-name"],
        "Name": entry["names"][0], "RestartCount": 0,
        "Mounts": [{"Type": "bind", "Source": m["source"], "Destination": m["destination"],
                    "Driver": "", "Mode": "", "Options": ["rbind"],
                    "RW": "rw" in m["options"], "Propagation": "rprivate"} for m in volumes],
        "Config": {"Hostname": cid[:12], "Env": config["process"]["env"],
                   "Cmd": config["process"]["args"],
                   "Healthcheck": {"Test": ["CMD-SHELL", extra.get("health_cmd") or ""]}},
        "HostConfig": {"Memory": resources["memory"]["limit"],
                       "MemoryReservation": resources["memory"]["reservation"],
                       "MemorySwap": resources["memory"]["swap"],
                       "NanoCpus": resources["cpu"]["quota"] * 10000,
                       "CpuPeriod": resources["cpu"]["period"],
                       "CpuQuota": resources["cpu"]["quota"]},
    }


def cmd_container(args):
    if args[0] != "inspect":
        die(f"Error: unknown command container {args[0]} for the stand-in")
    entries = [find(name) for name in args[1:]]
    if None in entries:
        die(f"Error: no such container {args[1 + entries.index(None)]}")
    print(json.dumps([inspect(e) for e in entries], indent=4))


def secret_in_container(cid: str, name: str) -> str | None:
    try:
        with open(f"{userdata(cid)}/secrets/{name}") as handle:
            return handle.read()
    except OSError:
        return None


def app_source(cid: str) -> str | None:
    config = read_json(f"{userdata(cid)}/config.json", {})
    return next((m["source"] for m in config.get("mounts", []) if m["destination"] == "/app"),
                None)


def cmd_healthcheck(args):
    if args[0] != "run":
        die(f"Error: unknown command healthcheck {args[0]} for the stand-in")
    entry = find(args[1])
    if entry is None:
        die(f'Error: no container with name or ID "{args[1]}" found: no such container')
    cid = entry["id"]
    if not running(cid):
        die(f"Error: container {cid} is not running")
    rule = control("health", {})
    failing = bool(rule.get("fail"))
    for name, value in (rule.get("fail_if_secret") or {}).items():
        failing |= secret_in_container(cid, name) == value
    if rule.get("fail_if_file"):
        failing |= os.path.exists(f"{app_source(cid)}/{rule['fail_if_file']}")
    if rule.get("fail_unless_image"):
        failing |= json.loads(entry["metadata"])["image-name"] != rule["fail_unless_image"]
    log = health_log(cid) or {"Status": "starting", "FailingStreak": 0, "Log": []}
    output = rule.get("output", "agent: heartbeat is stale") if failing else ""
    log["Log"] = [*log["Log"], {"Start": iso_now(), "End": iso_now(),
                                "ExitCode": 1 if failing else 0, "Output": output}][-5:]
    log["FailingStreak"] = log["FailingStreak"] + 1 if failing else 0
    log["Status"] = "unhealthy" if failing else "healthy"
    write_json(f"{run_dir(cid)}/healthcheck.log", log)
    if failing:
        if rule.get("kill"):
            stop(cid)
        print("unhealthy")
        sys.exit(1)


def cmd_exec(args):
    """`podman exec [--user U] NAME CMD...` in a running container: `id -u`, `id -g` and
    `id` answer from the user (--user, else the container's); any other command prints
    what the control file "exec" says ({"out", "err", "code"})."""
    found, rest = options(args, {"--user", "-u", "--workdir", "-w", "--env", "-e"},
                          stop_at_positional=True)
    fail_if_told("exec", args)
    entry = find(rest[0])
    if entry is None:
        die(f'Error: no container with name or ID "{rest[0]}" found: no such container')
    if not running(entry["id"]):
        die("Error: can only create exec sessions on running containers: container state "
            "improper")
    config = read_json(f"{userdata(entry['id'])}/config.json", {})
    own = config.get("process", {}).get("user", {})
    uid, _, gid = str(last(found, "--user", "-u",
                           default=f"{own.get('uid', 0)}:{own.get('gid', 0)}")).partition(":")
    command = rest[1:]
    if command in (["id", "-u"], ["id", "-g"], ["id"]):
        print({"-u": uid, "-g": gid or uid}.get(command[-1], f"uid={uid} gid={gid or uid}"))
        return
    told = control("exec", {})
    sys.stdout.write(told.get("out", ""))
    sys.stderr.write(told.get("err", ""))
    sys.exit(told.get("code", 0))


def cmd_logs(args):
    found, names = options(args, {"--tail", "--since"})
    fail_if_told("logs", args)
    if find(names[-1]) is None:
        die(f'Error: no container with name or ID "{names[-1]}" found: no such container')
    lines = control("logs", ["agent: started", "agent: heartbeat ok"])
    tail = int(last(found, "--tail", default=-1))
    if tail >= 0:
        lines = lines[-tail:] if tail else []
    for line in lines:
        print(f"{iso_now()} {line}" if "--timestamps" in found else line)


def cmd_pause(args):
    """pause/unpause: a marker beside the container's run files (the freezer's state)."""
    _, names = options(args)
    for entry in targets({}, names):
        marker = f"{run_dir(entry['id'])}/paused"
        if not running(entry["id"]):
            die(f"Error: \"{entry['id']}\" is not running, can't pause: container state "
                "improper")
        fail_if_told("pause", args)
        os.makedirs(run_dir(entry["id"]), exist_ok=True)
        with open(marker, "w") as handle:
            handle.write(str(time.time()))
        print(entry["id"])


def cmd_unpause(args):
    _, names = options(args)
    for entry in targets({}, names):
        marker = f"{run_dir(entry['id'])}/paused"
        if not os.path.exists(marker):
            die(f"Error: \"{entry['id']}\" is not paused, can't unpause: container state "
                "improper")
        os.unlink(marker)
        print(entry["id"])


COMMANDS = {"version": cmd_version, "images": cmd_images, "build": cmd_build,
            "rmi": cmd_rmi, "secret": cmd_secret, "run": cmd_run, "rm": cmd_rm,
            "stop": cmd_stop, "container": cmd_container, "healthcheck": cmd_healthcheck,
            "logs": cmd_logs, "import": cmd_import, "pull": cmd_pull, "image": cmd_image,
            "exec": cmd_exec, "pause": cmd_pause, "unpause": cmd_unpause}

if __name__ == "__main__":
    record("podman", sys.argv[1:])
    if not sys.argv[1:] or sys.argv[1] not in COMMANDS:
        die(f"Error: the podman stand-in does not know {sys.argv[1:2]}")
    COMMANDS[sys.argv[1]](sys.argv[2:])
