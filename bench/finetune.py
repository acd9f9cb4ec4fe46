"""Fine-tuning cost: LoRA vs full fine-tuning of the same chat model on the same dialogues.

Each method runs in its own process (so peak memory is its own) through the
project's trainer (``finetune.sft.build_trainer``: Hugging Face Trainer, AdamW,
fp32 weights with the resolved precision): ``--warmup`` optimizer steps that are
not timed, then ``--steps`` timed ones. Reported per method:

* training tokens/s: non-padding input tokens of the timed steps / their wall time, and
  per CPU-second of the process (user + system time: fairer on a shared, busy CPU);
* s/step;
* peak memory: the process's peak resident set size (CPU; ``ru_maxrss``, includes
  allocator caching) and ``torch.cuda.max_memory_allocated`` on a GPU; plus an exact
  tensor account: weights + gradients + optimizer state (read from the optimizer) +
  activations saved for backward on one batch (``torch.autograd.graph.saved_tensors_hooks``,
  weights excluded);
* trainable parameters.

Full fine-tuning is the baseline (``--baseline``); the ratio columns are <method> / baseline. ``lora-nodrop``
is LoRA with dropout 0 (peft's dropout keeps a copy of every adapted layer's input for backward);
``lora-all-logits`` is LoRA with the output layer run at every position (``label_logits_only=False``, the
trainer before issue 15; every other method runs it only where the next token is a label); ``lora-gc`` is LoRA
with gradient checkpointing.

    python bench/finetune.py                          # SmolLM2-135M, Bitext, batch 4, 256 tokens
    python bench/finetune.py --steps 3 --json var/bench/finetune.json
    python bench/finetune.py --data var/grounded-v3/train.jsonl --batch-size 4 --max-length 1024 --steps 2 \
        --methods lora-all-logits,lora,lora-gc --baseline lora-all-logits   # long grounded prompts
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402  (after the path insert)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(args) -> dict:
    """Train ``args.method`` for warmup + steps optimizer steps in this process; return the measurements."""
    import torch
    import transformers
    from transformers import TrainerCallback

    from chatbot.config import Settings
    from finetune.base_model import load_tokenizer, resolve_base_model
    from finetune.data import DataCollator, encode_dialogues, load_dialogues
    from finetune.sft import SFTConfig, build_trainer, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    method = "lora" if args.method.startswith("lora") else "full"
    cfg = SFTConfig(base_model=args.model, method=method, batch_size=args.batch_size, max_length=args.max_length,
                    lora_dropout=0.0 if args.method == "lora-nodrop" else 0.05,
                    max_steps=args.warmup + args.steps, eval_steps=0, eval_replies=0, logging_steps=10_000,
                    learning_rate=1e-4 if method == "full" else 2e-4, warmup_ratio=0.0,
                    gradient_checkpointing=args.gradient_checkpointing or args.method == "lora-gc",
                    label_logits_only=args.method != "lora-all-logits", precision=args.precision, seed=0)
    transformers.set_seed(0)
    path = resolve_base_model(cfg.base_model, Settings().cache_dir)
    tok = load_tokenizer(path)
    dialogues, _ = load_dialogues([args.data])
    n = args.batch_size * (args.warmup + args.steps)
    samples, _ = encode_dialogues(tok, dialogues[: n * 2], cfg.max_length, "drop")
    samples = samples[:n]
    model = load_model(path, cfg)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_loaded = _rss_mib()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    tokens: list[int] = []

    class CountingCollator(DataCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            tokens.append(int(batch["attention_mask"].sum()))
            return batch

    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                marks["start"] = time.perf_counter()
                marks["cpu_start"] = _cpu_seconds()
                marks["tokens_before"] = len(tokens) - 1  # the batch of this step is already collated

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == args.warmup + args.steps:
                marks["end"] = time.perf_counter()
                marks["cpu_end"] = _cpu_seconds()

    trainer = build_trainer(model, tok, samples, [], cfg, Path(args.tmp) / f"ckpt-{args.method}", progress=False,
                            callbacks=[Clock()])
    trainer.data_collator = CountingCollator(tok.pad_token_id)
    trainer.args.save_strategy = "no"
    trainer.train()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the account below adds its own
    # after training, so the account sees the model as trained (gradient checkpointing on, when it is)
    activation_bytes = _saved_activation_bytes(trainer.model, DataCollator(tok.pad_token_id)(samples[: args.batch_size]),
                                               cfg.label_logits_only)
    secs = marks["end"] - marks["start"]
    cpu_secs = marks["cpu_end"] - marks["cpu_start"]
    timed_tokens = sum(tokens[marks["tokens_before"]: marks["tokens_before"] + args.steps])
    optim_bytes = sum(v.numel() * v.element_size() for st in trainer.optimizer.state.values()
                      for v in st.values() if torch.is_tensor(v))
    return {
        "method": args.method,
        "model": args.model,
        "trainable_params": trainable,
        "total_params": total,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "precision": trainer.args.bf16 and "bf16" or "fp32",
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "label_logits_only": cfg.label_logits_only,
        "tokens": timed_tokens,
        "seconds": secs,
        "tokens_per_s": timed_tokens / secs,
        "tokens_per_cpu_s": timed_tokens / cpu_secs,
        "s_per_step": secs / args.steps,
        "weights_mib": weight_bytes / 2**20,
        "grads_mib": grad_bytes / 2**20,
        "optimizer_state_mib": optim_bytes / 2**20,
        "saved_activations_mib": activation_bytes / 2**20,
        "tensor_peak_mib": (weight_bytes + grad_bytes + optim_bytes + activation_bytes) / 2**20,
        "rss_loaded_mib": rss_loaded,
        "peak_rss_mib": peak_rss,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "threads": torch.get_num_threads(),
        "device": "cuda" if cuda else "cpu",
    }


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _saved_activation_bytes(model, batch, label_logits_only: bool = False) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass, parameters excluded (with
    ``label_logits_only``, the output layer at :func:`finetune.sft.label_positions` only, as the trainer runs it)."""
    import torch

    from finetune.sft import label_position_inputs

    device = next(model.parameters()).device  # after training the Trainer has moved it (GPU)
    batch = {k: v.to(device) for k, v in batch.items()}
    if label_logits_only:
        batch = label_position_inputs(batch)

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    del out
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


