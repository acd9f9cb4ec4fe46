"""Routing: what the assistant does with a customer message, from the intent and entity heads.

A :class:`Router` runs the intent head (calibrated confidence, out-of-scope decision)
and the entity head (typed slots with character offsets) on a message, then applies
a :class:`RoutingPolicy` (YAML, ``settings.routing_policy``) and returns a
:class:`RouteDecision` with one of four actions:

* ``answer``: answer with retrieval + the chat model;
* ``ask_slot``: the intent needs a slot the message lacks (e.g. an order number);
* ``handoff``: hand the conversation to a human: an explicit request for a person
  (intent head or a small pattern list), a handoff intent (complaints), or an
  out-of-scope / low-confidence message after ``max_clarifications`` clarifications;
* ``clarify``: ask the customer to rephrase (out-of-scope or low confidence).

Order of the rules (first match wins): human request -> small talk (greeting, thanks:
``answer``, not counted as a clarification) -> slot filled for a pending ``ask_slot`` ->
out-of-scope / low confidence -> handoff intent -> missing required slot -> the intent's action.

The whole routing policy lives here. :func:`plan` turns a decision into the :class:`Route` the service
executes: whether to search and with which queries (:func:`retrieval_queries`), the fixed reply, and,
once the passages are known (:meth:`Route.after_search`), whether a close passage overrides a
clarify (grounding). ``chatbot.service`` only carries it out: search, hand off, reply or generate.

The decision logic (:meth:`Router.decide`, :func:`plan`) is pure; the heads load lazily on first use.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from chatbot.errors import ConfigError, InvalidInputError, NotFoundError
from chatbot.verification import content_tokens

log = logging.getLogger(__name__)

Action = Literal["answer", "ask_slot", "handoff", "clarify"]
ACTIONS = ("answer", "ask_slot", "handoff", "clarify")


class Reason(StrEnum):
    """Why a message got its action (:attr:`RouteDecision.reason`). A member is its string value
    (``Reason.SLOT_FILLED == "slot_filled"``), which is what the API returns and the store keeps."""

    HUMAN_REQUEST = "human_request"  #: the customer asks for a person (pattern or intent)
    HANDOFF_INTENT = "handoff_intent"  #: an intent always handed to a person (complaint)
    OUT_OF_SCOPE = "out_of_scope"  #: the intent head's out-of-scope decision
    LOW_CONFIDENCE = "low_confidence"  #: in scope, below the confidence threshold
    MISSING_SLOT = "missing_slot"  #: the intent needs a slot the message lacks
    SLOT_FILLED = "slot_filled"  #: the message answers a pending slot question
    SMALLTALK = "smalltalk"  #: a greeting, thanks or goodbye
    EXHAUSTED_OUT_OF_SCOPE = "clarifications_exhausted:out_of_scope"  #: handoff after max_clarifications
    EXHAUSTED_LOW_CONFIDENCE = "clarifications_exhausted:low_confidence"
    GROUNDED_OUT_OF_SCOPE = "grounded:out_of_scope"  #: answered anyway: a close passage (:meth:`Router.ground`)
    GROUNDED_LOW_CONFIDENCE = "grounded:low_confidence"
    STORED = "stored"  #: rebuilt from the store (:meth:`Router.previous_from_messages`)
    POLICY = "policy"  #: the intent's action in the policy


#: out-of-scope / low-confidence reason -> the reason of the handoff after too many clarifications
_EXHAUSTED = {Reason.OUT_OF_SCOPE: Reason.EXHAUSTED_OUT_OF_SCOPE,
              Reason.LOW_CONFIDENCE: Reason.EXHAUSTED_LOW_CONFIDENCE}
#: groundable reason -> the reason of the answer a close passage turns it into
_GROUNDED = {Reason.OUT_OF_SCOPE: Reason.GROUNDED_OUT_OF_SCOPE, Reason.LOW_CONFIDENCE: Reason.GROUNDED_LOW_CONFIDENCE,
             Reason.EXHAUSTED_OUT_OF_SCOPE: Reason.GROUNDED_OUT_OF_SCOPE,
             Reason.EXHAUSTED_LOW_CONFIDENCE: Reason.GROUNDED_LOW_CONFIDENCE}

#: Fallback "I want a person" patterns (case-insensitive), used beside the intent head.
DEFAULT_HUMAN_PATTERNS = (
    (r"\b(talk|speak|chat|connect|transfer|put)\w*\b.{0,40}\b(human|person|agent|representative|rep|operator|"
     r"someone|somebody|staff|manager|supervisor|people)\b"),
    r"\b(real|live|actual)\s+(human|person|agent|people)\b",
    r"\b(human|agent|representative|operator|person)\s*(please|pls|plz|now)\b",
    r"^\W*(human|agent|representative|operator|real person)\W*$",
)

#: Whole-message greetings, thanks and goodbyes (case-insensitive): answered by the model, never
#: counted as a clarification (so "Hi" then "thanks!" does not reach the staff queue).
DEFAULT_SMALLTALK_PATTERNS = (
    r"^\W*((hi|hello|hey|hiya|howdy|greetings|good\s+(morning|afternoon|evening|day))(\s+(there|all|team|guys))?)"
    r"\W*$",
    r"^\W*((many\s+)?thanks?(\s+(you|a\s+lot|so\s+much|very\s+much))*|thank\s+you(\s+(so|very)\s+much)?|ty|thx|"
    r"cheers|ok(ay)?|great|perfect|cool|got\s+it)\W*$",
    r"^\W*(bye|goodbye|good\s*bye|see\s+you|have\s+a\s+(nice|good)\s+day)\W*$",
)


@dataclass
class RoutingPolicy:
    """Intent -> action policy (loaded from YAML with :meth:`from_file`).

    Attributes:
        intents: intent -> ``{"action": one of ACTIONS, "required_slots": [slot types]}``;
            intents not listed get ``default_action``.
        default_action: action of unlisted in-scope intents.
        handoff_intents: intents always handed to a human (e.g. ``complaint``).
        human_intents: intents that mean "let me talk to a person" (e.g. ``contact_human_agent``).
        human_patterns: regular expressions that mean the same (fallback beside the head).
        smalltalk_patterns: regular expressions for greetings / thanks / goodbyes: ``answer``
            (reason ``smalltalk``), never a clarification.
        out_of_scope_label: the intent head's out-of-scope label.
        on_out_of_scope, on_low_confidence: ``clarify`` or ``handoff``.
        max_clarifications: clarify this many times in a row, then hand off (>= 0).
        clarify_message: what the assistant says when it clarifies (the documents did not answer the
            message: it says so and offers a person).
        smalltalk_message: the reply to a greeting, thanks or goodbye (reason ``smalltalk``): fixed, so
            no unverifiable generated sentence reaches the customer.
        slot_questions: slot type -> the question that asks for it (``ask_slot``).
        default_slot_question: the question for a slot type not in ``slot_questions``
            (``{slot}`` becomes the type with spaces).
    """

    intents: dict[str, dict] = field(default_factory=dict)
    default_action: Action = "answer"
    handoff_intents: tuple[str, ...] = ("contact_human_agent", "complaint")
    human_intents: tuple[str, ...] = ("contact_human_agent",)
    human_patterns: tuple[str, ...] = DEFAULT_HUMAN_PATTERNS
    smalltalk_patterns: tuple[str, ...] = DEFAULT_SMALLTALK_PATTERNS
    out_of_scope_label: str = "out_of_scope"
    on_out_of_scope: Action = "clarify"
    on_low_confidence: Action = "clarify"
    max_clarifications: int = 1
    clarify_message: str = ("Sorry, I couldn't find an answer to that in our help documents. I can help with orders, "
                            "deliveries, returns and refunds, payments and your account: could you tell me a bit more, "
                            "or would you like me to connect you with a person?")
    smalltalk_message: str = ("Glad to help! I can answer questions about orders, deliveries, returns and refunds, "
                              "payments and your account. What can I do for you?")
    slot_questions: dict[str, str] = field(default_factory=lambda: {
        "order_id": "Could you give me your order number, please?"})
    default_slot_question: str = "Could you give me your {slot}, please?"

    def __post_init__(self) -> None:
        for name in ("default_action", "on_out_of_scope", "on_low_confidence"):
            v = getattr(self, name)
            allowed = ACTIONS if name == "default_action" else ("clarify", "handoff")
            if v not in allowed:
                raise ConfigError(f"routing policy {name} must be one of {allowed}, got {v!r}")
        if not isinstance(self.max_clarifications, int) or self.max_clarifications < 0:
            raise ConfigError(f"routing policy max_clarifications must be an int >= 0, got {self.max_clarifications!r}")
        for name in ("clarify_message", "smalltalk_message"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"routing policy {name} must be a non-empty string, got {v!r}")
        if not isinstance(self.slot_questions, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in self.slot_questions.items()):
            raise ConfigError(f"routing policy slot_questions must map slot types to questions, got {self.slot_questions!r}")
        if "{slot}" not in self.default_slot_question:
            raise ConfigError("routing policy default_slot_question must contain {slot}")
        norm = {}
        for intent, spec in (self.intents or {}).items():
            spec = {"action": spec} if isinstance(spec, str) else dict(spec or {})
            unknown = set(spec) - {"action", "required_slots"}
            if unknown:
                raise ConfigError(f"routing policy intents.{intent} has unknown keys {sorted(unknown)}")
            action = spec.get("action", self.default_action)
            if action not in ACTIONS:
                raise ConfigError(f"routing policy intents.{intent}.action must be one of {ACTIONS}, got {action!r}")
            slots = spec.get("required_slots") or []
            if not isinstance(slots, list) or not all(isinstance(s, str) for s in slots):
                raise ConfigError(f"routing policy intents.{intent}.required_slots must be a list of names, got {slots!r}")
            norm[str(intent)] = {"action": action, "required_slots": list(slots)}
        self.intents = norm
        self.handoff_intents = tuple(self.handoff_intents or ())
        self.human_intents = tuple(self.human_intents or ())
        self.human_patterns = tuple(self.human_patterns or ())
        self.smalltalk_patterns = tuple(self.smalltalk_patterns or ())
        try:
            self._compiled = [re.compile(p, re.IGNORECASE) for p in self.human_patterns]
        except re.error as exc:
            raise ConfigError(f"routing policy human_patterns has a bad regular expression: {exc}") from exc
        try:
            self._smalltalk = [re.compile(p, re.IGNORECASE) for p in self.smalltalk_patterns]
        except re.error as exc:
            raise ConfigError(f"routing policy smalltalk_patterns has a bad regular expression: {exc}") from exc

    @classmethod
    def from_dict(cls, d: dict) -> RoutingPolicy:
        """Build from a dict (YAML content); unknown keys raise ConfigError naming them."""
        known = {"intents", "default_action", "handoff_intents", "human_intents", "human_patterns", "smalltalk_patterns",
                 "out_of_scope_label", "on_out_of_scope", "on_low_confidence", "max_clarifications", "version",
                 "clarify_message", "smalltalk_message", "slot_questions", "default_slot_question"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"routing policy has unknown keys {unknown}")
        d = {k: v for k, v in d.items() if k != "version"}
        for k in ("handoff_intents", "human_intents", "human_patterns", "smalltalk_patterns"):
            if k in d:
                d[k] = tuple(d[k] or ())
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> RoutingPolicy:
        """Load a YAML policy file.

        Raises:
            NotFoundError: the file does not exist.
            ConfigError: it is not a YAML mapping, or a value is bad (named).
        """
        import yaml

        path = Path(path)
        if not path.is_file():
            raise NotFoundError(f"routing policy file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"routing policy {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"routing policy {path} must be a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    def action_for(self, intent: str) -> tuple[str, list[str]]:
        """``(action, required_slots)`` of an in-scope intent."""
        spec = self.intents.get(intent)
        if spec is None:
            return self.default_action, []
        return spec["action"], spec["required_slots"]

    def reply_for(self, decision: "RouteDecision") -> str | None:
        """The fixed reply of a ``clarify`` or ``ask_slot`` decision or of smalltalk (an ``answer`` with
        reason ``smalltalk``); None for other decisions."""
        if decision.action == "clarify":
            return self.clarify_message
        if decision.action == "answer" and decision.reason == Reason.SMALLTALK:
            return self.smalltalk_message
        if decision.action == "ask_slot":
            slot = decision.missing_slot or "details"
            return self.slot_questions.get(slot) or self.default_slot_question.format(slot=slot.replace("_", " "))
        return None

    def asks_for_human(self, text: str) -> bool:
        """True when a fallback pattern matches ``text``."""
        return any(p.search(text or "") for p in self._compiled)

    def is_smalltalk(self, text: str) -> bool:
        """True when ``text`` is only a greeting, thanks or goodbye (``smalltalk_patterns``)."""
        return any(p.search(text or "") for p in self._smalltalk)


@dataclass(frozen=True)
class RouteDecision:
    """What the heads and the policy decided about one customer message (stored with it, returned to clients).

    Attributes:
        intent: the decided intent (the out-of-scope label when out of scope).
        confidence: calibrated probability of ``top_intent``, in [0, 1] (1.0 for a
            pattern-only decision without an intent head).
        slots: typed values found in the message (:class:`finetune.heads.Slot`: type,
            value, start, end, score), plus slots carried over from a pending ``ask_slot``.
        action: ``answer`` | ``ask_slot`` | ``handoff`` | ``clarify``.
        reason: why: a :class:`Reason` (a string given is converted).
        missing_slot: the slot type to ask for (``ask_slot`` only).
        top_intent: the intent head's argmax label, even when out of scope.
        clarifications: consecutive ``clarify`` decisions up to and including this one.

    Raises:
        InvalidInputError: ``action`` is not one of :data:`ACTIONS`, or ``reason`` is no :class:`Reason`.
    """

    intent: str
    confidence: float
    slots: list = field(default_factory=list)
    action: Action = "answer"
    reason: Reason = Reason.POLICY
    missing_slot: str | None = None
    top_intent: str | None = None
    clarifications: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise InvalidInputError(f"route action must be one of {ACTIONS}, got {self.action!r}")
        try:
            object.__setattr__(self, "reason", Reason(self.reason))
        except ValueError:
            raise InvalidInputError(
                f"route reason must be one of {[r.value for r in Reason]}, got {self.reason!r}") from None

    def to_dict(self) -> dict:
        """Plain-JSON form (slots as dicts, the reason as its string)."""
        d = asdict(self)
        d["slots"] = [s if isinstance(s, dict) else asdict(s) for s in self.slots]
        d["reason"] = str(self.reason)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RouteDecision:
        """Inverse of :meth:`to_dict`."""
        from finetune.heads import Slot

        d = dict(d)
        d["slots"] = [Slot(**s) if isinstance(s, dict) else s for s in d.get("slots") or []]
        return cls(**d)


class Router:
    """Routes messages with the intent and entity heads and a :class:`RoutingPolicy`.

    Args:
        policy: the routing policy.
        intent_head: an object with ``predict(texts) -> [IntentPrediction]`` (e.g.
            :class:`finetune.heads.IntentHead`), a folder to load one from lazily, or None
            (then only the pattern rules and slots apply; every message is "answer").
        entity_head: an object with ``predict(texts) -> [[Slot]]``, a folder, or None.
        threshold: override of the intent head's out-of-scope threshold, in [0, 1].

    Raises:
        ConfigError: a threshold outside [0, 1].
    """

    def __init__(self, policy: RoutingPolicy, intent_head: Any = None, entity_head: Any = None,
                 threshold: float | None = None) -> None:
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"intent_threshold must be in [0, 1], got {threshold}")
        self.policy = policy
        self.threshold = threshold
        self._intent = intent_head
        self._entity = entity_head
        self._lock = threading.Lock()
        self._checked = False

    @classmethod
    def from_settings(cls, settings) -> Router:
        """Router over ``settings.intent_head_dir``, ``settings.entity_head_dir`` and
        ``settings.routing_policy`` (heads load on first use), threshold ``settings.intent_threshold``.

        Raises:
            NotFoundError: the policy file is missing.
            ConfigError: the policy is invalid.
        """
        policy = RoutingPolicy.from_file(settings.routing_policy)
        return cls(policy, Path(settings.intent_head_dir), Path(settings.entity_head_dir), settings.intent_threshold)

    # -- heads (lazy)
    def _load(self, which: str):
        head = getattr(self, which)
        if isinstance(head, (str, Path)):
            with self._lock:
                head = getattr(self, which)
                if isinstance(head, (str, Path)):
                    from finetune.heads import EntityHead, IntentHead

                    cls = IntentHead if which == "_intent" else EntityHead
                    head = cls.load(head)
                    setattr(self, which, head)
                    log.info("routing: loaded %s head (%d labels)", cls.kind, len(head.labels))
        return head

    @property
    def intent_head(self):
        """The intent head (loaded on first use), or None."""
        head = self._load("_intent")
        if head is not None and not self._checked:
            self._check_policy(head)
        return head

    @property
    def entity_head(self):
        """The entity head (loaded on first use), or None."""
        return self._load("_entity")

    def warm(self) -> Router:
        """Load both heads now (service start-up) and run one message through them."""
        self.route("hello")
        return self

    def _check_policy(self, head) -> None:
        labels = set(getattr(head, "labels", []) or [])
        if labels:
            named = set(self.policy.intents) | set(self.policy.handoff_intents) | set(self.policy.human_intents)
            unknown = sorted(named - labels)
            if unknown:
                raise ConfigError(f"routing policy names intents the intent head does not know: {unknown}")
            oos = getattr(head, "oos_label", None)
            if oos is not None and oos != self.policy.out_of_scope_label:
                log.warning("routing policy out_of_scope_label %r differs from the head's %r; using the head's",
                            self.policy.out_of_scope_label, oos)
        self._checked = True

    # -- conversation state
    def previous_from_messages(self, messages) -> RouteDecision | None:
        """The decision of the last routed customer message, rebuilt from stored messages.

        The state lives in the store, so it survives restarts and is shared by every worker.

        Args:
            messages: a conversation's messages, oldest first, with ``role``, ``intent``,
                ``confidence``, ``slots`` (dicts) and ``action`` attributes (:class:`chatbot.store.Message`).

        Returns:
            The decision (``clarifications`` = trailing ``clarify`` actions in a row;
            ``missing_slot`` recomputed from the policy for ``ask_slot``), or None when no
            customer message was routed yet.
        """
        from finetune.heads import Slot

        routed = [m for m in messages if m.role == "user" and m.action in ACTIONS]
        if not routed:
            return None
        last = routed[-1]
        clar = 0
        for m in reversed(routed):
            if m.action != "clarify":
                break
            clar += 1
        slots = []
        for d in last.slots or []:
            try:
                slots.append(Slot(**{k: d[k] for k in ("type", "value", "start", "end") if k in d},
                                  score=float(d.get("score", 1.0))))
            except (TypeError, KeyError):
                continue  # a malformed stored slot is skipped, not fatal
        missing = None
        if last.action == "ask_slot":
            _, required = self.policy.action_for(last.intent or "")
            have = {s.type for s in slots}
            missing = next((r for r in required if r not in have), None)
        return RouteDecision(last.intent or "unknown", float(last.confidence or 0.0), slots, last.action,
                             Reason.STORED, missing, last.intent, clar)

    @property
    def state_rows(self) -> int:
        """How many stored messages (newest) :meth:`previous_from_messages` needs to rebuild the state: the
        customer message and the reply of each clarification in a row, and of the one before them."""
        return 2 * (self.policy.max_clarifications + 1)

    def route_turn(self, text: str, rows: Sequence = (), previous_text: str | None = None) -> RouteDecision:
        """Route ``text`` in its conversation.

        The previous decision is rebuilt from the conversation's stored ``rows`` (oldest first, at least
        the newest :attr:`state_rows`; :meth:`previous_from_messages`), or, for a client that sends its own
        history, is the decision for its previous customer message ``previous_text``.

        Raises:
            InvalidInputError, NotFoundError, ModelAssetError: as :meth:`route`.
        """
        previous = self.route(previous_text) if previous_text is not None else self.previous_from_messages(rows)
        return self.route(text, previous)

    @staticmethod
    def groundable(decision: RouteDecision) -> bool:
        """True when :meth:`ground` may turn ``decision`` into ``answer``: a ``clarify`` for an
        out-of-scope / low-confidence message, or the handoff after too many such clarifications."""
        exhausted = decision.reason in (Reason.EXHAUSTED_OUT_OF_SCOPE, Reason.EXHAUSTED_LOW_CONFIDENCE)
        return exhausted or (decision.action == "clarify" and decision.reason in (Reason.OUT_OF_SCOPE,
                                                                                  Reason.LOW_CONFIDENCE))

    @staticmethod
    def ground(decision: RouteDecision, top_score: float | None, min_score: float | None) -> RouteDecision:
        """Answer an out-of-scope / low-confidence message anyway when retrieval found a close passage.

        The intent head knows a fixed list of intents; the knowledge base may cover more. A
        ``clarify`` decided for ``out_of_scope`` or ``low_confidence`` (or the handoff after
        too many clarifications) becomes ``answer`` (reason ``grounded:<kind>``) when the best
        passage's cosine similarity is at least ``min_score``. Other decisions, and every decision when
        ``min_score`` is None, are returned unchanged (the same object).
        """
        if min_score is None or top_score is None or top_score < min_score or not Router.groundable(decision):
            return decision  # (a handoff the policy asks for stays a handoff)
        return RouteDecision(decision.intent, decision.confidence, decision.slots, "answer",
                             _GROUNDED[decision.reason], None, decision.top_intent, 0)

    # -- routing
    def route(self, text: str, previous: RouteDecision | None = None) -> RouteDecision:
        """Route one message.

        Args:
            text: the customer's message (empty and very long messages are accepted;
                the heads truncate or window them).
            previous: the decision of the previous customer turn in this conversation
                (for clarification counting and a pending ``ask_slot``), or None.

        Raises:
            InvalidInputError: ``text`` is not a string.
            NotFoundError, ModelAssetError: a head folder is missing or unreadable.
        """
        return self.route_batch([text], [previous])[0]

    def route_batch(self, texts: list[str], previous: list[RouteDecision | None] | None = None) -> list[RouteDecision]:
        """Route several messages in one forward pass per head; ``previous`` aligned with ``texts``."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInputError(f"text[{i}] must be a string, got {type(t).__name__}")
        previous = previous or [None] * len(texts)
        ih, eh = self.intent_head, self.entity_head
        preds = ih.predict(texts, threshold=self.threshold) if ih is not None else [None] * len(texts)
        slots = eh.predict(texts) if eh is not None else [[] for _ in texts]
        return [self.decide(t, p, s, prev) for t, p, s, prev in zip(texts, preds, slots, previous)]

    def decide(self, text: str, prediction, slots: list, previous: RouteDecision | None = None) -> RouteDecision:
        """Apply the policy to one message's head outputs (pure; no model call).

        Args:
            text: the message (for the human-request patterns).
            prediction: an :class:`finetune.heads.IntentPrediction` (label, confidence,
                top_label, out_of_scope, below_threshold) or None without an intent head.
            slots: the message's slots.
            previous: the previous turn's decision, or None.
        """
        pol = self.policy
        oos_label = getattr(self._intent, "oos_label", None) or pol.out_of_scope_label
        if prediction is None:
            intent, conf, top, oos, low = "unknown", 1.0, None, False, False
        else:
            intent, conf, top = prediction.label, float(prediction.confidence), prediction.top_label
            low = bool(prediction.below_threshold) and top != oos_label
            oos = bool(prediction.out_of_scope) and not low
        slots = list(slots)
        prev_clar = previous.clarifications if previous is not None and previous.action == "clarify" else 0

        def make(action: str, reason: Reason, intent_: str = intent, missing: str | None = None,
                 slots_: list = slots) -> RouteDecision:
            clar = prev_clar + 1 if action == "clarify" else 0
            return RouteDecision(intent_, conf, slots_, action, reason, missing, top, clar)

        # 1. an explicit request for a person
        wants_human = pol.asks_for_human(text) or (
            prediction is not None and not prediction.out_of_scope and top in pol.human_intents
        )
        if wants_human:
            return make("handoff", Reason.HUMAN_REQUEST, top if top in pol.human_intents else intent)
        # 1b. greetings, thanks, goodbyes: answered, not clarified (a pending ask_slot stays pending)
        if pol.is_smalltalk(text) and not slots:
            if previous is not None and previous.action == "ask_slot":
                return RouteDecision(previous.intent, conf, previous.slots, "ask_slot", Reason.MISSING_SLOT,
                                     previous.missing_slot, top, 0)
            return RouteDecision(intent, conf, slots, "answer", Reason.SMALLTALK, None, top, 0)
        # 2. the answer to a pending ask_slot
        if previous is not None and previous.action == "ask_slot" and previous.missing_slot:
            got = [s for s in slots if getattr(s, "type", None) == previous.missing_slot]
            if got:
                merged = [s for s in previous.slots if getattr(s, "type", None) != previous.missing_slot] + slots
                _, required = pol.action_for(previous.intent)
                have = {getattr(s, "type", None) for s in merged}
                missing = [r for r in required if r not in have]
                if missing:
                    return make("ask_slot", Reason.MISSING_SLOT, previous.intent, missing[0], merged)
                action, _ = pol.action_for(previous.intent)
                return make(action, Reason.SLOT_FILLED, previous.intent, None, merged)
        # 3. out of scope / low confidence: clarify, then hand off
        if oos or low:
            kind = Reason.OUT_OF_SCOPE if oos else Reason.LOW_CONFIDENCE
            action = pol.on_out_of_scope if oos else pol.on_low_confidence
            if action == "clarify" and prev_clar >= pol.max_clarifications:
                return make("handoff", _EXHAUSTED[kind])
            return make(action, kind)
        # 4. handoff intents (complaints)
        if intent in pol.handoff_intents:
            return make("handoff", Reason.HANDOFF_INTENT)
        # 5. required slots
        action, required = pol.action_for(intent)
        have = {getattr(s, "type", None) for s in slots}
        missing = [r for r in required if r not in have]
        if missing and action == "answer":
            return make("ask_slot", Reason.MISSING_SLOT, intent, missing[0])
        return make(action, Reason.POLICY)


