"""Every pure rule of a deploy: desired state versus facts, and the steps between them.

Pure: everything here works on settings, local files and a facts document (JSON from the
host helper's ``facts``), so planning is unit-tested from recorded facts, without a host.
Each comparison sits here once: what the host lacks (packages, Podman's version), whether
the swap is right, which secrets changed, whether the limits in force drift, what the
running container differs in, whether the base image is to be pulled (absent, or
``--refresh``) and whether the alert watcher is to be installed, updated or removed.
"""

from __future__ import annotations

import hashlib
import hmac
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Settings, parse_duration
from ..contract import MIN_PODMAN, SWAPFILE
from ..hostside.bundle import watcher_source
from .commands import (
    ROOTLESS_STATE_DIR,
    STATE_DIR,
    ContainerSpec,
    content_hash,
    markers_text,
    systemd_unit,
    watcher_dropin,
    watcher_service,
    watcher_timer,
)
from .compose import health_command, load_compose
from .sync import Delta, compute_delta, local_manifest, tree_hash

IMAGE_INPUTS = ("deployment/Dockerfile.nightguard", "deployment/requirements-agent.txt",
                "deployment/ng-supervise")
# Podman as each release ships it, where it decides whether provisioning can help.
DISTRO_PODMAN = {("debian", "11"): "3.0.1", ("debian", "12"): "4.3.1",
                 ("debian", "13"): "5.4.2", ("ubuntu", "22.04"): "3.4.4",
                 ("ubuntu", "24.04"): "4.9.3"}
MARKER_KEYS = {"NG_RELEASE_CODE": "code changed", "NG_RELEASE_IMAGE": "image changed",
               "NG_RELEASE_SECRETS": "secret values changed",
               "NG_RELEASE_SPEC": "container spec changed",
               "NG_RELEASE_VERSION": "release changed"}


def version_tuple(text: str | None) -> tuple[int, int]:
    """'4.9.3' -> (4, 9); '13' (Debian's VERSION_ID) -> (13, 0); unreadable -> (0, 0)."""
    try:
        major, minor = ([int(p) for p in str(text).split("-")[0].split(".")[:2]] + [0])[:2]
    except ValueError:
        return (0, 0)
    return major, minor


# -- desired state ---------------------------------------------------------------------------
@dataclass
class Desired:
    """What the host should look like after this deploy."""

    manifest: dict[str, str]
    code_hash: str
    image_tag: str
    image_ref: str
    spec: ContainerSpec
    unit_text: str
    markers: dict[str, str]
    secret_digests: dict[str, str]

    @property
    def version(self) -> str:
        return self.markers["NG_RELEASE_VERSION"]

    @property
    def markers_text(self) -> str:
        return markers_text(self.markers)

    def release(self, when: str) -> dict:
        """The history entry of this release: all a rollback needs to bring it back."""
        return {"version": self.version, "image": self.image_ref, "image_tag": self.image_tag,
                "code": self.code_hash, "secrets": dict(self.secret_digests),
                "unit_text": self.unit_text, "markers_text": self.markers_text,
                "when": when}


def markers_path(settings: Settings) -> str:
    state = ROOTLESS_STATE_DIR if settings["rootless"] else STATE_DIR
    return f"{state}/{settings['container_name']}.release.env"


def image_tag(settings: Settings, base_id: str | None = None) -> str:
    """A hash of what the image is built from: the base (its name and, on a host, the id
    of the base image there: a new build of python:3.11-slim is a new tag), and the
    Dockerfile and agent requirements as they travel in source_dir (the host builds from
    those). Without a host (``inv kube.export``) the base's name stands for it."""
    source = settings.path("source_dir")
    parts = [settings["base_image"]] + ([base_id] if base_id else [])
    for rel in IMAGE_INPUTS:
        parts.append((source / rel).read_bytes().decode())
    return content_hash(*parts)


def secret_digest(salt: str, value: str) -> str:
    """Keyed hash of a secret value: comparable without storing or sending plaintext."""
    return hmac.new(bytes.fromhex(salt), value.encode(), hashlib.sha256).hexdigest()


def secret_digests(facts: dict, values: dict[str, str]) -> dict[str, str]:
    salt = facts.get("secret_salt")
    if not salt:
        return {}
    return {name: secret_digest(salt, value) for name, value in values.items()}


def secrets_label(digests: dict[str, str]) -> str:
    return content_hash(*(f"{k}={digests[k]}" for k in sorted(digests)))


