"""The entity (slot) head: token classification with BIO tags that returns typed slots with character offsets.

Trained from character spans; every sub-word token of a span is labelled (``B-`` on the first, ``I-`` on the
rest, :mod:`finetune.heads.bio`) so predicted spans map back to character offsets exactly. Long texts are
read in overlapping windows. Training and the head folder are shared with the intent head
(:mod:`finetune.heads.training`, :mod:`finetune.heads.folder`).

torch / transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from chatbot.errors import ConfigError, InvalidInputError
from finetune.heads.bio import align_tags, bio_labels, spans_from_tags
from finetune.heads.config import HeadConfig
from finetune.heads.evaluation import choose_entity_threshold, entity_report
from finetune.heads.folder import SavedHead
from finetune.heads.training import finish, require_rows, start, train_loop
from finetune.heads.types import Slot
from finetune.intent_data import EntitySplits, label_counts_warnings

log = logging.getLogger(__name__)


class EntityHead(SavedHead):
    """Token-classification (BIO) head that returns typed slots with character offsets.

    Args:
        model: a transformers token-classification model (or a peft wrapper).
        tokenizer: its fast tokenizer (offsets are needed).
        labels: tag names by id (``"O"``, ``"B-type"``, ``"I-type"``).
        threshold: spans whose score is below it are dropped, in [0, 1].
        max_length: tokens per window; longer texts are read in windows overlapping by
            a quarter of it.
        meta: provenance (``head.json`` content).

    Raises:
        ConfigError: bad threshold or tag names.
    """

    kind = "entity"

    def __init__(self, model, tokenizer, labels: Sequence[str], threshold: float = 0.0, max_length: int = 128,
                 meta: dict | None = None) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
        bad = [t for t in labels if t != "O" and not t.startswith(("B-", "I-"))]
        if bad:
            raise ConfigError(f"entity labels must be O, B-* or I-*, got {bad}")
        self.model = model
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.threshold = float(threshold)
        self.max_length = int(max_length)
        self.meta = dict(meta or {})
        self.training: dict = {}
        self.metrics: dict = {}
        self._adapter_src: dict[str, bytes] | None = None

    @property
    def types(self) -> list[str]:
        """Entity types the head knows."""
        return sorted({t[2:] for t in self.labels if t != "O"})

    def _encode(self, texts: Sequence[str]):
        stride = max(1, self.max_length // 4)
        return self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, stride=stride,
            return_overflowing_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True,
            padding=True, return_tensors="pt",
        )

    def tag(self, texts: Sequence[str], batch_size: int = 64) -> list[list[tuple[str | None, tuple[int, int], float]]]:
        """Per text, per token (all windows, in order): ``(tag or None for special, offsets, probability)``."""
        import torch

        texts = ["" if t is None else str(t) for t in texts]
        results: list[list] = [[] for _ in texts]
        device = next(self.model.parameters()).device
        self.model.eval()
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                chunk = texts[s : s + batch_size]
                enc = self._encode(chunk)
                mapping = enc.pop("overflow_to_sample_mapping").tolist()
                offsets = enc.pop("offset_mapping").tolist()
                special = enc.pop("special_tokens_mask").tolist()
                enc = enc.to(device)
                probs = torch.softmax(self.model(**enc).logits.float(), dim=-1).cpu().numpy()
                for w, sample in enumerate(mapping):
                    top = probs[w].argmax(-1)
                    for k in range(len(offsets[w])):
                        if special[w][k] or enc["attention_mask"][w, k] == 0:
                            continue
                        results[s + sample].append(
                            (self.labels[int(top[k])], tuple(offsets[w][k]), float(probs[w, k, int(top[k])]))
                        )
        return results

    def predict(self, texts: Sequence[str], batch_size: int = 64, threshold: float | None = None) -> list[list[Slot]]:
        """Slots of each message, sorted by offset; ``text[slot.start:slot.end] == slot.value``.

        Texts longer than ``max_length`` tokens are read in overlapping windows, so a slot
        at the end of a 10,000-character message is still found.
        """
        t = self.threshold if threshold is None else float(threshold)
        out = []
        for text, toks in zip(texts, self.tag(texts, batch_size)):
            text = "" if text is None else str(text)
            # windows overlap: keep one tag per character offset (the first window's)
            seen: dict[tuple[int, int], tuple] = {}
            for tag, off, p in toks:
                seen.setdefault(off, (tag, off, p))
            ordered = [seen[k] for k in sorted(seen)]
            spans = spans_from_tags([x[0] for x in ordered], [x[1] for x in ordered], [x[2] for x in ordered])
            out.append([Slot(typ, text[s:e], s, e, sc) for s, e, typ, sc in spans if sc >= t])
        return out

    @classmethod
    def train(
        cls,
        splits: EntitySplits,
        config: HeadConfig | None = None,
        out_dir: str | Path | None = None,
        progress: bool = True,
    ) -> EntityHead:
        """Fine-tune on ``splits.train`` (tags aligned with :func:`align_tags`), pick the span-score
        threshold that maximises validation micro-F1, optionally save.

        Raises:
            InvalidInputError: empty splits, no entity in the training split, a validation
                entity type not in the training types (names the row), or a slow tokenizer.
            ModelAssetError: the base model cannot be loaded.
        """
        from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

        config = config or HeadConfig(max_length=128)
        require_rows(splits, "entity")
        types = splits.types
        if not types:
            raise InvalidInputError("entity training split has no entity span")
        for i, (_, spans) in enumerate(splits.validation, start=1):
            for s in spans:
                if s.type not in types:
                    raise InvalidInputError(f"validation row {i}: unknown entity type {s.type!r}")
        counts = Counter(s.type for _, spans in splits.train for s in spans)
        warnings = label_counts_warnings([("", t) for t in counts.elements()])
        labels = bio_labels(types)
        label2id = {y: i for i, y in enumerate(labels)}

        base, tok, model = start(config, AutoModelForTokenClassification, labels, "entity", fast_tokenizer=True)
        items = []
        for text, spans in splits.train:
            enc = tok(text, truncation=True, max_length=config.max_length, return_offsets_mapping=True,
                      return_special_tokens_mask=True)
            tags = align_tags(enc["offset_mapping"], spans, enc["special_tokens_mask"])
            items.append({
                "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": [-100 if t is None else label2id[t] for t in tags],
            })
        log.info("training entity head: types %s, %d train / %d validation rows", types, len(items),
                 len(splits.validation))
        t0 = time.time()
        train_metrics = train_loop(model, tok, items, DataCollatorForTokenClassification(tok), config, progress)

        head = cls(model, tok, labels, 0.0, config.max_length)
        head.threshold, sweep = choose_entity_threshold(head, splits.validation)
        report = entity_report(head, splits.validation)
        report["threshold_sweep"] = sweep
        head.metrics = {"validation": report}
        meta = {"labels": labels, "threshold": head.threshold, "max_length": config.max_length,
                "tagging": "BIO, every sub-word token of a span labelled (B- first, I- rest)"}
        return finish(head, config, splits, base, meta, {"entity_counts": dict(counts), "warnings": warnings},
                      train_metrics, t0, out_dir)

    def _folder_fields(self) -> dict:
        return {"labels": self.labels, "threshold": self.threshold, "max_length": self.max_length}

    @classmethod
    def _auto_class(cls):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    @classmethod
    def _from_folder(cls, model, tokenizer, meta: dict) -> EntityHead:
        return cls(model, tokenizer, meta["labels"], meta.get("threshold", 0.0), meta.get("max_length", 128), meta)
