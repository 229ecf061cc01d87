"""Long steps are never silent: live on a terminal, a plain line every few seconds elsewhere."""

import io
import re
import time

import pytest

from tasks.progress import Step


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_line_is_redrawn_with_the_time_and_the_last_words():
    out = Terminal()
    with Step("image", "localhost/nightguard:abc", out) as step:
        step.say("STEP 2/4: RUN pip install -r requirements-agent.txt")
        time.sleep(0.6)
    text = out.getvalue()
    assert "\r\033[K  ~ image: localhost/nightguard:abc (0s) STEP 2/4: RUN pip" in text
    assert re.search(r"\r\033\[K  - image: localhost/nightguard:abc \(0\.\d+s\)\n$", text), text


def test_elsewhere_a_plain_line_every_few_seconds_and_the_result():
    out = io.StringIO()
    with pytest.raises(RuntimeError), Step("health", "deadline 240s", out, every=1.0):
        time.sleep(2.3)
        raise RuntimeError("not healthy")
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["  ~ health: deadline 240s: running (1s)",
                         "  ~ health: deadline 240s: running (2s)"]
    assert lines[-1].startswith("  x health: deadline 240s (2.")
    assert "\r" not in out.getvalue() and "\033" not in out.getvalue()
