"""The organs' options, built from :class:`chatbot.config.Settings` (service layer).

Organs (``retrieval``, ``finetune``, ``chatbot.engines``, ``chatbot.store``) never read ``Settings``: they take
frozen option dataclasses and paths. This module is the one place that turns settings into those options, so a
new retrieval or training setting is wired here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

from chatbot.config import Settings
from finetune.adapters.registry import AdapterOptions
from retrieval.index import IndexOptions
from retrieval.retriever import SearchOptions


def index_options(settings: Settings) -> IndexOptions:
    """How vector indexes are built and searched: ``ann_threshold``, ``hnsw_*`` and ``index_device``.

    Raises:
        RetrievalError: a value is out of range (Settings validates them first, so only for hand-built settings).
    """
    return IndexOptions(
        ann_threshold=settings.ann_threshold,
        hnsw_m=settings.hnsw_m,
        hnsw_ef_construction=settings.hnsw_ef_construction,
        hnsw_ef_search=settings.hnsw_ef_search,
        device=settings.index_device,
    )


def build_embedder(settings: Settings):
    """The configured sentence embedder (:class:`retrieval.embedder.Embedder`), its model resolved to a local folder
    (the embedded MiniLM by default; :func:`chatbot.assets.resolve_embedder`).

    Raises:
        ModelAssetError: the embedded model cannot be found or prepared.
    """
    from chatbot.assets import resolve_embedder
    from retrieval.embedder import Embedder

    return Embedder(resolve_embedder(settings), name=settings.embedder)


def search_options(settings: Settings) -> SearchOptions:
    """How the retriever searches: ``retrieval_mode``, ``rrf_k``, ``hybrid_candidates`` and :func:`index_options`."""
    return SearchOptions(mode=settings.retrieval_mode, rrf_k=settings.rrf_k,
                         hybrid_candidates=settings.hybrid_candidates, index=index_options(settings))


def registry_dir(settings) -> Path:
    """The adapter registry folder: ``resolved_adapters_dir``, or ``data_dir/adapters``."""
    return Path(getattr(settings, "resolved_adapters_dir", None) or settings.data_dir / "adapters")


def _serving_max_lora_rank(settings) -> int | None:
    """The highest LoRA rank the configured engine serves: ``settings.max_lora_rank`` when it is vLLM
    (``engine="vllm"``, or ``"auto"`` where vLLM is installed), None for transformers (peft serves any rank)."""
    engine = getattr(settings, "engine", "auto")
    if engine == "vllm":
        return int(settings.max_lora_rank)
    if engine == "auto":
        from chatbot.engines.vllm_engine import vllm_available

        return int(settings.max_lora_rank) if vllm_available() else None
    return None


def adapter_options(settings):
    """The fine-tuning module's :class:`~finetune.adapters.registry.AdapterOptions` from the settings: the
    registry (``resolved_adapters_dir``), the served model and the cache it is converted into, the serving
    engine's LoRA rank limit and the ``adapter_gate_*`` tolerances.

    Raises:
        ConfigError: a setting is out of range.
    """
    return AdapterOptions(
        adapters_dir=registry_dir(settings), model=settings.model, cache_dir=settings.cache_dir,
        max_lora_rank=_serving_max_lora_rank(settings),
        max_val_loss_increase=settings.adapter_gate_max_val_loss_increase,
        max_rouge_l_drop=settings.adapter_gate_max_rouge_l_drop,
        max_self_stop_drop=settings.adapter_gate_max_self_stop_drop,
    )
