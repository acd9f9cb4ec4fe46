"""The promotion gate: an adapter goes live only if it loads, changes the model and is not worse.

:func:`promote` makes an adapter live if it was trained on the served base model (same weight SHA-256),
passes the load check (:mod:`finetune.adapters.load_check`), and its metrics are not worse than the live
adapter's -- or, with none live, the base model's -- on the *same* held-out dialogues (the candidate's
validation and test splits), within the tolerances of :class:`~finetune.adapters.registry.AdapterOptions`:
validation loss (lower is better), test ROUGE-L and self-stop rate (higher is better). When the live adapter
was evaluated on other dialogues it is re-evaluated on the candidate's, and the result is cached in its
``adapter.json``. Each promotion moves ``LIVE.json`` under the registry lock and is appended to the audit log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chatbot.errors import AdapterError
from finetune.adapters.evaluation import (
    GATE_METRICS,
    eval_key,
    evaluate_adapter,
    load_split,
    load_with_adapter,
    metrics_on,
)
from finetune.adapters.load_check import (
    AdapterLoadError,
    LoadCheck,
    check_adapter_loads,
    served_model_fingerprint,
)
from finetune.adapters.registry import (
    AdapterOptions,
    AdapterRecord,
    append_audit,
    live_adapter,
    live_lock,
    read_live,
    resolve_adapter,
    who,
    write_live,
)

log = logging.getLogger(__name__)

#: Metric names as people read them.
METRIC_NAMES = {"val_loss": "Validation loss", "rouge_l": "ROUGE-L of test replies",
                "self_stop_rate": "Self-stop rate of test replies"}


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


def check_gate(candidate: dict, reference: dict | None, options: AdapterOptions) -> tuple[bool, list[str], dict]:
    """Compare candidate metrics with reference metrics under the tolerances of ``options``.

    A metric the reference lacks is not compared; a metric the candidate lacks
    (while the reference has it) fails.

    Returns:
        (ok, reasons, comparison) as in :class:`GateDecision`.
    """
    reasons: list[str] = []
    comp: dict = {}
    reference = reference or {}
    for name, (higher, tol_field, setting) in GATE_METRICS.items():
        tol = float(getattr(options, tol_field))
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
            reasons.append(f"{name} {cand:.4f} is {word} the reference {ref:.4f} by more than {setting}={tol}")
    return not reasons, reasons, comp


def _same_eval(live: AdapterRecord, cand: AdapterRecord, keys: tuple[str, ...]) -> bool:
    return live.eval_config.get("split_sha256") == cand.eval_config.get("split_sha256") and all(
        live.eval_config.get(k) == cand.eval_config.get(k) for k in keys)


def _held_out(cand: AdapterRecord) -> tuple[list, list, str]:
    """The candidate's validation and test dialogues and the cache key of an evaluation on them."""
    validation, test = load_split(cand, "validation"), load_split(cand, "test")
    return validation, test, eval_key(validation, test, cand.eval_config, None)


def _cached(live: AdapterRecord, key: str) -> dict | None:
    """The live adapter's cached metrics under ``key`` (None when it was not evaluated so)."""
    entry = (live.manifest.get("evals") or {}).get(key)
    return entry["adapter"] if entry else None


def _reference_metrics(cand: AdapterRecord, live: AdapterRecord | None,
                       options: AdapterOptions) -> tuple[str, dict | None]:
    """Metrics of the live adapter (or the base model) on the candidate's held-out dialogues."""
    if live is None:
        if cand.base_metrics:
            return "base", cand.base_metrics
        res = evaluate_adapter(cand.path, options, with_base=True)
        return "base", res["base"]
    if _same_eval(live, cand, ("max_new_tokens", "replies", "repetition_penalty")) and live.metrics:
        return live.version, live.metrics
    validation, test, key = _held_out(cand)
    entry = (live.manifest.get("evals") or {}).get(key)
    if entry:
        return live.version, entry["adapter"]
    log.info("re-evaluating the live adapter %s on the candidate's held-out dialogues", live.version)
    model, tok = load_with_adapter(live, options)
    metrics = metrics_on(model, tok, validation, test, cand.eval_config)
    live.manifest.setdefault("evals", {})[key] = {"adapter": metrics, "candidate": cand.version}
    live.save_manifest()
    return live.version, metrics