#: a message that opens with one of these continues the previous question ("and if I'm a gold member?")
_CONTINUATION = re.compile(r"^\W*(and|or|but|also|so|then|what about|how about|what if|same for|even)\b", re.I)


def retrieval_queries(text: str, earlier: Sequence[str], reason: str | None = None) -> list[str]:
    """The retrieval queries to try for ``text`` given the conversation's earlier customer messages.

    ``[text]`` for a self-contained message; ``["<previous> <text>"]`` when it answers a slot
    question (``reason == "slot_filled"``); both, ``[text, "<previous> <text>"]``, when it may
    depend on the previous message: it opens like a continuation ("and if ...", "what about ...")
    or has at most 5 content tokens ("can I return it?", "what about gold members?"). The caller
    searches every query and keeps the passages of the one whose best passage scores highest,
    so a short question that stands alone is not pulled back to the previous topic.
    """
    if not earlier:
        return [text]
    combined = f"{earlier[-1]} {text}"
    if reason == Reason.SLOT_FILLED:
        return [combined]
    if _CONTINUATION.search(text) or len(set(content_tokens(text))) <= 5:
        return [text, combined]
    return [text]


@dataclass(frozen=True)
class Route:
    """The routing policy's whole answer for one customer message: what the service does with it.

    Made only by :func:`plan`; :meth:`after_search` settles it once the passages are known. The
    service executes it: search :attr:`queries` when :attr:`search`, then :meth:`after_search`, then
    hand off (:attr:`handoff`), send :attr:`reply`, or generate an answer from the passages.

    Attributes:
        decision: the heads' and policy's decision, stored with the message and returned to clients;
            None for a message that is not routed (no router, or routing failed): it is answered.
        queries: the retrieval queries to try, in order (:func:`retrieval_queries`; never empty); the
            service keeps the passages of the one whose best passage scores highest.
        search: whether to search before acting: an answer needs passages, and so does the grounding
            check of a groundable decision; a person request, a complaint, a slot question, smalltalk and
            a clarify without grounding need none.
        reply: the policy's fixed reply (``clarify``, ``ask_slot``, smalltalk): sent instead of generating;
            None to generate (or to hand off).
        ground_min_score: best-passage score at which a groundable decision is answered (:meth:`Router.ground`);
            None: never.
    """

    decision: RouteDecision | None
    queries: tuple[str, ...]
    search: bool
    reply: str | None = None
    ground_min_score: float | None = None

    @property
    def action(self) -> str:
        """The decision's action; ``answer`` for an unrouted message."""
        return self.decision.action if self.decision is not None else "answer"

    @property
    def handoff(self) -> bool:
        """True when the conversation goes to a person (reason ``decision.reason``)."""
        return self.action == "handoff"

    @property
    def query(self) -> str:
        """The first retrieval query (the one a turn that does not search keeps)."""
        return self.queries[0]

    def after_search(self, top_score: float | None) -> Route:
        """The route once retrieval ran: a groundable decision becomes an answer (reason ``grounded:<kind>``,
        no fixed reply) when ``top_score``, the best passage's score (None: no passage or no search),
        reaches :attr:`ground_min_score`; otherwise this route, unchanged."""
        if self.decision is None:
            return self
        grounded = Router.ground(self.decision, top_score, self.ground_min_score)
        if grounded is self.decision:
            return self
        return replace(self, decision=grounded, reply=None)  # a grounded answer is generated


def plan(decision: RouteDecision | None, text: str, earlier: Sequence[str], policy: RoutingPolicy | None = None,
         ground_min_score: float | None = None) -> Route:
    """The :class:`Route` for a message: the one place that says what the service does with a decision.

    Args:
        decision: the router's decision for ``text`` (:meth:`Router.route_turn`), or None when the message is
            not routed (then it is searched for and answered).
        text: the cleaned customer message.
        earlier: the conversation's earlier customer messages, oldest first (for :func:`retrieval_queries`).
        policy: the routing policy (its fixed replies); required with a decision.
        ground_min_score: ``settings.route_grounded_min_score`` (:meth:`Route.after_search`).

    Raises:
        ConfigError: a decision without a policy.
    """
    queries = tuple(retrieval_queries(text, earlier, decision.reason if decision is not None else None))
    if decision is None:
        return Route(None, queries, search=True)
    if policy is None:
        raise ConfigError("plan needs the routing policy for a routed message, got policy=None")
    groundable = ground_min_score is not None and Router.groundable(decision)
    search = (decision.action == "answer" and decision.reason != Reason.SMALLTALK) or groundable
    return Route(decision, queries, search, policy.reply_for(decision), ground_min_score)
