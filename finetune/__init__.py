"""Fine-tuning: LoRA SFT of the chat model and classification heads (see the open issues)."""
