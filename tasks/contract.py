"""What the laptop and the host agree on, in one place: the host's paths, the constants
both sides apply, the names of the host helper's ops, and the shape of the facts and of
the health answer. Standard library only and no relative imports: the host gets this
module inside its helper and watcher bundles (``tasks.hostside.bundle``), the laptop
imports it. Renaming a fact or raising the minimum Podman is one edit here; the unit
tests check that both sides still use only what this module declares."""

from typing import Any, TypedDict

# -- the host's paths ------------------------------------------------------------------------
STATE_DIR = "/var/lib/nightguard"  # the host helper's state, rootful (root only, 0700)
ROOTLESS_STATE = "~/.local/state/nightguard"  # the same for a rootless user (~ expanded)
SWAPFILE = "/swapfile"
HEARTBEAT_FILE = "/tmp/nightguard/heartbeat"  # in the container; NG_HEARTBEAT_FILE moves it
WATCHER_FILE = "watcher.py"  # in the state dir: the watcher's program
ALERTS_ARGS_FILE = "alerts.json"  # in the state dir: its arguments (root only, no token)
DATA_PAUSED_FILE = "data-paused.json"  # in the state dir while a backup has the agent paused
DATA_JOURNAL_FILE = "data-restore.json"  # in the state dir while a restore is not settled
# beside the data dir (<data_dir><suffix>): a restore's new tree, the old one kept aside, a
# restored one that failed its gate
# in the state dir of a VM the agent moved away from (`inv vm.move`): where it went and when,
# so `inv health` there says which VM is live; gone when the move is undone
MOVE_MARK_FILE = "moved.json"
DATA_SIBLINGS = (".ng-restore", ".ng-previous", ".ng-failed")

# -- constants both sides apply ----------------------------------------------------------------
MIN_PODMAN = (4, 3)  # --health-on-failure; see the README's "Host requirements"
WATCH_UNIT = "nightguard-watch"  # .service (one watch pass) and .timer (its schedule)
COPY_SEP = "__"  # NAME__<digest12>: a kept value of secret NAME
OUR_MOUNTS = ("/app", "/data", "/run/secrets")  # the mounts facts report

# -- the host helper's ops -----------------------------------------------------------------------
OP_NAMES = frozenset({
    "facts", "apt_wait", "provision", "swap", "rm_env", "sync", "release", "restore_code",
    "secret_put", "secret_restore", "secret_forget", "run", "install_unit", "write_file",
    "dirs", "reload", "gate", "health", "logs", "history", "finish", "unlock", "base",
    "watcher", "alert_test", "exec", "remove_plan", "remove",
    # the agent's data dir: a backup streamed out, a restore put in place (ops_data.py)
    "data_backup", "data_upload", "data_unpack", "data_swap", "data_settle", "data_undo",
    "data_heal",
    # a move between VMs: the agent stopped and disabled / enabled and started, and the mark
    # that says where it went (ops_move.py)
    "agent", "move_mark"})
# ops a read-only session may run (alert_test sends a message and exec runs a command in the
# container: neither changes anything of the deployment's)
READ_ONLY_OPS = frozenset({"facts", "health", "logs", "history", "unlock", "alert_test",
                           "apt_wait", "exec", "remove_plan"})

# -- the one verdict of "healthy" (the host's, tasks/hostside/verdict.py) ---------------------
STATUSES = ("healthy", "unhealthy", "starting", "down")


class Verdict(TypedDict):
    status: str  # one of STATUSES
    detail: str  # why, in words ("" when healthy)
    problem: str | None  # the line `inv health` prints for it (None when healthy)


class Facts(TypedDict, total=False):
    """The ``facts`` op's answer: what the laptop plans from (tasks/hostside/ops_facts.py)."""
    os: dict[str, Any]  # id, version_id, codename, like, name
    tools: dict[str, str | None]  # tool -> its path, None when absent
    systemd: bool
    cgroup2: bool
    uid: int
    podman: str | None  # Podman's version, as the host caches it
    swaps: list[dict[str, Any]]
    swapfile_size: int
    swapfile_mode: str | None
    swap_in_fstab: bool
    swappiness: int
    swappiness_persisted: str | None
    image_names: list[str]
    image_tags: list[str]
    secrets: dict[str, str]  # name -> created
    base_image: dict[str, Any] | None
    secret_hashes: dict[str, str]
    secret_salt: str | None
    container: dict[str, Any] | None
    unit_text: str | None
    unit_enabled: bool
    systemd_reload_owed: list[str]  # writers whose unit files a cut run left unread
    linger: bool
    markers_text: str | None
    watcher: dict[str, Any]
    app_dir_exists: bool
    manifest: dict[str, str]  # rel -> sha256:mode
    links: list[str]
    env_file_on_host: bool
    synced: list[str]
    state: dict[str, Any]  # {"history": [...], "verified": version}
    releases: list[str]
    host: dict[str, Any]
    last_audit: dict[str, Any] | None
    apt_sources: list[list[Any]]  # only when a basic tool is missing
    apt_reachable: dict[str, bool]  # idem
    apt_busy: list[dict[str, Any]]
    data_unfinished: list[str]  # "backup" (agent left paused), "restore" (cut after its swap)


class Health(TypedDict):
    """The ``health`` op's answer (tasks/hostside/ops_unit.py)."""
    container: dict[str, Any] | None
    verdict: Verdict
    cgroup: dict[str, Any]
    host: dict[str, Any]
    swaps: list[str]
    lock: dict[str, Any] | None
    unit: dict[str, str]
    last_audit: dict[str, Any] | None
    deployed: dict[str, Any]
    alerts: dict[str, Any]
    base_image: dict[str, Any] | None
    moved: dict[str, Any] | None  # MOVE_MARK_FILE: the agent moved to another VM from here
    enabled: bool | None  # the agent's unit enabled (None: no unit)
