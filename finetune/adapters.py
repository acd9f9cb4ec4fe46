"""The chat-adapter registry: list, evaluate, promote (behind a gate), roll back, merge and int8 export.

Adapters are folders written by :func:`finetune.sft.train_sft` (PEFT weights plus
``adapter.json``). The registry is ``Settings.resolved_adapters_dir``
(default ``var/adapters``): every sub-folder with an ``adapter.json`` is an adapter,
and ``LIVE.json`` there says which one is served::

    {"current": {"name", "version", "path", "promoted_at"} | null,
     "history": [earlier "current" entries, oldest first],
     "events": [{"action": "promote"|"rollback", "version", "at", ...}, ...]}

It is replaced atomically (write to a temporary file, ``os.replace``), so a
reader never sees half of it. The running service follows it with
:class:`LiveAdapterWatcher` (``await watcher.sync(engine)`` before a turn): a change
of pointer makes the engine switch adapters without a restart (vLLM: a new
``LoRARequest`` with the versioned name; transformers: peft ``load_adapter``).

The gate (:func:`promote`): an adapter goes live only if it was trained on the
served base model (same weight SHA-256) and its metrics are not worse than the
live adapter's -- or, with none live, the base model's -- on the *same* held-out
dialogues (the candidate's validation and test splits), within the tolerances of
``Settings.adapter_gate_*``: validation loss (lower is better), test ROUGE-L and
self-stop rate (higher is better). When the live adapter was evaluated on other
dialogues it is re-evaluated on the candidate's, and the result is cached in its
``adapter.json``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from chatbot.errors import AdapterError, NotFoundError


class AdapterLoadError(AdapterError):
    """An adapter does not load the way the serving engine loads it, or loads and changes nothing.

    Attributes:
        check: which check failed: ``"target_modules"``, ``"keys"``, ``"rank"``, ``"base_model"``,
            ``"no_effect"`` or ``"load"``.
    """

    def __init__(self, message: str, check: str) -> None:
        super().__init__(message)
        self.check = check
from finetune.sft import MANIFEST, model_fingerprint

log = logging.getLogger(__name__)

LIVE = "LIVE.json"
#: The append-only audit log of promotions and rollbacks, beside ``LIVE.json`` (one JSON object a line).
AUDIT = "PROMOTIONS.jsonl"
#: The fixed probe of the load check: the adapter must change the base model's logits on it.
PROBE_MESSAGES = [{"role": "system", "content": "You are a helpful customer-service assistant."},
                  {"role": "user", "content": "Hello, my order has not arrived yet. Can you help me?"}]
#: Largest |logit difference| (adapter on vs off) on the probe below which an adapter counts as doing nothing.
PROBE_MIN_CHANGE = 1e-4
#: Metrics the gate compares: name -> (higher is better, settings field with the tolerance).
GATE_METRICS = {
    "val_loss": (False, "adapter_gate_max_val_loss_increase"),
    "rouge_l": (True, "adapter_gate_max_rouge_l_drop"),
    "self_stop_rate": (True, "adapter_gate_max_self_stop_drop"),
}


@dataclass
class AdapterRecord:
    """An adapter folder and what its ``adapter.json`` says.

    Attributes:
        name, version: the adapter's name and unique version string (``<name>-<time>-<sha8>``).
        path: the folder (absolute).
        kind: ``peft-lora`` or ``full``.
        base_id, base_sha256: the base model it was trained on (id and weight hash).
        metrics: ``{"val_loss", "perplexity", "rouge_l", "self_stop_rate", ...}`` on its own splits.
        base_metrics: the base model's metrics on the same splits.
        live: True when ``LIVE.json`` points at it.
    """

    name: str
    version: str
    path: Path
    kind: str
    base_id: str
    base_sha256: str
    metrics: dict
    base_metrics: dict | None
    eval_config: dict
    created_at: str
    manifest: dict = field(repr=False, default_factory=dict)
    live: bool = False

    @classmethod
    def from_folder(cls, folder: str | Path) -> AdapterRecord:
        """Read an adapter folder.

        Raises:
            NotFoundError: the folder does not exist.
            AdapterError: it has no readable ``adapter.json``.
        """
        p = Path(folder).resolve()
        if not p.is_dir():
            raise NotFoundError(f"adapter folder {str(p)!r} does not exist")
        mf = p / MANIFEST
        try:
            m = json.loads(mf.read_text())
        except FileNotFoundError as exc:
            raise AdapterError(f"{str(p)!r} is not an adapter folder: it has no {MANIFEST}") from exc
        except json.JSONDecodeError as exc:
            raise AdapterError(f"{str(mf)!r} is not valid JSON: {exc.msg}") from exc
        try:
            return cls(m["name"], m["version"], p, m.get("kind", "peft-lora"), m["base_model"]["id"],
                       m["base_model"]["sha256"], m.get("metrics") or {}, m.get("base_metrics"),
                       m.get("eval_config") or {}, m.get("created_at", ""), m)
        except KeyError as exc:
            raise AdapterError(f"{str(mf)!r} lacks the field {exc.args[0]!r}") from exc

    def entry(self) -> dict:
        """The ``LIVE.json`` entry for this adapter."""
        return {"name": self.name, "version": self.version, "path": str(self.path),
                "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def save_manifest(self) -> None:
        """Rewrite ``adapter.json`` (atomically) from ``self.manifest``."""
        _atomic_write(self.path / MANIFEST, self.manifest)


# --------------------------------------------------------------------------- the registry and the pointer


def _atomic_write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def read_live(settings) -> dict:
    """The ``LIVE.json`` state (``{"current": None, "history": [], "events": []}`` when absent).

    Raises:
        AdapterError: the file exists but is not valid JSON.
    """
    p = settings.resolved_adapters_dir / LIVE
    if not p.is_file():
        return {"current": None, "history": [], "events": []}
    try:
        state = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{str(p)!r} is not valid JSON: {exc.msg}") from exc
    state.setdefault("current", None)
    state.setdefault("history", [])
    state.setdefault("events", [])
    return state


def _write_live(settings, state: dict) -> None:
    _atomic_write(settings.resolved_adapters_dir / LIVE, state)


@contextlib.contextmanager
def _live_lock(settings):
    """Hold an exclusive ``flock`` on ``<registry>/.live.lock``: promotions and rollbacks read, change and write
    ``LIVE.json`` one at a time, also from several servers sharing the registry (a lost history entry otherwise)."""
    reg = settings.resolved_adapters_dir
    reg.mkdir(parents=True, exist_ok=True)
    with open(reg / ".live.lock", "a+") as f:  # closing the file releases the lock
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def resolve_adapter(ref: str | Path, settings) -> AdapterRecord:
    """Find an adapter by folder path, by name in the registry, or by version string.

    Raises:
        NotFoundError: nothing matches ``ref``.
        AdapterError: the match is not a valid adapter folder.
    """
    p = Path(ref)
    if p.is_dir():
        rec = AdapterRecord.from_folder(p)
    else:
        reg = settings.resolved_adapters_dir
        if (reg / str(ref)).is_dir():
            rec = AdapterRecord.from_folder(reg / str(ref))
        else:
            match = [a for a in list_adapters(settings) if a.version == str(ref)]
            if not match:
                raise NotFoundError(f"adapter {str(ref)!r} is neither a folder, a name in {str(reg)!r} nor a version")
            rec = match[0]
    cur = read_live(settings)["current"]
    rec.live = bool(cur and cur.get("version") == rec.version)
    return rec


def list_adapters(settings) -> list[AdapterRecord]:
    """Adapters in the registry (oldest first), plus the live one if it lives elsewhere; ``live`` marked."""
    reg = settings.resolved_adapters_dir
    out: list[AdapterRecord] = []
    if reg.is_dir():
        for d in sorted(reg.iterdir()):
            if (d / MANIFEST).is_file():
                try:
                    out.append(AdapterRecord.from_folder(d))
                except AdapterError as exc:
                    log.warning("skipping %s: %s", d, exc)
    cur = read_live(settings)["current"]
    if cur and not any(a.version == cur["version"] for a in out) and Path(cur["path"]).is_dir():
        with contextlib.suppress(AdapterError, NotFoundError):
            out.append(AdapterRecord.from_folder(cur["path"]))
    for a in out:
        a.live = bool(cur and a.version == cur.get("version"))
    return sorted(out, key=lambda a: a.created_at)


def live_adapter(settings) -> AdapterRecord | None:
    """The adapter ``LIVE.json`` points at, or None (the base model is served).

    Raises:
        AdapterError: the pointer names a folder that is gone or broken.
    """
    cur = read_live(settings)["current"]
    if not cur:
        return None
    try:
        rec = AdapterRecord.from_folder(cur["path"])
    except NotFoundError as exc:
        raise AdapterError(f"the live adapter {cur['version']!r} is missing at {cur['path']!r}") from exc
    rec.live = True
    return rec


# --------------------------------------------------------------------------- evaluation


def _load_dialogues_file(path: Path):
    from finetune.data import load_jsonl

    return load_jsonl(path) if path.is_file() else []


def _load_with_adapter(rec: AdapterRecord, settings):
    """(PeftModel on the base model, tokenizer) for an adapter."""
    from peft import PeftModel

    from finetune.sft import SFTConfig, load_model, load_tokenizer, resolve_base_model

    base = resolve_base_model(rec.base_id, settings.cache_dir)
    tok = load_tokenizer(base)
    model = load_model(base, SFTConfig(method="full"))
    model.config.use_cache = True
    try:
        model = PeftModel.from_pretrained(model, str(rec.path))
    except Exception as exc:
        raise AdapterError(f"cannot load adapter {str(rec.path)!r}: {exc}") from exc
    model.eval()
    return model, tok


def _metrics_on(model, tok, validation, test, eval_config: dict, max_samples: int | None = None) -> dict:
    from finetune.evaluate import reply_quality, validation_loss

    val = validation_loss(model, tok, validation, eval_config.get("max_length"), eval_config.get("truncation", "turns"),
                          batch_size=8, max_samples=eval_config.get("val_samples"))
    n = max_samples if max_samples is not None else eval_config.get("replies", 100)
    test_m = reply_quality(model, tok, test, eval_config.get("max_new_tokens", 256), 8, n or None,
                           eval_config.get("repetition_penalty", 1.0)) if test and n else {}
    return {"val_loss": val["loss"], "perplexity": val["perplexity"], "rouge_l": test_m.get("rouge_l"),
            "self_stop_rate": test_m.get("self_stop_rate"), "test_n": test_m.get("n"),
            "mean_new_tokens": test_m.get("mean_new_tokens"), "new_tokens_per_s": test_m.get("new_tokens_per_s")}


def _eval_key(validation, test, eval_config: dict, max_samples) -> str:
    from finetune.data import dialogues_sha256

    h = hashlib.sha256()
    h.update(dialogues_sha256(validation).encode())
    h.update(dialogues_sha256(test).encode())
    cfg = {k: eval_config.get(k) for k in ("max_new_tokens", "replies", "repetition_penalty", "max_length",
                                           "truncation", "val_samples")}
    h.update(json.dumps([cfg, max_samples], sort_keys=True).encode())
    return h.hexdigest()[:16]


def evaluate_adapter(ref: str | Path, settings, data: list[str] | None = None, max_samples: int | None = None,
                     with_base: bool = True, write: bool = True) -> dict:
    """Validation loss, perplexity, test ROUGE-L and self-stop rate of an adapter (and of its base model).

    Args:
        ref: adapter name, folder or version.
        settings: service settings (registry, cache).
        data: evaluate on these dialogues (specs as in :func:`finetune.data.load_dialogues`; all of them
            serve as both validation and test) instead of the adapter's saved splits.
        max_samples: replies to generate (default: as many as at training time).
        with_base: also evaluate the base model (adapter disabled) on the same dialogues.
        write: cache the result in the adapter's ``adapter.json`` under ``evals``.

    Returns:
        ``{"version", "key", "adapter": metrics, "base": metrics | None, "data": description}``.
    """
    from finetune.data import load_dialogues

    rec = resolve_adapter(ref, settings)
    if data:
        dialogues, sources = load_dialogues(data)
        validation = test = dialogues
        desc = {"sources": sources}
    else:
        validation = _load_dialogues_file(rec.path / "validation.jsonl")
        test = _load_dialogues_file(rec.path / "test.jsonl")
        desc = {"splits": "the adapter's own validation and test splits"}
    model, tok = _load_with_adapter(rec, settings)
    res = {"version": rec.version, "key": _eval_key(validation, test, rec.eval_config, max_samples), "data": desc}
    res["adapter"] = _metrics_on(model, tok, validation, test, rec.eval_config, max_samples)
    res["base"] = None
    if with_base:
        with model.disable_adapter():
            res["base"] = _metrics_on(model, tok, validation, test, rec.eval_config, max_samples)
    if write:
        rec.manifest.setdefault("evals", {})[res["key"]] = {**res, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime())}
        if not data and not any(rec.metrics.get(k) is not None for k in GATE_METRICS):
            # trained without metrics (e.g. no test split at the time): these become its gate metrics
            rec.manifest["metrics"] = res["adapter"]
            if res["base"]:
                rec.manifest["base_metrics"] = res["base"]
        rec.save_manifest()
    return res


# --------------------------------------------------------------------------- the load check


def serving_max_lora_rank(settings) -> int | None:
    """The highest LoRA rank the configured engine serves: ``settings.max_lora_rank`` when it is vLLM
    (``engine="vllm"``, or ``"auto"`` where vLLM is installed), None for transformers (peft serves any rank)."""
    engine = getattr(settings, "engine", "auto")
    if engine == "vllm":
        return int(settings.max_lora_rank)
    if engine == "auto":
        from chatbot.engines.vllm_engine import vllm_available

        return int(settings.max_lora_rank) if vllm_available() else None
    return None


@dataclass
class LoadCheck:
    """What :func:`check_adapter_loads` found for an adapter that passed it.

    Attributes:
        rank: the adapter's LoRA rank (the largest, with a ``rank_pattern``).
        max_rank: the engine's ``max_lora_rank`` (None: not limited, transformers).
        target_modules: module names the adapter wraps.
        tensors: adapter tensors loaded (every one matched a module).
        max_logit_change: largest absolute logit difference, adapter on vs off, on the probe prompt.
    """

    rank: int
    max_rank: int | None
    target_modules: list[str]
    tensors: int
    max_logit_change: float

    def sentences(self) -> list[str]:
        """The check's findings in plain sentences."""
        limit = "no rank limit (transformers engine)" if self.max_rank is None else \
            f"within the engine's max_lora_rank {self.max_rank}"
        return [f"It loads on the served base model: all {self.tensors} tensors match modules "
                f"({', '.join(self.target_modules)}); rank {self.rank}, {limit}.",
                f"It changes the model: the largest logit change on the probe prompt is {self.max_logit_change:.3g}."]

    def as_dict(self) -> dict:
        """JSON-ready fields."""
        return {"rank": self.rank, "max_rank": self.max_rank, "target_modules": self.target_modules,
                "tensors": self.tensors, "max_logit_change": self.max_logit_change}


