"""Serving follows the promoted adapter: the live-adapter watcher and whether vLLM starts with LoRA.

The adapter registry (:mod:`finetune.adapters.registry`) says which adapter is live in ``LIVE.json``;
:class:`LiveAdapterWatcher` keeps the running engine on it without a restart (vLLM: an engine on the adapter's
merged checkpoint, built in the background, or with ``adapter_serving="lora"`` a new ``LoRARequest`` with the
versioned name; transformers: peft ``load_adapter``). Only the registry is read here: serving loads
no evaluation, export or Trainer code.
"""

from __future__ import annotations

import asyncio
import logging

from chatbot.errors import AdapterError, ChatbotError
from chatbot.options import adapter_options
from finetune.adapters.registry import (
    MERGED,
    AdapterRecord,
    list_adapters,
    live_pointer_mtime,
    merged_checkpoint,
    read_live,
)
from chatbot.hashing import model_fingerprint

log = logging.getLogger(__name__)


def lora_enabled(settings) -> bool:
    """Whether vLLM starts with LoRA support: ``settings.enable_lora``, or when it is None (auto): never with
    ``adapter_serving="merged"`` (the default: the live adapter is served as its merged checkpoint), else whether
    the adapter registry holds an adapter. LoRA support slows every request, adapter or
    not (43.6 against 73.5 tok/s for 16 chats here), so a fresh install serves without it; the first
    promotion then builds an engine with LoRA support in the background and switches to it (no restart,
    :meth:`chatbot.engines.vllm_engine.VLLMEngine.set_adapter`), and later promotions and rollbacks apply at once."""
    if settings.enable_lora is not None:
        return bool(settings.enable_lora)
    if settings.adapter_serving == "merged":  # the live adapter is served as a merged checkpoint, not by LoRA
        return False
    try:
        return bool(list_adapters(adapter_options(settings)))
    except Exception:  # an unreadable registry must not stop the server; serve without LoRA
        return False


