"""``ingest``, ``render-kb`` and ``eval retrieval``: the knowledge base and how well it is searched."""

from __future__ import annotations

from pathlib import Path

from chatbot.cli.common import settings, write_json


def cmd_ingest(args) -> int:
    """Ingest files and folders into the index (a new version is published when anything changed)."""
    from chatbot.operations import ingest_paths

    s = settings()
    report = ingest_paths(s, args.paths, sync=args.sync, show_progress=True)
    for sk in report.skipped:
        print(f"skipped {sk.path}: {sk.reason}")
    print(report.summary())
    return 0


def cmd_render_kb(args) -> int:
    """Render the ABCD policy guidelines into Markdown documents."""
    from chatbot.operations import render_guidelines

    paths = render_guidelines(args.source, args.out)
    print(f"wrote {len(paths)} documents to {args.out}")
    return 0


def cmd_eval_retrieval(args) -> int:
    """Score dense, BM25 and hybrid retrieval on a labelled dataset: a table on stdout, optionally JSON."""
    from chatbot.operations import evaluate_retrieval, retrieval_table

    res = evaluate_retrieval(settings(), args.dataset, [m.strip() for m in args.modes.split(",") if m.strip()],
                             docs=args.docs, index_dir=args.index_dir, data_root=args.data_root,
                             with_context=args.with_context, context_turns=args.context_turns, limit=args.limit)
    for line in res.pop("skipped"):
        print(f"skipped {line}")
    ctx = " with context" if res["info"].get("with_context") else ""
    print(f"{res['dataset']}{ctx}: {res['queries']} queries over {res['chunks']} chunks "
          f"({res['index']['kind']} index {res['index_version']} at {res['index_dir']})")
    print(retrieval_table(res["results"]))
    if args.json:
        write_json(args.json, res)
    return 0


def register(sub, eval_targets) -> None:
    """Add ``ingest``, ``render-kb`` and the ``retrieval`` target of ``eval``."""
    sp = sub.add_parser("ingest", help="ingest documents into the index")
    sp.add_argument("paths", nargs="+", type=Path, help="files or folders")
    sp.add_argument("--sync", action="store_true", help="also remove documents gone from these folders")
    sp.set_defaults(func=cmd_ingest)
    sp = sub.add_parser("render-kb", help="render the ABCD guidelines into Markdown documents")
    sp.add_argument("--source", default=str(Path(__file__).resolve().parents[3] / "shared/data/abcd"))
    sp.add_argument("--out", default="data/kb")
    sp.set_defaults(func=cmd_render_kb)

    sp = eval_targets.add_parser(
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