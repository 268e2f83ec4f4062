"""The runtime's one exception type (a ``ValueError``): bad model directory, state file or input."""

from __future__ import annotations


class StreamingError(ValueError):
    """Bad model directory, state file or input. The message is one line naming what is
    wrong (the file or the series) and what to do."""


class SeriesRefused(StreamingError):
    """Some series of an ``update`` were refused; every other series of the call was applied.

    ``refused`` maps each refused item id to its one-line reason (its state is exactly as
    before the call); ``applied`` lists the item ids that were applied.
    """

    def __init__(self, refused: dict, applied: list):
        self.refused, self.applied = dict(refused), list(applied)
        first = next(iter(self.refused.values()))
        more = f" (and {len(self.refused) - 1} more series refused)" if len(self.refused) > 1 else ""
        super().__init__(first + more)


__all__ = ["SeriesRefused", "StreamingError"]