def check_adapter_loads(rec: AdapterRecord, settings) -> LoadCheck:
    """Load the adapter the way the serving engine will and prove that it does something.

    On the served base model (``settings.model``, float32 on CPU): the adapter's target modules exist,
    every tensor of ``adapter_model.safetensors`` lands on a module (peft would only warn "Found missing
    adapter keys" and serve the base model), its rank is within the vLLM engine's ``max_lora_rank``,
    and one forward pass of :data:`PROBE_MESSAGES` with and without it differs by at least
    :data:`PROBE_MIN_CHANGE` in some logit (an adapter whose ``lora_B`` tensors are all zero is the
    base model). Cost: one model load and two forward passes of a ~40-token prompt.

    Raises:
        AdapterLoadError: the first check that fails, named in ``check`` and in the message.
    """
    import torch
    from peft import PeftConfig, PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatbot.assets import resolve_chat_model
    from chatbot.engines.transformers_engine import render_chat
    from chatbot.engines.base import ChatMessage

    v = rec.version
    try:
        cfg = PeftConfig.from_pretrained(str(rec.path))
    except Exception as exc:
        raise AdapterLoadError(f"adapter {v!r}: cannot read {str(rec.path / 'adapter_config.json')!r}: {exc}",
                               "load") from exc
    rank = max([int(getattr(cfg, "r", 0) or 0), *[int(r) for r in (getattr(cfg, "rank_pattern", None) or {}).values()]])
    max_rank = serving_max_lora_rank(settings)
    if max_rank is not None and rank > max_rank:
        raise AdapterLoadError(f"adapter {v!r} has LoRA rank {rank}, above the vLLM engine's max_lora_rank "
                               f"{max_rank} (setting max_lora_rank): vLLM would refuse to load it", "rank")
    model_path = resolve_chat_model(settings)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    targets = cfg.target_modules
    leaf_names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    if isinstance(targets, (set, list, tuple)):
        absent = sorted(set(targets) - leaf_names)
        if absent:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
            raise AdapterLoadError(f"adapter {v!r} targets module(s) {absent} that the base model {settings.model!r} "
                                   f"does not have (its linear modules: {linear})", "target_modules")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = PeftModel(base, cfg, adapter_name="probe", low_cpu_mem_usage=True)  # no init: loaded below
    except Exception as exc:
        raise AdapterLoadError(f"adapter {v!r} cannot be applied to the base model {settings.model!r}: {exc}",
                               "target_modules") from exc
    try:
        weights = load_peft_weights(str(rec.path), device="cpu")
    except Exception as exc:
        raise AdapterLoadError(f"adapter {v!r}: cannot read its weights: {exc}", "load") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = set_peft_model_state_dict(pm, weights, adapter_name="probe", low_cpu_mem_usage=True)
    except Exception as exc:  # shape mismatch and the like
        raise AdapterLoadError(f"adapter {v!r}: its tensors do not fit the base model: {exc}", "keys") from exc
    unexpected = list(res.unexpected_keys)
    missing = [k for k in res.missing_keys if ".probe." in k or k.endswith(".probe")]
    if unexpected or missing:
        raise AdapterLoadError(
            f"adapter {v!r}: {len(unexpected)} of its {len(weights)} tensors match no module of the base model "
            f"(e.g. {unexpected[:2]}) and {len(missing)} adapter tensors would stay at their initial values "
            f"(missing adapter keys, e.g. {missing[:2]}); served, it would behave like the base model", "keys")
    tok = AutoTokenizer.from_pretrained(model_path)
    ids = torch.tensor([render_chat(tok, [ChatMessage(m["role"], m["content"]) for m in PROBE_MESSAGES])])
    pm.eval()
    with torch.inference_mode():
        on = pm(input_ids=ids).logits
        with pm.disable_adapter():
            off = pm(input_ids=ids).logits
    change = float((on - off).abs().max())
    if not change >= PROBE_MIN_CHANGE:
        zero_b = [k for k, t in weights.items() if "lora_B" in k and not bool(t.any())]
        n_b = sum("lora_B" in k for k in weights)
        why = f"{len(zero_b)} of its {n_b} lora_B tensors are all zero" if zero_b else "its update is negligible"
        raise AdapterLoadError(f"adapter {v!r} does not change the model: the largest logit change on the probe "
                               f"prompt is {change:.2e} (below {PROBE_MIN_CHANGE:g}); {why}", "no_effect")
    names = sorted(targets) if isinstance(targets, (set, list, tuple)) else [str(targets)]
    return LoadCheck(rank, max_rank, names, len(weights), change)


