"""Dialogues for chat fine-tuning: readers, importers, splits, and chat-template encoding with loss masks.

The common format is JSONL, one dialogue a line::

    {"id": "optional-unique-id", "messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

Readers:

* :func:`load_jsonl` -- that format (what the store's chat-SFT export writes from the conversation log);
* :func:`import_bitext` -- ``bitext_customer_support`` (one request -> one agent reply; the
  ``{{Placeholder}}`` spellings of company details become ``[[field]]`` markers that the
  service fills at serving time, see :mod:`chatbot.company`);
* :func:`import_twitter` -- ``twitter_customer_care_docpred`` (real multi-turn customer/agent
  conversations on Twitter; dev and test files, 1,025 conversations).

:func:`load_dialogues` takes any mix of those (a file path or a shared-set name) and
returns the dialogues with the provenance of each source (path, SHA-256, count).
:func:`split_dialogues` splits by conversation with a fixed seed. :func:`encode_dialogue`
renders a dialogue with the model's own chat template and sets the labels (the
loss mask): -100 on system and user tokens, on the chat template's role headers
and on padding; the token ids themselves on every assistant token including its
end-of-turn token (``<|im_end|>`` for SmolLM2). :class:`DataCollator` pads a batch
on the right for training (labels padded with -100 by position, never by token
id, so an end-of-turn token that is also the pad token keeps its label).

Over-long dialogues follow one stated rule (``truncation``):

* ``"turns"`` (default): keep the longest prefix of the dialogue that ends with a
  complete assistant turn (its end-of-turn token included) and fits ``max_length``;
  a dialogue whose *first* assistant turn does not fit is dropped;
* ``"drop"``: drop every dialogue longer than ``max_length``.

Dropped dialogues are counted (:class:`EncodeStats`), never silently lost. A
dialogue that has no assistant token to learn from is an error
(:class:`~chatbot.errors.DataError` naming it), not a warning.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from chatbot.company import canonical_field, marker
from chatbot.dialogue import chat_messages
from chatbot.errors import ConfigError, DataError, NotFoundError
from chatbot.hashing import sha256_file
from chatbot.jsonl import iter_jsonl

log = logging.getLogger(__name__)

#: Shared data root (``<repo>/../shared/data``).
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
#: Names :func:`load_dialogues` accepts for the shared sets.
SHARED_SETS = ("bitext_customer_support", "twitter_customer_care_docpred")
#: The fixed reference set that adapters trained on few conversations are evaluated on (see its SOURCE.md).
REFERENCE_SET = Path(__file__).resolve().parent.parent / "data" / "eval" / "sft_reference"
ROLES = ("system", "user", "assistant")
#: Label of a token that carries no loss (the ``ignore_index`` of cross-entropy).
IGNORE_INDEX = -100
#: Strings that end an assistant turn in the chat templates we know (plus the tokenizer's EOS).
END_OF_TURN_STRINGS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

Truncation = Literal["turns", "drop"]


# ----------------------------------------------------------------------------------- dialogues


@dataclass
class Dialogue:
    """One conversation.

    Attributes:
        id: unique id (the split is by this id).
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``: an optional
            leading system message, then turns that start with a user message and include at
            least one assistant message.
        source: where it came from (``"bitext_customer_support"``, a file name).
        meta: anything else (intent, company, ...), not used for training.
    """

    id: str
    messages: list[dict[str, str]]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The JSONL record: ``{"id", "messages", "source", "meta"}``."""
        return {"id": self.id, "messages": self.messages, "source": self.source, "meta": self.meta}

    def prompt_and_reference(self) -> tuple[list[dict[str, str]], str]:
        """Messages before the last assistant message, and that message's text (for reply evaluation)."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last], self.messages[last]["content"]


def validate_messages(messages: object, where: str) -> list[dict[str, str]]:
    """Check one dialogue's ``messages`` and return them as plain dicts.

    Rules: a non-empty list of ``{"role", "content"}`` objects; roles in
    ``system|user|assistant``; content a non-empty string; a system message only
    first; the first non-system message from the user; at least one assistant message.

    Raises:
        DataError: a rule is broken; the message names ``where``, the field and the bad value.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list, got {messages!r:.80}")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise DataError(f"{where}: messages[{i}] must be an object with role and content, got {m!r:.80}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: messages[{i}].content must be a non-empty string, got {content!r:.80}")
        if role == "system" and i != 0:
            raise DataError(f"{where}: messages[{i}].role 'system' is only allowed first, got it at position {i}")
        out.append({"role": role, "content": content})
    first = 1 if out[0]["role"] == "system" else 0
    if len(out) <= first or out[first]["role"] != "user":
        got = out[first]["role"] if len(out) > first else None
        raise DataError(f"{where}: messages[{first}].role must be 'user' (the customer speaks first), got {got!r}")
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: messages has no assistant message, so there is nothing to learn")
    return out


