"""Engine on plain transformers ``generate``: for CPU development, tests and machines without vLLM.

One request runs at a time (an asyncio lock); ``generate`` runs in a worker
thread and hands token ids back to the event loop through a queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence

from chatbot.engines.base import (
    ChatMessage,
    Engine,
    EngineInfo,
    GenerationParams,
    StreamChunk,
    stop_token_ids,
)
from chatbot.engines.detok import IncrementalDetokenizer
from chatbot.errors import EngineError

log = logging.getLogger(__name__)

_END = object()


def _slot(version: str) -> str:
    """A peft adapter name for ``version`` (module keys may not contain dots)."""
    return version.replace(".", "_").replace("/", "_")


class TransformersEngine(Engine):
    """Chat engine on ``AutoModelForCausalLM.generate``.

    Args:
        model_path: local checkpoint folder or Hugging Face id.
        max_model_len: context window used for admission (prompt + max_tokens).
        dtype: ``"float32"`` (default on CPU: faster than bf16 on AVX2), ``"bfloat16"`` or ``"auto"``.
        adapter_path: optional peft LoRA adapter folder applied on top of the base model
            (switch later with :meth:`set_adapter`, no restart).
        model_name: name reported in ``/healthz`` and API responses.
        adapter_version: version string of ``adapter_path`` (``info.adapter_version``).
    """

    def __init__(
        self,
        model_path: str,
        max_model_len: int = 2048,
        dtype: str = "float32",
        adapter_path: str | None = None,
        model_name: str | None = None,
        adapter_version: str | None = None,
    ) -> None:
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.adapter_path = adapter_path
        self.info = EngineInfo(name="transformers", model=model_name or model_path, max_model_len=max_model_len,
                               adapter_version=(adapter_version or adapter_path) if adapter_path else None)
        self._model = None
        self._tok = None
        self._stop_ids: list[int] = []
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        if self._model is not None:
            return
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            self.dtype, "auto"
        )
        try:
            self._tok = AutoTokenizer.from_pretrained(self.model_path)
            model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
            if self.adapter_path:
                from peft import PeftModel

                model = PeftModel.from_pretrained(
                    model, self.adapter_path, adapter_name=_slot(self.info.adapter_version or "adapter")
                )
        except Exception as exc:
            raise EngineError(f"cannot load model {self.model_path!r}: {exc}") from exc
        model.eval()
        self._model = model
        self._stop_ids = stop_token_ids(self._tok, getattr(model, "generation_config", None))
        log.info("transformers engine ready: %s (stop ids %s)", self.model_path, self._stop_ids)

    @property
    def tokenizer(self):
        """The loaded tokenizer (after ``start``)."""
        return self._tok

    async def set_adapter(self, path: str | None, version: str | None) -> None:
        """Switch the peft LoRA adapter (None: the plain base model) between requests.

        Waits for the running request (the engine's lock), then loads the new adapter
        beside the old one, activates it and deletes the old one (peft
        ``load_adapter`` / ``set_adapter`` / ``delete_adapter``); ``path=None`` removes
        the LoRA layers (``unload``). A failed load leaves the previous adapter active.

        Raises:
            EngineError: the adapter cannot be loaded.
        """
        if self._model is None:
            await self.start()
        async with self._lock:
            await asyncio.to_thread(self._swap_adapter, path, version)

    def _swap_adapter(self, path: str | None, version: str | None) -> None:
        from peft import PeftModel

        import warnings

        model = self._model
        is_peft = isinstance(model, PeftModel)
        try:
            if path is None:
                if is_peft:
                    model = model.unload()
            else:
                slot = _slot(version or path)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if is_peft:
                        if slot not in model.peft_config:  # a version is immutable: already loaded means the same
                            res = model.load_adapter(path, adapter_name=slot)
                            missing = [k for k in getattr(res, "missing_keys", []) if f".{slot}." in k]
                            if missing:
                                model.delete_adapter(slot)
                                raise EngineError(f"{len(missing)} adapter tensors are missing from the checkpoint "
                                                  f"(e.g. {missing[:2]}): it would serve the base model")
                        model.set_adapter(slot)
                        for old in [n for n in model.peft_config if n != slot]:
                            model.delete_adapter(old)
                    else:
                        new = PeftModel.from_pretrained(model, path, adapter_name=slot)
                        bad = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
                        if bad:  # peft only warns: the adapter would do nothing
                            new.unload()
                            raise EngineError(bad[0][:300] + " (it would serve the base model)")
                        model = new
        except Exception as exc:
            raise EngineError(f"cannot load adapter {path!r}: {exc}") from exc
        model.eval()
        self._model = model
        self.adapter_path = path
        self.info.adapter_version = (version or path) if path else None
        log.info("transformers engine adapter: %s", self.info.adapter_version or "none (base model)")

    @property
    def started(self) -> bool:
        return self._model is not None

    async def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams, request_id: str
    ) -> AsyncIterator[StreamChunk]:
        prompt_ids = await self.prompt_ids(messages, params)
        async with self._lock:
            async for chunk in self._generate(prompt_ids, params):
                yield chunk

    async def _generate(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[StreamChunk]:
        import torch
        from transformers.generation.streamers import BaseStreamer
        from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        n_prompt = len(prompt_ids)

        class _Streamer(BaseStreamer):
            def __init__(self) -> None:
                self.first = True

            def put(self, value) -> None:
                if self.first:  # generate() first pushes the prompt
                    self.first = False
                    return
                loop.call_soon_threadsafe(queue.put_nowait, value.reshape(-1).tolist())

            def end(self) -> None:
                pass

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

        def _run() -> None:
            try:
                kwargs = dict(
                    input_ids=torch.tensor([prompt_ids]),
                    attention_mask=torch.ones(1, n_prompt, dtype=torch.long),
                    max_new_tokens=params.max_tokens,
                    eos_token_id=self._stop_ids,
                    pad_token_id=self._tok.pad_token_id if self._tok.pad_token_id is not None else self._stop_ids[0],
                    streamer=_Streamer(),
                    stopping_criteria=StoppingCriteriaList([_Cancel()]),
                    repetition_penalty=params.repetition_penalty,
                )
                if params.temperature > 0:
                    if params.seed is not None:
                        torch.manual_seed(params.seed)
                    kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
                else:
                    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                with torch.inference_mode():
                    self._model.generate(**kwargs)
                loop.call_soon_threadsafe(queue.put_nowait, _END)
            except Exception as exc:  # surfaced to the awaiting coroutine
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        thread = threading.Thread(target=_run, name="generate", daemon=True)
        thread.start()
        detok = IncrementalDetokenizer(self._tok)
        n_gen = 0
        last_id: int | None = None
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, Exception):
                    raise EngineError(f"generation failed: {item}") from item
                n_gen += len(item)
                last_id = item[-1]
                text = detok.push([t for t in item if t not in self._stop_ids])
                if text:
                    yield StreamChunk(text=text, prompt_tokens=n_prompt, completion_tokens=n_gen)
            finish = "stop" if last_id in self._stop_ids else "length"
            yield StreamChunk(text=detok.flush(), finish_reason=finish, prompt_tokens=n_prompt, completion_tokens=n_gen)
        finally:
            cancel.set()  # client went away or we are done: let generate() return
            await asyncio.to_thread(thread.join)
