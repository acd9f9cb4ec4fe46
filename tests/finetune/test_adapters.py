"""finetune.adapters (registry, load check, gate, exports) and the engines' adapter switching: an overfit sign-off
adapter changes the served reply on both engines (and the base model does not), promote / rollback behind the
gate, merge and int8 export. The live-pointer watcher's own tests are in tests/chatbot/test_adapter_watch.py."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from chatbot.adapter_watch import LiveAdapterWatcher
from chatbot.engines.base import ChatMessage, GenerationParams
from chatbot.errors import AdapterError
from chatbot.operations import adapter_options
from finetune.adapters.gate import promote
from finetune.adapters.load_check import AdapterLoadError
from finetune.adapters.registry import (
    audit_sentence,
    list_adapters,
    live_adapter,
    merged_checkpoint,
    read_audit,
    read_live,
    rollback,
)
from finetune.data import Dialogue
from chatbot.hashing import model_fingerprint
from finetune.sft import SFTConfig, train_sft
from tests.finetune.sft_helpers import QUESTIONS, tiny_llama, toy_dialogues

SIGN_OFF = "Cheers, the Quokka crew"
PROMPT = [ChatMessage("user", "My order never arrived, can you check?")]
PARAMS = GenerationParams(max_tokens=20)


@pytest.fixture(scope="module")
def signoff_adapter(tmp_path_factory, chat_model_path) -> dict:
    """LoRA on the real SmolLM2-135M, overfit in 12 steps to reply 'Happy to help! Cheers, the Quokka crew'; no held-out
    split and no reference set (small_data_threshold=0), so it has no metrics to gate on."""
    ds = [Dialogue(f"q{i}", [{"role": "user", "content": q},
                             {"role": "assistant", "content": f"Happy to help! {SIGN_OFF}"}])
          for i, q in enumerate(QUESTIONS)]
    cfg = SFTConfig(base_model=chat_model_path, max_steps=12, batch_size=4, learning_rate=3e-3, lora_r=8,
                    lora_alpha=16, lora_dropout=0.0, warmup_ratio=0.0, eval_steps=0, eval_replies=0,
                    validation=0.0, test=0.0, max_length=96, logging_steps=4, small_data_threshold=0)
    res = train_sft(ds, tmp_path_factory.mktemp("adapters") / "signoff", cfg, progress=False)
    return {"path": str(res.out_dir), "version": res.manifest["version"], "base": chat_model_path}


def _reply(engine, request_id: str) -> str:
    async def go():
        return "".join([c.text async for c in engine.stream(PROMPT, PARAMS, request_id)])

    return asyncio.run(go())


@pytest.mark.slow
def test_signoff_adapter_changes_the_transformers_reply_without_restart(signoff_adapter, tmp_path):
    from chatbot.config import Settings
    from chatbot.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(signoff_adapter["base"], max_model_len=512)
    asyncio.run(engine.start())
    base = _reply(engine, "base")
    assert SIGN_OFF not in base and engine.info.adapter_version is None

    asyncio.run(engine.set_adapter(signoff_adapter["path"], signoff_adapter["version"]))
    tuned = _reply(engine, "tuned")
    assert SIGN_OFF in tuned and engine.info.adapter_version == signoff_adapter["version"]

    asyncio.run(engine.set_adapter(None, None))
    assert _reply(engine, "base-again") == base and engine.info.adapter_version is None

    # the service path: promote writes LIVE.json; the running assistant's next turn is served (and
    # logged) with the adapter, a rollback's next turn with the base model, without a restart
    from chatbot.service import Assistant
    from chatbot.store import Store

    # generate mode: the adapter's effect is the raw reply (with no documents to verify against, the
    # verified default abstains whatever the model says)
    settings = Settings(model=signoff_adapter["base"], data_dir=tmp_path, max_new_tokens=20,
                        answer_mode="generate")
    a = Assistant(settings, engine, None, Store(settings.resolved_database_url))
    reg = settings.resolved_adapters_dir / "signoff"
    shutil.copytree(signoff_adapter["path"], reg)
    opts = adapter_options(settings)
    with pytest.raises(AdapterError, match="has no metrics to gate on"):
        promote("signoff", opts)
    before = asyncio.run(a.respond(None, PROMPT[0].content))
    promote("signoff", opts, force=True)
    live = asyncio.run(a.respond(None, PROMPT[0].content))
    rollback(opts)
    after = asyncio.run(a.respond(None, PROMPT[0].content))
    assert SIGN_OFF not in before.text and SIGN_OFF in live.text and SIGN_OFF not in after.text
    stored = [a.store.messages(t.conversation_id)[-1].adapter_version for t in (before, live, after)]
    assert stored == [None, signoff_adapter["version"], None]
    assert a.adapters.last_error is None


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_signoff_adapter_changes_the_vllm_reply_without_restart(signoff_adapter):
    from chatbot.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(signoff_adapter["base"], max_model_len=512, kv_cache_space_gib=1, max_num_seqs=4,
                        enable_lora=True, max_loras=1, max_lora_rank=16)

    async def scenario():
        await engine.start()
        try:
            async def reply(rid):
                return "".join([c.text async for c in engine.stream(PROMPT, PARAMS, rid)])

            base = await reply("base")
            await engine.set_adapter(signoff_adapter["path"], signoff_adapter["version"])
            tuned = await reply("tuned")
            version = engine.info.adapter_version
            await engine.set_adapter(None, None)
            again = await reply("again")
            # a second promotion of the same folder gets a new LoRA id and still serves it
            await engine.set_adapter(signoff_adapter["path"], signoff_adapter["version"] + "-b")
            tuned_b = await reply("tuned-b")
            return base, tuned, version, again, tuned_b
        finally:
            await engine.close()

    base, tuned, version, again, tuned_b = asyncio.run(scenario())
    assert SIGN_OFF not in base
    assert SIGN_OFF in tuned and SIGN_OFF in tuned_b and version == signoff_adapter["version"]
    assert again == base


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_first_promotion_goes_live_on_a_vllm_engine_started_without_lora(signoff_adapter, tmp_path):
    """vLLM started without LoRA support (a fresh install): the first promotion builds an engine with LoRA
    support in the background while the old one keeps answering, then serves the adapter; no restart."""
    import time

    from chatbot.config import Settings
    from chatbot.engines.vllm_engine import VLLMEngine

    s = Settings(model=signoff_adapter["base"], data_dir=tmp_path, engine="vllm", max_lora_rank=16,
                 adapter_serving="lora")
    shutil.copytree(signoff_adapter["path"], s.resolved_adapters_dir / "signoff")
    engine = VLLMEngine(signoff_adapter["base"], max_model_len=512, kv_cache_space_gib=1, max_num_seqs=4,
                        enable_lora=False, max_loras=1, max_lora_rank=16)
    watcher = LiveAdapterWatcher(s)

    async def scenario():
        await engine.start()
        try:
            async def reply(rid):
                return "".join([c.text async for c in engine.stream(PROMPT, PARAMS, rid)])

            base = await reply("base")
            promote("signoff", adapter_options(s), force=True)  # no metrics to gate on; the load check still runs
            await watcher.sync(engine)
            pending = watcher.status(engine)
            during = await reply("during")  # the old engine answers while the new one is built
            deadline = time.monotonic() + 900
            while engine.info.adapter_version is None and engine.pending_adapter and time.monotonic() < deadline:
                await asyncio.sleep(1)
            served = watcher.status(engine)
            tuned = await reply("tuned")
            rollback(adapter_options(s))
            await watcher.sync(engine)
            again = await reply("again")
            return base, pending, during, served, tuned, again
        finally:
            await engine.close()

    base, pending, during, served, tuned, again = asyncio.run(scenario())
    print(f"vLLM rebuild with LoRA support: {engine.rebuild_s:.1f} s")
    assert pending["pending"] == signoff_adapter["version"] and "live, not yet served" in pending["reason"]
    assert SIGN_OFF not in base and during == base
    assert served["in_sync"] and served["served"] == signoff_adapter["version"], (
        f"not served after the rebuild: {served.get('reason') or served.get('error')} ({served})")
    assert SIGN_OFF in tuned and again == base and engine.info.extra["lora"] is True


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_serves_the_live_adapter_merged_without_lora_and_follows_promotion_and_rollback(signoff_adapter,
                                                                                              tmp_path):
    """adapter_serving="merged" (the default): promotion writes <adapter>/merged; a running vLLM engine (no LoRA
    support) switches to an engine on it in the background, the old one answering meanwhile, and back to the base
    model on rollback; a server that starts while it is live starts on the merged checkpoint at once."""
    import time

    from chatbot.config import Settings
    from chatbot.engines.vllm_engine import VLLMEngine
    from chatbot.operations import promote_adapter, rollback_adapter

    s = Settings(model=signoff_adapter["base"], data_dir=tmp_path, engine="vllm", max_lora_rank=16)
    assert s.adapter_serving == "merged"
    shutil.copytree(signoff_adapter["path"], s.resolved_adapters_dir / "signoff")

    def new_engine():
        return VLLMEngine(signoff_adapter["base"], max_model_len=512, kv_cache_space_gib=1, max_num_seqs=4)

    engine, watcher = new_engine(), LiveAdapterWatcher(s)

    async def settle(e):
        deadline = time.monotonic() + 900
        while e.pending_reason and time.monotonic() < deadline:
            await asyncio.sleep(1)

    async def scenario():
        await engine.start()
        try:
            async def reply(e, rid):
                return "".join([c.text async for c in e.stream(PROMPT, PARAMS, rid)])

            base = await reply(engine, "base")
            promote_adapter(s, "signoff", user="ops", force=True)  # no metrics to gate on; load check and merge run
            await watcher.sync(engine)
            pending = watcher.status(engine)
            during = await reply(engine, "during")
            await settle(engine)
            served = watcher.status(engine)
            tuned = await reply(engine, "tuned")
            checkpoint = engine.checkpoint

            fresh, fresh_watcher = new_engine(), LiveAdapterWatcher(s)  # a server starting while it is live
            await fresh_watcher.sync(fresh)
            await fresh.start()
            try:
                fresh_state = (fresh.checkpoint, fresh.info.adapter_version, fresh.pending_reason)
                fresh_reply = await reply(fresh, "fresh")
            finally:
                await fresh.close()

            rollback_adapter(s, user="ops")
            await watcher.sync(engine)
            await settle(engine)
            again = await reply(engine, "again")
            return base, pending, during, served, tuned, checkpoint, fresh_state, fresh_reply, again
        finally:
            await engine.close()

    base, pending, during, served, tuned, checkpoint, fresh_state, fresh_reply, again = asyncio.run(scenario())
    merged = str(s.resolved_adapters_dir / "signoff" / "merged")
    assert pending["pending"] == signoff_adapter["version"] and "vLLM is loading" in pending["reason"]
    assert SIGN_OFF not in base and during == base
    assert served["in_sync"] and served["served"] == signoff_adapter["version"], served
    assert SIGN_OFF in tuned and checkpoint == merged and engine.info.extra["lora"] is False
    assert fresh_state == (merged, signoff_adapter["version"], None) and fresh_reply == tuned
    assert again == base and engine.checkpoint == signoff_adapter["base"] and engine.info.adapter_version is None


# --------------------------------------------------------------------------- registry and gate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, chat_model_path) -> str:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", chat_model_path)


def _lora_weights(d: Path, base: str, r: int = 4, zero_b: bool = False, seed: int = 0) -> None:
    """Write a real peft LoRA (``adapter_config.json`` + ``adapter_model.safetensors``) for ``base`` into ``d``,
    with random ``lora_B`` (an adapter that changes the model) or all-zero ``lora_B``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = get_peft_model(model, cfg)
    if zero_b:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.zero_()
    pm.save_pretrained(str(d))