def changed_secrets(facts: dict, digests: dict[str, str], names: list[str]) -> list[str]:
    """Secrets the host lacks or holds another value of. No digest (no host key yet, a
    secret made by hand) means the value is unknown: it counts as changed."""
    stored = facts.get("secret_hashes") or {}
    present = facts.get("secrets") or {}
    return [n for n in names
            if n not in present or not digests.get(n) or stored.get(n) != digests[n]]


def network_mode(settings: Settings, podman: str | None) -> str:
    """The container's network: a user-mode stack (no iptables work per start, no way to
    the host's loopback) unless configured otherwise. Podman 5 prefers pasta but allows it
    only rootless; rootful keeps slirp4netns, which Podman 6 drops (then: bridge)."""
    if settings["network"] != "auto":
        return settings["network"]
    version = version_tuple(podman)
    if settings["rootless"] and version >= (5, 0):
        return "pasta"
    return "slirp4netns" if version < (6, 0) else "bridge"


def build_needs_network(settings: Settings) -> bool:
    """Only when the agent's requirements list something to download."""
    path = settings.path("source_dir") / IMAGE_INPUTS[1]
    lines = path.read_text().splitlines() if path.exists() else []
    return any(line.strip() and not line.strip().startswith("#") for line in lines)


def watchdog_seconds(settings: Settings) -> int:
    """health.watchdog in whole seconds; 0 when "off" (validated at load)."""
    text = str(settings["health.watchdog"]).strip()
    return 0 if text == "off" else int(parse_duration(text))


def desired_state(settings: Settings, digests: dict[str, str],
                  manifest: dict[str, str] | None = None, podman: str | None = None,
                  base_id: str | None = None) -> Desired:
    """``manifest``: the local tree's hashes when already computed in this run; ``podman``:
    the host's version (it picks the network stack); ``base_id``: the id of the base image
    on the host (it is part of the image's tag)."""
    if manifest is None:
        from .sync import declared_roots

        manifest = local_manifest(Path(settings.path("source_dir")), declared_roots(settings))
    code = tree_hash(manifest)
    tag = image_tag(settings, base_id)
    ref = f"{settings['image_name']}:{tag}"
    compose = load_compose(settings.path("compose_file"))
    watchdog = watchdog_seconds(settings)
    liveness = [("NG_WATCHDOG_SEC", str(watchdog)),
                ("NG_LIVENESS_GRACE", f"{parse_duration(settings['health.start_period']):g}")]
    environment = [("NG_HEARTBEAT_MAX_AGE", str(settings["health.heartbeat_max_age"])),
                   *(liveness if watchdog else []),
                   ("NG_REQUIRED_SECRETS", ",".join(settings.secret_names)),
                   *sorted(settings["agent_env"].items())]
    spec = ContainerSpec(
        name=settings["container_name"], image=ref, app_dir=settings["app_dir"],
        data_dir=settings["data_dir"], markers_file=markers_path(settings),
        memory=settings["limits.memory"], memory_reservation=settings["limits.memory_reservation"],
        memory_swap=settings["limits.memory_swap"], cpus=float(settings["limits.cpus"]),
        network=network_mode(settings, podman), secrets=tuple(settings.secret_names),
        health_cmd=health_command(compose),
        health_interval=settings["health.interval"], health_timeout=settings["health.timeout"],
        health_retries=settings["health.retries"],
        health_start_period=settings["health.start_period"],
        environment=tuple(environment), command=tuple(shlex.split(settings["agent_command"])),
        watchdog_sec=watchdog,
    )
    label = secrets_label(digests)
    spec_hash = spec.spec_hash()
    markers = {"NG_RELEASE_CODE": code, "NG_RELEASE_IMAGE": tag,
               "NG_RELEASE_SECRETS": label, "NG_RELEASE_SPEC": spec_hash,
               "NG_RELEASE_VERSION": content_hash(code, tag, label, spec_hash)}
    return Desired(manifest=manifest, code_hash=code, image_tag=tag, image_ref=ref, spec=spec,
                   unit_text=systemd_unit(spec, rootful=not settings["rootless"]),
                   markers=markers, secret_digests=dict(digests))


# -- the host's fitness --------------------------------------------------------------------
@dataclass
class HostNeeds:
    install: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def nftables_host(os_info: dict) -> bool:
    return os_info.get("id") == "debian" and version_tuple(os_info.get("version_id")) >= (13, 0)


