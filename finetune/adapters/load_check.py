"""The load check: an adapter loads on the served base model the way the engine loads it, and changes it.

Run before every promotion (:func:`finetune.adapters.gate.promote`), ``--force`` included: peft would only
warn about adapter keys that match no module and serve the base model, and vLLM refuses a rank above its
``max_lora_rank``; both are caught here, before ``LIVE.json`` moves.

torch / transformers / peft are imported inside the functions that need them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from chatbot.errors import AdapterError
from finetune.adapters.registry import AdapterOptions, AdapterRecord
from finetune.base_model import resolve_base_model
from finetune.evaluate import render_prompt_ids
from chatbot.hashing import model_fingerprint

#: The fixed probe of the load check: the adapter must change the base model's logits on it.
PROBE_MESSAGES = [{"role": "system", "content": "You are a helpful customer-service assistant."},
                  {"role": "user", "content": "Hello, my order has not arrived yet. Can you help me?"}]
#: Largest |logit difference| (adapter on vs off) on the probe below which an adapter counts as doing nothing.
PROBE_MIN_CHANGE = 1e-4


class AdapterLoadError(AdapterError):
    """An adapter does not load the way the serving engine loads it, or loads and changes nothing.

    Attributes:
        check: which check failed: ``"target_modules"``, ``"keys"``, ``"rank"``, ``"base_model"``,
            ``"no_effect"`` or ``"load"``.
    """

    def __init__(self, message: str, check: str) -> None:
        super().__init__(message)
        self.check = check


def served_model_path(options: AdapterOptions) -> str:
    """Folder or hub id of the served base model (``options.model``, the embedded one converted).

    Raises:
        ModelAssetError: the embedded model could not be prepared.
    """
    return resolve_base_model(options.model, options.cache_dir)


def served_model_fingerprint(options: AdapterOptions) -> str:
    """Weight SHA-256 of the model the service serves (:func:`chatbot.hashing.model_fingerprint`)."""
    return model_fingerprint(served_model_path(options))


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


def check_adapter_loads(rec: AdapterRecord, options: AdapterOptions) -> LoadCheck:
    """Load the adapter the way the serving engine will and prove that it does something.

    On the served base model (``options.model``, float32 on CPU): the adapter's target modules exist,
    every tensor of ``adapter_model.safetensors`` lands on a module (peft would only warn "Found missing
    adapter keys" and serve the base model), its rank is within ``options.max_lora_rank`` (the vLLM
    engine's), and one forward pass of :data:`PROBE_MESSAGES` with and without it differs by at least
    :data:`PROBE_MIN_CHANGE` in some logit (an adapter whose ``lora_B`` tensors are all zero is the
    base model). Cost: one model load and two forward passes of a ~40-token prompt.

    Raises:
        AdapterLoadError: the first check that fails, named in ``check`` and in the message.
    """
    import torch
    from peft import PeftConfig, PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    v = rec.version
    try:
        cfg = PeftConfig.from_pretrained(str(rec.path))
    except Exception as exc:
        raise AdapterLoadError(f"adapter {v!r}: cannot read {str(rec.path / 'adapter_config.json')!r}: {exc}",
                               "load") from exc
    rank = max([int(getattr(cfg, "r", 0) or 0), *[int(r) for r in (getattr(cfg, "rank_pattern", None) or {}).values()]])
    max_rank = options.max_lora_rank
    if max_rank is not None and rank > max_rank:
        raise AdapterLoadError(f"adapter {v!r} has LoRA rank {rank}, above the vLLM engine's max_lora_rank "
                               f"{max_rank} (setting max_lora_rank): vLLM would refuse to load it", "rank")
    model_path = served_model_path(options)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    targets = cfg.target_modules
    leaf_names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    if isinstance(targets, (set, list, tuple)):
        absent = sorted(set(targets) - leaf_names)
        if absent:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
            raise AdapterLoadError(f"adapter {v!r} targets module(s) {absent} that the base model {options.model!r} "
                                   f"does not have (its linear modules: {linear})", "target_modules")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = PeftModel(base, cfg, adapter_name="probe", low_cpu_mem_usage=True)  # no init: loaded below
    except Exception as exc:
        raise AdapterLoadError(f"adapter {v!r} cannot be applied to the base model {options.model!r}: {exc}",
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
    ids = torch.tensor([render_prompt_ids(tok, PROBE_MESSAGES)])
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
