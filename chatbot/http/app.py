"""Installing the customer endpoints, the console API, its login guard and the Gradio console pages on an app."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI, Request

from chatbot.errors import ChatbotError
from chatbot.http.guard import ConsoleGuard
from chatbot.http.routes import build_routers
from chatbot.http.state import get_console, request_user
from ui.console import build_console_ui, build_operator_ui

log = logging.getLogger(__name__)


def install_console(app: FastAPI, settings, mount_ui: bool = True) -> FastAPI:
    """Add the customer endpoints, the console endpoints, the login guard and (``mount_ui``) the
    Gradio console pages at ``/console`` and ``/operator`` to ``app``; return the app.

    Call before the chat page is mounted at ``/`` (that mount catches every other path).
    """
    public, console = build_routers()
    app.include_router(public)
    app.include_router(console)
    app.add_middleware(ConsoleGuard)

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

        def username(request: Request) -> str | None:
            user = request_user(request)
            return user.username if user is not None else None

        def get_assistant():
            return app.state.assistant

        def console_state():
            return get_console(app)

        app = gr.mount_gradio_app(app, build_console_ui(get_assistant, console_state), path="/console",
                                  auth_dependency=username, footer_links=[])
        app = gr.mount_gradio_app(app, build_operator_ui(get_assistant, console_state), path="/operator",
                                  auth_dependency=username, footer_links=[])
    return app


__all__ = ["install_console"]
