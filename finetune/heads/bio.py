"""BIO tags of the entity head: tag sets, character spans -> token tags, token tags -> character spans.

Every sub-word token of a span is tagged (``B-`` on the first, ``I-`` on the rest), so predicted spans
map back to character offsets exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from finetune.intent_data import Span


def bio_labels(types: Sequence[str]) -> list[str]:
    """The tag set ``["O", "B-t1", "I-t1", ...]`` for sorted entity ``types``."""
    out = ["O"]
    for t in sorted(set(types)):
        out += [f"B-{t}", f"I-{t}"]
    return out


def align_tags(offsets: Sequence[tuple[int, int]], spans: Sequence[Span], special: Sequence[bool]) -> list[str | None]:
    """BIO tag of each token from character spans.

    Args:
        offsets: ``(start, end)`` character offsets of each token (fast tokenizer
            ``offset_mapping``).
        spans: the entity spans, sorted, non-overlapping.
        special: True for special tokens (``[CLS]``, ``[SEP]``, padding).

    Returns:
        Per token: None for special tokens (ignored by the loss), ``B-type`` for the
        first token that overlaps a span, ``I-type`` for the following tokens of the
        same span (every sub-word piece is labelled), else ``O``.
    """
    tags: list[str | None] = []
    seen: set[int] = set()
    for (s, e), sp in zip(offsets, special):
        if sp or e <= s:
            tags.append(None)
            continue
        tag = "O"
        for k, span in enumerate(spans):
            if s < span.end and e > span.start:
                tag = ("I-" if k in seen else "B-") + span.type
                seen.add(k)
                break
        tags.append(tag)
    return tags


def spans_from_tags(
    tags: Sequence[str | None], offsets: Sequence[tuple[int, int]], scores: Sequence[float] | None = None
) -> list[tuple[int, int, str, float]]:
    """Group BIO tags back into ``(start, end, type, score)`` character spans.

    A span starts at ``B-t`` (or at an ``I-t`` that does not continue a ``t`` span) and
    runs over the following ``I-t`` tokens; ``None`` tags are skipped. ``score`` is the
    mean of ``scores`` over the span's tokens (1.0 without scores).
    """
    out = []
    cur = None  # [start, end, type, [scores]]
    for k, (tag, (s, e)) in enumerate(zip(tags, offsets)):
        if tag is None:
            continue
        sc = 1.0 if scores is None else float(scores[k])
        if tag == "O":
            if cur:
                out.append(cur)
            cur = None
            continue
        prefix, typ = tag.split("-", 1)
        if prefix == "I" and cur is not None and cur[2] == typ:
            cur[1] = e
            cur[3].append(sc)
        else:
            if cur:
                out.append(cur)
            cur = [s, e, typ, [sc]]
    if cur:
        out.append(cur)
    return [(s, e, t, float(np.mean(sc))) for s, e, t, sc in out]
