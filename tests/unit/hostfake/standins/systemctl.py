#!/usr/bin/env python3
"""Stand-in for systemctl (system or --user) with units in the test's unit dir.

  daemon-reload      systemd reads the unit files again
  enable [--now] [--no-reload] UNIT   the wants link (in config "wants_dir"; a timer's
                     in timers.target.wants beside it) -> the unit file, and, without
                     --no-reload, a daemon-reload as systemctl does; --now starts it
  disable [--now] UNIT  removes the link; --now stops it
  stop UNIT          ExecStop/ExecStopPost when it is active; then it is inactive
  start UNIT         as restart below, when the unit is not active
  reset-failed UNIT  nothing (the stand-in keeps no failed record)
  restart UNIT       as systemd does with the unit *as last loaded* (a unit file changed
                     without daemon-reload is not seen): ExecStop/ExecStopPost when it is
                     active, then ExecStartPre and ExecStart; podman lines run the podman
                     stand-in, %t is the fake run dir
  show -p A,B UNIT   A=... lines (ActiveState, NRestarts from the control file "unit")
Control files: fail-daemon-reload, fail-enable, fail-restart, fail-start, fail-stop, "restart"
({"sleep": s} before the restart begins), "unit" ({"NRestarts": n}).
State (what systemd keeps in memory): config "systemd_state", a JSON file.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time

from common import CONFIG, control, fail_if_told, read_json, record, write_json

STATE = CONFIG["systemd_state"]


def die(message: str, code: int = 1) -> None:
    sys.stderr.write(message + "\n")
    sys.exit(code)


def unit_file(unit: str) -> str:
    return os.path.join(CONFIG["unit_dir"], unit)


def wants_link(unit: str) -> str:
    if unit.endswith(".timer"):
        return os.path.join(os.path.dirname(CONFIG["wants_dir"]), "timers.target.wants", unit)
    return os.path.join(CONFIG["wants_dir"], unit)


def read_unit(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


def service_lines(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


def expand(value: str, unit: str) -> list[str]:
    known = {"t": CONFIG["run"], "n": unit, "h": os.path.expanduser("~"), "%": "%"}
    value = re.sub(r"%(.)", lambda m: known[m.group(1)], value).replace("$$", "$")
    return shlex.split(value)


def run_line(argv: list[str]) -> int:
    if argv[0].startswith("-"):  # systemd's "ignore a failure" prefix
        run_line([argv[0][1:], *argv[1:]])
        return 0
    if argv[:2] == ["/bin/sh", "-c"]:  # a stop as systemd ends it: $SERVICE_RESULT success
        return subprocess.run(argv, env={"SERVICE_RESULT": "success",
                                         "PATH": CONFIG["bin"]}).returncode
    if os.path.basename(argv[0]) == "podman":
        return subprocess.run([os.path.join(CONFIG["bin"], "podman"), *argv[1:]]).returncode
    if argv[:2] == ["/bin/rm", "-f"]:
        for path in argv[2:]:
            if os.path.lexists(path):
                os.unlink(path)
        return 0
    die(f"the systemctl stand-in does not run {argv[0]}")


def restart(unit: str, state: dict) -> None:
    fail_if_told("restart", [unit])
    text = state["loaded"].get(unit) or read_unit(unit_file(unit))
    if text is None:
        die(f"Failed to restart {unit}: Unit {unit} not found.", 5)
    state["loaded"][unit] = text
    time.sleep(control("restart", {}).get("sleep", 0))
    if state["active"].get(unit) == "active":
        for key in ("ExecStop", "ExecStopPost"):
            for line in service_lines(text, key):
                run_line(expand(line, unit))
    for key in ("ExecStartPre", "ExecStart"):
        for line in service_lines(text, key):
            if run_line(expand(line, unit)) != 0:
                state["active"][unit] = "failed"
                write_json(STATE, state)
                die(f"Job for {unit} failed because the control process exited with error "
                    f'code.\nSee "systemctl status {unit}" and "journalctl -xeu {unit}" for '
                    "details.")
    state["active"][unit] = "active"
    state["since"][unit] = time.strftime("%a %Y-%m-%d %H:%M:%S UTC", time.gmtime())


def main(argv: list[str]) -> None:
    record("systemctl", argv)
    words = [w for w in argv
             if w not in ("--user", "--quiet", "-q", "--no-pager", "--no-reload")]
    state = read_json(STATE, {"loaded": {}, "active": {}, "since": {}, "reloads": 0})
    now = "--now" in words
    words = [w for w in words if w != "--now"]
    command, rest = words[0], words[1:]
    if command == "daemon-reload":
        fail_if_told("daemon-reload", argv)
        state["loaded"] = {}
        state["reloads"] += 1
    elif command == "enable":
        fail_if_told("enable", argv)
        unit = rest[0]
        if read_unit(unit_file(unit)) is None:
            die(f"Failed to enable unit: Unit file {unit} does not exist.")
        link = wants_link(unit)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink(unit_file(unit), link)
            sys.stderr.write(f"Created symlink {link} -> {unit_file(unit)}.\n")
        if "--no-reload" not in argv:  # as systemctl does: enable reloads the manager
            state["loaded"] = {}
            state["reloads"] += 1
        if now:
            restart(unit, state)
    elif command == "disable":
        unit = rest[0]
        link = wants_link(unit)
        if os.path.lexists(link):
            os.unlink(link)
            sys.stderr.write(f"Removed {link}.\n")
        if now:
            state["active"][unit] = "inactive"
    elif command == "restart":
        restart(rest[0], state)
    elif command == "start":  # as restart, when the unit is not active already
        fail_if_told("start", argv)
        if state["active"].get(rest[0]) != "active":
            restart(rest[0], state)
    elif command == "stop":
        fail_if_told("stop", argv)
        unit = rest[0]
        text = state["loaded"].get(unit) or read_unit(unit_file(unit))
        if state["active"].get(unit) == "active" and text:
            for key in ("ExecStop", "ExecStopPost"):
                for line in service_lines(text, key):
                    run_line(expand(line, unit))
        state["active"][unit] = "inactive"
    elif command == "reset-failed":
        pass
    elif command == "show":
        props = rest[rest.index("-p") + 1].split(",")
        unit = rest[-1]
        values = {"ActiveState": state["active"].get(unit, "inactive"), "NRestarts": "0",
                  "ExecMainStatus": "0", "ExecMainCode": "0", "Result": "success",
                  "ActiveEnterTimestamp": state["since"].get(unit, ""),
                  **control("unit", {})}
        for prop in props:
            print(f"{prop}={values.get(prop, '')}")
    else:
        die(f"the systemctl stand-in does not know {command}")
    write_json(STATE, state)


if __name__ == "__main__":
    main(sys.argv[1:])
