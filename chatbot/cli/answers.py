"""``eval answers``: a question set through the real turn pipeline, scored (correct, K-Precision, ...)."""

from __future__ import annotations

import sys
from pathlib import Path

from chatbot.cli.common import settings, write_json
from chatbot.errors import ChatbotError
from chatbot.hashing import tree_sha256


def cmd_eval_answers(args) -> int:
    """Run a question set through the real turn pipeline and score the replies (table, per-row report, JSON)."""
    import asyncio
    import hashlib
    import tempfile

    from tqdm import tqdm

    from chatbot.answer_eval import format_rows, format_summary, load_answer_set, report, run_answer_eval, summarize
    from chatbot.answer_gate import PinnedAdapter
    from chatbot.operations import adapter_target, ingest_paths
    from chatbot.service import Assistant

    s = settings(engine=args.engine)
    cases = load_answer_set(args.dataset)
    if args.limit:
        cases = cases[: args.limit]
    index_dir = None
    if args.docs:  # the set's own document collection, indexed once under data_dir/eval/answers-<hash>
        key = hashlib.sha1("\n".join(str(Path(d).resolve()) for d in args.docs).encode()).hexdigest()[:10]
        index_dir = args.index_dir or s.data_dir / "eval" / f"answers-{key}" / "index"
        try:
            rep = ingest_paths(s, args.docs, index_dir=index_dir, sync=True, show_progress=False)
        except ChatbotError as exc:
            print(f"error: --docs: {exc}", file=sys.stderr)
            return 2
        print(rep.summary(), flush=True)
    modes = args.mode or [s.answer_mode]
    try:  # each (label, adapter) the set is answered with; none given: whatever LIVE.json names, as served
        targets = [(ref, adapter_target(s, ref)) for ref in args.adapters] if args.adapters else [(None, None)]
    except ChatbotError as exc:
        print(f"error: --adapters: {exc}", file=sys.stderr)
        return 2
    if args.adapters and any(t is not None for _, t in targets) and s.adapter_serving == "lora":
        s = s.model_copy(update={"enable_lora": True})  # one engine, switched between the adapters by LoRA
    runs = []
    with tempfile.TemporaryDirectory() as tmp:  # the evaluation's conversations stay out of the log
        base = Assistant.from_settings(s, index_dir, f"sqlite:///{Path(tmp) / 'eval.db'}")

        async def go() -> None:
            if args.adapters:  # pinned below, one after the other
                await base.engine.start()
            else:  # what is served: the live adapter, as the server would load it
                await base.start_engine()
            try:
                for ref, target in targets:
                    for mode in modes:
                        a = Assistant(s.model_copy(update={"answer_mode": mode}), base.engine, base.retriever,
                                      base.store, base.metrics, base.router)
                        if ref is not None:
                            a.adapters = PinnedAdapter(*(target or (None, None)))
                        await a.adapters.sync(a.engine)
                        label = mode if ref is None else f"{ref} {mode}"
                        bar = tqdm(total=len(cases), desc=f"eval answers ({label})", unit="q")
                        rows = await run_answer_eval(a, cases, args.concurrency, lambda _r: bar.update())
                        bar.close()
                        runs.append((label, summarize(rows), rows))
            finally:
                await base.engine.close()

        asyncio.run(go())
        base.store.close()
    if not args.quiet:
        for label, _, rows in runs:
            print(f"\n## {label}\n{format_rows(rows)}")
    info = base.engine.info
    served = ", ".join(args.adapters) if args.adapters else (info.adapter_version or "none")
    print(f"\n{args.dataset}: {len(cases)} questions; engine {info.name}, model {info.model}, adapter {served}")
    print(format_summary([(m, summ) for m, summ, _ in runs]))
    if args.json:
        out = report(Path(args.dataset), runs, {
            "engine": info.name, "model": info.model,
            "adapter": list(args.adapters) if args.adapters else info.adapter_version,
            "index_version": base.retriever.version if base.retriever is not None else None,
            "docs_sha256": tree_sha256(args.docs) if args.docs else None,
            "settings": {k: getattr(s, k) for k in (
                "top_k", "min_score", "retrieval_mode", "verify_min_overlap", "extractive_min_score",
                "extractive_max_units", "extractive_on_topic", "prompt_max_units", "max_new_tokens", "temperature",
                "route_grounded_min_score", "routing")},
            "docs": [str(d) for d in args.docs or []],
        })
        write_json(args.json, out)
    return 0


def register(sub, eval_targets) -> None:
    """Add the ``answers`` target of ``eval``."""
    sp = eval_targets.add_parser(
        "answers", help="correct, fact recall, K-Precision, unsupported claims, abstention, clarify rate, latency")
    sp.add_argument("--dataset", required=True, type=Path,
                    help='JSONL of {"id", "query", "history", "gold", "facts", "answerable"} (see data/eval/)')
    sp.add_argument("--mode", nargs="+", choices=["verified", "generate", "extractive"],
                    help="answer modes to run, one table row each (default: the running setting)")
    sp.add_argument("--docs", nargs="+", type=Path,
                    help="documents of the set (indexed for it); default: the published index")
    sp.add_argument("--index-dir", type=Path, help="index folder for --docs (default var/eval/answers-<hash>)")
    sp.add_argument("--adapters", nargs="+", metavar="ADAPTER",
                    help="answer with each of these in turn, one table row per adapter and mode: 'base' (no adapter), "
                         "a registered adapter's name or version, or an adapter folder (default: the live adapter)")
    sp.add_argument("--engine", choices=["auto", "vllm", "transformers"], default=None)
    sp.add_argument("--concurrency", type=int, default=8, help="conversations at once")
    sp.add_argument("--limit", type=int, help="only the first N rows")
    sp.add_argument("--quiet", action="store_true", help="no per-row report")
    sp.add_argument("--json", type=Path, help="write the report (dataset hash, settings, rows) here")
    sp.set_defaults(func=cmd_eval_answers)