"""``setup``, ``serve`` and ``chat``: prepare the embedded defaults, serve the HTTP API, chat in a terminal."""

from __future__ import annotations

import asyncio
from pathlib import Path

from chatbot.cli.common import settings
from chatbot.errors import ChatbotError


def cmd_setup(args) -> int:
    """Prepare everything ``serve`` needs: the embedded models, the knowledge-base index, the routing heads and, on a
    fresh install, the shipped adapter made live."""
    from chatbot.assets import resolve_chat_model
    from chatbot.operations import ingest_paths, install_shipped_adapter

    s = settings()
    print(f"chat model: {resolve_chat_model(s)}", flush=True)
    kb = Path(s.kb_dir)
    if not any(kb.glob("*.md")):
        raise ChatbotError(f"knowledge base folder {kb} has no documents; run `chatbot render-kb` or set CHATBOT_KB_DIR")
    report = ingest_paths(s, [kb], sync=True, show_progress=True)
    print(report.summary(), flush=True)
    from chatbot.router import Router

    router = Router.from_settings(s).warm()  # the committed heads load on the installed MiniLM (sha256-checked)
    print(f"routing heads: {len(router.intent_head.labels)} intents (threshold {router.intent_head.threshold:.3f}), "
          f"slots {', '.join(router.entity_head.types)}", flush=True)
    print(install_shipped_adapter(s), flush=True)
    return 0


def cmd_serve(args) -> int:
    """Serve the API and the chat page."""
    import uvicorn

    from chatbot.api import create_app

    s = settings(host=args.host, port=args.port, engine=args.engine)
    app = create_app(s)
    print(f"serving on http://{s.host}:{s.port}", flush=True)
    # forwarded headers are read by the app itself, from settings.trusted_proxies only (chatbot.api)
    uvicorn.run(app, host=s.host, port=s.port, log_level="info", proxy_headers=False)
    return 0


def cmd_chat(args) -> int:
    """Chat in the terminal (streams the reply; prints the sources)."""
    from chatbot.service import Assistant

    s = settings(engine=args.engine)

    async def run() -> None:
        a = Assistant.from_settings(s)
        await a.start_engine()
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
                    if turn.route is not None:
                        r = turn.route
                        slots = ", ".join(f"{sl.type}={sl.value}" for sl in r.slots)
                        print(f"     (intent {r.intent} {r.confidence:.2f}, {r.action}: {r.reason}"
                              f"{'; ' + slots if slots else ''})")
                    conv = turn.conversation_id
                except ChatbotError as exc:
                    print(f"\nerror: {exc}")
        finally:
            await a.engine.close()

    asyncio.run(run())
    return 0


def register(sub, eval_targets) -> None:
    """Add ``setup``, ``serve`` and ``chat`` to the top-level sub-parsers ``sub``."""
    sp = sub.add_parser("setup", help="fetch and convert the embedded models, build the knowledge-base index")
    sp.set_defaults(func=cmd_setup)

    sp = sub.add_parser("serve", help="serve the HTTP API and the chat page")
    sp.add_argument("--host", default=None)
    sp.add_argument("--port", type=int, default=None)
    sp.add_argument("--engine", choices=["auto", "vllm", "transformers"], default=None)
    sp.set_defaults(func=cmd_serve)
    sp = sub.add_parser("chat", help="chat in the terminal")
    sp.add_argument("--engine", choices=["auto", "vllm", "transformers"], default=None)
    sp.set_defaults(func=cmd_chat)