# --------------------------------------------------------------------------- the gate


@dataclass
class GateDecision:
    """Outcome of the promotion gate.

    Attributes:
        candidate: the adapter to promote.
        reference: what it was compared with (``"base"`` or the live adapter's version).
        ok: True when every compared metric is within tolerance.
        reasons: one line per metric that failed.
        comparison: metric -> ``{"candidate", "reference", "tolerance", "ok"}``.
        forced: promoted despite a failed gate (``--force``).
        load_check: what :func:`check_adapter_loads` found (None when it was not run).
        previous: the version live before (None: the base model).
    """

    candidate: AdapterRecord
    reference: str
    ok: bool
    reasons: list[str]
    comparison: dict
    forced: bool = False
    load_check: LoadCheck | None = None
    previous: str | None = None

    def lines(self) -> list[str]:
        """The gate's table, one line per metric."""
        out = [f"gate: {self.candidate.version} vs {self.reference}"]
        for k, c in self.comparison.items():
            ref = "-" if c["reference"] is None else f"{c['reference']:.4f}"
            out.append(f"  {k:<15} candidate {c['candidate']:.4f}  reference {ref}  tolerance {c['tolerance']}"
                       f"  {'ok' if c['ok'] else 'WORSE'}")
        if self.forced and not self.ok:
            out.append("  forced past the gate")
        return out

    def sentences(self) -> list[str]:
        """The verdict in plain sentences (for the console and the CLI)."""
        ref = "the base model" if self.reference == "base" else f"the live adapter {self.reference}"
        out = list(self.load_check.sentences()) if self.load_check else []
        for k, c in self.comparison.items():
            better = "higher" if GATE_METRICS[k][0] else "lower"
            out.append(f"{METRIC_NAMES.get(k, k)}: {c['candidate']:.4f} against {c['reference']:.4f} for {ref} "
                       f"({better} is better; tolerance {c['tolerance']:g}): {'passes' if c['ok'] else 'worse'}.")
        if not self.comparison:
            out.append(f"No metrics were compared with {ref}.")
        if self.ok:
            out.append(f"Verdict: {self.candidate.version} is not worse than {ref} on the same held-out dialogues.")
        elif self.forced:
            out.append(f"Verdict: worse than {ref} ({'; '.join(self.reasons)}), promoted anyway (forced).")
        return out

    def table(self) -> list[dict]:
        """The gate's table as rows ``{"metric", "candidate", "reference", "tolerance", "ok"}`` (audit log)."""
        return [{"metric": k, **c} for k, c in self.comparison.items()]


