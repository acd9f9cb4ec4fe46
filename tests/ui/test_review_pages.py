"""Page helpers of issue 14 without a browser: notices as messages of their own, a reply cut at the token limit,
the training run table, the height of the handoff-by-intent chart."""

from __future__ import annotations

from ui.chat import QUEUED_NOTICE, finish_reply, notice
from ui.console import RESULT_HEADERS, RESULT_WIDTHS, intent_chart_height, render_transcript, train_run_html


def test_a_cut_reply_ends_with_an_ellipsis_and_a_finished_one_is_kept():
    cut = "\n\n*My answer was cut short. Ask me to continue, or talk to a person.*"
    assert finish_reply("Reset it under Account > Secur", "length") == "Reset it under Account > Secur…" + cut
    assert finish_reply("You can reset it under Security. ", "length") == "You can reset it under Security." + cut
    assert finish_reply("Done", "stop") == "Done" and finish_reply("", "length") == ""
    assert notice(QUEUED_NOTICE) == f"ℹ️ *{QUEUED_NOTICE}*"


def test_staff_see_a_reply_cut_at_the_token_limit():
    t = {"conversation": {"id": "c1", "status": "bot", "channel": "web", "started_at": None}, "handoffs": [],
         "messages": [{"id": 1, "role": "assistant", "text": "Open Settings and", "created_at": None,
                       "finish_reason": "length"},
                      {"id": 2, "role": "assistant", "text": "Done.", "created_at": None, "finish_reason": "stop"}]}
    md = render_transcript(t)
    assert md.count("cut at the token limit") == 1
    assert md.index("cut at the token limit") > md.index("#1 Assistant") and md.index("#2 Assistant") > md.index(
        "cut at the token limit")


def test_the_training_run_table_states_the_split_steps_and_time():
    run = {"examples": {"train": 4, "validation": 27, "test": 14}, "evaluation": {"kind": "reference"},
           "steps": 20, "raised_to_min_steps": True, "min_steps": 20, "epochs": 20.0, "learning_rate": 2e-4,
           "warmup_steps": 0, "step_learning_rate_min": 1.2e-6, "step_learning_rate_max": 2e-4,
           "train_seconds": 3.25, "total_seconds": 9.5, "changes_model": True}
    html = train_run_html(run)
    for cell in ("<th>training conversations</th><td>4</td>", "<th>validation dialogues</th><td>27</td>",
                 "<th>test dialogues</th><td>14</td>", "fixed reference set (all conversations train)",
                 "<th>optimizer steps</th><td>20 (raised to the minimum 20)</td>", "<th>epochs</th><td>20.0</td>",
                 "<th>learning rate</th><td>0.0002</td>", "1.20e-06 to 2.00e-04", "3.2 s training, 9.5 s in all",
                 "<th>changes the model</th><td>yes</td>"):
        assert cell in html, cell
    assert "NO: every lora_B is zero" in train_run_html({**run, "changes_model": False})
    assert train_run_html(None) == ""


def test_tables_and_charts_have_room():
    assert len(RESULT_WIDTHS) == len(RESULT_HEADERS) and "approved" in RESULT_HEADERS
    assert intent_chart_height(30) == 830 and intent_chart_height(2) == 240
