"""Fine-tuning: LoRA SFT of the chat model and classification heads (see the open issues).

Chat model (issue #5; imports are lazy, import the modules):

* :mod:`finetune.data` -- dialogues (JSONL, Bitext, Twitter, the log store), splits, chat-template
  encoding with loss masks (``load_dialogues``, ``split_dialogues``, ``encode_dialogue``, ``DataCollator``);
* :mod:`finetune.sft` -- LoRA SFT with the Hugging Face Trainer (``SFTConfig``, ``train_sft``);
* :mod:`finetune.evaluate` -- validation loss / perplexity, left-padded greedy replies, ROUGE-L,
  self-stop rate (``validation_loss``, ``greedy_generate``, ``reply_quality``);
* :mod:`finetune.adapters` -- the adapter registry and gate (``list_adapters``, ``evaluate_adapter``,
  ``promote``, ``rollback``, ``LiveAdapterWatcher``, ``merge_adapter``, ``export_int8``, ``load_int8``).
"""
