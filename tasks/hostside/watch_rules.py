"""The watcher's pure rules: a state, what one pass saw and the settings in; the
new state and the messages out (unit-tested table by table)."""

import re

EXIT_LINE = re.compile(r"Main process exited, code=(\w+), status=(\d+)/(\S+)")
WATCHDOG_LINE = re.compile(r"Watchdog timeout \(limit ([^)]+)\)")
STARTING_GRACE = 600  # "starting" for this long (no healthy check) counts as down
SWAP_HYSTERESIS = 5  # percentage points below the threshold before "swap back to normal"


def exits_in_journal(text):
    """[code, status, name] of each "Main process exited" line systemd wrote about the
    unit; one that follows "Watchdog timeout (limit 10s)!" is ["watchdog", "10s", name]."""
    exits, watchdog = [], None
    for line in text.splitlines():
        found = WATCHDOG_LINE.search(line)
        if found:
            watchdog = found.group(1)
            continue
        found = EXIT_LINE.search(line)
        if found:
            code, status, name = found.groups()
            exits.append(["watchdog", watchdog, name] if watchdog else [code, status, name])
            watchdog = None
    return exits


def describe_exit(code, status, name, was_unhealthy):
    """(kind, text) of one exit of the unit's main process, from systemd's line
    "Main process exited, code=exited, status=3/NOTIMPLEMENTED" (code "watchdog", status
    its limit, when systemd's watchdog killed it first)."""
    if code == "watchdog":
        return "hang", (f"the container stopped answering (no liveness ping for {status}: "
                        f"frozen as a whole), killed by systemd's watchdog")
    if code == "exited" and status == "120":
        return "hang", "hung (its heartbeat stopped), killed by its supervisor"
    if code == "exited" and status == "121":
        return "deaf", "deaf (its loop ran but its polling made no progress), killed by its " \
            "supervisor"
    if (code == "exited" and status == "137") or (code == "killed" and name == "KILL"):
        if was_unhealthy:
            return "health kill", "killed after failing its health check (SIGKILL, exit 137)"
        return "crash", "killed by SIGKILL (exit 137: out of memory, or a kill)"
    if code == "exited":
        return "crash", f"crashed: exited with status {status}"
    if code == "dumped":
        return "crash", f"crashed with a core dump (signal {name})"
    if code == "killed":
        return "crash", f"killed by signal {name}"
    return "crash", f"ended ({code} {status})"


def minutes_text(seconds):
    seconds = max(0, int(seconds))
    return f"{seconds // 60} min" if seconds >= 120 else f"{seconds} s"


def transitions(state, obs, conf, now_t):
    """One pass: (new state, [(kind, text)]). One message per transition: healthy ->
    unhealthy / down, a restart (with its exit reason), a crash loop (N restarts in M
    minutes; restarts inside a loop say nothing more), swap or disk over a threshold and
    back, the bot's token refused by Telegram and accepted again, and back to healthy once
    the owner was told of a problem (not inside a loop)."""
    state = dict(state)
    out = []
    host = obs.get("host") or "the host"

    def say(kind, text):
        out.append([kind, f"Night Guard on {host}: {text}"])

    prev = state.get("status")
    if obs["status"] != prev:
        state["since"] = now_t
    # a health check was failing, and no check has passed since: a kill then is its doing
    # (a pass may fall between the kill and the restart, and see "starting")
    failing = prev == "unhealthy" or bool(state.get("failing"))
    looping = restart_rules(state, obs, conf, now_t, failing, say)
    health_rules(state, obs, prev, looping, now_t, say)
    token_rules(state, obs, say)
    host_rules(state, obs, conf, say)
    return state, out


def restart_rules(state, obs, conf, now_t, failing, say):
    """Restarts, from systemd's counter of automatic restarts (a deploy's restart resets
    it): one message each, or one for a crash loop. Returns whether it is looping."""
    count, last_count = obs.get("nrestarts"), state.get("nrestarts")
    new = count - last_count if count is not None and last_count is not None \
        and count > last_count else 0
    if count is not None:
        state["nrestarts"] = count
    loop = conf["crash_loop"]
    restarts = [t for t in state.get("restarts") or [] if now_t - t < loop["minutes"] * 60]
    restarts += [now_t] * new
    state["restarts"] = restarts
    looping = len(restarts) >= loop["restarts"]
    if new:
        exits = (obs.get("exits") or [])[-new:]
        reasons = [describe_exit(*e, was_unhealthy=failing)[1] for e in exits]
        why = "; ".join(reasons) or "the exit reason is not in the journal"
        if looping and not state.get("crash_loop"):
            say("crash loop", f"CRASH LOOP: {len(restarts)} restarts in the last "
                f"{loop['minutes']} min, systemd keeps restarting it (last: "
                f"{reasons[-1] if reasons else why}).")
        elif not state.get("crash_loop"):
            say("restart", f"RESTARTED: {why}.")
        state["problem"] = True
        state.setdefault("problem_since", now_t)
    state["crash_loop"] = looping
    return looping


