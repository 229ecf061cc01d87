"""`inv exec` (a command in the agent's container) and `inv remove` (the deployment
off the host)."""

import os
import re
import socket
import subprocess
import threading
import time

from ..contract import COPY_SEP, DATA_SIBLINGS, WATCH_UNIT
from .base import OpError, _listdir, _unlink, end_process, read_text, sh, write_private
from .host_facts import swap_facts, unit_status
from .nofollow import open_dir_nofollow, remove_tree_at
from .ops_alerts import op_watcher, watcher_facts
from .podman_store import container_state, list_images, list_secrets, storage_names

AGENT_USER = "1000:1000"  # the image's USER: who the agent runs as (it owns /run/secrets/*)


def op_exec(s, req):
    """A command in the agent's running container: `podman exec --user AGENT NAME ARGV...`
    (uid 0 only when ``root`` is asked for), the argv as sent, never through a shell. Its
    output comes back as progress lines tagged "o" (stdout) or "e" (stderr), each the raw
    text with its newline; the answer is its exit code. No stdin; it is ended when the
    client goes away."""
    a = s.args
    container = container_state(s.paths, a["container"])
    if not container:
        raise OpError(f"the container {a['container']} does not exist on this host "
                      "(`inv deploy` creates it)")
    if not container.get("running"):
        raise OpError(f"the container {a['container']} is not running "
                      f"({container.get('status') or 'stopped'}): `inv health` says why")
    command = [str(word) for word in req.get("argv") or []]
    if not command:
        raise OpError("no command to run")
    argv = ["podman", "exec", "--user", "0:0" if req.get("root") else AGENT_USER,
            a["container"], *command]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        raise OpError(f"podman: {exc.strerror or exc}") from None

    def pump(stream, tag):
        for raw in iter(lambda: stream.readline(65536), b""):
            s.send({"id": req["id"], "progress": tag + raw.decode("utf-8", "replace")})

    pumps = [threading.Thread(target=pump, args=(proc.stdout, "o"), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, "e"), daemon=True)]
    for thread in pumps:
        thread.start()
    while proc.poll() is None:
        if s.gone.is_set():
            end_process(proc)
            break
        time.sleep(0.05)
    for thread in pumps:
        thread.join(5)
    return {"exit": proc.returncode}


STATE_KEPT = ("audit.log", "lock", "lock.json")  # what a removal leaves in the state dir
STATE_UNCOUNTED = ("helper",)  # this session's own copy of the helper: removed, not counted


def our_secrets(present, names):
    """The secrets of this deployment among those present: NAME and its kept values
    NAME__<digest12>."""
    wanted = set(names)
    return sorted(n for n in present if n in wanted or (
        COPY_SEP in n and n.rsplit(COPY_SEP, 1)[0] in wanted
        and re.fullmatch(r"[0-9a-f]{12}", n.rsplit(COPY_SEP, 1)[1])))


def swap_present(paths):
    facts = swap_facts(paths)
    active = any(x["path"] == paths["swapfile"] for x in facts["swaps"])
    return active, (active or os.path.lexists(paths["swapfile"]) or facts["swap_in_fstab"]
                    or os.path.lexists(paths["sysctl_conf"]))


def removal(s, req):
    """What of this deployment is on the host, in the order `remove` takes it off:
    ([(key, words)], [words of what stays])."""
    a, p = s.args, s.paths
    found, kept = [], []
    unit = unit_status(a)
    if os.path.lexists(p["unit"]) or os.path.lexists(p["unit_wants"]) or \
            unit.get("ActiveState") not in (None, "", "inactive"):
        found.append(("unit", f"the systemd unit {a['unit']} (stopped, disabled, its file)"))
    images, secrets, containers = storage_names(p)
    if container_state(p, a["container"], containers=containers):
        found.append(("container", f"the container {a['container']}"))
    if watcher_facts(p)["present"]:
        found.append(("watcher", f"the alert watcher ({WATCH_UNIT}.timer and .service)"))
    _, tags = list_images(p, a["image_name"], images)
    if tags:
        found.append(("images", f"{len(tags)} image(s) {a['image_name']}:*"))
    ours = our_secrets(list_secrets(p, secrets), req.get("secrets") or [])
    if ours:
        found.append(("secrets", f"{len(ours)} Podman secret(s): {', '.join(ours)}"))
    if os.path.lexists(a["app_dir"]):
        found.append(("app_dir", f"the app dir {a['app_dir']} (the synced code)"))
    if [n for n in _listdir(p["state"]) if n not in STATE_KEPT + STATE_UNCOUNTED]:
        found.append(("state", f"the deploy state in {p['state']} (releases, records; "
                      "its audit.log stays)"))
    aside = [a["data_dir"].rstrip("/") + suffix for suffix in DATA_SIBLINGS
             if os.path.lexists(a["data_dir"].rstrip("/") + suffix)]
    if os.path.lexists(a["data_dir"]) or aside:
        if req.get("delete_data"):
            also = f", and {', '.join(aside)} (kept aside by a restore)" if aside else ""
            found.append(("data_dir", f"the data dir {a['data_dir']} (the agent's data)"
                                      f"{also}"))
        else:
            kept.append(f"the data dir {a['data_dir']} (`inv remove --data` deletes it)")
    present = swap_present(p)[1]
    if present and req.get("swap"):
        found.append(("swap", f"the swapfile {p['swapfile']} (swapoff, fstab, swappiness)"))
    elif present:
        kept.append(f"the swapfile {p['swapfile']} (`inv remove --swap` removes it)")
    return found, kept


