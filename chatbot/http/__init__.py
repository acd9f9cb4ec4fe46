"""The console HTTP face: endpoints of feedback, handoff and the staff / operator console; login; the chat
widget script. A face: it calls the service layer (:class:`chatbot.review.Review` through
``assistant.review``, :class:`chatbot.auth.Auth`, :mod:`chatbot.operations`), never the store.

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
* the Gradio pages (:mod:`ui.console`): ``/console`` (staff) and ``/operator`` (operators only).

Every path under ``/console`` and ``/operator`` except the login form is refused without a
session (401, or a redirect to the login form for a browser page) and ``/operator`` and
``/console/api/operator`` are refused to staff (403): :class:`~chatbot.http.guard.ConsoleGuard`.

Modules: :mod:`~chatbot.http.app` (installing it all on an app), :mod:`~chatbot.http.routes`,
:mod:`~chatbot.http.guard`, :mod:`~chatbot.http.state` (per-app console state, who is logged in),
:mod:`~chatbot.http.pages` (the HTML pages and the widget script, from ``templates/`` and ``static/``).
"""

from __future__ import annotations

from chatbot.http.app import install_console
from chatbot.http.guard import ConsoleGuard
from chatbot.http.pages import widget_js
from chatbot.http.state import Console, get_console, request_user

__all__ = ["Console", "ConsoleGuard", "get_console", "install_console", "request_user", "widget_js"]
