"""HTTP endpoints of feedback, handoff and the staff / operator console; login; the chat widget script.

Customer side (no login; a conversation id is the capability, as in the chat API):

* ``POST /v1/feedback``: thumbs up/down (and a comment) on a reply.
* ``POST /v1/handoff``: "talk to a person" (``conversation_id`` optional: a new one is opened).
* ``GET /v1/conversations/{id}``: status; ``GET /v1/conversations/{id}/messages?after=N``: new
  messages (staff replies reach API clients this way).
* ``GET /widget.js``: the embeddable chat launcher (see README, "Embed the chat").

Console (login required; the session cookie, or ``Authorization: Bearer <token>`` from
``POST /console/api/login``):

* ``GET/POST /console/login``, ``/console/logout``: the login form.
* staff: ``GET /console/api/conversations`` (search; ``approved=true|false`` filters on replies approved for
  training), ``GET /console/api/conversations/{id}``, ``PUT /console/api/messages/{id}/annotation``,
  ``GET /console/api/export?ids=..&format=jsonl|csv`` (``approved_only=true`` without ids: every approved
  conversation, JSONL cut after the last approved reply, CSV with all their messages),
  ``GET /console/api/handoffs``, ``POST /console/api/conversations/{id}/take|reply|release|close``.
* operator: ``GET /console/api/operator/analytics``, ``GET /console/api/operator/jobs``,
  ``POST /console/api/operator/users``.
* the Gradio pages: ``/console`` (staff) and ``/operator`` (operators only).

Every path under ``/console`` and ``/operator`` except the login form is refused without a
session (401, or a redirect to the login form for a browser page) and ``/operator`` and
``/console/api/operator`` are refused to staff (403).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as _dt
import html
import io
import json
import logging
import threading
import time
from typing import Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from chatbot.auth import COOKIE_NAME, Auth, has_role
from chatbot.errors import AuthError, ChatbotError, InvalidInputError, PermissionDeniedError
from chatbot.store import CONVERSATION_STATUSES, Store, User, as_utc

log = logging.getLogger(__name__)

#: Path prefixes that need a login, and those that need the operator role.
PROTECTED_PREFIXES = ("/console", "/operator")
OPERATOR_PREFIXES = ("/operator", "/console/api/operator")
PUBLIC_PATHS = ("/console/login", "/console/logout", "/console/api/login")


# ---------------------------------------------------------------------------------------- export


def export_jsonl(store: Store, conversation_ids: list[str] | None, approved_only: bool = False,
                 system_prompt: str | None = None) -> str:
    """Chat-SFT JSONL: one ``{"id", "messages": [{"role", "content"}, ...]}`` line per conversation
    (see :meth:`chatbot.store.Store.sft_examples`)."""
    rows = store.sft_examples(conversation_ids, approved_only=approved_only, system_prompt=system_prompt)
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


CSV_FIELDS = ("conversation_id", "message_id", "created_at", "role", "text", "corrected_text", "approved", "intent",
              "confidence", "rating", "comment", "cited_docs")


#: First characters that make a spreadsheet read a cell as a formula (OWASP "CSV Injection").
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe_cell(value):
    """A CSV cell that a spreadsheet shows as text: a string starting with ``=``, ``+``, ``-``, ``@``,
    tab or carriage return gets a leading ``'`` (the OWASP "CSV Injection" advice, as dify PR #29462 did
    in its export); other values are returned unchanged. ``'=SUM(1+1)`` shows as ``=SUM(1+1)`` in
    Excel, LibreOffice and Google Sheets instead of being evaluated."""
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value


def export_csv(store: Store, conversation_ids: list[str]) -> str:
    """CSV with a header and one row per message (columns :data:`CSV_FIELDS`), for a spreadsheet: text
    cells that a spreadsheet would take for a formula are neutralised (:func:`csv_safe_cell`); the
    JSONL export keeps the exact text."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in store.export_rows(conversation_ids):
        w.writerow({k: csv_safe_cell(v) for k, v in row.items()})
    return buf.getvalue()


