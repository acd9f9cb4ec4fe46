"""Routing wired into the service and the API: each customer message is routed before it is stored,
and the decision is acted on (answer / ask for a slot / clarify / hand off), recorded and returned.

Stand-in heads (fakes.TableHead, fakes.SlotHead) keep the decisions exact; the last test runs the
shipped heads through the HTTP API.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from chatbot.router import Router, RoutingPolicy
from chatbot.service import HANDOFF_NOTICE
from tests.chatbot.fakes import ROUTING_POLICY, ScriptedEngine, SlotHead, TableHead, make_assistant

TABLE = {
    "Where is my parcel?": ("track_order", 0.97),
    "It is 12345678": ("track_order", 0.60),
    "Where is order 87654321?": ("track_order", 0.98),
    "How do I pay by card?": ("check_payment_methods", 0.95),
    "This is the worst service ever": ("complaint", 0.96),
}


def routed_assistant(tmp_path, retriever=None, **settings):
    engine = ScriptedEngine("Here is what I found [1].")
    a = make_assistant(tmp_path, engine, **settings)
    a.router = Router(RoutingPolicy.from_file(ROUTING_POLICY), TableHead(TABLE), SlotHead())
    a.retriever = retriever
    return a, engine


@dataclass
class Hit:  # the fields the service and prompt builder read from retrieval.documents.Hit
    chunk_id: int
    doc_id: str
    title: str
    source: str
    text: str
    score: float
    headings: tuple = ()


class FixedRetriever:
    """Returns one passage with a fixed score; records the queries."""

    version = "v-test"

    def __init__(self, score: float):
        self.score = score
        self.queries: list[str] = []

    def search_batch(self, queries, k, min_score=None):
        self.queries.extend(queries)
        return [[Hit(7, "shipping.md", "Shipping", "kb/shipping.md", "Orders ship in 2 days.", self.score)]
                for _ in queries]


def test_missing_slot_is_asked_for_then_answered_with_the_earlier_question(tmp_path):
    retriever = FixedRetriever(0.6)
    a, engine = routed_assistant(tmp_path, retriever)

    async def run():
        t1 = await a.respond(None, "Where is my parcel?")
        t2 = await a.respond(t1.conversation_id, "It is 12345678")
        return t1, t2

    t1, t2 = asyncio.run(run())
    assert (t1.route.action, t1.route.missing_slot, t1.finish_reason) == ("ask_slot", "order_id", "stop")
    assert t1.text == "Could you give me your order number, please?"
    assert (t2.route.action, t2.route.reason, t2.route.intent) == ("answer", "slot_filled", "track_order")
    assert [(s.type, s.value) for s in t2.route.slots] == [("order_id", "12345678")]
    assert len(engine.prompts) == 1  # only the answer was generated
    # the retrieval query of the answer carries the earlier question
    assert retriever.queries[-1] == "Where is my parcel? It is 12345678"
    rows = a.store.messages(t1.conversation_id)
    assert [(m.role, m.intent, m.action, m.engine) for m in rows] == [
        ("user", "track_order", "ask_slot", None),
        ("assistant", None, "ask_slot", "router"),
        ("user", "track_order", "answer", None),
        ("assistant", None, None, "scripted"),
    ]
    assert rows[2].slots[0]["type"] == "order_id" and rows[2].confidence == pytest.approx(0.60)
    body, _ = a.metrics.render()
    assert b'chatbot_intents_total{intent="track_order"} 2.0' in body


def test_out_of_scope_clarifies_once_then_hands_off(tmp_path):
    a, engine = routed_assistant(tmp_path)

    async def run():
        t1 = await a.respond(None, "Write me a poem about the sea")
        t2 = await a.respond(t1.conversation_id, "What is the capital of France?")
        t3 = await a.respond(t1.conversation_id, "Hello?")
        return t1, t2, t3

    t1, t2, t3 = asyncio.run(run())
    assert (t1.route.action, t1.route.reason, t1.held) == ("clarify", "out_of_scope", False)
    assert t1.text == RoutingPolicy.from_file(ROUTING_POLICY).clarify_message
    assert (t2.route.action, t2.route.reason, t2.held, t2.status) == (
        "handoff", "clarifications_exhausted:out_of_scope", True, "handoff")
    assert t2.text == HANDOFF_NOTICE and t3.held and t3.status == "handoff"
    assert engine.prompts == []
    cid = t1.conversation_id
    assert a.store.get_conversation(cid).status == "handoff"
    assert [(m.role, m.action) for m in a.store.messages(cid)] == [
        ("user", "clarify"), ("assistant", "clarify"), ("user", "handoff"), ("user", "held")]
    body, _ = a.metrics.render()
    assert b'chatbot_handoffs_total{reason="clarifications_exhausted:out_of_scope"} 1.0' in body


def test_a_close_passage_answers_an_out_of_scope_message(tmp_path):
    a, engine = routed_assistant(tmp_path, FixedRetriever(0.55), route_grounded_min_score=0.4)
    t = asyncio.run(a.respond(None, "my promo code is rejected"))
    assert (t.route.action, t.route.reason, t.route.intent) == ("answer", "grounded:out_of_scope", "out_of_scope")
    assert t.text == "Here is what I found [1]." and len(engine.prompts) == 1
    # below the score, or with grounding off, the policy's clarify stands
    for score, setting in ((0.3, 0.4), (0.9, None)):
        b, _ = routed_assistant(tmp_path / f"{score}", FixedRetriever(score), route_grounded_min_score=setting)
        assert asyncio.run(b.respond(None, "my promo code is rejected")).route.action == "clarify"


def test_complaint_and_human_request_hand_off_at_once_without_retrieval(tmp_path):
    retriever = FixedRetriever(0.9)
    a, engine = routed_assistant(tmp_path, retriever)
    t1 = asyncio.run(a.respond(None, "This is the worst service ever"))
    t2 = asyncio.run(a.respond(None, "can I talk to a real person"))
    assert (t1.route.reason, t1.status) == ("handoff_intent", "handoff")
    assert (t2.route.reason, t2.status) == ("human_request", "handoff")
    assert retriever.queries == [] and engine.prompts == []
    queue = a.store.handoff_queue()
    assert sorted(h["conversation_id"] for h in queue) == sorted([t1.conversation_id, t2.conversation_id])


def test_without_a_router_every_message_is_answered(tmp_path):
    a = make_assistant(tmp_path)
    t = asyncio.run(a.respond(None, "Write me a poem about the sea"))
    assert t.route is None and t.finish_reason == "stop" and not t.held
    assert a.store.messages(t.conversation_id)[0].action is None


def test_api_returns_the_route_and_streams_it_first(tmp_path):
    from chatbot.api import create_app

    a, _ = routed_assistant(tmp_path)
    with TestClient(create_app(a.settings, assistant=a, mount_ui=False)) as client:
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Where is order 87654321?"}], "max_tokens": 20})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "bot"
        route = body["route"]
        assert (route["intent"], route["action"], route["reason"]) == ("track_order", "answer", "policy")
        assert route["confidence"] == pytest.approx(0.98)
        assert route["slots"] == [{"type": "order_id", "value": "87654321", "start": 15, "end": 23, "score": 0.99}]
        assert body["choices"][0]["message"]["content"] == "Here is what I found [1]."

        with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "I want to talk to a human"}], "stream": True}) as s:
            import json

            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert events[0]["route"]["action"] == "handoff" and events[0]["status"] == "handoff"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == HANDOFF_NOTICE
        assert events[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.slow
def test_shipped_heads_route_through_the_api(tmp_path):
    """The committed heads and policy, as ``make run`` serves them (no retrieval here)."""
    from chatbot.api import create_app

    a = make_assistant(tmp_path)
    a.router = Router.from_settings(a.settings)
    with TestClient(create_app(a.settings, assistant=a, mount_ui=False)) as client:
        def chat(text, cid=None):
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": 20}
            if cid:
                body["conversation_id"] = cid
            return client.post("/v1/chat/completions", json=body).json()

        human = chat("I want to talk to a human")
        assert (human["route"]["action"], human["status"]) == ("handoff", "handoff")
        assert client.get(f"/v1/conversations/{human['conversation_id']}").json()["status"] == "handoff"
        track = chat("where is my order 00123842?")
        assert (track["route"]["intent"], track["route"]["action"]) == ("track_order", "answer")
        assert [(s["type"], s["value"]) for s in track["route"]["slots"]] == [("order_id", "00123842")]
        off = chat("Write me a poem about the sea")
        assert (off["route"]["intent"], off["route"]["action"]) == ("out_of_scope", "clarify")
        assert off["choices"][0]["message"]["content"] == a.router.policy.clarify_message


def test_carried_over_slots_do_not_redact_the_next_message(tmp_path):
    """A filled ask_slot carries the first message's slots; their offsets must not cut into the second."""
    from finetune.heads import Slot

    class NameAndNumberHead(SlotHead):
        labels = ("O", "B-order_id", "I-order_id", "B-person_name", "I-person_name")

        def predict(self, texts):
            out = super().predict(texts)
            for t, slots in zip(texts, out):
                i = t.find("John Smith")
                if i >= 0:
                    slots.append(Slot("person_name", "John Smith", i, i + 10, 0.99))
            return out

    table = dict(TABLE, **{"Hi, this is John Smith. Where is my parcel?": ("track_order", 0.97),
                           "My order number is 12345678, thanks": ("track_order", 0.9)})
    a, _ = routed_assistant(tmp_path)
    a.router = Router(RoutingPolicy.from_file(ROUTING_POLICY), TableHead(table), NameAndNumberHead())

    async def run():
        t1 = await a.respond(None, "Hi, this is John Smith. Where is my parcel?")
        return t1, await a.respond(t1.conversation_id, "My order number is 12345678, thanks")

    t1, t2 = asyncio.run(run())
    assert (t1.route.action, t2.route.reason) == ("ask_slot", "slot_filled")
    assert {s.type for s in t2.route.slots} == {"person_name", "order_id"}
    users = [m for m in a.store.messages(t1.conversation_id) if m.role == "user"]
    assert users[0].text == "Hi, this is [NAME]. Where is my parcel?"
    assert users[1].text == "My order number is 12345678, thanks"  # untouched by the carried name's offsets


