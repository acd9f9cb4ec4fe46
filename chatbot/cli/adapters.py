"""``train`` and ``adapters list|eval|promote|rollback|status|history|merge|pack|export-int8``: the chat model's LoRA
adapters."""

from __future__ import annotations

import argparse
from pathlib import Path

from chatbot.cli.common import settings, write_json
from chatbot.errors import ChatbotError


def cmd_train(args) -> int:
    """LoRA SFT of the chat model on dialogues; writes the adapter folder with its metrics."""
    from chatbot.operations import train_adapter

    overrides = {name: getattr(args, name, None) for name in (
        "base_model", "method", "epochs", "max_steps", "min_steps", "min_examples", "small_data_threshold",
        "batch_size", "grad_accum", "learning_rate", "max_length", "truncation", "lora_r", "lora_alpha",
        "lora_dropout", "eval_steps", "save_steps", "logging_steps", "early_stopping_patience", "precision", "seed",
        "validation", "test", "eval_replies", "eval_max_new_tokens", "eval_batch_size", "max_eval_samples",
        "system_prompt", "threads", "init_adapter")}
    overrides.update(gradient_checkpointing=args.gradient_checkpointing, keep_checkpoints=args.keep_checkpoints)
    # `store` / `store:approved` in --data: the conversation log, exported to a file first
    res = train_adapter(settings(), args.data, args.out, overrides, resume=not args.no_resume, name=args.name)
    if not res.is_main_process:
        return 0
    m = res.manifest
    print(_adapter_table([("base", m["base_metrics"] or {}), (m["version"], m["metrics"])]))
    print(m.get("summary") or "")
    print(f"saved adapter {m['version']} to {res.out_dir}")
    if args.json:
        write_json(args.json, m)
    return 0


def cmd_build_sft(args) -> int:
    """Build a retrieval-format SFT set (the service's prompt, passages, a cited reply or the abstention)."""
    from chatbot.config import PROJECT_ROOT
    from chatbot.grounded import GroundedOptions
    from chatbot.operations import build_grounded

    s = settings()
    exclude = [] if args.no_exclude else (args.exclude or [p for p in [PROJECT_ROOT / "data" / "eval"] if p.exists()])
    options = GroundedOptions(passages=args.passages or s.top_k, unanswerable=args.unanswerable,
                              validation=args.validation, seed=args.seed, reply=args.reply,
                              min_overlap=s.verify_min_overlap, verified_prompts=args.verified_prompts)
    m = build_grounded(s, args.out, dataset=args.dataset, qa=args.qa, docs=args.docs, from_store=args.from_store,
                       exclude=exclude, options=options, history_turns=args.history_turns, limit=args.limit,
                       layout=args.layout)
    c = m["counts"]
    excluded = ", ".join(f"{n} ({why})" for why, n in c["excluded"].items()) or "none"
    print(f"{c['cases']} cases; excluded {excluded}; gold passages did not fit the prompt: {c['no_fit']}; "
          f"no reply sentence in the gold passages: {c['no_supported_reply']}")
    if options.verified_prompts:
        print(f"verified-mode prompts: share {options.verified_prompts}; {c.get('verified_prompt_lost', 0)} cases "
              "kept whole passages (the cut passages lost every sentence of the reply)")
    if c["reply_sentences"]:
        r = c["reply_sentences"]
        print(f"reply sentences: {r.get('kept', 0)} kept as written, {r.get('dropped', 0)} dropped (not in the "
              f"gold passages), {r.get('quoted', 0)} gold passage sentences quoted for the others, "
              f"{r.get('rejected', 0)} failed the final check")
    for split in ("train", "heldout"):
        print(f"{split}: {c[split]['answerable']} answerable + {c[split]['unanswerable']} unanswerable examples "
              f"({m['files'][split]['path']}, sha256 {m['files'][split]['sha256'][:12]})")
    print(f"wrote {args.out}/manifest.json")
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
    from chatbot.operations import compare_adapter, list_adapters

    s = settings()
    rows = list_adapters(s)
    if not rows:
        print(f"no adapters in {s.resolved_adapters_dir}")
        return 0
    print(f"  {'name':<24} {'version':<44} {'val loss':>9} {'ROUGE-L':>8} {'self-stop':>9}  base")
    for a in rows:
        m = a["metrics"]
        vl, rl, ss = m.get("val_loss"), m.get("rouge_l"), m.get("self_stop_rate")
        print(f"{'*' if a['live'] else ' '} {a['name']:<24} {a['version']:<44} "
              f"{'-' if vl is None else f'{vl:.4f}':>9} {'-' if rl is None else f'{rl:.4f}':>8} "
              f"{'-' if ss is None else f'{ss:.3f}':>9}  {a['base']}")
    live = next((a["version"] for a in rows if a["live"]), None)
    print(f"\nlive: {live or 'none (base model)'}")
    for a in rows:
        if a["live"] or not any(a["metrics"].get(k) is not None for k in ("val_loss", "rouge_l", "self_stop_rate")):
            continue
        try:
            cmp = compare_adapter(s, a["version"], evaluate=False)
        except ChatbotError as exc:
            print(f"\n{a['version']}: cannot compare: {exc}")
            continue
        print(f"\n{a['version']} beside the live model:")
        for line in cmp["sentences"]:
            print(f"  {line}")
    return 0


