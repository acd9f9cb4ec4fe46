"""The ``chatbot`` command line: ``setup``, ``serve``, ``ingest``, ``chat``, ``render-kb``.

Library errors (:class:`~chatbot.errors.ChatbotError`) become a one-line message
on stderr and exit code 2; bad settings exit with 2 as well.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from chatbot.errors import ChatbotError

log = logging.getLogger("chatbot")


def _settings(**overrides):
    from chatbot.config import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _embedder(settings):
    from chatbot.assets import resolve_embedder
    from retrieval.embedder import Embedder

    return Embedder(resolve_embedder(settings), name=settings.embedder)


def cmd_setup(args) -> int:
    """Prepare everything ``serve`` needs: the embedded models and the knowledge-base index."""
    from chatbot.assets import resolve_chat_model
    from retrieval.ingest import ingest

    s = _settings()
    print(f"chat model: {resolve_chat_model(s)}", flush=True)
    kb = Path(s.kb_dir)
    if not any(kb.glob("*.md")):
        raise ChatbotError(f"knowledge base folder {kb} has no documents; run `chatbot render-kb` or set CHATBOT_KB_DIR")
    report = ingest([kb], s.index_dir, _embedder(s), s.chunk_tokens, s.chunk_overlap, sync=True, show_progress=True)
    print(report.summary(), flush=True)
    return 0


def cmd_serve(args) -> int:
    """Serve the API and the chat page."""
    import uvicorn

    from chatbot.api import create_app

    s = _settings(host=args.host, port=args.port, engine=args.engine)
    app = create_app(s)
    print(f"serving on http://{s.host}:{s.port}", flush=True)
    uvicorn.run(app, host=s.host, port=s.port, log_level="info")
    return 0


def cmd_ingest(args) -> int:
    """Ingest files and folders into the index (a new version is published when anything changed)."""
    from retrieval.ingest import ingest

    s = _settings()
    try:
        report = ingest(args.paths, s.index_dir, _embedder(s), s.chunk_tokens, s.chunk_overlap,
                        sync=args.sync, show_progress=True)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for sk in report.skipped:
        print(f"skipped {sk.path}: {sk.reason}")
    print(report.summary())
    return 0


def cmd_chat(args) -> int:
    """Chat in the terminal (streams the reply; prints the sources)."""
    from chatbot.service import Assistant

    s = _settings(engine=args.engine)

    async def run() -> None:
        a = Assistant.from_settings(s)
        await a.engine.start()
        conv = None
        print("Type your question (empty line or Ctrl-D to quit).", flush=True)
        try:
            while True:
                try:
                    text = input("you> ")
                except EOFError:
                    break
                if not text.strip():
                    break
                try:
                    turn = await a.start_turn(conv, text, channel="cli")
                    print("bot> ", end="", flush=True)
                    async for delta in turn.stream():
                        print(delta, end="", flush=True)
                    print()
                    for c in turn.citations:
                        print(f"     [{c.number}] {c.title} ({c.source})")
                    conv = turn.conversation_id
                except ChatbotError as exc:
                    print(f"\nerror: {exc}")
        finally:
            await a.engine.close()

    asyncio.run(run())
    return 0


def cmd_render_kb(args) -> int:
    """Render the ABCD policy guidelines into Markdown documents."""
    from retrieval.abcd import render_abcd_guidelines

    paths = render_abcd_guidelines(Path(args.source), Path(args.out))
    print(f"wrote {len(paths)} documents to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render ``--help``)."""
    p = argparse.ArgumentParser(prog="chatbot", description="Self-hosted customer-service assistant.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("setup", help="fetch and convert the embedded models, build the knowledge-base index")
    sp.set_defaults(func=cmd_setup)

    sp = sub.add_parser("serve", help="serve the HTTP API and the chat page")
    sp.add_argument("--host", default=None)
    sp.add_argument("--port", type=int, default=None)
    sp.add_argument("--engine", choices=["auto", "vllm", "transformers"], default=None)
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("ingest", help="ingest documents into the index")
    sp.add_argument("paths", nargs="+", type=Path, help="files or folders")
    sp.add_argument("--sync", action="store_true", help="also remove documents gone from these folders")
    sp.set_defaults(func=cmd_ingest)

    sp = sub.add_parser("chat", help="chat in the terminal")
    sp.add_argument("--engine", choices=["auto", "vllm", "transformers"], default=None)
    sp.set_defaults(func=cmd_chat)

    sp = sub.add_parser("render-kb", help="render the ABCD guidelines into Markdown documents")
    sp.add_argument("--source", default=str(Path(__file__).resolve().parent.parent.parent / "shared/data/abcd"))
    sp.add_argument("--out", default="data/kb")
    sp.set_defaults(func=cmd_render_kb)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``chatbot`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "faiss.loader", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ChatbotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # pydantic ValidationError for settings
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            print(f"error: bad setting: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
