"""Labelled messages for the intent and entity heads: readers, splits and data hashes.

Readers for the shared sets (``../shared/data/<set>/``, each with its ``SOURCE.md``):

* ``bitext_customer_support``: 4,514 requests, 27 intents, one optional entity span
  per row (``entity_type``, ``start_offset``, ``end_offset``); no official split, so a
  stratified 80/10/10 split with a fixed seed is made here. CDLA-Sharing-1.0.
* ``banking77``: train 10,003 / test 3,080, 77 intents; validation is a stratified
  10% of train. CC BY 4.0 (Casanueva et al. 2020).
* ``clinc150``: the ``full`` variant (Larson et al. 2019): train/val/test plus the
  ``oos_*`` splits, labelled ``oos``. CC BY 3.0.
* ``shop``: the shipped default, Bitext plus an ``out_of_scope`` class made of
  CLINC150's out-of-scope requests and requests from CLINC150 intents that a shop's
  support desk does not serve (travel, cooking, small talk, ...).

Generic files: CSV with a header or JSONL, one ``(text, label)`` per row (column
names configurable), and JSONL ``{"text", "entities": [{"start", "end", "type"}]}``
for entities.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chatbot.errors import ConfigError, InvalidInputError, NotFoundError
from chatbot.jsonl import iter_jsonl

log = logging.getLogger(__name__)

#: Shared data root (``<repo>/../shared/data``).
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
#: Label of the out-of-scope class in the shipped (``shop``) head.
OUT_OF_SCOPE = "out_of_scope"
#: Names :func:`load_intent_splits` and :func:`load_entity_splits` accept besides file paths.
INTENT_SETS = ("bitext_customer_support", "banking77", "clinc150", "shop")
ENTITY_SETS = ("bitext_customer_support",)

_BITEXT_CSV = "Bitext_Sample_Customer_Support_Training_Dataset.csv"

#: CLINC150 intents kept out of the shop's out-of-scope class because a shop's
#: customer could mean one of the shop's intents with them (orders, payments,
#: accounts) or because they are dialogue acts rather than topics (yes, thanks).
CLINC_NOT_OFF_TOPIC = frozenset(
    {
        "order", "order_status", "cancel", "card_declined", "account_blocked", "change_user_name",
        "user_name", "freeze_account", "pay_bill", "bill_balance", "bill_due", "transactions",
        "damaged_card", "report_lost_card", "report_fraud", "new_card", "replacement_card_duration",
        "expiration_date", "shopping_list", "shopping_list_update", "repeat", "yes", "no", "maybe",
        "thank_you", "greeting", "goodbye", "are_you_a_bot", "what_can_i_ask_you", "reset_settings",
        "whisper_mode", "change_speed", "change_volume", "change_accent", "change_language",
        "sync_device", "international_fees", "spending_history", "application_status",
    }
)


@dataclass(frozen=True)
class Span:
    """A typed character span: ``text[start:end]`` is the entity (end exclusive)."""

    start: int
    end: int
    type: str


@dataclass
class IntentSplits:
    """Train / validation / test lists of ``(text, label)`` and the out-of-scope label (or None).

    ``sources`` names where each split came from (for provenance files).
    """

    train: list[tuple[str, str]]
    validation: list[tuple[str, str]]
    test: list[tuple[str, str]]
    oos_label: str | None = None
    name: str = ""
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """Sorted labels of the training split."""
        return sorted({y for _, y in self.train})


@dataclass
class EntitySplits:
    """Train / validation / test lists of ``(text, [Span, ...])``."""

    train: list[tuple[str, list[Span]]]
    validation: list[tuple[str, list[Span]]]
    test: list[tuple[str, list[Span]]]
    name: str = ""
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def types(self) -> list[str]:
        """Sorted entity types of the training split."""
        return sorted({s.type for _, spans in self.train for s in spans})


# ---------------------------------------------------------------------------- generic files


def read_labelled_file(
    path: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    labels: Iterable[str] | None = None,
) -> list[tuple[str, str]]:
    """Read ``(text, label)`` rows from a CSV file with a header or a JSONL file.

    Args:
        path: ``.csv`` / ``.tsv`` or ``.jsonl`` / ``.json`` (one object per line).
        text_field: column or key holding the message.
        label_field: column or key holding the label.
        labels: the allowed labels; None accepts any non-empty label.

    Returns:
        The rows in file order. Empty texts are kept (the heads predict them too).

    Raises:
        NotFoundError: the file does not exist.
        InvalidInputError: a row lacks a field, has an empty label or a label outside
            ``labels``; the message names the file, the row number (1-based, header
            is row 0 for CSV) and the value.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"training data file {path} does not exist")
    allowed = set(labels) if labels is not None else None
    rows: list[tuple[str, str]] = []
    for row_no, rec in _iter_records(path):
        if text_field not in rec or label_field not in rec:
            raise InvalidInputError(
                f"{path} row {row_no}: missing field {text_field!r} or {label_field!r}, got keys {sorted(rec)}"
            )
        text = "" if rec[text_field] is None else str(rec[text_field])
        label = "" if rec[label_field] is None else str(rec[label_field]).strip()
        if not label:
            raise InvalidInputError(f"{path} row {row_no}: empty {label_field!r} for text {text[:60]!r}")
        if allowed is not None and label not in allowed:
            raise InvalidInputError(
                f"{path} row {row_no}: unknown label {label!r} (known: {', '.join(sorted(allowed)[:10])}"
                f"{', ...' if len(allowed) > 10 else ''})"
            )
        rows.append((text, label))
    if not rows:
        raise InvalidInputError(f"{path} has no rows")
    return rows