def op_remove_plan(s, req):
    """Read-only: what `remove` would take off this host, and the host's name (which a
    user types to confirm deleting the data dir)."""
    found, kept = removal(s, req)
    return {"found": [words for _, words in found], "kept": kept,
            "hostname": socket.gethostname()}


def remove_path(s, path):
    """Remove a file or a whole tree at an absolute path, never following a link (a link
    is removed, not its target)."""
    parent, name = os.path.split(path.rstrip("/"))
    try:
        parent_fd = open_dir_nofollow(parent)
    except FileNotFoundError:
        return
    try:
        remove_tree_at(parent_fd, name)
    except FileNotFoundError:
        pass
    except PermissionError:
        if not s.args.get("rootless"):
            raise
        # rootless: the agent's files belong to sub-uids only the user namespace may remove
        code, _, err = sh(["podman", "unshare", "rm", "-rf", "--", path], 600)
        if code != 0:
            raise OpError(f"cannot remove {path}: {err.strip()[-200:]}") from None
    finally:
        os.close(parent_fd)


def checked(argv, what, timeout=300):
    code, _, err = sh(argv, timeout)
    if code != 0:
        raise OpError(f"`{' '.join(argv[:3])} ...` failed ({what}): {err.strip()[-200:]}",
                      err.strip().splitlines()[-10:])


def op_remove(s, req):
    """Take this deployment off the host: unit, container, alert watcher, images, secrets
    (and their kept values), app dir, the deploy state (its audit log stays: the session's
    own line goes there), then the data dir and the swapfile when asked. Each part is
    looked at again and taken off only if present, so a removal cut half-way is finished
    by the next one."""
    a, p = s.args, s.paths
    user = ["--user"] if a.get("rootless") else []
    found, kept = removal(s, req)
    todo = dict(found)
    for key, words in found:
        s.progress(req["id"], f"removing {words}")
        if key == "unit":
            if unit_status(a).get("ActiveState") not in (None, "", "inactive"):
                checked(["systemctl", *user, "stop", a["unit"]], "stop the agent", 360)
            if os.path.lexists(p["unit_wants"]):
                checked(["systemctl", *user, "disable", "--quiet", a["unit"]], "disable")
            _unlink(p["unit"])
            _unlink(p["unit_wants"])
            checked(["systemctl", *user, "daemon-reload"], "daemon-reload")
            sh(["systemctl", *user, "reset-failed", a["unit"]])  # a failed unit's record
        elif key == "container":
            checked(["podman", "rm", "--force", "--ignore", a["container"]], "container")
        elif key == "watcher":
            op_watcher(s, {"action": "remove"})
        elif key == "images":
            _, tags = list_images(p, a["image_name"])
            checked(["podman", "rmi", "--ignore",
                     *[f"{a['image_name']}:{t}" for t in tags]], "images")
        elif key == "secrets":
            ours = our_secrets(list_secrets(p), req.get("secrets") or [])
            if ours:
                checked(["podman", "secret", "rm", *ours], "secrets")
        elif key == "app_dir":
            remove_path(s, a["app_dir"])
        elif key == "state":
            for name in _listdir(p["state"]):
                if name not in STATE_KEPT:
                    remove_path(s, os.path.join(p["state"], name))
        elif key == "data_dir":
            for path in (a["data_dir"], *(a["data_dir"].rstrip("/") + suffix
                                          for suffix in DATA_SIBLINGS)):
                remove_path(s, path)
        elif key == "swap":
            if swap_present(p)[0]:
                checked(["swapoff", p["swapfile"]], "swapoff", 600)
            fstab = read_text(p["fstab"])
            if fstab is not None:
                lines = [line for line in fstab.splitlines()
                         if line.split()[:1] != [p["swapfile"]]]
                if len(lines) != len(fstab.splitlines()):
                    write_private(p["fstab"], "\n".join(lines) + "\n", 0o644)
            _unlink(p["sysctl_conf"])
            _unlink(p["swapfile"])
    if "state" not in todo:  # this session's own copy of the helper goes in any case
        for name in STATE_UNCOUNTED:
            remove_path(s, os.path.join(p["state"], name))
    return {"removed": [words for _, words in found], "kept": kept}
