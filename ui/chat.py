"""Customer chat page (Gradio): streamed answers with their sources underneath.

UI only: every decision is made by :class:`chatbot.service.Assistant`.
Each browser session keeps its own ``conversation_id`` in ``gr.State``, so two
customers never share history.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from chatbot.errors import ChatbotError

TITLE = "Customer support"


def format_sources(citations: Sequence) -> str:
    """Markdown block listing the cited documents: ``[n] Title (source)``; empty when none."""
    if not citations:
        return ""
    lines = [f"[{c.number}] {c.title} ({c.source})" for c in citations]
    return "\n\n---\n**Sources**\n\n" + "\n".join(f"- {line}" for line in lines)


def build_chat_ui(get_assistant: Callable[[], object]):
    """Build the Gradio Blocks of the customer chat.

    Args:
        get_assistant: returns the running :class:`~chatbot.service.Assistant`
            (looked up per message, so the page can be built before the model loads).
    """
    import gradio as gr

    async def respond(message: str, history: list, conversation_id: str | None):
        history = list(history or [])
        history.append({"role": "user", "content": message})
        history.append({"role": "assistant", "content": ""})
        try:
            turn = await get_assistant().start_turn(conversation_id, message, channel="web")
        except ChatbotError as exc:
            history[-1]["content"] = f"Sorry, I could not process that message: {exc}"
            yield history, conversation_id, ""
            return
        text = ""
        try:
            async for delta in turn.stream():
                text += delta
                history[-1]["content"] = text
                yield history, conversation_id, ""
        except ChatbotError as exc:
            history[-1]["content"] = f"{text}\n\nSorry, something went wrong: {exc}"
            yield history, conversation_id, ""
            return
        history[-1]["content"] = (text or "(no answer)") + format_sources(turn.citations)
        yield history, turn.conversation_id, ""

    with gr.Blocks(title=TITLE, analytics_enabled=False) as blocks:
        gr.Markdown(f"## {TITLE}\nAsk about orders, returns, refunds, your account or our policies.")
        conversation = gr.State(None)
        chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chat")
        box = gr.Textbox(
            placeholder="Type your question and press Enter", show_label=False, elem_id="message", autofocus=True
        )
        box.submit(respond, [box, chatbot, conversation], [chatbot, conversation, box])
    return blocks