def test_a_failing_router_answers_unrouted_and_counts_it(tmp_path):
    class BrokenHead(TableHead):
        def predict(self, texts, threshold=None):
            raise RuntimeError("head exploded")

    a, engine = routed_assistant(tmp_path)
    a.router = Router(RoutingPolicy.from_file(ROUTING_POLICY), BrokenHead({}), SlotHead())
    t = asyncio.run(a.respond(None, "Where is my parcel?"))
    assert t.route is None and t.text == "Here is what I found [1]." and len(engine.prompts) == 1
    assert [m.role for m in a.store.messages(t.conversation_id)] == ["user", "assistant"]
    body, _ = a.metrics.render()
    assert b"chatbot_routing_errors_total 1.0" in body


def test_grounding_never_overrides_a_configured_handoff():
    from chatbot.router import RouteDecision

    configured = RouteDecision("out_of_scope", 0.9, [], "handoff", "out_of_scope")
    assert Router.ground(configured, 0.9, 0.4) is configured
    exhausted = RouteDecision("out_of_scope", 0.9, [], "handoff", "clarifications_exhausted:out_of_scope")
    assert (Router.ground(exhausted, 0.9, 0.4).action, Router.ground(exhausted, 0.3, 0.4).action) == (
        "answer", "handoff")


