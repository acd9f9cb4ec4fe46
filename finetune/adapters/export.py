"""Compressed copies of an adapter for serving as a plain model: merged (full precision) and dynamic int8 (CPU).

* :func:`merge_adapter` -- base + adapter merged (``W + B A * alpha / r``) as a full safetensors checkpoint;
* :func:`export_int8` -- the merged model with every ``nn.Linear`` quantized to int8 per output channel
  (``torch.ao`` dynamic quantization), stored as plain tensors in safetensors (no pickle), loaded by
  :func:`load_int8`; optionally measured against the unmerged adapter.

torch / transformers / peft / safetensors are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import shutil
import tempfile
import warnings
from pathlib import Path

from chatbot.errors import AdapterError
from finetune.adapters.evaluation import load_split, load_with_adapter, metrics_on
from finetune.adapters.registry import (
    MERGED,
    AdapterOptions,
    AdapterRecord,
    adapter_version,
    atomic_write_json,
    merged_checkpoint,
    resolve_adapter,
)

log = logging.getLogger(__name__)


def _merged(rec: AdapterRecord, options: AdapterOptions):
    model, tok = load_with_adapter(rec, options)
    return model.merge_and_unload(), tok


def merge_adapter(ref: str | Path, out: str | Path, options: AdapterOptions) -> Path:
    """Write base + adapter merged (``W + B A * alpha / r``) as a full safetensors checkpoint.

    The folder loads with ``AutoModelForCausalLM`` and serves with either engine as a plain
    model (``CHATBOT_MODEL=<folder>``); ``merged.json`` records the adapter version and base.

    Raises:
        AdapterError, NotFoundError: as :func:`~finetune.adapters.registry.resolve_adapter`.
    """
    return _save_merged(resolve_adapter(ref, options), out, options)


def _save_merged(rec: AdapterRecord, out: str | Path, options: AdapterOptions) -> Path:
    model, tok = _merged(rec, options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out))
    (out / "merged.json").write_text(json.dumps(
        {"adapter": rec.version, "adapter_path": str(rec.path), "base_model": rec.base_id,
         "base_sha256": rec.base_sha256, "metrics": rec.metrics}, indent=1))
    return out


def write_merged(rec: AdapterRecord, options: AdapterOptions) -> Path:
    """The adapter's merged checkpoint in its own folder (``<folder>/merged``, :data:`MERGED`), written once
    (:func:`merge_adapter`; about 10 s and the base model's size on disk for SmolLM2-135M) and kept: vLLM serves it
    as a plain model, without the LoRA cost per request (``adapter_serving="merged"``). Written beside and renamed
    into place, so a server never loads half of it.

    Raises:
        AdapterError: the adapter cannot be loaded on the served base model.
    """
    have = merged_checkpoint(rec)
    if have is not None:
        return have
    log.info("writing the merged checkpoint of %s to %s (once; the base model's size)", rec.version, rec.path / MERGED)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MERGED}-", dir=rec.path))
    try:  # on the served base model (promotion checked that the adapter was trained on these very weights)
        _save_merged(dataclasses.replace(rec, base_id=options.model), tmp, options)
        dest = rec.path / MERGED
        if dest.exists():  # written for another version of this folder
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


#: What :func:`pack_adapter` copies: the peft weights and config, the manifest, the held-out splits.
PACKED_FILES = ("adapter_model.safetensors", "adapter_config.json", "splits.json", "validation.jsonl", "test.jsonl")


def pack_adapter(ref: str | Path, out: str | Path, options: AdapterOptions, dtype: str = "float16",
                 name: str | None = None) -> AdapterRecord:
    """Copy an adapter for shipping (e.g. ``data/adapters/NAME`` in the product): the peft weights cast to
    ``dtype`` (``float16`` halves the file; engines cast LoRA weights to the served dtype when they load them),
    its config, manifest and held-out splits; no checkpoints, no merged copy. The manifest gets the new weights'
    SHA-256 and a new version (same name and time, new hash), and ``packed_from`` (the version and weight hash it
    was made from, and the dtype). ``name``: ship it under another name (the registry folder it is installed
    into); default its own.

    Raises:
        AdapterError, NotFoundError: as :func:`~finetune.adapters.registry.resolve_adapter`; ``out`` exists;
            ``dtype`` is not float16, bfloat16 or float32; ``name`` is not a folder name (letters, digits, ``.``,
            ``_``, ``-``; a letter or digit first).
    """
    import torch
    from safetensors.torch import load_file, save_file

    from chatbot.hashing import files_sha256

    types = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if dtype not in types:
        raise AdapterError(f"dtype must be one of {sorted(types)}, got {dtype!r}")
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise AdapterError(f"an adapter name is letters, digits, '.', '_' and '-' (a letter or digit first), "
                           f"got {name!r}")
    rec = resolve_adapter(ref, options)
    out = Path(out)
    if out.exists():
        raise AdapterError(f"{str(out)!r} already exists; nothing was overwritten")
    try:
        out.mkdir(parents=True)
        for file in PACKED_FILES:
            src = rec.path / file
            if file == "adapter_model.safetensors":
                tensors = {k: v.to(types[dtype]) if v.is_floating_point() else v
                           for k, v in load_file(str(src)).items()}
                save_file(tensors, str(out / file), metadata={"format": "pt"})
            elif src.is_file():
                shutil.copy2(src, out / file)
        manifest = dict(rec.manifest)
        weights = files_sha256(sorted(out.glob("*.safetensors")))
        manifest["packed_from"] = {"version": rec.version, "weights_sha256": manifest.get("weights_sha256"),
                                   "dtype": dtype}
        manifest["weights_sha256"] = weights
        manifest["name"] = name or rec.name
        manifest["version"] = adapter_version(manifest["name"], rec.created_at, weights)
        atomic_write_json(out / "adapter.json", manifest)
        for f in out.iterdir():  # a copy to ship: readable by all, as the files it came from
            f.chmod(0o644)
    except OSError as exc:
        raise AdapterError(f"cannot write the packed adapter to {str(out)!r}: {exc}") from exc
    return AdapterRecord.from_folder(out)


INT8_WEIGHTS = "model_int8.safetensors"
INT8_MANIFEST = "int8.json"


def quantize_int8(model):
    """Dynamic int8 quantization of every ``nn.Linear`` (weights int8 with one scale per output
    channel, activations quantized per batch at run time; ``torch.ao.quantization.quantize_dynamic``
    with ``per_channel_dynamic_qconfig``, fbgemm/x86 kernels). CPU only.

    Per channel, not per tensor: one scale per matrix cost most of the quality on the Bitext
    adapter (validation loss 1.09 -> 2.46; ``chatbot adapters export-int8 --measure``)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization warns that it is deprecated
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model.float().eval(), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)


