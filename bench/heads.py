"""Latency and throughput of the routing heads on this CPU.

Measures, for the intent head, the entity head and the whole router (both heads +
policy): p50 / p95 latency of one message at a time (ms), and throughput at batch 64
(messages / s). The baseline is the out-of-the-box way to serve the same fine-tuned
weights: a transformers ``pipeline`` (``text-classification`` /
``token-classification`` with ``aggregation_strategy="simple"``). The target from
issue #4 is p95 <= 15 ms per message.

Usage::

    python bench/heads.py [--intent data/heads/intent] [--entity data/heads/entity]
                          [--n 300] [--threads N] [--json var/bench/heads.json]

Messages are the Bitext test split (the shipped heads never trained on it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402  (after the path insert)

TARGET_P95_MS = 15.0


def _latencies(fn, texts, warmup: int = 10) -> np.ndarray:
    for t in texts[:warmup]:
        fn([t])
    out = []
    for t in texts:
        t0 = time.perf_counter()
        fn([t])
        out.append((time.perf_counter() - t0) * 1000.0)
    return np.array(out)


def _throughput(fn, texts, batch: int = 64, rounds: int = 3) -> float:
    fn(texts[:batch])
    n, t0 = 0, time.perf_counter()
    for _ in range(rounds):
        for s in range(0, len(texts) - batch + 1, batch):
            fn(texts[s : s + batch])
            n += batch
    return n / (time.perf_counter() - t0)


def _measure(fn, texts) -> dict:
    lat = _latencies(fn, texts)
    return {
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "mean_ms": float(lat.mean()),
        "batch64_msgs_per_s": _throughput(fn, texts),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--intent", type=Path, default=ROOT / "data" / "heads" / "intent")
    p.add_argument("--entity", type=Path, default=ROOT / "data" / "heads" / "entity")
    p.add_argument("--n", type=int, default=300, help="messages timed one by one")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", type=Path, default=ROOT / "var" / "bench" / "heads.json")
    p.add_argument("--no-baseline", action="store_true")
    args = p.parse_args(argv)

    import torch
    from transformers import pipeline

    from chatbot.router import Router, RoutingPolicy
    from finetune.heads import EntityHead, IntentHead
    from finetune.intent_data import load_bitext_intents

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = [t for t, _ in load_bitext_intents().test][: args.n]
    while len(texts) < 192:
        texts = texts + texts
    ih, eh = IntentHead.load(args.intent), EntityHead.load(args.entity)
    router = Router(RoutingPolicy.from_file(ROOT / "data" / "routing.yaml"), ih, eh)

    rows: dict[str, dict] = {}
    rows["intent"] = {"ours": _measure(lambda b: ih.predict(b, batch_size=64), texts)}
    rows["entity"] = {"ours": _measure(lambda b: eh.predict(b, batch_size=64), texts)}
    rows["router (both heads)"] = {"ours": _measure(lambda b: router.route_batch(b), texts)}
    if not args.no_baseline:
        clf = pipeline("text-classification", model=ih.model, tokenizer=ih.tokenizer, device=-1)
        tok = pipeline("token-classification", model=eh.model, tokenizer=eh.tokenizer, device=-1,
                       aggregation_strategy="simple")
        rows["intent"]["baseline"] = _measure(lambda b: clf(b, batch_size=64, truncation=True), texts)
        rows["entity"]["baseline"] = _measure(lambda b: tok(b, batch_size=64), texts)
        rows["router (both heads)"]["baseline"] = _measure(
            lambda b: (clf(b, batch_size=64, truncation=True), tok(b, batch_size=64)), texts)

    line = "{:<22} {:<20} {:>10} {:>10} {:>8} {:>8}"
    print(f"threads: {torch.get_num_threads()}  messages: {len(texts)}  target p95 <= {TARGET_P95_MS} ms")
    print(line.format("component", "metric", "baseline", "ours", "ratio", "target"))
    for comp, r in rows.items():
        for metric, better in (("p50_ms", "lower"), ("p95_ms", "lower"), ("batch64_msgs_per_s", "higher")):
            ours = r["ours"][metric]
            base = r.get("baseline", {}).get(metric)
            ratio = "" if base is None else f"{(base / ours if better == 'lower' else ours / base):.2f}x"
            target = f"<={TARGET_P95_MS:g}" if metric == "p95_ms" else ""
            print(line.format(comp, metric, "" if base is None else f"{base:.2f}", f"{ours:.2f}", ratio, target))
    result = {
        "threads": torch.get_num_threads(),
        "n_messages": len(texts),
        "target_p95_ms": TARGET_P95_MS,
        "ratio": "baseline / ours for latency, ours / baseline for throughput (> 1 is better for ours)",
        "baseline": "transformers pipeline on the same merged weights",
        "results": rows,
        "intent_head": str(args.intent),
        "entity_head": str(args.entity),
    }
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