FIELDS = [
    ("trainable params (M)", "trainable_params", lambda v: f"{v / 1e6:.2f}"),
    ("tokens/s (wall)", "tokens_per_s", lambda v: f"{v:.1f}"),
    ("tokens per CPU-second", "tokens_per_cpu_s", lambda v: f"{v:.2f}"),
    ("s/step (wall)", "s_per_step", lambda v: f"{v:.2f}"),
    ("weights (MiB)", "weights_mib", lambda v: f"{v:.0f}"),
    ("gradients (MiB)", "grads_mib", lambda v: f"{v:.0f}"),
    ("optimizer state (MiB)", "optimizer_state_mib", lambda v: f"{v:.0f}"),
    ("saved activations (MiB)", "saved_activations_mib", lambda v: f"{v:.0f}"),
    ("tensor peak (MiB)", "tensor_peak_mib", lambda v: f"{v:.0f}"),
    ("peak RSS (MiB)", "peak_rss_mib", lambda v: f"{v:.0f}"),
    ("peak CUDA (MiB)", "peak_cuda_mib", lambda v: f"{v:.0f}"),
]


def _table(rows: dict, baseline: str = "full") -> str:
    names = list(rows)
    others = [n for n in names if n != baseline]
    heads = [n + " (baseline)" if n == baseline else n for n in names]
    ratios = [f"{n} / {baseline}" for n in others] if baseline in rows else []
    w = [max(18, len(h) + 2) for h in heads]
    wr = [max(20, len(h) + 2) for h in ratios]
    lines = [f"{'':<26}" + "".join(f"{h:>{x}}" for h, x in zip(heads, w)) + "".join(f"{h:>{x}}" for h, x in zip(ratios, wr))]
    for label, key, fmt in FIELDS:
        if all(rows[n].get(key) is None for n in names):
            continue
        line = f"{label:<26}" + "".join(f"{fmt(rows[n][key]) if rows[n].get(key) is not None else '-':>{x}}"
                                          for n, x in zip(names, w))
        if ratios:
            base = rows[baseline].get(key)
            line += "".join(f"{(rows[n][key] / base) if base and rows[n].get(key) is not None else 0:>{x}.3f}"
                            for n, x in zip(others, wr))
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--data", default="bitext_customer_support")
    p.add_argument("--methods", default="full,lora,lora-nodrop",
                   help="full, lora, lora-nodrop, lora-all-logits, lora-gc")
    p.add_argument("--baseline", default="full", help="the method the ratio columns divide by")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path, default=ROOT / "var" / "bench" / "finetune.json")
    p.add_argument("--tmp", default="/tmp/bench-finetune")
    p.add_argument("--method", help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    if args.method:
        print(json.dumps(run_one(args)), flush=True)
        return 0
    rows: dict = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        cmd = [sys.executable, __file__, "--method", method, "--model", args.model, "--data", args.data,
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision, "--tmp", args.tmp]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(f"running {method} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        rows[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    any_row = next(iter(rows.values()))
    print(f"{any_row['model']} on {args.data}: batch {args.batch_size}, max {args.max_length} tokens, "
          f"{args.steps} timed steps after {args.warmup}, {any_row['precision']}, {any_row['device']}, "
          f"{any_row['threads']} threads")
    print(_table(rows, args.baseline))
    write_result(args.json, {"config": {k: v for k, v in vars(args).items() if k not in ("json", "method")},
                             "results": rows}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
