"""The chat base model that adapters are trained on and served with: name resolution and loading.

``embedded:smollm2-135m-instruct`` (the default) is the SmolLM2-135M-Instruct checkpoint that
:func:`chatbot.assets.ensure_smollm2` converts once into ``<cache_dir>/models``; any other name is a
local folder or a Hugging Face id and is used as it is. Callers pass the cache folder (the service
builds it from its settings); nothing here reads the environment.

torch / transformers are imported inside the functions that need them.
"""

from __future__ import annotations

from pathlib import Path

from chatbot.errors import ConfigError, ModelAssetError

#: The name of the packaged chat model (the same string as ``chatbot.config.EMBEDDED_CHAT_MODEL``).
EMBEDDED_CHAT_MODEL = "embedded:smollm2-135m-instruct"


def resolve_base_model(name: str, cache_dir: str | Path | None = None) -> str:
    """A local folder or hub id for ``name`` (the embedded name is converted once, see :mod:`chatbot.assets`).

    Args:
        name: :data:`EMBEDDED_CHAT_MODEL`, a local folder or a Hugging Face id.
        cache_dir: where the embedded model is converted (needed only for the embedded name).

    Raises:
        ConfigError: the embedded name without a ``cache_dir``.
        ModelAssetError: the embedded model could not be prepared.
    """
    if name == EMBEDDED_CHAT_MODEL:
        if cache_dir is None:
            raise ConfigError(f"cache_dir must be a folder to prepare the embedded chat model {name!r}, got None")
        from chatbot.assets import ensure_smollm2

        return str(ensure_smollm2(Path(cache_dir)))
    return name


def load_tokenizer(path: str):
    """The base model's tokenizer, with a pad token (its EOS when it has none).

    Raises:
        ModelAssetError: it cannot be loaded or has no chat template.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelAssetError(f"cannot load the tokenizer of {path!r}: {exc}") from exc
    if not tok.chat_template:
        raise ModelAssetError(f"base_model {path!r} has no chat template; use an instruction-tuned chat model")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str):
    """The base model with float32 weights (mixed precision is autocast), ``use_cache`` off (training).

    Raises:
        ModelAssetError: the checkpoint cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:
        raise ModelAssetError(f"cannot load base_model {path!r}: {exc}") from exc
    model.config.use_cache = False
    return model
