"""The operator's whole loop (issue 14) in headless Chromium against a real ``chatbot serve`` on the transformers
engine: three customer chats, three bot replies corrected and approved in ``/console/``, training from approved
transcripts in ``/operator/`` with the run stated on the page, candidate and live figures side by side, promotion
served on the next reply without a restart, rollback serving the base model again, and the audit naming the user.

The server trains with ``CHATBOT_TRAIN_MIN_STEPS=4``, answers with at most 24 new tokens and evaluates each model on
8 reference validation dialogues and 4 test replies of 16 tokens (``CHATBOT_TRAIN_EVAL_*``) so that the journey fits
two CPU cores; the rest is the shipped default (LoRA r 16, learning rate 2e-4, evaluation on the fixed reference set
below 20 conversations). The gate's tolerances are wide: three store conversations move the reference-set loss a
little either way (seen: validation loss 1.7996 against 1.7893 for the base model on the 8 dialogues, 1.8861 against
1.8760 on all 27; the default tolerance 0.01 refuses both), and this test is about the loop; the gate's refusals are tested in tests/finetune/test_adapters.py (an all-zero adapter included)."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest

from chatbot.testing import start_server, stop_server
from tests.ui.test_console_browser import OPERATOR, STAFF, _field, _login, _stored, _wait

pytestmark = [pytest.mark.slow, pytest.mark.browser]

MIN_STEPS = 4
VAL_SAMPLES, TEST_REPLIES = 8, 4
BASE_MODEL = "embedded:smollm2-135m-instruct"
CHATS = [
    ("How do I return an item that is the wrong size?",
     "You can return it within 30 days: open Orders, choose Return, pick the reason \"wrong size\" and print the "
     "free label."),
    ("I forgot my password, what should I do?",
     "Click \"Forgot password\" on the sign-in page and follow the link we email you to set a new password."),
    ("My promo code does not work at checkout.",
     "Check that the code has not expired and is typed exactly as sent; codes apply to full-price items only."),
]


@pytest.fixture(scope="module")
def journey_server(tmp_path_factory, kb_dir, chat_model_path):
    """A dedicated transformers server with small training settings and a staff and an operator account."""
    from chatbot.auth import Auth
    from chatbot.store import Store

    server = start_server(tmp_path_factory.mktemp("journey"), kb_dir, "transformers",
                          train_min_steps=str(MIN_STEPS), max_new_tokens="24", train_eval_samples=str(VAL_SAMPLES),
                          train_eval_replies=str(TEST_REPLIES), train_eval_max_new_tokens="16",
                          adapter_gate_max_val_loss_increase="1", adapter_gate_max_rouge_l_drop="1",
                          adapter_gate_max_self_stop_drop="1")
    store = Store(server.database_url)
    try:
        Auth(store).add_user(*STAFF, role="staff")
        Auth(store).add_user(*OPERATOR, role="operator")
    finally:
        store.close()
    yield server
    stop_server(server)


def _reply(server, text: str) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=300,
                   json={"messages": [{"role": "user", "content": text}], "max_tokens": 16})
    assert r.status_code == 200, r.text
    return r.json()


def _outcome(page, elem_id: str, word: str) -> str | None:
    """The text of ``#elem_id`` once it holds ``word``, or a refusal's toast (``gr.Error``: "Not promoted: ...")."""
    text = page.locator(f"#{elem_id}").inner_text()
    if word in text:
        return text
    toasts = " ".join(page.locator(".toast-body").all_inner_texts())
    return toasts if "Not " in toasts else None


