"""Run by ``torchrun --nproc_per_node 2`` in test_sft.py: LoRA SFT with DDP (gloo), one JSON result per rank.

Usage: ddp_worker.py TINY_MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


def main() -> None:
    import torch

    from finetune.sft import SFTConfig, train_sft, world_info
    from tests.finetune.sft_helpers import toy_dialogues

    model_dir, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    cfg = SFTConfig(base_model=model_dir, max_steps=3, batch_size=2, lora_dropout=0.0, eval_steps=0,
                    eval_replies=0, validation=0.1, test=0.1, max_length=128, learning_rate=5e-3,
                    warmup_ratio=0.0, logging_steps=1, keep_checkpoints=False)
    res = train_sft(toy_dialogues(24), out / "adapter", cfg, progress=False)
    rank, world = world_info()
    params = {n: p.detach().float().contiguous() for n, p in res.model.named_parameters() if "lora_" in n}
    h = hashlib.sha256()
    for n in sorted(params):
        h.update(n.encode())
        h.update(params[n].numpy().tobytes())
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "trainer_world_size": res.trainer.args.world_size,
        "sha256": h.hexdigest(), "lora_b_abs_sum": float(sum(p.abs().sum() for n, p in params.items() if "lora_B" in n)),
        "global_step": res.trainer.state.global_step,
    }))


if __name__ == "__main__":
    main()
