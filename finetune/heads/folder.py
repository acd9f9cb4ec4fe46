"""The head folder: how a trained head is written and read back.

A head folder holds ``head.json`` (kind, format version, base model and its sha256, method, label map,
temperature, threshold, max length), ``training.json`` (training config, data sources and hash, runtime,
library versions), ``metrics.json`` (validation metrics and report) and ``adapter/`` (LoRA: the adapter
only, loaded on top of the installed base weights, whose sha256 is checked, and merged into the encoder)
or ``model/`` (full fine-tune, with its tokenizer). A folder is written beside the old one and swapped
into place, so it is never half-written. :class:`SavedHead` gives both heads ``save`` and ``load``.

torch / transformers / peft / safetensors are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from chatbot.errors import ModelAssetError, NotFoundError
from chatbot.hashing import sha256_file
from finetune.heads.config import resolve_base

log = logging.getLogger(__name__)

#: Bump when the head folder layout changes.
FORMAT_VERSION = 1


def weights_sha256(folder: str) -> str | None:
    """SHA-256 of ``<folder>/model.safetensors`` (cached per process), None when there is no such file."""
    path = Path(folder) / "model.safetensors"
    return sha256_file(path, cache=True) if path.is_file() else None


@contextlib.contextmanager
def quiet_transformers():
    """Silence the "newly initialised weights" load report while a head is rebuilt."""
    import transformers

    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(old)


def save_weights(model, folder: Path, method: str, dtype: str, tokenizer,
                  adapter_src: dict[str, bytes] | None = None, base_name: str | None = None) -> None:
    """Write ``adapter/`` (LoRA) or ``model/`` (full) in ``dtype``.

    A loaded LoRA head holds the merged model, so its adapter files are copied from
    the folder it was loaded from (``adapter_src``).

    Raises:
        ModelAssetError: a merged LoRA head without its source adapter folder.
    """
    from safetensors.torch import load_file, save_file

    if method == "lora" and not hasattr(model, "peft_config"):
        if not adapter_src or "adapter_config.json" not in adapter_src:
            raise ModelAssetError("this LoRA head was merged on load and has no adapter files to save")
        (folder / "adapter").mkdir(parents=True)
        for name, data in adapter_src.items():
            (folder / "adapter" / name).write_bytes(data)
        return
    if method == "lora":
        target = folder / "adapter"
        model.save_pretrained(str(target))
        (target / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        if base_name:  # the logical base, not this machine's path to it
            cfg_path = target / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = base_name
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        f = target / "adapter_model.safetensors"
    else:
        target = folder / "model"
        model.save_pretrained(str(target))
        tokenizer.save_pretrained(str(target))
        f = target / "model.safetensors"
    if dtype == "float16" and f.is_file():
        import torch

        state = load_file(str(f))
        state = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        save_file(state, str(f), metadata={"format": "pt"})


def write_head_folder(out_dir: Path, write) -> Path:
    """Write into a temporary sibling folder, then swap it into place (never half-written)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        write(tmp)
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def copy_adapter(src: Path) -> dict[str, bytes]:
    """The files of a loaded adapter folder, kept in memory (a few MB) so the head can be
    saved again even over the folder it came from."""
    return {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}


def save_head(head, out_dir: str | Path, kind: str, fields: dict) -> Path:
    """Write an intent or entity ``head`` folder atomically: weights (LoRA adapter or full),
    ``head.json`` (``head.meta`` plus ``kind``, format version and ``fields``), ``training.json``
    and ``metrics.json``; returns the folder."""
    meta = dict(head.meta) | {"kind": kind, "format_version": FORMAT_VERSION, **fields}
    meta.setdefault("method", "full")
    meta.setdefault("base_model", None)
    dtype = head.training.get("config", {}).get("save_dtype", "float32")

    def write(tmp: Path) -> None:
        save_weights(head.model, tmp, meta["method"], dtype, head.tokenizer, head._adapter_src,
                      meta.get("base_model"))
        (tmp / "head.json").write_text(json.dumps(meta, indent=2))
        (tmp / "training.json").write_text(json.dumps(head.training, indent=2, default=str))
        (tmp / "metrics.json").write_text(json.dumps(head.metrics, indent=2))

    path = write_head_folder(Path(out_dir), write)
    log.info("%s head saved to %s", kind, path)
    return path


