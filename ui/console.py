"""Staff and operator console (Gradio), mounted behind the login by :mod:`chatbot.http`.

* ``/console`` (staff and operators): search transcripts (text, date range, intent,
  status, feedback), open one with its citations, intents and confidences, write a
  corrected reply and approve turns for training, export conversations as chat-SFT
  JSONL or CSV; the handoff queue: take a conversation, reply, hand it back or close it.
* ``/operator`` (operators only): upload documents and re-index (progress shown), train
  from approved transcripts (a background job with progress), see adapters with their
  evaluation results and promote or roll back, and the analytics page.

UI only: the work is done by the service layer, :class:`chatbot.review.Review` (``assistant.review``)
and :mod:`chatbot.operations`. Every handler looks the user up from the request and checks the role
again (the login guard already refused the page otherwise); the page is given the app's console state
(``console()``: ``user(token)``, ``user_named(name)``, ``jobs``) by the face that mounts it.
"""

import asyncio
import html
import logging
from collections.abc import Callable
from urllib.parse import quote

from chatbot import operations as ops
from chatbot.auth import has_role, request_token
from chatbot.errors import ChatbotError
from chatbot.review import parse_ids
from ui.chat import customer_text, escape_markdown, format_sources, safe_reply

log = logging.getLogger(__name__)

RESULT_HEADERS = ["id", "started (UTC)", "status", "channel", "messages", "intents", "up", "down", "approved",
                  "first message"]
#: Column widths of the search results: wide enough that no header breaks inside a word.
RESULT_WIDTHS = ["150px", "170px", "90px", "90px", "100px", "160px", "60px", "70px", "100px", "320px"]
QUEUE_HEADERS = ["conversation", "waiting since (UTC)", "reason", "intent", "status", "assigned to", "last message"]
QUEUE_WIDTHS = ["150px", "180px", "150px", "140px", "90px", "120px", "320px"]
#: Links that export every conversation with an approved reply (one click each).
APPROVED_EXPORT_HTML = (
    '<p>All approved conversations: <a id="export-approved-jsonl" href="/console/api/export?approved_only=true&amp;'
    'format=jsonl" download>JSONL (chat SFT)</a> · <a id="export-approved-csv" href="/console/api/export?'
    'approved_only=true&amp;format=csv" download>CSV</a></p>')


def _fmt_time(t) -> str:
    if t is None:
        return ""
    if isinstance(t, str):
        return t[:19].replace("T", " ")
    return t.strftime("%Y-%m-%d %H:%M:%S")