def load_jsonl(path: str | Path) -> list[Dialogue]:
    """Read a JSONL file of ``{"messages": [...]}`` dialogues (optional ``id``, ``meta``).

    Dialogues without an ``id`` get ``"<file name>:<line number>"``.

    Raises:
        NotFoundError: the file does not exist.
        DataError: a line is not JSON, breaks :func:`validate_messages`, or repeats an id
            (the message names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"data file {str(path)!r} does not exist")
    out: list[Dialogue] = []
    seen: set[str] = set()
    for lineno, rec in iter_jsonl(path):
        where = f"{path.name} line {lineno}"
        if "messages" not in rec:
            raise DataError(f"{where}: expected an object with 'messages', got keys {sorted(rec)[:8]}")
        did = str(rec.get("id") or f"{path.name}:{lineno}")
        if did in seen:
            raise DataError(f"{where}: id {did!r} is repeated; dialogue ids must be unique")
        seen.add(did)
        out.append(Dialogue(did, validate_messages(rec["messages"], where), rec.get("source") or path.name,
                            rec.get("meta") or {}))
    return out


def write_jsonl(dialogues: Iterable[Dialogue], path: str | Path) -> Path:
    """Write dialogues as JSONL (the format :func:`load_jsonl` reads); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d.to_json(), ensure_ascii=False) + "\n" for d in dialogues)
    return path


# ----------------------------------------------------------------------------------- Bitext

_PLACEHOLDER = re.compile(r"\{\{([^{}]*)\}\}")
_ID_PLACEHOLDER = re.compile(r"^(order|purchase|invoice|bill)\s+(number|id)(\s+anonymized)?$", re.IGNORECASE)
_RAW_ID = re.compile(r"^[0-9A-Fa-f#]{6,}$")
_ID_ENTITIES = ("order_id", "invoice_id")


def normalize_bitext_reply(text: str, entity_type: str = "", entity_value: str = "") -> str:
    """Rewrite the ``{{Placeholder}}`` tokens of a Bitext reply.

    * company details (``{{Website Name}}``, ``{{Customer Support Phone Number}}`` and their
      other spellings, see :func:`chatbot.company.canonical_field`) -> ``[[website_name]]``,
      ``[[phone]]`` ... markers, filled from ``Settings.company_fields`` at serving time;
    * order / invoice numbers (``{{Order Number Anonymized}}``, ``{{113542617735902}}``) -> the
      number the customer gave (``entity_value`` of an ``order_id`` / ``invoice_id`` row), else
      the placeholder's words;
    * anything else (button and page names: ``{{Cancel Order}}``) -> its words without braces
      (``Cancel Order``), ``Anonymized`` removed.

    Returns:
        The reply with no ``{{`` or ``}}`` left.
    """
    has_id = entity_type in _ID_ENTITIES and bool(entity_value.strip())

    def repl(m: re.Match) -> str:
        inner = " ".join(m.group(1).split())
        name = canonical_field(inner)
        if name:
            return marker(name)
        if _ID_PLACEHOLDER.match(inner) or _RAW_ID.match(inner):
            if has_id:
                return entity_value.strip()
            if _RAW_ID.match(inner):
                return inner
        return re.sub(r"\s*\banonymized\b", "", inner, flags=re.IGNORECASE).strip() or inner

    return _PLACEHOLDER.sub(repl, text).replace("{{", "").replace("}}", "")


