"""Evaluation of a chat model (base or with an adapter): validation loss, perplexity and reply quality.

* :func:`validation_loss` -- token-weighted mean cross-entropy (nats per assistant token) over
  encoded dialogues, and its perplexity ``exp(loss)``;
* :func:`greedy_generate` -- batched greedy generation with **left padding** (a prompt gives the
  same tokens in a batch as alone), stopping at the end-of-turn token;
* :func:`reply_quality` -- on held-out dialogues, the reply to the last customer turn against the
  reference reply: ROUGE-L F-measure (Lin 2004, via Google's ``rouge-score`` package, Porter
  stemming) and the self-stop rate (share of replies that end with the end-of-turn token before
  ``max_new_tokens``), with generation speed in new tokens per second.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from chatbot.errors import ConfigError, InvalidInputError
from finetune.data import END_OF_TURN_STRINGS, IGNORE_INDEX, DataCollator, Dialogue, encode_dialogues

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """One generated reply.

    Attributes:
        text: the reply, special tokens removed, cut at the first end-of-turn token.
        token_ids: generated token ids up to (not including) the end-of-turn token.
        stopped: True when the model wrote the end-of-turn token itself (else it hit ``max_new_tokens``).
    """

    text: str
    token_ids: list[int]
    stopped: bool


def render_prompt_ids(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of ``messages`` through the chat template with the generation prompt (as the engines render)."""
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if not isinstance(out, list):
        out = out["input_ids"]
    return [int(t) for t in out]


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Token ids that end an assistant turn, sorted: the tokenizer's EOS, the end-of-turn tokens of
    :data:`finetune.data.END_OF_TURN_STRINGS` that the vocabulary has (``<|im_end|>``, ``<|eot_id|>`` ...),
    and the generation config's ``eos_token_id``(s). The serving engines stop on the same ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[t]) for t in END_OF_TURN_STRINGS if t in vocab)
    if generation_config is not None and generation_config.eos_token_id is not None:
        eos = generation_config.eos_token_id
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return sorted(ids)


