"""The adapter registry: adapter folders, the ``LIVE.json`` pointer, rollback and the audit log.

Adapters are folders written by :func:`finetune.sft.train_sft` (PEFT weights plus ``adapter.json``).
The registry is :attr:`AdapterOptions.adapters_dir` (the service's ``Settings.resolved_adapters_dir``,
default ``var/adapters``): every sub-folder with an ``adapter.json`` is an adapter, and ``LIVE.json``
there says which one is served::

    {"current": {"name", "version", "path", "promoted_at"} | null,
     "history": [earlier "current" entries, oldest first],
     "events": [{"action": "promote"|"rollback", "version", "at", ...}, ...]}

It is replaced atomically (write to a temporary file, ``os.replace``), so a reader never sees half of
it; promotions and rollbacks change it one at a time under a file lock. The serving side reads only this
module (no model, no Trainer code): the service's live-adapter watcher (:mod:`chatbot.adapter_watch`)
follows the pointer. Promotion behind the gate is :mod:`finetune.adapters.gate`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatbot.errors import AdapterError, ConfigError, NotFoundError
from finetune.base_model import EMBEDDED_CHAT_MODEL

log = logging.getLogger(__name__)

#: Version of the adapter folder layout (``adapter.json``).
ADAPTER_FORMAT = 1
#: An adapter folder's manifest (written by :func:`finetune.sft.train_sft`).
MANIFEST = "adapter.json"
#: The pointer to the served adapter, in the registry folder.
LIVE = "LIVE.json"
#: Sub-folder of an adapter folder holding base + adapter merged into a plain checkpoint, written at promotion
#: (:func:`finetune.adapters.export.merge_adapter`) so that vLLM serves it without LoRA.
MERGED = "merged"
#: The append-only audit log of promotions and rollbacks, beside ``LIVE.json`` (one JSON object a line).
AUDIT = "PROMOTIONS.jsonl"


@dataclass(frozen=True)
class AdapterOptions:
    """What the adapter functions need to know: where the registry is, what is served and the gate's tolerances.

    The service builds it from its settings (:func:`chatbot.adapter_watch.adapter_options`).

    Attributes:
        adapters_dir: the registry folder (``LIVE.json``, ``PROMOTIONS.jsonl``, one sub-folder per adapter).
        model: the served base model: :data:`~finetune.base_model.EMBEDDED_CHAT_MODEL`, a folder or a hub id.
        cache_dir: where the embedded base model is converted (needed when ``model`` or an adapter's base is it).
        max_lora_rank: the highest LoRA rank the serving engine loads (vLLM's ``max_lora_rank``); None: no limit
            (the transformers engine, peft serves any rank).
        max_val_loss_increase: the gate lets validation loss exceed the reference's by this much (nats).
        max_rouge_l_drop: the gate lets test ROUGE-L fall below the reference's by this much.
        max_self_stop_drop: the gate lets the test self-stop rate fall below the reference's by this much.

    Raises:
        ConfigError: a tolerance below 0 or ``max_lora_rank`` below 1.
    """

    adapters_dir: Path
    model: str = EMBEDDED_CHAT_MODEL
    cache_dir: Path | None = None
    max_lora_rank: int | None = None
    max_val_loss_increase: float = 0.01
    max_rouge_l_drop: float = 0.005
    max_self_stop_drop: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters_dir", Path(self.adapters_dir))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise ConfigError(f"max_lora_rank must be >= 1 or None, got {self.max_lora_rank}")
        for name in ("max_val_loss_increase", "max_rouge_l_drop", "max_self_stop_drop"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class AdapterRecord:
    """An adapter folder and what its ``adapter.json`` says.

    Attributes:
        name, version: the adapter's name and unique version string (``<name>-<time>-<sha8>``).
        path: the folder (absolute).
        kind: ``peft-lora`` or ``full``.
        base_id, base_sha256: the base model it was trained on (id and weight hash).
        metrics: ``{"val_loss", "perplexity", "rouge_l", "self_stop_rate", ...}`` on its own splits.
        base_metrics: the base model's metrics on the same splits.
        live: True when ``LIVE.json`` points at it.
    """

    name: str
    version: str
    path: Path
    kind: str
    base_id: str
    base_sha256: str
    metrics: dict
    base_metrics: dict | None
    eval_config: dict
    created_at: str
    manifest: dict = field(repr=False, default_factory=dict)
    live: bool = False

    @classmethod
    def from_folder(cls, folder: str | Path) -> AdapterRecord:
        """Read an adapter folder.

        Raises:
            NotFoundError: the folder does not exist.
            AdapterError: it has no readable ``adapter.json``.
        """
        p = Path(folder).resolve()
        if not p.is_dir():
            raise NotFoundError(f"adapter folder {str(p)!r} does not exist")
        mf = p / MANIFEST
        try:
            m = json.loads(mf.read_text())
        except FileNotFoundError as exc:
            raise AdapterError(f"{str(p)!r} is not an adapter folder: it has no {MANIFEST}") from exc
        except json.JSONDecodeError as exc:
            raise AdapterError(f"{str(mf)!r} is not valid JSON: {exc.msg}") from exc
        try:
            return cls(m["name"], m["version"], p, m.get("kind", "peft-lora"), m["base_model"]["id"],
                       m["base_model"]["sha256"], m.get("metrics") or {}, m.get("base_metrics"),
                       m.get("eval_config") or {}, m.get("created_at", ""), m)
        except KeyError as exc:
            raise AdapterError(f"{str(mf)!r} lacks the field {exc.args[0]!r}") from exc

    def entry(self) -> dict:
        """The ``LIVE.json`` entry for this adapter."""
        return {"name": self.name, "version": self.version, "path": str(self.path), "promoted_at": now()}

    def save_manifest(self) -> None:
        """Rewrite ``adapter.json`` (atomically) from ``self.manifest``."""
        atomic_write_json(self.path / MANIFEST, self.manifest)


def adapter_version(name: str, created: str, weights_sha256: str) -> str:
    """Versioned adapter name: ``<name>-<YYYYmmddHHMMSS>-<sha8>`` (at most 120 characters).

    Unique per trained weights, so vLLM never confuses two adapters of one name.
    """
    stamp = created.replace("-", "").replace(":", "").replace("T", "")[:14]
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:96]
    return f"{safe}-{stamp}-{weights_sha256[:8]}"


def now() -> str:
    """The current UTC time as ``YYYY-mm-ddTHH:MM:SSZ``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def atomic_write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary sibling and ``os.replace`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the pointer


def read_live(options: AdapterOptions) -> dict:
    """The ``LIVE.json`` state (``{"current": None, "history": [], "events": []}`` when absent).

    Raises:
        AdapterError: the file exists but is not valid JSON.
    """
    p = options.adapters_dir / LIVE
    if not p.is_file():
        return {"current": None, "history": [], "events": []}
    try:
        state = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{str(p)!r} is not valid JSON: {exc.msg}") from exc
    state.setdefault("current", None)
    state.setdefault("history", [])
    state.setdefault("events", [])
    return state


def write_live(options: AdapterOptions, state: dict) -> None:
    """Replace ``LIVE.json`` with ``state`` atomically (hold :func:`live_lock` around read, change and write)."""
    atomic_write_json(options.adapters_dir / LIVE, state)


def live_pointer_mtime(options: AdapterOptions) -> int | None:
    """Modification time of ``LIVE.json`` in nanoseconds (None when there is none): one ``stat``."""
    try:
        return (options.adapters_dir / LIVE).stat().st_mtime_ns
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def live_lock(options: AdapterOptions):
    """Hold an exclusive ``flock`` on ``<registry>/.live.lock``: promotions and rollbacks read, change and write
    ``LIVE.json`` one at a time, also from several servers sharing the registry (a lost history entry otherwise)."""
    reg = options.adapters_dir
    reg.mkdir(parents=True, exist_ok=True)
    with open(reg / ".live.lock", "a+") as f:  # closing the file releases the lock
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# --------------------------------------------------------------------------- the registry


def resolve_adapter(ref: str | Path, options: AdapterOptions) -> AdapterRecord:
    """Find an adapter by folder path, by name in the registry, or by version string.

    Raises:
        NotFoundError: nothing matches ``ref``.
        AdapterError: the match is not a valid adapter folder.
    """
    p = Path(ref)
    if p.is_dir():
        rec = AdapterRecord.from_folder(p)
    else:
        reg = options.adapters_dir
        if (reg / str(ref)).is_dir():
            rec = AdapterRecord.from_folder(reg / str(ref))
        else:
            match = [a for a in list_adapters(options) if a.version == str(ref)]
            if not match:
                raise NotFoundError(f"adapter {str(ref)!r} is neither a folder, a name in {str(reg)!r} nor a version")
            rec = match[0]
    cur = read_live(options)["current"]
    rec.live = bool(cur and cur.get("version") == rec.version)
    return rec


def list_adapters(options: AdapterOptions) -> list[AdapterRecord]:
    """Adapters in the registry (oldest first), plus the live one if it lives elsewhere; ``live`` marked."""
    reg = options.adapters_dir
    out: list[AdapterRecord] = []
    if reg.is_dir():
        for d in sorted(reg.iterdir()):
            if (d / MANIFEST).is_file():
                try:
                    out.append(AdapterRecord.from_folder(d))
                except AdapterError as exc:
                    log.warning("skipping %s: %s", d, exc)
    cur = read_live(options)["current"]
    if cur and not any(a.version == cur["version"] for a in out) and Path(cur["path"]).is_dir():
        with contextlib.suppress(AdapterError, NotFoundError):
            out.append(AdapterRecord.from_folder(cur["path"]))
    for a in out:
        a.live = bool(cur and a.version == cur.get("version"))
    return sorted(out, key=lambda a: a.created_at)


def merged_checkpoint(rec: AdapterRecord) -> Path | None:
    """The adapter's merged checkpoint (``<folder>/merged``, whose ``merged.json`` names this very version), or
    None when it has none (not promoted with ``adapter_serving="merged"``, or written for another version)."""
    folder = rec.path / MERGED
    try:
        info = json.loads((folder / "merged.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return folder if info.get("adapter") == rec.version else None


def install_adapter(folder: str | Path, options: AdapterOptions) -> tuple[AdapterRecord, bool]:
    """Copy an adapter folder (one shipped with the product, or trained elsewhere) into the registry, under its
    name; nothing is copied when the registry already holds that version.

    Returns:
        ``(record in the registry, copied)``.

    Raises:
        NotFoundError / AdapterError: ``folder`` is not an adapter folder, or the registry holds another version
            under the same name (nothing is overwritten).
    """
    src = AdapterRecord.from_folder(folder)
    dest = options.adapters_dir / src.name
    if dest.exists():
        have = AdapterRecord.from_folder(dest)
        if have.version != src.version:
            raise AdapterError(f"the registry already holds another adapter named {src.name!r} ({have.version}), "
                               f"not {src.version}; nothing was overwritten")
        return have, False
    options.adapters_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{src.name}-", dir=options.adapters_dir))
    try:  # copied aside, then renamed: a reader never sees half an adapter
        shutil.copytree(src.path, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MERGED, f".{MERGED}-*"))
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return AdapterRecord.from_folder(dest), True


def live_adapter(options: AdapterOptions) -> AdapterRecord | None:
    """The adapter ``LIVE.json`` points at, or None (the base model is served).

    Raises:
        AdapterError: the pointer names a folder that is gone or broken.
    """
    cur = read_live(options)["current"]
    if not cur:
        return None
    try:
        rec = AdapterRecord.from_folder(cur["path"])
    except NotFoundError as exc:
        raise AdapterError(f"the live adapter {cur['version']!r} is missing at {cur['path']!r}") from exc
    rec.live = True
    return rec


# --------------------------------------------------------------------------- the audit log


def who(user: str | None) -> str:
    """``user``, else the OS user (else ``uid <n>`` in containers without a user name)."""
    if user:
        return user
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no user name in the environment (containers): the uid
        return f"uid {os.getuid()}"


def append_audit(options: AdapterOptions, entry: dict) -> None:
    """Append one entry to the audit log (:data:`AUDIT` beside ``LIVE.json``; append-only, fsynced)."""
    p = options.adapters_dir / AUDIT
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, default=str, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_audit(options: AdapterOptions) -> list[dict]:
    """The promotions and rollbacks recorded in the audit log, oldest first.

    Each entry: ``{"at", "action": "promote"|"rollback", "user", "via": "cli"|"console"|..., "from", "to",
    "reference", "ok", "forced", "gate": [{"metric", "candidate", "reference", "tolerance", "ok"}],
    "load_check": {...}}`` (rollbacks without the gate fields). A line that is not JSON is skipped (logged).
    """
    p = options.adapters_dir / AUDIT
    if not p.is_file():
        return []
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.error("%s line %d is not JSON; skipped", p, i)
    return out


def audit_sentence(e: dict) -> str:
    """One audit entry as a sentence."""
    src, dst = e.get("from") or "the base model", e.get("to") or "the base model"
    verb = "promoted" if e.get("action") == "promote" else "rolled back"
    tail = ""
    if e.get("action") == "promote":
        gate = ", ".join(f"{g['metric']} {g['candidate']:.4f} vs {g['reference']:.4f} {'ok' if g['ok'] else 'WORSE'}"
                         for g in e.get("gate") or [])
        tail = f" (gate vs {e.get('reference')}: {gate or 'no metrics'}{'; forced' if e.get('forced') else ''})"
    return f"{e.get('at')}: {e.get('user')} ({e.get('via')}) {verb} {src} -> {dst}{tail}"


# --------------------------------------------------------------------------- rollback


def rollback(options: AdapterOptions, user: str | None = None, via: str = "cli") -> AdapterRecord | None:
    """Make the previously live adapter live again (or none, when the first promotion is undone).

    Args:
        options: the registry.
        user: who rolls back (default: the OS user); via: where from. Both go to the audit log.

    Returns:
        The adapter now live, or None when the base model is served again.

    Raises:
        AdapterError: nothing to roll back (no adapter is live and there is no history).
    """
    with live_lock(options):
        state = read_live(options)
        if not state["current"] and not state["history"]:
            raise AdapterError("nothing to roll back: no adapter is live and no earlier one is recorded")
        undone = state["current"]
        state["current"] = state["history"].pop() if state["history"] else None
        cur = state["current"]
        by, at = who(user), now()
        state["events"].append({"action": "rollback", "from": undone and undone["version"],
                                "version": cur and cur["version"], "at": at, "user": by})
        write_live(options, state)
        append_audit(options, {"at": at, "action": "rollback", "user": by, "via": via,
                               "from": undone and undone["version"], "to": cur and cur["version"]})
    log.info("%s rolled back %s; live: %s", by, undone and undone["version"], cur and cur["version"])
    return live_adapter(options)
