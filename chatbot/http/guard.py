"""The console's login guard, as pure ASGI middleware.

Every path under ``/console`` and ``/operator`` except the login form needs a session (401, or a
redirect to the login form for a browser page); ``/operator`` and ``/console/api/operator`` need the
operator role (403). Pure ASGI rather than ``app.middleware("http")``: Starlette's
``BaseHTTPMiddleware`` would pass every response, the Gradio pages' event streams included, through an
extra memory stream, one copy per token; this guard decides on the request and then hands the ASGI
``send`` on untouched.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from chatbot.auth import has_role, request_token
from chatbot.http.pages import forbidden_page
from chatbot.http.state import get_console

#: Path prefixes that need a login, and those that need the operator role.
PROTECTED_PREFIXES = ("/console", "/operator")
OPERATOR_PREFIXES = ("/operator", "/console/api/operator")
PUBLIC_PATHS = ("/console/login", "/console/logout", "/console/api/login")


def is_protected(path: str) -> bool:
    """True when ``path`` needs a login."""
    return path.startswith(PROTECTED_PREFIXES) and not any(path == p or path.startswith(p + "/")
                                                            for p in PUBLIC_PATHS)


def _wants_html(request: Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("accept", "")


class ConsoleGuard:
    """ASGI middleware: login for ``/console`` and ``/operator``; the operator role for operator paths.

    The user of an allowed request is put in ``request.state.console_user`` for the routes inside.

    Args:
        app: the ASGI app inside.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path = request.url.path
        if not is_protected(path):
            await self.app(scope, receive, send)
            return
        console = await asyncio.to_thread(get_console, request.app)
        user = await asyncio.to_thread(console.user, request_token(request))
        need = "operator" if path.startswith(OPERATOR_PREFIXES) else "staff"
        refusal = None
        if user is None:
            if _wants_html(request):
                refusal = RedirectResponse(f"/console/login?next={quote(path)}", status_code=303)
            else:
                refusal = JSONResponse(status_code=401, content={"error": {
                    "message": "login required", "type": "authentication_error", "code": None}})
        elif not has_role(user, need):
            msg = f"user {user.username!r} (role {user.role!r}) may not open {path}: operators only"
            if _wants_html(request):
                refusal = HTMLResponse(forbidden_page(msg), status_code=403)
            else:
                refusal = JSONResponse(status_code=403, content={"error": {
                    "message": msg, "type": "permission_error", "code": None}})
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        request.state.console_user = user
        await self.app(scope, receive, send)


__all__ = ["OPERATOR_PREFIXES", "PROTECTED_PREFIXES", "PUBLIC_PATHS", "ConsoleGuard", "is_protected"]