#: Metric names as people read them.
METRIC_NAMES = {"val_loss": "Validation loss", "rouge_l": "ROUGE-L of test replies",
                "self_stop_rate": "Self-stop rate of test replies"}


def check_gate(candidate: dict, reference: dict | None, settings) -> tuple[bool, list[str], dict]:
    """Compare candidate metrics with reference metrics under the ``adapter_gate_*`` tolerances.

    A metric the reference lacks is not compared; a metric the candidate lacks
    (while the reference has it) fails.

    Returns:
        (ok, reasons, comparison) as in :class:`GateDecision`.
    """
    reasons: list[str] = []
    comp: dict = {}
    reference = reference or {}
    for name, (higher, tol_field) in GATE_METRICS.items():
        tol = float(getattr(settings, tol_field))
        ref, cand = reference.get(name), candidate.get(name)
        if ref is None:
            continue
        if cand is None:
            reasons.append(f"{name}: the candidate has no value (the reference has {ref:.4f})")
            continue
        ok = cand >= ref - tol if higher else cand <= ref + tol
        comp[name] = {"candidate": cand, "reference": ref, "tolerance": tol, "ok": ok}
        if not ok:
            word = "below" if higher else "above"
            reasons.append(f"{name} {cand:.4f} is {word} the reference {ref:.4f} by more than {tol_field}={tol}")
    return not reasons, reasons, comp


def _reference_metrics(cand: AdapterRecord, live: AdapterRecord | None, settings) -> tuple[str, dict | None]:
    """Metrics of the live adapter (or the base model) on the candidate's held-out dialogues."""
    if live is None:
        if cand.base_metrics:
            return "base", cand.base_metrics
        res = evaluate_adapter(cand.path, settings, with_base=True)
        return "base", res["base"]
    same = live.eval_config.get("split_sha256") == cand.eval_config.get("split_sha256") and all(
        live.eval_config.get(k) == cand.eval_config.get(k) for k in ("max_new_tokens", "replies", "repetition_penalty")
    )
    if same and live.metrics:
        return live.version, live.metrics
    validation = _load_dialogues_file(cand.path / "validation.jsonl")
    test = _load_dialogues_file(cand.path / "test.jsonl")
    key = _eval_key(validation, test, cand.eval_config, None)
    cached = (live.manifest.get("evals") or {}).get(key)
    if cached:
        return live.version, cached["adapter"]
    log.info("re-evaluating the live adapter %s on the candidate's held-out dialogues", live.version)
    model, tok = _load_with_adapter(live, settings)
    metrics = _metrics_on(model, tok, validation, test, cand.eval_config)
    live.manifest.setdefault("evals", {})[key] = {"adapter": metrics, "candidate": cand.version}
    live.save_manifest()
    return live.version, metrics


