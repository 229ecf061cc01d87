"""A line per long step, so nothing is silent for more than a few seconds.

    with Step("image", "localhost/nightguard:abc", out) as step:
        step.say("STEP 2/4: RUN ...")   # the last thing it said, shown live on a terminal

On a terminal: a live line with the elapsed time and the step's last words, replaced by
"  - label (12.3s)" at the end ("  x ..." on failure). Elsewhere (CI logs, pipes): the
same end line, and "  ~ label: running (Ns)" every `every` seconds while it runs.
Used by the deploy's steps (tasks/ssh/remote.py) and the sandbox's builds and boots.
"""

from __future__ import annotations

import sys
import threading
import time


class Step:
    def __init__(self, name: str, detail: str = "", out=None, every: float = 5.0):
        self.label = f"{name}: {detail}" if detail else name
        self.out = out or sys.stdout
        self.every = every
        self.last = ""
        self.started = 0.0
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def say(self, line: str) -> None:
        self.last = line

    def _tick(self) -> None:
        shown = 0.0
        while not self._stop.wait(0.25 if self.tty else 1.0):
            elapsed = time.monotonic() - self.started
            if self.tty:
                self.out.write(f"\r\033[K  ~ {self.label} ({elapsed:.0f}s) "
                               f"{self.last.strip()[:60]}")
                self.out.flush()
            elif elapsed - shown >= self.every:
                shown = elapsed
                print(f"  ~ {self.label}: running ({elapsed:.0f}s)", file=self.out,
                      flush=True)

    def __enter__(self) -> Step:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        mark = "x" if exc_type is not None else "-"
        if self.tty:
            self.out.write("\r\033[K")
        print(f"  {mark} {self.label} ({time.monotonic() - self.started:.1f}s)",
              file=self.out, flush=True)
