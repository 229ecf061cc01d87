"""Readers of the host itself: the OS, the tools present, Podman's version (cached
by the binary's identity), memory, swap, disk, cgroup limits, apt's sources, and the
agent unit's systemd status and journal."""

import os
import pwd
import shutil
import time

from .base import _listdir, podman_logs, read_json, read_text, sh, write_json


def os_release(paths):
    info = {}
    for line in (read_text(paths["os_release"]) or "").splitlines():
        key, _, value = line.partition("=")
        info[key.strip()] = value.strip().strip('"')
    return {"id": info.get("ID", ""), "version_id": info.get("VERSION_ID", ""),
            "codename": info.get("VERSION_CODENAME", ""),
            "like": info.get("ID_LIKE", "").split(), "name": info.get("PRETTY_NAME", "")}


TOOLS = {
    "podman": ["/usr/bin/podman", "/usr/local/bin/podman"],
    "crun": ["/usr/bin/crun"], "runc": ["/usr/bin/runc", "/usr/sbin/runc"],
    "conmon": ["/usr/bin/conmon", "/usr/libexec/podman/conmon", "/usr/lib/podman/conmon"],
    "netavark": ["/usr/lib/podman/netavark", "/usr/libexec/podman/netavark"],
    "aardvark-dns": ["/usr/lib/podman/aardvark-dns", "/usr/libexec/podman/aardvark-dns"],
    "cni": ["/usr/lib/cni/bridge", "/opt/cni/bin/bridge"],
    "iptables": ["/usr/sbin/iptables", "/sbin/iptables"],
    "nft": ["/usr/sbin/nft", "/sbin/nft"],
    "newuidmap": ["/usr/bin/newuidmap"],
    "slirp4netns": ["/usr/bin/slirp4netns"], "pasta": ["/usr/bin/pasta"],
    "systemctl": ["/usr/bin/systemctl", "/bin/systemctl"],
    "apt-get": ["/usr/bin/apt-get"],
}


def find_tools(paths):
    root = paths.get("tool_root", "")
    found = {}
    for name, candidates in TOOLS.items():
        override = shutil.which(name, path=paths["tool_path"]) if paths.get("tool_path") \
            else None
        found[name] = override or next((c for c in candidates if os.path.exists(root + c)),
                                       None)
    return found


def podman_version(session_paths, tools, may_cache):
    """Podman's version, cached by the binary's identity: a podman process costs ~1 s on
    a small VM, and the binary only changes when it is upgraded."""
    binary = tools.get("podman")
    if not binary:
        return None
    try:
        st = os.stat(binary)
    except OSError:
        return None
    key = f"{binary}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    cache_path = os.path.join(session_paths["state"], "podman-version.json")
    cache = read_json(cache_path, {})
    if cache.get("key") == key:
        return cache.get("version")
    code, out, _ = sh([binary, "version", "--format", "{{.Client.Version}}"], 60)
    version = out.strip() if code == 0 and out.strip() else None
    if version and may_cache:
        write_json(cache_path, {"key": key, "version": version})
    return version


def cgroup_limits(paths, pid):
    """The limits the kernel enforces, read from the container's cgroup (v2 or v1)."""
    try:
        with open(f"{paths['proc']}/{pid}/cgroup") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return {}
    limits = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = paths["cgroup"] + path
            for key, name in (("memory", "memory.max"), ("swap", "memory.swap.max"),
                              ("memory_usage", "memory.current"),
                              ("swap_usage", "memory.swap.current"),
                              ("memory_peak", "memory.peak")):
                limits[key] = read_text(os.path.join(base, name))
        elif "memory" in controllers.split(","):
            base = paths["cgroup"] + "/memory" + path
            limits["memory"] = read_text(base + "/memory.limit_in_bytes")
            limits["memsw"] = read_text(base + "/memory.memsw.limit_in_bytes")
            limits["memory_usage"] = read_text(base + "/memory.usage_in_bytes")
    return limits


def host_memory(paths):
    info = {}
    for line in (read_text(paths["meminfo"]) or "").splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0]) * 1024 if rest.split() else 0
    disk = shutil.disk_usage(paths["disk"])
    return {"mem_total": info.get("MemTotal"), "mem_available": info.get("MemAvailable"),
            "swap_total": info.get("SwapTotal"), "swap_free": info.get("SwapFree"),
            "disk_free": disk.free, "disk_total": disk.total}


def swap_facts(paths):
    swapfile = paths["swapfile"]
    swaps = (read_text(paths["proc_swaps"]) or "").splitlines()[1:]
    try:
        st = os.lstat(swapfile)
        size, mode = st.st_size, oct(st.st_mode & 0o777)
    except OSError:
        size, mode = 0, None
    fstab = read_text(paths["fstab"]) or ""
    return {
        "swaps": [{"path": s.split()[0], "size": int(s.split()[2]) * 1024} for s in swaps],
        "swapfile_size": size, "swapfile_mode": mode,
        "swap_in_fstab": any(line.split()[:1] == [swapfile] for line in fstab.splitlines()),
        "swappiness": int(read_text(paths["swappiness"]) or -1),
        "swappiness_persisted": read_text(paths["sysctl_conf"]),
    }


def apt_sources(paths):
    """(scheme, host, port) of every apt source: what `provision` will need to reach."""
    hosts = set()
    folder = paths["apt_sources"]
    files = [os.path.join(folder, "sources.list")]
    files += [os.path.join(folder, "sources.list.d", n)
              for n in sorted(_listdir(os.path.join(folder, "sources.list.d")))]
    for path in files:
        for line in (read_text(path) or "").splitlines():
            for word in line.replace("URIs:", " ").split():
                if word.startswith(("http://", "https://")):
                    scheme, rest = word.split("://", 1)
                    host = rest.split("/", 1)[0]
                    name, _, port = host.partition(":")
                    hosts.add((scheme, name, int(port) if port else
                               (443 if scheme == "https" else 80)))
    return sorted(hosts)


def unit_status(args):
    user = ["--user"] if args.get("rootless") else []
    code, out, _ = sh(["systemctl", *user, "show", "-p",
                       "ActiveState,NRestarts,ExecMainStatus,ExecMainCode,Result,"
                       "ActiveEnterTimestamp", args["unit"]])
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return values if code == 0 else {}


def logs_tail(a, since, lines=20):
    """What the agent (and systemd about it) said since `since`: the unit's journal, which
    outlives a container removed with --rm; podman's own log where the journal is empty."""
    user = ["--user"] if a.get("rootless") else []
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since - 1))
    code, out, _ = sh(["journalctl", *user, "-u", a["unit"], "--since", stamp, "-n",
                       str(lines), "-o", "cat", "--no-pager"])
    if code == 0 and out.strip():
        return out[-3000:]
    _, out, err = podman_logs(["podman", "logs", "--tail", str(lines), a["container"]])
    return (out + err)[-3000:]


def app_owner(args):
    entry = pwd.getpwnam(args["owner"])
    return entry.pw_uid, entry.pw_gid
