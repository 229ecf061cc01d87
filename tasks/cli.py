"""Glue between Invoke tasks and the rest: settings from Invoke's config and the task's
flags, one-line failures.

``settings_for(c, ...)`` is how every task gets its settings: the config files Invoke read
for this run (``tasks.invoke_config``), the environment and the flags the task was given,
layered and checked by ``tasks.config.load_settings``. A flag left out is ``None``: the
configured value stands.

Every task that can fail is wrapped in ``one_line_errors``: a ``ConfigError`` or
``StepFailed`` becomes a single ``error: ...`` line on stderr and a non-zero exit code,
never a traceback; with ``--json`` it is also an ``{"error": {"step", "message"}}`` object on
stdout. Every message passes the .env values' redaction first.

Flags: ``use_flag_scheme`` gives every task of the root collection the same short flags
(``SHORT_FLAGS``: one letter, one long name, in every task; ``-h`` is always --help), a
typed flag given a value of the wrong type a one-line refusal (exit 2), and every task
that takes ``--host`` a ``--port`` and a ``--user`` (passed on through ``settings_for``).
"""

from __future__ import annotations

import contextvars
import functools
import json
import os
import sys
import textwrap
from typing import Any

from invoke import Collection, Program, Task
from invoke.exceptions import Exit
from invoke.parser import Argument

from .config import Settings, load_settings
from .errors import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_STEP, ConfigError, StepFailed
from .invoke_config import config_files

TARGET_HELP = {
    "target": "sandbox, ssh or gcp (default: nightguard.target, see `inv config`)",
    "host": "HOST, USER@HOST, HOST:PORT, USER@HOST:PORT, [IPV6]:PORT or an ~/.ssh/config "
            "Host alias (implies --target ssh unless --target is given)",
    "dry_run": "print the plan (the commands that would run) and change nothing",
}
HOST_FLAG_HELP = {
    "port": "SSH port of --host (default: the port in --host, ~/.ssh/config, else "
            "nightguard.ssh.port)",
    "user": "login user on --host (default: the user in --host, ~/.ssh/config, else "
            "nightguard.ssh.user)",
}

# One letter, one long name, in every task (README: Tasks). -h is --help everywhere; the
# other flags have no short form (the destructive ones - --force, --destroy, --fresh,
# --yes - on purpose). Inside a task its own letters win over Invoke's core flags, so
# core flags (-f FILE, -d, -p, -c, -w ...) go before the task's name: `inv -f x.yaml logs -f`.
SHORT_FLAGS = {
    "target": "t", "host": "H", "port": "p", "user": "u", "dry-run": "d", "json": "j",
    "follow": "f", "since": "s", "watch": "w", "name": "n", "command": "c", "out": "o",
    "zone": "z", "instance": "i", "key": "k",
}
SHORT_FLAGS_LINE = textwrap.fill("Short flags (the same in every task; -h is --help): " +
                                 ", ".join(f"-{letter} --{name}"
                                           for name, letter in SHORT_FLAGS.items()), 80)

# --port / --user of the running task, for settings_for (see NightGuardTask.__call__)
_HOST_FLAGS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("host_flags",
                                                                          default=None)


def settings_for(c, target: str | None = None, host: str | None = None,
                 **overrides: Any) -> Settings:
    """Settings from the task's Invoke context ``c`` with the common flags applied
    (``--target``, ``--host``, ``--port``, ``--user``) and any other as
    ``section__key=value`` (None: not given)."""
    from .ssh.sshconfig import parse_host, parse_port

    flags = {key.replace("__", "."): value for key, value in overrides.items()}
    given = _HOST_FLAGS.get() or {}
    port, user = given.get("port"), given.get("user")
    if (port or user) and not host:
        raise ConfigError(f"{'--port' if port else '--user'} goes with --host")
    if host:
        spec = parse_host(host)
        if port is not None:
            port = parse_port(port, "--port")
            if spec.port is not None and spec.port != port:
                raise ConfigError(f"--host {host} and --port {port} name two ports; give one")
        if user and spec.user and user != spec.user:
            raise ConfigError(f"--host {host} and --user {user} name two users; give one")
        flags["ssh.host"] = spec.host
        flags["ssh.port"] = port or spec.port
        flags["ssh.user"] = user or spec.user
        target = target or "ssh"
    flags["target"] = target
    root, files = config_files(getattr(c, "config", None))
    return load_settings(root=root, overrides=flags, files=files)


