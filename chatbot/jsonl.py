"""JSON Lines reading: the one reader of the project's JSONL inputs (kernel: imports only :mod:`chatbot.errors`).

Training dialogues (:func:`finetune.data.load_jsonl`), labelled messages (:mod:`finetune.intent_data`), retrieval
and answer evaluation sets (:func:`retrieval.evaluate.load_jsonl`, :func:`chatbot.answer_eval.load_answer_set`)
all read through :func:`iter_jsonl`, so a malformed line is one error type with one message shape everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from chatbot.errors import DataError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for each non-blank line of the UTF-8 JSON Lines file ``path``; line numbers
    count from 1 and include blank lines, so they match an editor's.

    Raises:
        DataError: a line is not JSON, or not a JSON object; the message starts ``"<path>:<line>: "``.
        OSError: the file cannot be opened or read (callers say which file it was meant to be).
    """
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row