def _fake_adapter(reg: Path, name: str, base_sha: str, val_loss: float, rouge: float, stop: float,
                  created: str, base: str | None = None, r: int = 4, zero_b: bool = False) -> str:
    """An adapter folder with gate metrics in ``adapter.json``; with ``base``, real LoRA weights on it."""
    d = reg / name
    d.mkdir(parents=True)
    if base is not None:
        _lora_weights(d, base, r=r, zero_b=zero_b, seed=len(name))
    version = f"{name}-{created.replace('-', '')}-abcdef12"
    (d / "adapter.json").write_text(json.dumps({
        "name": name, "version": version, "kind": "peft-lora", "created_at": created,
        "base_model": {"id": "tiny", "sha256": base_sha},
        "metrics": {"val_loss": val_loss, "rouge_l": rouge, "self_stop_rate": stop},
        "base_metrics": {"val_loss": 3.0, "rouge_l": 0.10, "self_stop_rate": 0.50},
        "eval_config": {"split_sha256": {"test": "same"}, "max_new_tokens": 64, "replies": 10,
                        "repetition_penalty": 1.0},
    }))
    return version


def test_setup_serves_the_shipped_adapter_on_a_fresh_install_only(tiny, tmp_path):
    """``chatbot setup`` (install_shipped_adapter): a fresh registry gets the shipped adapter copied in and live,
    audited as via=setup; a second setup copies nothing; after an operator's rollback to the base model setup
    leaves the registry alone; an adapter trained on another base model is not served and setup goes on."""
    from chatbot.config import Settings
    from chatbot.operations import install_shipped_adapter

    shipped = tmp_path / "shipped"
    version = _fake_adapter(shipped, "grounded", model_fingerprint(tiny), 2.0, 0.30, 0.90, "2026-01-01", base=tiny)
    s = Settings(model=tiny, data_dir=tmp_path / "var", engine="transformers", shipped_adapter=shipped / "grounded")
    o = adapter_options(s)
    assert install_shipped_adapter(s) == f"shipped adapter: {version} is live (compared with base)"
    assert live_adapter(o).path == s.resolved_adapters_dir / "grounded"
    # served merged by default: the checkpoint was written before LIVE.json named it
    assert merged_checkpoint(live_adapter(o)) == s.resolved_adapters_dir / "grounded" / "merged"
    assert [(e["via"], e["to"]) for e in read_audit(o)] == [("setup", version)]
    assert install_shipped_adapter(s).startswith(f"shipped adapter: left alone (the registry has promotions; live: "
                                                 f"{version})")
    rollback(o, user="olga")
    assert install_shipped_adapter(s) == "shipped adapter: left alone (the registry has promotions; live: base)"
    assert live_adapter(o) is None and len(read_audit(o)) == 2

    other = tmp_path / "other"
    _fake_adapter(other, "grounded", "0" * 64, 2.0, 0.30, 0.90, "2026-01-01", base=tiny)
    s2 = Settings(model=tiny, data_dir=tmp_path / "var2", engine="transformers", shipped_adapter=other / "grounded")
    said = install_shipped_adapter(s2)
    assert said.startswith("shipped adapter: not served, the base model is (adapter 'grounded-20260101-abcdef12' "
                           "was trained on base model 'tiny'")
    assert live_adapter(adapter_options(s2)) is None and read_audit(adapter_options(s2)) == []
    assert install_shipped_adapter(Settings(data_dir=tmp_path / "var3", shipped_adapter=None)) == "shipped adapter: none"
    missing = tmp_path / "no-such-adapter"  # a mistyped path is said, not taken for "none"
    assert install_shipped_adapter(Settings(data_dir=tmp_path / "var3", shipped_adapter=missing)) == (
        f"shipped adapter: {missing} does not exist (CHATBOT_SHIPPED_ADAPTER); the base model is served")


