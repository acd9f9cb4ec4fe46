"""The routes: the customer's feedback, handoff, conversation status and widget script, the console
login, and the staff and operator console API. Each calls the service layer (:class:`chatbot.review.Review`,
:class:`chatbot.auth.Auth`, the assistant's handoff) and turns nothing into HTTP itself: typed errors become
statuses in the app's error handler."""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
from typing import Literal

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from chatbot.auth import COOKIE_NAME, User, request_token
from chatbot.errors import AuthError
from chatbot.http.pages import login_page, widget_js
from chatbot.http.state import get_console, operator_user, staff_user
from chatbot.review import Review, as_utc

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------- helpers


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


def _safe_next(path: str | None) -> str:
    """Only same-site relative paths (no open redirect)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/console/"
    return path


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


def _review(request: Request) -> Review:
    return request.app.state.assistant.review


# ---------------------------------------------------------------------------------------- routers


def build_routers() -> tuple[APIRouter, APIRouter]:
    """(customer router, console router)."""
    public = APIRouter()
    console = APIRouter()

    # -- customer side
    @public.post("/v1/feedback")
    async def feedback(body: FeedbackIn, request: Request) -> dict:
        rating = {"up": 1, "down": -1}.get(body.rating, body.rating) if body.rating is not None else None
        fb = await asyncio.to_thread(_review(request).feedback, body.conversation_id, body.message_id, rating,
                                     body.comment)
        return {"message_id": body.message_id, "rating": fb.rating if fb else None}

    @public.post("/v1/handoff")
    async def handoff(body: HandoffIn, request: Request) -> dict:
        h = await request.app.state.assistant.request_handoff(body.conversation_id, "customer_request", channel="api")
        return {"conversation_id": h.conversation_id, "handoff_id": h.id, "status": "handoff"}

    @public.get("/v1/conversations/{conversation_id}")
    async def conversation(conversation_id: str, request: Request) -> dict:
        c = await asyncio.to_thread(_review(request).conversation, conversation_id)
        return {"id": c.id, "status": c.status, "channel": c.channel, "started_at": as_utc(c.started_at).isoformat()}

    @public.get("/v1/conversations/{conversation_id}/messages")
    async def conversation_messages(conversation_id: str, request: Request, after: int = Query(0, ge=0)) -> dict:
        review = _review(request)
        c = await asyncio.to_thread(review.conversation, conversation_id)
        msgs = await asyncio.to_thread(review.messages_after, conversation_id, after)
        return {"conversation_id": c.id, "status": c.status, "messages": [_msg_out(m) for m in msgs]}

    @public.get("/widget.js")
    async def widget() -> Response:
        return Response(widget_js(), media_type="text/javascript", headers={"Cache-Control": "public, max-age=300"})

    # -- login
    @console.get("/console/login", response_class=HTMLResponse)
    async def login_form(next: str = "/console/") -> str:
        return login_page(_safe_next(next))

    @console.post("/console/login")
    async def login_submit(request: Request, username: str = Form(""), password: str = Form(""),
                           next: str = Form("/console/")):
        c = await asyncio.to_thread(get_console, request.app)
        try:
            token, _user = await asyncio.to_thread(c.auth.login, username.strip(), password, _client(request))
        except AuthError as exc:
            return HTMLResponse(login_page(_safe_next(next), str(exc)), status_code=401)
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
        rows = await asyncio.to_thread(_review(request).search, q, since, until, intent, status, feedback, approved,
                                       limit, offset)
        return {"conversations": _jsonable(rows)}

    @console.get("/console/api/conversations/{conversation_id}")
    async def transcript(conversation_id: str, request: Request, user: User = Depends(staff_user)) -> dict:
        return _jsonable(await asyncio.to_thread(_review(request).transcript, conversation_id))

    @console.put("/console/api/messages/{message_id}/annotation")
    async def annotate(message_id: int, body: AnnotationIn, request: Request,
                       user: User = Depends(staff_user)) -> dict:
        ann = await asyncio.to_thread(_review(request).annotate, message_id, user.id, body.corrected_text,
                                      body.approved)
        return {"message_id": message_id, "corrected_text": ann.corrected_text, "approved": ann.approved}

    @console.get("/console/api/export")
    async def export(request: Request, user: User = Depends(staff_user), ids: str | None = None,
                     format: Literal["jsonl", "csv"] = "jsonl", approved_only: bool = False) -> Response:
        out = await asyncio.to_thread(_review(request).export, ids, format, approved_only)
        log.info("console: %s exported %d conversation(s) as %s", user.username, out.conversations, format)
        return Response(out.body, media_type=out.media_type,
                        headers={"Content-Disposition": f'attachment; filename="{out.filename}"'})

    # -- staff: handoff queue
    @console.get("/console/api/handoffs")
    async def handoffs(request: Request, user: User = Depends(staff_user)) -> dict:
        return {"handoffs": _jsonable(await asyncio.to_thread(_review(request).handoff_queue))}

    @console.post("/console/api/conversations/{conversation_id}/take")
    async def take(conversation_id: str, request: Request, user: User = Depends(staff_user)) -> dict:
        h = await asyncio.to_thread(_review(request).take, conversation_id, user.id)
        return {"conversation_id": conversation_id, "handoff_id": h.id, "status": "human", "assigned_to": user.username}

    @console.post("/console/api/conversations/{conversation_id}/reply")
    async def reply(conversation_id: str, body: ReplyIn, request: Request, user: User = Depends(staff_user)) -> dict:
        m = await asyncio.to_thread(_review(request).reply, conversation_id, user.id, body.text)
        return _msg_out(m)

    @console.post("/console/api/conversations/{conversation_id}/release")
    async def release(conversation_id: str, request: Request, user: User = Depends(staff_user)) -> dict:
        c = await asyncio.to_thread(_review(request).release, conversation_id, False)
        return {"conversation_id": c.id, "status": c.status}

    @console.post("/console/api/conversations/{conversation_id}/close")
    async def close(conversation_id: str, request: Request, user: User = Depends(staff_user)) -> dict:
        c = await asyncio.to_thread(_review(request).release, conversation_id, True)
        return {"conversation_id": c.id, "status": c.status}

    # -- operator
    @console.get("/console/api/operator/analytics")
    async def analytics(request: Request, user: User = Depends(operator_user), since: str | None = None,
                        until: str | None = None) -> dict:
        return _jsonable(await asyncio.to_thread(_review(request).analytics, since, until))

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


__all__ = ["build_routers"]