def _is_qlinear(module) -> bool:
    return module._get_name() == "DynamicQuantizedLinear"


def int8_state(q) -> dict:
    """Plain tensors of a :func:`quantize_int8` model, for safetensors (no pickle).

    Each quantized linear ``name`` gives ``name.weight_int8`` (int8, ``(out, in)``),
    ``name.weight_scale`` (float64) and ``name.weight_zero_point`` (int64), both ``(out,)`` per channel
    (axis 0) or ``(1,)`` per tensor, and ``name.bias``; every other parameter and buffer is stored
    as is (tied weights once, under their first name).

    Raises:
        AdapterError: a layer is quantized with a scheme other than per-tensor or per-channel (axis 0).
    """
    import torch

    out: dict = {}
    qnames = set()
    for name, mod in q.named_modules():
        if _is_qlinear(mod):
            qnames.add(name)
            w, b = mod._weight_bias()
            if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                scale = torch.tensor([w.q_scale()], dtype=torch.float64)
                zp = torch.tensor([w.q_zero_point()], dtype=torch.int64)
            elif w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) and w.q_per_channel_axis() == 0:
                scale = w.q_per_channel_scales().to(torch.float64)
                zp = w.q_per_channel_zero_points().to(torch.int64)
            else:
                raise AdapterError(f"layer {name} is quantized with {w.qscheme()}, expected per-tensor or "
                                   "per-channel on axis 0")
            out[f"{name}.weight_int8"] = w.int_repr().contiguous()
            out[f"{name}.weight_scale"] = scale.contiguous()
            out[f"{name}.weight_zero_point"] = zp.contiguous()
            if b is not None:
                out[f"{name}.bias"] = b.detach().contiguous()
    seen = set()  # tied weights (lm_head = embeddings) are stored once, as the first name
    for key, t in q.state_dict().items():
        if isinstance(t, torch.Tensor) and not t.is_quantized and key.rsplit(".", 2)[0] not in qnames \
                and key.rsplit(".", 1)[0] not in qnames and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[key] = t.detach().contiguous()
    return out