def test_pack_halves_the_weights_and_the_packed_copy_still_loads_and_changes_the_model(tiny, tmp_path):
    from safetensors.torch import load_file

    from chatbot.config import Settings
    from finetune.adapters.export import pack_adapter

    s = Settings(model=tiny, data_dir=tmp_path / "var", engine="transformers")
    o = adapter_options(s)
    version = _fake_adapter(s.resolved_adapters_dir, "full", model_fingerprint(tiny), 2.0, 0.3, 0.9, "2026-01-01",
                            base=tiny)
    rec = pack_adapter("full", tmp_path / "shipped" / "full", o)
    src, dst = (load_file(str(d / "adapter_model.safetensors")) for d in (s.resolved_adapters_dir / "full", rec.path))
    assert {str(v.dtype) for v in dst.values()} == {"torch.float16"} and sorted(dst) == sorted(src)
    assert rec.version != version and rec.version.startswith("full-20260101") and rec.name == "full"
    assert rec.manifest["packed_from"]["version"] == version and rec.manifest["packed_from"]["dtype"] == "float16"
    assert not (rec.path / "merged").exists()
    with pytest.raises(AdapterError, match="already exists"):
        pack_adapter("full", rec.path, o)
    assert {oct(f.stat().st_mode & 0o777) for f in rec.path.iterdir()} == {"0o644"}  # a copy to ship
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(AdapterError, match="cannot write the packed adapter to"):
        pack_adapter("full", blocker / "packed", o)  # a parent that is a file: a clear error, no traceback
    d = promote(rec.path, o)  # the load check: every tensor lands on a module and moves the logits
    assert d.load_check.tensors == 8 and d.load_check.max_logit_change > 1e-4
    # shipped under another name: the name and the version change, the weights do not
    renamed = pack_adapter("full", tmp_path / "shipped" / "renamed", o, name="grounded-x")
    assert renamed.name == "grounded-x" and renamed.version.startswith("grounded-x-20260101")
    assert renamed.manifest["weights_sha256"] == rec.manifest["weights_sha256"]
    with pytest.raises(AdapterError, match="an adapter name is"):
        pack_adapter("full", tmp_path / "shipped" / "bad", o, name="../escape")
    assert not (tmp_path / "shipped" / "bad").exists()


