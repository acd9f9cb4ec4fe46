"""One index folder shared by several writers (API replicas on shared storage, the CLI beside a server):
two ingests that run at the same time both end up in the published index (issue 13, item 6)."""

from __future__ import annotations

import threading

from retrieval.index import load_version
from retrieval.ingest import ingest


class _RacingEmbedder:
    """The real embedder; the ingest running in the thread named ``first`` waits, when it embeds, for the other
    ingest to embed too (at most ``wait_s``), so both have read the same published version before either
    publishes, unless ingests into one folder are serialised (then the other waits for the first to finish)."""

    def __init__(self, embedder, wait_s: float = 10.0) -> None:
        self._embedder = embedder
        self._wait_s = wait_s
        self.second_embedding = threading.Event()

    def __getattr__(self, name):
        return getattr(self._embedder, name)

    def encode(self, texts, **kwargs):
        if threading.current_thread().name == "first":
            self.second_embedding.wait(self._wait_s)
        else:
            self.second_embedding.set()
        return self._embedder.encode(texts, **kwargs)


def test_two_ingests_at_once_into_one_folder_keep_both_documents(tmp_path, embedder):
    index_dir = tmp_path / "index"
    base, a, b = tmp_path / "base", tmp_path / "uploads-a", tmp_path / "uploads-b"
    for folder, name, text in [(base, "returns.md", "# Returns\n\nReturn any item within 30 days.\n"),
                               (a, "gift_cards.md", "# Gift cards\n\nA gift card never expires.\n"),
                               (b, "shipping.md", "# Shipping\n\nStandard delivery takes 3 to 5 business days.\n")]:
        folder.mkdir()
        (folder / name).write_text(text)
    ingest([base], index_dir, embedder)
    racing = _RacingEmbedder(embedder)
    reports, errors = {}, []

    def run(name, folder):
        try:
            reports[name] = ingest([folder], index_dir, racing)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=("first", a), name="first"),
               threading.Thread(target=run, args=("second", b), name="second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert reports["first"].published and reports["second"].published
    v = load_version(index_dir)
    assert sorted(d["title"] for d in v.manifest["documents"].values()) == ["Gift cards", "Returns", "Shipping"]
    assert sorted({c.title for c in v.chunks.values()}) == ["Gift cards", "Returns", "Shipping"]
    # the later version is built on the earlier one
    versions = sorted([reports["first"].version, reports["second"].version])
    assert v.version == versions[1] and v.manifest["parent_version"] == versions[0]
