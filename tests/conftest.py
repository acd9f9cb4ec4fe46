"""Shared fixtures: the real embedded models, a small knowledge base, and live servers.

Everything runs offline on CPU: the chat model is the embedded SmolLM2-135M
(converted once into the user cache by ``chatbot setup``), the embedder the
packaged all-MiniLM-L6-v2.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A ``chatbot serve`` process on loopback."""

    url: str
    data_dir: Path
    proc: subprocess.Popen
    log_path: Path

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'chatbot.db'}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def start_server(tmp: Path, kb: Path, engine: str, timeout: float = 600, **env_settings: str) -> Server:
    """Run ``chatbot setup`` then ``chatbot serve`` in a temporary data dir; wait for /healthz."""
    port = _free_port()
    env = {
        **os.environ,
        "CHATBOT_DATA_DIR": str(tmp / "var"),
        "CHATBOT_KB_DIR": str(kb),
        "CHATBOT_PORT": str(port),
        "CHATBOT_ENGINE": engine,
        "CHATBOT_MAX_NEW_TOKENS": "48",
        "CHATBOT_MAX_MODEL_LEN": "1024",
        "HF_HUB_OFFLINE": "1",
        **{f"CHATBOT_{k.upper()}": v for k, v in env_settings.items()},
    }
    cli = [sys.executable, "-m", "chatbot.cli"]
    subprocess.run([*cli, "setup"], env=env, check=True, capture_output=True, timeout=600)
    log_path = tmp / f"serve-{engine}.log"
    proc = subprocess.Popen([*cli, "serve"], env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return Server(url, tmp / "var", proc, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server did not come up in {timeout} s:\n{log_path.read_text()[-4000:]}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="session")
def tf_server(tmp_path_factory, kb_dir, chat_model_path):
    """``chatbot serve`` on the transformers engine with the real SmolLM2 and the KB slice."""
    server = start_server(tmp_path_factory.mktemp("tf"), kb_dir, "transformers")
    yield server
    stop_server(server)
