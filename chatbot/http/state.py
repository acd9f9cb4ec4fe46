"""Per-app console state (logins with a short cache, the operator's background jobs) and who is logged in."""

from __future__ import annotations

import logging
import threading
import time

from fastapi import FastAPI, Request

from chatbot.auth import Auth, User, request_token
from chatbot.operations import Jobs

log = logging.getLogger(__name__)


class Console:
    """Per-app console state: the login service (with a 5 s cache of session lookups) and the operator's
    background jobs.

    Created on first use (the assistant exists only once the app has started); creates the
    ``admin_username`` operator when ``admin_password`` is set and no such user exists.

    Args:
        app: the FastAPI app (``state.settings``, ``state.assistant``).
    """

    def __init__(self, app: FastAPI) -> None:
        settings = app.state.settings
        assistant = app.state.assistant
        self.app = app
        self.auth = Auth(assistant.store, session_hours=settings.console_session_hours)
        self._cache: dict[str, tuple[float, User | None]] = {}
        self._cache_lock = threading.Lock()
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

    def user_named(self, username: str) -> User | None:
        """The user with this name, or None."""
        return self.auth.store.get_user(username)

    def forget(self, token: str | None) -> None:
        """Drop a token from the cache (after a logout)."""
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


def request_user(request: Request) -> User | None:
    """The logged-in user of a request (None when not logged in)."""
    user = getattr(request.state, "console_user", None)
    if user is not None:
        return user
    return get_console(request.app).user(request_token(request))


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


__all__ = ["Console", "get_console", "operator_user", "request_user", "staff_user"]