def expected_podman(facts: dict) -> str:
    """The host's Podman version or, while it is still to be installed, the one its
    distribution ships: the unit's network stack depends on it, so the packages planned
    and the unit written must assume the same one."""
    os_info = facts.get("os") or {}
    shipped = DISTRO_PODMAN.get((os_info.get("id"), os_info.get("version_id")))
    return facts.get("podman") or shipped or ("5.0" if nftables_host(os_info) else "4.0")


def host_needs(settings: Settings, facts: dict) -> HostNeeds:
    """Packages to install, or why the host cannot take this deploy (one line each)."""
    needs = HostNeeds()
    tools = facts.get("tools") or {}
    os_info = facts.get("os") or {}
    distro = f"{os_info.get('name') or os_info.get('id') or 'this system'}"
    if not facts.get("systemd"):
        needs.problems.append("systemd is not running on the host: the agent's unit needs it")
    firewall = "nftables" if nftables_host(os_info) else "iptables"
    wanted = [("podman", tools.get("podman")),
              ("crun", tools.get("crun") or tools.get("runc")),
              ("conmon", tools.get("conmon")),
              ("netavark", tools.get("netavark") or tools.get("cni")),
              ("aardvark-dns", tools.get("aardvark-dns") or tools.get("cni")),
              (firewall, tools.get("iptables") or tools.get("nft"))]
    network = network_mode(settings, expected_podman(facts))
    if network == "pasta":
        wanted.append(("passt", tools.get("pasta")))
    elif network == "slirp4netns":
        wanted.append(("slirp4netns", tools.get("slirp4netns")))
    if settings["rootless"]:
        wanted.append(("uidmap", tools.get("newuidmap")))
    needs.install = [package for package, present in wanted if not present]
    base = settings["base_image"]
    if tools.get("podman") and base.startswith("localhost/") and not \
            settings["base_image_archive"] and base not in (facts.get("image_names") or []):
        needs.problems.append(f"the base image {base} is not on the host and a localhost/ "
                              "image cannot be pulled: load it there, or set "
                              "nightguard.base_image_archive")
    version = facts.get("podman")
    if version and version_tuple(version) < MIN_PODMAN:
        needs.problems.append(f"Podman {version} is older than the minimum "
                              f"{'.'.join(map(str, MIN_PODMAN))} (--health-on-failure): "
                              "upgrade it, or use Debian 12+ / Ubuntu 24.04+")
    if not needs.install:
        return needs
    shipped = DISTRO_PODMAN.get((os_info.get("id"), os_info.get("version_id")))
    missing = ", ".join(needs.install)
    like = {os_info.get("id"), *(os_info.get("like") or [])}
    if not ({"debian", "ubuntu"} & like) or not tools.get("apt-get"):
        needs.problems.append(f"{missing} missing, and {distro} is not Debian or Ubuntu: "
                              "install Podman >= 4.3 there yourself")
    elif "podman" in needs.install and shipped and version_tuple(shipped) < MIN_PODMAN:
        needs.problems.append(f"Podman is missing and {distro} ships {shipped}, older than "
                              f"{'.'.join(map(str, MIN_PODMAN))}: use Debian 12+ or "
                              "Ubuntu 24.04+")
    elif settings["rootless"]:
        needs.problems.append(f"{missing} missing: rootless mode installs no packages; run "
                              f"`sudo apt-get install {' '.join(needs.install)}` on the host "
                              "once")
    elif facts.get("apt_reachable") is not None and not any(facts["apt_reachable"].values()):
        mirrors = ", ".join(facts["apt_reachable"]) or "no apt source configured"
        needs.problems.append(f"{missing} missing and the host reaches no package mirror "
                              f"({mirrors}): check its network, or install them yourself")
    return needs


def swap_needed(settings: Settings, facts: dict) -> bool:
    """True unless the swapfile is active, of the right size and mode, in fstab, with the
    wanted swappiness persisted."""
    active = any(s["path"] == SWAPFILE for s in facts.get("swaps", []))
    return not (active and facts.get("swapfile_size") == settings.size("limits.swap_size")
                and facts.get("swap_in_fstab") and facts.get("swapfile_mode") == "0o600"
                and facts.get("swappiness") == settings["limits.swappiness"]
                and facts.get("swappiness_persisted")
                == f"vm.swappiness={settings['limits.swappiness']}")


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


# The code the image's HEALTHCHECK runs (Dockerfile.nightguard): a restart in place that
# changes it gets the full check in its gate, not only the new process's first beat.
HEALTH_CHECK_CODE = ("execution/system/health_check.py", "execution/system/heartbeat.py")


