"""Sentence embeddings (sentence-transformers), L2-normalised so inner product is cosine."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np
from chatbot.errors import RetrievalError

log = logging.getLogger(__name__)


class Embedder:
    """A sentence-transformers model that returns normalised float32 vectors.

    Args:
        model: local folder or Hugging Face id of a sentence-transformers model
            (default in this product: the packaged all-MiniLM-L6-v2, 384 dims).
        device: torch device; None picks CUDA when present, else CPU.
        batch_size: texts per forward pass.
        name: logical name recorded in index manifests (default: ``model``); use it
            when ``model`` is a machine-specific path.

    The model loads lazily on first use.
    """

    def __init__(self, model: str, device: str | None = None, batch_size: int = 64, name: str | None = None) -> None:
        if batch_size < 1:
            raise RetrievalError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = model
        self.name = name or model
        self.device = device
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()

    @property
    def model(self):
        """The loaded ``SentenceTransformer``."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    from sentence_transformers import SentenceTransformer

                    self._model = SentenceTransformer(self.model_name, device=self.device)
                    log.info("embedder loaded: %s (%d dims)", self.model_name, self.dim)
        return self._model

    @property
    def dim(self) -> int:
        """Embedding dimension (384 for MiniLM-L6)."""
        m = self.model
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())

    @property
    def max_seq_length(self) -> int:
        """Most tokens the model reads; longer text is truncated."""
        return int(self.model.max_seq_length)

    def count_tokens(self, text: str) -> int:
        """Word-piece tokens of ``text`` without special tokens."""
        return len(self.model.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """Embed ``texts``.

        Returns:
            float32 array of shape ``(len(texts), dim)``, each row of L2 norm 1.
        """
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)