def _fmt_metric(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render_transcript(t: dict) -> str:
    """Markdown of a transcript (:meth:`chatbot.review.Review.transcript`): each message with its role,
    time, intent and confidence, citations and retrieved chunks, versions, latency, feedback and review.

    What customers and staff wrote (messages, slot values, feedback comments, corrections) is shown as
    text (:func:`ui.chat.customer_text`); the bot's replies keep their Markdown without HTML or images
    (:func:`ui.chat.safe_reply`), so opening a transcript makes the browser load nothing a customer chose."""
    e = escape_markdown
    c = t["conversation"]
    lines = [f"### Conversation `{c['id']}`",
             f"status **{c['status']}** · channel {c['channel']} · started {_fmt_time(c['started_at'])} UTC"]
    for h in t.get("handoffs") or []:
        lines.append(f"- handoff #{h['id']}: {e(str(h['reason']))} ({h['status']}"
                     f"{', ' + e(h['assigned_to']) if h.get('assigned_to') else ''})")
    lines.append("")
    for m in t["messages"]:
        who = {"user": "Customer", "assistant": "Assistant",
               "staff": f"Staff ({e(m.get('author') or '?')})"}[m["role"]]
        lines.append(f"**#{m['id']} {who}** · {_fmt_time(m['created_at'])}")
        lines.append("")
        shown = safe_reply(m["text"] or "") if m["role"] == "assistant" else customer_text(m["text"] or "")
        lines.append("> " + shown.replace("\n", "\n> "))
        meta = []
        if m.get("intent"):
            conf = f" ({m['confidence']:.2f})" if m.get("confidence") is not None else ""
            meta.append(f"intent **{e(m['intent'])}**{conf}")
        if m.get("action"):
            meta.append(f"action {e(m['action'])}")
        if m.get("slots"):
            meta.append("slots " + ", ".join(f"{e(str(s.get('type')))}={e(str(s.get('value')))}" for s in m["slots"]))
        if m.get("redactions"):
            meta.append("redacted " + ", ".join(f"{e(str(k))}×{v}" for k, v in m["redactions"].items()))
        if m["role"] == "assistant":
            if m.get("answer_kind"):
                meta.append(f"answer {e(m['answer_kind'])}")
            if m.get("finish_reason") == "length":
                meta.append("✂️ cut at the token limit (finish_reason length)")
            if m.get("citations"):
                meta.append("sources " + "; ".join(f"\\[{x['number']}\\] {e(str(x['title']))} ({e(str(x['doc_id']))}, "
                                                   f"{x['score']})" for x in m["citations"]))
            else:
                meta.append("no sources")
            if m.get("chunk_ids"):
                scores = m.get("chunk_scores") or []
                meta.append("chunks " + ", ".join(f"{e(str(cid))}:{s}"
                                                  for cid, s in zip(m["chunk_ids"], scores, strict=False)))
            if m.get("latency_ms") is not None:
                meta.append(f"{m['latency_ms']:.0f} ms, {m.get('prompt_tokens')}+{m.get('completion_tokens')} tokens")
            versions = [f"index {e(m['index_version'])}" if m.get("index_version") else "",
                        f"adapter {e(m['adapter_version'])}" if m.get("adapter_version") else ""]
            meta += [v for v in versions if v]
        fb = m.get("feedback")
        if fb:
            meta.append(("👍 thumbs up" if fb["rating"] > 0 else "👎 thumbs down")
                        + (f": {e(fb['comment'])}" if fb.get("comment") else ""))
        a = m.get("annotation")
        if a:
            if a.get("corrected_text"):
                meta.append(f"corrected by {e(a.get('author') or '?')}: “{e(a['corrected_text'])}”")
            if a.get("approved"):
                meta.append(f"✅ approved for training by {e(a.get('approved_by') or '?')}")
        if meta:
            lines.append("")
            lines.append("<small>" + " · ".join(meta) + "</small>")  # each value escaped above
        if m["role"] == "assistant" and any(c.get("spans") for c in m.get("citations") or []):
            lines.append("")
            lines.append("Supported by:" + format_sources(m["citations"]).split("**Sources**", 1)[1])
        if m.get("withheld"):  # generated sentences verification did not show the customer
            lines.append("")
            lines.append("Withheld (not shown to the customer):")
            lines += [f"- ~~{e(w.get('text', ''))}~~ ({e(str(w.get('reason')))}"
                      + (f": {e(', '.join(map(str, w['claims'])))}" if w.get("claims") else "") + ")"
                      for w in m["withheld"]]
        lines.append("")
    return "\n".join(lines)


def export_links(ids_text: str) -> str:
    """HTML links to the export endpoint for the given conversation ids (comma or space separated)."""
    try:
        ids = parse_ids(ids_text or "")
    except ChatbotError as exc:
        return f"<p>{html.escape(str(exc))}</p>"
    if not ids:
        return "<p>Add conversations to export (open one and press “Add to export”, or “Add all results”).</p>"
    q = quote(",".join(ids))
    return (f'<p>{len(ids)} conversation(s): '
            f'<a id="export-jsonl" href="/console/api/export?format=jsonl&amp;ids={q}" download>Download JSONL '
            f'(chat SFT)</a> · <a id="export-csv" href="/console/api/export?format=csv&amp;ids={q}" download>'
            f'Download CSV</a></p>')


def _user(console: Callable[[], object], request, role: str = "staff"):
    """The console user of a Gradio request; raises gr.Error when not allowed."""
    import gradio as gr

    user = None
    if request is not None:
        state = console()
        user = state.user(request_token(request.request) if getattr(request, "request", None) else None)
        if user is None and getattr(request, "username", None):
            user = state.user_named(request.username)
    if not has_role(user, role):
        raise gr.Error(f"{role} login required")
    return user


def _header(console: Callable[[], object], request, page: str = "console") -> str:
    user = _user(console, request)
    if page == "operator":
        link = " · [Staff console](/console/)"
    else:
        link = " · [Operator console](/operator/)" if user.role == "operator" else ""
    return f"Logged in as **{user.username}** ({user.role}) · [Log out](/console/logout){link}"


def build_console_ui(get_assistant: Callable[[], object], console: Callable[[], object]):
    """The staff console (Gradio Blocks), mounted at ``/console``.

    Args:
        get_assistant: returns the running :class:`~chatbot.service.Assistant` (its ``review`` service).
        console: returns the app's console state (who is logged in).
    """
    import gradio as gr

    def review():
        return get_assistant().review

    def search(q, since, until, intent, status, feedback, approved_only, request: gr.Request):
        """The results, their count and ids; the open transcript and its review fields are cleared."""
        _user(console, request)
        approved_flag = {"approved": True, "not approved": False}.get(approved_only or "")
        try:
            rows = review().search(q or None, since, until, intent or None, status or None, feedback or None,
                                   approved=approved_flag, limit=200)
        except ChatbotError as exc:
            raise gr.Error(str(exc)) from exc
        data = [[r["id"], _fmt_time(r["started_at"]), r["status"], r["channel"], r["messages"],
                 ", ".join(r["intents"]), r["up"], r["down"], r.get("approved", 0), r["preview"]] for r in rows]
        cleared = ("", "", gr.update(choices=[], value=None), "", False, "")
        return (gr.update(value=data or None), f"{len(rows)} conversation(s)", [r["id"] for r in rows], *cleared)

    def open_conversation(cid, request: gr.Request):
        _user(console, request)
        cid = (cid or "").strip()
        if not cid:
            return "Enter or pick a conversation.", gr.update(choices=[], value=None), "", False
        try:
            t = review().transcript(cid)
        except ChatbotError as exc:
            return f"**{html.escape(str(exc))}**", gr.update(choices=[], value=None), "", False
        replies = [m for m in t["messages"] if m["role"] in ("assistant", "staff")]
        choices = [(f"#{m['id']} {m['role']}: {m['text'][:60]}", m["id"]) for m in replies]
        first = replies[-1] if replies else None
        corrected, approved = _annotation_fields(first)
        return (render_transcript(t), gr.update(choices=choices, value=first["id"] if first else None),
                corrected, approved)

    def _annotation_fields(m) -> tuple[str, bool]:
        if not m:
            return "", False
        a = m.get("annotation") or {}
        return a.get("corrected_text") or m["text"], bool(a.get("approved"))

    def pick_reply(cid, message_id, request: gr.Request):
        _user(console, request)
        if not cid or message_id is None:
            return "", False
        try:
            t = review().transcript(cid.strip())
        except ChatbotError:
            return "", False
        m = next((m for m in t["messages"] if m["id"] == int(message_id)), None)
        return _annotation_fields(m)

    def save_annotation(cid, message_id, corrected, approved, request: gr.Request):
        user = _user(console, request)
        if message_id is None:
            raise gr.Error("pick a reply to annotate")
        try:
            review().annotate(int(message_id), user.id, corrected or "", bool(approved))
            t = review().transcript(cid.strip())
        except ChatbotError as exc:
            raise gr.Error(str(exc)) from exc
        state = "approved for training" if approved else "not approved"
        return render_transcript(t), f"Saved reply #{message_id}: {state}."

    def add_to_export(ids_text, cid):
        ids = [x for x in (ids_text or "").replace(",", " ").split() if x]
        if cid and cid.strip() and cid.strip() not in ids:
            ids.append(cid.strip())
        value = ", ".join(ids)
        return value, export_links(value)

    def add_all(ids_text, result_ids):
        ids = [x for x in (ids_text or "").replace(",", " ").split() if x]
        ids += [i for i in (result_ids or []) if i not in ids]
        value = ", ".join(ids)
        return value, export_links(value)

    def queue(request: gr.Request):
        _user(console, request)
        rows = review().handoff_queue()
        data = [[r["conversation_id"], _fmt_time(r["created_at"]), r["reason"], r["intent"] or "", r["status"],
                 r["assigned_to"] or "", r["preview"]] for r in rows]
        return gr.update(value=data or None), f"{len(rows)} waiting or in progress"

    def show(cid):
        try:
            return render_transcript(review().transcript(cid.strip()))
        except ChatbotError as exc:
            return f"**{html.escape(str(exc))}**"

    def take(cid, request: gr.Request):
        user = _user(console, request)
        if not (cid or "").strip():
            raise gr.Error("enter or pick a conversation")
        try:
            review().take(cid.strip(), user.id)
        except ChatbotError as exc:
            raise gr.Error(str(exc)) from exc
        return show(cid), f"You have conversation {cid.strip()}; the bot stays silent until you hand it back."

    def send_reply(cid, text, request: gr.Request):
        user = _user(console, request)
        if not (cid or "").strip():
            raise gr.Error("enter or pick a conversation")
        try:
            review().reply(cid.strip(), user.id, text or "")
        except ChatbotError as exc:
            raise gr.Error(str(exc)) from exc
        return show(cid), "", "Reply sent."

    def release(cid, close: bool, request: gr.Request):
        _user(console, request)
        if not (cid or "").strip():
            raise gr.Error("enter or pick a conversation")
        try:
            c = review().release(cid.strip(), close=close)
        except ChatbotError as exc:
            raise gr.Error(str(exc)) from exc
        return show(cid), ("Conversation closed." if close else "Handed back to the bot.") + f" Status: {c.status}."

    def hand_back(cid, request: gr.Request):
        return release(cid, False, request)

    def close_conv(cid, request: gr.Request):
        return release(cid, True, request)

    def header_text(request: gr.Request):
        return _header(console, request)

    def select_row(evt: gr.SelectData, df):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            return str(df.iloc[row, 0]) if hasattr(df, "iloc") else str(df[row][0])
        except (IndexError, KeyError, TypeError):
            return gr.skip()

    with gr.Blocks(title="Support console", analytics_enabled=False) as blocks:
        header = gr.Markdown()
        with gr.Tab("Transcripts"):
            with gr.Row():
                q = gr.Textbox(label="Text", placeholder="words in any message", elem_id="search-text", scale=3)
                since = gr.Textbox(label="From (YYYY-MM-DD)", elem_id="search-since", scale=1)
                until = gr.Textbox(label="To (YYYY-MM-DD)", elem_id="search-until", scale=1)
            with gr.Row():
                intent = gr.Textbox(label="Intent", elem_id="search-intent")
                status = gr.Dropdown(["", "bot", "handoff", "human", "closed"], value="", label="Status",
                                     elem_id="search-status")
                feedback = gr.Dropdown(["", "up", "down", "any", "none"], value="", label="Feedback",
                                       elem_id="search-feedback")
                approved_filter = gr.Dropdown(["", "approved", "not approved"], value="", label="Review",
                                              elem_id="search-approved")
                search_btn = gr.Button("Search", variant="primary", elem_id="search")
            found = gr.Markdown(elem_id="search-count")
            results = gr.Dataframe(headers=RESULT_HEADERS, interactive=False, wrap=True, column_widths=RESULT_WIDTHS,
                                   elem_id="results")
            result_ids = gr.State([])
            with gr.Row():
                cid = gr.Textbox(label="Conversation id", elem_id="conv-id", scale=3)
                open_btn = gr.Button("Open", elem_id="open", scale=1)
            transcript = gr.Markdown(elem_id="transcript", latex_delimiters=[])  # "$$" a customer typed stays text
            with gr.Group():
                reply_pick = gr.Dropdown(label="Reply to review", choices=[], elem_id="reply-pick")
                corrected = gr.Textbox(label="Corrected reply", lines=4, elem_id="corrected")
                approved = gr.Checkbox(label="Approved for training", elem_id="approved")
                save_btn = gr.Button("Save review", elem_id="save-annotation")
                saved = gr.Markdown(elem_id="annotation-status")
            with gr.Group():
                export_ids = gr.Textbox(label="Conversations to export (ids)", elem_id="export-ids")
                with gr.Row():
                    add_btn = gr.Button("Add to export", elem_id="add-export")
                    add_all_btn = gr.Button("Add all results", elem_id="add-all-export")
                links = gr.HTML(export_links(""), elem_id="export-links")
                gr.HTML(APPROVED_EXPORT_HTML, elem_id="export-approved")
        with gr.Tab("Handoff queue"):
            with gr.Row():
                refresh = gr.Button("Refresh", elem_id="queue-refresh")
                queue_count = gr.Markdown(elem_id="queue-count")
            queue_df = gr.Dataframe(headers=QUEUE_HEADERS, interactive=False, wrap=True, column_widths=QUEUE_WIDTHS,
                                    elem_id="queue")
            hcid = gr.Textbox(label="Conversation id", elem_id="handoff-conv")
            with gr.Row():
                take_btn = gr.Button("Take", variant="primary", elem_id="take")
                back_btn = gr.Button("Hand back to the bot", elem_id="hand-back")
                close_btn = gr.Button("Close conversation", elem_id="close-conv")
            hstatus = gr.Markdown(elem_id="handoff-status")
            htranscript = gr.Markdown(elem_id="handoff-transcript", latex_delimiters=[])
            staff_text = gr.Textbox(label="Reply to the customer", lines=3, elem_id="staff-reply")
            send_btn = gr.Button("Send reply", elem_id="send-reply")
            queue_timer = gr.Timer(5.0)

        blocks.load(header_text, None, header)
        filters = [q, since, until, intent, status, feedback, approved_filter]
        search_outputs = [results, found, result_ids, cid, transcript, reply_pick, corrected, approved, saved]
        search_btn.click(search, filters, search_outputs)
        q.submit(search, filters, search_outputs)
        results.select(select_row, results, cid).then(open_conversation, cid, [transcript, reply_pick, corrected,
                                                                               approved])
        open_btn.click(open_conversation, cid, [transcript, reply_pick, corrected, approved])
        cid.submit(open_conversation, cid, [transcript, reply_pick, corrected, approved])
        reply_pick.input(pick_reply, [cid, reply_pick], [corrected, approved])
        save_btn.click(save_annotation, [cid, reply_pick, corrected, approved], [transcript, saved])
        add_btn.click(add_to_export, [export_ids, cid], [export_ids, links])
        add_all_btn.click(add_all, [export_ids, result_ids], [export_ids, links])
        export_ids.change(export_links, export_ids, links)
        refresh.click(queue, None, [queue_df, queue_count])
        blocks.load(queue, None, [queue_df, queue_count])
        queue_timer.tick(queue, None, [queue_df, queue_count], show_progress="hidden")
        queue_df.select(select_row, queue_df, hcid).then(show, hcid, htranscript)
        hcid.submit(show, hcid, htranscript)
        take_btn.click(take, hcid, [htranscript, hstatus])
        send_btn.click(send_reply, [hcid, staff_text], [htranscript, staff_text, hstatus])
        staff_text.submit(send_reply, [hcid, staff_text], [htranscript, staff_text, hstatus])
        back_btn.click(hand_back, hcid, [htranscript, hstatus])
        close_btn.click(close_conv, hcid, [htranscript, hstatus])
    return blocks


def intent_chart_height(intents: int) -> int:
    """Pixel height of the horizontal handoff-by-intent chart: 24 px a bar plus room for the axis and title."""
    return max(240, 24 * intents + 110)


def train_run_html(run: dict | None) -> str:
    """HTML table of a training run (``adapter.json`` ``run``): examples per split and where the evaluation
    came from, optimizer steps, epochs, learning rate, warm-up, time, whether the adapter changes the model."""
    if not run:
        return ""
    c = run.get("examples") or {}
    ev = run.get("evaluation") or {}
    source = "fixed reference set (all conversations train)" if ev.get("kind") == "reference" else "held out"
    steps = str(run.get("steps"))
    if run.get("raised_to_min_steps"):
        steps += f" (raised to the minimum {run.get('min_steps')})"
    lo, hi = run.get("step_learning_rate_min"), run.get("step_learning_rate_max")
    rows = [("training conversations", c.get("train")), ("validation dialogues", c.get("validation")),
            ("test dialogues", c.get("test")), ("evaluated on", source), ("optimizer steps", steps),
            ("epochs", f"{run.get('epochs') or 0:.1f}"), ("learning rate", f"{run.get('learning_rate'):g}"),
            ("warm-up steps", run.get("warmup_steps")),
            ("step learning rates", "-" if lo is None else f"{lo:.2e} to {hi:.2e}"),
            ("time", f"{run.get('train_seconds', 0):.1f} s training, {run.get('total_seconds', 0):.1f} s in all"),
            ("changes the model", {True: "yes", False: "NO: every lora_B is zero, it cannot be promoted",
                                   None: "-"}[run.get("changes_model")])]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f'<table id="train-run" class="train-run">{body}</table>'


def _progress_html(job: dict | None) -> str:
    if not job:
        return "<p>No job yet.</p>"
    pct = int(round(job["progress"] * 100))
    run = (job.get("result") or {}).get("run") if job["status"] == "done" else None
    return (f'<div id="job-{job["kind"]}" data-status="{job["status"]}"><progress max="100" value="{pct}">'
            f"{pct}%</progress> <b>{pct}%</b> · {html.escape(job['status'])} · {job['elapsed_s']} s<br>"
            f"<small>{html.escape(job['message'] or '')}</small>{train_run_html(run)}</div>")


def build_operator_ui(get_assistant: Callable[[], object], console: Callable[[], object]):
    """The operator console (Gradio Blocks), mounted at ``/operator``.

    Args:
        get_assistant: returns the running :class:`~chatbot.service.Assistant`.
        console: returns the app's console state (who is logged in, the background ``jobs``).
    """
    import gradio as gr
    import pandas as pd

    def jobs():
        return console().jobs

    def latest(kind: str):
        js = jobs().list(kind)
        return js[0].as_dict() if js else None

    def header_text(request: gr.Request):
        return _header(console, request, "operator")

    def start_reindex(files, include_kb, request: gr.Request):
        user = _user(console, request, "operator")
        a = get_assistant()
        settings = a.settings
        if a.retriever is None:
            raise gr.Error("this server runs without retrieval; nothing to re-index")
        try:
            paths = ops.save_uploads([getattr(f, "name", f) for f in (files or [])],
                                     settings.data_dir / "uploads") if files else []
            roots = ([settings.data_dir / "uploads"] if paths else []) + ([settings.kb_dir] if include_kb else [])
            if not roots:
                raise gr.Error("upload documents or tick “also re-index the knowledge-base folder”")
            job = jobs().start("reindex", lambda report: ops.reindex(settings, a.retriever.embedder, roots, report,
                                                                     sync=bool(include_kb)), user.username)
        except ChatbotError as exc:
            raise gr.Error(str(exc)) from exc
        return _progress_html(job.as_dict())

    def start_training(request: gr.Request):
        user = _user(console, request, "operator")
        a = get_assistant()
        try:
            ops.check_trainable(a.store, a.settings)  # refuse at once rather than in a failed job
            job = jobs().start("train", lambda report: ops.train_from_approved(a.store, a.settings, report),
                               user.username)
        except ChatbotError as exc:
            raise gr.Error(str(exc)) from exc
        return _progress_html(job.as_dict())

    def progress(request: gr.Request):
        _user(console, request, "operator")
        return _progress_html(latest("reindex")), _progress_html(latest("train"))

    def served_line() -> str:
        """What LIVE.json names and what this server's engine serves, in words (finetune.adapters watcher)."""
        a = get_assistant()
        st = a.adapters.status(a.engine)
        served = st["served"] or "the base model"
        if st["in_sync"]:
            return f"**Live and served:** {served}."
        return (f"**{st['live'] or 'The base model'}: live, not yet served** (this server serves {served}). "
                f"Reason: {st['reason']}")

    async def adapters(request: gr.Request):
        _user(console, request, "operator")
        a = get_assistant()
        await a.adapters.sync(a.engine)
        settings = a.settings
        rows = await asyncio.to_thread(ops.list_adapters, settings)
        history = await asyncio.to_thread(ops.adapter_history, settings)
        hist = pd.DataFrame([[e.get("at"), e.get("user"), e.get("via"), e.get("action"), e.get("from") or "base",
                              e.get("to") or "base", e.get("sentence")] for e in history],
                            columns=["when", "who", "via", "action", "from", "to", "details"])
        if not rows:
            return (gr.update(value=None), "No adapters yet (train one from approved transcripts).\n\n" + served_line(),
                    gr.update(value=hist))
        served = a.engine.info.adapter_version
        metric_keys = [k for k in ("val_loss", "rouge_l", "self_stop_rate", "perplexity", "test_n")
                       if any(k in (r.get("metrics") or {}) for r in rows)]
        data = [[r["name"], r["version"], "yes" if r["live"] else "", "yes" if r["version"] == served else "",
                 r.get("base", "")] + [_fmt_metric((r.get("metrics") or {}).get(k)) for k in metric_keys]
                for r in rows]
        df = pd.DataFrame(data, columns=["name", "version", "live", "served", "base model"] + metric_keys)
        lines = [f"{len(rows)} adapter(s). " + served_line()]
        for r in rows:
            if r["live"] or not r.get("metrics"):
                continue
            try:
                cmp = await asyncio.to_thread(lambda v=r["version"]: ops.compare_adapter(settings, v, evaluate=False))
            except ChatbotError as exc:
                lines.append(f"- **{r['version']}**: cannot compare: {exc}")
                continue
            lines.append(f"- **{r['version']}** beside the live model: " + " ".join(cmp["sentences"]))
        return gr.update(value=df), "\n".join(lines), gr.update(value=hist)

    async def promote(version, request: gr.Request):
        user = _user(console, request, "operator")
        a = get_assistant()
        try:
            out = await asyncio.to_thread(ops.promote_adapter, a.settings, (version or "").strip(), user.username)
        except ChatbotError as exc:
            raise gr.Error(f"Not promoted: {exc}") from exc
        await a.adapters.sync(a.engine)  # this server switches now (vLLM without LoRA: in the background)
        body = "\n".join(f"- {line}" for line in out["sentences"])
        if out.get("answer_gate"):  # the side-by-side table of the answer gate
            body += "\n\n" + out["answer_gate"]["table"]
        return (f"**Promoted {out['live']}** (was {out['previous'] or 'the base model'}), by {user.username}.\n\n"
                f"{body}\n\n{served_line()}")

    async def rollback(request: gr.Request):
        user = _user(console, request, "operator")
        a = get_assistant()
        try:
            out = await asyncio.to_thread(ops.rollback_adapter, a.settings, user.username)
        except ChatbotError as exc:
            raise gr.Error(f"Not rolled back: {exc}") from exc
        await a.adapters.sync(a.engine)
        return f"**Rolled back** by {user.username}: live is now {out['live'] or 'the base model'}.\n\n{served_line()}"

    async def adapters_after_training(seen, request: gr.Request):
        """The adapter list again once a training job has finished that this page has not shown yet, so the new
        adapter appears without pressing Refresh; ``seen`` is the id of the last finished job shown."""
        job = latest("train")
        done = job["id"] if job and job["status"] == "done" else None
        if done is None or done == seen:
            return gr.skip(), gr.skip(), gr.skip(), seen
        return (*await adapters(request), done)

    def analytics(since, until, request: gr.Request):
        _user(console, request, "operator")
        try:
            a = get_assistant().review.analytics(since, until)
        except ChatbotError as exc:
            raise gr.Error(str(exc)) from exc
        days = pd.DataFrame(a["per_day"] or [], columns=["day", "conversations", "handoffs", "up", "down"])
        if len(days):
            days["deflection"] = 1 - days["handoffs"] / days["conversations"].clip(lower=1)
            rated = (days["up"] + days["down"]).clip(lower=1)
            days["thumbs_up_rate"] = days["up"] / rated
        else:
            days["deflection"] = days["thumbs_up_rate"] = []
        rated_days = days[(days["up"] + days["down"]) > 0] if len(days) else days
        by_intent = pd.DataFrame(a["handoff_by_intent"] or [], columns=["intent", "conversations", "handoffs", "rate"])
        unanswered = pd.DataFrame(a["unanswered"] or [], columns=["question", "count"])

        def pct(x):
            return "n/a" if x is None else f"{100 * x:.1f}%"

        summary = (f"**{a['conversations']}** conversations · **{a['handed_off']}** handed off · deflection "
                   f"**{pct(a['deflection'])}** · thumbs up **{pct(a['thumbs_up_rate'])}** "
                   f"({a['thumbs_up']} up, {a['thumbs_down']} down)")
        intent_plot = gr.update(value=by_intent[["intent", "rate"]], height=intent_chart_height(len(by_intent)))
        return (summary, days[["day", "conversations"]], days[["day", "deflection"]], intent_plot,
                rated_days[["day", "thumbs_up_rate"]], unanswered)

    with gr.Blocks(title="Operator console", analytics_enabled=False) as blocks:
        header = gr.Markdown()
        with gr.Tab("Documents"):
            files = gr.File(label="Documents (Markdown, text, HTML, PDF, DOCX)", file_count="multiple",
                            elem_id="upload")
            include_kb = gr.Checkbox(label="Also re-index the knowledge-base folder (removes documents deleted "
                                           "from it)", value=False, elem_id="include-kb")
            reindex_btn = gr.Button("Upload and re-index", variant="primary", elem_id="reindex")
            reindex_status = gr.HTML(_progress_html(None), elem_id="reindex-status")
        with gr.Tab("Training"):
            train_btn = gr.Button("Train from approved transcripts", variant="primary", elem_id="train")
            train_status = gr.HTML(_progress_html(None), elem_id="train-status")
            adapters_btn = gr.Button("Refresh adapters", elem_id="adapters-refresh")
            adapters_info = gr.Markdown(elem_id="adapters-info")
            adapters_df = gr.Dataframe(interactive=False, elem_id="adapters")
            with gr.Row():
                version = gr.Textbox(label="Adapter name (or folder)", elem_id="adapter-version")
                promote_btn = gr.Button("Promote", elem_id="promote")
                rollback_btn = gr.Button("Roll back", elem_id="rollback")
            adapter_result = gr.Markdown(elem_id="adapter-result")
            gr.Markdown("**Promotions and rollbacks** (audit log, newest first)")
            adapter_history = gr.Dataframe(interactive=False, wrap=True, elem_id="adapter-history")
            shown_train_job = gr.State(None)
        with gr.Tab("Analytics"):
            with gr.Row():
                a_since = gr.Textbox(label="From (YYYY-MM-DD)", elem_id="analytics-since")
                a_until = gr.Textbox(label="To (YYYY-MM-DD)", elem_id="analytics-until")
                a_btn = gr.Button("Refresh", variant="primary", elem_id="analytics-refresh")
            a_summary = gr.Markdown(elem_id="analytics-summary")
            with gr.Row():
                per_day = gr.BarPlot(x="day", y="conversations", title="Conversations per day", y_lim=[0, None],
                                     elem_id="plot-per-day")
                deflection = gr.BarPlot(x="day", y="deflection", title="Resolved without handoff (deflection)",
                                        y_lim=[0, 1], elem_id="plot-deflection")
            with gr.Row():
                # horizontal bars: one row per intent, so 30 intent names stay readable
                by_intent = gr.BarPlot(x="rate", y="intent", title="Handoff rate by intent", x_lim=[0, 1],
                                       height=intent_chart_height(0), elem_id="plot-handoff-intent")
                thumbs = gr.BarPlot(x="day", y="thumbs_up_rate", title="Thumbs-up rate", y_lim=[0, 1],
                                    elem_id="plot-thumbs")
            unanswered = gr.Dataframe(headers=["question", "count"], interactive=False, wrap=True,
                                      label="Top questions retrieval could not answer", elem_id="unanswered")
        timer = gr.Timer(1.0)

        blocks.load(header_text, None, header)
        reindex_btn.click(start_reindex, [files, include_kb], reindex_status)
        train_btn.click(start_training, None, train_status)
        timer.tick(progress, None, [reindex_status, train_status], show_progress="hidden")
        adapter_outs = [adapters_df, adapters_info, adapter_history]
        adapters_btn.click(adapters, None, adapter_outs)
        train_status.change(adapters_after_training, shown_train_job, [*adapter_outs, shown_train_job],
                            show_progress="hidden")
        blocks.load(adapters, None, adapter_outs)
        promote_btn.click(promote, version, adapter_result).then(adapters, None, adapter_outs)
        rollback_btn.click(rollback, None, adapter_result).then(adapters, None, adapter_outs)
        outs = [a_summary, per_day, deflection, by_intent, thumbs, unanswered]
        a_btn.click(analytics, [a_since, a_until], outs)
        blocks.load(analytics, [a_since, a_until], outs)
    return blocks


__all__ = ["build_console_ui", "build_operator_ui", "render_transcript", "export_links"]