def _pad_id(tokenizer, stop_ids: Sequence[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(stop_ids[0])


def greedy_generate(model, tokenizer, prompts: Sequence[Sequence[Mapping[str, str]]], max_new_tokens: int = 256,
                    batch_size: int = 8, repetition_penalty: float = 1.0, progress: bool = False) -> list[Generation]:
    """Greedy replies to many chat prompts, batched with left padding.

    Prompts are rendered with the chat template (generation prompt added), sorted
    by length so a batch holds similar lengths, left-padded with the pad token
    (attention mask 0, position ids from the mask) and decoded greedily until each
    row writes a stop token (the tokenizer's EOS, ``<|im_end|>`` ...) or
    ``max_new_tokens``. Results come back in the order of ``prompts``.

    Args:
        model: a causal LM (``PreTrainedModel`` or ``PeftModel``), in eval mode.
        tokenizer: its tokenizer (with chat template).
        prompts: lists of ``{"role", "content"}`` messages ending with a user message.
        max_new_tokens: most new tokens per reply (>= 1).
        batch_size: prompts per ``generate`` call (>= 1).
        repetition_penalty: 1.0 is plain greedy.
        progress: show a tqdm bar.

    Returns:
        One :class:`Generation` per prompt.

    Raises:
        ConfigError: ``max_new_tokens`` or ``batch_size`` below 1.
    """
    import torch

    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad = _pad_id(tokenizer, stop_ids)
    encoded = [render_prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[Generation | None] = [None] * len(encoded)
    collate = DataCollator(pad, padding_side="left")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")
    device = next(model.parameters()).device
    for idx in batches:
        batch = collate([{"input_ids": encoded[i]} for i in idx])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                temperature=None, top_p=None, top_k=None, repetition_penalty=repetition_penalty,
                eos_token_id=stop_ids, pad_token_id=pad, use_cache=True,  # training sets config.use_cache=False
            )
        new = out[:, ids.shape[1]:].tolist()
        for row, i in enumerate(idx):
            toks = new[row]
            cut = next((k for k, t in enumerate(toks) if t in stop_ids), None)
            kept = toks if cut is None else toks[:cut]
            text = tokenizer.decode(kept, skip_special_tokens=True).strip()
            results[i] = Generation(text, kept, cut is not None)
    return [r for r in results if r is not None]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference (``rouge-score``, Porter stemmer), in [0, 1].

    Raises:
        InvalidInputError: the two lists differ in length.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise InvalidInputError(f"predictions and references must have the same length, got {len(predictions)} "
                         f"and {len(references)}")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def reply_quality(model, tokenizer, dialogues: Sequence[Dialogue], max_new_tokens: int = 256, batch_size: int = 8,
                  max_samples: int | None = None, repetition_penalty: float = 1.0, progress: bool = False,
                  examples: int = 3) -> dict:
    """Generate the reply to each dialogue's last customer turn and score it against the reference.

    Args:
        model, tokenizer: the model to evaluate.
        dialogues: held-out dialogues (each has an assistant message; the last one is the reference).
        max_new_tokens: generation budget per reply.
        batch_size: prompts per batch (left padding).
        max_samples: evaluate only the first N dialogues (None: all).
        repetition_penalty: 1.0 for plain greedy.
        progress: tqdm bar.
        examples: how many (prompt, reference, reply) triples to keep in the result.

    Returns:
        ``{"n", "rouge_l" (mean F, [0, 1]), "self_stop_rate" ([0, 1]), "mean_new_tokens",
        "new_tokens_per_s", "seconds", "max_new_tokens", "examples": [...]}``.
    """
    ds = list(dialogues[:max_samples] if max_samples else dialogues)
    if not ds:
        return {"n": 0, "rouge_l": None, "self_stop_rate": None, "mean_new_tokens": None,
                "new_tokens_per_s": None, "seconds": 0.0, "max_new_tokens": max_new_tokens, "examples": []}
    prompts, refs = zip(*(d.prompt_and_reference() for d in ds))
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    gens = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, repetition_penalty, progress)
    secs = time.perf_counter() - t0
    if was_training:
        model.train()
    scores = rouge_l([g.text for g in gens], refs)
    n_new = sum(len(g.token_ids) + int(g.stopped) for g in gens)
    return {
        "n": len(ds),
        "rouge_l": sum(scores) / len(scores),
        "self_stop_rate": sum(g.stopped for g in gens) / len(gens),
        "mean_new_tokens": n_new / len(gens),
        "new_tokens_per_s": n_new / secs if secs > 0 else None,
        "seconds": secs,
        "max_new_tokens": max_new_tokens,
        "examples": [{"id": d.id, "prompt": p[-1]["content"], "reference": r, "reply": g.text, "stopped": g.stopped}
                     for d, p, r, g in list(zip(ds, prompts, refs, gens))[:examples]],
    }


def validation_loss(model, tokenizer, data: Sequence[Dialogue] | Sequence[dict], max_length: int | None = None,
                    truncation: str = "turns", batch_size: int = 8, max_samples: int | None = None) -> dict:
    """Token-weighted mean cross-entropy over assistant tokens, and perplexity.

    ``loss = sum of -log p(token) over every labelled (assistant) token / number of such tokens``
    (nats per token; the model's own loss is a per-batch mean, here re-weighted by each
    batch's labelled-token count so batch composition does not matter).

    Args:
        model, tokenizer: the model to evaluate.
        data: dialogues (encoded here with ``max_length`` / ``truncation``) or already encoded samples.
        batch_size: samples per forward pass.
        max_samples: use only the first N samples.

    Returns:
        ``{"loss", "perplexity", "tokens" (labelled tokens scored), "samples"}``.
    """
    import torch

    if data and isinstance(data[0], Dialogue):
        data, _ = encode_dialogues(tokenizer, data, max_length, truncation)  # type: ignore[arg-type]
    samples = list(data[:max_samples] if max_samples else data)
    if not samples:
        return {"loss": None, "perplexity": None, "tokens": 0, "samples": 0}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = DataCollator(pad)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]["input_ids"]))
    with torch.inference_mode():
        for k in range(0, len(order), batch_size):
            batch = {key: v.to(device) for key, v in collate([samples[i] for i in order[k:k + batch_size]]).items()}
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n == 0:
                continue
            out = model(**batch)
            total += float(out.loss) * n
            count += n
    if was_training:
        model.train()
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "samples": len(samples)}
