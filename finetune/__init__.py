"""Fine-tuning: LoRA SFT of the chat model and classification heads (see the open issues).

An organ: it takes option dataclasses and paths (chat JSONL files, adapter and head folders), never the
service's settings, the store or an engine. Imports are lazy; import the modules:

* :mod:`finetune.data` -- dialogues (JSONL, Bitext, Twitter), splits, chat-template encoding with loss masks
  (``load_dialogues``, ``split_dialogues``, ``encode_dialogue``, ``DataCollator``); the conversation log
  arrives as a JSONL file the service exported from the store;
* :mod:`finetune.base_model` -- the chat base model: name resolution, tokenizer and model loading;
* :mod:`finetune.sft` -- LoRA SFT with the Hugging Face Trainer (``SFTConfig``, ``train_sft``);
* :mod:`finetune.evaluate` -- validation loss / perplexity, left-padded greedy replies, ROUGE-L,
  self-stop rate (``validation_loss``, ``greedy_generate``, ``reply_quality``);
* :mod:`finetune.adapters` -- the adapter registry, load check, gate and exports (one module each);
* :mod:`finetune.heads` -- the intent and entity heads (config, training loop, folder format, BIO tags,
  evaluation);
* :mod:`finetune.intent_data`, :mod:`finetune.calibration` -- labelled messages and confidence calibration;
"""