def served_model_fingerprint(settings) -> str:
    """Weight SHA-256 of the model the service serves (``settings.model``, the embedded one converted)."""
    from chatbot.assets import resolve_chat_model

    return model_fingerprint(resolve_chat_model(settings))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _who(user: str | None) -> str:
    if user:
        return user
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no user name in the environment (containers): the uid
        return f"uid {os.getuid()}"


def append_audit(settings, entry: dict) -> None:
    """Append one entry to the audit log (:data:`AUDIT` beside ``LIVE.json``; append-only, fsynced)."""
    p = settings.resolved_adapters_dir / AUDIT
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, default=str, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_audit(settings) -> list[dict]:
    """The promotions and rollbacks recorded in the audit log, oldest first.

    Each entry: ``{"at", "action": "promote"|"rollback", "user", "via": "cli"|"console"|..., "from", "to",
    "reference", "ok", "forced", "gate": [{"metric", "candidate", "reference", "tolerance", "ok"}],
    "load_check": {...}}`` (rollbacks without the gate fields). A line that is not JSON is skipped (logged).
    """
    p = settings.resolved_adapters_dir / AUDIT
    if not p.is_file():
        return []
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.error("%s line %d is not JSON; skipped", p, i)
    return out


def audit_sentence(e: dict) -> str:
    """One audit entry as a sentence."""
    src, dst = e.get("from") or "the base model", e.get("to") or "the base model"
    verb = "promoted" if e.get("action") == "promote" else "rolled back"
    tail = ""
    if e.get("action") == "promote":
        gate = ", ".join(f"{g['metric']} {g['candidate']:.4f} vs {g['reference']:.4f} {'ok' if g['ok'] else 'WORSE'}"
                         for g in e.get("gate") or [])
        tail = f" (gate vs {e.get('reference')}: {gate or 'no metrics'}{'; forced' if e.get('forced') else ''})"
    return f"{e.get('at')}: {e.get('user')} ({e.get('via')}) {verb} {src} -> {dst}{tail}"


def promote(ref: str | Path, settings, force: bool = False, user: str | None = None,
            via: str = "cli") -> GateDecision:
    """Make an adapter live if it loads, changes the model and passes the gate; the running server follows
    ``LIVE.json``. Each promotion is appended to the audit log (:func:`read_audit`).

    Args:
        ref: adapter name, folder or version.
        settings: service settings (registry, served model, gate tolerances, ``max_lora_rank``).
        force: promote even if the metrics are worse (the base-model and load checks still apply).
        user: who promotes (the console user; default: the OS user).
        via: where from (``"cli"``, ``"console"``), for the audit log.

    Returns:
        The :class:`GateDecision` (ok, or forced), with its :class:`LoadCheck`.

    Raises:
        AdapterLoadError: it does not load as the engine loads it, or changes nothing (:func:`check_adapter_loads`).
        AdapterError: not a LoRA adapter, trained on another base model than the served one,
            already live, or worse than the live one (the message lists each failing metric).
    """
    cand = resolve_adapter(ref, settings)
    if cand.kind != "peft-lora":
        raise AdapterError(f"adapter {cand.version!r} is a {cand.kind!r} checkpoint, not a LoRA adapter; "
                           "serve it as a model instead")
    served = served_model_fingerprint(settings)
    if cand.base_sha256 != served:
        raise AdapterLoadError(
            f"adapter {cand.version!r} was trained on base model {cand.base_id!r} (sha256 {cand.base_sha256[:12]}), "
            f"but the served model {settings.model!r} has sha256 {served[:12]}", "base_model"
        )
    live = live_adapter(settings)
    if live is not None and live.version == cand.version:
        raise AdapterError(f"adapter {cand.version!r} is already live")
    load = check_adapter_loads(cand, settings)
    if not any(cand.metrics.get(k) is not None for k in GATE_METRICS):
        if not force:
            raise AdapterError(f"adapter {cand.version!r} has no metrics to gate on (trained without held-out "
                               "dialogues); run `chatbot adapters eval` on it, or promote with --force")
        ref_name, ok, reasons, comp = "nothing (forced, no metrics)", False, ["no metrics"], {}
    else:
        ref_name, ref_metrics = _reference_metrics(cand, live, settings)
        ok, reasons, comp = check_gate(cand.metrics, ref_metrics, settings)
    decision = GateDecision(cand, ref_name, ok, reasons, comp, forced=force and not ok, load_check=load,
                            previous=live.version if live else None)
    if not ok and not force:
        raise AdapterError(f"promotion of {cand.version!r} refused (compared with {ref_name}): " + "; ".join(reasons))
    with _live_lock(settings):
        state = read_live(settings)
        now_live = state["current"] and state["current"].get("version")
        if now_live != decision.previous:
            raise AdapterError(f"promotion of {cand.version!r} refused: the live adapter changed to {now_live!r} "
                               f"while it was being checked against {decision.previous!r}; promote it again")
        if state["current"]:
            state["history"].append(state["current"])
        state["current"] = cand.entry()
        who = _who(user)
        state["current"]["promoted_by"] = who
        state["events"].append({"action": "promote", "version": cand.version, "reference": ref_name, "ok": ok,
                                "forced": decision.forced, "at": state["current"]["promoted_at"], "user": who})
        _write_live(settings, state)
        append_audit(settings, {"at": state["current"]["promoted_at"], "action": "promote", "user": who, "via": via,
                                "from": decision.previous, "to": cand.version, "reference": ref_name, "ok": ok,
                                "forced": decision.forced, "gate": decision.table(), "load_check": load.as_dict()})
    cand.live = True
    log.info("%s promoted %s (compared with %s)", who, cand.version, ref_name)
    return decision