def read_entity_file(path: str | Path) -> list[tuple[str, list[Span]]]:
    """Read JSONL rows ``{"text": ..., "entities": [{"start": 0, "end": 5, "type": "order_id"}]}``.

    Raises:
        NotFoundError: the file does not exist.
        InvalidInputError: a span is outside its text, empty or overlaps another; the
            message names the row (1-based) and the span.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"training data file {path} does not exist")
    out = []
    for row_no, rec in _iter_records(path):
        text = str(rec.get("text") or "")
        spans = []
        for ent in rec.get("entities") or []:
            try:
                spans.append(Span(int(ent["start"]), int(ent["end"]), str(ent["type"])))
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidInputError(f"{path} row {row_no}: bad entity {ent!r}: {exc}") from exc
        out.append((text, check_spans(text, spans, where=f"{path} row {row_no}")))
    return out


def check_spans(text: str, spans: Sequence[Span], where: str = "") -> list[Span]:
    """Validate and sort spans of ``text``.

    Raises:
        InvalidInputError: a span is empty, outside ``0..len(text)`` or overlaps another.
    """
    spans = sorted(spans, key=lambda s: (s.start, s.end))
    prev_end = -1
    for s in spans:
        if not (0 <= s.start < s.end <= len(text)):
            raise InvalidInputError(f"{where}: span {s} outside text of length {len(text)}")
        if not s.type:
            raise InvalidInputError(f"{where}: span {s} has an empty type")
        if s.start < prev_end:
            raise InvalidInputError(f"{where}: span {s} overlaps the previous span")
        prev_end = s.end
    return spans


def _iter_records(path: Path):
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        yield from iter_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for i, rec in enumerate(reader, start=1):
                yield i, rec
    else:
        raise InvalidInputError(f"data file {path}: unknown format {suffix!r}; use .csv, .tsv or .jsonl")


# ---------------------------------------------------------------------------- splits and checks


def stratified_split(
    rows: Sequence[tuple[str, str]], fractions: Sequence[float], seed: int = 13
) -> list[list[tuple[str, str]]]:
    """Split ``rows`` per label into parts of the given fractions (sum 1), deterministic in ``seed``.

    A label with fewer examples than parts fills the first parts first (so training
    keeps it).

    Raises:
        ConfigError: the fractions do not sum to 1 or one is negative.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ConfigError(f"split fractions must be >= 0 and sum to 1, got {list(fractions)}")
    by_label: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for r in rows:
        by_label[r[1]].append(r)
    parts: list[list[tuple[str, str]]] = [[] for _ in fractions]
    rng = random.Random(seed)
    for label in sorted(by_label):
        items = by_label[label][:]
        rng.shuffle(items)
        n = len(items)
        bounds, acc = [], 0.0
        for frac in fractions[:-1]:
            acc += frac
            bounds.append(round(acc * n))
        bounds.append(n)
        start = 0
        for k, end in enumerate(bounds):
            parts[k].extend(items[start:end])
            start = end
    for p in parts:
        rng.shuffle(p)
    return parts


