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
from finetune.sft import MANIFEST, model_fingerprint

log = logging.getLogger(__name__)

LIVE = "LIVE.json"
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
    """

    candidate: AdapterRecord
    reference: str
    ok: bool
    reasons: list[str]
    comparison: dict
    forced: bool = False

    def lines(self) -> list[str]:
        """Human-readable report."""
        out = [f"gate: {self.candidate.version} vs {self.reference}"]
        for k, c in self.comparison.items():
            ref = "-" if c["reference"] is None else f"{c['reference']:.4f}"
            out.append(f"  {k:<15} candidate {c['candidate']:.4f}  reference {ref}  tolerance {c['tolerance']}"
                       f"  {'ok' if c['ok'] else 'WORSE'}")
        if self.forced and not self.ok:
            out.append("  forced past the gate")
        return out


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


def promote(ref: str | Path, settings, force: bool = False) -> GateDecision:
    """Make an adapter live if it passes the gate; the running server follows ``LIVE.json``.

    Args:
        ref: adapter name, folder or version.
        settings: service settings (registry, served model, gate tolerances).
        force: promote even if the metrics are worse (the base-model check still applies).

    Returns:
        The :class:`GateDecision` (ok, or forced).

    Raises:
        AdapterError: not a LoRA adapter, trained on another base model than the served one,
            already live, or worse than the live one (the message lists each failing metric).
    """
    cand = resolve_adapter(ref, settings)
    if cand.kind != "peft-lora":
        raise AdapterError(f"adapter {cand.version!r} is a {cand.kind!r} checkpoint, not a LoRA adapter; "
                           "serve it as a model instead")
    served = served_model_fingerprint(settings)
    if cand.base_sha256 != served:
        raise AdapterError(
            f"adapter {cand.version!r} was trained on base model {cand.base_id!r} (sha256 {cand.base_sha256[:12]}), "
            f"but the served model {settings.model!r} has sha256 {served[:12]}"
        )
    live = live_adapter(settings)
    if live is not None and live.version == cand.version:
        raise AdapterError(f"adapter {cand.version!r} is already live")
    if not any(cand.metrics.get(k) is not None for k in GATE_METRICS):
        if not force:
            raise AdapterError(f"adapter {cand.version!r} has no metrics to gate on (trained without held-out "
                               "dialogues); run `chatbot adapters eval` on it, or promote with --force")
        ref_name, ok, reasons, comp = "nothing (forced, no metrics)", False, ["no metrics"], {}
    else:
        ref_name, ref_metrics = _reference_metrics(cand, live, settings)
        ok, reasons, comp = check_gate(cand.metrics, ref_metrics, settings)
    decision = GateDecision(cand, ref_name, ok, reasons, comp, forced=force and not ok)
    if not ok and not force:
        raise AdapterError(f"promotion of {cand.version!r} refused (compared with {ref_name}): " + "; ".join(reasons))
    state = read_live(settings)
    if state["current"]:
        state["history"].append(state["current"])
    state["current"] = cand.entry()
    state["events"].append({"action": "promote", "version": cand.version, "reference": ref_name, "ok": ok,
                            "forced": decision.forced, "at": state["current"]["promoted_at"]})
    _write_live(settings, state)
    cand.live = True
    log.info("promoted %s (compared with %s)", cand.version, ref_name)
    return decision


def rollback(settings) -> AdapterRecord | None:
    """Make the previously live adapter live again (or none, when the first promotion is undone).

    Returns:
        The adapter now live, or None when the base model is served again.

    Raises:
        AdapterError: nothing to roll back (no adapter is live and there is no history).
    """
    state = read_live(settings)
    if not state["current"] and not state["history"]:
        raise AdapterError("nothing to roll back: no adapter is live and no earlier one is recorded")
    undone = state["current"]
    state["current"] = state["history"].pop() if state["history"] else None
    now = state["current"]
    state["events"].append({"action": "rollback", "from": undone and undone["version"],
                            "version": now and now["version"],
                            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    _write_live(settings, state)
    log.info("rolled back %s; live: %s", undone and undone["version"], now and now["version"])
    return live_adapter(settings)


# --------------------------------------------------------------------------- serving: follow LIVE.json


class LiveAdapterWatcher:
    """Keeps an engine on the adapter ``LIVE.json`` names, without a restart.

    ``await watcher.sync(engine)`` costs one ``stat`` when nothing changed; when the
    pointer changed it calls ``engine.set_adapter(path, version)`` (or
    ``set_adapter(None, None)`` after a rollback to the base model). An adapter whose
    base-model hash differs from the engine's model is refused (logged; the engine
    keeps what it serves).

    Args:
        settings: service settings (registry location).
    """

    def __init__(self, settings) -> None:
        self.settings = settings
        self._mtime: int | None = -1
        self._engine_fp: dict[str, str] = {}
        #: The last error met while applying the pointer (None when the last change applied).
        self.last_error: str | None = None
        self._lock = None  # asyncio.Lock, made in the serving event loop on first use

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
                return engine.info.adapter_version

    async def _apply(self, engine, mtime) -> str | None:
        import asyncio

        cur = read_live(self.settings)["current"]
        want = cur["version"] if cur else None
        if want != engine.info.adapter_version:
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
            log.info("engine now serves adapter %s", want or "none (base model)")
        self._mtime = mtime
        self.last_error = None
        return engine.info.adapter_version


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