def rollback(settings, user: str | None = None, via: str = "cli") -> AdapterRecord | None:
    """Make the previously live adapter live again (or none, when the first promotion is undone).

    Args:
        settings: service settings.
        user: who rolls back (default: the OS user); via: where from. Both go to the audit log.

    Returns:
        The adapter now live, or None when the base model is served again.

    Raises:
        AdapterError: nothing to roll back (no adapter is live and there is no history).
    """
    with _live_lock(settings):
        state = read_live(settings)
        if not state["current"] and not state["history"]:
            raise AdapterError("nothing to roll back: no adapter is live and no earlier one is recorded")
        undone = state["current"]
        state["current"] = state["history"].pop() if state["history"] else None
        now = state["current"]
        who, at = _who(user), _now()
        state["events"].append({"action": "rollback", "from": undone and undone["version"],
                                "version": now and now["version"], "at": at, "user": who})
        _write_live(settings, state)
        append_audit(settings, {"at": at, "action": "rollback", "user": who, "via": via,
                                "from": undone and undone["version"], "to": now and now["version"]})
    log.info("%s rolled back %s; live: %s", who, undone and undone["version"], now and now["version"])
    return live_adapter(settings)


def compare_with_live(ref: str | Path, settings, evaluate: bool = True) -> dict:
    """The candidate's metrics beside the live model's (the live adapter, or the base model) on the candidate's
    held-out dialogues, as the gate would compare them, without promoting.

    Args:
        evaluate: run the live adapter on the candidate's dialogues when no cached result exists
            (one evaluation, then cached in its ``adapter.json``); False: report it as not compared.

    Returns:
        ``{"candidate": version, "candidate_metrics", "reference": "base"|version, "reference_metrics"|None,
        "ok", "sentences": [...]}``.
    """
    cand = resolve_adapter(ref, settings)
    live = live_adapter(settings)
    if live is not None and live.version == cand.version:
        return {"candidate": cand.version, "candidate_metrics": cand.metrics, "reference": cand.version,
                "reference_metrics": cand.metrics, "ok": True, "sentences": [f"{cand.version} is the live adapter."]}
    ref_name = "base" if live is None else live.version
    if evaluate or (live is None and cand.base_metrics):
        ref_name, ref_metrics = _reference_metrics(cand, live, settings)
    elif live is None:
        ref_metrics = None
    else:  # what exists without running a model: the same splits, or a cached evaluation
        same = live.eval_config.get("split_sha256") == cand.eval_config.get("split_sha256")
        key = _eval_key(_load_dialogues_file(cand.path / "validation.jsonl"),
                        _load_dialogues_file(cand.path / "test.jsonl"), cand.eval_config, None)
        cached = (live.manifest.get("evals") or {}).get(key)
        ref_metrics = live.metrics if same and live.metrics else (cached["adapter"] if cached else None)
    if ref_metrics is None:
        return {"candidate": cand.version, "candidate_metrics": cand.metrics, "reference": ref_name,
                "reference_metrics": None, "ok": None,
                "sentences": [f"Not yet compared with {'the base model' if live is None else 'the live adapter ' + ref_name}"
                              f" on {cand.version}'s held-out dialogues (run `chatbot adapters eval` on it)."]}
    ok, reasons, comp = check_gate(cand.metrics, ref_metrics, settings)
    d = GateDecision(cand, ref_name, ok, reasons, comp)
    sentences = d.sentences()
    if not ok:
        sentences.append(f"Verdict: the gate would refuse it: {'; '.join(reasons)}.")
    return {"candidate": cand.version, "candidate_metrics": cand.metrics, "reference": ref_name,
            "reference_metrics": ref_metrics, "ok": ok, "sentences": sentences}


# --------------------------------------------------------------------------- serving: follow LIVE.json