def label_counts_warnings(rows: Sequence[tuple[str, str]], min_examples: int = 2) -> list[str]:
    """Warn (log and return the messages) for labels with fewer than ``min_examples`` examples."""
    counts = Counter(y for _, y in rows)
    msgs = [
        f"label {label!r} has {n} training example{'s' if n != 1 else ''}; "
        f"its predictions and metrics will be unreliable"
        for label, n in sorted(counts.items())
        if n < min_examples
    ]
    for m in msgs:
        log.warning(m)
    return msgs


def data_hash(*parts: Iterable) -> str:
    """sha256 over the canonical JSON of each part (lists of rows), for provenance files."""
    h = hashlib.sha256()
    for part in parts:
        for row in part:
            if isinstance(row, tuple) and len(row) == 2 and isinstance(row[1], list):
                row = [row[0], [[s.start, s.end, s.type] for s in row[1]]]
            h.update(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode())
            h.update(b"\n")
        h.update(b"\x00")
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------- shared sets


def _rel(root: Path) -> str:
    """``shared/data`` for the default root (provenance files carry no machine paths)."""
    return "shared/data" if Path(root).resolve() == SHARED_DATA.resolve() else str(root)


def _need(path: Path) -> Path:
    if not path.exists():
        raise NotFoundError(f"dataset file {path} does not exist (shared data root: {path.parent.parent})")
    return path


def _bitext_rows(root: Path) -> list[dict]:
    path = _need(root / "bitext_customer_support" / _BITEXT_CSV)
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def load_bitext_intents(root: Path = SHARED_DATA, seed: int = 13) -> IntentSplits:
    """Bitext customer support: ``instruction -> intent`` (27 intents), stratified 80/10/10."""
    rows = [(r["instruction"], r["intent"]) for r in _bitext_rows(root)]
    train, val, test = stratified_split(rows, (0.8, 0.1, 0.1), seed=seed)
    src = f"{_rel(root)}/bitext_customer_support/{_BITEXT_CSV} (stratified 80/10/10, seed {seed})"
    return IntentSplits(train, val, test, None, "bitext_customer_support", {"all": src})


def load_banking77(root: Path = SHARED_DATA, seed: int = 13) -> IntentSplits:
    """Banking77: train minus a stratified 10% validation split; the official test split."""
    def read(name: str) -> list[tuple[str, str]]:
        return read_labelled_file(_need(root / "banking77" / name), "text", "category")

    train, val = stratified_split(read("train.csv"), (0.9, 0.1), seed=seed)
    return IntentSplits(
        train, val, read("test.csv"), None, "banking77",
        {"train": "banking77/train.csv (90%)", "validation": "banking77/train.csv (10%)", "test": "banking77/test.csv"},
    )


def load_clinc150(root: Path = SHARED_DATA) -> IntentSplits:
    """CLINC150 ``data_full.json``: train+oos_train, val+oos_val, test+oos_test; out-of-scope label ``oos``."""
    data = json.loads(_need(root / "clinc150" / "data_full.json").read_text())

    def split(*names: str) -> list[tuple[str, str]]:
        return [(t, y) for n in names for t, y in data[n]]

    return IntentSplits(
        split("train", "oos_train"), split("val", "oos_val"), split("test", "oos_test"), "oos", "clinc150",
        {"train": "clinc150 train+oos_train", "validation": "clinc150 val+oos_val", "test": "clinc150 test+oos_test"},
    )


def without_slots(text: str, spans: Sequence[Span]) -> str:
    """``text`` with its entity spans cut out and the spacing tidied.

    ``"cancel order 00123842 please"`` -> ``"cancel order please"``; a ``#`` or ``no.``
    right before a span goes with it.
    """
    import re

    out, pos = [], 0
    for sp in sorted(spans, key=lambda x: x.start):
        out.append(text[pos:sp.start])
        pos = sp.end
    out.append(text[pos:])
    t = "".join(out)
    t = re.sub(r"(#|\bno\.)\s*(?=\s|$|[?!.,])", " ", t)
    t = re.sub(r"\s+([?!.,])", r"\1", t)
    return re.sub(r"\s{2,}", " ", t).strip()


