"""Load check of the conversation log: N concurrent simulated customers x T turns through the HTTP API.

Every customer starts a conversation and continues it (``conversation_id``) for ``--turns``
turns, each message unique (``customer c turn t: ...``). Afterwards the store is read back
and every message must be there exactly once: per conversation T customer messages and T
replies, in order, no duplicates, nothing missing, no errors. A 429 is retried after its
``Retry-After`` (counted, not an error).

Printed: a table with the single-customer baseline (the same turns, one customer alone)
beside the loaded run, and the ratio; the storage counts. JSON goes to ``--json``.

    python bench/load.py --customers 64 --turns 10 --json bench/load.json          # starts its own server
    python bench/load.py --url http://127.0.0.1:7860 --database-url sqlite:///var/chatbot.db

Exit status 1 when a message is missing or duplicated or a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402  (after the path insert)

QUESTIONS = [
    "How do I return an item I bought?", "Where is my order?", "I forgot my password", "Can I get a refund?",
    "My promo code does not work", "How do I change my shipping address?", "What does membership give me?",
    "The shirt I got is the wrong colour", "How long does a refund take?", "Can I return a sale item?",
]


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _customer(client: httpx.AsyncClient, url: str, c: int, turns: int, max_tokens: int, stats: dict,
                    tag: str) -> tuple[str | None, list[str]]:
    cid, sent = None, []
    for t in range(turns):
        text = f"[{tag} customer {c} turn {t}] {QUESTIONS[(c + t) % len(QUESTIONS)]}"
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
        if cid:
            body["conversation_id"] = cid
        while True:
            t0 = time.perf_counter()
            try:
                r = await client.post(url + "/v1/chat/completions", json=body)
            except httpx.HTTPError as exc:
                stats["errors"].append(f"customer {c} turn {t}: {type(exc).__name__}: {exc}")
                return cid, sent
            if r.status_code == 429:
                stats["retries_429"] += 1
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                continue
            break
        stats["latency_s"].append(time.perf_counter() - t0)
        if r.status_code != 200:
            stats["errors"].append(f"customer {c} turn {t}: HTTP {r.status_code} {r.text[:200]}")
            return cid, sent
        cid = r.json()["conversation_id"]
        sent.append(text)
    return cid, sent


async def run_load(url: str, customers: int, turns: int, max_tokens: int, tag: str) -> dict:
    """Run the customers at once; return timings, errors and what each conversation should hold."""
    stats: dict = {"latency_s": [], "errors": [], "retries_429": 0}
    limits = httpx.Limits(max_connections=customers + 4, max_keepalive_connections=customers + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[_customer(client, url, c, turns, max_tokens, stats, tag)
                                         for c in range(customers)])
        wall = time.perf_counter() - t0
    return {"customers": customers, "turns": turns, "wall_s": wall, "conversations": results, **stats}


def check_storage(database_url: str, results: list[tuple[str | None, list[str]]]) -> dict:
    """Count what the store holds for the run's conversations against what was sent."""
    from chatbot.store import Store

    store = Store(database_url)
    try:
        expected = missing = duplicated = out_of_order = stored_user = stored_reply = 0
        for cid, sent in results:
            expected += 2 * len(sent)
            if cid is None:
                missing += 2 * len(sent)
                continue
            msgs = store.messages(cid)
            users = [m.text for m in msgs if m.role == "user"]
            replies = [m for m in msgs if m.role == "assistant"]
            stored_user += len(users)
            stored_reply += len(replies)
            counts = Counter(users)
            missing += sum(1 for s in sent if counts[s] == 0)
            duplicated += sum(n - 1 for n in counts.values() if n > 1)
            missing += max(0, len(sent) - len(replies))
            duplicated += max(0, len(replies) - len(sent))
            if [m.role for m in msgs] != ["user", "assistant"] * len(sent):
                out_of_order += 1
        return {"expected_messages": expected, "stored_user": stored_user, "stored_replies": stored_reply,
                "missing": missing, "duplicated": duplicated, "conversations_out_of_order": out_of_order,
                "integrity": store.integrity_check()}
    finally:
        store.close()


def summarize(run: dict) -> dict:
    lat = run["latency_s"]
    n = len(lat)
    return {"requests": n, "errors": len(run["errors"]), "retries_429": run["retries_429"],
            "wall_s": round(run["wall_s"], 2), "requests_per_s": round(n / run["wall_s"], 3) if run["wall_s"] else 0,
            "latency_p50_s": round(_pct(lat, 0.5), 3), "latency_p95_s": round(_pct(lat, 0.95), 3),
            "latency_max_s": round(max(lat), 3) if lat else float("nan"),
            "latency_mean_s": round(statistics.fmean(lat), 3) if lat else float("nan")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one on the transformers engine)")
    p.add_argument("--database-url", help="its store (needed with --url)")
    p.add_argument("--customers", type=int, default=64)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=8, help="reply length per turn (the store is what is tested)")
    p.add_argument("--baseline-turns", type=int, default=3, help="turns of the single-customer baseline (0: skip)")
    p.add_argument("--engine", default="transformers", help="engine of a server this script starts")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    server = None
    if args.url:
        if not args.database_url:
            p.error("--database-url is required with --url")
        url, db = args.url.rstrip("/"), args.database_url
    else:
        from chatbot.testing import start_server

        tmp = Path(tempfile.mkdtemp(prefix="chatbot-load-"))
        server = start_server(tmp, ROOT / "data" / "kb", args.engine)
        url, db = server.url, server.database_url
    try:
        tag = f"run-{int(time.time())}"
        base = None
        if args.baseline_turns:
            base = summarize(asyncio.run(run_load(url, 1, args.baseline_turns, args.max_tokens, tag + "-base")))
        run = asyncio.run(run_load(url, args.customers, args.turns, args.max_tokens, tag))
        loaded = summarize(run)
        storage = check_storage(db, run["conversations"])
    finally:
        if server is not None:
            from chatbot.testing import stop_server

            stop_server(server)

    rows = [("requests", "requests"), ("errors", "errors"), ("429 retries", "retries_429"),
            ("requests/s", "requests_per_s"), ("latency p50 s", "latency_p50_s"),
            ("latency p95 s", "latency_p95_s"), ("latency max s", "latency_max_s")]
    print(f"{args.customers} customers x {args.turns} turns, max_tokens {args.max_tokens}, {url}")
    print(f"{'':<16}{'1 customer':>14}{f'{args.customers} customers':>16}{'ratio':>9}")
    for label, key in rows:
        b = base.get(key) if base else None
        v = loaded[key]
        ratio = f"{v / b:.2f}" if isinstance(b, (int, float)) and b and isinstance(v, (int, float)) else "-"
        print(f"{label:<16}{'-' if b is None else b:>14}{v:>16}{ratio:>9}")
    print(f"stored: {storage['stored_user']} customer messages + {storage['stored_replies']} replies of "
          f"{storage['expected_messages']} expected; missing {storage['missing']}, duplicated "
          f"{storage['duplicated']}, conversations out of order {storage['conversations_out_of_order']}; "
          f"integrity {storage['integrity']}")
    for e in run["errors"][:10]:
        print("error:", e)
    ok = (not run["errors"] and storage["missing"] == 0 and storage["duplicated"] == 0
          and storage["conversations_out_of_order"] == 0 and storage["integrity"] == "ok")
    result = {"customers": args.customers, "turns": args.turns, "max_tokens": args.max_tokens, "baseline": base,
              "loaded": loaded, "storage": storage, "errors": run["errors"], "ok": ok}
    if args.json:
        write_result(args.json, result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
