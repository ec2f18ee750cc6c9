"""The data layer: tokenizer (tokenizer.py), corpus -> train.bin/val.bin/meta.json (prepare.py),
and the deterministic batch sampler over those files (loader.py).

Only the exception lives here so that `from letngpt.data import DataError` stays cheap (no torch,
no tiktoken); import the submodules for the rest.

May import letngpt.fsutil only: the data layer knows nothing of models, training or parallelism.
"""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad or missing data, reported to the user as one line (`error: <message>`, exit code 2)."""
