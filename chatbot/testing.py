"""Run a ``chatbot serve`` process on loopback: used by the tests and the benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
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


def start_server(tmp: Path, kb: Path, engine: str, timeout: float = 600, routing: bool = False,
                 answer_mode: str = "generate", data_dir: Path | None = None, shipped_adapter: bool = False,
                 **env_settings: str) -> Server:
    """Run ``chatbot setup`` then ``chatbot serve`` with data in ``tmp/var``; wait for ``/healthz``.

    Args:
        tmp: a scratch folder (index, database, server log).
        kb: the documents folder to ingest.
        engine: ``transformers``, ``vllm`` or ``auto``.
        timeout: seconds to wait for the server to answer.
        routing: route messages with the shipped heads (``CHATBOT_ROUTING``). Off by default:
            the tests and benchmarks that use a live server measure the engine and the API, and
            a greeting would otherwise get the policy's fixed clarify reply instead of generation.
        answer_mode: ``CHATBOT_ANSWER_MODE``; ``generate`` by default for the same reason (the
            served default is ``verified``; bench/serving.py measures both).
        data_dir: the data folder (index, adapters, uploads) instead of ``tmp/var``; servers given the same one
            share it, as replicas on shared storage do (their database then comes from ``DATABASE_URL``).
        shipped_adapter: let setup make the shipped adapter live (``CHATBOT_SHIPPED_ADAPTER``). Off by default, for
            the same reason as ``routing``: the base model, without LoRA support, is what those measure.
        env_settings: more settings, e.g. ``MAX_QUEUED="0"`` becomes ``CHATBOT_MAX_QUEUED=0``.

    Raises:
        RuntimeError: the server exited or did not answer in time (its log is in the message).
    """
    port = free_port()
    data_dir = data_dir or tmp / "var"
    env = {
        **os.environ,
        "CHATBOT_DATA_DIR": str(data_dir),
        "CHATBOT_KB_DIR": str(kb),
        "CHATBOT_PORT": str(port),
        "CHATBOT_ENGINE": engine,
        "CHATBOT_MAX_NEW_TOKENS": "48",
        "CHATBOT_MAX_MODEL_LEN": "1024",
        "HF_HUB_OFFLINE": "1",
        "CHATBOT_ROUTING": "true" if routing else "false",
        "CHATBOT_ANSWER_MODE": answer_mode,
        **({} if shipped_adapter else {"CHATBOT_SHIPPED_ADAPTER": "none"}),
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
                return Server(url, data_dir, proc, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server did not come up in {timeout} s:\n{log_path.read_text()[-4000:]}")


def stop_server(server: Server) -> None:
    """Terminate the server (SIGTERM, then SIGKILL after 60 s)."""
    server.proc.terminate()
    try:
        server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
