"""Issue 13, items 4 and 5: one customer cannot take the service from the others (per-client and
per-conversation admission, login lock-out per address, Secure cookie behind HTTPS), and OpenAI
compatibility (``stop``, refused fields, every error as ``{"error": {...}}``)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi.testclient import TestClient

from chatbot.admission import Admission
from chatbot.engines.stops import StopFilter
from chatbot.errors import AuthError, InvalidInputError, TooBusyError
from tests.chatbot.fakes import ScriptedEngine, make_assistant

PROXY = "10.9.9.9"  # the reverse proxy in front of the server (trusted)
OFFENDER, CUSTOMER = "203.0.113.5", "198.51.100.7"


class GatedEngine(ScriptedEngine):
    """A scripted engine whose replies wait for ``gate`` (no timing: the test decides when they run)."""

    def __init__(self) -> None:
        super().__init__("Fine.")
        self.gate = asyncio.Event()

    async def stream(self, messages, params, request_id):
        await self.gate.wait()
        async for chunk in super().stream(messages, params, request_id):
            yield chunk


def _body(text="Where is my order?", **extra):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 20, **extra}


async def _until(cond, what: str, tries: int = 2000) -> None:
    """Let the event loop run until ``cond()`` holds (a bounded number of turns, no timed assertion)."""
    for _ in range(tries):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never reached: {what}")


# --- item 4: per-client admission


@pytest.mark.parametrize("via_proxy", [True, False])
def test_one_client_at_5x_its_limit_does_not_take_the_service_from_another(tmp_path, via_proxy):
    """1 running slot, 3 queued, 2 places per client: the offender sends 10 at once (5x its limit): 2 are
    admitted, 8 get 429 with Retry-After (counted as client_limit in /metrics); the other customer's 2
    requests are admitted and answered. Without per-client limits the offender took all 4 places.
    ``via_proxy=False``: the offender forges a different X-Forwarded-For on each request from an untrusted
    address; the header is ignored, so it is still one client."""
    from chatbot.api import create_app

    engine = GatedEngine()
    a = make_assistant(tmp_path, engine, max_concurrent=1, max_queued=3, max_per_client=2,
                       max_per_conversation=2, trusted_proxies=[PROXY])
    app = create_app(a.settings, assistant=a, mount_ui=False)

    async def run():
        if via_proxy:
            t = httpx.ASGITransport(app=app, client=(PROXY, 4000))
            offender = httpx.AsyncClient(transport=t, base_url="http://x", headers={"X-Forwarded-For": OFFENDER})
            customer = httpx.AsyncClient(transport=t, base_url="http://x", headers={"X-Forwarded-For": CUSTOMER})
            spoof = [{} for _ in range(10)]
            offender_key = OFFENDER
        else:
            offender = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(OFFENDER, 4000)),
                                         base_url="http://x")
            customer = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(CUSTOMER, 4000)),
                                         base_url="http://x")
            spoof = [{"X-Forwarded-For": f"192.0.2.{i}"} for i in range(10)]
            offender_key = OFFENDER
        async with offender, customer:
            flood = [asyncio.create_task(offender.post("/v1/chat/completions", json=_body(f"spam {i}"),
                                                       headers=spoof[i])) for i in range(10)]
            await _until(lambda: sum(t.done() for t in flood) == 8, "8 offender requests refused")
            assert a.admission.held(client=offender_key) == 2
            mine = [asyncio.create_task(customer.post("/v1/chat/completions", json=_body(f"my order {i}")))
                    for i in range(2)]
            await _until(lambda: a.admission.held(client=CUSTOMER) == 2, "the customer's 2 requests admitted")
            engine.gate.set()
            flood_r = await asyncio.gather(*flood)
            mine_r = await asyncio.gather(*mine)
            metrics = (await customer.get("/metrics")).text
        return flood_r, mine_r, metrics

    flood_r, mine_r, metrics = asyncio.run(run())
    assert [r.status_code for r in mine_r] == [200, 200]
    assert all(r.json()["choices"][0]["message"]["content"] == "Fine." for r in mine_r)
    assert sorted(r.status_code for r in flood_r) == [200] * 2 + [429] * 8
    refused = [r for r in flood_r if r.status_code == 429]
    assert {r.headers["Retry-After"] for r in refused} == {"5"}
    assert refused[0].json()["error"]["type"] == "rate_limit_error"
    assert "max_per_client 2" in refused[0].json()["error"]["message"]
    assert 'chatbot_requests_rejected_total{reason="client_limit"} 8.0' in metrics
    assert 'reason="queue_full"' not in metrics
    assert a.admission.held(client=OFFENDER) == 0 and a.admission.running == 0 and a.admission.queued == 0


def test_admission_per_conversation_and_per_client_shares_are_given_back():
    adm = Admission(max_running=4, max_queued=10, max_per_client=3, max_per_conversation=2)
    t1 = adm.reserve(client="a", conversation="c1")
    adm.reserve(client="a", conversation="c1")
    with pytest.raises(TooBusyError, match="max_per_conversation 2"):
        adm.reserve(client="a", conversation="c1")
    adm.reserve(client="a", conversation="c2")
    with pytest.raises(TooBusyError, match="max_per_client 3"):
        adm.reserve(client="a", conversation="c3")
    adm.reserve(client="b", conversation="c3")  # another client is not affected
    t1.release()
    t1.release()  # idempotent: gives back one place only
    assert (adm.held(client="a"), adm.held(conversation="c1")) == (2, 1)
    adm.reserve(client="a", conversation="c1")
    assert adm.queued == 4


# --- item 4: login lock-out per (user name, address)


def test_an_attackers_failures_do_not_lock_the_real_user_out_from_another_address(tmp_path):
    from chatbot.auth import Auth

    a = make_assistant(tmp_path)
    auth = Auth(a.store, max_failures=5, lockout_s=60)
    auth.add_user("admin", "the-real-password", "operator")
    for _ in range(5):
        with pytest.raises(AuthError, match="wrong user name or password"):
            auth.login("admin", "guess", client=OFFENDER)
    with pytest.raises(AuthError, match="too many failed logins"):  # the attacker's address is locked
        auth.login("admin", "the-real-password", client=OFFENDER)
    token, user = auth.login("admin", "the-real-password", client=CUSTOMER)
    assert user.username == "admin" and auth.user_for_token(token).username == "admin"


def test_login_lockout_over_http_is_per_forwarded_address(tmp_path):
    from chatbot.api import create_app

    a = make_assistant(tmp_path, admin_password="the-real-password", trusted_proxies=[PROXY])
    app = create_app(a.settings, assistant=a, mount_ui=False)
    with TestClient(app, client=(PROXY, 4000)) as c:
        for _ in range(6):
            r = c.post("/console/api/login", json={"username": "admin", "password": "guess-guess"},
                       headers={"X-Forwarded-For": OFFENDER})
        assert r.status_code == 401 and "too many failed logins" in r.json()["error"]["message"]
        r = c.post("/console/api/login", json={"username": "admin", "password": "the-real-password"},
                   headers={"X-Forwarded-For": CUSTOMER})
        assert r.status_code == 200, r.text


# --- item 4: Secure cookie whenever the request is HTTPS


@pytest.mark.parametrize("peer,base,headers,secure", [
    ("127.0.0.1", "https://chat.example", {}, True),  # HTTPS to the server itself
    (PROXY, "http://chat.example", {"X-Forwarded-Proto": "https"}, True),  # TLS ended at a trusted proxy
    ("192.0.2.50", "http://chat.example", {"X-Forwarded-Proto": "https"}, False),  # untrusted: header ignored
    (PROXY, "http://chat.example", {}, False),  # plain HTTP
])
def test_session_cookie_is_secure_when_the_request_is_https(tmp_path, peer, base, headers, secure):
    from chatbot.api import create_app

    a = make_assistant(tmp_path, admin_password="the-real-password", trusted_proxies=[PROXY])
    app = create_app(a.settings, assistant=a, mount_ui=False)
    with TestClient(app, base_url=base, client=(peer, 4000)) as c:
        r = c.post("/console/api/login", json={"username": "admin", "password": "the-real-password"},
                   headers=headers)
        assert r.status_code == 200, r.text
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie
        assert ("; secure" in cookie) is secure


# --- item 5: stop


def test_stop_filter_holds_back_a_stop_string_split_across_deltas():
    f = StopFilter(["END", "\n\n"])
    outs = [f.push(d) for d in ["Hello E", "N", "D world"]]
    assert outs == [("Hello ", False), ("", False), ("", True)]
    f = StopFilter(["END"])
    assert [f.push(d)[0] for d in ["Hi E", "ND?", "x"]] + [f.flush()] == ["Hi ", "", "", ""]
    f = StopFilter(["END"])
    assert [f.push(d)[0] for d in ["Hi E", "n"]] + [f.flush()] == ["Hi ", "En", ""]  # not a stop: all shown
    with pytest.raises(InvalidInputError, match="at most 4"):
        StopFilter(["a", "b", "c", "d", "e"])


@pytest.fixture
def client(tmp_path):
    from chatbot.api import create_app

    a = make_assistant(tmp_path)  # ScriptedEngine: "You can return it within 30 days [1]." word by word
    app = create_app(a.settings, assistant=a, mount_ui=False)
    with TestClient(app) as c:
        c.assistant = a
        yield c


@pytest.mark.parametrize("stop,expected", [
    ("30 days", "You can return it within "),  # split across the deltas " 30" and " days"
    (["zzz", "return", "can"], "You "),  # the earliest of several
    (["nowhere"], "You can return it within 30 days [1]."),
])
def test_stop_is_honoured_streamed_and_not(client, stop, expected):
    r = client.post("/v1/chat/completions", json=_body(stop=stop))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == expected and choice["finish_reason"] == "stop"
    with client.stream("POST", "/v1/chat/completions", json=_body(stop=stop, stream=True)) as s:
        import json

        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events]
    assert "".join(deltas) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    if expected != "You can return it within 30 days [1].":
        assert events[-1]["usage"]["completion_tokens"] < 8  # generation ended at the stop string
    stored = client.assistant.store.messages(r.json()["conversation_id"])
    assert stored[-1].text == expected  # what is logged is what the customer got


def test_stop_cuts_a_fixed_reply_too(tmp_path):
    """Verified mode with no passage answers with the abstention (a fixed reply): the stop applies there too."""
    from chatbot.api import create_app

    a = make_assistant(tmp_path, answer_mode="verified")
    app = create_app(a.settings, assistant=a, mount_ui=False)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=_body(stop=[" connect"]))
    body = r.json()
    assert body["answer"]["kind"] == "abstained"
    assert body["choices"][0]["message"]["content"] == a.settings.abstain_message.split(" connect")[0]


@pytest.mark.parametrize("field,value", [
    ("n", 2), ("logprobs", True), ("top_logprobs", 3), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "auto"), ("logit_bias", {"50256": -100}), ("presence_penalty", 0.5),
    ("response_format", {"type": "json_object"}),
])
def test_fields_the_server_does_not_honour_are_refused_with_a_400_naming_them(client, field, value):
    r = client.post("/v1/chat/completions", json=_body(**{field: value}))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["code"] == "unsupported_parameter" and field in err["message"]
    assert err["type"] == "invalid_request_error"


def test_no_op_values_of_those_fields_are_accepted(client):
    r = client.post("/v1/chat/completions", json=_body(n=1, logprobs=False, tools=[], tool_choice="none",
                                                       presence_penalty=0, response_format={"type": "text"}))
    assert r.status_code == 200, r.text


def test_too_many_stop_strings_is_a_field_error(client):
    r = client.post("/v1/chat/completions", json=_body(stop=["a", "b", "c", "d", "e"]))
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "stop" and "at most 4" in r.json()["error"]["message"]


# --- item 5: every error is the OpenAI error object


def _is_error_object(r) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def test_every_error_is_an_openai_error_object(client):
    # a body that is not JSON: 422, the README's "malformed body" (FastAPI's own answer was {"detail": ...})
    r = client.post("/v1/chat/completions", content=b"this is not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert _is_error_object(r)["code"] == "invalid_json" and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", content=b"{\"messages\": [", headers={"content-type": "application/json"})
    assert r.status_code == 422 and _is_error_object(r)["type"] == "invalid_request_error"
    r = client.post("/v1/chat/completions", content=b"messages=hi",
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422 and _is_error_object(r)
    r = client.post("/v1/feedback", content=b"nope", headers={"content-type": "application/json"})
    assert r.status_code == 422 and _is_error_object(r)["code"] == "invalid_json"
    # a form body the framework cannot read (FastAPI raises HTTPException 400 itself)
    r = client.post("/console/login", content=b"xx", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in _is_error_object(r)["message"]
    r = client.post("/v1/nothing-here", json={})
    assert r.status_code == 404 and _is_error_object(r)["type"] == "not_found_error"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and _is_error_object(r)["message"].startswith("method GET")
    r = client.post("/v1/chat/completions", json={"model": "x"})
    assert r.status_code == 422 and _is_error_object(r)["param"] == "messages"
    r = client.post("/v1/chat/completions", json=_body(conversation_id="no-such-conversation"))
    assert r.status_code == 404 and _is_error_object(r)["type"] == "not_found_error"
    r = client.post("/v1/chat/completions", json=_body(""))
    assert r.status_code == 400 and _is_error_object(r)


@pytest.mark.slow
def test_stop_on_the_real_transformers_engine_ends_generation_at_the_stop_string(tf_server):
    """SmolLM2 on transformers, greedy: the reply without ``stop``, then with a stop string taken from its middle
    (so it crosses token boundaries): the reply is the text before it, streamed or not, and generation ended there."""
    import json

    url = tf_server.url + "/v1/chat/completions"
    body = _body("How do I return an item I bought?", max_tokens=48, temperature=0)
    full = httpx.post(url, json=body, timeout=300).json()
    text = full["choices"][0]["message"]["content"]
    assert len(text) > 30, text
    stop = text[len(text) // 3: len(text) // 3 + 7]
    expected = text[: text.find(stop)]
    r = httpx.post(url, json={**body, "stop": [stop]}, timeout=300).json()
    assert r["choices"][0]["message"]["content"] == expected
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]
    with httpx.stream("POST", url, json={**body, "stop": stop, "stream": True}, timeout=300) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events]
    assert "".join(deltas) == expected and not any(stop in d for d in deltas)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
