"""The tiny model generator: deterministic, loadable, and shaped the way the vLLM tests expect."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from engine_server.tiny_model import BOS, IM_END, VOCAB_SIZE, generate  # noqa: E402


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_same_seed_gives_identical_files(tiny: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert _sha(tiny / name) == _sha(again / name), name


def test_other_seed_changes_weights_only(tiny: Path, tmp_path: Path) -> None:
    other = generate(tmp_path / "other", seed=1)
    assert _sha(tiny / "model.safetensors") != _sha(other / "model.safetensors")
    assert _sha(tiny / "tokenizer.json") == _sha(other / "tokenizer.json")


def test_shape_and_size(tiny: Path) -> None:
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["vocab_size"] == VOCAB_SIZE
    assert cfg["max_position_embeddings"] == 4096
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (256, 4, 4)
    assert 3_000_000 < (tiny / "model.safetensors").stat().st_size < 8_000_000
    assert (tiny / "generation_config.json").exists()


def test_tokenizer_and_chat_template(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    assert len(tok) == VOCAB_SIZE
    ids = tok("The quick brown fox").input_ids
    assert ids[0] == tok.convert_tokens_to_ids(BOS) and len(ids) < 10
    assert tok.decode(ids, skip_special_tokens=True) == "The quick brown fox"

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Berlin?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Berlin"}'}},
        ]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "c1"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text.startswith(BOS + "<|im_start|>system\nBe brief.")
    for needle in ("get_weather", "Weather in Berlin?", '"city": "Berlin"', "<|im_start|>tool\n{\"temp\": 21}"):
        assert needle in text
    assert text.endswith("<|im_start|>assistant\n")
    plain = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=False)
    assert plain == f"{BOS}<|im_start|>user\nWeather in Berlin?{IM_END}\n"