def restore_saved_state(head, folder: Path, meta: dict):
    """Give a loaded ``head`` its ``training.json`` / ``metrics.json`` and, for a LoRA head, the adapter
    files (so :func:`save_head` can write it again); returns ``head``."""
    for name in ("training", "metrics"):
        p = folder / f"{name}.json"
        if p.is_file():
            setattr(head, name, json.loads(p.read_text()))
    if meta.get("method") == "lora":
        head._adapter_src = copy_adapter(folder / "adapter")
    return head


def read_head_json(folder: Path, kind: str) -> dict:
    folder = Path(folder)
    path = folder / "head.json"
    if not path.is_file():
        raise NotFoundError(f"no {kind} head at {folder} (missing head.json)")
    meta = json.loads(path.read_text())
    if meta.get("kind") != kind:
        raise ModelAssetError(f"{path}: kind is {meta.get('kind')!r}, expected {kind!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelAssetError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


def load_model(folder: Path, meta: dict, auto_cls):
    """Rebuild the fine-tuned model of a head folder (LoRA merged), in eval mode, and its tokenizer."""
    import torch
    from transformers import AutoTokenizer

    labels = meta["labels"]
    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    try:
        if meta["method"] == "full":
            path = folder / "model"
            with quiet_transformers():
                model = auto_cls.from_pretrained(str(path), dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(path))
        else:
            from peft import PeftModel

            base = resolve_base(meta["base_model"])
            want = meta.get("base_sha256")
            have = weights_sha256(base) if want else None
            if want and have != want:
                raise ModelAssetError(
                    f"{folder}: the adapter was trained on base weights sha256 {want[:12]}..., "
                    f"but {base} has {str(have)[:12]}...; retrain the head or install the matching base"
                )
            with quiet_transformers():
                model = auto_cls.from_pretrained(
                    base, num_labels=len(labels), id2label=id2label, label2id=label2id, dtype=torch.float32
                )
                model = PeftModel.from_pretrained(model, str(folder / "adapter"))
            model = model.merge_and_unload()
            tok = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelAssetError(f"cannot load the head at {folder}: {exc}") from exc
    model.eval()
    return model, tok


class SavedHead:
    """``save`` and ``load`` of a head folder, shared by :class:`~finetune.heads.intent.IntentHead` and
    :class:`~finetune.heads.entity.EntityHead`.

    A subclass sets ``kind`` and says which transformers auto class rebuilds its model
    (:meth:`_auto_class`), which ``head.json`` fields it writes besides the provenance (:meth:`_folder_fields`)
    and how it is built from a loaded model and ``head.json`` (:meth:`_from_folder`).
    """

    kind = ""

    def _folder_fields(self) -> dict:
        raise NotImplementedError

    @classmethod
    def _auto_class(cls):
        raise NotImplementedError

    @classmethod
    def _from_folder(cls, model, tokenizer, meta: dict):
        raise NotImplementedError

    def save(self, out_dir: str | Path) -> Path:
        """Write the head folder (atomically: a finished folder replaces the old one).

        Returns:
            ``out_dir``.
        """
        return save_head(self, out_dir, self.kind, self._folder_fields())

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None):
        """Load a head folder written by :meth:`save` (LoRA adapters merged into the encoder).

        Raises:
            NotFoundError: no ``head.json`` in ``folder``.
            ModelAssetError: wrong kind or format, base weights that differ from the ones
                the adapter was trained on, or unreadable weights.
        """
        folder = Path(folder)
        meta = read_head_json(folder, cls.kind)
        model, tok = load_model(folder, meta, cls._auto_class())
        if device:
            model.to(device)
        return restore_saved_state(cls._from_folder(model, tok, meta), folder, meta)
