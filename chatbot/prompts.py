"""Prompt building: system prompt, numbered fenced passages, history, trimmed to the token budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chatbot.engines.base import ChatMessage
from chatbot.errors import InvalidInputError
from retrieval.documents import Hit

NO_PASSAGE_NOTE = (
    "No policy passage matches this message. If it is a greeting, greet the customer and ask how you "
    "can help. Otherwise say briefly that you are not sure and offer to connect them with a human agent."
)


@dataclass
class BuiltPrompt:
    """The messages sent to the engine and what was kept to fit the budget.

    Attributes:
        messages: system, history, then the customer's message.
        hits: the passages kept, numbered [1].. in this order.
        history_kept: history messages kept (oldest are dropped first).
        prompt_tokens: tokens of ``messages`` under the chat template.
    """

    messages: list[ChatMessage]
    hits: list[Hit]
    history_kept: int
    prompt_tokens: int


def format_passages(hits: Sequence[Hit]) -> str:
    """Passages as numbered, fenced blocks: ``[1] Title`` then the text between ``<<<`` and ``>>>``.

    Fencing keeps passage text (which may contain instructions) apart from ours.
    """
    parts = []
    for i, h in enumerate(hits, 1):
        text = h.text.replace("<<<", "< < <").replace(">>>", "> > >")
        parts.append(f"[{i}] {h.title}\n<<<\n{text}\n>>>")
    return "\n\n".join(parts)


def build_prompt(
    system_prompt: str,
    user_text: str,
    hits: Sequence[Hit],
    history: Sequence[ChatMessage],
    count_tokens: Callable[[list[ChatMessage]], int],
    budget_tokens: int,
) -> BuiltPrompt:
    """Assemble the prompt and trim it to ``budget_tokens`` (``max_model_len - max_new_tokens``).

    Trimming order: drop the oldest history message pairs first, then the
    lowest-ranked passages; the system prompt and the customer's message are
    never cut.

    Args:
        system_prompt: instructions for the model.
        user_text: the customer's (validated) message.
        hits: retrieved passages, best first.
        history: earlier messages of the conversation, oldest first.
        count_tokens: tokens of a message list under the model's chat template.
        budget_tokens: most prompt tokens allowed.

    Raises:
        InvalidInputError: even the system prompt and the message alone do not fit.
    """
    history = list(history)
    hits = list(hits)

    def assemble() -> list[ChatMessage]:
        if hits:
            system = f"{system_prompt}\n\nPolicy passages:\n\n{format_passages(hits)}"
        else:
            system = f"{system_prompt}\n\n{NO_PASSAGE_NOTE}"
        return [ChatMessage("system", system), *history, ChatMessage("user", user_text)]

    while True:
        msgs = assemble()
        n = count_tokens(msgs)
        if n <= budget_tokens:
            return BuiltPrompt(msgs, hits, len(history), n)
        if history:
            del history[: 2 if len(history) >= 2 else 1]
        elif hits:
            hits.pop()
        else:
            raise InvalidInputError(
                f"message is too long: the prompt needs {n} tokens, the model allows {budget_tokens} "
                "before the reply; shorten the message"
            )