class LiveAdapterWatcher:
    """Keeps an engine on the adapter ``LIVE.json`` names, without a restart, and says what is served.

    ``await watcher.sync(engine)`` costs one ``stat`` when nothing changed; when the
    pointer changed it calls ``engine.set_adapter(path, version)`` (or
    ``set_adapter(None, None)`` after a rollback to the base model). An adapter whose
    base-model hash differs from the engine's model is refused (logged; the engine
    keeps what it serves). An engine that needs time to serve it (vLLM started without
    LoRA support rebuilds itself in the background) reports ``pending_reason``; the
    adapter is then "live, not yet served" until the engine switches.

    The service calls ``sync`` before each generated turn, from ``/v1/models``, ``/healthz``,
    ``/metrics`` and a background poll (api lifespan), so what those report follows the switch.

    Args:
        settings: service settings (registry location).
        metrics: the service's :class:`chatbot.metrics.Metrics` (adapter gauges), or None.
    """

    #: Seconds between the background checks of ``LIVE.json`` (chatbot.api lifespan).
    POLL_S = 2.0

    def __init__(self, settings, metrics=None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._mtime: int | None = -1
        self._engine_fp: dict[str, str] = {}
        #: The last error met while applying the pointer (None when the last change applied).
        self.last_error: str | None = None
        self._lock = None  # asyncio.Lock, made in the serving event loop on first use
        self._reported: tuple | None = None

    def _pointer_mtime(self) -> int | None:
        try:
            return (self.settings.resolved_adapters_dir / LIVE).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    async def sync(self, engine) -> str | None:
        """Apply a changed pointer to ``engine``; return the engine's adapter version (None: base model).

        Never raises for a bad adapter or pointer: the error is logged and kept in
        ``last_error``, and the engine keeps serving what it served (a turn must not fail
        because a promotion went wrong); the same pointer is not retried until it changes.
        """
        from chatbot.errors import ChatbotError

        import asyncio

        mtime = self._pointer_mtime()
        if mtime == self._mtime:
            return engine.info.adapter_version
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # concurrent turns: one applies the change, the others wait for it
            mtime = self._pointer_mtime()
            if mtime == self._mtime:
                return engine.info.adapter_version
            try:
                return await self._apply(engine, mtime)
            except ChatbotError as exc:
                self.last_error = str(exc)
                self._mtime = mtime
                log.error("keeping adapter %s: %s", engine.info.adapter_version or "none (base model)", exc)
                if self.metrics is not None:
                    self.metrics.adapter_errors.inc()
                return engine.info.adapter_version
            finally:
                self.status(engine)

    async def _apply(self, engine, mtime) -> str | None:
        import asyncio

        cur = read_live(self.settings)["current"]
        want = cur["version"] if cur else None
        if want != engine.info.adapter_version or getattr(engine, "pending_adapter", None) not in (None, want):
            if cur is None:
                await engine.set_adapter(None, None)
            else:
                rec = await asyncio.to_thread(AdapterRecord.from_folder, cur["path"])
                model_path = getattr(engine, "model_path", None)
                if model_path and model_path not in self._engine_fp:
                    self._engine_fp[model_path] = await asyncio.to_thread(model_fingerprint, model_path)
                if model_path and rec.base_sha256 != self._engine_fp[model_path]:
                    raise AdapterError(f"not serving adapter {rec.version!r}: trained on base model sha256 "
                                       f"{rec.base_sha256[:12]}, the engine serves {self._engine_fp[model_path][:12]}")
                await engine.set_adapter(str(rec.path), rec.version)
            if engine.info.adapter_version == want:
                log.info("engine now serves adapter %s", want or "none (base model)")
            else:
                log.warning("adapter %s is live, not yet served: %s", want,
                            getattr(engine, "pending_reason", None) or "the engine has not switched")
        self._mtime = mtime
        self.last_error = None
        return engine.info.adapter_version

    def status(self, engine) -> dict:
        """What is live and what is served, and why they differ; updates the adapter gauges.

        Returns:
            ``{"live": version | None (LIVE.json), "served": version | None (the engine), "in_sync": bool,
            "pending": version the engine is preparing | None, "reason": why live is not served | None,
            "error": the watcher's last error | None}``. A disagreement is logged as an error once per
            (live, served) pair.
        """
        try:
            cur = read_live(self.settings)["current"]
            live, pointer_error = (cur["version"] if cur else None), None
        except AdapterError as exc:
            live, pointer_error = None, str(exc)
        served = engine.info.adapter_version
        pending = getattr(engine, "pending_adapter", None)
        in_sync = live == served and pointer_error is None
        reason = None
        if not in_sync:
            reason = (pointer_error or self.last_error or getattr(engine, "pending_reason", None)
                      or "the server has not applied LIVE.json yet (it does before its next reply)")
        st = {"live": live, "served": served, "in_sync": in_sync, "pending": pending, "reason": reason,
              "error": pointer_error or self.last_error}
        key = (live, served, reason)
        if key != self._reported:
            self._reported = key
            if not in_sync and (pointer_error or self.last_error):
                log.error("LIVE.json names adapter %s but the engine serves %s: %s", live or "none",
                          served or "none (base model)", reason)
        m = self.metrics
        if m is not None:
            m.adapter_mismatch.set(0 if in_sync else 1)
            m.adapter_served.clear()
            m.adapter_served.labels(served or "").set(1)
            m.adapter_live.clear()
            m.adapter_live.labels(live or "").set(1)
        return st


# --------------------------------------------------------------------------- compression


def _merged(rec: AdapterRecord, settings):
    model, tok = _load_with_adapter(rec, settings)
    return model.merge_and_unload(), tok


def merge_adapter(ref: str | Path, out: str | Path, settings) -> Path:
    """Write base + adapter merged (``W + B A * alpha / r``) as a full safetensors checkpoint.

    The folder loads with ``AutoModelForCausalLM`` and serves with either engine as a plain
    model (``CHATBOT_MODEL=<folder>``); ``merged.json`` records the adapter version and base.

    Raises:
        AdapterError, NotFoundError: as :func:`resolve_adapter`.
    """
    rec = resolve_adapter(ref, settings)
    model, tok = _merged(rec, settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out))
    (out / "merged.json").write_text(json.dumps(
        {"adapter": rec.version, "adapter_path": str(rec.path), "base_model": rec.base_id,
         "base_sha256": rec.base_sha256, "metrics": rec.metrics}, indent=1))
    return out


INT8_WEIGHTS = "model_int8.safetensors"
INT8_MANIFEST = "int8.json"


