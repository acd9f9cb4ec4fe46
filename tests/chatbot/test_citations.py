"""What a customer is told about the sources of an answer (issue 13, item 2): the document's title and,
where configured, its public URL (front matter ``url:`` or ``docs_base_url`` + the document's path in its
folder); never a path on the server, even for a document uploaded through the operator page."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from chatbot import operations as ops
from chatbot.service import document_url, public_source
from tests.chatbot.fakes import ScriptedEngine

GIFT = "# Gift cards\n\nGift cards never expire and can be used for any purchase in the store.\n"
HOURS = ("---\ntitle: Store opening hours\nurl: https://help.example.com/hours?lang=en\n---\n"
         "# Hours\n\nThe store opens at 9 am and closes at 6 pm, Monday to Saturday.\n")


def _served(tmp_path, embedder, **settings):
    """Documents uploaded the way the operator page does (copied into ``var/uploads``, then re-indexed),
    and an app on a scripted engine that searches them."""
    from chatbot.api import create_app
    from chatbot.config import Settings
    from chatbot.options import search_options
    from chatbot.service import Assistant
    from chatbot.store import Store
    from retrieval.retriever import Retriever

    s = Settings(data_dir=tmp_path / "var", routing=False, answer_mode="generate", top_k=2, min_score=-1.0,
                 **settings)
    picked = tmp_path / "picked"
    picked.mkdir()
    (picked / "gift_cards.md").write_text(GIFT)
    (picked / "store_hours.md").write_text(HOURS)
    uploads = s.data_dir / "uploads"
    ops.save_uploads([picked / "gift_cards.md", picked / "store_hours.md"], uploads)
    assert ops.reindex(s, embedder, [uploads], lambda p, m: None)["published"]
    a = Assistant(s, ScriptedEngine("Gift cards never expire [1]."), Retriever(s.index_dir, embedder, search_options(s)),
                  Store(s.resolved_database_url))
    return create_app(s, assistant=a, mount_ui=False), uploads


def _ask(client) -> tuple[dict, str]:
    r = client.post("/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "Do gift cards expire?"}], "max_tokens": 20})
    assert r.status_code == 200, r.text
    return r.json(), r.text


def test_an_uploaded_document_is_cited_by_title_and_public_url_never_by_server_path(tmp_path, embedder):
    app, uploads = _served(tmp_path, embedder)
    with TestClient(app) as client:
        body, raw = _ask(client)
        cites = {c["doc_id"]: c for c in body["citations"]}
        assert set(cites) == {"gift_cards.md", "store_hours.md"}
        assert (cites["gift_cards.md"]["title"], cites["gift_cards.md"]["url"]) == ("Gift cards", "")
        assert (cites["store_hours.md"]["title"], cites["store_hours.md"]["url"]) == (
            "Store opening hours", "https://help.example.com/hours?lang=en")
        assert cites["gift_cards.md"]["source"] == "gift_cards.md"
        for path in (str(tmp_path), str(uploads), "var/uploads", "/uploads/"):
            assert path not in raw
        with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Do gift cards expire?"}], "stream": True}) as r:
            streamed = "".join(r.iter_text())
        events = [json.loads(x[6:]) for x in streamed.splitlines() if x.startswith("data: {")]
        assert {(c["title"], c["url"]) for c in events[0]["citations"]} == {
            ("Gift cards", ""), ("Store opening hours", "https://help.example.com/hours?lang=en")}
        assert str(tmp_path) not in streamed and "var/uploads" not in streamed
        # what the store keeps for the staff console is the same
        stored = client.app.state.assistant.store.transcript(body["conversation_id"])
        assert str(tmp_path) not in json.dumps(stored, default=str)


def test_docs_base_url_gives_every_document_without_its_own_url_a_public_address(tmp_path, embedder):
    app, _ = _served(tmp_path, embedder, docs_base_url="https://help.example.com/docs/")
    with TestClient(app) as client:
        body, raw = _ask(client)
    urls = {c["doc_id"]: c["url"] for c in body["citations"]}
    assert urls == {"gift_cards.md": "https://help.example.com/docs/gift_cards.md",
                    "store_hours.md": "https://help.example.com/hours?lang=en"}  # its own url wins
    assert str(tmp_path) not in raw


def test_public_source_and_document_url():
    assert public_source("/srv/app/var/uploads/gift_cards.md", "gift_cards.md") == "gift_cards.md"
    assert public_source("data/kb/faq/returns.md", "faq/returns.md") == "faq/returns.md"
    assert public_source("C:\\shop\\docs\\a.md", "a.md") == "a.md"
    assert public_source("file:///srv/x.md", "x.md") == "x.md"
    assert public_source("ABCD guidelines.json: Returns", "returns.md") == "ABCD guidelines.json: Returns"
    assert public_source("https://help.example.com/size", "size.md") == "https://help.example.com/size"
    assert document_url("", "faq/gift cards.md", "https://h.example/docs") == (
        "https://h.example/docs/faq/gift%20cards.md")
    assert document_url("", "a.md", None) == ""
    assert document_url("https://h.example/a", "a.md", "https://b.example") == "https://h.example/a"


def test_docs_base_url_must_be_an_http_url():
    from pydantic import ValidationError

    from chatbot.config import Settings

    with pytest.raises(ValidationError, match="docs_base_url must be an http\\(s\\) URL .* got '/srv/docs'"):
        Settings(docs_base_url="/srv/docs")
    assert Settings(docs_base_url=" https://help.example.com/docs ").docs_base_url == "https://help.example.com/docs"
    assert Settings(docs_base_url="").docs_base_url is None
