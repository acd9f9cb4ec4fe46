"""HTTP API (FastAPI): OpenAI-compatible chat completions, health, and the Gradio chat page at ``/``.

Every error comes back as an OpenAI-style object ``{"error": {"message", "type", "param", "code"}}``
(``param``: the request field at fault, or null) with HTTP 400 (bad input, a field the server does not
honour, a form body that cannot be read), 404 (unknown conversation or path), 405 (method), 422 (malformed
body: not JSON, or fields of the wrong shape), 429 (busy, or this client's / conversation's share of
places is taken; with ``Retry-After``) or 500/503 (our side).

Behind a reverse proxy the client address (per-client admission limits, login lock-out) and the scheme
(Secure cookie) come from ``X-Forwarded-For`` / ``X-Forwarded-Proto`` only when the connection comes
from ``settings.trusted_proxies`` (uvicorn's ``ProxyHeadersMiddleware``, installed on the app itself).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from chatbot.config import Settings
from chatbot.service import ChatMessage, GenerationParams
from chatbot.errors import ChatbotError, InvalidInputError, TooBusyError

log = logging.getLogger(__name__)


class ChatMessageIn(BaseModel):
    """An OpenAI chat message (text content only)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatCompletionRequest(BaseModel):
    """Body of ``POST /v1/chat/completions`` (OpenAI schema plus ``conversation_id``)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    conversation_id: str | None = Field(default=None, max_length=64)
    #: up to 4 stop strings: the reply ends before the first one (never sent), finish_reason "stop"
    stop: str | list[str] | None = None
    # OpenAI fields this server does not honour: accepted only at their no-op values, else a 400 naming them
    # (:data:`UNSUPPORTED`), never silently dropped
    n: int | None = None
    best_of: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    echo: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    logit_bias: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        from chatbot.service import check_stops

        if v is None:
            return None
        try:
            return list(check_stops([v] if isinstance(v, str) else v))
        except InvalidInputError as exc:
            raise ValueError(str(exc).removeprefix("stop: ")) from None


#: field -> (is it at a value the server honours?, what the server does instead)
UNSUPPORTED = {
    "n": (lambda v: v in (None, 1), "one choice per request (n must be 1)"),
    "best_of": (lambda v: v in (None, 1), "one candidate per request (best_of must be 1)"),
    "logprobs": (lambda v: not v, "no log probabilities"),
    "top_logprobs": (lambda v: not v, "no log probabilities"),
    "echo": (lambda v: not v, "no echo of the prompt"),
    "tools": (lambda v: not v, "no tool calling"),
    "tool_choice": (lambda v: v in (None, "none"), "no tool calling"),
    "parallel_tool_calls": (lambda v: not v, "no tool calling"),
    "functions": (lambda v: not v, "no function calling"),
    "function_call": (lambda v: v in (None, "none"), "no function calling"),
    "logit_bias": (lambda v: not v, "no logit bias"),
    "presence_penalty": (lambda v: not v, "no presence penalty (the server's repetition_penalty applies)"),
    "frequency_penalty": (lambda v: not v, "no frequency penalty (the server's repetition_penalty applies)"),
    "response_format": (lambda v: not v or v.get("type") == "text", "text replies only"),
    "modalities": (lambda v: not v or list(v) == ["text"], "text replies only"),
    "audio": (lambda v: v is None, "text replies only"),
    "prediction": (lambda v: v is None, "no predicted outputs"),
}


class UnsupportedFieldError(InvalidInputError):
    """A request field the server does not honour was given a value that needs it (HTTP 400)."""

    def __init__(self, param: str, value: object, why: str) -> None:
        super().__init__(f"{param}={value!r} is not supported by this server: {why}")
        self.param = param
        self.code = "unsupported_parameter"


def check_supported(body: ChatCompletionRequest) -> None:
    """Refuse fields the server would otherwise ignore.

    Raises:
        UnsupportedFieldError: the first field of :data:`UNSUPPORTED` set to a value the server cannot honour.
    """
    for name, (ok, why) in UNSUPPORTED.items():
        value = getattr(body, name)
        if not ok(value):
            raise UnsupportedFieldError(name, value, why)


#: HTTP status -> OpenAI error ``type`` for errors raised by the framework (unknown path, wrong method)
_HTTP_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                     404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                     415: "invalid_request_error", 429: "rate_limit_error"}


def _error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


class _RequestCounter:
    """Pure ASGI middleware: counts ``/v1/chat/completions``, ``/v1/models`` and ``/healthz`` responses by
    status in ``chatbot_requests_total``. (Starlette's ``BaseHTTPMiddleware`` would copy every streamed
    token of a reply through an extra memory stream.)"""

    PATHS = ("/v1/chat/completions", "/v1/models", "/healthz")

    def __init__(self, app, assistant) -> None:
        self.app = app
        self.assistant = assistant  # () -> the Assistant or None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.PATHS:
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            if not status:  # unhandled: the server error middleware outside answers 500
                status.append(500)
            raise
        finally:
            a = self.assistant()
            if a is not None and status:
                a.metrics.requests.labels(scope["path"], str(status[0])).inc()


def create_app(settings: Settings | None = None, assistant=None, mount_ui: bool = True) -> FastAPI:
    """Build the FastAPI app.

    Args:
        settings: service settings (default: from the environment).
        assistant: a ready :class:`~chatbot.service.Assistant` (default: built from
            settings at startup; its engine is started before the first request).
        mount_ui: mount the Gradio customer chat at ``/``.
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from chatbot.service import Assistant

        a = app.state.assistant
        if a is None:
            a = Assistant.from_settings(settings)
            app.state.assistant = a
        if a.router is not None:  # a broken head or policy stops the start with a clear error
            await asyncio.to_thread(a.router.warm)
        await a.start_engine()  # on the promoted adapter (LIVE.json), if any, from the first request on
        log.info("serving %s on engine %s (adapter %s)", a.engine.info.model, a.engine.info.name,
                 a.engine.info.adapter_version or "none")

        async def follow_live_json() -> None:  # a promotion goes live between replies too (/v1/models, /healthz)
            while True:
                await asyncio.sleep(a.adapters.POLL_S)
                try:
                    await a.adapters.sync(a.engine)
                except Exception:  # never let the poll die
                    log.exception("adapter poll failed")

        poll = asyncio.create_task(follow_live_json())
        try:
            yield
        finally:
            poll.cancel()
            await a.engine.close()
            a.store.close()

    app = FastAPI(title="chatbot", version="0.1.0", lifespan=lifespan)
    app.state.assistant = assistant
    app.state.settings = settings

    @app.exception_handler(ChatbotError)
    async def _chatbot_error(_req: Request, exc: ChatbotError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("request failed: %s", exc, exc_info=exc)
        resp = _error(exc.http_status, str(exc), exc.error_type, getattr(exc, "code", None),
                      getattr(exc, "param", None))
        if isinstance(exc, TooBusyError):
            resp.headers["Retry-After"] = str(exc.retry_after_s)
        return resp

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown path (404), wrong method (405), a body FastAPI cannot read (400): the same error object
        type_ = _HTTP_ERROR_TYPES.get(exc.status_code, "server_error" if exc.status_code >= 500 else
                                      "invalid_request_error")
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such path: {_req.method} {_req.url.path}"
        elif exc.status_code == 405:
            message = f"method {_req.method} is not allowed on {_req.url.path}"
        elif exc.status_code == 400 and message == "There was an error parsing the body":
            message = "the request body could not be parsed (send a JSON object with content-type application/json)"
        resp = _error(exc.status_code, message, type_, None if exc.status_code >= 500 else f"http_{exc.status_code}")
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    app.add_middleware(_RequestCounter, assistant=lambda: app.state.assistant)

    @app.get("/metrics")
    async def metrics() -> Response:
        a = app.state.assistant
        await a.adapters.sync(a.engine)
        a.adapters.status(a.engine)  # the adapter gauges: served, live, mismatch
        body, content_type = a.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        """The base model, then each registered LoRA adapter (``parent``: the base; ``live``: promoted;
        ``served``: the engine serves it now, as the engine says; ``reason``: why a live one is not served)."""
        a = app.state.assistant
        await a.adapters.sync(a.engine)  # LIVE.json changed since the last reply: apply it now
        st = a.adapters.status(a.engine)
        base = a.engine.info.model
        data = [{"id": base, "object": "model", "created": 0, "owned_by": "chatbot", "engine": a.engine.info.name,
                 "served": a.engine.info.adapter_version is None}]
        try:
            adapters = await asyncio.to_thread(a.adapters.registered)
        except ChatbotError as exc:  # a broken registry pointer must not take the model list down
            log.error("cannot list adapters: %s", exc)
            adapters = []
        for rec in adapters:
            served = rec.version == a.engine.info.adapter_version
            data.append({"id": rec.version, "object": "model", "created": 0, "owned_by": "chatbot", "parent": base,
                         "live": rec.live, "served": served,
                         **({"reason": st["reason"]} if rec.live and not served else {})})
        return {"object": "list", "data": data}

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):  # not JSON at all (README: 422, malformed body)
            e = next(e for e in errors if e.get("type") == "json_invalid")
            pos = e.get("loc", ("body", None))[-1]
            detail = (e.get("ctx") or {}).get("error", "invalid JSON")
            return _error(422, f"invalid request body: not valid JSON ({detail} at character {pos})",
                          "invalid_request_error", "invalid_json")
        parts = []
        params = []
        for e in errors:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            params.append(loc)
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        return _error(422, "invalid request body: " + "; ".join(parts), "invalid_request_error", "invalid_body",
                      params[0] or None)

    @app.get("/healthz")
    async def healthz() -> dict:
        a = app.state.assistant
        version = a.retriever.version if a.retriever is not None else None
        await a.adapters.sync(a.engine)
        return {
            "status": "ok",
            "model": a.engine.info.model,
            "engine": a.engine.info.name,
            "index_version": version,
            "max_model_len": a.engine.info.max_model_len,
            # {"live", "served", "in_sync", "pending", "reason", "error"} (chatbot.adapter_watch.LiveAdapterWatcher)
            "adapter": a.adapters.status(a.engine),
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        a = app.state.assistant
        check_supported(body)
        last = body.messages[-1]
        if last.role != "user":
            raise InvalidInputError(f"the last message must have role 'user', got {last.role!r}")
        history = [ChatMessage(m.role, m.content) for m in body.messages[:-1] if m.role in ("user", "assistant")]
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.max_new_tokens
        params = GenerationParams(
            max_tokens=max_tokens,
            temperature=settings.temperature if body.temperature is None else body.temperature,
            top_p=settings.top_p if body.top_p is None else body.top_p,
            repetition_penalty=settings.repetition_penalty,
            seed=body.seed,
            stop=tuple(body.stop or ()),
        )
        turn = await a.start_turn(
            body.conversation_id, last.content, params=params,
            history=None if body.conversation_id else history, channel="api",
            client=request.client.host if request.client else None,  # the proxy's client when trusted
        )
        created = int(time.time())
        cid = f"chatcmpl-{turn.request_id}"
        base_model = a.engine.info.model

        def model() -> str:
            """The model that produced the reply: the adapter's id in /v1/models when one served it."""
            if turn.adapter_version:
                return turn.adapter_version
            if not turn.text and turn.fixed_reply is None and not turn.held:  # not generated yet
                return a.engine.info.adapter_version or base_model
            return base_model
        # the routing decision: intent, calibrated confidence, slots (type, value, offsets), action, reason
        route = turn.route.to_dict() if turn.route is not None else None

        def usage() -> dict:
            return {
                "prompt_tokens": turn.prompt_tokens,
                "completion_tokens": turn.completion_tokens,
                "total_tokens": turn.prompt_tokens + turn.completion_tokens,
            }

        if not body.stream:
            async for _ in turn.stream():
                pass
            citations = [c.as_dict() for c in turn.citations]  # with the spans the shown sentences rest on
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model(),
                "conversation_id": turn.conversation_id,
                "citations": citations,
                "route": route,
                "status": turn.status,
                "answer": turn.answer_info(),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": turn.text},
                        "finish_reason": turn.finish_reason,
                    }
                ],
                "usage": usage(),
            }

        def sse(delta: dict, finish: str | None = None, **extra) -> str:
            chunk = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model(),
                "conversation_id": turn.conversation_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        async def events():
            # the passages first (no spans yet); the last chunk repeats them with the spans the shown sentences used
            yield sse({"role": "assistant", "content": ""}, citations=[c.as_dict() for c in turn.citations],
                      route=route, status=turn.status)
            try:
                async for text in turn.stream():
                    if await request.is_disconnected():
                        log.info("client disconnected; aborting %s", turn.request_id)
                        return
                    yield sse({"content": text})
            except ChatbotError as exc:
                log.exception("stream failed")
                err = {"error": {"message": str(exc), "type": exc.error_type, "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            finally:
                turn.release()  # a client gone before the first delta never started the stream
            yield sse({}, turn.finish_reason, usage=usage(), citations=[c.as_dict() for c in turn.citations],
                      answer=turn.answer_info())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # feedback, handoff and the staff / operator console (before the chat page: it takes every other path)
    from chatbot.http import install_console

    app = install_console(app, settings, mount_ui=mount_ui)
    # outermost: the client address and scheme of a request through a trusted proxy, for everything inside
    app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(settings.trusted_proxies))

    if mount_ui:
        import gradio as gr

        from ui.chat import build_chat_ui

        blocks = build_chat_ui(lambda: app.state.assistant)
        app = gr.mount_gradio_app(app, blocks, path="/", footer_links=[])
    return app
