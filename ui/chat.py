"""Customer chat page (Gradio): streamed answers with their sources, thumbs up/down on each answer,
a "talk to a person" button, and staff replies shown in the same window.

UI only: every decision is made by :class:`chatbot.service.Assistant`.
Each browser session keeps its own ``conversation_id`` (and the ids of its replies)
in ``gr.State``, so two customers never share history. While a person has the
conversation, a timer polls for staff replies every ``poll_s`` seconds (:class:`chatbot.review.Review`).

Embed it in another site with the script tag served at ``/widget.js`` (see README,
"Embed the chat") or an ``<iframe src="https://support.example.com/">``.
"""

import asyncio
import logging
import re
from collections.abc import Callable, Sequence

from chatbot.errors import ChatbotError

log = logging.getLogger(__name__)

TITLE = "Customer support"
PERSON_BUTTON = "Talk to a person"
QUEUED_NOTICE = "You're in the queue for a member of our support team. They will reply here; you can keep writing."
RETURNED_NOTICE = "Our support team handed the conversation back to the assistant."
CLOSED_NOTICE = "Our support team closed this conversation. Write again any time."
STAFF_PREFIX = "**Support agent:** "
#: Said under a reply the engine stopped at its token limit (``finish_reason`` ``length``).
CUT_NOTICE = "My answer was cut short. Ask me to continue, or talk to a person."


def notice(text: str) -> str:
    """A notice (queued for a person, handed back, closed, cut short) as its own chat message, set apart from
    replies: italic, after an information sign. The chat shows every message in its own bubble, so a notice
    never reads as part of the reply above it."""
    return f"ℹ️ *{text}*"


def finish_reply(text: str, finish_reason: str | None) -> str:
    """The final text of a reply. A reply the engine stopped at its token limit (``finish_reason`` ``length``)
    says so on a line of its own (:data:`CUT_NOTICE`, in italics) and, when it stops mid-sentence, ends with "…",
    so it is never silently cut mid-word; other replies are returned as they are."""
    if finish_reason != "length" or not text:
        return text
    body = text.rstrip()
    if not body.endswith((".", "!", "?", "…", ":", ")", "]")):
        body += "…"
    return f"{body}\n\n*{CUT_NOTICE}*"


def _field(c, name: str, default=None):
    return c.get(name, default) if isinstance(c, dict) else getattr(c, name, default)


#: Every ASCII punctuation character: CommonMark lets each be backslash-escaped to stand for itself.
_MD_PUNCT = re.compile(r"([!-/:-@\[-`{-~])")
_LEADING_SPACE = re.compile(r"^[ \t]+", re.M)


