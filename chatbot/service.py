"""One customer turn: validate -> retrieve -> build the prompt -> generate (streamed) -> log.

See ``DESIGN.md`` at the top of the shared folder for the data flow.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from urllib.parse import quote

from chatbot.admission import Admission, Ticket
from chatbot.company import PlaceholderStream
from chatbot.config import Settings
from chatbot.engines.base import ChatMessage, Engine, GenerationParams
from chatbot.engines.stops import StopFilter, check_stops  # noqa: F401  (check_stops: for the faces)
from chatbot.errors import ChatbotError, EngineError, InvalidInputError, RequestTimeoutError
from chatbot.metrics import Metrics
from chatbot.options import build_embedder, search_options
from chatbot.prompts import BuiltPrompt, build_prompt
from chatbot.review import Review
from chatbot.router import RouteDecision, Router, plan
from chatbot.store import HUMAN_STATUSES, Handoff, Message, Store, ids_as_str
from chatbot.verification import Evidence, SentenceStream, Verifier, cite, covered, sanitize_passage, strip_markers
from retrieval.documents import Hit
from retrieval.retriever import Retriever

log = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATES = re.compile("[\ud800-\udfff]")

#: What a held turn (a person has the conversation) shows the customer instead of a bot reply.
HANDOFF_NOTICE = "Your message has been passed to our support team. A person will reply here shortly."


def clean_message(text: object, max_chars: int) -> str:
    """Validate and normalise a customer message.

    Control characters (other than newline and tab) and unpaired UTF-16 surrogates (which
    no UTF-8 text can hold; JSON lets a client send ``"\udfff"``) are removed, the text is
    NFC-normalised and stripped; a message with no visible character is empty.

    Raises:
        InvalidInputError: not a string, empty after cleaning, or longer than ``max_chars``.
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"message must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise InvalidInputError(f"message must be at most {max_chars} characters, got {len(text)}")
    cleaned = unicodedata.normalize("NFC", _SURROGATES.sub("", _CONTROL.sub("", text))).strip()
    # Only whitespace and invisible format characters (e.g. U+200B) counts as empty.
    if not any(unicodedata.category(ch)[0] in "LNPS" for ch in cleaned):
        raise InvalidInputError("message must not be empty")
    return cleaned


@dataclass
class Citation:
    """A cited passage: ``number`` is its [n] in the prompt and the reply. Everything in it may be shown
    to the customer, so it never holds a path on the server (see :func:`citations_from_hits`).

    Attributes:
        doc_id: the document id (its path relative to the ingested folder, or a URL).
        title: the document's title.
        source: the document's source note (front matter ``source:``, a URL), or ``doc_id`` where
            the index has a file path.
        passage: the passage text the answer was checked against (instructions to the assistant removed).
        spans: ``[start, end)`` character spans of ``passage`` that support the shown sentences
            (verified and extractive answers; empty in ``generate`` mode).
        url: the document's public ``http(s)`` address, ``""`` when it has none.
    """

    number: int
    doc_id: str
    title: str
    source: str
    score: float
    passage: str = ""
    spans: list[tuple[int, int]] = field(default_factory=list)
    url: str = ""

    def as_dict(self) -> dict:
        return {"number": self.number, "doc_id": self.doc_id, "title": self.title, "source": self.source,
                "url": self.url, "score": round(self.score, 4), "passage": self.passage,
                "spans": [list(sp) for sp in self.spans]}


def public_source(source: str, doc_id: str) -> str:
    """``source`` as a customer may see it: a file path (absolute, ``file:``, ``~``, or one that ends
    in the document id, as the loaders record a file without a front-matter source) becomes ``doc_id``."""
    s = (source or "").strip()
    slashed = s.replace("\\", "/")
    is_path = (slashed.startswith(("/", "~", "file:")) or re.match(r"^[A-Za-z]:/", slashed) is not None
               or (bool(doc_id) and slashed.endswith("/" + doc_id.replace("\\", "/"))))
    return doc_id if is_path or not s else s


def document_url(hit_url: str, doc_id: str, docs_base_url: str | None = None) -> str:
    """The public address of a cited document: its own ``url`` (front matter, canonical URL), else an
    ``http(s)`` ``doc_id``, else ``docs_base_url`` + ``doc_id`` (percent-encoded) when that setting is
    configured, else ``""``."""
    if hit_url:
        return hit_url
    if doc_id.startswith(("http://", "https://")):
        return doc_id
    if docs_base_url and doc_id:
        return docs_base_url.rstrip("/") + "/" + quote(doc_id.replace("\\", "/").lstrip("/"))
    return ""