def cmd_adapters_eval(args) -> int:
    """Evaluate an adapter (and the base model) on its own held-out split or on other data, beside the live
    adapter when one is live (same dialogues)."""
    from chatbot.operations import evaluate_adapter

    res = evaluate_adapter(settings(), args.name, data=args.data, max_samples=args.max_samples,
                           with_base=not args.no_base)
    rows = [("base", res["base"])] if res.get("base") else []
    cmp = res["compare_with_live"]
    if cmp is not None and cmp["reference"] not in ("base", res["version"]) and cmp["reference_metrics"]:
        rows.append((f"{cmp['reference']} (live)", cmp["reference_metrics"]))
    print(_adapter_table(rows + [(res["version"], res["adapter"])]))
    if cmp is not None:
        print()
        for line in cmp["sentences"]:
            print(line)
    if args.json:
        write_json(args.json, res)
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
    from chatbot.operations import promote_adapter

    s = settings()
    res = promote_adapter(s, args.name, force=args.force, via="cli", judge_answers=args.judge_answers)
    for line in res["sentences"]:
        print(line)
    if res.get("answer_gate"):
        print(res["answer_gate"]["table"])
    print(f"live adapter is now {res['live']} (was {res['previous'] or 'none (base model)'})")
    if not args.no_check:
        print(_served_status(args.url or f"http://{s.host}:{s.port}"))
    return 0


def cmd_adapters_rollback(args) -> int:
    """Make the previously live adapter live again (or no adapter); then say what the server serves."""
    from chatbot.operations import rollback_adapter

    s = settings()
    now = rollback_adapter(s, via="cli")["live"]
    print(f"live adapter is now {now or 'none (base model)'}")
    if not args.no_check:
        print(_served_status(args.url or f"http://{s.host}:{s.port}"))
    return 0


def cmd_adapters_status(args) -> int:
    """What LIVE.json names and what the running server serves; exit 1 when they differ."""
    import httpx

    s = settings()
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
    from chatbot.operations import adapter_history

    entries = adapter_history(settings())
    if not entries:
        print("no promotions or rollbacks recorded")
    for e in reversed(entries):  # oldest first, as the log is written
        print(e["sentence"])
    return 0


def cmd_adapters_pack(args) -> int:
    """Copy an adapter for shipping (weights in a smaller dtype, no checkpoints)."""
    from chatbot.operations import pack_adapter

    version = pack_adapter(settings(), args.name, args.out, args.dtype, args.as_name)
    print(f"packed {args.name} as {version} in {args.out}")
    return 0


def cmd_adapters_merge(args) -> int:
    """Write the base model with the adapter merged in, as a full checkpoint."""
    from chatbot.operations import merge_adapter

    out = merge_adapter(settings(), args.name, args.out)
    print(f"wrote merged checkpoint to {out}")
    return 0


def cmd_adapters_export_int8(args) -> int:
    """Write an int8 (dynamic quantization) CPU checkpoint; optionally measure it against the unmerged model."""
    from chatbot.operations import export_adapter_int8

    report = export_adapter_int8(settings(), args.name, args.out, measure=args.measure)
    if report.get("comparison"):
        c = report["comparison"]
        print(f"{'model':<12} {'val loss':>9} {'ROUGE-L':>8} {'self-stop':>9} {'tok/s':>8} {'size MB':>8}")
        for k in ("unmerged", "merged_fp32", "int8"):
            r = c[k]
            print(f"{k:<12} {r['val_loss']:>9.4f} {r['rouge_l']:>8.4f} {r['self_stop_rate']:>9.3f} "
                  f"{r['new_tokens_per_s']:>8.1f} {r['size_mb']:>8.1f}")
    print(f"wrote int8 checkpoint to {args.out}")
    return 0


