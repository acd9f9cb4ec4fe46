"""Training the chat model and its adapters: the conversation log exported for training, LoRA SFT, the adapter
registry (list, compare, evaluate, promote, roll back, history) and exports (merged, int8).

The fine-tuning organ (:mod:`finetune.sft`, :mod:`finetune.adapters`) is reached only here: everything the console
and the CLI need from it goes through these functions, so they change, and only they, when its API changes. Its
modules import torch, peft and transformers lazily, so importing the registry here is light.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Sequence
from pathlib import Path

from chatbot.errors import AdapterError, InvalidInputError, NotFoundError, TooLittleDataError
from chatbot.operations.jobs import Report, TqdmWatcher
from chatbot.options import adapter_options, registry_dir
from finetune.adapters import registry

log = logging.getLogger(__name__)



def export_approved(store, settings, out_dir: Path | None = None) -> tuple[Path, int]:
    """Write the approved transcripts as chat-SFT JSONL (system prompt first); return (path, examples).

    Raises:
        InvalidInputError: no conversation has an approved reply.
    """
    out_dir = Path(out_dir or settings.data_dir / "training")
    path = out_dir / f"approved-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}.jsonl"
    n = store.export_sft_jsonl(path, approved_only=True, system_prompt=settings.system_prompt)  # the store's export
    if not n:
        path.unlink(missing_ok=True)
        raise InvalidInputError("no approved transcripts: approve replies in the staff console first")
    return path, n


def check_trainable(store, settings) -> int:
    """The number of approved conversations, when there are enough to train on (``train_min_examples``).

    Raises:
        InvalidInputError: no conversation has an approved reply.
        TooLittleDataError: fewer than ``settings.train_min_examples``.
    """
    n = len(store.sft_examples(approved_only=True))
    if not n:
        raise InvalidInputError("no approved transcripts: approve replies in the staff console first")
    if n < settings.train_min_examples:
        raise TooLittleDataError(f"too little data to learn from: {n} approved conversation(s), at least "
                                 f"train_min_examples={settings.train_min_examples} are needed; approve more replies "
                                 "in the staff console", n, settings.train_min_examples)
    return n


def train_from_approved(store, settings, report: Report) -> dict:
    """Export approved transcripts and fine-tune an adapter on them (fine-tuning module, see below).

    Returns:
        ``{"summary", "data", "examples", ...what the trainer returned}``: ``summary`` states the split
        (examples per split, or the reference set), steps, epochs, learning rate, time and whether the
        adapter changes the model; ``run`` holds the same as numbers.

    Raises:
        InvalidInputError: nothing approved.
        TooLittleDataError: fewer approved conversations than ``train_min_examples``.
    """
    check_trainable(store, settings)
    report(0.02, "exporting approved transcripts")
    path, n = export_approved(store, settings)
    report(0.05, f"{n} approved conversation(s) in {path.name}; training")
    with TqdmWatcher(report, 0.05, 0.95, "training"):
        result = _finetune_train(path, settings, report)
    result = dict(result or {})
    result.setdefault("summary", f"trained on {n} approved conversation(s)")
    return {"data": str(path), "examples": n, **result}




#: ``--data`` names of the conversation log: every conversation, or only the reviewer-approved replies.
STORE_SPECS = ("store", "store:approved")


def export_conversation_log(specs: Sequence[str | Path], settings, out_dir: Path | None = None) -> list[str]:
    """Training or evaluation data specs with the conversation log exported to files: fine-tuning reads chat JSONL
    files, never the database.

    Each ``store`` (every conversation) or ``store:approved`` (only conversations with a reviewer-approved reply,
    cut after the last one) in ``specs`` becomes a chat-SFT JSONL file exported from the configured store
    (``settings.resolved_database_url``) into ``out_dir`` (default ``data_dir/training``) as ``store.jsonl`` /
    ``store-approved.jsonl``, replaced atomically; other specs are returned as they are.

    Raises:
        StoreError: the store cannot be read.
    """
    wanted = {str(s) for s in specs} & set(STORE_SPECS)
    if not wanted:
        return [str(s) for s in specs]
    from chatbot.store import Store

    out_dir = Path(out_dir or settings.data_dir / "training")
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    store = Store(settings.resolved_database_url)
    try:
        for spec in sorted(wanted):
            path = out_dir / f"{spec.replace(':', '-')}.jsonl"
            n = store.export_sft_jsonl(path, approved_only=spec == "store:approved")  # the store's one export
            log.info("exported %d conversation(s) of the log (%s) to %s", n, spec, path)
            files[spec] = str(path)
    finally:
        store.close()
    return [files.get(str(s), str(s)) for s in specs]


def _finetune_train(data: Path, settings, report: Report) -> dict:
    """Train a LoRA adapter on ``data`` (chat-SFT JSONL) with :func:`finetune.sft.train_sft` and its
    default :class:`~finetune.sft.SFTConfig` on the configured chat model, with the ``train_*`` settings
    (least steps, least examples, small-data threshold, evaluation size and reply budget) and the system prompt
    (put into the reference dialogues as into the export); the adapter folder goes into the adapter registry
    folder, named ``approved-<time>``."""
    name = data.stem
    res = train_adapter(settings, [data], registry_dir(settings) / name, {"system_prompt": settings.system_prompt},
                        name=name)
    m = dict(res.manifest or {})
    return {"summary": f"trained adapter {m.get('version', name)}: {m.get('summary', '')}".strip(),
            "adapter": m.get("version"), "folder": str(res.out_dir), "run": m.get("run"),
            "metrics": m.get("metrics"), "base_metrics": m.get("base_metrics")}


def list_adapters(settings) -> list[dict]:
    """Trained adapters (:func:`finetune.adapters.registry.list_adapters`) with their evaluation metrics:
    ``[{"name", "version", "live", "base", "metrics"}]`` (``base``: the base model's fingerprint, 12 hex digits;
    ``metrics``: the scalar ones)."""
    out = []
    for a in registry.list_adapters(adapter_options(settings)):
        metrics = {k: v for k, v in (getattr(a, "metrics", None) or {}).items() if not isinstance(v, (dict, list))}
        out.append({"name": getattr(a, "name", ""), "version": getattr(a, "version", ""),
                    "live": bool(getattr(a, "live", False)), "base": (getattr(a, "base_sha256", "") or "")[:12],
                    "metrics": metrics})
    return out


def answer_gate_options(settings):
    """The answer gate's :class:`~chatbot.answer_gate.AnswerGateOptions` from the ``adapter_gate_*`` settings."""
    from chatbot.answer_gate import AnswerGateOptions

    return AnswerGateOptions(max_correct_drop=settings.adapter_gate_max_correct_drop,
                             max_k_precision_drop=settings.adapter_gate_max_k_precision_drop,
                             max_unsupported_increase=settings.adapter_gate_max_unsupported_increase,
                             mode=settings.adapter_gate_answers_mode)


