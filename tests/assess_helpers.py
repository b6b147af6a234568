"""Counting (and killing) the assessment engine's explanation calls: the resume tests of the engine, the
CLI and studies share it."""

from __future__ import annotations

import pytest

from xailab.metrics import assessment as engine
from xailab.metrics.base import chunked_explain


class ExplainCalls:
    """Replaces `assessment.chunked_explain` for one test: counts its calls and, with `die_at=k`, raises
    KeyboardInterrupt inside the k-th (a process killed mid-method). `calls` lists each call's explain_fn."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, die_at: int | None = None) -> None:
        self.calls: list[object] = []
        self.die_at = die_at
        monkeypatch.setattr(engine, "chunked_explain", self)

    def __call__(self, explain_fn, *args):
        self.calls.append(explain_fn)
        if self.die_at is not None and len(self.calls) == self.die_at:
            raise KeyboardInterrupt  # the process killed inside this method
        return chunked_explain(explain_fn, *args)

    @property
    def count(self) -> int:
        return len(self.calls)