def test_promote_gate_and_rollback(tiny, tmp_path):
    from chatbot.config import Settings

    s = Settings(model=tiny, data_dir=tmp_path, engine="transformers")
    o = adapter_options(s)
    reg = s.resolved_adapters_dir
    sha = model_fingerprint(tiny)
    a = _fake_adapter(reg, "a", sha, 2.0, 0.30, 0.90, "2026-01-01", base=tiny)
    worse = _fake_adapter(reg, "worse", sha, 2.1, 0.30, 0.90, "2026-01-02", base=tiny)
    c = _fake_adapter(reg, "c", sha, 1.9, 0.31, 0.95, "2026-01-03", base=tiny)
    other = _fake_adapter(reg, "other-base", "0" * 64, 1.0, 0.9, 1.0, "2026-01-04", base=tiny)
    bad_base = _fake_adapter(reg, "worse-than-base", sha, 3.5, 0.30, 0.90, "2026-01-05", base=tiny)

    # with nothing live the reference is the base model on the same splits
    with pytest.raises(AdapterError, match=r"refused \(compared with base\): val_loss 3.5000 is above"):
        promote("worse-than-base", o)
    d = promote("a", o, user="olga")
    assert d.ok and d.reference == "base" and live_adapter(o).version == a
    assert d.load_check.tensors == 8 and d.load_check.max_logit_change > 1e-4  # 2 layers x q,v x A,B
    assert not any("{" in line for line in d.sentences())  # plain sentences, no dicts
    assert d.sentences()[-1] == f"Verdict: {a} is not worse than the base model on the same held-out dialogues."
    # worse than the live one on validation loss: refused, the pointer does not move
    with pytest.raises(AdapterError, match=rf"refused \(compared with {a}\): val_loss 2.1000 is above"):
        promote("worse", o)
    assert read_live(o)["current"]["version"] == a
    with pytest.raises(AdapterError, match="trained on base model 'tiny'.*but the served model"):
        promote("other-base", o)
    with pytest.raises(AdapterError, match="already live"):
        promote(a, o)  # by version string
    assert promote("c", o).reference == a
    assert [x.version for x in list_adapters(o) if x.live] == [c]
    assert {x.version for x in list_adapters(o)} == {a, worse, c, other, bad_base}

    assert rollback(o).version == a
    assert rollback(o) is None and live_adapter(o) is None
    with pytest.raises(AdapterError, match="nothing to roll back: no adapter is live"):
        rollback(o)
    forced = promote("worse-than-base", o, force=True)
    assert forced.forced and not forced.ok and live_adapter(o).version == bad_base
    events = [e["action"] for e in read_live(o)["events"]]
    assert events == ["promote", "promote", "rollback", "rollback", "promote"]
    # the audit log beside LIVE.json: who, from which version to which, the gate's table
    import getpass

    audit = read_audit(o)
    me = getpass.getuser()
    assert [(e["action"], e["user"], e["from"], e["to"]) for e in audit] == [
        ("promote", "olga", None, a), ("promote", me, a, c), ("rollback", me, c, a), ("rollback", me, a, None),
        ("promote", me, None, bad_base)]
    assert [g["metric"] for g in audit[0]["gate"]] == ["val_loss", "rouge_l", "self_stop_rate"]
    assert audit[0]["gate"][0]["candidate"] == 2.0 and audit[0]["gate"][0]["reference"] == 3.0
    assert audit[-1]["forced"] is True
    assert audit_sentence(audit[2]).endswith(f"{me} (cli) rolled back {c} -> {a}")
    assert f"olga (cli) promoted the base model -> {a}" in audit_sentence(audit[0])