def parse_ids(ids: str | list[str] | None) -> list[str]:
    """Conversation ids from a comma / whitespace separated string (or a list), de-duplicated, in order.

    Raises:
        InvalidInputError: an id longer than 64 characters.
    """
    if ids is None:
        return []
    parts = ids if isinstance(ids, list) else ids.replace(",", " ").split()
    out = list(dict.fromkeys(p.strip() for p in parts if p and p.strip()))
    for p in out:
        if len(p) > 64:
            raise InvalidInputError(f"conversation id must be at most 64 characters, got {p[:80]!r}")
    return out


def parse_day(value: str | None, field: str, end: bool = False) -> _dt.datetime | None:
    """``YYYY-MM-DD`` (or an ISO time) as an aware UTC datetime; ``end`` moves a bare date to the next day.

    Raises:
        InvalidInputError: not a date; the message names ``field`` and the value.
    """
    if value is None or not str(value).strip():
        return None
    v = str(value).strip()
    try:
        if len(v) == 10:
            d = _dt.datetime.strptime(v, "%Y-%m-%d").replace(tzinfo=_dt.timezone.utc)
            return d + _dt.timedelta(days=1) if end else d
        d = _dt.datetime.fromisoformat(v)
        return as_utc(d)
    except ValueError as exc:
        raise InvalidInputError(f"{field} must be a date YYYY-MM-DD, got {v!r}") from exc


# ---------------------------------------------------------------------------------------- console state


class Console:
    """Per-app console state: the login service and the operator's background jobs.

    Created on first use (the store exists only once the app has started); creates the
    ``admin_username`` operator when ``admin_password`` is set and no such user exists.
    """

    def __init__(self, app: FastAPI) -> None:
        settings = app.state.settings
        self.app = app
        self.store: Store = app.state.assistant.store
        self.auth = Auth(self.store, session_hours=settings.console_session_hours)
        self._cache: dict[str, tuple[float, User | None]] = {}
        self._cache_lock = threading.Lock()
        from chatbot.operations import Jobs

        self.jobs = Jobs()
        if settings.admin_password is not None:
            if self.auth.ensure_user(settings.admin_username, settings.admin_password.get_secret_value(), "operator"):
                log.info("console: created the operator %r from CHATBOT_ADMIN_PASSWORD", settings.admin_username)

    def user(self, token: str | None) -> User | None:
        """The user of a session token (cached for 5 s)."""
        if not token:
            return None
        now = time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(token)
            if hit is not None and now - hit[0] < 5.0:
                return hit[1]
        user = self.auth.user_for_token(token)
        with self._cache_lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[token] = (now, user)
        return user

    def forget(self, token: str | None) -> None:
        with self._cache_lock:
            self._cache.pop(token or "", None)


_INIT_LOCK = threading.Lock()


def get_console(app: FastAPI) -> Console:
    """The app's :class:`Console` (created on first use)."""
    c = getattr(app.state, "console", None)
    if c is None:
        with _INIT_LOCK:
            c = getattr(app.state, "console", None)
            if c is None:
                c = Console(app)
                app.state.console = c
    return c


def request_token(request: Request) -> str | None:
    """The session token of a request: the cookie, else an ``Authorization: Bearer`` header."""
    token = request.cookies.get(COOKIE_NAME)
    if token:
        return token
    h = request.headers.get("authorization", "")
    return h[7:].strip() if h.lower().startswith("bearer ") else None


def request_user(request: Request) -> User | None:
    """The logged-in user of a request (None when not logged in)."""
    user = getattr(request.state, "console_user", None)
    if user is not None:
        return user
    return get_console(request.app).user(request_token(request))