def citations_from_hits(hits: Sequence[Hit], docs_base_url: str | None = None) -> list[Citation]:
    """One citation per passage, numbered as in the prompt ([1] is the first passage), with its public
    ``url`` (:func:`document_url`) and a ``source`` that is never a server path (:func:`public_source`)."""
    return [Citation(i, h.doc_id, h.title, public_source(h.source, h.doc_id), h.score, h.text,
                     url=document_url(getattr(h, "url", ""), h.doc_id, docs_base_url))
            for i, h in enumerate(hits, 1)]


#: Turn.answer_kind values: how the reply that reached the customer was made
ANSWER_KINDS = ("generated", "verified", "extractive", "abstained", "fixed")


@dataclass
class Turn:
    """A prepared turn: iterate :meth:`stream` for the reply; fields fill in as it runs.

    Attributes:
        conversation_id: the conversation (a new id when the turn starts one; the
            conversation row is written with the turn).
        new_conversation: True when this turn starts the conversation.
        citations: sources of the passages in the prompt (known before streaming).
        text, finish_reason, prompt_tokens, completion_tokens, latency_ms, ttft_ms:
            filled while / after streaming.
        message_id: id of the stored assistant message.
        route: the routing decision (intent, confidence, slots, action), None without routing.
        fixed_reply: the policy's reply of a ``clarify`` / ``ask_slot`` decision; the
            engine is not called and :meth:`stream` yields (and stores) this text.

    The turn holds data; its :class:`Replier` (given by the :class:`Assistant`) makes the reply.
    """

    request_id: str
    conversation_id: str
    new_conversation: bool
    user_text: str
    prompt: BuiltPrompt
    params: GenerationParams
    citations: list[Citation]
    index_version: str | None
    channel: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float | None = None
    ttft_ms: float | None = None
    message_id: int | None = None
    #: True when a person has (or is asked to take) the conversation: the customer's message is stored,
    #: the bot does not answer, and :meth:`stream` yields only :data:`HANDOFF_NOTICE` (stored nowhere).
    held: bool = False
    #: the conversation's status after this message: ``bot``, ``handoff`` or ``human``.
    status: str = "bot"
    user_message_id: int | None = None
    route: RouteDecision | None = None
    fixed_reply: str | None = None
    #: version of the LoRA adapter the engine served the reply with (None: the base model)
    adapter_version: str | None = None
    #: ``generate``, ``verified`` or ``extractive`` (settings.answer_mode)
    mode: str = "generate"
    #: how the reply was made: one of :data:`ANSWER_KINDS` (None until streamed)
    answer_kind: str | None = None
    #: generated sentences verification withheld: ``[{"text", "reason", "claims", "overlap"}]``
    withheld: list[dict] = field(default_factory=list)
    #: the retrieval query: the customer's message, with the previous one for a follow-up
    question: str = ""
    #: the question's passage units scored against it (verified / extractive modes)
    evidence: Evidence | None = field(default=None, repr=False)
    #: the request's stop strings (OpenAI ``stop``): the reply ends before the first one, whatever made it
    stop: tuple[str, ...] = ()
    _replier: "Replier | None" = field(default=None, repr=False)
    _ticket: Ticket | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def release(self) -> None:
        """Give back the turn's admission place (idempotent). :meth:`stream` does it when it runs;
        call it when a prepared turn is dropped without being streamed (a client gone before the reply)."""
        if self._ticket is not None:
            self._ticket.release()

    @property
    def offers_handoff(self) -> bool:
        """True when the reply offers the customer a person: an abstention, or the policy's clarify."""
        return self.answer_kind == "abstained" or (self.route is not None and self.route.action == "clarify")

    def answer_info(self) -> dict:
        """``{"mode", "kind", "offer_handoff", "withheld"}``: how the reply was made (API field ``answer``);
        ``withheld`` is the number of generated sentences not shown (their text is for staff only)."""
        return {"mode": self.mode, "kind": self.answer_kind, "offer_handoff": self.offers_handoff,
                "withheld": len(self.withheld)}

    def stream(self) -> AsyncIterator[str]:
        """Yield reply text deltas; store the turn when generation ends.

        Waits for a running slot first (admission control). The customer's message was
        stored when the turn started; the reply is stored only when generation completes,
        so nothing of the reply is stored when the client stops reading early, the request
        times out or generation fails. A failed log write does not fail the reply
        (:class:`~chatbot.conversation_log.ConversationLog` keeps it for a retry).

        In ``verified`` mode the deltas are whole sentences, each shown only when a passage
        supports it (:class:`~chatbot.verification.Verifier`) and ending with its citation
        ``[n]``; withheld sentences are kept in :attr:`withheld`. When none is shown the reply
        is extractive (the passage sentences closest to the question, quoted) or, when none
        is close enough, the abstention that offers a person. Joined, the deltas are
        exactly :attr:`text`, the reply that is stored (after PII redaction, as every reply).

        The :class:`Replier` the :class:`Assistant` gave the turn does the work.

        Raises:
            RequestTimeoutError: the reply took longer than ``request_timeout_s``.
            EngineError: generation failed.
            ChatbotError: the turn was not prepared by an :class:`Assistant` (it has no replier).
        """
        if self._replier is None:
            raise ChatbotError(f"turn {self.request_id} has no replier: stream turns that Assistant.start_turn made")
        return self._replier.stream(self)

    def _mark(self, unit) -> None:
        """Record ``unit``'s span on its passage's citation (a shown sentence rests on it)."""
        for c in self.citations:
            if c.number == unit.passage and (unit.start, unit.end) not in c.spans:
                c.spans.append((unit.start, unit.end))


