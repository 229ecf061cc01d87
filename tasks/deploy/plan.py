"""Desired state versus facts: the list of steps a deploy has to take, and nothing more.

Pure: everything here works on settings, local files and a facts document (JSON from
``tasks.facts``), so the planning is unit-tested from recorded facts, without a host.
"""

from __future__ import annotations

import hashlib
import hmac
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tasks.config import Settings
from tasks.deploy.commands import ContainerSpec, content_hash, systemd_unit
from tasks.deploy.compose import health_command, load_compose
from tasks.deploy.sync import Delta, compute_delta, local_manifest, tree_hash

IMAGE_INPUTS = ("deployment/Dockerfile.nightguard", "deployment/requirements-agent.txt")


@dataclass
class Desired:
    """What the host should look like after this deploy."""

    manifest: dict[str, str]
    code_hash: str
    image_tag: str
    image_ref: str
    spec: ContainerSpec
    unit_text: str

    @property
    def version(self) -> str:
        return f"{self.image_tag}/{self.code_hash}"


@dataclass
class Plan:
    swap: bool = False
    remove_env_file: bool = False
    delta: Delta = field(default_factory=lambda: Delta((), ()))
    secrets: list[str] = field(default_factory=list)
    build_image: bool = False
    write_unit: bool = False
    restart: bool = False
    drop_secret_backups: bool = False
    reasons: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any((self.swap, self.remove_env_file, bool(self.delta), self.secrets,
                    self.build_image, self.write_unit, self.restart, self.drop_secret_backups))

    def lines(self) -> list[str]:
        out = []
        if self.swap:
            out.append("host: set up the 2 GB swapfile (fstab, swappiness)")
        if self.remove_env_file:
            out.append("host: remove the plain-text .env from the app dir")
        if self.delta:
            out.append(f"sync: {self.delta.describe()}")
        if self.secrets:
            out.append(f"secrets: create or update {', '.join(self.secrets)}")
        if self.build_image:
            out.append("image: build")
        if self.write_unit:
            out.append("unit: write the systemd unit and enable it")
        if self.restart:
            out.append("container: (re)start and wait until healthy")
        if self.drop_secret_backups:
            out.append("secrets: drop the backups an interrupted rotation left")
        return out


def image_tag(settings: Settings) -> str:
    parts = [settings["base_image"]]
    for rel in IMAGE_INPUTS:
        parts.append((settings.root / rel).read_bytes().decode())
    return content_hash(*parts)


def secret_digest(salt: str, value: str) -> str:
    """Keyed hash of a secret value: comparable without storing or sending plaintext."""
    return hmac.new(bytes.fromhex(salt), value.encode(), hashlib.sha256).hexdigest()


def secrets_label(digests: dict[str, str]) -> str:
    return content_hash(*(f"{k}={digests[k]}" for k in sorted(digests)))


def desired_state(settings: Settings, secret_digests: dict[str, str],
                  manifest: dict[str, str] | None = None) -> Desired:
    """``manifest``: the local tree's hashes when already computed in this run."""
    if manifest is None:
        manifest = local_manifest(Path(settings.path("source_dir")))
    code = tree_hash(manifest)
    tag = image_tag(settings)
    ref = f"{settings['image_name']}:{tag}"
    compose = load_compose(settings.path("compose_file"))
    environment = [("NG_HEARTBEAT_MAX_AGE", str(settings["health.heartbeat_max_age"])),
                   ("NG_REQUIRED_SECRETS", ",".join(settings.secret_names))]
    command = tuple(shlex.split(settings["agent_command"]))
    spec = ContainerSpec(
        name=settings["container_name"], image=ref, app_dir=settings["app_dir"],
        memory=settings["limits.memory"], memory_reservation=settings["limits.memory_reservation"],
        memory_swap=settings["limits.memory_swap"], cpus=float(settings["limits.cpus"]),
        secrets=tuple(settings.secret_names), health_cmd=health_command(compose),
        health_interval=settings["health.interval"], health_timeout=settings["health.timeout"],
        health_retries=settings["health.retries"],
        health_start_period=settings["health.start_period"],
        environment=tuple(environment), command=command,
        labels=(("nightguard.code", code), ("nightguard.image", tag),
                ("nightguard.secrets", secrets_label(secret_digests))),
    )
    return Desired(manifest=manifest, code_hash=code, image_tag=tag, image_ref=ref, spec=spec,
                   unit_text=systemd_unit(spec, rootful=not settings["rootless"]))


def swap_needed(settings: Settings, facts: dict) -> bool:
    """True unless the swapfile is active, of the right size and mode, in fstab, with the
    wanted swappiness persisted."""
    active = any(s["path"] == "/swapfile" for s in facts.get("swaps", []))
    return not (active and facts.get("swapfile_size") == settings.size("limits.swap_size")
                and facts.get("swap_in_fstab") and facts.get("swapfile_mode") == "0o600"
                and facts.get("swappiness") == settings["limits.swappiness"]
                and facts.get("swappiness_persisted"))


def make_plan(settings: Settings, desired: Desired, facts: dict,
              secret_digests: dict[str, str]) -> Plan:
    plan = Plan()
    plan.swap = swap_needed(settings, facts)
    plan.remove_env_file = bool(facts.get("env_file_on_host"))
    plan.delta = compute_delta(desired.manifest, facts.get("manifest", {}),
                               facts.get("synced", []))
    stored = facts.get("secret_hashes", {})
    present = facts.get("secrets", {})
    plan.secrets = [name for name in settings.secret_names
                    if name not in present or not secret_digests.get(name)
                    or stored.get(name) != secret_digests[name]]
    plan.build_image = desired.image_tag not in facts.get("image_tags", [])
    plan.write_unit = (facts.get("unit_text") or "").strip() != desired.unit_text.strip() \
        or facts.get("unit_enabled") != "enabled"
    container = facts.get("container") or {}
    labels = container.get("labels") or {}
    wanted = dict(desired.spec.labels, **{"nightguard.spec": desired.spec.spec_hash()})
    if not container.get("running"):
        plan.reasons.append("container is not running")
    for key, value in wanted.items():
        if labels.get(key) != value:
            plan.reasons.append(f"{key} changed")
    plan.restart = bool(plan.reasons) or plan.write_unit or bool(plan.secrets)
    # NAME__previous outlives a rotation only when it was cut short; once the container is
    # healthy with the current values the backup has no use left.
    plan.drop_secret_backups = any(name.endswith("__previous") for name in present)
    return plan
