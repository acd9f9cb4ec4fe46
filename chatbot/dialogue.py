"""Chat-format training dialogues from raw turns: the one turn-merging rule (kernel: imports nothing of ours).

The conversation log's export (:mod:`chatbot.store.review`) and the public dialogue sets (:mod:`finetune.data`)
both shape their dialogues with :func:`chat_messages`, so a reviewed transcript and a public dialogue train the
model in the same form.
"""

from __future__ import annotations

from collections.abc import Iterable


def chat_messages(turns: Iterable[tuple[str, str]], system_prompt: str | None = None) -> list[dict[str, str]]:
    """Chat-format messages ``[{"role", "content"}, ...]`` from ``(role, text)`` turns (role ``"user"`` or
    ``"assistant"``).

    Texts are stripped and blank ones dropped; replies before the first customer message are dropped;
    consecutive texts of one side are joined with a newline; trailing customer messages (no reply to learn
    from) are dropped. So the result is the optional system message, then a user message first and an
    assistant reply last, or ``[]`` (system message aside) when no reply remains.
    """
    out: list[dict[str, str]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    start = len(out)
    for role, text in turns:
        content = (text or "").strip()
        if not content or (role == "assistant" and len(out) == start):
            continue
        if len(out) > start and out[-1]["role"] == role:
            out[-1]["content"] += "\n" + content
        else:
            out.append({"role": role, "content": content})
    while len(out) > start and out[-1]["role"] != "assistant":
        out.pop()
    return out