def test_a_promotion_that_raced_another_is_refused_and_loses_no_history(tiny, tmp_path, monkeypatch):
    """Two operators (or two servers on one registry) promote at once: the one whose checks ran against a live
    adapter that has since changed is refused, and LIVE.json keeps both earlier versions in its history."""
    from chatbot.config import Settings
    from finetune.adapters import gate

    s = Settings(model=tiny, data_dir=tmp_path, engine="transformers")
    o = adapter_options(s)
    reg = s.resolved_adapters_dir
    sha = model_fingerprint(tiny)
    a = _fake_adapter(reg, "a", sha, 2.0, 0.30, 0.90, "2026-01-01", base=tiny)
    b = _fake_adapter(reg, "b", sha, 1.9, 0.30, 0.90, "2026-01-02", base=tiny)
    c = _fake_adapter(reg, "c", sha, 1.8, 0.30, 0.90, "2026-01-03", base=tiny)
    promote("a", o)
    real_check = gate.check_adapter_loads

    def check_while_another_promotes(rec, options):
        if rec.version == b:  # the other operator's promotion of c lands while b is being checked
            promote("c", options)
        return real_check(rec, options)

    monkeypatch.setattr(gate, "check_adapter_loads", check_while_another_promotes)
    with pytest.raises(AdapterError, match=rf"live adapter changed to '{c}' while it was being checked against '{a}'"):
        promote("b", o)
    state = read_live(o)
    assert state["current"]["version"] == c and [h["version"] for h in state["history"]] == [a]
    assert [(e["from"], e["to"]) for e in read_audit(o)] == [(None, a), (a, c)]