def touches_health_check(delta: Delta) -> bool:
    return any(path in HEALTH_CHECK_CODE for path in (*delta.changed, *delta.deleted))


# -- the plan ---------------------------------------------------------------------------------
@dataclass
class Plan:
    install: list[str] = field(default_factory=list)
    swap: bool = False
    remove_env_file: bool = False
    delta: Delta = field(default_factory=lambda: Delta((), ()))
    links: list[str] = field(default_factory=list)
    synced: list[str] = field(default_factory=list)  # what the host lists as synced now
    secrets: list[str] = field(default_factory=list)
    base: str | None = None  # "pull" or "import" the base image first
    refresh: bool = False  # `inv deploy --refresh`: a newer base is looked for
    build_image: bool = False
    write_unit: bool = False
    write_markers: bool = False
    reload: bool = False  # only the code changed: restart the agent in its container
    restart: bool = False
    gate: bool = False
    watcher: str | None = None  # "install", "update" or "remove" the alert watcher
    reasons: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any((self.install, self.swap, self.remove_env_file, bool(self.delta),
                    self.links, self.secrets, self.base, self.build_image, self.write_unit,
                    self.write_markers, self.reload, self.restart, self.gate, self.watcher))

    def lines(self, settings: Settings | None = None) -> list[str]:
        size = settings["limits.swap_size"] if settings else "swap"
        out = []
        if self.install:
            out.append(f"host: install {', '.join(self.install)} (apt-get)")
        if self.swap:
            out.append(f"host: set up the {size} swapfile (fstab, swappiness)")
        if self.remove_env_file:
            out.append("host: remove the plain-text .env from the app dir")
        if self.delta:
            out.append(f"sync: {self.delta.describe()}")
        if self.links:
            out.append(f"sync: remove {len(self.links)} symbolic link(s) from the app dir")
        if self.secrets:
            out.append(f"secrets: create or update {', '.join(self.secrets)}")
        base = settings["base_image"] if settings else "the base image"
        if self.base == "import":
            archive = settings["base_image_archive"] if settings else "its archive"
            out.append(f"base: import {base} from {archive}")
        elif self.base:
            out.append(f"base: pull {base} " + ("(refresh: a new one means a rebuild)"
                                                if self.refresh else "(not on the host)"))
        if self.build_image:
            out.append("image: build")
        if self.write_unit:
            out.append("unit: write the systemd unit and enable it")
        if self.restart:
            out.append("container: (re)start and wait until healthy")
        elif self.reload:
            out.append("agent: restart in its container (code only) and wait until healthy")
        elif self.gate:
            out.append("health: the last deploy did not finish its health gate; check it")
        if self.watcher:
            out.append({"install": "alerts: install the watcher",
                        "update": "alerts: update the watcher",
                        "remove": "alerts: remove the watcher (alerts are off)"}[self.watcher])
        return out


def base_action(settings: Settings, facts: dict, refresh: bool = False) -> str | None:
    """"pull" when the host lacks the base image or a refresh looks for a newer one,
    "import" for a local base the host lacks and has an archive of; None otherwise (a
    localhost/ image has no registry to be refreshed from)."""
    base = settings["base_image"]
    present = bool(facts.get("base_image")) or base in (facts.get("image_names") or [])
    if base.startswith("localhost/"):
        return "import" if not present and settings["base_image_archive"] else None
    return "pull" if refresh or not present else None


def base_id(facts: dict) -> str | None:
    return (facts.get("base_image") or {}).get("id")


def watcher_config(settings: Settings) -> dict:
    """The watcher's arguments, written root-only on the host: settings and addresses,
    never the token (the watcher reads it from Podman's secret when it sends)."""
    return {
        "chat_id": settings["alerts.chat_id"],
        "api_base": settings["alerts.api_base"].rstrip("/"),
        "secret": settings["alerts.token_secret"],
        "interval": int(parse_duration(settings["alerts.interval"])),
        "ping_url": settings["alerts.ping_url"],
        "ping_every": int(parse_duration(settings["alerts.ping_every"])),
        "crash_loop": {"restarts": settings["alerts.crash_loop.restarts"],
                       "minutes": settings["alerts.crash_loop.minutes"]},
        "swap_percent": settings["alerts.swap_percent"],
        "disk_free_mb": settings["alerts.disk_free_mb"],
        "rate_limit": {"messages": settings["alerts.rate_limit.messages"],
                       "minutes": settings["alerts.rate_limit.minutes"]},
    }


