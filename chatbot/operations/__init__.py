"""Operator actions, for the console and the CLI (service layer): one module per concern.

* :mod:`~chatbot.operations.jobs` -- background jobs with progress (:class:`Jobs`);
* :mod:`~chatbot.operations.knowledge` -- uploads, indexing (:func:`ingest_paths`, :func:`reindex`), the retrieval
  evaluation, rendering the ABCD guidelines;
* :mod:`~chatbot.operations.adapters` -- the conversation log exported for training, LoRA SFT, the adapter
  registry (list, compare, evaluate, promote, roll back, history) and exports: the only place that knows the
  fine-tuning organ's adapter API;
* :mod:`~chatbot.operations.heads` -- training, loading and evaluating the routing heads.
"""

from __future__ import annotations

from chatbot.errors import ChatbotError
from chatbot.operations.adapters import (
    STORE_SPECS,
    adapter_history,
    adapter_options,
    adapter_target,
    answer_gate_options,
    check_trainable,
    compare_adapter,
    evaluate_adapter,
    export_adapter_int8,
    export_approved,
    export_conversation_log,
    gate_on_answers,
    install_shipped_adapter,
    list_adapters,
    merge_adapter,
    pack_adapter,
    promote_adapter,
    rollback_adapter,
    train_adapter,
    train_from_approved,
)
from chatbot.operations.grounded import build_grounded
from chatbot.operations.heads import head_config, head_report, load_head, load_splits, train_head
from chatbot.operations.jobs import Job, Jobs, Report, TqdmWatcher
from chatbot.operations.knowledge import (
    evaluate_retrieval,
    ingest_paths,
    reindex,
    render_guidelines,
    retrieval_table,
    save_uploads,
)

__all__ = ["ChatbotError", "Job", "Jobs", "Report", "STORE_SPECS", "TqdmWatcher", "adapter_history", "adapter_target",
           "adapter_options", "answer_gate_options", "check_trainable", "compare_adapter", "evaluate_adapter", "evaluate_retrieval",
           "build_grounded", "export_adapter_int8", "export_approved", "export_conversation_log", "gate_on_answers", "install_shipped_adapter", "head_config", "head_report",
           "ingest_paths", "list_adapters", "load_head", "load_splits", "merge_adapter", "pack_adapter", "promote_adapter", "reindex",
           "render_guidelines", "retrieval_table", "rollback_adapter", "save_uploads", "train_adapter",
           "train_from_approved", "train_head"]
