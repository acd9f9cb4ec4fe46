"""The one settings object of the service.

Values come, in order of precedence, from keyword arguments, environment
variables with the prefix ``CHATBOT_`` (``CHATBOT_PORT=8000``), an optional TOML
file named by ``CHATBOT_CONFIG`` and the defaults below (the embedded defaults:
SmolLM2-135M-Instruct, all-MiniLM-L6-v2, the ABCD policy knowledge base).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from chatbot.assets import EMBEDDED_CHAT_MODEL, EMBEDDED_EMBEDDER
from chatbot.company import COMPANY_FIELDS

#: Repository root (the folder that holds ``pyproject.toml``).
PROJECT_ROOT = Path(__file__).resolve().parent.parent


#: Share of a sentence's content tokens that must occur in one passage unit (chatbot.verification).
#: 0.8: on both dev sets (data/eval) 0.6, 0.7 and 0.8 give the same correct / fact recall, but at 0.6
#: a small model's recombinations passed ("The City Stop Restaurant does not sell alcohol" against a
#: passage saying it does); the table is in docs/answers.md.
DEFAULT_MIN_OVERLAP = 0.8

DEFAULT_SYSTEM_PROMPT = (
    "You are the customer-service assistant of an online clothing store. "
    "Answer the customer's question in a few friendly sentences, using only the "
    "numbered policy passages below. Cite the passages you use like [1]. "
    "If the passages do not answer the question, say you are not sure and offer "
    "to connect the customer with a human agent."
)


class Settings(BaseSettings):
    """Service settings (env prefix ``CHATBOT_``; optional TOML file ``CHATBOT_CONFIG``).

    Raises:
        pydantic.ValidationError: a field has a bad value; the message names the
            field and the value.
    """

    # ``CHATBOT_X=none`` sets an optional field to None (e.g. CHATBOT_ROUTE_GROUNDED_MIN_SCORE=none)
    model_config = SettingsConfigDict(env_prefix="CHATBOT_", extra="forbid", env_parse_none_str="none")

    # --- where things live
    data_dir: Path = Field(default=PROJECT_ROOT / "var", description="Index versions and the SQLite store.")
    cache_dir: Path = Field(
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatbot",
        description="Converted embedded models.",
    )
    kb_dir: Path = Field(default=PROJECT_ROOT / "data" / "kb", description="Documents ingested by `chatbot setup`.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir.")

    # --- models
    model: str = Field(default=EMBEDDED_CHAT_MODEL, description="Chat model: HF id, local path or the embedded one.")
    embedder: str = Field(default=EMBEDDED_EMBEDDER, description="Sentence-transformers model: id, path or embedded.")
    engine: Literal["auto", "vllm", "transformers", "remote"] = "auto"
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        default="auto", description="auto: vLLM bf16 on GPUs and CPUs with native bf16, else fp32; transformers fp32.")
    max_model_len: int = Field(default=2048, ge=256)
    max_new_tokens: int = Field(default=200, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.1, ge=0.5, le=2.0)
    # vLLM settings (used by the vLLM engine only)
    gpu_memory_utilization: float = Field(default=0.5, gt=0.0, le=1.0)
    kv_cache_space_gib: int = Field(default=2, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU machines.")
    max_num_seqs: int = Field(default=32, ge=1)
    enforce_eager: bool = True
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM tensor parallelism (GPUs per replica).")
    enable_prefix_caching: bool = Field(default=True, description="vLLM prefix caching (shared system prompt).")
    # remote engine: a separate OpenAI-compatible server (vllm serve) does the generation
    remote_url: str | None = Field(default=None, description="Base URL of the remote server (engine='remote').")
    remote_model: str | None = Field(default=None, description="Model id the remote server serves (default: model).")
    remote_api_key: str | None = None

    # --- retrieval
    top_k: int = Field(default=3, ge=1, le=50)
    chunk_tokens: int = Field(default=200, ge=16, description="Chunk size in embedder tokens.")
    chunk_overlap: int = Field(default=32, ge=0, description="Overlap between split chunks, embedder tokens.")
    min_score: float = Field(default=0.2, ge=-1.0, le=1.0, description="Below this cosine no passage is cited.")
    retrieval_mode: Literal["dense", "bm25", "hybrid"] = Field(
        default="dense",  # measured best on dstc11_track5 val (see retrieval/retriever.py); hybrid helps exact codes
        description="Default search: dense (cosine), bm25 (lexical) or hybrid (reciprocal rank fusion).",
    )
    rrf_k: int = Field(default=60, ge=1, description="Reciprocal rank fusion constant: score = sum 1 / (rrf_k + rank).")
    hybrid_candidates: int = Field(default=50, ge=1, description="Hits from each of dense and BM25 before fusion.")
    ann_threshold: int = Field(
        default=50_000, ge=0, description="Above this many vectors the index is HNSW (approximate), else exact flat."
    )
    hnsw_m: int = Field(default=32, ge=4, le=256, description="HNSW graph degree (links per node).")
    hnsw_ef_construction: int = Field(default=80, ge=8, description="HNSW candidate list size while building.")
    hnsw_ef_search: int = Field(default=128, ge=1, description="HNSW candidate list size when searching.")
    index_device: Literal["auto", "cpu", "gpu"] = Field(
        default="auto", description="Search a flat index on the GPU: auto (if faiss-gpu sees a GPU), cpu, gpu."
    )
    docs_base_url: str | None = Field(
        default=None,
        description="Public http(s) address of the documents: a cited document without its own url (front matter "
        "url:, an HTML page's canonical URL) links to this + its path relative to the ingested folder. None: such "
        "documents are cited by title only (customers never see a server path).",
    )

    # --- answers (chatbot.verification; docs/answers.md)
    answer_mode: Literal["verified", "generate", "extractive"] = Field(
        default="verified",
        description="verified: each generated sentence is shown only when a passage supports it (else an extractive "
                    "answer, else an abstention); generate: the engine's raw reply; extractive: passage sentences only.",
    )
    verify_min_overlap: float = Field(
        default=DEFAULT_MIN_OVERLAP, gt=0.0, le=1.0,
        description="Verified mode: share of a sentence's content tokens that must occur in one passage sentence.",
    )
    extractive_min_score: float = Field(
        default=0.35, ge=-1.0, le=1.0,
        description="Cosine of a passage sentence with the question needed to quote it; when none has it, the "
                    "assistant abstains.",
    )
    extractive_on_topic: bool = Field(
        default=False,
        description="Quote only passage sentences sharing a word of the message that the passage titles do not hold: "
                    "more abstentions on unanswerable questions, fewer facts on answerable ones (docs/answers.md).",
    )
    extractive_max_units: int = Field(
        default=3, ge=1, le=10,
        description="Passage sentences an answer quotes at most: the extractive answer, or what completes a verified one.")
    prompt_max_units: int = Field(
        default=6, ge=0,
        description="verified mode: send the model only this many passage sentences (the most relevant; whole chunks "
                    "are still verified against and cited); 0 sends whole chunks. 6 kept answer quality on both dev "
                    "sets and cut latency at 16 chats by a third (docs/answers.md).",
    )
    abstain_message: str = Field(
        default="I'm sorry, I can't answer that from our help documents. Would you like me to connect you with a person "
                "from our support team?",
        description="What the assistant says when no passage answers the question (offers the handoff).",
    )

    # --- routing (intent / entity heads, finetune.heads; policy: chatbot.router)
    routing: bool = Field(
        default=True,
        description="Route each customer message (intent, slots, action) before answering; false answers everything.",
    )
    route_grounded_min_score: float | None = Field(
        default=0.4, ge=-1.0, le=1.0,
        description="An out-of-scope or low-confidence message is still answered when retrieval finds a passage "
                    "at least this similar (cosine); None always follows the policy.",
    )
    intent_head_dir: Path = Field(
        default=PROJECT_ROOT / "data" / "heads" / "intent", description="Intent head folder (head.json + adapter)."
    )
    entity_head_dir: Path = Field(
        default=PROJECT_ROOT / "data" / "heads" / "entity", description="Entity (slot) head folder."
    )
    routing_policy: Path = Field(
        default=PROJECT_ROOT / "data" / "routing.yaml", description="YAML routing policy: intent -> action."
    )
    intent_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Override of the intent head's out-of-scope threshold (calibrated score); None keeps the head's.",
    )

    # --- fine-tuned chat adapters (finetune.sft, finetune.adapters; issue #5)
    adapters_dir: Path | None = Field(
        default=None, description="Adapter registry and the LIVE.json pointer; default data_dir/adapters."
    )
    shipped_adapter: Path | None = Field(
        default=PROJECT_ROOT / "data" / "adapters" / "grounded-dstc11",
        description="Adapter folder the product ships: `chatbot setup` copies it into the registry and promotes it "
                    "while the registry has never had a promotion or rollback (a fresh install). None: serve the "
                    "base model until an operator promotes an adapter.",
    )
    adapter_serving: Literal["merged", "lora"] = Field(
        default="merged",
        description="How vLLM serves the live adapter. merged: promotion folds the adapter into a plain checkpoint "
                    "(the adapter folder's merged/), and vLLM serves it like the base model, with no LoRA cost per "
                    "request; a promotion or rollback builds an engine on it in the background and switches (no "
                    "restart). lora: vLLM LoRA, switched at once but slower on every request (about 40% on CPU). "
                    "The transformers engine always applies the adapter with peft.",
    )
    enable_lora: bool | None = Field(
        default=None,
        description="vLLM: start with LoRA support, so promoted adapters are served at once. None (auto): on when "
                    "adapter_serving is lora and the adapter registry holds an adapter, else built in the background "
                    "on the first LoRA switch (LoRA support slows every request).",
    )
    max_loras: int = Field(default=2, ge=1, description="vLLM: adapters held on the device at once.")
    max_lora_rank: int = Field(default=64, ge=1, description="vLLM: highest LoRA rank it can serve.")
    train_min_steps: int = Field(
        default=20, ge=1, description="Training from approved transcripts: least optimizer steps (more passes over "
                                      "a small set instead of one step that barely moves the adapter).",
    )
    train_min_examples: int = Field(
        default=3, ge=1, description="Training from approved transcripts: fewer approved conversations is refused.",
    )
    train_small_data_threshold: int = Field(
        default=20, ge=0, description="Training: with fewer conversations none is held out; the adapter is evaluated "
                                      "on the fixed reference set data/eval/sft_reference instead (0: always split).",
    )
    train_eval_samples: int = Field(
        default=200, ge=1, description="Training: validation dialogues whose loss is scored, for the adapter and the "
                                       "base model (finetune.sft.SFTConfig.max_eval_samples).",
    )
    train_eval_replies: int = Field(
        default=100, ge=0, description="Training: test dialogues whose replies are generated and scored (ROUGE-L, "
                                       "self-stop rate), for the adapter and the base model (0: none).",
    )
    train_eval_max_new_tokens: int = Field(
        default=256, ge=1, description="Training: new-token budget of those test replies (most of the evaluation's "
                                       "time on CPU: 2 x 14 reference replies of 256 tokens take ~6 min on 2 cores).",
    )
    adapter_gate_max_val_loss_increase: float = Field(
        default=0.01, ge=0.0, description="Promotion gate: validation loss may exceed the live one's by this (nats)."
    )
    adapter_gate_max_rouge_l_drop: float = Field(
        default=0.005, ge=0.0, description="Promotion gate: test ROUGE-L may fall below the live one's by this."
    )
    adapter_gate_max_self_stop_drop: float = Field(
        default=0.02, ge=0.0, description="Promotion gate: test self-stop rate may fall below the live one's by this."
    )
    adapter_gate_answers: bool = Field(
        default=True,
        description="Promotion gate on answers: before an adapter goes live, the candidate and the live model "
                    "answer adapter_gate_answers_dataset through the turn pipeline; it is refused when it lowers "
                    "correct or K-Precision, or raises the unsupported-claim rate, by more than the tolerances "
                    "(a few minutes on CPU; --no-judge-answers or false skips it).",
    )
    adapter_gate_answers_dataset: Path = Field(
        default=PROJECT_ROOT / "data" / "eval" / "kb" / "questions.jsonl",
        description="Answer set the answer gate runs (the format of `chatbot eval answers`).",
    )
    adapter_gate_answers_limit: int = Field(default=20, ge=1, description="Answer gate: the first N questions.")
    adapter_gate_answers_mode: Literal["generate", "verified", "extractive"] = Field(
        default="generate", description="Answer gate: the answer mode (generate judges the model itself).")
    adapter_gate_max_correct_drop: float = Field(default=0.02, ge=0.0, le=1.0,
                                                 description="Answer gate: correct may fall by this.")
    adapter_gate_max_k_precision_drop: float = Field(default=0.02, ge=0.0, le=1.0,
                                                     description="Answer gate: K-Precision may fall by this.")
    adapter_gate_max_unsupported_increase: float = Field(
        default=0.02, ge=0.0, le=1.0, description="Answer gate: the unsupported-claim rate may rise by this.")
    company_fields: dict[str, str] = Field(
        default_factory=lambda: dict(COMPANY_FIELDS),
        description="Values of the [[field]] markers a fine-tuned reply writes (chatbot.company); JSON in the env.",
    )

    # --- conversation
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_message_chars: int = Field(default=4000, ge=1)
    history_turns: int = Field(default=6, ge=0)

    # --- conversation log, handoff and the staff / operator console (chatbot.store, chatbot.http)
    redact_pii: bool = Field(
        default=True, description="Redact emails, phone and card numbers and person names before text is stored."
    )
    redact_kinds: list[Literal["email", "phone", "card", "name"]] = Field(
        default=["email", "phone", "card", "name"], description="What redaction removes (JSON list in the env)."
    )
    admin_username: str = Field(default="admin", description="Operator account created at start (see admin_password).")
    admin_password: SecretStr | None = Field(
        default=None, description="CHATBOT_ADMIN_PASSWORD: create admin_username as an operator when it does not exist."
    )
    console_session_hours: float = Field(default=12.0, gt=0, description="Console login lifetime, hours.")
    console_secure_cookie: bool = Field(
        default=False, description="Mark the console cookie Secure on every request (HTTPS ones get it anyway).")
    handoff_poll_s: float = Field(default=2.0, gt=0, description="How often the chat page checks for staff replies, s.")

    # --- admission control
    max_concurrent: int | None = Field(
        default=None, ge=1, description="Replies generating at once; default: max_num_seqs on vLLM, 1 on transformers."
    )
    max_queued: int = Field(default=128, ge=0, description="Requests waiting beyond those; more get HTTP 429.")
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After of a 429, seconds.")
    request_timeout_s: float = Field(default=300.0, gt=0, description="A reply running longer is aborted (504).")
    max_per_client: int | None = Field(
        default=8, ge=1,
        description="Replies (running + queued) one client address may hold; more get HTTP 429. None: no limit. "
                    "Several customers behind one NAT share an address, so this is above one person's need.",
    )
    max_per_conversation: int | None = Field(
        default=2, ge=1, description="Replies (running + queued) one conversation may hold; more get HTTP 429.",
    )
    trusted_proxies: list[str] = Field(
        default=["127.0.0.1", "::1"],
        description="Addresses / networks (CIDR) of reverse proxies whose X-Forwarded-For and X-Forwarded-Proto are "
                    "believed (uvicorn's ProxyHeadersMiddleware); '*' trusts every peer. From anyone else the headers "
                    "are ignored: the client address is the connection's, HTTPS is the connection's scheme.",
    )

    # --- server
    host: str = "127.0.0.1"
    port: int = Field(default=7860, ge=1, le=65535)

    @field_validator("chunk_overlap")
    @classmethod
    def _overlap_below_size(cls, v: int, info) -> int:
        size = info.data.get("chunk_tokens")
        if size is not None and v >= size:
            raise ValueError(f"chunk_overlap must be < chunk_tokens ({size}), got {v}")
        return v

    @field_validator("docs_base_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        from retrieval.loaders import public_url  # only when set: importing retrieval costs half a second

        if not public_url(v):
            raise ValueError(f"docs_base_url must be an http(s) URL such as https://help.example.com/docs/, got {v!r}")
        return v.strip()

    @model_validator(mode="after")
    def _budget(self) -> "Settings":
        if self.max_new_tokens >= self.max_model_len:
            raise ValueError(
                f"max_new_tokens must be < max_model_len ({self.max_model_len}), got {self.max_new_tokens}"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        toml_file = os.environ.get("CHATBOT_CONFIG")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    # --- derived paths
    @property
    def index_dir(self) -> Path:
        """Folder that holds the index versions and the ``CURRENT`` pointer."""
        return self.data_dir / "index"

    @property
    def resolved_adapters_dir(self) -> Path:
        """``adapters_dir`` or ``data_dir/adapters``: the adapter registry and its ``LIVE.json`` pointer."""
        return self.adapters_dir or self.data_dir / "adapters"

    @property
    def resolved_database_url(self) -> str:
        """``database_url`` or the SQLite file in ``data_dir``."""
        return self.database_url or f"sqlite:///{self.data_dir / 'chatbot.db'}"

    @property
    def prompt_budget_tokens(self) -> int:
        """Tokens the prompt may use: ``max_model_len - max_new_tokens``."""
        return self.max_model_len - self.max_new_tokens

