"""Routing policy and Router: pure decision rules, policy validation, and the shipped heads."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatbot.config import Settings
from chatbot.errors import ConfigError, InvalidInputError, NotFoundError
from chatbot.router import Reason, RouteDecision, Router, RoutingPolicy, plan
from tests.chatbot.fakes import SlotHead, TableHead

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "data" / "routing.yaml"


@pytest.fixture
def policy() -> RoutingPolicy:
    return RoutingPolicy.from_file(POLICY)


def router(policy, table) -> Router:
    return Router(policy, TableHead(table), SlotHead())


def test_human_request_patterns_hand_off_even_when_the_head_disagrees(policy):
    r = router(policy, {"I want to talk to a human": ("track_order", 0.97)})
    d = r.route("I want to talk to a human")
    assert (d.action, d.reason) == ("handoff", "human_request")
    for text in ["can I speak with a real person?", "agent please", "Representative", "connect me to someone"]:
        assert policy.asks_for_human(text), text
    for text in ["where is my order", "how do I change my shipping address", "I am a person who likes shoes"]:
        assert not policy.asks_for_human(text), text


def test_complaint_hands_off_and_human_intent_hands_off(policy):
    r = router(policy, {"this is awful service": ("complaint", 0.95), "get me an agent": ("contact_human_agent", 0.9)})
    assert r.route("this is awful service").action == "handoff"
    assert r.route("this is awful service").reason == "handoff_intent"
    d = r.route("get me an agent")
    assert (d.action, d.intent) == ("handoff", "contact_human_agent")


def test_missing_slot_is_asked_then_filled_on_the_next_turn(policy):
    r = router(policy, {"cancel my order": ("cancel_order", 0.95), "it's 00123842": ("out_of_scope", 0.6)})
    first = r.route("cancel my order")
    assert (first.action, first.missing_slot, first.intent) == ("ask_slot", "order_id", "cancel_order")
    second = r.route("it's 00123842", previous=first)
    assert (second.action, second.reason, second.intent) == ("answer", "slot_filled", "cancel_order")
    assert [(s.type, s.value, s.start, s.end) for s in second.slots] == [("order_id", "00123842", 5, 13)]
    direct = r.route("cancel order 00123842", previous=None)
    # unknown text -> out of scope in the stand-in; with the number in the table it answers
    r2 = router(policy, {"cancel order 00123842": ("cancel_order", 0.99)})
    direct = r2.route("cancel order 00123842")
    assert (direct.action, direct.reason) == ("answer", "policy") and direct.slots[0].value == "00123842"


def test_out_of_scope_clarifies_once_then_hands_off(policy):
    r = router(policy, {"blah": ("out_of_scope", 0.99), "hmm": ("track_order", 0.2)})
    first = r.route("blah")
    assert (first.action, first.reason, first.clarifications) == ("clarify", "out_of_scope", 1)
    second = r.route("blah", previous=first)
    assert (second.action, second.reason) == ("handoff", "clarifications_exhausted:out_of_scope")
    low = r.route("hmm")
    assert (low.action, low.reason, low.top_intent) == ("clarify", "low_confidence", "track_order")
    assert r.route("hmm", previous=low).action == "handoff"
    # an answered turn resets the count
    ok = router(policy, {"track": ("track_order", 0.99), "blah": ("out_of_scope", 0.99)})
    answered = RouteDecision("track_order", 0.99, [], "answer", "policy")
    assert ok.route("blah", previous=answered).action == "clarify"


def test_threshold_override_from_settings_reaches_the_head(policy):
    r = Router(policy, TableHead({"x": ("track_order", 0.7)}), SlotHead(), threshold=0.8)
    assert r.route("x").reason == "low_confidence"
    r = Router(policy, TableHead({"x": ("track_order", 0.7)}), SlotHead(), threshold=0.1)
    assert (r.route("x").action, r.route("x").missing_slot) == ("ask_slot", "order_id")
    with pytest.raises(ConfigError, match="intent_threshold"):
        Router(policy, threshold=2.0)


def test_decision_round_trips_as_json(policy):
    r = router(policy, {"cancel order 1234567": ("cancel_order", 0.9)})
    d = r.route("cancel order 1234567")
    again = RouteDecision.from_dict(d.to_dict())
    assert again == d and d.to_dict()["slots"][0]["value"] == "1234567"


def test_policy_validation_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"intents.cancel_order.action must be one of"):
        RoutingPolicy.from_dict({"intents": {"cancel_order": {"action": "explode"}}})
    with pytest.raises(ConfigError, match=r"max_clarifications"):
        RoutingPolicy.from_dict({"max_clarifications": -1})
    with pytest.raises(ConfigError, match=r"unknown keys \['colour'\]"):
        RoutingPolicy.from_dict({"colour": "blue"})
    with pytest.raises(NotFoundError):
        RoutingPolicy.from_file(tmp_path / "none.yaml")
    r = Router(RoutingPolicy.from_dict({"intents": {"teleport": "answer"}}), TableHead({}), None)
    with pytest.raises(ConfigError, match="teleport"):
        r.route("hello")
    with pytest.raises(InvalidInputError, match="text"):
        router(RoutingPolicy(), {}).route(None)  # type: ignore[arg-type]


def test_settings_fields_and_factory(tmp_path):
    s = Settings(intent_threshold=0.4)
    assert s.routing_policy == POLICY and s.intent_head_dir == ROOT / "data" / "heads" / "intent"
    r = Router.from_settings(s)
    assert r.threshold == 0.4 and r.policy.max_clarifications == 1
    with pytest.raises(Exception, match="intent_threshold"):
        Settings(intent_threshold=1.5)


# ---------------------------------------------------------------- the shipped heads


@pytest.fixture(scope="module")
def shipped_router():
    return Router.from_settings(Settings())


@pytest.mark.slow
def test_shipped_talk_to_a_human_routes_to_handoff(shipped_router):
    d = shipped_router.route("I want to talk to a human")
    assert (d.action, d.reason) == ("handoff", "human_request")
    # the intent head alone (no pattern match) also knows the request
    p = shipped_router.intent_head.predict(["I want to talk to a human"])[0]
    assert p.label == "contact_human_agent"


@pytest.mark.slow
def test_shipped_routes_slots_off_topic_and_policy(shipped_router):
    batch = shipped_router.route_batch([
        "I want to cancel my order",
        "I want to cancel order 00123842",
        "what's the weather like in paris tomorrow",
        "I am very unhappy with your service, I want to file a complaint",
        "",
        "😀😀😀",
    ])
    ask, ans, off, comp, empty, emoji = batch
    assert (ask.action, ask.missing_slot) == ("ask_slot", "order_id")
    assert ans.action == "answer" and [(s.type, s.value) for s in ans.slots] == [("order_id", "00123842")]
    assert (off.action, off.intent) == ("clarify", "out_of_scope")
    assert comp.action == "handoff" and comp.intent == "complaint"
    assert empty.action in ("clarify", "answer") and emoji.action in ("clarify", "answer")
    again = shipped_router.route("what's the weather like in paris tomorrow", previous=off)
    assert again.action == "handoff"


def test_greetings_and_thanks_are_answered_and_never_escalate(policy):
    r = router(policy, {})  # every message is out of scope for the stand-in head
    for text in ("Hi", "hello there!", "Good morning", "thanks!", "Thank you so much", "ok", "bye"):
        d = r.route(text)
        assert (d.action, d.reason, d.clarifications) == ("answer", "smalltalk", 0), text
    off = r.route("blorp")
    assert r.route("thanks!", previous=off).action == "answer"  # not clarifications_exhausted
    assert r.route("hi, can you tell me a joke", previous=off).action == "handoff"  # not only small talk
    ask = RouteDecision("track_order", 0.9, [], "ask_slot", "missing_slot", "order_id", "track_order")
    again = r.route("thanks", previous=ask)
    assert (again.action, again.missing_slot) == ("ask_slot", "order_id")


PLAN_TABLE = {"Where is order 87654321?": ("track_order", 0.98), "Where is my parcel?": ("track_order", 0.97),
              "blah": ("out_of_scope", 0.99)}


def test_plan_says_whether_to_search_with_which_queries_and_what_to_reply(policy):
    r = router(policy, PLAN_TABLE)
    answer = plan(r.route("Where is order 87654321?"), "Where is order 87654321?", [], policy)
    assert (answer.action, answer.search, answer.reply, answer.queries) == (
        "answer", True, None, ("Where is order 87654321?",))
    ask = plan(r.route("Where is my parcel?"), "Where is my parcel?", [], policy)
    assert (ask.action, ask.search, ask.reply) == ("ask_slot", False, "Could you give me your order number, please?")
    filled = r.route("It is 12345678", previous=ask.decision)
    follow = plan(filled, "It is 12345678", ["Where is my parcel?"], policy)
    assert (follow.decision.reason, follow.search, follow.queries) == (
        "slot_filled", True, ("Where is my parcel? It is 12345678",))
    off = r.route("blah")
    assert plan(off, "blah", [], policy).reply == policy.clarify_message
    # a clarify is searched only when a close passage may ground it
    assert (plan(off, "blah", [], policy).search, plan(off, "blah", [], policy, 0.4).search) == (False, True)
    hi = plan(r.route("Hi"), "Hi", [], policy)
    assert (hi.action, hi.search, hi.reply) == ("answer", False, policy.smalltalk_message)
    human = plan(r.route("I want to talk to a human"), "I want to talk to a human", [], policy, 0.4)
    assert (human.handoff, human.search, human.reply) == (True, False, None)
    unrouted = plan(None, "and gold members?", ["Can I return shoes?"])
    assert (unrouted.action, unrouted.decision, unrouted.search, unrouted.queries) == (
        "answer", None, True, ("and gold members?", "Can I return shoes? and gold members?"))
    with pytest.raises(ConfigError, match="policy"):
        plan(off, "blah", [])


def test_after_search_grounds_a_clarify_only_on_a_close_passage(policy):
    r = router(policy, PLAN_TABLE)
    off = r.route("blah")
    grounded = plan(off, "blah", [], policy, 0.4)
    assert grounded.after_search(0.3) is grounded and grounded.after_search(None) is grounded
    won = grounded.after_search(0.5)
    assert (won.action, won.decision.reason, won.reply, won.decision.clarifications, won.queries) == (
        "answer", "grounded:out_of_scope", None, 0, ("blah",))
    assert plan(off, "blah", [], policy).after_search(0.99).action == "clarify"  # grounding off
    exhausted = plan(r.route("blah", previous=off), "blah", [], policy, 0.4)
    assert (exhausted.handoff, exhausted.after_search(0.5).decision.reason) == (True, "grounded:out_of_scope")
    unrouted = plan(None, "hello", [])
    assert unrouted.after_search(0.99) is unrouted


def test_route_turn_rebuilds_the_previous_decision_from_the_store_or_the_client_history(policy):
    from types import SimpleNamespace

    r = router(policy, PLAN_TABLE)
    assert r.state_rows == 2 * (policy.max_clarifications + 1)
    rows = [SimpleNamespace(role="user", intent="track_order", confidence=0.97, slots=[], action="ask_slot"),
            SimpleNamespace(role="assistant", intent=None, confidence=None, slots=None, action="ask_slot")]
    stored = r.route_turn("It is 12345678", rows)
    sent = r.route_turn("It is 12345678", previous_text="Where is my parcel?")
    assert [(d.action, d.reason, d.intent) for d in (stored, sent)] == [("answer", "slot_filled", "track_order")] * 2
    assert r.route_turn("It is 12345678").reason == "out_of_scope"  # no earlier message: nothing pending


def test_a_decision_holds_a_known_action_and_reason(policy):
    assert RouteDecision("track_order", 0.9, [], "answer", "policy").reason is Reason.POLICY
    assert RouteDecision("track_order", 0.9).to_dict()["reason"] == "policy"
    with pytest.raises(InvalidInputError, match="route reason must be one of .* got 'because'"):
        RouteDecision("track_order", 0.9, [], "answer", "because")
    with pytest.raises(InvalidInputError, match="route action must be one of .* got 'reply'"):
        RouteDecision("track_order", 0.9, [], "reply", "policy")
