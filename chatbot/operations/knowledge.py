"""The knowledge base: uploads, indexing with the configured chunking and index options, the retrieval evaluation
and rendering the ABCD guidelines (the retrieval organ's entry points, for the console and the CLI)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from chatbot.errors import InvalidInputError
from chatbot.operations.jobs import Report, TqdmWatcher

log = logging.getLogger(__name__)



def save_uploads(files: Sequence[str | Path], uploads_dir: Path) -> list[Path]:
    """Copy uploaded files into ``uploads_dir`` (names kept; an existing file of the same name is replaced).

    Raises:
        InvalidInputError: no files, or a file does not exist.
    """
    if not files:
        raise InvalidInputError("upload at least one document")
    uploads_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        src = Path(f)
        if not src.is_file():
            raise InvalidInputError(f"uploaded file {str(src)!r} does not exist")
        dst = uploads_dir / src.name
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


def ingest_paths(settings, paths: Sequence[str | Path], embedder=None, index_dir: Path | None = None,
                 sync: bool = False, show_progress: bool = True):
    """Ingest files and folders into an index with the configured chunking and index options
    (:func:`retrieval.ingest.ingest`): ``index_dir`` (default the published ``settings.index_dir``), ``embedder``
    (default :func:`chatbot.options.build_embedder`); with ``sync``, documents gone from these folders are removed.

    Returns:
        the :class:`retrieval.ingest.IngestReport` (``summary()``, ``version``, ``skipped``, counts).

    Raises:
        DocumentNotFoundError: a path does not exist.
        RetrievalError: a document or setting cannot be indexed.
    """
    from chatbot.options import build_embedder, index_options
    from retrieval.ingest import ingest

    return ingest(list(paths), Path(index_dir or settings.index_dir), embedder or build_embedder(settings),
                  settings.chunk_tokens, settings.chunk_overlap, sync=sync, show_progress=show_progress,
                  index_options=index_options(settings))


def reindex(settings, embedder, paths: Sequence[Path], report: Report, sync: bool = False) -> dict:
    """Ingest ``paths`` into the published index (a new version when anything changed).

    The running server's retriever switches to the new version on its next search.

    Returns:
        ``{"summary", "version", "published", "added", "updated", "removed", "chunks_total",
        "chunks_embedded", "skipped"}``.
    """
    report(0.05, f"reading {len(paths)} path(s)")
    with TqdmWatcher(report, 0.1, 0.95, "embedding"):
        rep = ingest_paths(settings, paths, embedder, sync=sync, show_progress=True)
    report(1.0, rep.summary())
    return {"summary": rep.summary(), "version": rep.version, "published": rep.published, "added": rep.added,
            "updated": rep.updated, "removed": rep.removed, "chunks_total": rep.chunks_total,
            "chunks_embedded": rep.chunks_embedded, "skipped": [f"{s.path}: {s.reason}" for s in rep.skipped]}


def evaluate_retrieval(settings, dataset: str | Path, modes: Sequence[str], docs: Sequence[str | Path] | None = None,
                       index_dir: Path | None = None, data_root: Path | None = None, with_context: bool = False,
                       context_turns: int = 4, limit: int | None = None) -> dict:
    """Recall@k and MRR of each retrieval mode (``dense``, ``bm25``, ``hybrid``) on a labelled set
    (:func:`retrieval.evaluate.run_eval`), with the configured embedder, chunking and search options.

    ``dataset``: ``"dstc11_track5"`` (its knowledge, indexed under ``data_dir/eval/dstc11_track5``; ``data_root``
    holds ``dstc11_track5/``), or a JSONL file of ``{"query", "gold"}`` lines searched in the published index, or in
    ``docs`` indexed under ``data_dir/eval/<file stem>``. ``limit``: only the first N queries.

    Returns:
        ``run_eval``'s report (``dataset``, ``queries``, ``chunks``, ``index``, ``results`` per mode and k), with
        ``skipped``: the ``docs`` files that could not be read, as ``"path: reason"``.

    Raises:
        InvalidInputError: ``dataset`` is neither ``dstc11_track5`` nor a file.
        DataError / RetrievalError: the set or a setting is malformed.
    """
    from chatbot.options import build_embedder, search_options
    from retrieval.evaluate import load_dstc11_track5, load_jsonl, run_eval
    from retrieval.loaders import load_paths

    skipped: list[str] = []
    if str(dataset) == "dstc11_track5":
        root = Path(data_root) / "dstc11_track5" if data_root else None
        evalset = load_dstc11_track5(root, with_context=with_context, context_turns=context_turns)
        index_dir = index_dir or settings.data_dir / "eval" / "dstc11_track5"
    else:
        path = Path(dataset)
        if not path.is_file():
            raise InvalidInputError(f"--dataset must be dstc11_track5 or a JSONL file, got {str(dataset)!r}")
        evalset = load_jsonl(path)
        if docs:  # the set's own documents, indexed for it
            evalset.documents, bad = load_paths(docs, show_progress=True)
            skipped = [f"{sk.path}: {sk.reason}" for sk in bad]
            index_dir = index_dir or settings.data_dir / "eval" / path.stem
        else:
            index_dir = index_dir or settings.index_dir
    if limit:
        evalset.queries = evalset.queries[:limit]
    res = run_eval(evalset, build_embedder(settings), Path(index_dir), search_options(settings), list(modes),
                   chunk_tokens=settings.chunk_tokens, chunk_overlap=settings.chunk_overlap, show_progress=True)
    return {**res, "skipped": skipped}


def retrieval_table(results: dict[str, dict[str, float]]) -> str:
    """:func:`evaluate_retrieval`'s ``results`` as a plain-text table (:func:`retrieval.evaluate.format_table`):
    one row per mode; recall@k, hit@k, MRR, ms/query."""
    from retrieval.evaluate import format_table

    return format_table(results)


def render_guidelines(source: str | Path, out: str | Path) -> list[Path]:
    """Render the ABCD policy guidelines in ``source`` into Markdown documents in ``out``
    (:func:`retrieval.abcd.render_abcd_guidelines`); returns the files written."""
    from retrieval.abcd import render_abcd_guidelines

    return render_abcd_guidelines(Path(source), Path(out))