def promote(ref: str | Path, options: AdapterOptions, force: bool = False, user: str | None = None,
            via: str = "cli", prepare: Callable[[AdapterRecord], object] | None = None) -> GateDecision:
    """Make an adapter live if it loads, changes the model and passes the gate; the running server follows
    ``LIVE.json``. Each promotion is appended to the audit log (:func:`finetune.adapters.registry.read_audit`).

    Args:
        ref: adapter name, folder or version.
        options: the registry, served model, gate tolerances and the engine's ``max_lora_rank``.
        force: promote even if the metrics are worse (the base-model and load checks still apply).
        user: who promotes (the console user; default: the OS user).
        via: where from (``"cli"``, ``"console"``), for the audit log.
        prepare: called with the adapter once every check has passed, before ``LIVE.json`` names it (e.g.
            :func:`finetune.adapters.export.write_merged`, so the servers find its merged checkpoint); what it
            raises stops the promotion.

    Returns:
        The :class:`GateDecision` (ok, or forced), with its :class:`LoadCheck`.

    Raises:
        AdapterLoadError: it does not load as the engine loads it, or changes nothing (:func:`check_adapter_loads`).
        AdapterError: not a LoRA adapter, trained on another base model than the served one,
            already live, or worse than the live one (the message lists each failing metric).
    """
    cand = resolve_adapter(ref, options)
    if cand.kind != "peft-lora":
        raise AdapterError(f"adapter {cand.version!r} is a {cand.kind!r} checkpoint, not a LoRA adapter; "
                           "serve it as a model instead")
    served = served_model_fingerprint(options)
    if cand.base_sha256 != served:
        raise AdapterLoadError(
            f"adapter {cand.version!r} was trained on base model {cand.base_id!r} (sha256 {cand.base_sha256[:12]}), "
            f"but the served model {options.model!r} has sha256 {served[:12]}", "base_model"
        )
    live = live_adapter(options)
    if live is not None and live.version == cand.version:
        raise AdapterError(f"adapter {cand.version!r} is already live")
    load = check_adapter_loads(cand, options)
    if not any(cand.metrics.get(k) is not None for k in GATE_METRICS):
        if not force:
            raise AdapterError(f"adapter {cand.version!r} has no metrics to gate on (trained without held-out "
                               "dialogues); run `chatbot adapters eval` on it, or promote with --force")
        ref_name, ok, reasons, comp = "nothing (forced, no metrics)", False, ["no metrics"], {}
    else:
        ref_name, ref_metrics = _reference_metrics(cand, live, options)
        ok, reasons, comp = check_gate(cand.metrics, ref_metrics, options)
    decision = GateDecision(cand, ref_name, ok, reasons, comp, forced=force and not ok, load_check=load,
                            previous=live.version if live else None)
    if not ok and not force:
        raise AdapterError(f"promotion of {cand.version!r} refused (compared with {ref_name}): " + "; ".join(reasons))
    if prepare is not None:
        prepare(cand)
    with live_lock(options):
        state = read_live(options)
        now_live = state["current"] and state["current"].get("version")
        if now_live != decision.previous:
            raise AdapterError(f"promotion of {cand.version!r} refused: the live adapter changed to {now_live!r} "
                               f"while it was being checked against {decision.previous!r}; promote it again")
        if state["current"]:
            state["history"].append(state["current"])
        state["current"] = cand.entry()
        by = who(user)
        state["current"]["promoted_by"] = by
        state["events"].append({"action": "promote", "version": cand.version, "reference": ref_name, "ok": ok,
                                "forced": decision.forced, "at": state["current"]["promoted_at"], "user": by})
        write_live(options, state)
        append_audit(options, {"at": state["current"]["promoted_at"], "action": "promote", "user": by, "via": via,
                               "from": decision.previous, "to": cand.version, "reference": ref_name, "ok": ok,
                               "forced": decision.forced, "gate": decision.table(), "load_check": load.as_dict()})
    cand.live = True
    log.info("%s promoted %s (compared with %s)", by, cand.version, ref_name)
    return decision


def compare_with_live(ref: str | Path, options: AdapterOptions, evaluate: bool = True) -> dict:
    """The candidate's metrics beside the live model's (the live adapter, or the base model) on the candidate's
    held-out dialogues, as the gate would compare them, without promoting.

    Args:
        evaluate: run the live adapter on the candidate's dialogues when no cached result exists
            (one evaluation, then cached in its ``adapter.json``); False: report it as not compared.

    Returns:
        ``{"candidate": version, "candidate_metrics", "reference": "base"|version, "reference_metrics"|None,
        "ok", "sentences": [...]}``.
    """
    cand = resolve_adapter(ref, options)
    live = live_adapter(options)
    if live is not None and live.version == cand.version:
        return {"candidate": cand.version, "candidate_metrics": cand.metrics, "reference": cand.version,
                "reference_metrics": cand.metrics, "ok": True, "sentences": [f"{cand.version} is the live adapter."]}
    ref_name = "base" if live is None else live.version
    if evaluate or (live is None and cand.base_metrics):
        ref_name, ref_metrics = _reference_metrics(cand, live, options)
    elif live is None:
        ref_metrics = None
    else:  # what exists without running a model: the same splits, or a cached evaluation
        cached = _cached(live, _held_out(cand)[2])
        ref_metrics = live.metrics if _same_eval(live, cand, ()) and live.metrics else cached
    if ref_metrics is None:
        return {"candidate": cand.version, "candidate_metrics": cand.metrics, "reference": ref_name,
                "reference_metrics": None, "ok": None,
                "sentences": [f"Not yet compared with {'the base model' if live is None else 'the live adapter ' + ref_name}"
                              f" on {cand.version}'s held-out dialogues (run `chatbot adapters eval` on it)."]}
    ok, reasons, comp = check_gate(cand.metrics, ref_metrics, options)
    d = GateDecision(cand, ref_name, ok, reasons, comp)
    sentences = d.sentences()
    if not ok:
        sentences.append(f"Verdict: the gate would refuse it: {'; '.join(reasons)}.")
    return {"candidate": cand.version, "candidate_metrics": cand.metrics, "reference": ref_name,
            "reference_metrics": ref_metrics, "ok": ok, "sentences": sentences}