def _wants_html(request: Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("accept", "")


def _safe_next(path: str | None) -> str:
    """Only same-site relative paths (no open redirect)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/console/"
    return path


async def console_guard(request: Request, call_next):
    """Middleware: login for ``/console`` and ``/operator``; the operator role for operator paths."""
    path = request.url.path
    if path.startswith(PROTECTED_PREFIXES) and not any(path == p or path.startswith(p + "/") for p in PUBLIC_PATHS):
        console = await asyncio.to_thread(get_console, request.app)
        user = await asyncio.to_thread(console.user, request_token(request))
        need = "operator" if path.startswith(OPERATOR_PREFIXES) else "staff"
        if user is None:
            if _wants_html(request):
                return RedirectResponse(f"/console/login?next={quote(path)}", status_code=303)
            return JSONResponse(status_code=401, content={"error": {
                "message": "login required", "type": "authentication_error", "code": None}})
        if not has_role(user, need):
            msg = f"user {user.username!r} (role {user.role!r}) may not open {path}: operators only"
            if _wants_html(request):
                return HTMLResponse(_page("Not allowed", f"<p>{html.escape(msg)}</p><p><a href='/console/'>Back "
                                                         f"to the staff console</a></p>"), status_code=403)
            return JSONResponse(status_code=403, content={"error": {
                "message": msg, "type": "permission_error", "code": None}})
        request.state.console_user = user
    return await call_next(request)


def staff_user(request: Request) -> User:
    """Dependency: the logged-in staff member or operator.

    Raises:
        AuthError: not logged in.
    """
    return Auth.require(request_user(request), "staff")


def operator_user(request: Request) -> User:
    """Dependency: the logged-in operator.

    Raises:
        AuthError: not logged in.
        PermissionDeniedError: not an operator.
    """
    return Auth.require(request_user(request), "operator")


# ---------------------------------------------------------------------------------------- HTML


def _page(title: str, body: str) -> str:
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:26rem;margin:4rem auto;padding:0 1rem}}
label{{display:block;margin:.8rem 0 .2rem}}input{{width:100%;padding:.5rem;box-sizing:border-box}}
button{{margin-top:1rem;padding:.5rem 1.2rem}}.err{{color:#b00020}}</style></head>
<body><h2>{html.escape(title)}</h2>{body}</body></html>"""


def _login_form(next_path: str, error: str | None = None) -> str:
    err = f'<p class="err" id="login-error">{html.escape(error)}</p>' if error else ""
    return _page("Support console: log in", f"""{err}
<form method="post" action="/console/login">
<input type="hidden" name="next" value="{html.escape(next_path)}">
<label for="username">User name</label><input id="username" name="username" autocomplete="username" required>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button id="login" type="submit">Log in</button></form>""")


#: The embeddable chat launcher: a button that opens the chat page in an iframe.
WIDGET_JS = r"""(function () {
  if (window.__chatbotWidget) return;
  window.__chatbotWidget = true;
  var me = document.currentScript;
  var origin = new URL(me.src).origin;
  var title = me.getAttribute("data-title") || "Chat with us";
  var src = origin + "/";
  var btn = document.createElement("button");
  btn.id = "chatbot-launcher";
  btn.type = "button";
  btn.textContent = title;
  btn.setAttribute("aria-expanded", "false");
  btn.style.cssText = "position:fixed;right:20px;bottom:20px;z-index:2147483646;padding:12px 18px;" +
    "border:0;border-radius:24px;background:#2563eb;color:#fff;font:15px system-ui,sans-serif;cursor:pointer;" +
    "box-shadow:0 4px 14px rgba(0,0,0,.25)";
  var frame = null;
  btn.addEventListener("click", function () {
    if (!frame) {
      frame = document.createElement("iframe");
      frame.id = "chatbot-frame";
      frame.title = title;
      frame.src = src;
      frame.allow = "clipboard-write";
      frame.style.cssText = "position:fixed;right:20px;bottom:76px;z-index:2147483647;width:400px;" +
        "max-width:calc(100vw - 40px);height:620px;max-height:calc(100vh - 100px);border:1px solid #ddd;" +
        "border-radius:12px;background:#fff;box-shadow:0 8px 30px rgba(0,0,0,.25)";
      document.body.appendChild(frame);
    } else {
      frame.style.display = frame.style.display === "none" ? "block" : "none";
    }
    btn.setAttribute("aria-expanded", frame.style.display === "none" ? "false" : "true");
  });
  document.body.appendChild(btn);
})();
"""


# ---------------------------------------------------------------------------------------- bodies


class FeedbackIn(BaseModel):
    """Body of ``POST /v1/feedback``."""

    model_config = ConfigDict(extra="forbid")
    conversation_id: str = Field(max_length=64)
    message_id: int
    rating: Literal["up", "down", 1, -1] | None = Field(description="up / 1, down / -1, or null to remove")
    comment: str | None = Field(default=None, max_length=4000)


class HandoffIn(BaseModel):
    """Body of ``POST /v1/handoff``."""

    model_config = ConfigDict(extra="forbid")
    conversation_id: str | None = Field(default=None, max_length=64)


class LoginIn(BaseModel):
    """Body of ``POST /console/api/login``."""

    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class AnnotationIn(BaseModel):
    """Body of ``PUT /console/api/messages/{id}/annotation``."""

    model_config = ConfigDict(extra="forbid")
    corrected_text: str | None = Field(default=None, max_length=8000)
    approved: bool | None = None


class ReplyIn(BaseModel):
    """Body of ``POST /console/api/conversations/{id}/reply``."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=8000)


class UserIn(BaseModel):
    """Body of ``POST /console/api/operator/users``."""

    model_config = ConfigDict(extra="forbid")
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)
    role: Literal["staff", "operator"] = "staff"


def _msg_out(m) -> dict:
    return {"id": m.id, "role": m.role, "text": m.text, "created_at": as_utc(m.created_at).isoformat()}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, _dt.datetime):
        return as_utc(obj).isoformat()
    return obj


# ---------------------------------------------------------------------------------------- routers


def build_routers() -> tuple[APIRouter, APIRouter]:
    """(customer router, console router)."""
    public = APIRouter()
    console = APIRouter()

    def assistant(request: Request):
        return request.app.state.assistant

    # -- customer side
    @public.post("/v1/feedback")
    async def feedback(body: FeedbackIn, request: Request) -> dict:
        rating = {"up": 1, "down": -1}.get(body.rating, body.rating) if body.rating is not None else None
        store = assistant(request).store
        fb = await asyncio.to_thread(store.add_feedback, body.conversation_id, body.message_id, rating, body.comment)
        return {"message_id": body.message_id, "rating": fb.rating if fb else None}

    @public.post("/v1/handoff")
    async def handoff(body: HandoffIn, request: Request) -> dict:
        h = await assistant(request).request_handoff(body.conversation_id, "customer_request", channel="api")
        return {"conversation_id": h.conversation_id, "handoff_id": h.id, "status": "handoff"}

    @public.get("/v1/conversations/{conversation_id}")
    async def conversation(conversation_id: str, request: Request) -> dict:
        c = await asyncio.to_thread(assistant(request).store.get_conversation, conversation_id)
        return {"id": c.id, "status": c.status, "channel": c.channel, "started_at": as_utc(c.started_at).isoformat()}

    @public.get("/v1/conversations/{conversation_id}/messages")
    async def conversation_messages(conversation_id: str, request: Request, after: int = Query(0, ge=0)) -> dict:
        store = assistant(request).store
        c = await asyncio.to_thread(store.get_conversation, conversation_id)
        msgs = await asyncio.to_thread(store.messages_after, conversation_id, after)
        return {"conversation_id": c.id, "status": c.status, "messages": [_msg_out(m) for m in msgs]}

    @public.get("/widget.js")
    async def widget() -> Response:
        return Response(WIDGET_JS, media_type="text/javascript", headers={"Cache-Control": "public, max-age=300"})

    # -- login
    @console.get("/console/login", response_class=HTMLResponse)
    async def login_form(next: str = "/console/") -> str:
        return _login_form(_safe_next(next))

    @console.post("/console/login")
    async def login_submit(request: Request, username: str = Form(""), password: str = Form(""),
                           next: str = Form("/console/")):
        c = await asyncio.to_thread(get_console, request.app)
        try:
            token, _user = await asyncio.to_thread(c.auth.login, username.strip(), password, _client(request))
        except AuthError as exc:
            return HTMLResponse(_login_form(_safe_next(next), str(exc)), status_code=401)
        resp = RedirectResponse(_safe_next(next), status_code=303)
        _set_cookie(request, resp, token)
        return resp

    @console.post("/console/api/login")
    async def login_json(body: LoginIn, request: Request):
        c = await asyncio.to_thread(get_console, request.app)
        token, user = await asyncio.to_thread(c.auth.login, body.username, body.password, _client(request))
        resp = JSONResponse({"token": token, "username": user.username, "role": user.role})
        _set_cookie(request, resp, token)
        return resp

    @console.api_route("/console/logout", methods=["GET", "POST"])
    async def logout(request: Request):
        c = await asyncio.to_thread(get_console, request.app)
        token = request_token(request)
        await asyncio.to_thread(c.auth.logout, token)
        c.forget(token)
        resp = RedirectResponse("/console/login", status_code=303)
        resp.delete_cookie(COOKIE_NAME, path="/")
        return resp

    @console.get("/console/api/me")
    async def me(user: User = Depends(staff_user)) -> dict:
        return {"username": user.username, "role": user.role}

    # -- staff: transcripts
    @console.get("/console/api/conversations")
    async def search(request: Request, user: User = Depends(staff_user), q: str | None = None,
                     since: str | None = None, until: str | None = None, intent: str | None = None,
                     status: str | None = None, feedback: str | None = None, approved: bool | None = None,
                     limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)) -> dict:
        store = assistant(request).store
        rows = await asyncio.to_thread(
            store.search_conversations, q, parse_day(since, "since"), parse_day(until, "until", end=True),
            intent or None, status or None, feedback or None, limit, offset, approved)
        return {"conversations": _jsonable(rows)}

    @console.get("/console/api/conversations/{conversation_id}")
    async def transcript(conversation_id: str, request: Request, user: User = Depends(staff_user)) -> dict:
        return _jsonable(await asyncio.to_thread(assistant(request).store.transcript, conversation_id))

    @console.put("/console/api/messages/{message_id}/annotation")
    async def annotate(message_id: int, body: AnnotationIn, request: Request,
                       user: User = Depends(staff_user)) -> dict:
        a = assistant(request)
        text = body.corrected_text
        if text is not None:
            text = a.log.redactor.redact(text).text
        ann = await asyncio.to_thread(a.store.annotate, message_id, user.id, text, body.approved)
        return {"message_id": message_id, "corrected_text": ann.corrected_text, "approved": ann.approved}

    @console.get("/console/api/export")
    async def export(request: Request, user: User = Depends(staff_user), ids: str | None = None,
                     format: Literal["jsonl", "csv"] = "jsonl", approved_only: bool = False) -> Response:
        store = assistant(request).store
        id_list = parse_ids(ids)
        if not id_list and not approved_only:
            raise InvalidInputError("ids must name at least one conversation (or set approved_only=true)")
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        prefix = "approved" if approved_only else "conversations"
        if format == "csv":
            if approved_only:  # every message of the conversations with an approved reply (of ids, when given)
                approved_ids = await asyncio.to_thread(store.approved_conversation_ids)
                id_list = [i for i in id_list if i in set(approved_ids)] if id_list else approved_ids
            body = await asyncio.to_thread(export_csv, store, id_list)
            media, name = "text/csv; charset=utf-8", f"{prefix}-{stamp}.csv"
        else:
            body = await asyncio.to_thread(export_jsonl, store, id_list or None, approved_only)
            media, name = "application/x-ndjson; charset=utf-8", f"{prefix}-{stamp}.jsonl"
        log.info("console: %s exported %d conversation(s) as %s", user.username, len(id_list), format)
        return Response(body, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    # -- staff: handoff queue
    @console.get("/console/api/handoffs")
    async def handoffs(request: Request, user: User = Depends(staff_user)) -> dict:
        return {"handoffs": _jsonable(await asyncio.to_thread(assistant(request).store.handoff_queue))}

    @console.post("/console/api/conversations/{conversation_id}/take")
    async def take(conversation_id: str, request: Request, user: User = Depends(staff_user)) -> dict:
        h = await asyncio.to_thread(assistant(request).store.take_handoff, conversation_id, user.id)
        return {"conversation_id": conversation_id, "handoff_id": h.id, "status": "human", "assigned_to": user.username}

    @console.post("/console/api/conversations/{conversation_id}/reply")
    async def reply(conversation_id: str, body: ReplyIn, request: Request, user: User = Depends(staff_user)) -> dict:
        m = await asyncio.to_thread(assistant(request).log.staff_reply, conversation_id, user.id, body.text)
        return _msg_out(m)

    @console.post("/console/api/conversations/{conversation_id}/release")
    async def release(conversation_id: str, request: Request, user: User = Depends(staff_user)) -> dict:
        c = await asyncio.to_thread(assistant(request).store.release_handoff, conversation_id, False)
        return {"conversation_id": c.id, "status": c.status}

    @console.post("/console/api/conversations/{conversation_id}/close")
    async def close(conversation_id: str, request: Request, user: User = Depends(staff_user)) -> dict:
        c = await asyncio.to_thread(assistant(request).store.release_handoff, conversation_id, True)
        return {"conversation_id": c.id, "status": c.status}

    # -- operator
    @console.get("/console/api/operator/analytics")
    async def analytics(request: Request, user: User = Depends(operator_user), since: str | None = None,
                        until: str | None = None) -> dict:
        store = assistant(request).store
        return _jsonable(await asyncio.to_thread(store.analytics, parse_day(since, "since"),
                                                 parse_day(until, "until", end=True)))

    @console.get("/console/api/operator/jobs")
    async def jobs(request: Request, user: User = Depends(operator_user)) -> dict:
        return {"jobs": [j.as_dict() for j in get_console(request.app).jobs.list()]}

    @console.post("/console/api/operator/users")
    async def add_user(body: UserIn, request: Request, user: User = Depends(operator_user)) -> dict:
        c = get_console(request.app)
        u = await asyncio.to_thread(c.auth.add_user, body.username, body.password, body.role)
        log.info("console: %s created the %s %r", user.username, u.role, u.username)
        return {"username": u.username, "role": u.role}

    return public, console


def _client(request: Request) -> str | None:
    """The caller's address (a trusted proxy's ``X-Forwarded-For`` already applied), for the login lock-out."""
    return request.client.host if request.client else None


def _set_cookie(request: Request, resp: Response, token: str) -> None:
    """Set the session cookie: HttpOnly, SameSite=lax, and Secure whenever the request came over HTTPS
    (the connection's scheme, or ``X-Forwarded-Proto`` from a trusted proxy, ``settings.trusted_proxies``)
    or ``console_secure_cookie`` is set."""
    settings = request.app.state.settings
    secure = settings.console_secure_cookie or request.url.scheme == "https"
    resp.set_cookie(COOKIE_NAME, token, max_age=int(settings.console_session_hours * 3600), path="/",
                    httponly=True, samesite="lax", secure=secure)


def install_console(app: FastAPI, settings, mount_ui: bool = True) -> FastAPI:
    """Add the customer endpoints, the console endpoints, the login guard and (``mount_ui``) the
    Gradio console pages at ``/console`` and ``/operator`` to ``app``; return the app.

    Call before the chat page is mounted at ``/`` (that mount catches every other path).
    """
    public, console = build_routers()
    app.include_router(public)
    app.include_router(console)
    app.middleware("http")(console_guard)

    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a):
        async with inner(a) as state:
            try:  # users and the admin bootstrap (CHATBOT_ADMIN_PASSWORD) at start-up, not on the first visit
                await asyncio.to_thread(get_console, app)
            except ChatbotError:
                log.exception("console: start-up failed; it will be retried on the first console request")
            yield state

    app.router.lifespan_context = lifespan
    if mount_ui:
        import gradio as gr

        from ui.console import build_console_ui, build_operator_ui

        def username(request: Request) -> str | None:
            user = request_user(request)
            return user.username if user is not None else None

        def get_assistant():
            return app.state.assistant

        app = gr.mount_gradio_app(app, build_console_ui(get_assistant, app), path="/console",
                                  auth_dependency=username, footer_links=[])
        app = gr.mount_gradio_app(app, build_operator_ui(get_assistant, app), path="/operator",
                                  auth_dependency=username, footer_links=[])
    return app


__all__ = ["install_console", "export_jsonl", "export_csv", "csv_safe_cell", "get_console", "request_user",
           "WIDGET_JS", "CONVERSATION_STATUSES", "PermissionDeniedError"]
