"""The ``chatbot`` command line: ``setup``, ``serve``, ``ingest``, ``chat``, ``render-kb``, ``eval``.

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


def _index_options(settings):
    from chatbot.options import index_options

    return index_options(settings)


def cmd_setup(args) -> int:
    """Prepare everything ``serve`` needs: the embedded models and the knowledge-base index."""
    from chatbot.assets import resolve_chat_model
    from retrieval.ingest import ingest

    s = _settings()
    print(f"chat model: {resolve_chat_model(s)}", flush=True)
    kb = Path(s.kb_dir)
    if not any(kb.glob("*.md")):
        raise ChatbotError(f"knowledge base folder {kb} has no documents; run `chatbot render-kb` or set CHATBOT_KB_DIR")
    report = ingest([kb], s.index_dir, _embedder(s), s.chunk_tokens, s.chunk_overlap, sync=True, show_progress=True,
                    index_options=_index_options(s))
    print(report.summary(), flush=True)
    from chatbot.router import Router

    router = Router.from_settings(s).warm()  # the committed heads load on the installed MiniLM (sha256-checked)
    print(f"routing heads: {len(router.intent_head.labels)} intents (threshold {router.intent_head.threshold:.3f}), "
          f"slots {', '.join(router.entity_head.types)}", flush=True)
    return 0


def cmd_serve(args) -> int:
    """Serve the API and the chat page."""
    import uvicorn

    from chatbot.api import create_app

    s = _settings(host=args.host, port=args.port, engine=args.engine)
    app = create_app(s)
    print(f"serving on http://{s.host}:{s.port}", flush=True)
    # forwarded headers are read by the app itself, from settings.trusted_proxies only (chatbot.api)
    uvicorn.run(app, host=s.host, port=s.port, log_level="info", proxy_headers=False)
    return 0


def cmd_ingest(args) -> int:
    """Ingest files and folders into the index (a new version is published when anything changed)."""
    from retrieval.ingest import ingest

    s = _settings()
    try:
        report = ingest(args.paths, s.index_dir, _embedder(s), s.chunk_tokens, s.chunk_overlap,
                        sync=args.sync, show_progress=True, index_options=_index_options(s))
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


def cmd_render_kb(args) -> int:
    """Render the ABCD policy guidelines into Markdown documents."""
    from retrieval.abcd import render_abcd_guidelines

    paths = render_abcd_guidelines(Path(args.source), Path(args.out))
    print(f"wrote {len(paths)} documents to {args.out}")
    return 0


# --- classification heads (issue #4): train-intents, train-entities, eval intents|entities


def _head_config(args, kind: str):
    from finetune.heads import HeadConfig

    cfg = {"max_length": 64 if kind == "intent" else 128}
    for name in ("base_model", "method", "epochs", "learning_rate", "batch_size", "max_length", "lora_r",
                 "lora_alpha", "label_smoothing", "max_steps", "seed", "target_in_scope_accuracy", "threads"):
        v = getattr(args, name, None)
        if v is not None:
            cfg[name] = v
    return HeadConfig(**cfg)


def _write_json(path, obj) -> None:
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, default=str))
    print(f"wrote {path}")


def cmd_train_intents(args) -> int:
    """Fine-tune an intent head, calibrate it, evaluate it on the test split and save it."""
    from finetune.heads import IntentHead, intent_report
    from finetune.intent_data import load_intent_splits

    allowed = None
    if args.labels:
        src = Path(args.labels)
        allowed = src.read_text().split() if src.is_file() else [x.strip() for x in args.labels.split(",")]
    splits = load_intent_splits(args.dataset, text_field=args.text_field, label_field=args.label_field,
                                validation=args.validation, test=args.test, oos_label=args.oos_label,
                                labels=allowed)
    out = Path(args.out or f"var/heads/intent-{splits.name}")
    head = IntentHead.train(splits, _head_config(args, "intent"), out_dir=None, progress=True)
    val = head.metrics["validation"]
    print(val["report"])
    print(f"validation accuracy {val['accuracy']:.4f}  temperature {head.temperature:.3f}  "
          f"threshold {head.threshold:.4f}")
    if splits.test and not args.no_test:
        test = intent_report(head, splits.test, progress=True)
        head.metrics["test"] = test
        print(test["report"])
        line = f"test accuracy {test['accuracy']:.4f}"
        if test.get("oos_recall") is not None:
            line += (f"  in-scope accuracy {test['in_scope_accuracy']:.4f}  oos recall {test['oos_recall']:.4f}"
                     f"  oos precision {test['oos_precision'] or 0:.4f}")
        print(line)
    head.save(out)
    print(f"saved intent head to {out}")
    if args.json:
        _write_json(args.json, {"head": str(out), "metrics": head.metrics, "training": head.training})
    return 0


def cmd_train_entities(args) -> int:
    """Fine-tune an entity (slot) head from character spans, evaluate on the test split and save it."""
    from finetune.heads import EntityHead, entity_report
    from finetune.intent_data import load_entity_splits

    splits = load_entity_splits(args.dataset, validation=args.validation, test=args.test)
    out = Path(args.out or f"var/heads/entity-{splits.name}")
    head = EntityHead.train(splits, _head_config(args, "entity"), out_dir=None, progress=True)
    val = head.metrics["validation"]
    print(val["report"])
    print(f"validation micro-F1 {val['micro_f1']:.4f}  span threshold {head.threshold}")
    if splits.test and not args.no_test:
        test = entity_report(head, splits.test)
        head.metrics["test"] = test
        print(test["report"])
        print(f"test micro-F1 {test['micro_f1']:.4f}  exact character match {test['exact_char_match']:.4f}")
    head.save(out)
    print(f"saved entity head to {out}")
    if args.json:
        _write_json(args.json, {"head": str(out), "metrics": head.metrics, "training": head.training})
    return 0


def cmd_eval_intents(args) -> int:
    """Evaluate an intent head on a split of a dataset: per-label report, OOS metrics, JSON."""
    from finetune.heads import IntentHead, intent_report
    from finetune.intent_data import load_intent_splits

    head = IntentHead.load(args.head or _settings().intent_head_dir)
    splits = load_intent_splits(args.dataset, text_field=args.text_field, label_field=args.label_field)
    rows = getattr(splits, args.split)
    res = intent_report(head, rows, threshold=args.threshold, progress=True)
    print(res["report"])
    line = f"{args.dataset} {args.split}: accuracy {res['accuracy']:.4f} (n={res['n']})"
    if res.get("oos_recall") is not None or res.get("in_scope_accuracy") is not None:
        line += (f"  in-scope accuracy {res['in_scope_accuracy']:.4f}  oos recall {res['oos_recall'] or 0:.4f}"
                 f"  oos precision {res['oos_precision'] or 0:.4f}  threshold {res['threshold']:.4f}")
    print(line)
    if args.json:
        _write_json(args.json, {"dataset": args.dataset, "split": args.split, "head": str(args.head or "default"),
                                **res})
    return 0


def cmd_eval_entities(args) -> int:
    """Evaluate an entity head on a split of a dataset (seqeval report, JSON)."""
    from finetune.heads import EntityHead, entity_report
    from finetune.intent_data import load_entity_splits

    head = EntityHead.load(args.head or _settings().entity_head_dir)
    splits = load_entity_splits(args.dataset)
    res = entity_report(head, getattr(splits, args.split), threshold=args.threshold)
    print(res["report"])
    print(f"{args.dataset} {args.split}: micro-F1 {res['micro_f1']:.4f}  exact character match "
          f"{res['exact_char_match'] or 0:.4f} (n={res['n']})")
    if args.json:
        _write_json(args.json, {"dataset": args.dataset, "split": args.split, "head": str(args.head or "default"),
                                **res})
    return 0


def _add_head_commands(sub) -> None:
    """``train-intents``, ``train-entities`` and the ``intents`` / ``entities`` targets of ``eval``."""
    def training_flags(sp, kind: str) -> None:
        sp.add_argument("--dataset", required=True,
                        help="shop, bitext_customer_support, banking77, clinc150 or a CSV/JSONL file"
                        if kind == "intent" else "bitext_customer_support or a JSONL file of texts with spans")
        sp.add_argument("--validation", type=Path, help="validation file (default: a 10%% split)")
        sp.add_argument("--test", type=Path, help="test file (default: a 10%% split for files)")
        sp.add_argument("--out", type=Path, help="head folder to write (default var/heads/<kind>-<dataset>)")
        sp.add_argument("--json", type=Path, help="also write the metrics as JSON here")
        sp.add_argument("--no-test", action="store_true", help="skip the test-split evaluation")
        sp.add_argument("--base-model", help="encoder: embedded:all-minilm-l6-v2 (default), folder or HF id")
        sp.add_argument("--method", choices=["lora", "full"])
        sp.add_argument("--epochs", type=float)
        sp.add_argument("--learning-rate", type=float)
        sp.add_argument("--batch-size", type=int)
        sp.add_argument("--max-length", type=int)
        sp.add_argument("--lora-r", type=int)
        sp.add_argument("--lora-alpha", type=int)
        sp.add_argument("--label-smoothing", type=float)
        sp.add_argument("--max-steps", type=int)
        sp.add_argument("--seed", type=int)
        sp.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy shared CPU)")

    sp = sub.add_parser("train-intents", help="fine-tune an intent head (calibrated, with an out-of-scope threshold)")
    training_flags(sp, "intent")
    sp.add_argument("--text-field", default="text")
    sp.add_argument("--label-field", default="label")
    sp.add_argument("--oos-label", help="the out-of-scope label of a file dataset")
    sp.add_argument("--labels", help="allowed labels of a file dataset: comma-separated, or a file with one per "
                    "line; a row with another label is an error naming the row")
    sp.add_argument("--target-in-scope-accuracy", type=float,
                    help="in-scope accuracy the out-of-scope threshold keeps on validation (default 0.95)")
    sp.set_defaults(func=cmd_train_intents)

    sp = sub.add_parser("train-entities", help="fine-tune an entity (slot) head from character spans")
    training_flags(sp, "entity")
    sp.set_defaults(func=cmd_train_entities)

    ev = sub.choices.get("eval")
    if ev is None:
        ev = sub.add_parser("eval", help="evaluate a component")
        ev.add_subparsers(dest="target", required=True)
    targets = next(a for a in ev._actions if isinstance(a, argparse._SubParsersAction))
    for kind in ("intents", "entities"):
        noun = {"intents": "intent", "entities": "entity"}[kind]
        sp = targets.add_parser(kind, help=f"evaluate the {noun} head: per-label report and JSON")
        sp.add_argument("--dataset", required=True)
        sp.add_argument("--split", choices=["train", "validation", "test"], default="test")
        sp.add_argument("--head", type=Path, help="head folder (default: the configured one)")
        sp.add_argument("--json", type=Path, help="write the results as JSON here")
        sp.add_argument("--threshold", type=float, help="override the head's threshold")
        if kind == "intents":
            sp.add_argument("--text-field", default="text")
            sp.add_argument("--label-field", default="label")
        sp.set_defaults(func=cmd_eval_intents if kind == "intents" else cmd_eval_entities)


# --- retrieval evaluation (issue #3): eval retrieval


def cmd_eval_retrieval(args) -> int:
    """Score dense, BM25 and hybrid retrieval on a labelled dataset: a table on stdout, optionally JSON."""
    import json

    from chatbot.options import search_options
    from retrieval.evaluate import format_table, load_dstc11_track5, load_jsonl, run_eval
    from retrieval.loaders import load_paths

    s = _settings()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        if args.dataset == "dstc11_track5":
            root = Path(args.data_root) / "dstc11_track5" if args.data_root else None
            evalset = load_dstc11_track5(root, with_context=args.with_context, context_turns=args.context_turns)
            index_dir = args.index_dir or s.data_dir / "eval" / "dstc11_track5"
        else:
            path = Path(args.dataset)
            if not path.is_file():
                raise FileNotFoundError(f"--dataset must be dstc11_track5 or a JSONL file, got {args.dataset!r}")
            evalset = load_jsonl(path)
            index_dir = args.index_dir or s.index_dir
            if args.docs:
                evalset.documents, skipped = load_paths(args.docs, show_progress=True)
                for sk in skipped:
                    print(f"skipped {sk.path}: {sk.reason}")
                index_dir = args.index_dir or s.data_dir / "eval" / path.stem
        if args.limit:
            evalset.queries = evalset.queries[: args.limit]
        res = run_eval(evalset, _embedder(s), Path(index_dir), search_options(s), modes, chunk_tokens=s.chunk_tokens,
                       chunk_overlap=s.chunk_overlap, show_progress=True)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ctx = " with context" if res["info"].get("with_context") else ""
    print(f"{res['dataset']}{ctx}: {res['queries']} queries over {res['chunks']} chunks "
          f"({res['index']['kind']} index {res['index_version']} at {res['index_dir']})")
    print(format_table(res["results"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


def _eval_targets(sub) -> argparse._SubParsersAction:
    """The sub-targets of ``chatbot eval`` (``retrieval``, ...); created once, shared by every target."""
    ev = sub.choices.get("eval")
    if ev is None:
        ev = sub.add_parser("eval", help="evaluate a component (retrieval, ...)")
        ev.add_subparsers(dest="target", required=True, metavar="TARGET")
    return next(a for a in ev._actions if isinstance(a, argparse._SubParsersAction))


# --- answer evaluation (issue #11): eval answers


def cmd_eval_answers(args) -> int:
    """Run a question set through the real turn pipeline and score the replies (table, per-row report, JSON)."""
    import asyncio
    import hashlib
    import json
    import tempfile

    from tqdm import tqdm

    from chatbot.answer_eval import format_rows, format_summary, load_answer_set, report, run_answer_eval, summarize
    from chatbot.service import Assistant
    from retrieval.ingest import ingest

    s = _settings(engine=args.engine)
    cases = load_answer_set(args.dataset)
    if args.limit:
        cases = cases[: args.limit]
    index_dir = None
    if args.docs:  # the set's own document collection, indexed once under data_dir/eval/answers-<hash>
        key = hashlib.sha1("\n".join(str(Path(d).resolve()) for d in args.docs).encode()).hexdigest()[:10]
        index_dir = args.index_dir or s.data_dir / "eval" / f"answers-{key}" / "index"
        try:
            rep = ingest(args.docs, index_dir, _embedder(s), s.chunk_tokens, s.chunk_overlap, sync=True,
                         index_options=_index_options(s))
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: --docs: {exc}", file=sys.stderr)
            return 2
        print(rep.summary(), flush=True)
    modes = args.mode or [s.answer_mode]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:  # the evaluation's conversations stay out of the log
        base = Assistant.from_settings(s, index_dir, f"sqlite:///{Path(tmp) / 'eval.db'}")

        async def go() -> None:
            await base.engine.start()
            try:
                for mode in modes:
                    a = Assistant(s.model_copy(update={"answer_mode": mode}), base.engine, base.retriever,
                                  base.store, base.metrics, base.router)
                    await a.adapters.sync(a.engine)
                    bar = tqdm(total=len(cases), desc=f"eval answers ({mode})", unit="q")
                    rows = await run_answer_eval(a, cases, args.concurrency, lambda _r: bar.update())
                    bar.close()
                    runs.append((mode, summarize(rows), rows))
            finally:
                await base.engine.close()

        asyncio.run(go())
        base.store.close()
    if not args.quiet:
        for mode, _, rows in runs:
            print(f"\n## {mode}\n{format_rows(rows)}")
    info = base.engine.info
    print(f"\n{args.dataset}: {len(cases)} questions; engine {info.name}, model {info.model}, "
          f"adapter {info.adapter_version or 'none'}")
    print(format_summary([(m, summ) for m, summ, _ in runs]))
    if args.json:
        out = report(Path(args.dataset), runs, {
            "engine": info.name, "model": info.model, "adapter": info.adapter_version,
            "index_version": base.retriever.version if base.retriever is not None else None,
            "docs_sha256": _docs_hash(args.docs) if args.docs else None,
            "settings": {k: getattr(s, k) for k in (
                "top_k", "min_score", "retrieval_mode", "verify_min_overlap", "extractive_min_score",
                "extractive_max_units", "extractive_on_topic", "prompt_max_units", "max_new_tokens", "temperature",
                "route_grounded_min_score", "routing")},
            "docs": [str(d) for d in args.docs or []],
        })
        _write_json(args.json, out)
    return 0


def _docs_hash(paths) -> str:
    """SHA-256 over the files under ``paths`` (relative name and content hash, sorted)."""
    import hashlib

    from finetune.data import sha256_file

    files = sorted(f for p in paths for f in ([Path(p)] if Path(p).is_file() else Path(p).rglob("*")) if f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _add_eval_answers(sub) -> None:
    sp = _eval_targets(sub).add_parser(
        "answers", help="correct, fact recall, K-Precision, unsupported claims, abstention, clarify rate, latency")
    sp.add_argument("--dataset", required=True, type=Path,
                    help='JSONL of {"id", "query", "history", "gold", "facts", "answerable"} (see data/eval/)')
    sp.add_argument("--mode", nargs="+", choices=["verified", "generate", "extractive"],
                    help="answer modes to run, one table row each (default: the running setting)")
    sp.add_argument("--docs", nargs="+", type=Path,
                    help="documents of the set (indexed for it); default: the published index")
    sp.add_argument("--index-dir", type=Path, help="index folder for --docs (default var/eval/answers-<hash>)")
    sp.add_argument("--engine", choices=["auto", "vllm", "transformers"], default=None)
    sp.add_argument("--concurrency", type=int, default=8, help="conversations at once")
    sp.add_argument("--limit", type=int, help="only the first N rows")
    sp.add_argument("--quiet", action="store_true", help="no per-row report")
    sp.add_argument("--json", type=Path, help="write the report (dataset hash, settings, rows) here")
    sp.set_defaults(func=cmd_eval_answers)


def _add_eval_retrieval(sub) -> None:
    sp = _eval_targets(sub).add_parser(
        "retrieval", help="recall@1/5/10 and MRR of dense, BM25 and hybrid retrieval on a labelled set"
    )
    sp.add_argument("--dataset", required=True,
                    help="dstc11_track5, or a JSONL file of {\"query\": ..., \"gold\": [doc ids]} lines")
    sp.add_argument("--with-context", action="store_true",
                    help="dstc11_track5: append earlier dialogue turns to the last user turn")
    sp.add_argument("--context-turns", type=int, default=4, help="earlier turns appended with --with-context")
    sp.add_argument("--docs", nargs="+", type=Path,
                    help="JSONL dataset: files/folders to index for it (default: search the published index)")
    sp.add_argument("--modes", default="dense,bm25,hybrid", help="comma-separated: dense, bm25, hybrid")
    sp.add_argument("--index-dir", type=Path, help="index folder for the corpus (default var/eval/<dataset>)")
    sp.add_argument("--data-root", type=Path, help="folder holding dstc11_track5/ (default ../shared/data)")
    sp.add_argument("--limit", type=int, help="evaluate only the first N queries")
    sp.add_argument("--json", type=Path, help="write the results as JSON here")
    sp.set_defaults(func=cmd_eval_retrieval)


# --- LoRA fine-tuning of the chat model (issue #5): train, adapters list|eval|promote|rollback|merge|export-int8


def cmd_train(args) -> int:
    """LoRA SFT of the chat model on dialogues; writes the adapter folder with its metrics."""
    from chatbot.operations import export_conversation_log
    from finetune.sft import SFTConfig, train_sft

    s = _settings()
    cfg = {"base_model": args.base_model or s.model, "min_steps": s.train_min_steps,
           "min_examples": s.train_min_examples, "small_data_threshold": s.train_small_data_threshold,
           "max_eval_samples": s.train_eval_samples, "eval_replies": s.train_eval_replies,
           "eval_max_new_tokens": s.train_eval_max_new_tokens}
    for name in ("method", "epochs", "max_steps", "min_steps", "min_examples", "small_data_threshold", "batch_size",
                 "grad_accum", "learning_rate", "max_length", "truncation", "lora_r", "lora_alpha", "lora_dropout",
                 "eval_steps", "save_steps", "logging_steps", "early_stopping_patience", "precision", "seed", "validation", "test", "eval_replies",
                 "eval_max_new_tokens", "eval_batch_size", "max_eval_samples", "system_prompt", "threads"):
        v = getattr(args, name, None)
        if v is not None:
            cfg[name] = v
    cfg["gradient_checkpointing"] = args.gradient_checkpointing
    cfg["keep_checkpoints"] = args.keep_checkpoints
    data = export_conversation_log(args.data, s)  # `store` / `store:approved`: the conversation log as a file
    res = train_sft(data, args.out, SFTConfig(**cfg), resume=not args.no_resume, cache_dir=s.cache_dir,
                    name=args.name)
    if not res.is_main_process:
        return 0
    m = res.manifest
    print(_adapter_table([("base", m["base_metrics"] or {}), (m["version"], m["metrics"])]))
    print(m.get("summary") or "")
    print(f"saved adapter {m['version']} to {res.out_dir}")
    if args.json:
        _write_json(args.json, m)
    return 0


def _adapter_table(rows) -> str:
    def f(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    lines = [f"{'model':<44} {'val loss':>9} {'ppl':>9} {'ROUGE-L':>8} {'self-stop':>9} {'n':>4}"]
    for name, m in rows:
        lines.append(f"{name:<44} {f(m.get('val_loss')):>9} {f(m.get('perplexity'), '.2f'):>9} "
                     f"{f(m.get('rouge_l')):>8} {f(m.get('self_stop_rate'), '.3f'):>9} {m.get('test_n') or '-':>4}")
    return "\n".join(lines)


def cmd_adapters_list(args) -> int:
    """List the adapters in the registry (the live one marked with *), each non-live one compared with the live
    model (the live adapter, or the base model) on its held-out dialogues where that comparison exists."""
    from chatbot.operations import adapter_options
    from finetune.adapters.gate import compare_with_live
    from finetune.adapters.registry import list_adapters

    s = _settings()
    opts = adapter_options(s)
    rows = list_adapters(opts)
    if not rows:
        print(f"no adapters in {s.resolved_adapters_dir}")
        return 0
    print(f"  {'name':<24} {'version':<44} {'val loss':>9} {'ROUGE-L':>8} {'self-stop':>9}  base")
    for a in rows:
        m = a.metrics
        vl, rl, ss = m.get("val_loss"), m.get("rouge_l"), m.get("self_stop_rate")
        print(f"{'*' if a.live else ' '} {a.name:<24} {a.version:<44} "
              f"{'-' if vl is None else f'{vl:.4f}':>9} {'-' if rl is None else f'{rl:.4f}':>8} "
              f"{'-' if ss is None else f'{ss:.3f}':>9}  {a.base_sha256[:12]}")
    live = next((a.version for a in rows if a.live), None)
    print(f"\nlive: {live or 'none (base model)'}")
    for a in rows:
        if a.live or not any(a.metrics.get(k) is not None for k in ("val_loss", "rouge_l", "self_stop_rate")):
            continue
        try:
            cmp = compare_with_live(a.path, opts, evaluate=False)
        except ChatbotError as exc:
            print(f"\n{a.version}: cannot compare: {exc}")
            continue
        print(f"\n{a.version} beside the live model:")
        for line in cmp["sentences"]:
            print(f"  {line}")
    return 0


def cmd_adapters_eval(args) -> int:
    """Evaluate an adapter (and the base model) on its own held-out split or on other data, beside the live
    adapter when one is live (same dialogues)."""
    from chatbot.operations import adapter_options, export_conversation_log
    from finetune.adapters.evaluation import evaluate_adapter
    from finetune.adapters.gate import compare_with_live

    s = _settings()
    opts = adapter_options(s)
    data = export_conversation_log(args.data, s) if args.data else None
    res = evaluate_adapter(args.name, opts, data=data, max_samples=args.max_samples,
                           with_base=not args.no_base)
    rows = [("base", res["base"])] if res.get("base") else []
    cmp = None
    if not args.data:
        cmp = compare_with_live(args.name, opts)
        if cmp["reference"] not in ("base", res["version"]) and cmp["reference_metrics"]:
            rows.append((f"{cmp['reference']} (live)", cmp["reference_metrics"]))
    print(_adapter_table(rows + [(res["version"], res["adapter"])]))
    if cmp is not None:
        print()
        for line in cmp["sentences"]:
            print(line)
    if args.json:
        _write_json(args.json, {**res, "compare_with_live": cmp})
    return 0


def _served_status(url: str) -> str:
    """What the server at ``url`` serves (its ``/healthz`` ``adapter`` field), as a sentence."""
    import httpx

    try:
        r = httpx.get(url.rstrip("/") + "/healthz", timeout=5.0)
        st = r.json().get("adapter") or {}
    except Exception as exc:
        return f"no server answered at {url} ({type(exc).__name__}); a server applies LIVE.json before its next reply"
    served, live = st.get("served") or "none (base model)", st.get("live") or "none (base model)"
    if st.get("in_sync"):
        return f"server {url}: live and served: {served}"
    return f"server {url}: {live} is live, not yet served (serving {served}): {st.get('reason')}"


def cmd_adapters_promote(args) -> int:
    """Make an adapter live if it loads as the engine loads it, changes the model and passes the gate
    (metrics vs the live one on the same dialogues, same base model); then say what the server serves."""
    from chatbot.operations import adapter_options
    from finetune.adapters.gate import promote

    s = _settings()
    decision = promote(args.name, adapter_options(s), force=args.force, via="cli")
    for line in decision.sentences():
        print(line)
    print(f"live adapter is now {decision.candidate.version} (was {decision.previous or 'none (base model)'})")
    if not args.no_check:
        print(_served_status(args.url or f"http://{s.host}:{s.port}"))
    return 0


def cmd_adapters_rollback(args) -> int:
    """Make the previously live adapter live again (or no adapter); then say what the server serves."""
    from chatbot.operations import adapter_options
    from finetune.adapters.registry import rollback

    s = _settings()
    now = rollback(adapter_options(s), via="cli")
    print(f"live adapter is now {now.version if now else 'none (base model)'}")
    if not args.no_check:
        print(_served_status(args.url or f"http://{s.host}:{s.port}"))
    return 0


def cmd_adapters_status(args) -> int:
    """What LIVE.json names and what the running server serves; exit 1 when they differ."""
    import httpx

    s = _settings()
    url = args.url or f"http://{s.host}:{s.port}"
    line = _served_status(url)
    print(line)
    try:
        return 0 if (httpx.get(url.rstrip("/") + "/healthz", timeout=5.0).json().get("adapter") or {}).get(
            "in_sync") else 1
    except Exception:
        return 1


def cmd_adapters_history(args) -> int:
    """The audit log of promotions and rollbacks (who, when, from which version to which, the gate)."""
    from chatbot.operations import adapter_options
    from finetune.adapters.registry import audit_sentence, read_audit

    entries = read_audit(adapter_options(_settings()))
    if not entries:
        print("no promotions or rollbacks recorded")
    for e in entries:
        print(audit_sentence(e))
    return 0


def cmd_adapters_merge(args) -> int:
    """Write the base model with the adapter merged in, as a full checkpoint."""
    from chatbot.operations import adapter_options
    from finetune.adapters.export import merge_adapter

    out = merge_adapter(args.name, args.out, adapter_options(_settings()))
    print(f"wrote merged checkpoint to {out}")
    return 0


def cmd_adapters_export_int8(args) -> int:
    """Write an int8 (dynamic quantization) CPU checkpoint; optionally measure it against the unmerged model."""
    from chatbot.operations import adapter_options
    from finetune.adapters.export import export_int8

    report = export_int8(args.name, args.out, adapter_options(_settings()), measure=args.measure)
    if report.get("comparison"):
        c = report["comparison"]
        print(f"{'model':<12} {'val loss':>9} {'ROUGE-L':>8} {'self-stop':>9} {'tok/s':>8} {'size MB':>8}")
        for k in ("unmerged", "merged_fp32", "int8"):
            r = c[k]
            print(f"{k:<12} {r['val_loss']:>9.4f} {r['rouge_l']:>8.4f} {r['self_stop_rate']:>9.3f} "
                  f"{r['new_tokens_per_s']:>8.1f} {r['size_mb']:>8.1f}")
    print(f"wrote int8 checkpoint to {args.out}")
    return 0


def _add_finetune_commands(sub) -> None:
    """``train`` and ``adapters list|eval|promote|rollback|status|history|merge|export-int8``."""
    sp = sub.add_parser("train", help="LoRA fine-tune the chat model on dialogues (JSONL or a shared set)")
    sp.add_argument("--data", nargs="+", required=True,
                    help="JSONL files of {\"messages\": [...]}, bitext_customer_support, twitter_customer_care_docpred, "
                    "store (the conversation log) or store:approved (reviewer-approved replies only)")
    sp.add_argument("--out", type=Path, required=True, help="adapter folder to write (e.g. var/adapters/NAME)")
    sp.add_argument("--name", help="adapter name (default: the folder name)")
    sp.add_argument("--base-model", help="base chat model (default: the configured one)")
    sp.add_argument("--method", choices=["lora", "full"])
    sp.add_argument("--epochs", type=float)
    sp.add_argument("--max-steps", type=int)
    sp.add_argument("--min-steps", type=int, help="least optimizer steps when --max-steps is not given "
                    "(default: CHATBOT_TRAIN_MIN_STEPS)")
    sp.add_argument("--min-examples", type=int, help="refuse fewer training dialogues (default: "
                    "CHATBOT_TRAIN_MIN_EXAMPLES)")
    sp.add_argument("--small-data-threshold", type=int, help="fewer dialogues: all train, evaluation on the "
                    "fixed reference set (default: CHATBOT_TRAIN_SMALL_DATA_THRESHOLD; 0: always split)")
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    sp.add_argument("--learning-rate", type=float)
    sp.add_argument("--max-length", type=int, help="tokens per sample (longer: --truncation)")
    sp.add_argument("--truncation", choices=["turns", "drop"])
    sp.add_argument("--lora-r", type=int)
    sp.add_argument("--lora-alpha", type=int)
    sp.add_argument("--lora-dropout", type=float)
    sp.add_argument("--eval-steps", type=int, help="validation loss every N steps")
    sp.add_argument("--save-steps", type=int, help="checkpoint every N steps (a multiple of --eval-steps)")
    sp.add_argument("--logging-steps", type=int)
    sp.add_argument("--patience", dest="early_stopping_patience", type=int, help="early stopping patience (evals)")
    sp.add_argument("--precision", choices=["auto", "bf16", "fp32"])
    sp.add_argument("--gradient-checkpointing", action="store_true")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--validation", type=float, help="validation fraction (by conversation)")
    sp.add_argument("--test", type=float, help="test fraction (by conversation)")
    sp.add_argument("--eval-replies", type=int, help="test dialogues whose replies are generated and scored")
    sp.add_argument("--eval-max-new-tokens", type=int)
    sp.add_argument("--eval-batch-size", type=int)
    sp.add_argument("--max-eval-samples", type=int, help="validation samples scored during training")
    sp.add_argument("--system-prompt", help="system message for dialogues without one")
    sp.add_argument("--threads", type=int, help="torch CPU threads")
    sp.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    sp.add_argument("--keep-checkpoints", action="store_true")
    sp.add_argument("--json", type=Path, help="also write adapter.json here")
    sp.set_defaults(func=cmd_train)

    ad = sub.add_parser("adapters", help="list, evaluate, promote, roll back, merge or export chat adapters")
    asub = ad.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = asub.add_parser("list", help="adapters in the registry (* = live)")
    sp.set_defaults(func=cmd_adapters_list)
    sp = asub.add_parser("eval", help="validation loss, perplexity, ROUGE-L and self-stop rate of an adapter")
    sp.add_argument("name", help="adapter name in the registry, or its folder")
    sp.add_argument("--data", nargs="+", help="evaluate on these dialogues instead of the adapter's test split")
    sp.add_argument("--max-samples", type=int, help="replies to generate (default: as trained)")
    sp.add_argument("--no-base", action="store_true", help="skip the base model")
    sp.add_argument("--json", type=Path)
    sp.set_defaults(func=cmd_adapters_eval)
    sp = asub.add_parser("promote", help="make an adapter live (refused when worse than the live one)")
    sp.add_argument("name", help="adapter name in the registry, or its folder")
    sp.add_argument("--force", action="store_true",
                    help="skip the metric gate (never the base-model and load checks)")
    sp.add_argument("--url", help="server to ask what it serves afterwards (default: http://HOST:PORT of settings)")
    sp.add_argument("--no-check", action="store_true", help="do not ask the server what it serves")
    sp.set_defaults(func=cmd_adapters_promote)
    sp = asub.add_parser("rollback", help="make the previously live adapter live again")
    sp.add_argument("--url", help="server to ask what it serves afterwards (default: http://HOST:PORT of settings)")
    sp.add_argument("--no-check", action="store_true", help="do not ask the server what it serves")
    sp.set_defaults(func=cmd_adapters_rollback)
    sp = asub.add_parser("status", help="what LIVE.json names and what the running server serves (exit 1: differ)")
    sp.add_argument("--url", help="server (default: http://HOST:PORT of settings)")
    sp.set_defaults(func=cmd_adapters_status)
    sp = asub.add_parser("history", help="who promoted or rolled back what, when (the audit log)")
    sp.set_defaults(func=cmd_adapters_history)
    sp = asub.add_parser("merge", help="write base + adapter merged as a full checkpoint")
    sp.add_argument("name")
    sp.add_argument("--out", type=Path, required=True)
    sp.set_defaults(func=cmd_adapters_merge)
    sp = asub.add_parser("export-int8", help="merged int8 checkpoint for CPU serving, with a quality/speed report")
    sp.add_argument("name")
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--measure", type=int, default=0,
                    help="also compare unmerged / merged / int8 on N test dialogues (0: skip)")
    sp.set_defaults(func=cmd_adapters_export_int8)


# --- console users (issue #6): users add|passwd|list


def cmd_users(args) -> int:
    """Add a console user, change a password, or list the users (staff and operators)."""
    import getpass
    import os

    from chatbot.auth import Auth
    from chatbot.store import Store

    if args.action != "list" and not args.name:
        print(f"error: users {args.action} needs a user name", file=sys.stderr)
        return 2
    s = _settings()
    store = Store(s.resolved_database_url)
    try:
        if args.action == "list":
            for u in store.list_users():
                print(f"{u.username}\t{u.role}\t{'active' if u.active else 'inactive'}")
            return 0
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = os.environ.get("CHATBOT_NEW_USER_PASSWORD") or getpass.getpass(f"password for {args.name}: ")
        auth = Auth(store)
        if args.action == "add":
            u = auth.add_user(args.name, password, args.role)
            print(f"added {u.role} {u.username}")
        else:
            auth.set_password(args.name, password)
            print(f"changed the password of {args.name}")
        return 0
    finally:
        store.close()


def _add_user_commands(sub) -> None:
    """``users add|passwd|list``: console users (staff and operators)."""
    sp = sub.add_parser("users", help="console users: add, passwd, list")
    sp.add_argument("action", choices=["add", "passwd", "list"])
    sp.add_argument("name", nargs="?", help="user name (add, passwd)")
    sp.add_argument("--role", choices=["staff", "operator"], default="staff", help="role of a new user")
    sp.add_argument("--password-stdin", action="store_true",
                    help="read the password from the first line of stdin (else CHATBOT_NEW_USER_PASSWORD or a prompt)")
    sp.set_defaults(func=cmd_users)


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

    _add_eval_retrieval(sub)
    _add_eval_answers(sub)
    _add_head_commands(sub)
    _add_finetune_commands(sub)
    _add_user_commands(sub)
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
