"""Settings: env prefix, TOML file, and errors that name the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from chatbot.config import Settings


def test_env_prefix(monkeypatch):
    monkeypatch.setenv("CHATBOT_PORT", "8123")
    monkeypatch.setenv("CHATBOT_TOP_K", "7")
    s = Settings()
    assert (s.port, s.top_k) == (8123, 7)


def test_toml_file(monkeypatch, tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('max_new_tokens = 64\nsystem_prompt = "Be brief."\n')
    monkeypatch.setenv("CHATBOT_CONFIG", str(f))
    s = Settings()
    assert s.max_new_tokens == 64 and s.system_prompt == "Be brief."
    assert s.prompt_budget_tokens == s.max_model_len - 64


@pytest.mark.parametrize("kw,needle", [({"top_k": 0}, "top_k"), ({"port": 70000}, "port"),
                                       ({"max_new_tokens": 4096, "max_model_len": 2048}, "max_new_tokens"),
                                       ({"chunk_tokens": 50, "chunk_overlap": 50}, "chunk_overlap")])
def test_bad_values_name_the_field(kw, needle):
    with pytest.raises(ValidationError, match=needle):
        Settings(**kw)


def test_vllm_dtype_and_lora_defaults_follow_the_hardware_and_the_registry(tmp_path):
    import json

    from chatbot.adapter_watch import lora_enabled
    from chatbot.config import Settings
    from chatbot.engines import cpu_has_native_bf16, vllm_dtype

    avx512 = "flags : fpu sse2 avx2 avx512f avx512_vnni fma"
    sapphire = avx512 + " avx512_bf16 amx_bf16 amx_tile"
    assert (cpu_has_native_bf16(avx512), cpu_has_native_bf16(sapphire)) == (False, True)
    assert vllm_dtype("auto", cuda=False, cpuinfo=avx512) == "float32"
    assert vllm_dtype("auto", cuda=False, cpuinfo=sapphire) == "bfloat16"
    assert vllm_dtype("auto", cuda=True, cpuinfo=avx512) == "bfloat16"
    assert vllm_dtype("float16", cuda=False, cpuinfo=avx512) == "float16"

    s = Settings(data_dir=tmp_path)
    assert s.enable_lora is None and lora_enabled(s) is False  # empty registry: no LoRA overhead
    assert lora_enabled(Settings(data_dir=tmp_path, enable_lora=True)) is True
    d = s.resolved_adapters_dir / "a1"
    d.mkdir(parents=True)
    (d / "adapter.json").write_text(json.dumps({
        "name": "a1", "version": "a1-1", "kind": "peft-lora", "created_at": "2026-01-01T00:00:00Z",
        "base_model": {"id": "m", "sha256": "x"}, "metrics": {}}))
    assert lora_enabled(s) is False  # the default serves the live adapter merged: no LoRA support needed
    assert lora_enabled(Settings(data_dir=tmp_path, adapter_serving="lora")) is True
    assert lora_enabled(Settings(data_dir=tmp_path, enable_lora=False, adapter_serving="lora")) is False
