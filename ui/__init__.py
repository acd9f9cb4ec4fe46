"""User interfaces (Gradio): the customer chat (`ui.chat`) and the staff / operator console (`ui.console`)."""
