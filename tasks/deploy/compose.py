"""The compose file: parsed, checked against the configuration, and run with Podman itself.

``deployment/podman-compose.nightguard.yml`` is the seed's description of the service and
stays usable by hand. The tool does not hand it to podman-compose, which silently drops
``memswap_limit`` (the container then gets 2x RAM instead of 2700m) and has no
``--health-on-failure``; it checks that the file and ``nightguard.*`` agree, then builds the
exact ``podman run`` flags itself (``tasks.commands``).

Config keys: ``nightguard.compose_file``, ``nightguard.container_name``, ``nightguard.limits.*``,
``nightguard.health.*``, ``nightguard.secrets``, ``nightguard.app_dir``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..config import Settings, parse_duration, parse_size
from ..errors import ConfigError

SERVICE = "nightguard"
REQUIRED_KEYS = ("container_name", "volumes", "mem_limit", "mem_reservation", "memswap_limit",
                 "cpus", "restart", "healthcheck", "secrets")
Fail = Callable[[str, str], None]  # check_compose's fail(key, why): raises ConfigError


def load_compose(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path.name}: not found")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"{path.name}: is not valid YAML") from None
    service = ((document or {}).get("services") or {}).get(SERVICE)
    if not isinstance(service, dict):
        raise ConfigError(f"{path.name}: services.{SERVICE} is missing")
    return document


def check_compose(settings: Settings, document: dict[str, Any] | None = None) -> None:
    """Fail with one line when the compose file lacks a key we rely on or disagrees with
    the effective configuration."""
    path = settings.path("compose_file")
    document = document if document is not None else load_compose(path)
    service = document["services"][SERVICE]
    where = f"{path.name}: services.{SERVICE}"

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{where}.{key}: {why}")

    for key in REQUIRED_KEYS:
        if key not in service:
            fail(key, "is missing")
    if service["container_name"] != settings["container_name"]:
        fail("container_name", f"{service['container_name']!r} differs from "
             f"nightguard.container_name {settings['container_name']!r}")
    _check_limits(settings, service, fail)
    if service["restart"] != "always":
        # unless-stopped is not brought back after a reboot before Podman 5.8.
        fail("restart", f"{service['restart']!r}: use 'always' (unless-stopped does not "
             "survive a reboot on Podman < 5.8)")
    volumes = [str(v) for v in service["volumes"]]
    for wanted in (f"{settings['app_dir']}:/app:ro,Z", f"{settings['data_dir']}:/data:Z,U"):
        if wanted not in volumes:
            fail("volumes", f"expected {wanted!r} (the code read-only, the data dir writable)")
    _check_health(settings, service["healthcheck"], fail)
    names = [s if isinstance(s, str) else s.get("source") for s in service["secrets"]]
    if sorted(names) != sorted(settings.secret_names):
        fail("secrets", f"{sorted(names)} differ from nightguard.secrets "
             f"{sorted(settings.secret_names)}")
    declared = document.get("secrets") or {}
    for name in names:
        if not (declared.get(name) or {}).get("external"):
            raise ConfigError(f"{path.name}: secrets.{name}: must be external: true "
                              "(created by `inv secrets.push`, never from a file)")


def _check_limits(settings: Settings, service: dict[str, Any], fail: Fail) -> None:
    """Memory and CPU limits: the same amounts as nightguard.limits.*."""
    for key, setting in (("mem_limit", "limits.memory"),
                         ("mem_reservation", "limits.memory_reservation"),
                         ("memswap_limit", "limits.memory_swap")):
        try:
            value = parse_size(service[key])
        except ValueError as exc:
            fail(key, str(exc))
        if value != settings.size(setting):
            fail(key, f"{service[key]} differs from nightguard.{setting} {settings[setting]} "
                 f"({settings.source(setting)})")
    try:
        cpus = float(service["cpus"])
    except (TypeError, ValueError):
        fail("cpus", f"{service['cpus']!r} is not a number")
    if cpus != float(settings["limits.cpus"]):
        fail("cpus", f"{service['cpus']} differs from nightguard.limits.cpus "
             f"{settings['limits.cpus']}")


def _check_health(settings: Settings, health: dict[str, Any], fail: Fail) -> None:
    """The health check's timing and retries: the same as nightguard.health.*."""
    for key, setting in (("interval", "health.interval"), ("timeout", "health.timeout"),
                         ("start_period", "health.start_period")):
        if key not in health:
            fail(f"healthcheck.{key}", "is missing")
        try:
            value = parse_duration(str(health[key]))
        except ValueError as exc:
            fail(f"healthcheck.{key}", str(exc))
        if value != parse_duration(settings[setting]):
            fail(f"healthcheck.{key}", f"{health[key]} differs from nightguard.{setting} "
                 f"{settings[setting]}")
    try:
        retries = int(health.get("retries", -1))
    except (TypeError, ValueError):
        fail("healthcheck.retries", f"{health.get('retries')!r} is not a number")
    if retries != settings["health.retries"]:
        fail("healthcheck.retries", f"{health.get('retries')} differs from "
             f"nightguard.health.retries {settings['health.retries']}")


def health_command(document: dict[str, Any]) -> str:
    test = document["services"][SERVICE]["healthcheck"]["test"]
    if isinstance(test, list):
        if test and test[0] in ("CMD", "CMD-SHELL"):
            test = test[1:]
        return " ".join(test)
    return str(test)