def _bitext_slotless_variants(rows: Sequence[tuple[str, str]], spans: dict[str, list[Span]]) -> list[tuple[str, str]]:
    """For each row with an entity, the same request without it (Bitext's order intents
    always carry an order number, so without these a head never sees "cancel my order")."""
    out = []
    for text, label in rows:
        sp = spans.get(text)
        if sp:
            t = without_slots(text, sp)
            if t and t != text:
                out.append((t, label))
    return out


def load_shop_intents(root: Path = SHARED_DATA, seed: int = 13, per_intent: int = 12,
                      slotless: bool = True) -> IntentSplits:
    """The shipped default: Bitext's 27 intents plus ``out_of_scope``.

    With ``slotless`` the training and validation splits also hold each Bitext
    request that has an entity with the entity cut out (:func:`without_slots`), so
    "I want to cancel my order" is ``cancel_order`` and the router can ask for the
    number; the test split is left as Bitext has it.

    ``out_of_scope`` = CLINC150 ``oos_*`` requests plus ``per_intent`` requests from each
    CLINC150 intent that is off-topic for a shop (not in :data:`CLINC_NOT_OFF_TOPIC`),
    taken from the matching CLINC150 split (train -> train, val -> validation,
    test -> test), so no off-topic text is shared between splits.
    """
    bitext = load_bitext_intents(root, seed)
    data = json.loads(_need(root / "clinc150" / "data_full.json").read_text())
    rng = random.Random(seed)

    def off_topic(split_name: str, oos_name: str, k: int) -> list[tuple[str, str]]:
        by_intent: dict[str, list[str]] = defaultdict(list)
        for t, y in data[split_name]:
            if y not in CLINC_NOT_OFF_TOPIC:
                by_intent[y].append(t)
        out = [t for y in sorted(by_intent) for t in rng.sample(by_intent[y], min(k, len(by_intent[y])))]
        out += [t for t, _ in data[oos_name]]
        return [(t, OUT_OF_SCOPE) for t in out]

    train = bitext.train + off_topic("train", "oos_train", per_intent)
    val = bitext.validation + off_topic("val", "oos_val", max(1, per_intent // 4))
    if slotless:
        spans = {t: sp for t, sp in _bitext_entity_map(root).items() if sp}
        train += _bitext_slotless_variants(bitext.train, spans)
        val += _bitext_slotless_variants(bitext.validation, spans)
    test = bitext.test + off_topic("test", "oos_test", max(1, per_intent // 4))
    for part in (train, val, test):
        rng.shuffle(part)
    return IntentSplits(
        train, val, test, OUT_OF_SCOPE, "shop",
        {
            "in_scope": bitext.sources["all"],
            "out_of_scope": f"{_rel(root)}/clinc150/data_full.json: oos_* splits plus {per_intent} (train) / "
            f"{max(1, per_intent // 4)} (val, test) requests per off-topic CLINC150 intent",
            "slotless": "train and validation also hold Bitext requests with their entity cut out" if slotless
            else "no",
        },
    )


def load_intent_splits(
    name_or_path: str | Path,
    root: Path = SHARED_DATA,
    *,
    text_field: str = "text",
    label_field: str = "label",
    validation: str | Path | None = None,
    test: str | Path | None = None,
    oos_label: str | None = None,
    labels: Iterable[str] | None = None,
    seed: int = 13,
) -> IntentSplits:
    """A shared set by name (:data:`INTENT_SETS`) or a CSV/JSONL file of ``(text, label)``.

    For a file without ``validation`` (and ``test``), stratified 10% parts of it are
    used. Validation and test labels must be labels of the training file; with
    ``labels`` (e.g. the intents of a routing policy) the training labels must be
    among them too.

    Raises:
        NotFoundError: unknown set name and no such file.
        InvalidInputError: see :func:`read_labelled_file`.
    """
    name = str(name_or_path)
    if name == "bitext_customer_support":
        return load_bitext_intents(root, seed)
    if name == "banking77":
        return load_banking77(root, seed)
    if name == "clinc150":
        return load_clinc150(root)
    if name == "shop":
        return load_shop_intents(root, seed)
    path = Path(name_or_path)
    if not path.exists():
        raise NotFoundError(f"dataset {name!r} is neither a file nor one of {', '.join(INTENT_SETS)}")
    rows = read_labelled_file(path, text_field, label_field, labels)
    labels = {y for _, y in rows}
    if validation is None:
        fr = (0.8, 0.1, 0.1) if test is None else (0.9, 0.1, 0.0)
        train, val, tst = stratified_split(rows, fr, seed=seed)
    else:
        train, val, tst = rows, read_labelled_file(validation, text_field, label_field, labels), []
    if test is not None:
        tst = read_labelled_file(test, text_field, label_field, labels)
    return IntentSplits(train, val, tst, oos_label, path.stem, {"train": str(path)})


def _bitext_entity_map(root: Path) -> dict[str, list[Span]]:
    """instruction -> its (clipped) entity spans."""
    out = {}
    for r in _bitext_rows(root):
        text = r["instruction"]
        spans = []
        if r.get("entity_type"):
            s, e = int(float(r["start_offset"])), min(int(float(r["end_offset"])), len(text))
            spans = [Span(s, e, r["entity_type"])]
        out[text] = spans
    return out


def load_bitext_entities(root: Path = SHARED_DATA, seed: int = 13) -> EntitySplits:
    """Bitext ``instruction`` with its one optional span; same 80/10/10 split (stratified by intent).

    The CSV's ``end_offset`` runs past the text on 99 rows (the span is clipped to
    the text, which matches ``entity_value`` there).
    """
    recs = _bitext_rows(root)
    by_text: dict[str, list[Span]] = {}
    keyed = []
    clipped = 0
    for i, r in enumerate(recs, start=2):  # row 1 is the header
        text = r["instruction"]
        spans = []
        if r.get("entity_type"):
            s, e = int(float(r["start_offset"])), int(float(r["end_offset"]))
            if e > len(text):
                clipped += 1
                e = len(text)
            spans = check_spans(text, [Span(s, e, r["entity_type"])], where=f"{_BITEXT_CSV} row {i}")
        by_text[text] = spans
        keyed.append((text, r["intent"]))
    if clipped:
        log.info("bitext entities: clipped %d spans whose end_offset ran past the text", clipped)
    train, val, test = stratified_split(keyed, (0.8, 0.1, 0.1), seed=seed)
    conv = lambda part: [(t, by_text[t]) for t, _ in part]
    return EntitySplits(
        conv(train), conv(val), conv(test), "bitext_customer_support",
        {"all": f"{_rel(root)}/bitext_customer_support/{_BITEXT_CSV} (stratified by intent 80/10/10, seed {seed})"},
    )


def load_entity_splits(
    name_or_path: str | Path,
    root: Path = SHARED_DATA,
    *,
    validation: str | Path | None = None,
    test: str | Path | None = None,
    seed: int = 13,
) -> EntitySplits:
    """``bitext_customer_support`` or a JSONL file of texts with spans (see :func:`read_entity_file`).

    Raises:
        NotFoundError: unknown set name and no such file.
        InvalidInputError: see :func:`read_entity_file`.
    """
    if str(name_or_path) == "bitext_customer_support":
        return load_bitext_entities(root, seed)
    path = Path(name_or_path)
    if not path.exists():
        raise NotFoundError(f"dataset {str(name_or_path)!r} is neither a file nor one of {', '.join(ENTITY_SETS)}")
    rows = read_entity_file(path)
    if validation is None:
        rng = random.Random(seed)
        rows = rows[:]
        rng.shuffle(rows)
        n = len(rows)
        n_val = max(1, n // 10)
        n_test = 0 if test is not None else max(1, n // 10) if n >= 3 else 0
        val, tst, train = rows[:n_val], rows[n_val:n_val + n_test], rows[n_val + n_test:]
    else:
        train, val, tst = rows, read_entity_file(validation), []
    if test is not None:
        tst = read_entity_file(test)
    return EntitySplits(train, val, tst, path.stem, {"train": str(path)})
