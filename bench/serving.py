"""Serving benchmark: N concurrent simulated customers against the HTTP API.

Systems, side by side, on the same questions and ``max_tokens``:
  (a) ``server-vllm``:   our server (retrieval, prompt, log) on the vLLM engine
  (b) ``server-hf``:     our server on the transformers engine (one reply at a time)
  (c) ``raw-vllm``:      vLLM's engine alone, in this process, on the same prompts (no HTTP, no RAG, no log)
  (d) ``server-vllm-lora``, ``server-vllm-merged``: (a) with the adapter ``--adapter`` live (made live by setup, as
      a fresh install does with the shipped one), served by vLLM LoRA or as its merged checkpoint
      (``CHATBOT_ADAPTER_SERVING``); the ratios to (a) are the cost of serving an adapter (issue 15: within 10%).

For each concurrency N (default 1 4 16 64) every customer arrives ``--stagger``
seconds after the previous one and asks ``--turns`` questions taken from the
Bitext customer-support set (streamed; TTFT is the first content chunk).

Answer modes (``--answer-modes``): each server system runs once per mode, named ``<system>/<mode>``:
``generate`` (the engine's raw reply), ``verified`` (each sentence checked against the passages,
whole chunks in the prompt) and ``verified-focused`` (verified, with only the ``--focus-units``
passage sentences closest to the question in the prompt: shorter prefill; the served default, 6
units). The latency ratios of each mode to ``generate`` are printed per N (issue #11's target: verified within 1.15x at N=16).

Printed: tokens/s, requests/s, TTFT p50/p95, latency p50/p95, failures, the CPU seconds
of this process during the run (servers: the HTTP client, on the same cores as the server;
raw-vllm: vLLM's front end, in this process), and the ratios a/b and a/c. Each system gets
one unmeasured warm-up request first. JSON results go to ``--json``.

    python bench/serving.py --concurrency 1 4 16 64 --max-tokens 64 --json bench/serving.json
    python bench/serving.py --systems server-vllm --answer-modes generate verified verified-focused \
        --concurrency 1 16 64 --json bench/serving-verified.json
    python bench/serving.py --systems server-vllm,server-vllm-lora,server-vllm-merged \
        --adapter data/adapters/grounded-dstc11 --concurrency 16 --json bench/serving-adapter.json

Engine settings for a tuning run apply to every system: ``--set ENABLE_LORA=false --set DTYPE=float32``
(``CHATBOT_<NAME>`` for the servers, the same Settings field for the raw engine).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402  (after the path insert)

BITEXT = ROOT.parent / "shared" / "data" / "bitext_customer_support" / "Bitext_Sample_Customer_Support_Training_Dataset.csv"
FALLBACK_QUESTIONS = [
    "How do I return an item I bought?", "I forgot my password", "My promo code does not work",
    "When will my order arrive?", "Can I change my shipping address?", "How do I get a refund?",
]


def load_questions(n: int, seed: int = 0) -> list[str]:
    """``n`` customer questions from the Bitext set (or a fixed list when it is absent)."""
    if BITEXT.exists():
        with open(BITEXT, newline="", encoding="utf-8") as f:
            rows = [r["instruction"] for r in csv.DictReader(f)]
    else:
        rows = FALLBACK_QUESTIONS
    rng = random.Random(seed)
    return [rng.choice(rows) for _ in range(n)]


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan when empty."""
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def summarize(records: list[dict], wall_s: float, client_cpu_s: float = float("nan")) -> dict:
    """Totals and percentiles of one run; ``client_cpu_s``: CPU seconds this (client) process used,
    taken from the same cores as the system under test."""
    ok = [r for r in records if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(records),
        "failures": len(records) - len(ok),
        "tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s else 0.0,
        "ttft_p50_s": pct([r["ttft"] for r in ok if r["ttft"] is not None], 50),
        "ttft_p95_s": pct([r["ttft"] for r in ok if r["ttft"] is not None], 95),
        "latency_p50_s": pct([r["latency"] for r in ok], 50),
        "latency_p95_s": pct([r["latency"] for r in ok], 95),
        "wall_s": wall_s,
        "tokens": tokens,
        "client_cpu_s": client_cpu_s,
    }


