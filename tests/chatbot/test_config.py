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