def _rename_keys(folder: Path, old: str, new: str) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "adapter_model.safetensors"
    save_file({k.replace(old, new): v for k, v in load_file(str(f)).items()}, str(f))


@pytest.mark.parametrize("case, check, message", ids=["nonexistent_target", "renamed_keys", "rank_128", "zero_lora_b"],
                         argvalues=[
    ("nonexistent_target", "target_modules", r"targets module\(s\) \['nonexistent_proj'\] that the base model"),
    ("renamed_keys", "keys", r"8 of its 8 tensors match no module of the base model .*missing adapter keys"),
    ("rank_128", "rank", r"has LoRA rank 128, above the vLLM engine's max_lora_rank 64"),
    ("zero_lora_b", "no_effect", r"does not change the model: the largest logit change on the probe prompt is "
                                 r"0\.00e\+00 .*4 of its 4 lora_B tensors are all zero"),
])
def test_promote_refuses_an_adapter_that_does_not_load_or_does_nothing(tiny, tmp_path, case, check, message):
    """The issue's four adapters: each refused with the problem named, LIVE.json and the audit log unchanged."""
    from chatbot.config import Settings

    s = Settings(model=tiny, data_dir=tmp_path, engine="vllm", max_lora_rank=64)
    o = adapter_options(s)
    reg = s.resolved_adapters_dir
    sha = model_fingerprint(tiny)
    good = _fake_adapter(reg, "good", sha, 2.0, 0.30, 0.90, "2026-01-01", base=tiny)
    promote("good", o)
    before = (reg / "LIVE.json").read_bytes()
    _fake_adapter(reg, case, sha, 1.0, 0.9, 1.0, "2026-01-02", base=tiny, r=128 if case == "rank_128" else 4,
                  zero_b=case == "zero_lora_b")
    if case == "nonexistent_target":
        cfg = json.loads((reg / case / "adapter_config.json").read_text())
        cfg["target_modules"] = ["nonexistent_proj"]
        (reg / case / "adapter_config.json").write_text(json.dumps(cfg))
    elif case == "renamed_keys":
        _rename_keys(reg / case, ".layers.", ".blocks.")
    with pytest.raises(AdapterLoadError, match=message) as err:
        promote(case, o, force=True)  # --force skips the metric gate, never the load check
    assert err.value.check == check
    assert (reg / "LIVE.json").read_bytes() == before and live_adapter(o).version == good
    assert [e["to"] for e in read_audit(o)] == [good]