def adapter_target(settings, ref: str) -> tuple[str, str, str | None] | None:
    """What an engine loads for ``ref``, as :class:`chatbot.answer_gate.PinnedAdapter` takes it: ``(folder,
    version, merged checkpoint)`` of the registered adapter named (or of an adapter folder, or a version string;
    the checkpoint with ``adapter_serving="merged"``, written on first use), ``None`` for ``"base"`` (the base
    model without an adapter).

    Raises:
        NotFoundError: no such adapter. AdapterError: the folder is not a valid adapter.
    """
    if ref == "base":
        return None
    return _served_form(settings, registry.resolve_adapter(ref, adapter_options(settings)))


def _served_form(settings, rec) -> tuple[str, str, str | None]:
    """``(folder, version, merged checkpoint or None)``: how the servers load ``rec`` (with
    ``adapter_serving="merged"`` its merged checkpoint, written now if it has none)."""
    prepare = serving_preparation(settings)
    return str(rec.path), rec.version, (str(prepare(rec)) if prepare is not None else None)


def gate_on_answers(settings, name: str, assistant=None):
    """Run the answer gate (:func:`chatbot.answer_gate.answer_gate`) for adapter ``name`` against the live adapter
    (or the base model) on the first ``adapter_gate_answers_limit`` questions of ``adapter_gate_answers_dataset``,
    and keep the decision in the adapter's folder (``answer_gate.json``).

    ``assistant``: the one to answer with (its engine must load adapters); default: one built from the settings on
    an engine with LoRA support and a throw-away conversation log, closed afterwards.

    Returns:
        the :class:`~chatbot.answer_gate.AnswerGateDecision`.

    Raises:
        NotFoundError / AdapterError: no such adapter. DataError: the question set is malformed.
        EngineError: an adapter does not load.
    """
    import asyncio
    import tempfile

    from chatbot.answer_eval import load_answer_set
    from chatbot.answer_gate import answer_gate

    opts = adapter_options(settings)
    cand = registry.resolve_adapter(name, opts)
    live = registry.live_adapter(opts)
    cases = load_answer_set(settings.adapter_gate_answers_dataset)[: settings.adapter_gate_answers_limit]
    gate_opts = answer_gate_options(settings)
    reference = _served_form(settings, live) if live is not None else None
    s = settings.model_copy(update={"answer_mode": gate_opts.mode, "enable_lora": settings.adapter_serving == "lora"})

    async def run(a, own_engine: bool):
        if own_engine:
            await a.engine.start()
        try:
            return await answer_gate(a, cases, _served_form(settings, cand), reference, gate_opts,
                                     str(settings.adapter_gate_answers_dataset))
        finally:
            if own_engine:
                await a.engine.close()

    if assistant is not None:
        decision = asyncio.run(run(assistant, own_engine=False))
    else:
        from chatbot.service import Assistant

        with tempfile.TemporaryDirectory() as tmp:  # the gate's conversations stay out of the log
            a = Assistant.from_settings(s, database_url=f"sqlite:///{Path(tmp) / 'gate.db'}")
            try:
                decision = asyncio.run(run(a, own_engine=True))
            finally:
                a.store.close()
    decision.save(cand.path)
    return decision