def health_rules(state, obs, prev, looping, now_t, say):
    """The agent's health: unhealthy, down, starting for too long, and healthy again."""
    cur, detail = obs["status"], obs.get("detail") or ""
    if cur == "unhealthy" and prev != "unhealthy":
        say("unhealthy", f"UNHEALTHY: {detail}.")
    elif cur == "down" and prev != "down":
        say("down", f"DOWN: {detail}.")
    stuck = cur == "starting" and now_t - state.get("since", now_t) >= STARTING_GRACE
    if stuck and not state.get("stuck"):
        say("down", f"DOWN: not healthy for {minutes_text(now_t - state['since'])} "
            f"({detail}).")
    state["stuck"] = stuck
    if cur in ("unhealthy", "down") or stuck:
        state["problem"] = True
        state.setdefault("problem_since", now_t)
    if cur == "healthy" and state.get("problem") and not looping:
        since = state.get("problem_since", now_t)
        say("recovered", f"healthy again (the trouble lasted {minutes_text(now_t - since)}).")
        state["problem"] = False
        state.pop("problem_since", None)
    state["status"] = cur
    if cur in ("unhealthy", "healthy"):
        state["failing"] = cur == "unhealthy"


def token_rules(state, obs, say):
    """Telegram refusing the bot's token, as the agent says in its heartbeat ("token":
    "rejected"): it stopped polling and stays up, so no restart will tell the owner and none
    can fix it. One message, and one when a heartbeat says otherwise again (a rotated
    token); no heartbeat to read (obs "token" None) changes nothing."""
    token = obs.get("token")
    if token == "rejected" and not state.get("token_rejected"):
        say("token", "TOKEN REJECTED: Telegram refuses the bot's token (revoked or "
            "replaced?). The agent stopped polling and stays up; a restart cannot fix it: "
            "put the new token in its source and run `inv secrets.rotate`.")
        state["token_rejected"] = True
    elif token == "accepted" and state.get("token_rejected"):
        say("token ok", "the bot's token is accepted again; the agent polls.")
        state["token_rejected"] = False


def host_rules(state, obs, conf, say):
    """The host: swap over its threshold and back (with hysteresis), disk below its floor
    and back."""
    threshold, used = conf["swap_percent"], obs.get("swap_pct")
    if threshold and used is not None:
        if not state.get("swap_high") and used >= threshold:
            say("swap", f"SWAP {used:.0f}% used (alert at {threshold}%): memory is short.")
            state["swap_high"] = True
        elif state.get("swap_high") and used < threshold - SWAP_HYSTERESIS:
            say("swap ok", f"swap back to {used:.0f}% used.")
            state["swap_high"] = False
    floor, free = conf["disk_free_mb"], obs.get("disk_free_mb")
    if floor and free is not None:
        if not state.get("disk_low") and free < floor:
            say("disk", f"DISK {free} MB free (alert below {floor} MB).")
            state["disk_low"] = True
        elif state.get("disk_low") and free >= floor * 1.1:
            say("disk ok", f"disk back to {free} MB free.")
            state["disk_low"] = False


def rate_limit(state, messages, conf, now_t, summary):
    """(state, messages to send): at most N delivered per M minutes. What is over is held
    back and counted; the next message says how many were, and once there is room again
    with nothing new to say, one message tells the count and how things are now."""
    state = dict(state)
    window = conf["rate_limit"]["minutes"] * 60
    sent = [t for t in state.get("sent") or [] if now_t - t < window]
    room = max(conf["rate_limit"]["messages"] - len(sent), 0)
    held_before = int(state.get("held") or 0)
    go = [list(m) for m in messages[:room]]
    held_now = len(messages[room:])
    if held_before and go:
        go[0][1] += f" ({held_before} alert(s) before this one were held back by the rate limit)"
        held_before = 0
    elif held_before and room:
        go = [["held", f"{held_before} alert(s) were held back by the rate limit; now: "
                       f"{summary}."]]
        held_before = 0
    state["sent"] = sent
    state["held"] = held_before + held_now
    return state, go


def ping_due(state, obs_status, conf, now_t):
    """The dead-man switch: "ok" every ping_every while healthy, "fail" when it is not
    (at once on the change, then at the same pace) or when Telegram refuses the bot's token
    (up, but of no use); None while starting or unset."""
    if not conf.get("ping_url"):
        return None
    if state.get("crash_loop") or state.get("stuck") or state.get("token_rejected") or \
            obs_status in ("unhealthy", "down"):
        kind = "fail"
    elif obs_status == "healthy":
        kind = "ok"
    else:
        return None
    last = state.get("last_ping") or {}
    if last.get("kind") == kind and last.get("ok") and \
            now_t - float(last.get("t") or 0) < conf["ping_every"]:
        return None
    return kind