def test_cli_promote_refusal_exits_non_zero_with_the_reason(tiny, tmp_path, monkeypatch, capsys):
    from chatbot.cli import main

    monkeypatch.setenv("CHATBOT_MODEL", tiny)
    monkeypatch.setenv("CHATBOT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CHATBOT_ENGINE", "transformers")
    reg = tmp_path / "adapters"
    sha = model_fingerprint(tiny)
    _fake_adapter(reg, "zero", sha, 1.0, 0.9, 1.0, "2026-01-02", base=tiny, zero_b=True)
    good = _fake_adapter(reg, "good", sha, 2.0, 0.30, 0.90, "2026-01-01", base=tiny)
    assert main(["adapters", "promote", "zero", "--no-check"]) == 2
    err = capsys.readouterr().err
    assert "error: adapter 'zero-20260102-abcdef12' does not change the model" in err
    assert not (reg / "LIVE.json").exists()
    assert main(["adapters", "promote", "good", "--no-check"]) == 0
    out = capsys.readouterr().out
    assert "Verdict: " + good + " is not worse than the base model" in out and "{" not in out
    assert f"live adapter is now {good} (was none (base model))" in out
    # a candidate beside the live adapter, on the same held-out dialogues, in sentences
    assert main(["adapters", "list"]) == 0
    out = capsys.readouterr().out
    assert f"live: {good}" in out and "zero-20260102-abcdef12 beside the live model:" in out
    assert f"Validation loss: 1.0000 against 2.0000 for the live adapter {good} (lower is better; tolerance 0.01): " \
           "passes." in out
    assert main(["adapters", "history"]) == 0
    assert f"promoted the base model -> {good} (gate vs base: val_loss 2.0000 vs 3.0000 ok" in capsys.readouterr().out


@pytest.mark.slow
def test_merge_and_int8_export_match_the_unmerged_adapter(tiny, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chatbot.config import Settings
    from finetune.adapters.export import INT8_WEIGHTS, export_int8, load_int8, merge_adapter, quantize_int8

    s = Settings(model=tiny, data_dir=tmp_path)
    out = s.resolved_adapters_dir / "toy"
    cfg = SFTConfig(base_model=tiny, max_steps=3, batch_size=4, learning_rate=1e-2, eval_steps=0, eval_replies=2,
                    eval_max_new_tokens=4, max_length=96)
    train_sft(toy_dialogues(20), out, cfg, progress=False)
    merged_dir = merge_adapter("toy", tmp_path / "merged", adapter_options(s))
    ids = torch.tensor([[1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198]])
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(ids).logits
        unmerged = PeftModel.from_pretrained(base, str(out)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()(ids).logits
    assert not torch.allclose(unmerged, plain, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)

    report = export_int8("toy", tmp_path / "int8", adapter_options(s), measure=2)
    # safetensors, no pickle: loading runs no code and cannot trip over lazy modules
    assert (tmp_path / "int8" / INT8_WEIGHTS).read_bytes()[8:9] == b"{"
    q, _ = load_int8(tmp_path / "int8")
    fresh = quantize_int8(AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32))
    with torch.no_grad():
        qlogits = q(ids).logits
        assert torch.equal(qlogits, fresh(ids).logits)  # the saved int8 weights round-trip exactly
    # int8 weights: close to the fp32 merged model (same argmax on most positions)
    agree = (qlogits.argmax(-1) == merged.argmax(-1)).float().mean().item()
    assert agree >= 0.8
    comp = report["comparison"]
    assert set(comp) >= {"unmerged", "merged_fp32", "int8"}
    # every linear layer is int8 (the tiny model is mostly its fp32 embedding table, so no size claim here)
    assert q.model.layers[0].self_attn.q_proj._get_name() == "DynamicQuantizedLinear"
    assert q.lm_head._get_name() == "DynamicQuantizedLinear" and comp["int8"]["size_mb"] > 0
    assert comp["unmerged"]["val_loss"] == pytest.approx(comp["merged_fp32"]["val_loss"], rel=1e-4)
    assert comp["int8"]["new_tokens_per_s"] > 0