def serving_preparation(settings):
    """What a promotion does once the adapter passed its checks, before ``LIVE.json`` names it: with
    ``adapter_serving="merged"`` (the default), write its merged checkpoint (:func:`finetune.adapters.export.
    write_merged`), which the servers' vLLM then loads instead of applying LoRA; None with ``"lora"``."""
    if settings.adapter_serving != "merged":
        return None
    from finetune.adapters.export import write_merged

    opts = adapter_options(settings)
    return lambda rec: write_merged(rec, opts)


def promote_adapter(settings, name: str, user: str | None = None, via: str = "console", force: bool = False,
                    judge_answers: bool | None = None, assistant=None) -> dict:
    """Make adapter ``name`` live if it loads as the engine loads it, changes the model and passes the evaluation
    gate (:func:`finetune.adapters.gate.promote`; ``force`` skips the gate, never the load check); recorded in the
    audit log under ``user`` and ``via`` (``"console"`` or ``"cli"``).

    With ``judge_answers`` (default ``settings.adapter_gate_answers``) the answer gate runs first
    (:func:`gate_on_answers`): a candidate that answers worse than the live model is refused with the side-by-side
    table, and ``LIVE.json`` is not touched; ``force`` promotes it anyway, and that is logged and kept in
    ``answer_gate.json`` (``forced``).

    Returns:
        ``{"live": version, "previous": version | None, "gate": table lines, "sentences": the verdict in words,
        "answer_gate": the answer gate's decision as a dict, or None}``.

    Raises:
        InvalidInputError: no name.
        AdapterError: the load check, the gate or the answer gate refused it, or no such adapter (the message says
            why, with the answer gate's table).
    """
    from finetune.adapters import gate

    if not name:
        raise InvalidInputError("adapter name must not be empty")
    judge_answers = settings.adapter_gate_answers if judge_answers is None else judge_answers
    answers = None
    if judge_answers:
        answers = gate_on_answers(settings, name, assistant)
        if not answers.ok:
            if not force:
                raise AdapterError("\n".join([*answers.sentences(), "", answers.table()]))
            answers.forced = True
            answers.save(registry.resolve_adapter(name, adapter_options(settings)).path)
            log.warning("adapter %s promoted by %s via %s although the answer gate refused it: %s", name, user, via,
                        " ".join(answers.reasons))
    decision = gate.promote(name, adapter_options(settings), force=force, user=user, via=via,
                            prepare=serving_preparation(settings))
    sentences = decision.sentences() + (answers.sentences() if answers is not None else [])
    return {"live": decision.candidate.version, "previous": decision.previous, "gate": decision.lines(),
            "sentences": sentences, "answer_gate": answers.to_dict() if answers is not None else None}