def measure(run) -> dict:
    """``run()`` -> (records, wall_s); summarized with the client's CPU time."""
    cpu0 = time.process_time()
    records, wall = run()
    return summarize(records, wall, time.process_time() - cpu0)


async def drive_http(url: str, questions: list[list[str]], max_tokens: int, stagger: float) -> tuple[list[dict], float]:
    """Each customer (a list of questions) streams its turns in order; returns per-request records and wall time."""
    import httpx

    records: list[dict] = []
    limits = httpx.Limits(max_connections=len(questions) + 4, max_keepalive_connections=len(questions) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def customer(i: int, turns: list[str]) -> None:
            await asyncio.sleep(i * stagger)
            conv = None
            for q in turns:
                body = {"messages": [{"role": "user", "content": q}], "stream": True, "max_tokens": max_tokens}
                if conv:
                    body["conversation_id"] = conv
                t0 = time.perf_counter()
                ttft, tokens, ok = None, 0, False
                try:
                    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        if r.status_code == 200:
                            async for line in r.aiter_lines():
                                if not line.startswith("data: ") or line == "data: [DONE]":
                                    continue
                                ev = json.loads(line[6:])
                                if "error" in ev:
                                    break
                                conv = ev.get("conversation_id", conv)
                                if ev["choices"][0]["delta"].get("content") and ttft is None:
                                    ttft = time.perf_counter() - t0
                                if ev.get("usage"):
                                    tokens = ev["usage"]["completion_tokens"]
                                    ok = True
                        else:
                            await r.aread()
                except httpx.HTTPError:
                    ok = False
                records.append({"ok": ok, "ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens})

        t0 = time.perf_counter()
        await asyncio.gather(*(customer(i, qs) for i, qs in enumerate(questions)))
        return records, time.perf_counter() - t0


async def drive_raw_vllm(engine, prompts: list[list], max_tokens: int, stagger: float) -> tuple[list[dict], float]:
    """The same load straight into the engine (prompts already built)."""
    from chatbot.engines.base import GenerationParams

    params = GenerationParams(max_tokens=max_tokens, repetition_penalty=1.1)
    records: list[dict] = []

    async def customer(i: int, turns: list) -> None:
        await asyncio.sleep(i * stagger)
        for j, msgs in enumerate(turns):
            t0 = time.perf_counter()
            ttft, tokens = None, 0
            async for c in engine.stream(msgs, params, f"raw-{i}-{j}-{time.time_ns()}"):
                if c.text and ttft is None:
                    ttft = time.perf_counter() - t0
                tokens = c.completion_tokens
            records.append({"ok": True, "ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens})

    t0 = time.perf_counter()
    await asyncio.gather(*(customer(i, t) for i, t in enumerate(prompts)))
    return records, time.perf_counter() - t0


def build_prompts(questions: list[list[str]], kb: Path, data_dir: Path) -> list[list]:
    """The prompts our server would build (retrieval + system prompt), for the raw-engine run."""
    from chatbot.assets import resolve_chat_model, resolve_embedder
    from chatbot.config import Settings
    from chatbot.prompts import build_prompt
    from retrieval.embedder import Embedder
    from retrieval.ingest import ingest
    from retrieval.retriever import Retriever
    from transformers import AutoTokenizer

    from chatbot.engines.base import render_chat

    s = Settings(data_dir=data_dir)
    emb = Embedder(resolve_embedder(s), name=s.embedder)
    ingest([kb], s.index_dir, emb, s.chunk_tokens, s.chunk_overlap)
    retriever = Retriever(s.index_dir, emb)
    tok = AutoTokenizer.from_pretrained(resolve_chat_model(s))
    out = []
    for turns in questions:
        out.append([
            build_prompt(s.system_prompt, q, retriever.search(q, s.top_k, s.min_score), [],
                         lambda m: len(render_chat(tok, m)), s.max_model_len - 64).messages
            for q in turns
        ])
    return out


def fmt(v: float, nd: int = 2) -> str:
    return "-" if v != v else f"{v:.{nd}f}"  # nan -> "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--systems", default="server-vllm,server-hf,raw-vllm")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--turns", type=int, default=1, help="questions per customer")
    ap.add_argument("--stagger", type=float, default=0.05, help="seconds between customer arrivals")
    ap.add_argument("--hf-max-concurrency", type=int, default=16,
                    help="skip server-hf above this N (it serves one reply at a time)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a chatbot setting for every system, e.g. MAX_NUM_SEQS=64 (repeatable)")
    ap.add_argument("--answer-modes", nargs="+", default=["generate"],
                    choices=["generate", "verified", "verified-focused", "extractive"],
                    help="answer modes the server systems run in (one run each)")
    ap.add_argument("--focus-units", type=int, default=6,
                    help="verified-focused: passage sentences in the prompt (CHATBOT_PROMPT_MAX_UNITS)")
    ap.add_argument("--adapter", type=Path, help="adapter folder the server-vllm-lora / -merged systems serve")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "serving.json")
    args = ap.parse_args()
    overrides = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            ap.error(f"--set takes NAME=VALUE, got {item!r}")
        overrides[name.upper()] = value

    from chatbot.testing import start_server, stop_server

    systems = [f"{x}/{m}" if x.startswith("server-") else x
               for x in args.systems.split(",") for m in (args.answer_modes if x.startswith("server-") else [None])]
    kb = ROOT / "data" / "kb"
    results: dict[str, dict[int, dict]] = {s: {} for s in systems}
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    # all simulated customers come from 127.0.0.1: lift the per-client admission limit (CHATBOT_MAX_PER_CLIENT)
    env = {"MAX_NEW_TOKENS": str(args.max_tokens), "MAX_MODEL_LEN": "2048", "MAX_QUEUED": "512",
           "MAX_PER_CLIENT": "100000", "MAX_PER_CONVERSATION": "100000", **overrides}
    for system in systems:
        if system.startswith("server-"):
            name, mode = system.split("/")
            engine = "vllm" if name.startswith("server-vllm") else "transformers"
            adapter_env = {}
            if name in ("server-vllm-lora", "server-vllm-merged"):
                if args.adapter is None:
                    ap.error(f"{name} needs --adapter FOLDER")
                adapter_env = {"SHIPPED_ADAPTER": str(args.adapter.resolve()),
                               "ADAPTER_SERVING": name.rsplit("-", 1)[1]}
            # verified: whole chunks in the prompt; verified-focused (the served default): the closest units
            mode_env = {"PROMPT_MAX_UNITS": str(args.focus_units) if mode == "verified-focused" else "0"}
            server = start_server(tmp / system.replace("/", "-"), kb, engine, shipped_adapter=bool(adapter_env),
                                  answer_mode=mode.removesuffix("-focused"), **{**env, **mode_env, **adapter_env})
            try:
                # one unmeasured request first: lazy loads (index, tokenizer) are not part of N=1
                asyncio.run(drive_http(server.url, [load_questions(1, seed=7)], args.max_tokens, 0))
                if adapter_env:  # measured only once the server serves it
                    import httpx

                    state = httpx.get(f"{server.url}/healthz", timeout=30).json()["adapter"]
                    if not (state["in_sync"] and state["served"]):
                        raise SystemExit(f"{system}: the adapter is not served: {state}")
                    print(f"{system}: serving {state['served']}", flush=True)
                for n in args.concurrency:
                    if name == "server-hf" and n > args.hf_max_concurrency:
                        continue
                    qs = [load_questions(args.turns, seed=1000 * n + i) for i in range(n)]
                    results[system][n] = measure(
                        lambda: asyncio.run(drive_http(server.url, qs, args.max_tokens, args.stagger)))
                    print(f"{system:12s} N={n:3d} {results[system][n]['tokens_per_s']:.1f} tok/s", flush=True)
            finally:
                stop_server(server)
        elif system == "raw-vllm":
            from chatbot.adapter_watch import lora_enabled
            from chatbot.assets import resolve_chat_model
            from chatbot.config import Settings
            from chatbot.engines import build_engine

            kw = {"engine": "vllm", "max_model_len": 2048, "data_dir": tmp / "raw"}
            kw.update({k.lower(): v for k, v in overrides.items() if k not in ("MAX_NEW_TOKENS", "MAX_QUEUED")})
            s = Settings(**kw)
            engine = build_engine(s, resolve_chat_model(s), enable_lora=lora_enabled(s))

            async def run_all() -> None:
                await engine.start()
                try:
                    await drive_raw_vllm(engine, build_prompts([load_questions(1, seed=7)], kb, tmp / "raw"),
                                         args.max_tokens, 0)  # unmeasured warm-up, as for the servers
                    for n in args.concurrency:
                        qs = [load_questions(args.turns, seed=1000 * n + i) for i in range(n)]
                        prompts = build_prompts(qs, kb, tmp / "raw")
                        cpu0 = time.process_time()
                        records, wall = await drive_raw_vllm(engine, prompts, args.max_tokens, args.stagger)
                        results[system][n] = summarize(records, wall, time.process_time() - cpu0)
                        print(f"{system:12s} N={n:3d} {results[system][n]['tokens_per_s']:.1f} tok/s", flush=True)
                finally:
                    await engine.close()

            asyncio.run(run_all())

    width = max(12, *(len(x) for x in systems))
    header = (f"{'system':{width}s} {'N':>4s} {'tok/s':>8s} {'req/s':>7s} {'TTFT p50':>9s} {'TTFT p95':>9s} "
              f"{'lat p50':>8s} {'lat p95':>8s} {'fail':>5s} {'client CPU s':>12s}")
    print("\n" + header + "\n" + "-" * len(header))
    for system in systems:
        for n, r in sorted(results[system].items()):
            print(f"{system:{width}s} {n:4d} {fmt(r['tokens_per_s'], 1):>8s} {fmt(r['requests_per_s']):>7s} "
                  f"{fmt(r['ttft_p50_s']):>9s} {fmt(r['ttft_p95_s']):>9s} {fmt(r['latency_p50_s']):>8s} "
                  f"{fmt(r['latency_p95_s']):>8s} {r['failures']:5d} {fmt(r['client_cpu_s'], 1):>12s}")
    print("\nratios (tokens/s):")
    for n in args.concurrency:
        a = results.get("server-vllm/generate", {}).get(n, {}).get("tokens_per_s")
        b = results.get("server-hf/generate", {}).get(n, {}).get("tokens_per_s")
        c = results.get("raw-vllm", {}).get(n, {}).get("tokens_per_s")
        parts = [f"N={n}:"]
        if a and b:
            parts.append(f"server-vllm / server-hf = {a / b:.2f}x")
        if a and c:
            parts.append(f"server-vllm / raw-vllm = {a / c:.2f}")
        for variant in ("server-vllm-lora", "server-vllm-merged"):
            v = results.get(f"{variant}/generate", {}).get(n, {}).get("tokens_per_s")
            if a and v:
                parts.append(f"{variant} / server-vllm = {v / a:.2f}")
        print("  " + "  ".join(parts))
    modes = [m for m in args.answer_modes if m != "generate"]
    if modes:
        print("\nlatency and TTFT of each answer mode / generate (p50, p95; below 1 is faster):")
        for name in sorted({x.split("/")[0] for x in systems if "/" in x}):
            for n in args.concurrency:
                g = results.get(f"{name}/generate", {}).get(n)
                for m in modes:
                    r = results.get(f"{name}/{m}", {}).get(n)
                    if g and r:
                        print(f"  {name} N={n}: {m} latency {r['latency_p50_s'] / g['latency_p50_s']:.2f} / "
                              f"{r['latency_p95_s'] / g['latency_p95_s']:.2f}, TTFT {r['ttft_p50_s'] / g['ttft_p50_s']:.2f}"
                              f" / {r['ttft_p95_s'] / g['ttft_p95_s']:.2f}")
    print()
    write_result(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "cpu_count": os.cpu_count(),
                             "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