def test_client_sent_history_completes_a_pending_slot(tmp_path):
    from chatbot.engines.base import ChatMessage

    a, engine = routed_assistant(tmp_path)
    history = [ChatMessage("user", "Where is my parcel?"),
               ChatMessage("assistant", "Could you give me your order number, please?")]
    t = asyncio.run(a.respond(None, "It is 12345678", history=history))
    assert (t.route.action, t.route.reason, t.route.intent) == ("answer", "slot_filled", "track_order")
    assert len(engine.prompts) == 1


def test_models_lists_the_base_model_and_registered_adapters(tmp_path):
    import json

    from chatbot.api import create_app

    a = make_assistant(tmp_path)
    d = a.settings.resolved_adapters_dir / "a1"
    d.mkdir(parents=True)
    (d / "adapter.json").write_text(json.dumps({
        "name": "a1", "version": "a1-20260101-abcd", "kind": "peft-lora", "created_at": "2026-01-01T00:00:00Z",
        "base_model": {"id": "scripted-model", "sha256": "x"}, "metrics": {}}))
    with TestClient(create_app(a.settings, assistant=a, mount_ui=False)) as client:
        data = client.get("/v1/models").json()["data"]
        before = client.get("/metrics").text
    assert [(m["id"], m.get("parent"), m["served"]) for m in data] == [
        ("scripted-model", None, True), ("a1-20260101-abcd", "scripted-model", False)]
    assert data[1]["live"] is False
    assert 'chatbot_requests_total{endpoint="/v1/models",status="200"} 1.0' in before


def test_unpaired_surrogates_are_dropped_and_an_unhandled_error_is_counted_as_500(tmp_path):
    from chatbot.api import create_app
    from chatbot.service import clean_message

    assert clean_message("refund \udfff please", 100) == "refund  please"
    a, engine = routed_assistant(tmp_path)
    with TestClient(create_app(a.settings, assistant=a, mount_ui=False), raise_server_exceptions=False) as client:
        ok = client.post("/v1/chat/completions", content='{"messages":[{"role":"user","content":"Where is order 87654321 \\udfff?"}]}',
                         headers={"content-type": "application/json"})
        assert ok.status_code == 200, ok.text
        stored = a.store.messages(ok.json()["conversation_id"])[0].text
        assert stored == "Where is order 87654321 ?"

        async def broken(*args, **kwargs):
            raise RuntimeError("bug")

        a.start_turn = broken
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 500
        body = client.get("/metrics").text
    assert 'chatbot_requests_total{endpoint="/v1/chat/completions",status="500"} 1.0' in body
    assert 'chatbot_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in body
