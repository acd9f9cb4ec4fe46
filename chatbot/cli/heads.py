"""``train-intents``, ``train-entities`` and ``eval intents|entities``: the routing classification heads."""

from __future__ import annotations

from pathlib import Path

from chatbot.cli.common import settings, write_json


def _head_config(args, kind: str):
    from chatbot.operations import head_config

    return head_config(kind, {name: getattr(args, name, None) for name in (
        "base_model", "method", "epochs", "learning_rate", "batch_size", "max_length", "lora_r", "lora_alpha",
        "label_smoothing", "max_steps", "seed", "target_in_scope_accuracy", "threads")})


def _save(head, out: Path, noun: str, args) -> None:
    """Save a trained head to ``out``, say so, and with ``--json`` write its metrics and training record."""
    head.save(out)
    print(f"saved {noun} head to {out}")
    if args.json:
        write_json(args.json, {"head": str(out), "metrics": head.metrics, "training": head.training})


def cmd_train_intents(args) -> int:
    """Fine-tune an intent head, calibrate it, evaluate it on the test split and save it."""
    from chatbot.operations import head_report, load_splits, train_head

    allowed = None
    if args.labels:
        src = Path(args.labels)
        allowed = src.read_text().split() if src.is_file() else [x.strip() for x in args.labels.split(",")]
    splits = load_splits("intent", args.dataset, text_field=args.text_field, label_field=args.label_field,
                         validation=args.validation, test=args.test, oos_label=args.oos_label, labels=allowed)
    out = Path(args.out or f"var/heads/intent-{splits.name}")
    head = train_head("intent", splits, _head_config(args, "intent"))
    val = head.metrics["validation"]
    print(val["report"])
    print(f"validation accuracy {val['accuracy']:.4f}  temperature {head.temperature:.3f}  "
          f"threshold {head.threshold:.4f}")
    if splits.test and not args.no_test:
        test = head_report("intent", head, splits.test)
        head.metrics["test"] = test
        print(test["report"])
        line = f"test accuracy {test['accuracy']:.4f}"
        if test.get("oos_recall") is not None:
            line += (f"  in-scope accuracy {test['in_scope_accuracy']:.4f}  oos recall {test['oos_recall']:.4f}"
                     f"  oos precision {test['oos_precision'] or 0:.4f}")
        print(line)
    _save(head, out, "intent", args)
    return 0


def cmd_train_entities(args) -> int:
    """Fine-tune an entity (slot) head from character spans, evaluate on the test split and save it."""
    from chatbot.operations import head_report, load_splits, train_head

    splits = load_splits("entity", args.dataset, validation=args.validation, test=args.test)
    out = Path(args.out or f"var/heads/entity-{splits.name}")
    head = train_head("entity", splits, _head_config(args, "entity"))
    val = head.metrics["validation"]
    print(val["report"])
    print(f"validation micro-F1 {val['micro_f1']:.4f}  span threshold {head.threshold}")
    if splits.test and not args.no_test:
        test = head_report("entity", head, splits.test)
        head.metrics["test"] = test
        print(test["report"])
        print(f"test micro-F1 {test['micro_f1']:.4f}  exact character match {test['exact_char_match']:.4f}")
    _save(head, out, "entity", args)
    return 0


def cmd_eval_intents(args) -> int:
    """Evaluate an intent head on a split of a dataset: per-label report, OOS metrics, JSON."""
    from chatbot.operations import head_report, load_head, load_splits

    head = load_head("intent", args.head or settings().intent_head_dir)
    splits = load_splits("intent", args.dataset, text_field=args.text_field, label_field=args.label_field)
    res = head_report("intent", head, getattr(splits, args.split), threshold=args.threshold)
    print(res["report"])
    line = f"{args.dataset} {args.split}: accuracy {res['accuracy']:.4f} (n={res['n']})"
    if res.get("oos_recall") is not None or res.get("in_scope_accuracy") is not None:
        line += (f"  in-scope accuracy {res['in_scope_accuracy']:.4f}  oos recall {res['oos_recall'] or 0:.4f}"
                 f"  oos precision {res['oos_precision'] or 0:.4f}  threshold {res['threshold']:.4f}")
    print(line)
    if args.json:
        write_json(args.json, {"dataset": args.dataset, "split": args.split, "head": str(args.head or "default"),
                                **res})
    return 0


def cmd_eval_entities(args) -> int:
    """Evaluate an entity head on a split of a dataset (seqeval report, JSON)."""
    from chatbot.operations import head_report, load_head, load_splits

    head = load_head("entity", args.head or settings().entity_head_dir)
    splits = load_splits("entity", args.dataset)
    res = head_report("entity", head, getattr(splits, args.split), threshold=args.threshold)
    print(res["report"])
    print(f"{args.dataset} {args.split}: micro-F1 {res['micro_f1']:.4f}  exact character match "
          f"{res['exact_char_match'] or 0:.4f} (n={res['n']})")
    if args.json:
        write_json(args.json, {"dataset": args.dataset, "split": args.split, "head": str(args.head or "default"),
                                **res})
    return 0


def register(sub, eval_targets) -> None:
    """Add ``train-intents``, ``train-entities`` and the ``intents`` / ``entities`` targets of ``eval``."""
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

    for kind in ("intents", "entities"):
        noun = {"intents": "intent", "entities": "entity"}[kind]
        sp = eval_targets.add_parser(kind, help=f"evaluate the {noun} head: per-label report and JSON")
        sp.add_argument("--dataset", required=True)
        sp.add_argument("--split", choices=["train", "validation", "test"], default="test")
        sp.add_argument("--head", type=Path, help="head folder (default: the configured one)")
        sp.add_argument("--json", type=Path, help="write the results as JSON here")
        sp.add_argument("--threshold", type=float, help="override the head's threshold")
        if kind == "intents":
            sp.add_argument("--text-field", default="text")
            sp.add_argument("--label-field", default="label")
        sp.set_defaults(func=cmd_eval_intents if kind == "intents" else cmd_eval_entities)