def install_shipped_adapter(settings) -> str:
    """Serve the adapter the product ships (``settings.shipped_adapter``) on a fresh install: copy it into the
    registry and promote it (load check and metric gate, :func:`finetune.adapters.gate.promote`), recorded in the
    audit log as ``via="setup"``. Done only while the registry has never had a promotion or a rollback, so an
    operator's choice (a rollback to the base model included) is never undone by setup.

    Returns:
        What happened, as a sentence for the setup output (also when nothing was done, or the shipped adapter
        cannot be served here: a base-model mismatch or a failed load check leaves the base model served).

    Raises:
        AdapterError: the registry's ``LIVE.json`` is unreadable.
    """
    from finetune.adapters import gate

    folder = settings.shipped_adapter
    if folder is None:
        return "shipped adapter: none"
    if not Path(folder).is_dir():
        log.warning("the shipped adapter folder %s does not exist; the base model is served", folder)
        return f"shipped adapter: {folder} does not exist (CHATBOT_SHIPPED_ADAPTER); the base model is served"
    opts = adapter_options(settings)
    if registry.read_live(opts)["events"]:
        live = registry.live_adapter(opts)
        return f"shipped adapter: left alone (the registry has promotions; live: {live.version if live else 'base'})"
    try:
        rec, _ = registry.install_adapter(folder, opts)
        decision = gate.promote(rec.name, opts, user="setup", via="setup", prepare=serving_preparation(settings))
    except (AdapterError, NotFoundError) as exc:
        log.warning("the shipped adapter %s is not served: %s", folder, exc)
        return f"shipped adapter: not served, the base model is ({exc})"
    return f"shipped adapter: {decision.candidate.version} is live (compared with {decision.reference})"


def rollback_adapter(settings, user: str | None = None, via: str = "console") -> dict:
    """Make the previously live adapter live again (:func:`finetune.adapters.registry.rollback`), recorded in the audit
    log under ``user`` and ``via``.

    Returns:
        ``{"live": version | None}`` (None: the base model).

    Raises:
        AdapterError: nothing to roll back to.
    """
    now = registry.rollback(adapter_options(settings), user=user, via=via)
    return {"live": now.version if now is not None else None}


def adapter_history(settings) -> list[dict]:
    """The audit log of promotions and rollbacks, newest first (:func:`finetune.adapters.registry.read_audit`), each
    with a ``sentence``."""
    return [{**e, "sentence": registry.audit_sentence(e)}
            for e in reversed(registry.read_audit(adapter_options(settings)))]


def compare_adapter(settings, name: str, evaluate: bool = True) -> dict:
    """The adapter beside the live model on its held-out dialogues (:func:`finetune.adapters.gate.compare_with_live`;
    with ``evaluate``, evaluates the live adapter once when no cached comparison exists)."""
    from finetune.adapters import gate

    if not name:
        raise InvalidInputError("adapter name must not be empty")
    return gate.compare_with_live(name, adapter_options(settings), evaluate=evaluate)


