"""The console HTTP face (chatbot.http): the login guard is pure ASGI and hands a streamed response on as it
comes, the pages and the widget script come from the package's files, the UI imports nothing of the HTTP face,
and the review service refuses a bad export request with the field named."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from fastapi import Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from starlette.middleware.base import BaseHTTPMiddleware

from chatbot.errors import InvalidInputError
from chatbot.http import ConsoleGuard
from tests.chatbot.fakes import make_assistant
from tests.chatbot.test_handoff import _login

ROOT = resources.files("chatbot.http")


@pytest.fixture
def app_client(tmp_path):
    """The app (no Gradio pages) with a staff user and an extra streamed route under ``/console``."""
    from chatbot.api import create_app
    from chatbot.auth import Auth

    a = make_assistant(tmp_path)
    Auth(a.store).add_user("sam", "staff-password", "staff")
    app = create_app(a.settings, assistant=a, mount_ui=False)

    @app.get("/console/api/test-stream")
    async def stream(request: Request):
        name = request.state.console_user.username  # put there by the guard

        async def parts():
            for i in range(3):
                yield f"{name}|{i}\n"

        return StreamingResponse(parts(), media_type="text/plain")

    with TestClient(app) as c:
        c.app_under_test = app
        yield c


def test_the_guard_is_pure_asgi_and_streams_pass_through(app_client):
    kinds = [m.cls for m in app_client.app_under_test.user_middleware]
    assert ConsoleGuard in kinds and BaseHTTPMiddleware not in kinds
    r = app_client.get("/console/api/test-stream")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    staff = _login(app_client, "sam", "staff-password")
    app_client.cookies.clear()
    with app_client.stream("GET", "/console/api/test-stream", headers=staff) as r:
        assert r.status_code == 200
        assert list(r.iter_lines()) == ["sam|0", "sam|1", "sam|2"]
    r = app_client.get("/console/api/operator/jobs", headers=staff)
    assert r.status_code == 403 and "operators only" in r.json()["error"]["message"]


def test_pages_and_widget_come_from_the_package_files(app_client):
    widget = ROOT.joinpath("static").joinpath("widget.js").read_text(encoding="utf-8")
    r = app_client.get("/widget.js")
    assert (r.status_code, r.headers["content-type"], r.text) == (200, "text/javascript; charset=utf-8", widget)
    r = app_client.get("/console/login", params={"next": "/console/?a=<b>"})
    assert r.status_code == 200 and r.text.startswith("<!doctype html>")
    assert '<input type="hidden" name="next" value="/console/?a=&lt;b&gt;">' in r.text
    assert "<title>Support console: log in</title>" in r.text and 'id="login-error"' not in r.text
    r = app_client.post("/console/login", data={"username": "sam", "password": "wrong", "next": "/console/"})
    assert r.status_code == 401 and '<p class="err" id="login-error">wrong user name or password</p>' in r.text
    staff = _login(app_client, "sam", "staff-password")
    r = app_client.get("/operator/", headers={**staff, "accept": "text/html"})
    assert r.status_code == 403 and "<h2>Not allowed</h2>" in r.text and "Back to the staff console" in r.text


def test_the_ui_imports_nothing_of_the_http_face():
    code = ("import sys, ui.console, ui.chat; "
            "print(sorted(m for m in sys.modules if m.startswith(('chatbot.http', 'chatbot.console_api'))))")
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo, env=env)
    assert out.stdout.strip() == "[]"


def test_review_export_names_what_is_wrong(tmp_path):
    a = make_assistant(tmp_path)
    with pytest.raises(InvalidInputError, match="ids must name at least one conversation"):
        a.review.export(None)
    with pytest.raises(InvalidInputError, match="format must be jsonl or csv, got 'xml'"):
        a.review.export("abc", format="xml")
    with pytest.raises(InvalidInputError, match="conversation id must be at most 64 characters"):
        a.review.export("x" * 65)
    out = a.review.export(None, format="csv", approved_only=True)
    assert out.filename.startswith("approved-") and out.filename.endswith(".csv")
    assert out.body.splitlines() == ["conversation_id,message_id,created_at,role,text,corrected_text,approved,intent,"
                                     "confidence,rating,comment,cited_docs"]
    assert (out.media_type, out.conversations) == ("text/csv; charset=utf-8", 0)
