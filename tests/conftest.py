"""Shared fixtures: the real embedded models, a small knowledge base, and live servers.

Everything runs offline on CPU: the chat model is the embedded SmolLM2-135M
(converted once into the user cache by ``chatbot setup``), the embedder the
packaged all-MiniLM-L6-v2.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from chatbot.testing import Server, start_server, stop_server  # noqa: F401  (re-exported for tests)

# The answer gate (on by default) answers a question set twice through the real pipeline before each promotion:
# minutes on this CPU. Tests of promotion turn it off through the environment (in-process Settings and the
# servers they start both read it); the gate's own tests turn it on explicitly (tests/chatbot/test_answer_gate.py).
os.environ.setdefault("CHATBOT_ADAPTER_GATE_ANSWERS", "false")

ROOT = Path(__file__).resolve().parent.parent
KB_SLICE = [
    "product_defect__return_size.md",
    "product_defect__return_color.md",
    "product_defect__refund_initiate.md",
    "product_defect__refund_status.md",
    "account_access__recover_password.md",
    "purchase_dispute__promo_code_invalid.md",
    "shipping_issue__status.md",
    "storewide_query__membership.md",
]


@pytest.fixture(scope="session")
def settings_base():
    from chatbot.config import Settings

    return Settings()


@pytest.fixture(scope="session")
def chat_model_path(settings_base) -> str:
    """Folder of the converted SmolLM2-135M-Instruct checkpoint."""
    from chatbot.assets import resolve_chat_model

    return resolve_chat_model(settings_base)


@pytest.fixture(scope="session")
def embedder(settings_base):
    """The real all-MiniLM-L6-v2 embedder (384 dims)."""
    from chatbot.assets import resolve_embedder
    from retrieval.embedder import Embedder

    return Embedder(resolve_embedder(settings_base), name=settings_base.embedder)


@pytest.fixture(scope="session")
def kb_dir(tmp_path_factory) -> Path:
    """Eight ABCD policy documents copied from data/kb."""
    d = tmp_path_factory.mktemp("kb")
    for name in KB_SLICE:
        shutil.copy(ROOT / "data" / "kb" / name, d / name)
    return d


@pytest.fixture(scope="session")
def tf_server(tmp_path_factory, kb_dir, chat_model_path):
    """``chatbot serve`` on the transformers engine with the real SmolLM2 and the KB slice."""
    server = start_server(tmp_path_factory.mktemp("tf"), kb_dir, "transformers")
    yield server
    stop_server(server)
