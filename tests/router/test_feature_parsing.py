"""Request bodies become RequestFeatures; bad shapes become FeatureError naming the parameter."""

import pytest

from router.features import FeatureError, HashingConfig, chat_prompt_text, features_from_body

H = HashingConfig()
SYSTEM = "You are a helpful assistant. " * 20


def chat(messages, **extra):
    return features_from_body({"model": "m", "messages": messages, **extra}, "chat", "rid", H)


def test_chat_features_carry_the_request_basics():
    f = chat([{"role": "user", "content": "x" * 400}], max_tokens=7, stream=True)
    assert (f.request_id, f.model, f.kind, f.max_tokens, f.stream) == ("rid", "m", "chat", 7, True)
    assert f.prompt_chars == len(chat_prompt_text([{"role": "user", "content": "x" * 400}]))
    assert f.token_estimate == -(-f.prompt_chars // 4)
    assert f.block_chars == 64 and f.block_tokens == 16.0
    assert len(f.block_hashes) == f.prompt_chars // 64


def test_a_later_turn_extends_the_block_chain_of_the_earlier_turn():
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "first question " * 10}]
    turn2 = [*turn1, {"role": "assistant", "content": "an answer " * 10}, {"role": "user", "content": "more"}]
    a, b = chat(turn1), chat(turn2)
    assert chat_prompt_text(turn2).startswith(chat_prompt_text(turn1))
    assert b.block_hashes[: len(a.block_hashes)] == a.block_hashes
    assert len(b.block_hashes) > len(a.block_hashes)


def test_every_message_counts_not_just_the_first_or_last():
    base = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "q" * 200}]
    middle_differs = [base[0], {"role": "user", "content": "Q" * 200}]
    assert (
        chat(base + [{"role": "user", "content": "tail"}]).block_hashes
        != chat(middle_differs + [{"role": "user", "content": "tail"}]).block_hashes
    )


def test_text_parts_read_like_string_content():
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]
    assert "hello \nworld" in chat_prompt_text([{"role": "user", "content": parts}])


def test_non_text_parts_keep_different_media_apart():
    def img(url):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]

    assert chat_prompt_text(img("http://a/1.png")) != chat_prompt_text(img("http://a/2.png"))


def test_tool_calls_and_tool_results_are_part_of_the_prompt():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    text = chat_prompt_text(
        [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ]
    )
    assert '"name":"f"' in text and "<tool_call_id>c1" in text and "42" in text


def test_tools_come_first_so_turns_stay_prefix_stable():
    tools = [{"type": "function", "function": {"name": "lookup"}}]
    text = chat_prompt_text([{"role": "user", "content": "hi"}], tools)
    assert text.startswith("<tools>") and "lookup" in text


def test_max_completion_tokens_wins_over_max_tokens():
    f = chat([{"role": "user", "content": "hi"}], max_tokens=5, max_completion_tokens=9)
    assert f.max_tokens == 9


def test_a_completion_string_prompt_is_hashed_as_text():
    f = features_from_body({"model": "m", "prompt": "p" * 130}, "completion", "r", H)
    assert (f.kind, f.prompt_chars, f.token_estimate, len(f.block_hashes)) == ("completion", 130, 33, 2)


def test_a_batch_hashes_its_first_prompt_and_counts_all():
    batch = features_from_body({"model": "m", "prompt": ["a" * 128, "b" * 256]}, "completion", "r", H)
    first = features_from_body({"model": "m", "prompt": "a" * 128}, "completion", "r", H)
    assert batch.block_hashes == first.block_hashes
    assert batch.prompt_chars == 384 and batch.token_estimate == 96


def test_token_id_prompts_are_hashed_as_ids_with_an_exact_count():
    f = features_from_body({"model": "m", "prompt": list(range(40))}, "completion", "r", H)
    assert (f.prompt_chars, f.token_estimate, len(f.block_hashes)) == (0, 40, 2)
    batch = features_from_body({"model": "m", "prompt": [list(range(40)), [1, 2]]}, "completion", "r", H)
    assert batch.block_hashes == f.block_hashes and batch.token_estimate == 42


def test_the_tokenizer_hook_makes_blocks_of_tokens():
    words = HashingConfig(tokenizer=lambda s: [len(w) for w in s.split()])
    f = features_from_body({"model": "m", "prompt": "a bb " * 20}, "completion", "r", words)
    assert f.token_estimate == 40 and len(f.block_hashes) == 2 and f.block_tokens == 16.0


def test_an_explicit_affinity_key_wins_over_the_user_field():
    body = {"model": "m", "prompt": "x", "user": "alice"}
    assert features_from_body(body, "completion", "r", H).affinity_key == "alice"
    assert features_from_body(body, "completion", "r", H, affinity_key="s1").affinity_key == "s1"
    assert features_from_body({"model": "m", "prompt": "x"}, "completion", "r", H).affinity_key is None


@pytest.mark.parametrize(
    ("body", "kind", "param"),
    [
        ([], "chat", None),
        ({"messages": [{"role": "user", "content": "x"}]}, "chat", "model"),
        ({"model": "", "prompt": "x"}, "completion", "model"),
        ({"model": "m"}, "chat", "messages"),
        ({"model": "m", "messages": []}, "chat", "messages"),
        ({"model": "m", "messages": ["hi"]}, "chat", "messages[0]"),
        ({"model": "m", "messages": [{"content": "x"}]}, "chat", "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "chat", "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": ["x"]}]}, "chat", "messages[0].content[0]"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "chat",
            "messages[0].content[0].text",
        ),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "completion", "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": True}, "completion", "max_tokens"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "completion", "stream"),
        ({"model": "m"}, "completion", "prompt"),
        ({"model": "m", "prompt": []}, "completion", "prompt"),
        ({"model": "m", "prompt": ["a", 1]}, "completion", "prompt"),
        ({"model": "m", "prompt": [1, -2]}, "completion", "prompt"),
        ({"model": "m", "prompt": [[1], []]}, "completion", "prompt[1]"),
    ],
)
def test_bad_shapes_raise_a_feature_error_naming_the_parameter(body, kind, param):
    with pytest.raises(FeatureError) as err:
        features_from_body(body, kind, "r", H)
    assert err.value.param == param
    assert err.value.message
