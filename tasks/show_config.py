"""`inv config`: print the effective configuration, with where each value came from.

Each value's source is one of: ``defaults``, a config file as Invoke found it
(``invoke.yaml``, ``~/.invoke.yaml (user)``, ``/etc/invoke.yaml (system)``,
``FILE (-f)``), ``environment (INVOKE_NIGHTGUARD_...)`` or its alias
``environment (NIGHTGUARD_...)``, ``command line``, or ``sandbox default``.

With target ssh, the address ssh_config makes of ``nightguard.ssh.*`` is shown too
(``tasks.ssh.sshconfig``): a default port or user gives way to what it says.

Secret values are never part of the configuration; this task shows only whether each
required .env key is present, never its value. Whatever it prints passes the .env values'
redaction (by value: a token pasted into agent_env shows as [REDACTED] there too).
"""

from __future__ import annotations

import json

from invoke import Collection, task

from .cli import TARGET_HELP, one_line_errors, settings_for
from .config import Settings, redacted_tree
from .deploy.envfile import redaction
from .deploy.secretstore import load_secret_values, sources
from .errors import ConfigError
from .ssh import sshconfig


@task(help={"target": TARGET_HELP["target"], "host": TARGET_HELP["host"],
            "json": "print JSON instead of key = value lines"})
@one_line_errors
def config(c, target=None, host=None, json_=False):
    """Print the effective configuration (secrets redacted) and each value's source."""
    settings = settings_for(c, target, host)
    values = redaction(settings)
    tree = values.redact_tree(redacted_tree(settings))
    try:
        load_secret_values(settings)
        env_status = "ok"
    except ConfigError as exc:
        env_status = values.redact(str(exc))
    where = {name: source.describe() for name, source in sources(settings).items()}
    address = values.redact(ssh_address(settings))
    if json_:
        print(json.dumps(values.redact_tree({"config": tree, "sources": settings.sources,
                                             "env_file": env_status,
                                             "secret_sources": where,
                                             "files": list(settings.files), "ssh": address}),
                         indent=2, sort_keys=True))
        return
    print(f"config files (lowest first): {', '.join(settings.files) or 'none'}")
    for dotted, value in _leaves(tree):
        print(f"{dotted} = {value!r}  [{settings.source(dotted)}]")
    for name, described in where.items():
        print(f"secret {name} <- {described}: [REDACTED]")
    print(f"secrets check: {env_status}")
    if address:
        print(f"ssh: {address}")


def ssh_address(settings: Settings) -> str:
    """Where target ssh connects and with which keys, after ssh_config ("" otherwise)."""
    if settings["target"] != "ssh":
        return ""
    try:
        target = sshconfig.ssh_target(settings)
    except ConfigError as exc:
        return str(exc)
    keys = [target.key_filename] if target.key_filename else \
        [*([] if target.identities_only else ["ssh-agent"]),
         *(target.identity_files or ["~/.ssh/id_*"])]
    return f"{target.describe()}, keys: {', '.join(keys)}"


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("secrets", "agent_env"):
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


ns = Collection(config)
