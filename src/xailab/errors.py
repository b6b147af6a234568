"""Typed errors. Each names the bad value and says what to do, so the CLI can print it without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class XailabError(Exception):
    """Base class of every error xailab raises on purpose (bad input, missing files, bad config)."""


class UnknownNameError(XailabError, KeyError):
    """A registry lookup failed; the message lists the nearest valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DatasetError(XailabError):
    """A dataset file or folder is missing, corrupt or inconsistent; the message names the file."""


class ConfigError(XailabError):
    """A configuration key or value is invalid; the message names the key and lists the valid ones."""


class CheckpointError(XailabError):
    """A run folder or checkpoint is missing or does not match the model."""


class TrainingDiverged(XailabError):
    """The loss became NaN, infinite or far above its start; the message says which checkpoint is kept."""


class LockedError(XailabError):
    """A run or study folder is in use by another process; the message names the folder and its pid."""


class XailabWarning(UserWarning):
    """Base class of every warning xailab gives on purpose (a lossy data copy, a rate far from its recipe's,
    ImageNet weights missing, ...): the CLI prints these as one ``xailab: warning: ...`` line."""


def did_you_mean(name: str, names: Iterable[str], n: int = 3, cutoff: float = 0.5) -> str:
    """`` Did you mean 'x', 'y'?`` for the (at most ``n``) names closest to ``name``; empty when none is close.
    Every "unknown name" message appends it, so they all suggest alike."""
    close = difflib.get_close_matches(name, list(names), n=n, cutoff=cutoff)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
