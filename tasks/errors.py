"""The errors every part of the tool may raise, and the exit codes they become.

Each error's ``str()`` is one line fit for the terminal: ``tasks.cli.one_line_errors``
prints it as ``error: ...`` and exits with the code below, never with a traceback.
"""

EXIT_STEP = 1  # a step on the host failed (the host may have changed; the audit says how)
EXIT_CONFIG = 2  # bad input: nothing on the host was touched
EXIT_INTERRUPTED = 130  # Ctrl-C: the host side records the task as interrupted


class ConfigError(Exception):
    """A configuration or input problem, explained in one line; raised before any SSH."""


class StepFailed(Exception):
    """A step that did not complete; ``str()`` is one line naming the step."""

    def __init__(self, step: str, reason: str):
        super().__init__(f"step '{step}' failed: {reason}")
        self.step = step
        self.reason = reason