def quantize_int8(model):
    """Dynamic int8 quantization of every ``nn.Linear`` (weights int8 with one scale per output
    channel, activations quantized per batch at run time; ``torch.ao.quantization.quantize_dynamic``
    with ``per_channel_dynamic_qconfig``, fbgemm/x86 kernels). CPU only.

    Per channel, not per tensor: one scale per matrix cost most of the quality on the Bitext
    adapter (validation loss 1.09 -> 2.46; ``chatbot adapters export-int8 --measure``)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization warns that it is deprecated
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model.float().eval(), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)


def _is_qlinear(module) -> bool:
    return module._get_name() == "DynamicQuantizedLinear"


def int8_state(q) -> dict:
    """Plain tensors of a :func:`quantize_int8` model, for safetensors (no pickle).

    Each quantized linear ``name`` gives ``name.weight_int8`` (int8, ``(out, in)``),
    ``name.weight_scale`` (float64) and ``name.weight_zero_point`` (int64), both ``(out,)`` per channel
    (axis 0) or ``(1,)`` per tensor, and ``name.bias``; every other parameter and buffer is stored
    as is (tied weights once, under their first name).

    Raises:
        AdapterError: a layer is quantized with a scheme other than per-tensor or per-channel (axis 0).
    """
    import torch

    out: dict = {}
    qnames = set()
    for name, mod in q.named_modules():
        if _is_qlinear(mod):
            qnames.add(name)
            w, b = mod._weight_bias()
            if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                scale = torch.tensor([w.q_scale()], dtype=torch.float64)
                zp = torch.tensor([w.q_zero_point()], dtype=torch.int64)
            elif w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) and w.q_per_channel_axis() == 0:
                scale = w.q_per_channel_scales().to(torch.float64)
                zp = w.q_per_channel_zero_points().to(torch.int64)
            else:
                raise AdapterError(f"layer {name} is quantized with {w.qscheme()}, expected per-tensor or "
                                   "per-channel on axis 0")
            out[f"{name}.weight_int8"] = w.int_repr().contiguous()
            out[f"{name}.weight_scale"] = scale.contiguous()
            out[f"{name}.weight_zero_point"] = zp.contiguous()
            if b is not None:
                out[f"{name}.bias"] = b.detach().contiguous()
    seen = set()  # tied weights (lm_head = embeddings) are stored once, as the first name
    for key, t in q.state_dict().items():
        if isinstance(t, torch.Tensor) and not t.is_quantized and key.rsplit(".", 2)[0] not in qnames \
                and key.rsplit(".", 1)[0] not in qnames and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[key] = t.detach().contiguous()
    return out


def load_int8(folder: str | Path):
    """(model, tokenizer) from an :func:`export_int8` folder (CPU).

    The model is built from ``config.json``, quantized the same way, and given the
    stored int8 weights (``set_weight_bias``) and float parameters.

    Raises:
        AdapterError: the folder is not an int8 export.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / INT8_WEIGHTS).is_file():
        raise AdapterError(f"{str(folder)!r} is not an int8 export: it has no {INT8_WEIGHTS}")
    cfg = AutoConfig.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    q = quantize_int8(model)
    state = load_file(str(folder / INT8_WEIGHTS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, mod in q.named_modules():
            if _is_qlinear(mod):
                scale = state.pop(f"{name}.weight_scale")
                zp = state.pop(f"{name}.weight_zero_point")
                ints = state.pop(f"{name}.weight_int8")
                if scale.numel() == 1:  # the stored integers as they are: an exact round trip
                    w = torch._make_per_tensor_quantized_tensor(ints, float(scale[0]), int(zp[0]))
                else:
                    w = torch._make_per_channel_quantized_tensor(ints, scale, zp, 0)
                mod.set_weight_bias(w, state.pop(f"{name}.bias", None))
    # the rest are plain parameters and buffers (quantized layers refuse load_state_dict without their keys)
    persistent = set(q.state_dict())
    targets = {k: t for k, t in [*q.named_parameters(), *q.named_buffers()] if k in persistent}
    unexpected = sorted(set(state) - set(targets))
    missing = sorted(set(targets) - set(state))
    if unexpected or missing:
        raise AdapterError(f"{str(folder)!r} does not match its config: unexpected tensors {unexpected[:5]}, "
                           f"missing {missing[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            targets[key].copy_(value)
    tok = AutoTokenizer.from_pretrained(str(folder))
    from transformers import GenerationConfig

    with contextlib.suppress(OSError):
        q.generation_config = GenerationConfig.from_pretrained(str(folder))
    return q.eval(), tok


def _size_mb(paths) -> float:
    return sum(Path(p).stat().st_size for p in paths if Path(p).is_file()) / 2**20


def export_int8(ref: str | Path, out: str | Path, settings, measure: int = 0) -> dict:
    """Merge the adapter and write a dynamic-int8 checkpoint for CPU serving; optionally measure it.

    The folder holds ``config.json``, the tokenizer, ``model_int8.safetensors`` (int8 weights with
    their scales, :func:`int8_state`) and ``int8.json``; load it with :func:`load_int8`.

    Args:
        ref: adapter name, folder or version.
        out: folder to write.
        settings: service settings.
        measure: when > 0, compare the unmerged adapter (peft on the fp32 base), the merged fp32
            model and the int8 model on the adapter's validation split (loss) and on ``measure``
            test dialogues (ROUGE-L, self-stop rate, new tokens per second of batched greedy
            generation), plus their size on disk.

    Returns:
        The ``int8.json`` content (with ``comparison`` when measured).
    """

    rec = resolve_adapter(ref, settings)
    merged, tok = _merged(rec, settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged.config.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    if getattr(merged, "generation_config", None) is not None:
        merged.generation_config.save_pretrained(str(out))
    merged_state = {k: v.clone() for k, v in merged.state_dict().items()}
    q = quantize_int8(merged)
    from safetensors.torch import save_file

    save_file(int8_state(q), str(out / INT8_WEIGHTS), metadata={"format": "int8-dynamic"})
    report = {"adapter": rec.version, "base_model": rec.base_id, "base_sha256": rec.base_sha256,
              "method": "torch.ao dynamic int8 (nn.Linear weights int8 per output channel, activations per batch)",
              "size_mb": _size_mb([out / INT8_WEIGHTS])}
    if measure > 0:
        report["comparison"] = _compare_int8(rec, settings, merged_state, out, measure)
    _atomic_write(out / INT8_MANIFEST, report)
    return report


def _compare_int8(rec: AdapterRecord, settings, merged_state: dict, out: Path, n: int) -> dict:
    import torch

    validation = _load_dialogues_file(rec.path / "validation.jsonl")
    test = _load_dialogues_file(rec.path / "test.jsonl")
    cfg = {**rec.eval_config, "val_samples": n}
    res: dict = {}
    model, tok = _load_with_adapter(rec, settings)
    res["unmerged"] = _metrics_on(model, tok, validation, test, cfg, n)
    base_dir = Path(model.peft_config["default"].base_model_name_or_path or "")
    res["unmerged"]["size_mb"] = _size_mb([*base_dir.glob("*.safetensors"), rec.path / "adapter_model.safetensors"])
    merged = model.merge_and_unload()
    merged.load_state_dict(merged_state)
    res["merged_fp32"] = _metrics_on(merged, tok, validation, test, cfg, n)
    res["merged_fp32"]["size_mb"] = sum(v.numel() * v.element_size() for k, v in merged_state.items()
                                       if k != "lm_head.weight") / 2**20
    del model, merged
    q, qtok = load_int8(out)
    res["int8"] = _metrics_on(q, qtok, validation, test, cfg, n)
    res["int8"]["size_mb"] = _size_mb([out / INT8_WEIGHTS])
    res["threads"] = torch.get_num_threads()
    return res
