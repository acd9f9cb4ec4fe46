"""Classification heads for routing: an intent head and an entity (slot) head.

Both heads are a pre-trained encoder (default: the packaged all-MiniLM-L6-v2; any Hugging Face encoder by
``HeadConfig.base_model``) with a classification layer, fine-tuned fully or with LoRA. One module per concern:

* :mod:`finetune.heads.config` -- :class:`HeadConfig`, the base encoder (``EMBEDDED_BASE``, ``resolve_base``);
* :mod:`finetune.heads.types` -- what they return: :class:`IntentPrediction`, :class:`Slot`;
* :mod:`finetune.heads.training` -- the Trainer loop and the steps both heads share;
* :mod:`finetune.heads.folder` -- the head folder format (save, load, base-weight check);
* :mod:`finetune.heads.bio` -- BIO tags from and to character spans;
* :mod:`finetune.heads.evaluation` -- per-label reports, out-of-scope metrics, span-level entity F1;
* :mod:`finetune.heads.intent` -- :class:`IntentHead` (calibrated confidence, out-of-scope decision);
* :mod:`finetune.heads.entity` -- :class:`EntityHead` (typed slots with character offsets).
"""

from finetune.heads.bio import align_tags, bio_labels, spans_from_tags
from finetune.heads.config import EMBEDDED_BASE, HeadConfig, resolve_base
from finetune.heads.entity import EntityHead
from finetune.heads.evaluation import choose_entity_threshold, entity_report, intent_report, label_report
from finetune.heads.folder import FORMAT_VERSION
from finetune.heads.intent import IntentHead
from finetune.heads.types import IntentPrediction, Slot

__all__ = [
    "EMBEDDED_BASE",
    "FORMAT_VERSION",
    "EntityHead",
    "HeadConfig",
    "IntentHead",
    "IntentPrediction",
    "Slot",
    "align_tags",
    "bio_labels",
    "choose_entity_threshold",
    "entity_report",
    "intent_report",
    "label_report",
    "resolve_base",
    "spans_from_tags",
]