def escape_markdown(text: str, keep_lines: bool = False) -> str:
    """Markdown that renders as exactly ``text``: no emphasis, heading, list, link, autolink, image, HTML
    tag or entity of its own. Used for what customers and staff write, and for document text quoted
    under an answer.

    Every ASCII punctuation character is backslash-escaped (CommonMark: "any ASCII punctuation character
    may be backslash-escaped"; this also stops GFM autolinks such as ``http://`` and ``www.``, which need
    the bare ``:`` / ``.``), and leading spaces become ``&nbsp;`` so an indented line is no code block.

    Args:
        keep_lines: keep line breaks (as Markdown hard breaks, two spaces and a newline); otherwise
            each line break becomes a space (one line, e.g. an excerpt in a list item).
    """
    text = _MD_PUNCT.sub(r"\\\1", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _LEADING_SPACE.sub(lambda m: "&nbsp;" * len(m.group(0).expandtabs(4)), text)
    return text.replace("\n", "  \n") if keep_lines else text.replace("\n", " ")


def customer_text(text: str) -> str:
    """A message a customer or a staff member wrote, for a Markdown view (the chat window, the staff
    transcript): shown as the exact text, line breaks kept; nothing in it is rendered as Markdown or
    HTML, so ``<script>``, ``<iframe>``, ``<img src=x>`` and ``![t](http://...)`` are visible text and
    make the browser load nothing."""
    return escape_markdown(text, keep_lines=True)


def safe_reply(text: str) -> str:
    """A bot reply for the chat window: its Markdown stays (lists, emphasis), but no image is
    fetched and no HTML is rendered. Verified and extractive replies quote document text, which
    may hold ``![x](http://...)`` or tags."""
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("![", "!\\[")


def highlight_spans(passage: str, spans: Sequence, window: int = 80) -> str:
    """Markdown excerpts of ``passage`` around each ``[start, end)`` span, the span in bold, the
    rest escaped; excerpts are cut ``window`` characters either side (``…`` marks a cut)."""
    parts = []
    for start, end in sorted((int(a), int(b)) for a, b in spans):
        lo, hi = max(0, start - window), min(len(passage), end + window)
        before, mark, after = passage[lo:start], passage[start:end], passage[end:hi]
        parts.append(("…" if lo else "") + escape_markdown(before) + "**" + escape_markdown(mark) + "**"
                     + escape_markdown(after) + ("…" if hi < len(passage) else ""))
    return " ".join(parts)


def _link(label_md: str, url: str) -> str:
    """``label_md`` as a Markdown link to ``url`` when that is an ``http(s)`` URL, else the label alone.
    The address is percent-encoded and given in ``<...>``, so no character of it ends the link."""
    from urllib.parse import quote

    if not url.startswith(("http://", "https://")):
        return label_md
    return f"[{label_md}](<{quote(url, safe=_URL_SAFE)}>)"


#: characters left as they are in a cited document's URL (reserved and unreserved ones, and ``%``)
_URL_SAFE = ":/?#[]@!$&'()*+,;=%~-._"


def format_sources(citations: Sequence) -> str:
    """Markdown block under an answer: each cited document ``[n] Title``, the title a link to the
    document's public ``url`` where it has one (never a path on the server), and, for a verified or
    extractive answer, the passage text its sentences rest on with the supporting span in bold.
    Passages no shown sentence used are left out when some have spans; empty without citations.

    ``citations``: :class:`chatbot.service.Citation` objects or their ``as_dict()`` dicts.
    """
    if not citations:
        return ""
    used = [c for c in citations if _field(c, "spans")]
    lines = []
    for c in used or citations:
        title = escape_markdown(str(_field(c, "title", "") or _field(c, "doc_id", "")))
        line = f"\\[{_field(c, 'number')}\\] " + _link(title, str(_field(c, "url", "") or ""))
        if _field(c, "spans"):
            line += "\n  > " + highlight_spans(_field(c, "passage", ""), _field(c, "spans"))
        lines.append(line)
    return "\n\n---\n**Sources**\n\n" + "\n".join(f"- {line}" for line in lines)


def _ref(conversation_id: str | None) -> str:
    return f"Conversation reference: `{conversation_id}`" if conversation_id else ""


def rating_of(liked) -> tuple[int | None, str | None]:
    """(rating, comment) from a Gradio like event: True -> +1, False -> -1, another option -> -1 with
    the option as comment, an empty value -> None (rating removed)."""
    if liked is True:
        return 1, None
    if liked is False:
        return -1, None
    if isinstance(liked, str) and liked.strip():
        return -1, liked.strip()
    return None, None


def build_chat_ui(get_assistant: Callable[[], object], poll_s: float = 2.0):
    """Build the Gradio Blocks of the customer chat.

    Args:
        get_assistant: returns the running :class:`~chatbot.service.Assistant`
            (looked up per message, so the page can be built before the model loads).
        poll_s: how often to look for staff replies while a person has the conversation, seconds.
    """
    import gradio as gr

    async def respond(message: str, history: list, conversation_id: str | None, msg_ids: dict, status: str,
                      request: gr.Request):
        history = list(history or [])
        msg_ids = dict(msg_ids or {})
        history.append({"role": "user", "content": customer_text(message)})
        history.append({"role": "assistant", "content": ""})
        try:
            # the page's customers get the same per-client admission share as API clients (the address is the
            # proxy's client when the proxy is trusted: the API's ProxyHeadersMiddleware wraps this page too)
            client = request.client.host if request is not None and request.client else None
            turn = await get_assistant().start_turn(conversation_id, message, channel="web", client=client)
        except ChatbotError as exc:
            history[-1]["content"] = f"Sorry, I could not process that message: {escape_markdown(str(exc))}"
            yield history, conversation_id, "", msg_ids, status, _ref(conversation_id)
            return
        text = ""
        try:
            async for delta in turn.stream():
                text += delta
                history[-1]["content"] = safe_reply(text)
                yield history, conversation_id, "", msg_ids, status, _ref(conversation_id)
        except ChatbotError as exc:
            history[-1]["content"] = f"{safe_reply(text)}\n\nSorry, something went wrong: {escape_markdown(str(exc))}"
            yield history, conversation_id, "", msg_ids, status, _ref(conversation_id)
            return
        if turn.held:  # the handoff notice is a notice of its own, not a bot reply
            history[-1]["content"] = notice(text or "")
        else:
            history[-1]["content"] = safe_reply(finish_reply(text, turn.finish_reason) or "(no answer)") \
                + format_sources(turn.citations)
        if turn.message_id is not None:
            msg_ids[str(len(history) - 1)] = turn.message_id
        new_status = getattr(turn, "status", "bot") or "bot"
        yield history, turn.conversation_id, "", msg_ids, new_status, _ref(turn.conversation_id)

    async def ask_person(history: list, conversation_id: str | None, status: str):
        history = list(history or [])
        try:
            h = await get_assistant().request_handoff(conversation_id, "customer_request", channel="web")
        except ChatbotError as exc:
            history.append({"role": "assistant",
                            "content": f"Sorry, I could not reach our support team: {escape_markdown(str(exc))}"})
            return history, conversation_id, status, _ref(conversation_id)
        history.append({"role": "assistant", "content": notice(QUEUED_NOTICE)})
        return history, h.conversation_id, "handoff", _ref(h.conversation_id)

    async def on_like(data: gr.LikeData, conversation_id: str | None, msg_ids: dict):
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        message_id = (msg_ids or {}).get(str(index))
        if conversation_id is None or message_id is None:
            return  # a notice, or a reply that was not stored: nothing to rate
        rating, comment = rating_of(data.liked)
        try:
            await asyncio.to_thread(get_assistant().review.feedback, conversation_id, int(message_id), rating,
                                    comment)
        except ChatbotError:
            log.exception("feedback on message %s not stored", message_id)

    def poll(conversation_id: str | None, history: list, last_seen: int, status: str):
        if not conversation_id or status not in ("handoff", "human"):
            return gr.skip(), gr.skip(), gr.skip()
        review = get_assistant().review
        try:
            conv = review.conversation(conversation_id)
            new = review.messages_after(conversation_id, int(last_seen or 0), roles=("staff",))
        except ChatbotError:
            return gr.skip(), gr.skip(), gr.skip()
        if not new and conv.status == status:
            return gr.skip(), gr.skip(), gr.skip()
        history = list(history or [])
        for m in new:
            history.append({"role": "assistant", "content": STAFF_PREFIX + customer_text(m.text)})
        if conv.status != status and conv.status in ("bot", "closed"):
            history.append({"role": "assistant", "content": notice(RETURNED_NOTICE if conv.status == "bot"
                                                                   else CLOSED_NOTICE)})
        last = max([int(last_seen or 0)] + [m.id for m in new])
        return history, last, conv.status

    with gr.Blocks(title=TITLE, analytics_enabled=False) as blocks:
        gr.Markdown(f"## {TITLE}\nAsk about orders, returns, refunds, your account or our policies.")
        conversation = gr.State(None)
        msg_ids = gr.State({})  # chat index (str) -> stored message id, for thumbs up/down
        last_seen = gr.State(0)  # newest staff message shown
        status = gr.State("bot")
        # one bubble per message: a notice after a reply is not drawn inside the reply's bubble under its sources;
        # latex off: a customer's "$$...$$" stays text (messages are escaped, see customer_text / safe_reply)
        chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chat", feedback_options=("Like", "Dislike"),
                             group_consecutive_messages=False, latex_delimiters=[])
        box = gr.Textbox(
            placeholder="Type your question and press Enter", show_label=False, elem_id="message", autofocus=True
        )
        with gr.Row():
            person = gr.Button(PERSON_BUTTON, elem_id="talk-to-person", size="sm", variant="secondary")
            ref = gr.Markdown("", elem_id="conversation-ref")
        timer = gr.Timer(poll_s)
        box.submit(respond, [box, chatbot, conversation, msg_ids, status],
                   [chatbot, conversation, box, msg_ids, status, ref], show_progress_on=[chatbot])
        person.click(ask_person, [chatbot, conversation, status], [chatbot, conversation, status, ref],
                     show_progress_on=[chatbot])
        chatbot.like(on_like, [conversation, msg_ids], None)
        # the chat's clear button starts a new conversation
        chatbot.clear(lambda: (None, {}, 0, "bot", ""), None, [conversation, msg_ids, last_seen, status, ref])
        timer.tick(poll, [conversation, chatbot, last_seen, status], [chatbot, last_seen, status],
                   show_progress="hidden", concurrency_limit=None)
    return blocks
