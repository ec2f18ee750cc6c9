"""Run-time failures that end a run with one line on stderr and exit code 2.

ConfigError (bad configuration) and DataError (bad data) say what the user gave wrongly;
RunError says what went wrong while running: a diverging loss, an out_dir held by another run,
no checkpoint that verifies. Each is raised on every rank together (the decisions behind them
are collective), so a multi-rank job ends as one.
"""

from __future__ import annotations


class RunError(RuntimeError):
    """A run cannot go on; the message is one line and names what to do."""


class DivergedError(RunError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class CheckpointError(RunError):
    """No checkpoint could be verified and loaded, or one could not be written safely."""


class LockError(RunError):
    """Another live run holds the out_dir."""
