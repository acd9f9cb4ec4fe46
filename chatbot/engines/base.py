"""The engine interface: chat messages in, streamed text deltas out."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from chatbot.errors import EngineError, InvalidInputError

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatMessage:
    """One chat message as the model's chat template expects it."""

    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        """``{"role": ..., "content": ...}`` for ``apply_chat_template``."""
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings of one request.

    Attributes:
        max_tokens: most new tokens to generate (>= 1).
        temperature: 0 means greedy decoding.
        top_p: nucleus sampling mass in (0, 1].
        repetition_penalty: > 1 discourages repeating prompt or generated tokens
            (CTRL, Keskar et al. 2019; the same parameter in transformers and vLLM).
        seed: sampling seed, or None.
        stop: up to 4 stop strings (OpenAI ``stop``): the reply ends before the first one, which is not shown
            (vLLM stops on them itself; :class:`~chatbot.engines.stops.StopFilter` cuts every reply).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from chatbot.engines.stops import check_stops

        object.__setattr__(self, "stop", check_stops(self.stop))
        if self.max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidInputError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.5 <= self.repetition_penalty <= 2.0:
            raise InvalidInputError(f"repetition_penalty must be in [0.5, 2], got {self.repetition_penalty}")


@dataclass
class StreamChunk:
    """One piece of a streamed generation.

    Attributes:
        text: new text since the previous chunk (never splits a UTF-8 character;
            may be empty on the final chunk).
        finish_reason: ``None`` while generating, then ``"stop"`` (end-of-turn or
            EOS token) or ``"length"`` (``max_tokens`` reached).
        prompt_tokens: tokens in the rendered prompt (set on every chunk).
        completion_tokens: tokens generated so far.
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class EngineInfo:
    """What ``/healthz`` reports about the engine."""

    name: str
    model: str
    max_model_len: int
    extra: dict = field(default_factory=dict)
    #: Version of the LoRA adapter applied to the model (``finetune.adapters``), None for the base model.
    adapter_version: str | None = None


class Engine(abc.ABC):
    """A chat generation engine.

    Implementations apply the model's own chat template, stop on the end-of-turn
    token (``finish_reason == "stop"``; the template's tokens never appear in the
    text) and stream text deltas that never split a multi-byte character.
    """

    info: EngineInfo

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model (heavy; called once before the first request)."""

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Tokens of ``messages`` rendered with the chat template and generation prompt (after :meth:`start`)."""
        return len(render_chat(self._tok, messages))

    @abc.abstractmethod
    def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams, request_id: str
    ) -> AsyncIterator[StreamChunk]:
        """Generate a reply to ``messages``; yield ``StreamChunk`` deltas, the last with a finish reason.

        Raises:
            InvalidInputError: the prompt does not fit ``max_model_len - max_tokens``.
            EngineError: the engine failed.
        """

    async def set_adapter(self, path: str | None, version: str | None) -> None:
        """Serve the LoRA adapter in folder ``path`` from the next request on (None: the base model).

        ``version`` is the adapter's unique version string; it becomes ``info.adapter_version``
        and each logged turn records it. Requests already running finish on what they started with.

        Raises:
            EngineError: this engine cannot load adapters, or the adapter failed to load
                (the engine keeps serving what it served before).
        """
        raise EngineError(f"the {self.info.name} engine cannot load LoRA adapters, got {path!r}")

    async def close(self) -> None:
        """Release the model and any worker processes."""

    #: Context window (prompt + new tokens) the engine admits requests against.
    max_model_len: int
    #: The tokenizer whose chat template renders prompts; set by :meth:`start`.
    _tok = None

    @property
    def started(self) -> bool:
        """Whether :meth:`start` has run and requests can be served."""
        return self._tok is not None

    async def prompt_ids(self, messages: Sequence[ChatMessage], params: GenerationParams) -> list[int]:
        """What every ``stream`` does first: start the engine on first use, render ``messages`` with the chat
        template (:func:`render_chat`) and check that the prompt plus ``params.max_tokens`` fits.

        Raises:
            InvalidInputError: the prompt does not fit ``max_model_len - max_tokens``.
        """
        if not self.started:
            await self.start()
        ids = render_chat(self._tok, messages)
        check_fits(len(ids), params.max_tokens, self.max_model_len)
        return ids


def check_fits(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """Raise InvalidInputError unless ``prompt_tokens + max_tokens <= max_model_len``."""
    if prompt_tokens + max_tokens > max_model_len:
        raise InvalidInputError(
            f"prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds "
            f"max_model_len {max_model_len}"
        )


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's EOS, ``<|im_end|>``/``<|eot_id|>``
    when the vocabulary has them, and the generation config's ``eos_token_id``(s)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if tok in vocab:
            ids.add(int(vocab[tok]))
    if generation_config is not None and generation_config.eos_token_id is not None:
        eos = generation_config.eos_token_id
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return sorted(ids)


def render_chat(tokenizer, messages: Sequence[ChatMessage]) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, with the generation prompt."""
    out = tokenizer.apply_chat_template(
        [m.as_dict() for m in messages], add_generation_prompt=True, tokenize=True
    )
    if not isinstance(out, list):  # BatchEncoding in transformers 5
        out = out["input_ids"]
    return [int(t) for t in out]
