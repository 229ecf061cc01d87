"""The ``facts`` op: everything the laptop plans from, read cheaply from files (the
shape is ``tasks.contract.Facts``)."""

import os

from ..contract import DATA_JOURNAL_FILE, DATA_PAUSED_FILE
from .aptlock import apt_holders, reachable
from .base import _listdir, read_json, read_text, write_private
from .host_facts import apt_sources, find_tools, host_memory, os_release, podman_version, swap_facts
from .nofollow import open_dir_nofollow, tree_manifest
from .ops_alerts import watcher_facts
from .podman_store import container_state, image_info, list_images, list_secrets, storage_names
from .statedir import last_audit, reload_owed


def op_facts(s, req):
    a, paths = s.args, s.paths
    tools = find_tools(paths)
    facts = {"os": os_release(paths), "tools": tools,
             "systemd": os.path.isdir(paths["systemd_run"]),
             "cgroup2": os.path.exists(paths["cgroup_controllers"]),
             "uid": os.getuid()}
    facts["podman"] = podman_version(paths, tools, may_cache=s.changing)
    facts.update(swap_facts(paths))
    images, secrets, containers = storage_names(paths) if tools["podman"] else ([], {}, [])
    facts["image_names"], facts["image_tags"] = list_images(paths, a["image_name"], images) \
        if tools["podman"] else ([], [])
    facts["secrets"] = list_secrets(paths, secrets) if tools["podman"] else {}
    facts["base_image"] = image_info(paths, a.get("base_image"), images) \
        if tools["podman"] else None
    facts["secret_hashes"] = read_json(os.path.join(paths["state"], "secrets.json"), {})
    salt_path = os.path.join(paths["state"], "secret.salt")
    if s.changing and not os.path.exists(salt_path):
        write_private(salt_path, os.urandom(32).hex())
    facts["secret_salt"] = read_text(salt_path)
    facts["container"] = container_state(paths, a["container"], containers=containers) \
        if tools["podman"] else None
    facts["unit_text"] = read_text(paths["unit"])
    facts["unit_enabled"] = os.path.lexists(paths["unit_wants"])
    facts["systemd_reload_owed"] = reload_owed(paths)
    facts["linger"] = os.path.exists(os.path.join(paths["linger_dir"], a["owner"]))
    facts["markers_text"] = read_text(paths["markers"])
    facts["watcher"] = watcher_facts(paths)
    app_dir = a["app_dir"]
    try:
        root_fd = open_dir_nofollow(app_dir)
    except OSError:
        facts.update(app_dir_exists=False, manifest={}, links=[])
    else:
        try:
            manifest, links = tree_manifest(root_fd, skip=(".git", "__pycache__"))
        finally:
            os.close(root_fd)
        facts.update(app_dir_exists=True, manifest=manifest, links=links)
    facts["env_file_on_host"] = ".env" in facts["manifest"]
    facts["synced"] = read_json(os.path.join(paths["state"], "synced.json"), [])
    facts["state"] = read_json(os.path.join(paths["state"], "state.json"), {"history": []})
    facts["releases"] = sorted(n[:-7] for n in _listdir(os.path.join(paths["state"],
                                                                     "releases"))
                               if n.endswith(".tar.gz"))
    facts["host"] = host_memory(paths)
    facts["last_audit"] = last_audit(paths)
    basics = ("podman", "conmon", "aardvark-dns")
    if any(not tools[name] for name in basics) or not (tools["crun"] or tools["runc"]):
        facts["apt_sources"] = apt_sources(paths) if tools.get("apt-get") else []
        facts["apt_reachable"] = {f"{h}:{p}": reachable(h, p, 5.0)
                                  for _, h, p in facts["apt_sources"][:4]}
    # always (four F_GETLK calls): whatever the plan installs, the deploy waits for it first
    facts["apt_busy"] = apt_holders(paths)
    facts["data_unfinished"] = [what for what, name in (("backup", DATA_PAUSED_FILE),
                                                        ("restore", DATA_JOURNAL_FILE))
                                if os.path.exists(os.path.join(paths["state"], name))]
    return facts
