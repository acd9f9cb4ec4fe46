"""The customer-service assistant: configuration, the turn pipeline, engines, store, API and CLI.

Public API: :class:`Settings`, :class:`Assistant`, :class:`Turn`, :class:`Store`,
:func:`create_app` (import ``chatbot.api``; it pulls in FastAPI).

``from chatbot import Settings`` is resolved on first use, so importing a low module such as
``chatbot.errors`` (as the organs do) does not load the settings layer.
"""

__all__ = ["Settings"]


def __getattr__(name: str):
    if name == "Settings":
        from chatbot.config import Settings

        return Settings
    raise AttributeError(f"module 'chatbot' has no attribute {name!r}")