def import_bitext(path: str | Path | None = None) -> list[Dialogue]:
    """Read the Bitext customer-support CSV as one-turn dialogues (request -> agent reply).

    Args:
        path: the CSV file or its folder (default ``../shared/data/bitext_customer_support``).

    Returns:
        4,514 dialogues with ids ``bitext:<row>`` (row 1 is the first data row) and
        ``meta`` = intent, category, entity; replies normalised by :func:`normalize_bitext_reply`.

    Raises:
        NotFoundError: the file does not exist.
        DataError: a row lacks ``instruction`` or ``response``.
    """
    p = Path(path) if path else SHARED_DATA / "bitext_customer_support"
    if p.is_dir():
        p = p / "Bitext_Sample_Customer_Support_Training_Dataset.csv"
    if not p.is_file():
        raise NotFoundError(f"Bitext CSV {str(p)!r} does not exist")
    out: list[Dialogue] = []
    with open(p, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f), 1):
            req, resp = (row.get("instruction") or "").strip(), (row.get("response") or "").strip()
            if not req or not resp:
                raise DataError(f"{p.name} row {i}: instruction and response must be non-empty, got "
                                f"instruction={req[:40]!r} response={resp[:40]!r}")
            reply = normalize_bitext_reply(resp, row.get("entity_type") or "", row.get("entity_value") or "")
            out.append(Dialogue(
                f"bitext:{i}",
                [{"role": "user", "content": req}, {"role": "assistant", "content": reply}],
                "bitext_customer_support",
                {"intent": row.get("intent"), "category": row.get("category")},
            ))
    return out


# ----------------------------------------------------------------------------------- Twitter

_HANDLES = re.compile(r"^(?:\s*@\w+)+[\s,:]*")


def _clean_tweet(text: str) -> str:
    return _HANDLES.sub("", text.replace("\r", "")).strip()