class LiveAdapterWatcher:
    """Keeps an engine on the adapter ``LIVE.json`` names, without a restart, and says what is served.

    ``await watcher.sync(engine)`` costs one ``stat`` when nothing changed; when the
    pointer changed it calls ``engine.set_adapter(path, version)`` (or
    ``set_adapter(None, None)`` after a rollback to the base model); with ``adapter_serving="merged"`` and an
    engine that can switch checkpoints (vLLM), ``engine.set_checkpoint(<adapter>/merged, version)`` instead
    (``set_checkpoint(None, None)``: the base model). An adapter whose
    base-model hash differs from the engine's model is refused (logged; the engine
    keeps what it serves). An engine that needs time to serve it (vLLM started without
    LoRA support rebuilds itself in the background) reports ``pending_reason``; the
    adapter is then "live, not yet served" until the engine switches.

    The service calls ``sync`` before each generated turn, from ``/v1/models``, ``/healthz``,
    ``/metrics`` and a background poll (api lifespan), so what those report follows the switch.

    Args:
        settings: service settings (the registry: ``resolved_adapters_dir``).
        metrics: the service's :class:`chatbot.metrics.Metrics` (adapter gauges), or None.
    """

    #: Seconds between the background checks of ``LIVE.json`` (chatbot.api lifespan).
    POLL_S = 2.0

    def __init__(self, settings, metrics=None) -> None:
        self.settings = settings
        self.options = adapter_options(settings)
        self.metrics = metrics
        self._mtime: int | None = -1
        self._engine_fp: dict[str, str] = {}
        #: The last error met while applying the pointer (None when the last change applied).
        self.last_error: str | None = None
        self._lock = None  # asyncio.Lock, made in the serving event loop on first use
        self._reported: tuple | None = None

    def _pointer_mtime(self) -> int | None:
        return live_pointer_mtime(self.options)

    def registered(self) -> list[AdapterRecord]:
        """The adapters in the registry, oldest first, the live one marked (:func:`list_adapters`).

        Raises:
            AdapterError: ``LIVE.json`` is not valid JSON.
        """
        return list_adapters(self.options)

    async def sync(self, engine) -> str | None:
        """Apply a changed pointer to ``engine``; return the engine's adapter version (None: base model).

        Never raises for a bad adapter or pointer: the error is logged and kept in
        ``last_error``, and the engine keeps serving what it served (a turn must not fail
        because a promotion went wrong); the same pointer is not retried until it changes.
        """
        mtime = self._pointer_mtime()
        if mtime == self._mtime:
            return engine.info.adapter_version
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # concurrent turns: one applies the change, the others wait for it
            mtime = self._pointer_mtime()
            if mtime == self._mtime:
                return engine.info.adapter_version
            try:
                return await self._apply(engine, mtime)
            except ChatbotError as exc:
                self.last_error = str(exc)
                self._mtime = mtime
                log.error("keeping adapter %s: %s", engine.info.adapter_version or "none (base model)", exc)
                if self.metrics is not None:
                    self.metrics.adapter_errors.inc()
                return engine.info.adapter_version
            finally:
                self.status(engine)

    async def _apply(self, engine, mtime) -> str | None:
        cur = read_live(self.options)["current"]
        want = cur["version"] if cur else None
        if want != engine.info.adapter_version or getattr(engine, "pending_adapter", None) not in (None, want):
            merged = self.settings.adapter_serving == "merged" and hasattr(engine, "set_checkpoint")
            if cur is None:
                await (engine.set_checkpoint(None, None) if merged else engine.set_adapter(None, None))
            else:
                rec = await asyncio.to_thread(AdapterRecord.from_folder, cur["path"])
                model_path = getattr(engine, "model_path", None)
                if model_path and model_path not in self._engine_fp:
                    self._engine_fp[model_path] = await asyncio.to_thread(model_fingerprint, model_path)
                if model_path and rec.base_sha256 != self._engine_fp[model_path]:
                    raise AdapterError(f"not serving adapter {rec.version!r}: trained on base model sha256 "
                                       f"{rec.base_sha256[:12]}, the engine serves {self._engine_fp[model_path][:12]}")
                if merged:
                    ckpt = merged_checkpoint(rec)
                    if ckpt is None:
                        raise AdapterError(f"not serving adapter {rec.version!r}: it has no merged checkpoint "
                                           f"({rec.path / MERGED}; promotion writes it); promote it again, or serve "
                                           "it by LoRA with CHATBOT_ADAPTER_SERVING=lora")
                    await engine.set_checkpoint(str(ckpt), rec.version)
                else:
                    await engine.set_adapter(str(rec.path), rec.version)
            if engine.info.adapter_version == want:
                log.info("engine now serves adapter %s", want or "none (base model)")
            else:
                log.warning("adapter %s is live, not yet served: %s", want,
                            getattr(engine, "pending_reason", None) or "the engine has not switched")
        self._mtime = mtime
        self.last_error = None
        return engine.info.adapter_version

    def status(self, engine) -> dict:
        """What is live and what is served, and why they differ; updates the adapter gauges.

        Returns:
            ``{"live": version | None (LIVE.json), "served": version | None (the engine), "in_sync": bool,
            "pending": version the engine is preparing | None, "reason": why live is not served | None,
            "error": the watcher's last error | None}``. A disagreement is logged as an error once per
            (live, served) pair.
        """
        try:
            cur = read_live(self.options)["current"]
            live, pointer_error = (cur["version"] if cur else None), None
        except AdapterError as exc:
            live, pointer_error = None, str(exc)
        served = engine.info.adapter_version
        pending = getattr(engine, "pending_adapter", None)
        in_sync = live == served and pointer_error is None
        reason = None
        if not in_sync:
            reason = (pointer_error or self.last_error or getattr(engine, "pending_reason", None)
                      or "the server has not applied LIVE.json yet (it does before its next reply)")
        st = {"live": live, "served": served, "in_sync": in_sync, "pending": pending, "reason": reason,
              "error": pointer_error or self.last_error}
        key = (live, served, reason)
        if key != self._reported:
            self._reported = key
            if not in_sync and (pointer_error or self.last_error):
                log.error("LIVE.json names adapter %s but the engine serves %s: %s", live or "none",
                          served or "none (base model)", reason)
        m = self.metrics
        if m is not None:
            m.adapter_mismatch.set(0 if in_sync else 1)
            m.adapter_served.clear()
            m.adapter_served.labels(served or "").set(1)
            m.adapter_live.clear()
            m.adapter_live.labels(live or "").set(1)
        return st
