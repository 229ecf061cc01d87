"""`inv alerts.test`, and what the alert watcher on the host is: the owner hears when Night
Guard is down.

The watcher is a program of its own (``tasks/hostside/watch_*.py`` with the readers it
shares with the host helper, joined into one file by ``tasks/hostside/bundle.py``, with its
own version): ``inv deploy`` sends it with the ``watcher`` op and the host keeps it at
``/var/lib/nightguard/watcher.py`` with its arguments in ``alerts.json`` (root only, 0600:
chat id, URLs, thresholds; never the token) and installs ``nightguard-watch.service``
(Type=oneshot: ``python3 -I -S`` importing the watcher, so its bytecode is kept; one watch
pass, as ``python3 watcher.py alerts.json`` does by hand) and ``nightguard-watch.timer`` (a
pass every ``alerts.interval``). It is updated only where it
differs, in the deploy's own session, and removed when alerts are off.

A timer, not the agent unit's own hooks (ExecStopPost=, OnFailure=): a hang never stops the
unit, so no hook would run - only the health check notices, and a periodic pass reads its
failing streak; OnFailure= does not fire while Restart=always keeps restarting; swap, disk
and the dead-man ping need a clock anyway; and a hook runs in the agent's stop path, where
a slow Telegram would hold up the restart. The cost is one short python3 process per pass
(see the README's figures). systemd resets ExecMainStatus when the new main process starts,
so a pass takes a restart's exit reason from systemd's own journal lines about the unit.

Each pass (state in ``/var/lib/nightguard/alerts-state.json``, root only) sends one message
per transition - healthy -> unhealthy or down, a restart (crash or health-check kill, with
the exit reason), a crash loop (N restarts in M minutes), host swap or disk over its
threshold and back, and back to healthy - rate-limited, through the Bot API's sendMessage
(POST, stdlib urllib, 10 s timeouts) to the owner's chat, with the bot's token read from
its Podman secret when a message goes out (never in an argv, a unit file, the journal or a
file of ours). Messages Telegram did not take wait in the state file for the next pass.
A pass while a deploy holds the lock says nothing (a deploy restarts the agent on purpose).
With ``alerts.ping_url`` set it is also a dead-man switch (healthchecks.io's convention):
a GET every ``ping_every`` while healthy, the URL + ``/fail`` when not.

`inv alerts.test` sends one message through that same path (the host's arguments file, the
token read on the host, sendMessage) and says whether it arrived: Telegram answered ok with
a message id. `inv health` shows when the last alert and the last ping went out.

Config keys: ``nightguard.alerts.enabled``, ``.chat_id``, ``.api_base``, ``.token_secret``,
``.interval``, ``.ping_url``, ``.ping_every``, ``.crash_loop.restarts`` / ``.minutes``,
``.swap_percent``, ``.disk_free_mb``, ``.rate_limit.messages`` / ``.minutes``.
"""

from __future__ import annotations

from invoke import Collection, task

from ..cli import TARGET_HELP, one_line_errors, settings_for
from ..errors import StepFailed
from ..ssh.targets import open_remote
from .envfile import redaction
from .session import HostSession


def verdict(answer: dict) -> tuple[bool, str]:
    """(arrived, one line) from the host's account of the sendMessage call."""
    where = f"chat {answer.get('chat_id', '?')} via {answer.get('api_base', '?')}"
    if answer.get("ok") and answer.get("message_id") is not None:
        return True, f"alerts.test: arrived in {where} (message {answer['message_id']})"
    if answer.get("error"):
        why = f"Telegram could not be reached ({answer['error']})"
    else:
        description = answer.get("description") or "no description"
        why = f"Telegram answered HTTP {answer.get('status', '?')}: {description}"
    return False, f"{why}; the message did not arrive in {where}"


@task(name="test", help={"target": TARGET_HELP["target"], "host": TARGET_HELP["host"]},
      auto_shortflags=False)
@one_line_errors
def alerts_test(c, target=None, host=None):
    """Send a test alert the way the host's watcher does, and say whether it arrived."""
    settings = settings_for(c, target, host)
    values = redaction(settings)
    with open_remote(settings, redact=values.redact) as remote, \
            HostSession(remote, settings, command="alerts.test", changing=False) as session:
        answer = session.call("alert_test", step="alerts.test", changes=False)
    arrived, line = verdict(answer)
    if not arrived:
        raise StepFailed("alerts.test", values.redact(line))
    print(values.redact(line))


ns = Collection("alerts", alerts_test)