def import_twitter(path: str | Path | None = None, files: Sequence[str] = ("dev.json", "test.json")) -> list[Dialogue]:
    """Read the Twitter customer-care conversations as multi-turn dialogues.

    Each conversation's tweets (``dialogContent``) plus the agent's final tweet that
    links a help article (``agentURL.url_utterance``) become alternating user /
    assistant messages: leading ``@handle`` mentions are removed, consecutive tweets
    of the same side are joined with a newline, agent tweets before the first
    customer tweet are dropped.

    Args:
        path: the folder (default ``../shared/data/twitter_customer_care_docpred``).
        files: which of its JSON files to read.

    Returns:
        Dialogues with ids ``twitter:<file stem>:<sessionID>`` and ``meta.company``.

    Raises:
        NotFoundError: a file does not exist.
        DataError: a file is not the expected JSON list.
    """
    root = Path(path) if path else SHARED_DATA / "twitter_customer_care_docpred"
    out: list[Dialogue] = []
    for name in files:
        fp = root / name
        if not fp.is_file():
            raise NotFoundError(f"Twitter customer-care file {str(fp)!r} does not exist")
        try:
            convs = json.loads(fp.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{fp.name}: not valid JSON ({exc.msg})") from exc
        if not isinstance(convs, list):
            raise DataError(f"{fp.name}: expected a JSON list of conversations, got {type(convs).__name__}")
        for k, conv in enumerate(convs):
            tweets = [("assistant" if "agent" in t else "user", _clean_tweet(t.get("message", "")))
                      for t in conv.get("dialogContent", [])]
            final = (conv.get("agentURL") or {}).get("url_utterance")
            if final:
                tweets.append(("assistant", _clean_tweet(final)))
            msgs = chat_messages(tweets)
            if not msgs:
                continue
            header = conv.get("dialogHeader") or {}
            did = f"twitter:{fp.stem}:{header.get('sessionID') or k}"
            out.append(Dialogue(did, validate_messages(msgs, did), "twitter_customer_care_docpred",
                                {"company": header.get("company")}))
    return out


# ----------------------------------------------------------------------------------- sources


def dialogues_sha256(dialogues: Iterable[Dialogue]) -> str:
    """SHA-256 of the dialogues' ids and messages in order (what training actually saw)."""
    h = hashlib.sha256()
    for d in dialogues:
        h.update(json.dumps([d.id, d.messages], ensure_ascii=False, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def load_dialogues(specs: Sequence[str | Path], system_prompt: str | None = None
                   ) -> tuple[list[Dialogue], list[dict]]:
    """Load dialogues from shared-set names and JSONL files.

    Args:
        specs: ``"bitext_customer_support"``, ``"twitter_customer_care_docpred"``, or paths to JSONL files
            (any mix, at least one). The conversation log reaches fine-tuning as such a file: the service
            exports it from the store (``chatbot train --data store``).
        system_prompt: put this system message first in every dialogue that has none.

    Returns:
        (dialogues, sources): ``sources`` lists, per spec, ``{"spec", "path", "sha256", "dialogues"}``
        (the SHA-256 of the file, or of the set's files in order).

    Raises:
        DataError: no spec, or ids repeat across sources.
        NotFoundError: a file or set is missing.
    """
    if not specs:
        raise DataError("data must name at least one file or shared set, got none")
    dialogues: list[Dialogue] = []
    sources: list[dict] = []
    for spec in specs:
        s = str(spec)
        if s == "bitext_customer_support":
            root = SHARED_DATA / s
            got = import_bitext(root)
            files = [root / "Bitext_Sample_Customer_Support_Training_Dataset.csv"]
        elif s == "twitter_customer_care_docpred":
            root = SHARED_DATA / s
            got = import_twitter(root)
            files = [root / "dev.json", root / "test.json"]
        else:
            p = Path(s)
            if p.suffix == ".csv" or (p.is_dir() and (p / "Bitext_Sample_Customer_Support_Training_Dataset.csv").exists()):
                got = import_bitext(p)
                files = [p if p.is_file() else p / "Bitext_Sample_Customer_Support_Training_Dataset.csv"]
            else:
                got = load_jsonl(p)
                files = [p]
        h = hashlib.sha256()
        for fp in files:
            h.update(sha256_file(fp).encode())
        digest = sha256_file(files[0]) if len(files) == 1 else h.hexdigest()
        sources.append({"spec": s, "path": [str(Path(fp).resolve()) for fp in files], "sha256": digest,
                        "dialogues": len(got)})
        dialogues.extend(got)
    seen: set[str] = set()
    for d in dialogues:
        if d.id in seen:
            raise DataError(f"dialogue id {d.id!r} appears in more than one source; ids must be unique")
        seen.add(d.id)
    if system_prompt:
        for d in dialogues:
            if d.messages[0]["role"] != "system":
                d.messages.insert(0, {"role": "system", "content": system_prompt})
    return dialogues, sources


# ----------------------------------------------------------------------------------- splits


@dataclass
class Splits:
    """Train / validation / test dialogues, split by conversation id.

    ``evaluation`` says where validation and test come from: ``{"kind": "held-out"}`` (cut from the data by
    :func:`split_dialogues`) or ``{"kind": "reference", "path", "reason"}`` (:func:`reference_splits`).
    """

    train: list[Dialogue]
    validation: list[Dialogue]
    test: list[Dialogue]
    seed: int = 0
    fractions: dict[str, float] = field(default_factory=dict)
    evaluation: dict = field(default_factory=lambda: {"kind": "held-out"})

    def manifest(self) -> dict:
        """``{"seed", "fractions", "evaluation", "counts", "ids": {split: [ids]}, "sha256": {split: hash}}``."""
        parts = {"train": self.train, "validation": self.validation, "test": self.test}
        return {
            "seed": self.seed,
            "fractions": self.fractions,
            "evaluation": self.evaluation,
            "counts": {k: len(v) for k, v in parts.items()},
            "sha256": {k: dialogues_sha256(v) for k, v in parts.items()},
            "ids": {k: [d.id for d in v] for k, v in parts.items()},
        }

    def save(self, folder: str | Path) -> None:
        """Write ``splits.json`` (ids per split) and ``validation.jsonl`` / ``test.jsonl`` (the dialogues)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "splits.json").write_text(json.dumps(self.manifest(), indent=1))
        write_jsonl(self.validation, folder / "validation.jsonl")
        write_jsonl(self.test, folder / "test.jsonl")


def split_dialogues(dialogues: Sequence[Dialogue], validation: float = 0.1, test: float = 0.1,
                    seed: int = 0) -> Splits:
    """Split by conversation: shuffle the ids (sorted first) with ``random.Random(seed)``, cut by the fractions.

    The same dialogues and seed always give the same split, whatever the input order.
    A non-zero fraction gets at least one dialogue when there are three or more.

    Raises:
        DataError: a fraction is outside [0, 1), their sum is >= 1, or too few dialogues.
    """
    for name, v in (("validation", validation), ("test", test)):
        if not 0.0 <= v < 1.0:
            raise DataError(f"{name} fraction must be in [0, 1), got {v}")
    if validation + test >= 1.0:
        raise DataError(f"validation + test fractions must be < 1, got {validation + test}")
    by_id = {d.id: d for d in dialogues}
    if len(by_id) != len(dialogues):
        raise DataError("dialogue ids must be unique to split by conversation")
    ids = sorted(by_id)
    random.Random(seed).shuffle(ids)
    n = len(ids)
    n_val = round(n * validation) or (1 if validation > 0 and n >= 3 else 0)
    n_test = round(n * test) or (1 if test > 0 and n >= 3 else 0)
    if n - n_val - n_test < 1:
        raise DataError(f"need at least one training dialogue, got {n} dialogues for these fractions")
    val_ids, test_ids, train_ids = ids[:n_val], ids[n_val:n_val + n_test], ids[n_val + n_test:]
    return Splits([by_id[i] for i in train_ids], [by_id[i] for i in val_ids], [by_id[i] for i in test_ids],
                  seed, {"validation": validation, "test": test})


def reference_splits(dialogues: Sequence[Dialogue], reference: str | Path | None = None,
                     system_prompt: str | None = None, seed: int = 0, reason: str = "") -> Splits:
    """Every dialogue for training; validation and test from the fixed reference set instead of held out.

    For data too small to split (a handful of reviewed conversations): holding one or two out would leave
    less to learn from and give a score on one dialogue. The reference set (``validation.jsonl`` and
    ``test.jsonl`` in ``reference``, default :data:`REFERENCE_SET`) is the same for every run, so adapters
    trained on different small batches are compared on the same dialogues.

    Args:
        dialogues: the training dialogues (ids unique).
        reference: folder of the reference set.
        system_prompt: put this system message first in reference dialogues that have none (as the training data).
        seed: recorded in the manifest.
        reason: why the reference set is used (recorded).

    Raises:
        DataError: repeated ids, or a reference id that is also a training id.
        NotFoundError: the reference files do not exist.
    """
    folder = Path(reference) if reference else REFERENCE_SET
    if len({d.id for d in dialogues}) != len(dialogues):
        raise DataError("dialogue ids must be unique to split by conversation")
    val, test = load_jsonl(folder / "validation.jsonl"), load_jsonl(folder / "test.jsonl")
    clash = sorted({d.id for d in dialogues} & {d.id for d in val + test})
    if clash:
        raise DataError(f"training dialogues {clash[:5]} are also in the reference set {str(folder)!r}")
    if system_prompt:
        for d in val + test:
            if d.messages[0]["role"] != "system":
                d.messages.insert(0, {"role": "system", "content": system_prompt})
    return Splits(list(dialogues), val, test, seed, {"validation": 0.0, "test": 0.0},
                  {"kind": "reference", "path": str(folder), "reason": reason})


# ----------------------------------------------------------------------------------- encoding


@dataclass
class EncodeStats:
    """What :func:`encode_dialogues` did: dialogues in, kept whole, truncated (rule ``turns``), dropped."""

    dialogues: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    label_tokens: int = 0
    dropped_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["dropped_ids"] = d["dropped_ids"][:20]
        return d


def _render(tokenizer, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _end_strings(tokenizer) -> list[str]:
    vocab = tokenizer.get_vocab()  # slow (tens of ms): once per call
    ends = [s for s in END_OF_TURN_STRINGS if s in vocab]
    if tokenizer.eos_token and tokenizer.eos_token not in ends:
        ends.append(tokenizer.eos_token)
    return ends


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == bos and bos not in _ids(tokenizer, "a")


def encode_dialogue(tokenizer, dialogue: Dialogue, max_length: int | None = None,
                    truncation: Truncation = "turns", _cache: dict | None = None) -> dict | None:
    """Render one dialogue with the chat template and build its labels.

    The rendered text is cut into segments at the assistant turns (each found by
    rendering the dialogue up to that turn with and without the generation prompt,
    as the serving engine renders its prompts); each segment is tokenized on its own
    (no special tokens added), so an assistant turn is tokenized exactly as the
    model generates it after the prompt. Assistant segments run from the first
    token of the reply through the end-of-turn token (``<|im_end|>``); the newline
    the template writes after it is not labelled (generation stops at the
    end-of-turn token), and the sample ends at the last assistant turn's
    end-of-turn token (later text carries no label). The sequence starts with exactly one BOS: a tokenizer
    that adds a BOS gets one only when the template did not write it.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        dialogue: the dialogue (see :func:`validate_messages`).
        max_length: most tokens per sample, None for no limit.
        truncation: ``"turns"`` or ``"drop"`` (see the module docstring).

    Returns:
        ``{"id", "input_ids", "labels", "truncated"}`` (lists of equal length), or None
        when the dialogue is over-long and dropped by the rule.

    Raises:
        DataError: the dialogue's labels would all be -100 (it has no assistant
            token), or the chat template renders the dialogue inconsistently.
        ConfigError: ``truncation`` is not ``turns`` or ``drop``.
    """
    if truncation not in ("turns", "drop"):
        raise ConfigError(f"truncation must be 'turns' or 'drop', got {truncation!r}")
    msgs = dialogue.messages
    full = _render(tokenizer, msgs, False)
    cache = _cache if _cache is not None else {}
    if "ends" not in cache:
        cache["ends"], cache["adds_bos"] = _end_strings(tokenizer), _adds_bos(tokenizer)
    ends = cache["ends"]
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, msgs[:i], True)
        upto = _render(tokenizer, msgs[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before) and len(before) >= pos):
            raise DataError(f"sample {dialogue.id!r}: the chat template does not render message {i} as a prefix "
                            "of the whole dialogue, so its assistant tokens cannot be located")
        turn = upto[len(before):]
        at = turn.find(m["content"])
        start = at + len(m["content"]) if at >= 0 else 0
        hits = [(turn.find(e, start), e) for e in ends if turn.find(e, start) >= 0]
        if not hits:
            raise DataError(f"sample {dialogue.id!r}: the chat template writes no end-of-turn token "
                            f"({', '.join(ends)}) after assistant message {i}")
        k, e = min(hits)
        segments.append((full[pos:len(before)], False))
        segments.append((turn[: k + len(e)], True))
        pos = len(before) + k + len(e)
    # Nothing after the last assistant turn is learned from, so the sample ends at its end-of-turn token.

    input_ids: list[int] = []
    labels: list[int] = []
    turn_ends: list[int] = []  # token index just after each assistant turn
    if cache["adds_bos"] and not (tokenizer.bos_token and full.startswith(tokenizer.bos_token)):
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, is_assistant in segments:
        ids = _ids(tokenizer, text)
        input_ids.extend(ids)
        labels.extend(ids if is_assistant else [IGNORE_INDEX] * len(ids))
        if is_assistant:
            turn_ends.append(len(input_ids))
    if all(lab == IGNORE_INDEX for lab in labels):
        raise DataError(f"sample {dialogue.id!r}: every label is masked (no assistant token to learn from)")
    truncated = False
    if max_length is not None and len(input_ids) > max_length:
        fitting = [e for e in turn_ends if e <= max_length]
        if truncation == "drop" or not fitting:
            return None
        cut = fitting[-1]
        input_ids, labels, truncated = input_ids[:cut], labels[:cut], True
    return {"id": dialogue.id, "input_ids": input_ids, "labels": labels, "truncated": truncated}


def encode_dialogues(tokenizer, dialogues: Sequence[Dialogue], max_length: int | None = None,
                     truncation: Truncation = "turns") -> tuple[list[dict], EncodeStats]:
    """Encode many dialogues with :func:`encode_dialogue`; count the kept, truncated and dropped ones.

    Raises:
        DataError: a dialogue has no assistant token (named in the message).
    """
    stats = EncodeStats(dialogues=len(dialogues))
    out: list[dict] = []
    cache: dict = {}
    for d in dialogues:
        ex = encode_dialogue(tokenizer, d, max_length, truncation, cache)
        if ex is None:
            stats.dropped += 1
            stats.dropped_ids.append(d.id)
            continue
        stats.truncated += int(ex["truncated"])
        stats.kept += int(not ex["truncated"])
        stats.tokens += len(ex["input_ids"])
        stats.label_tokens += sum(1 for x in ex["labels"] if x != IGNORE_INDEX)
        out.append(ex)
    if stats.dropped:
        log.info("dropped %d of %d dialogues longer than %s tokens (truncation=%s)", stats.dropped,
                 stats.dialogues, max_length, truncation)
    return out, stats


class DataCollator:
    """Pad encoded samples into a batch.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and
    ``labels`` with -100, by position (so a real end-of-turn token equal to the pad
    token keeps its label).

    Args:
        pad_token_id: id used for padding (the tokenizer's pad token, or its EOS).
        padding_side: ``"right"`` (training) or ``"left"`` (batched generation).
        pad_to_multiple_of: round the padded length up to a multiple of this.

    Returns (when called on a list of ``{"input_ids", "labels"}``):
        ``{"input_ids", "attention_mask", "labels"}`` long tensors of shape ``(batch, length)``.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None) -> None:
        if padding_side not in ("left", "right"):
            raise DataError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping]) -> dict:
        import torch

        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        for row, f in enumerate(features):
            k = len(f["input_ids"])
            sl = slice(0, k) if self.padding_side == "right" else slice(n - k, n)
            ids[row, sl] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[row, sl] = 1
            if "labels" in f:
                labels[row, sl] = torch.tensor(f["labels"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
