"""Engine that talks to a separate OpenAI-compatible server (``vllm serve``, or another replica of ours).

This is the scale-out path: run several ``vllm serve`` replicas behind a load
balancer and point ``CHATBOT_REMOTE_URL`` at it; this process keeps retrieval,
routing and the log, the replicas do the generation. The prompt is sent as chat
messages (the server applies its chat template); a local copy of the tokenizer
counts prompt tokens for trimming.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence

from chatbot.engines.base import ChatMessage, Engine, EngineInfo, GenerationParams, StreamChunk
from chatbot.errors import EngineError, InvalidInputError, TooBusyError

log = logging.getLogger(__name__)


class RemoteEngine(Engine):
    """OpenAI ``/v1/chat/completions`` client with the :class:`Engine` interface.

    Args:
        base_url: server root, e.g. ``http://10.0.0.5:8000`` (``/v1/chat/completions`` is appended).
        model: model name sent in each request (the served model's id).
        tokenizer_path: local tokenizer (folder or id) used to count prompt tokens.
        max_model_len: context window of the served model.
        api_key: bearer token, if the server wants one.
        timeout_s: read timeout per request, seconds.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer_path: str,
        max_model_len: int = 2048,
        api_key: str | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"remote_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.tokenizer_path = tokenizer_path
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.info = EngineInfo(name="remote", model=model, max_model_len=max_model_len,
                               extra={"base_url": self.base_url})
        self._tok = None
        self._client = None

    async def start(self) -> None:
        if self._client is not None:
            return
        import httpx
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(self.tokenizer_path)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                         timeout=httpx.Timeout(self.timeout_s, connect=10.0))

    @property
    def started(self) -> bool:
        return self._client is not None

    async def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams, request_id: str
    ) -> AsyncIterator[StreamChunk]:
        import httpx

        n_prompt = len(await self.prompt_ids(messages, params))
        body = {
            "model": self.model,
            "messages": [m.as_dict() for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty  # vLLM's extension of the schema
        n_gen = 0
        finish: str | None = None
        try:
            async with self._client.stream("POST", "/v1/chat/completions", json=body,
                                           headers={"X-Request-Id": request_id}) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")[:500]
                    if r.status_code == 429:
                        raise TooBusyError(f"remote engine busy: {text}",
                                           retry_after_s=int(r.headers.get("retry-after", "5")))
                    if r.status_code == 400:
                        raise InvalidInputError(f"remote engine refused the request: {text}")
                    raise EngineError(f"remote engine answered HTTP {r.status_code}: {text}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise EngineError(f"remote engine failed: {event['error']}")
                    usage = event.get("usage") or {}
                    if usage:
                        n_prompt = usage.get("prompt_tokens", n_prompt)
                        n_gen = usage.get("completion_tokens", n_gen)
                    for choice in event.get("choices", []):
                        text = (choice.get("delta") or {}).get("content") or ""
                        if choice.get("finish_reason"):
                            finish = "length" if choice["finish_reason"] == "length" else "stop"
                        if text:
                            if not usage:
                                n_gen += 1  # one chunk per token on vLLM; exact count comes with usage
                            yield StreamChunk(text, prompt_tokens=n_prompt, completion_tokens=n_gen)
        except httpx.HTTPError as exc:
            raise EngineError(f"remote engine at {self.base_url} failed: {exc}") from exc
        yield StreamChunk("", finish_reason=finish or "stop", prompt_tokens=n_prompt, completion_tokens=n_gen)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
