"""The ``chatbot`` command line (a face: it calls the service layer), one module per domain:

* :mod:`~chatbot.cli.serving` -- ``setup``, ``serve``, ``chat``;
* :mod:`~chatbot.cli.knowledge` -- ``ingest``, ``render-kb``, ``eval retrieval``;
* :mod:`~chatbot.cli.answers` -- ``eval answers``;
* :mod:`~chatbot.cli.heads` -- ``train-intents``, ``train-entities``, ``eval intents|entities``;
* :mod:`~chatbot.cli.adapters` -- ``train``, ``adapters ...``;
* :mod:`~chatbot.cli.users` -- ``users add|passwd|list``.

Each module's ``register(sub, eval_targets)`` adds its commands; the ``eval`` command is created here, once,
and each module adds its targets to it. Library errors (:class:`~chatbot.errors.ChatbotError`) become a
one-line message on stderr and exit code 2; bad settings exit with 2 as well.
"""

from __future__ import annotations

import argparse
import logging
import sys

from chatbot.cli import adapters, answers, heads, knowledge, serving, users
from chatbot.errors import ChatbotError

log = logging.getLogger("chatbot")

#: The command modules, in the order their commands appear in ``--help``.
COMMAND_MODULES = (serving, knowledge, answers, heads, adapters, users)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render ``--help``)."""
    p = argparse.ArgumentParser(prog="chatbot", description="Self-hosted customer-service assistant.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="evaluate a component: retrieval, answers, intents, entities")
    eval_targets = ev.add_subparsers(dest="target", required=True, metavar="TARGET")
    for module in COMMAND_MODULES:
        module.register(sub, eval_targets)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``chatbot`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "faiss.loader", "sentence_transformers", "bm25s"):
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
