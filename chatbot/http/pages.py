"""The console's own HTML pages (login form, "not allowed") and the chat widget script, from the package's
``templates/`` and ``static/`` files (package data: they ship in the wheel)."""

from __future__ import annotations

import functools
import html
from importlib import resources
from string import Template


@functools.cache
def _text(folder: str, name: str) -> str:
    return resources.files(__package__).joinpath(folder).joinpath(name).read_text(encoding="utf-8")


def _template(name: str) -> Template:
    """``templates/<name>`` (``$name`` placeholders; the file's final newline is not part of it)."""
    return Template(_text("templates", name).removesuffix("\n"))


def page(title: str, body_html: str) -> str:
    """A small stand-alone HTML page: ``title`` (escaped here) as title and heading, ``body_html`` as given."""
    return _template("page.html").substitute(title=html.escape(title), body=body_html)


def login_page(next_path: str, error: str | None = None) -> str:
    """The login form; after logging in the browser goes to ``next_path``; ``error`` is shown above the form."""
    err = _template("login_error.html").substitute(message=html.escape(error)) if error else ""
    return page("Support console: log in", _template("login.html").substitute(error=err, next=html.escape(next_path)))


def forbidden_page(message: str) -> str:
    """The "Not allowed" page (a staff member opening an operator page)."""
    return page("Not allowed", _template("forbidden.html").substitute(message=html.escape(message)))


def widget_js() -> str:
    """The embeddable chat launcher (``static/widget.js``): a button that opens the chat page in an iframe."""
    return _text("static", "widget.js")


__all__ = ["forbidden_page", "login_page", "page", "widget_js"]
