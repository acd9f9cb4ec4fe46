"""The customer-service assistant: configuration, the turn pipeline, engines, store, API and CLI.

Public API: :class:`Settings`, :class:`Assistant`, :class:`Turn`, :class:`Store`,
:func:`create_app` (import ``chatbot.api``; it pulls in FastAPI).
"""

from chatbot.config import Settings

__all__ = ["Settings"]