def evaluate_adapter(settings, name: str, data: Sequence[str | Path] | None = None, max_samples: int | None = None,
                     with_base: bool = True) -> dict:
    """Validation loss, perplexity, ROUGE-L and self-stop rate of adapter ``name`` (and of the base model with
    ``with_base``) on its own held-out dialogues, or on ``data`` (specs as for training: files, shared sets,
    ``store``/``store:approved``, exported first); on its own dialogues also beside the live adapter
    (:func:`finetune.adapters.evaluation.evaluate_adapter`, :func:`finetune.adapters.gate.compare_with_live`).

    Returns:
        the evaluation (``version``, ``adapter``, ``base``, ...) with ``compare_with_live`` (None with ``data``).

    Raises:
        AdapterError / NotFoundError: no such adapter. DataError: ``data`` is malformed.
    """
    from finetune.adapters import evaluation, gate

    opts = adapter_options(settings)
    files = export_conversation_log(data, settings) if data else None
    res = evaluation.evaluate_adapter(name, opts, data=files, max_samples=max_samples, with_base=with_base)
    cmp = None if data else gate.compare_with_live(name, opts)
    return {**res, "compare_with_live": cmp}


def merge_adapter(settings, name: str, out: str | Path) -> Path:
    """Write the base model with adapter ``name`` merged in as a full checkpoint at ``out``
    (:func:`finetune.adapters.export.merge_adapter`); returns the folder."""
    from finetune.adapters import export

    return export.merge_adapter(name, out, adapter_options(settings))


def pack_adapter(settings, name: str, out: str | Path, dtype: str = "float16", new_name: str | None = None) -> str:
    """Copy adapter ``name`` for shipping at ``out``, weights cast to ``dtype``, under ``new_name`` when given
    (:func:`finetune.adapters.export.pack_adapter`); returns the packed copy's version."""
    from finetune.adapters import export

    return export.pack_adapter(name, out, adapter_options(settings), dtype, new_name).version


def export_adapter_int8(settings, name: str, out: str | Path, measure: bool = False) -> dict:
    """Write adapter ``name`` merged and dynamically quantized to int8 for CPU serving at ``out``
    (:func:`finetune.adapters.export.export_int8`); with ``measure``, the report compares it with the unmerged and
    the merged fp32 model (``comparison``)."""
    from finetune.adapters import export

    return export.export_int8(name, out, adapter_options(settings), measure=measure)


def train_adapter(settings, data: Sequence[str | Path], out: str | Path, overrides: dict | None = None,
                  resume: bool = True, name: str | None = None):
    """LoRA SFT of the chat model on ``data`` (:func:`finetune.sft.train_sft`) into folder ``out``: the configured
    model and ``train_*`` settings (least steps and examples, small-data threshold, evaluation size and reply
    budget), then the non-None ``overrides`` (:class:`~finetune.sft.SFTConfig` fields, e.g. from the command
    line). ``store`` / ``store:approved`` in ``data`` are the conversation log, exported to files first.
    ``overrides["init_adapter"]`` (continue training that adapter) may name a registered adapter, a version or a
    folder.

    Returns:
        the :class:`~finetune.sft.TrainResult` (``manifest``, ``out_dir``, ``is_main_process``).

    Raises:
        DataError / TooLittleDataError: the data is malformed or too small. ConfigError: a bad configuration.
        NotFoundError / AdapterError: ``init_adapter`` names no adapter.
    """
    from finetune.sft import SFTConfig, train_sft

    cfg = {"base_model": settings.model, "min_steps": settings.train_min_steps,
           "min_examples": settings.train_min_examples, "small_data_threshold": settings.train_small_data_threshold,
           "max_eval_samples": settings.train_eval_samples, "eval_replies": settings.train_eval_replies,
           "eval_max_new_tokens": settings.train_eval_max_new_tokens}
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if cfg.get("init_adapter"):  # a registered name, a version or a folder -> the folder
        cfg["init_adapter"] = str(registry.resolve_adapter(cfg["init_adapter"], adapter_options(settings)).path)
    files = export_conversation_log(data, settings)
    return train_sft(files, out, SFTConfig(**cfg), resume=resume, cache_dir=settings.cache_dir, name=name)