def test_review_train_compare_promote_served_and_roll_back(browser, journey_server):
    server = journey_server
    marker = f"j{uuid.uuid4().hex[:6]}"
    cids = [_reply(server, f"{q} ({marker})")["conversation_id"] for q, _ in CHATS]

    # /console/: three bot replies corrected and approved
    sctx, console = _login(browser, server.url, STAFF)
    _field(console, "search-text").fill(marker)
    console.click("#search")
    _wait(lambda: "3 conversation(s)" in console.locator("#search-count").inner_text(), 60, "the search result")
    for cid, (_, corrected) in zip(cids, CHATS):
        reply_id = [m for m in _stored(server, cid)["messages"] if m["role"] == "assistant"][-1]["id"]
        console.locator("#results [role=gridcell]", has_text=cid).first.click()
        _wait(lambda c=cid: c in console.locator("#transcript").inner_text(), 60, "the transcript")
        _wait(lambda c=cid: _field(console, "corrected").input_value() != "", 30, "the reply to correct")
        _field(console, "corrected").fill(corrected)
        console.locator("#approved input").check()
        console.click("#save-annotation")
        _wait(lambda r=reply_id: f"Saved reply #{r}: approved for training"
              in console.locator("#annotation-status").inner_text(), 60, "saving the review")
        ann = _stored(server, cid)["messages"][-1]["annotation"]
        assert ann["corrected_text"] == corrected and ann["approved"] and ann["approved_by"] == STAFF[0]
    sctx.close()

    # /operator/ Training: train, the run stated on the page
    octx, op = _login(browser, server.url, OPERATOR, path="/operator/")
    op.get_by_role("tab", name="Training").click()
    _wait(lambda: "No adapters yet" in op.locator("#adapters-info").inner_text(), 60, "the empty adapter list")
    op.click("#train")
    status = op.locator("#train-status")
    _wait(lambda: status.locator("[data-status=done], [data-status=failed]").count() > 0, 1200, "the training job")
    assert status.locator("[data-status=done]").count() == 1, status.inner_text()
    trained = re.search(r"trained adapter (approved-\d{8}T\d{6}-\d{14}-[0-9a-f]{8})", status.inner_text())
    assert trained, status.inner_text()
    version = trained.group(1)
    run = {r.locator("th").inner_text().strip(): r.locator("td").inner_text().strip()
           for r in op.locator("#train-run tr").all()}
    print("\nJOURNEY status:", status.inner_text())
    assert run["training conversations"] == "3"
    assert run["validation dialogues"] == "27" and run["test dialogues"] == "14"
    assert run["evaluated on"] == "fixed reference set (all conversations train)"
    assert run["optimizer steps"] == f"{MIN_STEPS} (raised to the minimum {MIN_STEPS})"
    assert float(run["epochs"]) == pytest.approx(MIN_STEPS, abs=0.05)  # 3 conversations in one batch: a step an epoch
    assert run["learning rate"] == "0.0002"
    assert run["changes the model"] == "yes"
    lo, hi = (float(x) for x in run["step learning rates"].split(" to "))
    assert 0 < lo <= hi <= 2e-4

    # the adapter list follows the finished job without Refresh; candidate beside the live (base) model
    info = _wait(lambda: (t := op.locator("#adapters-info").inner_text()) and version in t and "against" in t and t,
                 60, "the new adapter beside the base model")
    print("JOURNEY adapters:", info)
    line = re.search(r"Validation loss: (\d+\.\d{4}) against (\d+\.\d{4}) for the base model", info)
    assert line, info
    cand_loss, base_loss = float(line.group(1)), float(line.group(2))
    assert cand_loss > 0 and base_loss > 0 and cand_loss != base_loss
    rouge = re.search(r"ROUGE-L of test replies: (\d+\.\d{4}) against (\d+\.\d{4}) for the base model", info)
    assert rouge, info
    assert "Live and served: the base model" in info

    # promote: served by the next reply, without a restart
    _field(op, "adapter-version").fill(version)
    op.click("#promote")
    result = _wait(lambda: _outcome(op, "adapter-result", "Promoted"), 300, "the promotion")
    print("JOURNEY promote:", result)
    assert f"Promoted {version} (was the base model), by review_operator." in result, result
    gate = re.search(r"Validation loss: (\d+\.\d{4}) against (\d+\.\d{4}) for the base model \(lower is better; "
                     r"tolerance 1\): passes\.", result)  # the gate's verdict in sentences, on the same figures
    assert gate and (float(gate.group(1)), float(gate.group(2))) == (cand_loss, base_loss), result
    assert "It changes the model: the largest logit change on the probe prompt is" in result
    assert f"Live and served: {version}" in result
    body = _reply(server, "Hello, can you help me with an order?")
    assert body["model"] == version
    assert _stored(server, body["conversation_id"])["messages"][-1]["adapter_version"] == version
    models = {m["id"]: m for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]}
    assert models[version]["served"] is True and models[version]["live"] is True
    assert models[BASE_MODEL]["served"] is False

    # roll back: the base model answers the next reply
    op.click("#rollback")
    result = _wait(lambda: _outcome(op, "adapter-result", "Rolled back"), 120, "the rollback")
    assert "Rolled back by review_operator: live is now the base model" in result
    body = _reply(server, "Hello again, one more question.")
    assert body["model"] == BASE_MODEL
    assert _stored(server, body["conversation_id"])["messages"][-1]["adapter_version"] is None
    models = {m["id"]: m for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]}
    assert models[version]["served"] is False and models[version]["live"] is False
    assert models[BASE_MODEL]["served"] is True

    # the audit: on the Training tab and in PROMOTIONS.jsonl, naming the operator
    history = _wait(lambda: (t := op.locator("#adapter-history").inner_text()) and "rolled back" in t and t, 60,
                    "the audit list")
    print("JOURNEY audit:", history)
    assert history.count("review_operator") >= 2 and f"promoted the base model -> {version}" in history
    audit = [json.loads(x) for x in (server.data_dir / "adapters" / "PROMOTIONS.jsonl").read_text().splitlines()]
    assert [(e["action"], e["user"], e["via"], e["from"], e["to"]) for e in audit] == [
        ("promote", "review_operator", "console", None, version),
        ("rollback", "review_operator", "console", version, None)]
    octx.close()
