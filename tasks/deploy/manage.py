"""`inv exec` and `inv remove`: a command in the agent's container, and the deployment off
the host.

`inv exec -- CMD ARG...` runs CMD in the running container (``podman exec``) as the agent's
own user (uid 1000; ``--root`` for uid 0, still without capabilities), through the one SSH
connection and the host helper: the argv travels as a list, never as a shell string; its
output comes back as it is printed (every .env value shown as [REDACTED]); its exit code
is inv's. Standard input is not passed on. The transport has no terminal, so ``--tty``
prints the one ``ssh -t ... podman exec -it ...`` command that gives one instead.

`inv remove` takes off what a deploy put on the host - the systemd unit, the container, the
alert watcher, the agent's images (image_name:*), the Podman secrets of
``nightguard.secrets`` and their kept values (NAME__<digest>), the app dir and the deploy
state (releases, records) - and keeps the data dir (``--data`` deletes it too, once the
host's name is typed or with ``--yes``) and the swapfile (``--swap``). The host writes one
audit line; the audit log stays in the state dir. Each part is looked at again and taken
off only if present, so a removal cut half-way is finished by the next ``inv remove``; on a
host with nothing left it says "nothing to remove".

Config keys: ``nightguard.container_name``, ``nightguard.image_name``,
``nightguard.secrets``, ``nightguard.app_dir``, ``nightguard.data_dir``,
``nightguard.rootless``.
"""

from __future__ import annotations

import os
import shlex
import sys

from invoke import task
from invoke.exceptions import Exit

from ..cli import TARGET_HELP, one_line_errors, settings_for
from ..config import Settings
from ..errors import ConfigError
from ..ssh.address import SshTarget, shown_path
from ..ssh.remote import Remote
from ..ssh.targets import open_remote, resolve_target
from .envfile import redaction
from .session import HostSession

AGENT_USER = "1000:1000"  # the image's USER (deployment/Dockerfile.nightguard)
EXEC_SILENCE = 24 * 3600  # a command may be silent this long
REMOVE_TIMEOUT = 900  # the longest silence of one removal (a swapoff, a large data dir)


# -- exec -----------------------------------------------------------------------------------
def remainder(argv: list[str]) -> list[str]:
    """The words after ``--`` on inv's command line, as the shell split them (Invoke itself
    keeps only their space-joined text)."""
    return list(argv[argv.index("--") + 1:]) if "--" in argv else []


def exec_in_container(container: str, command: list[str], *, root: bool, tty: bool,
                      rootful: bool) -> list[str]:
    argv = ["podman", "exec", *(["-it"] if tty else []), "--user",
            "0:0" if root else AGENT_USER, container, *command]
    return ["sudo", *argv] if rootful else argv


def ssh_tty_command(target: SshTarget, remote_argv: list[str]) -> str:
    """The one ssh(1) command that runs ``remote_argv`` on the host with a terminal."""
    argv = ["ssh", "-t"]
    if target.port != 22:
        argv += ["-p", str(target.port)]
    if target.key_filename:
        argv += ["-i", shown_path(target.key_filename), "-o", "IdentitiesOnly=yes"]
    if target.known_hosts and os.path.isfile(target.known_hosts):
        argv += ["-o", f"UserKnownHostsFile={shown_path(target.known_hosts)}"]
    if target.jump is not None:
        jump = target.jump
        argv += ["-J", f"{jump.user}@{jump.host}" + (f":{jump.port}" if jump.port != 22
                                                     else "")]
    elif target.proxy_command:
        argv += ["-o", f"ProxyCommand={target.proxy_command}"]
    argv += [f"{target.user}@{target.host}", shlex.join(remote_argv)]
    return shlex.join(argv)


def run_exec(settings: Settings, remote: Remote, command: list[str], *, root: bool = False,
             out=None, err=None) -> int:
    """Run ``command`` in the agent's container; its output goes to ``out``/``err`` as it
    comes; returns its exit code."""
    out, err = out or sys.stdout, err or sys.stderr

    def show(step: str, text: str) -> None:
        stream = err if text[:1] == "e" else out
        stream.write(text[1:])
        stream.flush()

    with HostSession(remote, settings, command="exec", changing=False) as session:
        session.link.on_progress = show
        answer = session.call("exec", step="exec", changes=False, timeout=EXEC_SILENCE,
                              argv=command, root=root)
    return int(answer.get("exit", 0))


@task(name="exec", help={
    "target": TARGET_HELP["target"], "host": TARGET_HELP["host"],
    "root": "run as root (uid 0) in the container, still without capabilities; default: "
            "the agent's own user (uid 1000)",
    "tty": "an interactive terminal: this tool's SSH channel carries none, so it prints the "
           "`ssh -t ... sudo podman exec -it ...` command to run instead (default CMD: sh)"},
    auto_shortflags=False)