def register(sub, eval_targets) -> None:
    """Add ``train`` and ``adapters ...``."""
    sp = sub.add_parser("train", help="LoRA fine-tune the chat model on dialogues (JSONL or a shared set)")
    sp.add_argument("--data", nargs="+", required=True,
                    help="JSONL files of {\"messages\": [...]}, bitext_customer_support, twitter_customer_care_docpred, "
                    "store (the conversation log) or store:approved (reviewer-approved replies only)")
    sp.add_argument("--out", type=Path, required=True, help="adapter folder to write (e.g. var/adapters/NAME)")
    sp.add_argument("--name", help="adapter name (default: the folder name)")
    sp.add_argument("--base-model", help="base chat model (default: the configured one)")
    sp.add_argument("--method", choices=["lora", "full"])
    sp.add_argument("--init-adapter", metavar="ADAPTER", help="start from this LoRA adapter's weights (a registered "
                    "name, version or folder) instead of a fresh LoRA: continue training it on new data; its rank "
                    "and target modules are kept")
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

    sp = sub.add_parser("build-sft", help="build a retrieval-format SFT set: the service's prompt with gold passages "
                        "among retrieved distractors and a cited reply, or without them and the abstention")
    sp.add_argument("--grounded", action="store_true", required=True,
                    help="retrieval-format examples (the only kind so far)")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["dstc11_track5"], help="a shared set with gold passages and replies")
    src.add_argument("--qa", type=Path, help='JSONL of {"id", "question", "reply", "gold": [doc ids], "history"?}')
    src.add_argument("--from-store", action="store_true", help="the conversation log's reviewer-approved replies "
                     "with the passages they cited (distractors from the published index)")
    sp.add_argument("--docs", nargs="+", type=Path, help="with --qa: the documents the replies come from")
    sp.add_argument("--layout", choices=["snippets", "documents"], default="documents",
                    help="with --dataset: its knowledge as one document per entity, chunked as the service chunks "
                    "(default: passages hold several answers, as a help centre's do), or each FAQ / review "
                    "sentence as its own passage")
    sp.add_argument("--out", type=Path, required=True, help="folder for train.jsonl, heldout.jsonl, manifest.json")
    sp.add_argument("--passages", type=int, help="passages per prompt (default: CHATBOT_TOP_K)")
    sp.add_argument("--unanswerable", type=float, default=0.1, help="share of cases that also give an "
                    "unanswerable example (gold removed, the abstention)")
    sp.add_argument("--reply", choices=["supported", "reference"], default="supported",
                    help="supported (default): the reference reply's sentences the verifier supports, the gold "
                    "passage sentences quoted for the others (what verified mode would show); reference: the "
                    "reference reply as written, cited")
    sp.add_argument("--verified-prompts", type=float, default=0.0, help="share of cases whose examples carry the "
                    "verified mode's prompt (passages cut to the question's CHATBOT_PROMPT_MAX_UNITS most relevant "
                    "sentences, as the service sends them in that mode); the rest whole passages (generate mode)")
    sp.add_argument("--validation", type=float, default=0.1, help="share of cases held out (by case id)")
    sp.add_argument("--history-turns", type=int, default=0, help="earlier turns kept in the prompt (training "
                    "learns every assistant turn, so 0 keeps the loss on the grounded reply)")
    sp.add_argument("--seed", type=int, default=13)
    sp.add_argument("--limit", type=int, help="only the first N cases")
    sp.add_argument("--exclude", nargs="+", type=Path, help="dev sets never to train on: their questions "
                    "(*.jsonl) and documents (*.md, *.txt, *.html); default data/eval")
    sp.add_argument("--no-exclude", action="store_true", help="exclude nothing")
    sp.set_defaults(func=cmd_build_sft)

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
                    help="promote although the metric or the answer gate refuses (logged; never skips the base-model "
                    "and load checks)")
    sp.add_argument("--judge-answers", action=argparse.BooleanOptionalAction, default=None,
                    help="run the answer gate first: the candidate and the live model answer "
                    "CHATBOT_ADAPTER_GATE_ANSWERS_DATASET (default: CHATBOT_ADAPTER_GATE_ANSWERS)")
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
    sp = asub.add_parser("pack", help="copy an adapter for shipping: weights in a smaller dtype, no checkpoints")
    sp.add_argument("name")
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    sp.add_argument("--as", dest="as_name", metavar="NAME", help="ship it under this name (default: its own)")
    sp.set_defaults(func=cmd_adapters_pack)
    sp = asub.add_parser("export-int8", help="merged int8 checkpoint for CPU serving, with a quality/speed report")
    sp.add_argument("name")
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--measure", type=int, default=0,
                    help="also compare unmerged / merged / int8 on N test dialogues (0: skip)")
    sp.set_defaults(func=cmd_adapters_export_int8)