@dataclass(frozen=True)
class ReplyOptions:
    """The settings a reply is made with (built from :class:`~chatbot.config.Settings` by :meth:`from_settings`).

    Attributes:
        company_fields: values of the ``[[field]]`` markers a fine-tuned reply writes (:mod:`chatbot.company`).
        request_timeout_s: a generated reply taking longer is aborted (> 0).
        verify_min_overlap: :class:`~chatbot.verification.Verifier`'s content-overlap threshold, in [0, 1].
        extractive_max_units, extractive_min_score, extractive_on_topic: what an extractive answer quotes
            (:meth:`chatbot.verification.Evidence.best`).
        abstain_message: the reply when nothing in the passages answers.
    """

    company_fields: dict
    request_timeout_s: float
    verify_min_overlap: float
    extractive_max_units: int
    extractive_min_score: float
    extractive_on_topic: bool
    abstain_message: str

    @classmethod
    def from_settings(cls, s: Settings) -> ReplyOptions:
        """The options of ``s``."""
        return cls(dict(s.company_fields), s.request_timeout_s, s.verify_min_overlap, s.extractive_max_units,
                   s.extractive_min_score, s.extractive_on_topic, s.abstain_message)


class Replier:
    """Makes the reply of a prepared :class:`Turn`: generates it, verifies it, counts it and hands it to be stored.

    The turn holds the data; a replier holds what making the reply needs, given explicitly.

    Args:
        engine: generates the reply (:meth:`~chatbot.engines.base.Engine.stream`).
        metrics: the service metrics (latency, tokens, answers, withheld sentences, aborts).
        options: the reply settings.
        record: stores a finished turn's reply; must not raise (:meth:`Assistant.record`).
    """

    def __init__(self, engine: Engine, metrics: Metrics, options: ReplyOptions,
                 record: Callable[[Turn], None]) -> None:
        self.engine = engine
        self.metrics = metrics
        self.options = options
        self.record = record

    async def stream(self, turn: Turn) -> AsyncIterator[str]:
        """``turn``'s reply as text deltas (see :meth:`Turn.stream`), stored when it ends."""
        stops = StopFilter(turn.stop) if turn.stop else None
        if turn.held:
            notice = stops.cut(HANDOFF_NOTICE)[0] if stops else HANDOFF_NOTICE
            turn.text, turn.finish_reason = notice, "stop"
            yield notice
            return
        m = self.metrics
        if turn.fixed_reply is not None:
            reply = stops.cut(turn.fixed_reply)[0] if stops else turn.fixed_reply
            turn.text, turn.finish_reason, turn.ttft_ms, turn.latency_ms = reply, "stop", 0.0, 0.0
            turn.answer_kind = turn.answer_kind or "fixed"
            m.answers.labels(turn.answer_kind).inc()
            yield reply
            await asyncio.to_thread(self.record, turn)
            return
        assert turn._ticket is not None
        t0 = time.perf_counter()
        parts: list[str] = []
        deltas = self._generate(turn) if turn.mode == "generate" else self._verified(turn)
        try:
            async for out in deltas:
                if stops is not None:  # a stop string ends the reply here, whichever mode made it
                    out, turn._stopped = stops.push(out)
                if out:
                    if turn.ttft_ms is None:
                        turn.ttft_ms = (time.perf_counter() - t0) * 1000
                    parts.append(out)
                    yield out
                if turn._stopped:
                    break
        finally:
            await deltas.aclose()  # after a stop string: ends the generation (the engine aborts the request)
        if turn._stopped:
            turn.finish_reason = "stop"
        elif stops is not None and (tail := stops.flush()):
            parts.append(tail)
            yield tail
        turn.text = "".join(parts)
        turn.latency_ms = (time.perf_counter() - t0) * 1000
        m.latency.observe(turn.latency_ms / 1000)
        if turn.ttft_ms is not None:
            m.ttft.observe(turn.ttft_ms / 1000)
        m.generated_tokens.inc(turn.completion_tokens)
        m.prompt_tokens.inc(turn.prompt_tokens)
        m.answers.labels(turn.answer_kind or "generated").inc()
        log.debug("turn %s: %d tokens in %.0f ms", turn.request_id, turn.completion_tokens, turn.latency_ms)
        await asyncio.to_thread(self.record, turn)

    async def _generate(self, turn: Turn) -> AsyncIterator[str]:
        """The engine's reply as text deltas, company-field markers filled; sets token counts and
        the finish reason. Holds the admission ticket while it runs."""
        m, o = self.metrics, self.options
        # a fine-tuned reply writes company details as [[field]] markers (chatbot.company): filled here,
        # across delta boundaries, before the customer sees or the log stores them
        fill = PlaceholderStream(o.company_fields)
        turn.answer_kind = "generated"
        try:
            await turn._ticket.acquire()
            turn.adapter_version = self.engine.info.adapter_version  # what the engine serves this request with
            # the stop strings end generation here (before verification sees the text); vLLM and a remote
            # server stop on them themselves, the transformers engine is aborted when this closes its stream
            stops = StopFilter(turn.stop) if turn.stop else None
            async with asyncio.timeout(o.request_timeout_s):
                chunks = self.engine.stream(turn.prompt.messages, turn.params, turn.request_id)
                try:
                    async for chunk in chunks:
                        text, hit = stops.push(chunk.text) if stops is not None else (chunk.text, False)
                        out = fill.push(text) if text else ""
                        if out:
                            yield out
                        turn.prompt_tokens = chunk.prompt_tokens
                        turn.completion_tokens = chunk.completion_tokens
                        if chunk.finish_reason:
                            turn.finish_reason = chunk.finish_reason
                        if hit:
                            turn.finish_reason = "stop"
                            break
                finally:
                    await chunks.aclose()
                tail = fill.push(stops.flush()) if stops is not None else ""
                tail += fill.flush()
                if tail:
                    yield tail
        except TimeoutError as exc:
            m.rejected.labels("timeout").inc()
            raise RequestTimeoutError(
                f"reply took longer than request_timeout_s={o.request_timeout_s} and was aborted"
            ) from exc
        except (asyncio.CancelledError, GeneratorExit):
            if not turn._stopped:  # (a stop string ends generation the same way; that is no abort)
                m.aborted.inc()
                log.info("turn %s aborted by the client", turn.request_id)
            raise
        finally:
            turn._ticket.release()

    async def _verified(self, turn: Turn) -> AsyncIterator[str]:
        """Verified mode: the engine's sentences that a passage supports, each with its citation;
        else the extractive answer, else the abstention (see :meth:`Turn.stream`)."""
        o = self.options
        verifier = Verifier([h.text for h in turn.prompt.hits], o.verify_min_overlap,
                            trusted=list(o.company_fields.values()), question=turn.question)
        sentences = SentenceStream()
        shown = 0
        shown_parts: list[str] = []
        gen = self._generate(turn)

        def verdicts(batch: list[str]) -> list[str]:
            nonlocal shown
            out = []
            for sent in batch:
                if not sent.strip():
                    continue
                v = verifier.check(sent)
                if v.supported and shown and covered(strip_markers(sent), "".join(shown_parts)):
                    v = replace(v, supported=False, reason="repetition")  # already said: said once
                if v.supported:
                    turn._mark(v.unit)
                    out.append(("" if shown == 0 else " ") + cite(sent, v.unit.passage))
                    shown_parts.append(out[-1])
                    shown += 1
                else:
                    turn.withheld.append({"text": sent.strip(), "reason": v.reason, "claims": v.missing_claims,
                                          "overlap": round(v.overlap, 3)})
                    self.metrics.withheld.labels(v.reason).inc()
            return out

        try:
            async for delta in gen:
                for out in verdicts(sentences.push(delta)):
                    yield out
        except EngineError:
            if shown:
                raise
            # the passages are known: the customer gets the extractive answer instead of an error
            log.exception("turn %s: generation failed; answering from the passages", turn.request_id)
            turn.finish_reason = "stop"
        finally:
            await gen.aclose()
        rest = sentences.flush()
        if turn.finish_reason == "length" and rest:  # the last sentence was cut off by max_tokens: never shown
            self.metrics.withheld.labels("truncated").inc(len(rest))
            turn.withheld += [{"text": t.strip(), "reason": "truncated", "claims": [], "overlap": 0.0}
                              for t in rest if t.strip()]
            rest = []
        for out in verdicts(rest):
            yield out
        if shown:
            # the extractive answer's sentences that the shown text does not already say complete the answer:
            # a verified answer holds every fact the extractive one does (a small model often states one,
            # or rests a vaguer sentence on a precise passage sentence)
            for u in self.extractive_units(turn):
                if covered(u.text, "".join(shown_parts)):
                    continue
                turn._mark(u)
                yield " " + cite(u.text, u.passage)
            turn.answer_kind = "verified"
            return
        text, kind = self.extractive_reply(turn)
        turn.answer_kind = kind
        yield text

    def extractive_units(self, turn: Turn) -> list:
        """The passage units an extractive answer of ``turn`` quotes: up to ``extractive_max_units``
        scoring at least ``extractive_min_score`` with the question (and on its topic with
        ``extractive_on_topic``), best first
        (:meth:`chatbot.verification.Evidence.best`); empty without evidence."""
        o = self.options
        if turn.evidence is None:
            return []
        return turn.evidence.best(o.extractive_max_units, o.extractive_min_score, on_topic=o.extractive_on_topic)

    def extractive_reply(self, turn: Turn) -> tuple[str, str]:
        """The extractive answer of ``turn``: its :meth:`extractive_units`, quoted verbatim in order of relevance,
        each with its citation [n] (spans marked on :attr:`Turn.citations`); when none is close
        enough, the abstention that offers a person (and the turn cites nothing).

        Returns:
            ``(text, kind)`` with kind ``extractive`` or ``abstained``.
        """
        units = self.extractive_units(turn)
        if not units:
            turn.citations = []  # nothing of the passages is shown: no sources under an abstention
            return self.options.abstain_message, "abstained"
        for u in units:
            turn._mark(u)
        return " ".join(cite(u.text, u.passage) for u in units), "extractive"


