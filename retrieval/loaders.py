"""Read files into :class:`~retrieval.documents.Document` records.

Markdown and plain text are read here; front matter (``---`` YAML block) gives
``title`` and ``source``. Files that are empty, binary, not UTF-8 or of an
unsupported type are reported as :class:`Skipped`, never raised, so one bad file
never breaks an ingest.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from retrieval.documents import Document

log = logging.getLogger(__name__)

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.S)
_H1 = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.M)


@dataclass
class Skipped:
    """A file that was not ingested, and why (one line)."""

    path: str
    reason: str


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise ValueError("binary file (NUL bytes)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _split_front_matter(text: str) -> tuple[dict, str]:
    m = _FRONT_MATTER.match(text)
    if not m:
        return {}, text
    import yaml

    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return {}, text
    if not isinstance(meta, dict):
        return {}, text
    return meta, text[m.end() :]


def load_markdown(path: Path, doc_id: str) -> Document:
    """Read a Markdown file; title from front matter, else the first ``# `` heading, else the file name."""
    meta, body = _split_front_matter(_read_text(path))
    title = str(meta.pop("title", "") or "")
    if not title:
        m = _H1.search(body)
        title = m.group(1).strip() if m else path.stem.replace("_", " ").replace("-", " ")
    source = str(meta.pop("source", "") or path.as_posix())
    return Document(doc_id=doc_id, title=title, source=source, text=body, format="markdown", metadata=meta)


def load_text(path: Path, doc_id: str) -> Document:
    """Read a plain-text file; the title is the file name."""
    text = _read_text(path)
    return Document(doc_id=doc_id, title=path.stem.replace("_", " "), source=path.as_posix(), text=text, format="text")


#: Loader by lower-case file suffix.
LOADERS: dict[str, Callable[[Path, str], Document]] = {
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".txt": load_text,
    ".text": load_text,
}


def iter_files(paths: Iterable[Path]) -> Iterator[tuple[Path, Path]]:
    """Yield ``(file, root)`` for each file under ``paths`` (files or folders), sorted, hidden ones left out."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                    yield f, p
        elif p.is_file():
            yield p, p.parent
        else:
            raise FileNotFoundError(f"path does not exist: {p}")


def load_paths(paths: Iterable[Path]) -> tuple[list[Document], list[Skipped]]:
    """Load every supported file under ``paths``.

    Document ids are the path relative to the root that was named (``returns/size.md``),
    so the same folder ingested from another working directory keeps its ids.

    Returns:
        (documents, skipped files with one-line reasons)

    Raises:
        FileNotFoundError: a named path does not exist.
    """
    docs: list[Document] = []
    skipped: list[Skipped] = []
    for f, root in iter_files(paths):
        loader = LOADERS.get(f.suffix.lower())
        if loader is None:
            skipped.append(Skipped(str(f), f"unsupported file type {f.suffix or '(none)'!r}"))
            continue
        doc_id = f.relative_to(root).as_posix()
        try:
            doc = loader(f, doc_id)
        except (OSError, ValueError) as exc:
            skipped.append(Skipped(str(f), str(exc)))
            continue
        doc.metadata["path"] = str(f)
        if not doc.text.strip():
            skipped.append(Skipped(str(f), "empty document"))
            continue
        docs.append(doc)
    for s in skipped:
        log.warning("skipped %s: %s", s.path, s.reason)
    return docs, skipped