def failure_json(step: str, message: str) -> str:
    """What a --json task prints on stdout when it fails."""
    return json.dumps({"error": {"step": step, "message": message}}, sort_keys=True)


def one_line_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from .deploy.envfile import redact_known

        try:
            return func(*args, **kwargs)
        except (ConfigError, StepFailed, KeyboardInterrupt) as exc:
            if isinstance(exc, KeyboardInterrupt):
                step, line, code = "interrupted", "interrupted", EXIT_INTERRUPTED
            else:
                step = exc.step if isinstance(exc, StepFailed) else "config"
                line = redact_known(f"error: {exc}")
                code = EXIT_STEP if isinstance(exc, StepFailed) else EXIT_CONFIG
            if kwargs.get("json_"):
                print(failure_json(step, line.removeprefix("error: ")), flush=True)
            raise Exit(line, code=code) from None

    return wrapper


# -- the flags of every task --------------------------------------------------------------
_ROOT: list[Collection] = []  # the collection use_flag_scheme was given (the root)


def print_task_help(task_name: str) -> None:
    """`inv --help TASK`, then exit 0 (Invoke's parser gives a task's first positional
    argument the `-h` that follows it: `inv data.restore -h` must still mean help)."""
    binary = "nightguard" if os.path.basename(sys.argv[0] or "") == "nightguard" else "inv"
    Program(namespace=_ROOT[0], binary=binary).run([binary, "--help", task_name])


class CheckedArgument(Argument):
    """A typed flag given a value of another type: one line and exit 2, not a traceback."""

    task_name = ""

    def set_value(self, value: Any, cast: bool = True) -> None:
        if self.positional and value in ("-h", "--help") and _ROOT and self.task_name:
            print_task_help(self.task_name)
        try:
            super().set_value(value, cast=cast)
        except (TypeError, ValueError):
            kind = {int: "a whole number", float: "a number"}.get(self.kind, self.kind.__name__)
            raise Exit(f"error: --{self.name}: {value!r} is not {kind}",
                       code=EXIT_CONFIG) from None


class NightGuardTask(Task):
    """An Invoke task with the tool's flag scheme (see the module's docstring)."""

    def host_flags(self) -> list[str]:
        """The flags this task gets on top of its own: --port and --user with --host."""
        params = self.argspec(self.body).parameters
        return [n for n in ("port", "user") if "host" in params and n not in params]

    def arg_opts(self, name, default, taken_names):
        opts = super().arg_opts(name, default, taken_names)
        long_name = opts["names"][0]
        letter = SHORT_FLAGS.get(long_name)
        opts["names"] = [long_name, letter] if letter else [long_name]
        return opts

    def get_arguments(self, ignore_unknown_help=None):
        self.auto_shortflags = False  # the letters come from SHORT_FLAGS only
        kept = dict(self.help)  # Invoke pops each help text it uses: keep them for next time
        try:
            args = super().get_arguments(ignore_unknown_help)
        finally:
            self.help = kept
        for name in self.host_flags():
            args.append(Argument(names=(name, SHORT_FLAGS[name]), kind=str,
                                 help=HOST_FLAG_HELP[name]))
        for arg in args:
            arg.__class__ = CheckedArgument
            arg.task_name = getattr(self, "qualified_name", self.name)
        return args

    def __call__(self, *args, **kwargs):
        given = {name: kwargs.pop(name, None) for name in self.host_flags()}
        token = _HOST_FLAGS.set(given)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            _HOST_FLAGS.reset(token)


def use_flag_scheme(collection: Collection) -> None:
    """Give every task under ``collection`` the flag scheme, and its help the table."""
    _ROOT[:] = [collection]
    for name in collection.task_names:
        task = collection[name]
        task.qualified_name = name
        if not isinstance(task, NightGuardTask):
            task.__class__ = NightGuardTask
            task.__doc__ = f"{(task.__doc__ or '').rstrip()}\n\n{SHORT_FLAGS_LINE}"
