"""Stop sequences (OpenAI ``stop``) over streamed text: cut at the first one, never show any of it.

A stop string may arrive split across deltas (``"ST"`` then ``"OP"``), so the tail of the text that
could still be the start of a stop string is held back until the next delta decides it.
"""

from __future__ import annotations

from collections.abc import Sequence

from chatbot.errors import InvalidInputError

#: Most stop strings one request may give (OpenAI's limit).
MAX_STOPS = 4


def check_stops(stop: Sequence[str]) -> tuple[str, ...]:
    """``stop`` as a tuple, validated.

    Raises:
        InvalidInputError: more than :data:`MAX_STOPS` strings, or an empty / non-string one.
    """
    stop = tuple(stop)
    if len(stop) > MAX_STOPS:
        raise InvalidInputError(f"stop: at most {MAX_STOPS} sequences, got {len(stop)}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InvalidInputError(f"stop: each sequence must be a non-empty string, got {s!r}")
    return stop


class StopFilter:
    """Pass text deltas through, ending at the first stop string (which is dropped with all after it).

    ``push(delta)`` returns ``(text safe to show now, stopped)``; once ``stopped`` is True the
    filter returns ``""`` for everything. ``flush()`` returns the held-back tail at the end of a
    stream that never stopped. Joined, the outputs are the input up to (not including) the
    earliest occurrence of any stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = check_stops(stops)
        self._buf = ""
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        """Take ``delta``; return the text that can be shown and whether a stop string was reached."""
        if self.stopped:
            return "", True
        self._buf += delta
        cut = min((i for i in (self._buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self._buf, self.stopped = self._buf[:cut], "", True
            return out, True
        hold = 0  # longest tail of the buffer that begins some stop string
        for s in self.stops:
            for j in range(min(len(s) - 1, len(self._buf)), hold, -1):
                if self._buf.endswith(s[:j]):
                    hold = j
                    break
        out = self._buf[: len(self._buf) - hold]
        self._buf = self._buf[len(self._buf) - hold:]
        return out, False

    def flush(self) -> str:
        """The held-back tail (the stream ended without a stop string)."""
        out, self._buf = ("" if self.stopped else self._buf), ""
        return out

    def cut(self, text: str) -> tuple[str, bool]:
        """A whole text at once: ``(text before the first stop string, stopped)``."""
        out, hit = self.push(text)
        return (out, True) if hit else (out + self.flush(), False)
