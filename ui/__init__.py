"""User interfaces (Gradio): the customer chat (`ui.chat`)."""
