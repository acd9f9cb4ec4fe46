"""Helpers of the fine-tuning tests: a tiny random-weight Llama with the real SmolLM2 tokenizer, toy dialogues."""

from __future__ import annotations

from pathlib import Path

from finetune.data import Dialogue

QUESTIONS = [
    "Where is my order?", "How do I reset my password?", "Can I change my delivery address?",
    "I was charged twice for one order, what now?", "Do you ship to Canada?", "How long does a refund take?",
    "My parcel arrived damaged.", "Can I cancel my subscription today?", "Is there a phone number I can call?",
    "What payment methods do you accept?", "How do I use a promo code at checkout?", "Can I return a sale item?",
]
REPLIES = [
    "You can track it under Orders.", "Use the Forgot password link on the sign-in page.",
    "Yes, before it ships: open the order and edit the address.",
    "Sorry about that! The duplicate charge is a hold and disappears within three business days.",
    "Yes, we ship to Canada; duties are shown at checkout.", "Refunds reach your card in five to seven days.",
    "I'm sorry! Send us a photo and we will replace it.", "Yes, under Account > Subscription > Cancel.",
    "Call [[phone]], [[support_hours]].", "Cards, PayPal and gift cards.",
    "Type it in the Promo code box before you pay.", "Sale items can be returned within 14 days.",
]


def tiny_llama(folder: Path, tokenizer_path: str, seed: int = 0) -> str:
    """Save a 2-layer, hidden-64 random Llama with SmolLM2's tokenizer and chat template; return the folder."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return str(folder)
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def toy_dialogues(n: int = 24, sign_off: str = "") -> list[Dialogue]:
    """``n`` one- or two-turn support dialogues of varying length (ids ``toy-<i>``)."""
    out = []
    for i in range(n):
        q, r = QUESTIONS[i % len(QUESTIONS)], REPLIES[i % len(REPLIES)] + sign_off
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        if i % 3 == 2:
            j = (i + 5) % len(QUESTIONS)
            msgs += [{"role": "user", "content": QUESTIONS[j]},
                     {"role": "assistant", "content": REPLIES[j] + sign_off}]
        out.append(Dialogue(f"toy-{i}", msgs, "toy"))
    return out
