"""Chat adapters after training: the registry and its ``LIVE.json`` pointer, the load check, the gate, exports.

Import the module you need; this package imports none of them, so the serving side (which reads only the
registry) loads no model, evaluation or Trainer code:

* :mod:`finetune.adapters.registry` -- :class:`AdapterOptions`, :class:`AdapterRecord`, ``list_adapters``,
  ``resolve_adapter``, ``live_adapter``, ``read_live``, ``rollback``, the audit log (``read_audit``,
  ``audit_sentence``);
* :mod:`finetune.adapters.evaluation` -- ``evaluate_adapter`` on held-out dialogues (``GATE_METRICS``);
* :mod:`finetune.adapters.load_check` -- ``check_adapter_loads`` (loads as the engine loads it, changes the
  model), ``AdapterLoadError``;
* :mod:`finetune.adapters.gate` -- ``promote`` behind the gate, ``compare_with_live``, ``GateDecision``;
* :mod:`finetune.adapters.export` -- ``merge_adapter``, ``export_int8``, ``load_int8``.

The service follows ``LIVE.json`` with :class:`chatbot.adapter_watch.LiveAdapterWatcher`.
"""