def desired_watcher(settings: Settings) -> dict | None:
    """The watcher as it should be on the host (None: alerts are off): this version of
    its own program (apart from the helper's), its arguments, its service and timer."""
    if not settings["alerts.enabled"]:
        return None
    config = watcher_config(settings)
    rootful = not settings["rootless"]
    return {"version": watcher_source()[1], "config": config,
            "service": watcher_service(rootful=rootful),
            "timer": watcher_timer(config["interval"]),
            "dropin": watcher_dropin(rootful=rootful)}


def watcher_action(wanted: dict | None, facts: dict) -> str | None:
    """install / update / remove, or None when the host has the watcher wanted."""
    installed = facts.get("watcher") or {}
    owed = "watcher" in (facts.get("systemd_reload_owed") or [])
    if wanted is None:
        return "remove" if installed.get("present") or owed else None
    if not installed.get("present"):
        return "install"
    same = (installed.get("version") == wanted["version"]
            and installed.get("config") == wanted["config"]
            and (installed.get("service") or "").strip() == wanted["service"].strip()
            and (installed.get("timer") or "").strip() == wanted["timer"].strip()
            and (installed.get("dropin") or "").strip() == wanted["dropin"].strip()
            and installed.get("enabled") and not owed)
    return None if same else "update"


def make_plan(settings: Settings, desired: Desired, facts: dict,
              digests: dict[str, str], *, refresh: bool = False,
              watcher: dict | None = None) -> Plan:
    """``watcher``: desired_watcher's answer (None: alerts off)."""
    plan = Plan()
    plan.install = host_needs(settings, facts).install
    plan.swap = swap_needed(settings, facts)
    plan.remove_env_file = bool(facts.get("env_file_on_host"))
    plan.delta = compute_delta(desired.manifest, facts.get("manifest", {}),
                               facts.get("synced", []))
    plan.links = list(facts.get("links") or [])
    plan.synced = sorted(facts.get("synced") or [])
    plan.secrets = changed_secrets(facts, digests, settings.secret_names)
    plan.refresh = refresh
    plan.base = base_action(settings, facts, refresh)
    plan.watcher = watcher_action(watcher, facts)
    return plan_container(plan, desired, facts)


def plan_container(plan: Plan, desired: Desired, facts: dict) -> Plan:
    """The image, unit, markers and container part of the plan: from the facts, and again
    once a pulled base image's id has given the image its tag."""
    plan.build_image = desired.image_tag not in facts.get("image_tags", [])
    plan.write_unit = (facts.get("unit_text") or "").strip() != desired.unit_text.strip() \
        or not facts.get("unit_enabled") or "unit" in (facts.get("systemd_reload_owed") or [])
    plan.write_markers = (facts.get("markers_text") or "").strip() \
        != desired.markers_text.strip()
    container = facts.get("container") or {}
    plan.reasons = []
    if not container.get("running"):
        plan.reasons.append("container is not running")
    running = container.get("markers") or {}
    for key, why in MARKER_KEYS.items():
        if key != "NG_RELEASE_VERSION" and running.get(key) != desired.markers[key]:
            plan.reasons.append(why)
    plan.restart = bool(plan.reasons) or plan.write_unit or bool(plan.secrets)
    if plan.restart and plan.reasons == ["code changed"] and not plan.write_unit \
            and not plan.secrets and container.get("running"):
        # the code is a read-only bind mount: a new agent process will do, in seconds
        plan.restart, plan.reload = False, True
    verified = (facts.get("state") or {}).get("verified")
    plan.gate = plan.restart or plan.reload or verified != desired.version
    return plan


def parse_markers(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (text or "").splitlines() if "=" in line)


def rotated_release(release: dict, digests: dict[str, str], when: str) -> dict:
    """A release with other secret values: same code, image and unit, new markers."""
    markers = parse_markers(release["markers_text"])
    secrets = dict(release.get("secrets") or {}, **digests)
    label = secrets_label(secrets)
    markers["NG_RELEASE_SECRETS"] = label
    markers["NG_RELEASE_VERSION"] = content_hash(markers["NG_RELEASE_CODE"],
                                                 markers["NG_RELEASE_IMAGE"], label,
                                                 markers["NG_RELEASE_SPEC"])
    return dict(release, version=markers["NG_RELEASE_VERSION"], secrets=secrets,
                markers_text=markers_text(markers), when=when)


def previous_release(facts: dict) -> dict | None:
    """The last release that passed its gate, if it was recorded fully enough to restore."""
    for entry in (facts.get("state") or {}).get("history") or []:
        if entry.get("markers_text") and entry.get("unit_text"):
            return entry
    return None