def load_int8(folder: str | Path):
    """(model, tokenizer) from an :func:`export_int8` folder (CPU).

    The model is built from ``config.json``, quantized the same way, and given the
    stored int8 weights (``set_weight_bias``) and float parameters.

    Raises:
        AdapterError: the folder is not an int8 export.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = Path(folder)
    if not (folder / INT8_WEIGHTS).is_file():
        raise AdapterError(f"{str(folder)!r} is not an int8 export: it has no {INT8_WEIGHTS}")
    cfg = AutoConfig.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    q = quantize_int8(model)
    state = load_file(str(folder / INT8_WEIGHTS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, mod in q.named_modules():
            if _is_qlinear(mod):
                scale = state.pop(f"{name}.weight_scale")
                zp = state.pop(f"{name}.weight_zero_point")
                ints = state.pop(f"{name}.weight_int8")
                if scale.numel() == 1:  # the stored integers as they are: an exact round trip
                    w = torch._make_per_tensor_quantized_tensor(ints, float(scale[0]), int(zp[0]))
                else:
                    w = torch._make_per_channel_quantized_tensor(ints, scale, zp, 0)
                mod.set_weight_bias(w, state.pop(f"{name}.bias", None))
    # the rest are plain parameters and buffers (quantized layers refuse load_state_dict without their keys)
    persistent = set(q.state_dict())
    targets = {k: t for k, t in [*q.named_parameters(), *q.named_buffers()] if k in persistent}
    unexpected = sorted(set(state) - set(targets))
    missing = sorted(set(targets) - set(state))
    if unexpected or missing:
        raise AdapterError(f"{str(folder)!r} does not match its config: unexpected tensors {unexpected[:5]}, "
                           f"missing {missing[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            targets[key].copy_(value)
    tok = AutoTokenizer.from_pretrained(str(folder))
    with contextlib.suppress(OSError):
        q.generation_config = GenerationConfig.from_pretrained(str(folder))
    return q.eval(), tok


def _size_mb(paths) -> float:
    return sum(Path(p).stat().st_size for p in paths if Path(p).is_file()) / 2**20


def export_int8(ref: str | Path, out: str | Path, options: AdapterOptions, measure: int = 0) -> dict:
    """Merge the adapter and write a dynamic-int8 checkpoint for CPU serving; optionally measure it.

    The folder holds ``config.json``, the tokenizer, ``model_int8.safetensors`` (int8 weights with
    their scales, :func:`int8_state`) and ``int8.json``; load it with :func:`load_int8`.

    Args:
        ref: adapter name, folder or version.
        out: folder to write.
        options: the registry (and the cache folder of the embedded base model).
        measure: when > 0, compare the unmerged adapter (peft on the fp32 base), the merged fp32
            model and the int8 model on the adapter's validation split (loss) and on ``measure``
            test dialogues (ROUGE-L, self-stop rate, new tokens per second of batched greedy
            generation), plus their size on disk.

    Returns:
        The ``int8.json`` content (with ``comparison`` when measured).
    """
    from safetensors.torch import save_file

    rec = resolve_adapter(ref, options)
    merged, tok = _merged(rec, options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged.config.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    if getattr(merged, "generation_config", None) is not None:
        merged.generation_config.save_pretrained(str(out))
    merged_state = {k: v.clone() for k, v in merged.state_dict().items()}
    q = quantize_int8(merged)
    save_file(int8_state(q), str(out / INT8_WEIGHTS), metadata={"format": "int8-dynamic"})
    report = {"adapter": rec.version, "base_model": rec.base_id, "base_sha256": rec.base_sha256,
              "method": "torch.ao dynamic int8 (nn.Linear weights int8 per output channel, activations per batch)",
              "size_mb": _size_mb([out / INT8_WEIGHTS])}
    if measure > 0:
        report["comparison"] = _compare_int8(rec, options, merged_state, out, measure)
    atomic_write_json(out / INT8_MANIFEST, report)
    return report


def _compare_int8(rec: AdapterRecord, options: AdapterOptions, merged_state: dict, out: Path, n: int) -> dict:
    import torch

    validation, test = load_split(rec, "validation"), load_split(rec, "test")
    cfg = {**rec.eval_config, "val_samples": n}
    res: dict = {}
    model, tok = load_with_adapter(rec, options)
    res["unmerged"] = metrics_on(model, tok, validation, test, cfg, n)
    base_dir = Path(model.peft_config["default"].base_model_name_or_path or "")
    res["unmerged"]["size_mb"] = _size_mb([*base_dir.glob("*.safetensors"), rec.path / "adapter_model.safetensors"])
    merged = model.merge_and_unload()
    merged.load_state_dict(merged_state)
    res["merged_fp32"] = metrics_on(merged, tok, validation, test, cfg, n)
    res["merged_fp32"]["size_mb"] = sum(v.numel() * v.element_size() for k, v in merged_state.items()
                                       if k != "lm_head.weight") / 2**20
    del model, merged
    q, qtok = load_int8(out)
    res["int8"] = metrics_on(q, qtok, validation, test, cfg, n)
    res["int8"]["size_mb"] = _size_mb([out / INT8_WEIGHTS])
    res["threads"] = torch.get_num_threads()
    return res