class Assistant:
    """The customer-service assistant: ties retrieval, the engine and the store together.

    Args:
        settings: service settings.
        engine: a started or startable :class:`~chatbot.engines.base.Engine`.
        retriever: search over the published index (None: answer without passages).
        store: the conversation log store.
        router: routes each customer message (:class:`~chatbot.router.Router`); None answers everything.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        retriever: Retriever | None,
        store: Store,
        metrics: Metrics | None = None,
        router: Router | None = None,
    ) -> None:
        self.settings = settings
        self.router = router
        self.engine = engine
        self.retriever = retriever
        self.store = store
        self.metrics = metrics or Metrics()
        from chatbot.conversation_log import ConversationLog
        from chatbot.redaction import build_redactor

        #: redacting, failure-tolerant writer of the conversation (chatbot.conversation_log)
        self.log = ConversationLog(
            store, build_redactor(settings, entity_head=lambda: getattr(self.router, "entity_head", None)),
            self.metrics,
        )
        from chatbot.adapter_watch import LiveAdapterWatcher

        #: keeps the engine on the promoted adapter (LIVE.json), checked before each generated turn
        self.adapters = LiveAdapterWatcher(settings, self.metrics)
        max_running = settings.max_concurrent or (settings.max_num_seqs if engine.info.name == "vllm" else 1)
        self.admission = Admission(max_running, settings.max_queued, settings.retry_after_s, self.metrics,
                                   settings.max_per_client, settings.max_per_conversation)

    @classmethod
    def from_settings(cls, settings: Settings, index_dir=None, database_url: str | None = None) -> "Assistant":
        """Build the assistant the settings describe (engine not started yet).

        ``index_dir`` and ``database_url`` override the settings' index and store (evaluations
        run over their own document collection and keep their conversations out of the log).

        Raises:
            ModelAssetError: the embedded chat model could not be prepared.
            ConfigError: the engine setting cannot be honoured here.
            StoreError: the database cannot be opened.
        """
        from chatbot.adapter_watch import lora_enabled
        from chatbot.assets import resolve_chat_model
        from chatbot.engines import build_engine

        engine = build_engine(settings, resolve_chat_model(settings), enable_lora=lora_enabled(settings))
        retriever = Retriever(index_dir or settings.index_dir, build_embedder(settings), search_options(settings))
        router = Router.from_settings(settings) if settings.routing else None
        return cls(settings, engine, retriever, Store(database_url or settings.resolved_database_url), router=router)

    async def start_engine(self) -> None:
        """Start the engine on what ``LIVE.json`` names (no-op when started; then it only applies a changed
        pointer). The pointer is applied first, so that an engine serving the live adapter as a merged checkpoint
        starts on it instead of starting on the base model and switching in the background.

        Raises:
            EngineError: the engine cannot start.
        """
        await self.adapters.sync(self.engine)
        await self.engine.start()

    async def start_turn(
        self,
        conversation_id: str | None,
        text: object,
        params: GenerationParams | None = None,
        history: Sequence[ChatMessage] | None = None,
        channel: str = "api",
        client: str | None = None,
    ) -> Turn:
        """:meth:`_start_turn`, with the request's stop strings (``params.stop``) kept on the turn: they cut
        whatever reply it gives (generated, verified, extractive, fixed; :meth:`Turn.stream`).

        ``client``: the caller's address, for its per-client share of admission places
        (``settings.max_per_client``); None is not limited per client.
        """
        turn = await self._start_turn(conversation_id, text, params, history, channel, client)
        if params is not None:
            turn.stop = params.stop
        return turn

    async def _start_turn(
        self,
        conversation_id: str | None,
        text: object,
        params: GenerationParams | None = None,
        history: Sequence[ChatMessage] | None = None,
        channel: str = "api",
        client: str | None = None,
    ) -> Turn:
        """Validate, look up the conversation, route, retrieve and build the prompt (no generation yet).

        With a router, the message's decision (:attr:`Turn.route`) is stored with it. What to do is the
        routing policy's :class:`~chatbot.router.Route` (:func:`chatbot.router.plan`), carried out here:
        search its queries when it says so (the better-scoring query's passages are kept), settle it
        (:meth:`~chatbot.router.Route.after_search`: grounding), then ``handoff`` queues the conversation
        for a person and returns a held turn; a fixed reply (``clarify``, ``ask_slot``, smalltalk) returns
        a turn with that reply (no generation); else the answer is generated.
        In ``verified`` and ``extractive`` mode a turn without
        passages is the abstention (no generation), and an ``extractive`` turn is answered from
        the passages without the engine.

        Args:
            conversation_id: continue this conversation (history from the store), or None for a new one.
            text: the customer's message.
            params: sampling settings (default from settings).
            history: earlier messages for a new conversation (e.g. sent by an API client).
            channel: recorded on a new conversation.

        Raises:
            InvalidInputError: bad message, or it cannot fit the model's context.
            NotFoundError: unknown ``conversation_id``.
            TooBusyError: every running and queued place is taken, or the client or the conversation
                holds its share of them.
        """
        s = self.settings
        user_text = clean_message(text, s.max_message_chars)
        params = params or GenerationParams(
            max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
        )
        if params.max_tokens >= s.max_model_len:
            raise InvalidInputError(f"max_tokens must be < max_model_len ({s.max_model_len}), got {params.max_tokens}")
        rows: list[Message] = []
        if conversation_id is not None:
            conv = await asyncio.to_thread(self.store.get_conversation, conversation_id)
            # a few more rows than the prompt keeps: routing state (clarifications, pending slot)
            state = self.router.state_rows if self.router is not None else 0
            rows = await asyncio.to_thread(self.store.history, conversation_id, max(2 * s.history_turns, state, 6))
            decision = await self._route(user_text, rows)
            if conv.status in HUMAN_STATUSES:  # a person has it: store the message, the bot stays silent
                return await self.held_turn(conversation_id, user_text, channel, status=conv.status, route=decision)
            history = [ChatMessage(r.role, r.text) for r in rows[-2 * s.history_turns :]] if s.history_turns else []
        else:
            # a client that sends the history itself: the previous decision is its last customer message's
            earlier = [m.content for m in history or [] if m.role == "user"]
            decision = await self._route(user_text, [], earlier[-1] if earlier else None)
            history = list(history or [])[-2 * s.history_turns :] if s.history_turns else []
        mode = s.answer_mode
        earlier = [r.text for r in rows if r.role == "user"] if conversation_id is not None else [
            m.content for m in history if m.role == "user"]
        # the routing policy says what to do (chatbot.router.plan); this method only carries it out
        route = plan(decision, user_text, earlier, self.router.policy if self.router is not None else None,
                     s.route_grounded_min_score)
        query, hits, index_version = route.query, [], None
        if self.retriever is not None and route.search:
            query, hits = await asyncio.to_thread(self._search, route.queries)
            index_version = self.retriever.version
        route = route.after_search(max((h.score for h in hits), default=None))
        decision = route.decision
        if decision is not None:
            self.metrics.intents.labels(decision.intent).inc()
        if route.handoff:
            return await self._handoff_turn(conversation_id, user_text, channel, decision)
        if route.reply is not None:
            return await self._fixed_turn(conversation_id, user_text, channel, decision, route.reply)
        evidence = None
        if mode != "generate":
            if not hits:  # nothing in the documents: say so and offer a person, generate nothing
                return await self._fixed_turn(conversation_id, user_text, channel, decision, s.abstain_message,
                                              kind="abstained")
            encode = self.retriever.embedder.encode
            evidence = await asyncio.to_thread(Evidence.for_hits, query, hits, encode, user_text)
            if mode == "extractive":
                turn = await self._fixed_turn(conversation_id, user_text, channel, decision, "", hits=hits,
                                              index_version=index_version)
                turn.evidence = evidence
                turn.fixed_reply, turn.answer_kind = turn._replier.extractive_reply(turn)
                return turn
        await self.start_engine()  # a promoted adapter goes live here
        prompt_hits = hits
        if evidence is not None and s.prompt_max_units:  # only the passage sentences that matter (shorter prefill)
            prompt_hits = evidence.focus(hits, s.prompt_max_units)
        prompt = build_prompt(
            s.system_prompt,
            user_text,
            prompt_hits,
            history,
            self.engine.count_prompt_tokens,
            s.max_model_len - params.max_tokens,
        )
        prompt.hits = hits[: len(prompt.hits)]  # verified and cited against the whole passages
        if evidence is not None:  # passages trimmed to fit the budget are neither verified against nor quoted
            evidence = evidence.within(len(prompt.hits))
        # raises TooBusyError (429) when the queue is full or this client / conversation holds its share
        ticket = self.admission.reserve(client=client, conversation=conversation_id)
        turn = Turn(
            _ticket=ticket,
            request_id=uuid.uuid4().hex,
            conversation_id=conversation_id or uuid.uuid4().hex,
            new_conversation=conversation_id is None,
            user_text=user_text,
            prompt=prompt,
            params=params,
            citations=citations_from_hits(prompt.hits, self.settings.docs_base_url),
            index_version=index_version,
            channel=channel,
            route=decision,
            mode=mode,
            question=query,
            evidence=evidence,
            _replier=self._replier(),
        )
        try:  # the customer's message is stored now, before any reply exists (never lost)
            stored = await asyncio.to_thread(
                self.log.customer_message, turn.conversation_id, user_text, turn.request_id, channel,
                turn.new_conversation, decision,
            )
        except BaseException:
            ticket.release()
            raise
        turn.user_message_id = stored.id if stored is not None else None
        return turn

    def _search(self, queries: Sequence[str]) -> tuple[str, list[Hit]]:
        """Search every query (a route's :attr:`~chatbot.router.Route.queries`); return the one whose best
        passage scores highest, with its passages (sentences addressed to the assistant removed)."""
        s = self.settings
        results = self.retriever.search_batch(list(queries), s.top_k, s.min_score)
        best = max(range(len(queries)), key=lambda i: results[i][0].score if results[i] else -1.0)
        # a document's sentences that address the assistant are an injection, not policy: never prompted
        return queries[best], [replace(h, text=sanitize_passage(h.text)) for h in results[best]]

    async def _route(self, text: str, rows: Sequence[Message], previous_text: str | None = None) -> RouteDecision | None:
        """The router's decision for ``text`` given the conversation's stored ``rows`` (or, for a client
        that sends its own history, the previous customer message ``previous_text``;
        :meth:`~chatbot.router.Router.route_turn`).

        Returns None without a router, and when routing fails: the error is logged and counted
        (``chatbot_routing_errors_total``) and the message is answered unrouted, so a broken head
        never loses a customer's message.
        """
        if self.router is None:
            return None
        try:
            return await asyncio.to_thread(self.router.route_turn, text, rows, previous_text)
        except Exception:
            log.exception("routing failed; answering without routing")
            self.metrics.routing_errors.inc()
            return None

    async def _fixed_turn(self, conversation_id: str | None, user_text: str, channel: str,
                          route: RouteDecision | None, reply: str, new: bool | None = None, kind: str = "fixed",
                          hits: Sequence[Hit] = (), index_version: str | None = None) -> Turn:
        """Store the customer's message and return a turn that answers with ``reply`` (no generation).

        Args:
            new: whether the message opens the conversation (default: ``conversation_id is None``).
            kind: the turn's :attr:`Turn.answer_kind` (``fixed``, ``abstained``, ``extractive``).
            hits: passages the reply quotes (extractive answers), cited and logged with it.
        """
        new = conversation_id is None if new is None else new
        turn = Turn(
            request_id=uuid.uuid4().hex, conversation_id=conversation_id or uuid.uuid4().hex,
            new_conversation=new, user_text=user_text,
            prompt=BuiltPrompt(messages=[], hits=list(hits), history_kept=0, prompt_tokens=0),
            params=GenerationParams(max_tokens=1), citations=citations_from_hits(hits, self.settings.docs_base_url),
            index_version=index_version,
            channel=channel, route=route, fixed_reply=reply, answer_kind=kind, mode=self.settings.answer_mode,
            _replier=self._replier(),
        )
        stored = await asyncio.to_thread(self.log.customer_message, turn.conversation_id, user_text, turn.request_id,
                                         channel, turn.new_conversation, route)
        turn.user_message_id = stored.id if stored is not None else None
        return turn

    async def _handoff_turn(self, conversation_id: str | None, user_text: str, channel: str,
                            route: RouteDecision) -> Turn:
        """Queue the conversation for a person (reason ``route.reason``), then store the customer's
        message and return a held turn.

        The handoff is written first: when the store is down the turn fails with nothing stored
        (a retry is safe), instead of keeping the message for later while the request for a person is lost.
        """
        h = await self.request_handoff(conversation_id, str(route.reason), channel=channel, intent=route.intent)
        turn = await self._fixed_turn(h.conversation_id, user_text, channel, route, HANDOFF_NOTICE, new=False)
        turn.new_conversation = conversation_id is None
        turn.fixed_reply, turn.held, turn.status = None, True, "handoff"
        return turn

    async def held_turn(self, conversation_id: str, user_text: str, channel: str = "api",
                        status: str = "handoff", route=None) -> Turn:
        """Store the customer's message of a conversation a person has (or will take) and return a
        turn that does not generate (:attr:`Turn.held`; it streams :data:`HANDOFF_NOTICE`).

        Args:
            user_text: the cleaned message.
            status: the conversation's status (``handoff`` or ``human``).
            route: the routing decision, stored with the message when given.
        """
        request_id = uuid.uuid4().hex
        stored = await asyncio.to_thread(self.log.customer_message, conversation_id, user_text, request_id, channel,
                                         False, route, None, "held")
        return Turn(
            request_id=request_id, conversation_id=conversation_id, new_conversation=False, user_text=user_text,
            prompt=BuiltPrompt(messages=[], hits=[], history_kept=0, prompt_tokens=0),
            params=GenerationParams(max_tokens=1), citations=[], index_version=None, channel=channel,
            held=True, status=status, user_message_id=stored.id if stored is not None else None, route=route,
            mode=self.settings.answer_mode, _replier=self._replier(),
        )

    @cached_property
    def review(self) -> Review:
        """The review service over this assistant's conversation log (:class:`chatbot.review.Review`): what the
        faces call for feedback, transcripts, annotations, handoffs, exports and analytics."""
        return Review(self.store, self.log)

    async def request_handoff(self, conversation_id: str | None, reason: str, queue: str = "default",
                              channel: str = "web", intent: str | None = None) -> Handoff:
        """Hand the conversation to people: it joins the staff handoff queue (status ``handoff``) and
        the bot stays silent on it (customer messages are stored, :meth:`start_turn` returns held
        turns) until staff hand it back or close it. Idempotent while a handoff is pending.

        Call it when routing decides on a handoff, or when the customer asks for a person
        (the chat page's button, ``POST /v1/handoff``).

        Args:
            conversation_id: the conversation, or None to open a new one for the request.
            reason: why, e.g. ``customer_request``, ``human_request``, ``handoff_intent``, ``low_confidence``.
            queue: the staff queue.

        Returns:
            The pending :class:`~chatbot.store.Handoff` (``conversation_id`` names a new
            conversation when None was given).

        Raises:
            NotFoundError: unknown ``conversation_id``.
            StoreError: the handoff could not be stored.
        """
        h = await asyncio.to_thread(self.log.request_handoff, conversation_id, reason, queue, channel, None, intent)
        self.metrics.handoffs.labels(reason).inc()
        log.info("conversation %s handed off (%s)", h.conversation_id, reason)
        return h

    def _replier(self) -> Replier:
        """What a turn's reply is made with: this assistant's engine, metrics, reply settings and :meth:`record`."""
        return Replier(self.engine, self.metrics, ReplyOptions.from_settings(self.settings), self.record)

    def record(self, turn: Turn) -> None:
        """Store the finished reply (the customer's message was stored by :meth:`start_turn`).

        Never raises for a failed write: :class:`~chatbot.conversation_log.ConversationLog`
        reports it and keeps the reply for a retry (``turn.message_id`` stays None).
        """
        fixed = turn.fixed_reply is not None
        engine = self.engine.info.name if not fixed else ("router" if turn.answer_kind == "fixed" else "verifier")
        reply = Message(
            conversation_id="",
            role="assistant",
            text=turn.text,
            chunk_ids=ids_as_str([h.chunk_id for h in turn.prompt.hits]),
            chunk_scores=[round(h.score, 4) for h in turn.prompt.hits],
            citations=[c.as_dict() for c in turn.citations],
            model=None if fixed else self.engine.info.model,
            engine=engine,
            adapter_version=turn.adapter_version,
            action=turn.route.action if fixed and turn.route is not None else None,
            index_version=turn.index_version,
            finish_reason=turn.finish_reason,
            latency_ms=turn.latency_ms,
            ttft_ms=turn.ttft_ms,
            prompt_tokens=turn.prompt_tokens,
            completion_tokens=turn.completion_tokens,
            answer_kind=turn.answer_kind,
            withheld=turn.withheld or None,
        )
        reply.conversation_id = turn.conversation_id
        reply.request_id = turn.request_id
        msg = self.log.reply(reply)
        turn.message_id = msg.id if msg is not None else None

    async def respond(self, conversation_id: str | None, text: object, **kwargs) -> Turn:
        """Run a whole turn without streaming; return the finished :class:`Turn`."""
        turn = await self.start_turn(conversation_id, text, **kwargs)
        async for _ in turn.stream():
            pass
        return turn