@one_line_errors
def exec_(c, target=None, host=None, root=False, tty=False):
    """Run a command in the agent's container as its user: `inv exec [--root] -- CMD ...`.

    Its exit code is inv's; stdin is not passed on; --tty prints the ssh command for a
    terminal."""
    command = remainder(sys.argv)
    settings = settings_for(c, target, host)
    if tty:
        inner = exec_in_container(settings["container_name"], command or ["sh"], root=root,
                                  tty=True, rootful=not settings["rootless"])
        print("this tool's SSH channel has no terminal; for an interactive one run:")
        print(ssh_tty_command(resolve_target(settings), inner))
        return
    if not command:
        raise ConfigError("nothing to run: name the command after `--`, e.g. "
                          "`inv exec -- python3 -V`")
    values = redaction(settings)
    with open_remote(settings, redact=values.redact) as remote:
        code = run_exec(settings, remote, command, root=root)
    if code:
        raise Exit(code=code)


# -- remove ---------------------------------------------------------------------------------
def confirm_data(settings: Settings, hostname: str, *, yes: bool, ask) -> None:
    """Deleting the data dir needs the host's name typed (or --yes); raises ConfigError
    (nothing removed) otherwise."""
    if yes:
        return
    data_dir = settings["data_dir"]
    if ask is None:
        raise ConfigError(f"--data deletes {data_dir} on {hostname} for good: type the "
                          "host's name when asked (a terminal), or add --yes; nothing was "
                          "removed")
    try:
        typed = ask(f"--data deletes {data_dir} on {hostname} for good; type the host's "
                    f"name ({hostname}) to go on: ")
    except EOFError:
        typed = ""
    if typed.strip() != hostname:
        raise ConfigError(f"the host's name was not typed ({hostname}): nothing was removed")


def run_remove(settings: Settings, remote: Remote, *, data: bool = False, swap: bool = False,
               yes: bool = False, ask=None) -> dict:
    """Look (read-only), say what goes and what stays, confirm a data removal, then remove
    in one locked session that ends with its audit line."""
    out = remote.out
    wanted = {"secrets": settings.secret_names, "delete_data": data, "swap": swap}
    with HostSession(remote, settings, command="remove", changing=False) as look:
        plan = look.call("remove_plan", step="look", changes=False, **wanted)
    if not plan.get("found"):
        print("nothing to remove", file=out)
        for words in plan.get("kept") or []:
            print(f"kept: {words}", file=out)
        return {"removed": [], "kept": plan.get("kept") or []}
    for words in plan["found"]:
        print(f"plan: remove {words}", file=out)
    for words in plan.get("kept") or []:
        print(f"plan: keep {words}", file=out)
    if remote.dry_run:
        print("dry run: nothing was removed", file=out)
        return {"removed": [], "kept": plan.get("kept") or [], "dry_run": True}
    if any(words.startswith("the data dir ") for words in plan["found"]):
        confirm_data(settings, plan.get("hostname") or remote.target.host, yes=yes, ask=ask)
    with HostSession(remote, settings, command="remove") as session:
        with remote.step("remove", f"{len(plan['found'])} part(s)"):
            answer = session.call("remove", step="remove", timeout=REMOVE_TIMEOUT, **wanted)
        session.finish("ok", removed=answer.get("removed") or [],
                       kept=answer.get("kept") or [])
    print(f"removed from {remote.target.describe()}: {len(answer.get('removed') or [])} "
          "part(s); the audit log stays on the host (`inv history`)", file=out)
    for words in answer.get("kept") or []:
        print(f"kept: {words}", file=out)
    return answer


@task(help={**TARGET_HELP,
            "data": "delete the agent's data dir (nightguard.data_dir) too: asks for the "
                    "host's name to be typed, unless --yes",
            "swap": "remove the swapfile too (swapoff, fstab line, swappiness setting)",
            "yes": "with --data: no question (for scripts)"},
      auto_shortflags=False)
@one_line_errors
def remove(c, target=None, host=None, dry_run=False, data=False, swap=False, yes=False):
    """Take the deployment off the host (the data dir stays unless --data).

    Unit, container, images, secrets, alert watcher, code and state go (the audit log
    stays); the swapfile stays unless --swap."""
    settings = settings_for(c, target, host)
    ask = input if sys.stdin.isatty() else None
    with open_remote(settings, dry_run=dry_run) as remote:
        run_remove(settings, remote, data=data, swap=swap, yes=yes, ask=ask)
