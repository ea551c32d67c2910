"""A chat template rendered message by message (`SegmentedTemplate`) gives exactly the full render, and
the HF tokenizer's ids from those pieces are exactly the ids of the full text; templates that do not
render message by message are found out and rendered whole."""

from __future__ import annotations

import random

import pytest

from router.features.chat_segments import SegmentedTemplate
from router.features.tokenize import HFTokens, Segments

jinja2 = pytest.importorskip("jinja2")

WORDS = ["alpha", "beta", " ", "\n", "ünï", "→", "<|im_start|>", "<|im_end|>", "tool", "42", "  ", "\x00"]


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) for _ in range(n))


def random_session(rng: random.Random, turns: int) -> list[list[dict]]:
    """The successive bodies of one chat: each the last one plus a reply and a new message (some
    messages repeat earlier ones verbatim, as short answers do)."""
    msgs = [{"role": "system", "content": random_text(rng, 20)}] if rng.random() < 0.7 else []
    chats = []
    for _ in range(turns):
        for role in ("user", "assistant") if msgs and msgs[-1]["role"] == "user" else ("user",):
            msgs = msgs + [{"role": role, "content": rng.choice(["ok", random_text(rng, rng.randrange(0, 30))])}]
        if msgs[-1]["role"] != "user":
            msgs = msgs + [{"role": "user", "content": random_text(rng, rng.randrange(1, 30))}]
        chats.append(msgs)
    return chats


def jinja_render(template: str):
    compiled = jinja2.Environment().from_string(template)

    def raise_exception(message):
        raise ValueError(message)

    def render(messages, gen):
        return compiled.render(messages=messages, add_generation_prompt=gen, bos_token="<s>",
                               raise_exception=raise_exception)

    return render


CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LAST_AWARE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% if loop.last %}<end>{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('roles must alternate') }}{% endif %}<{{ m['role'] }}>{{ m['content'] }}"
               "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.mark.parametrize("template", [CHATML, LAST_AWARE, ALTERNATING])
def test_pieces_join_to_the_full_render_or_are_not_offered(template):
    render = jinja_render(template)
    segmented = SegmentedTemplate(render, cache_messages=64)
    rng = random.Random(0)
    offered = 0
    for _ in range(30):
        for msgs in random_session(rng, 6):
            try:
                full = render(msgs, True)
            except ValueError:
                full = None
            pieces = segmented.segments(msgs)
            if pieces is not None:
                offered += 1
                assert "".join(pieces) == full
    assert (offered > 0) == (template == CHATML)  # the others look at loop.last / positions: found out


def test_a_template_caught_differing_on_a_real_chat_is_turned_off():
    calls = []

    def render(messages, gen):  # message by message on the samples, but not once a chat says "switch"
        calls.append(1)
        if any(m["content"] == "switch" for m in messages):
            return "whole"
        return jinja_render(CHATML)(messages, gen)

    segmented = SegmentedTemplate(render)
    assert segmented.enabled
    assert segmented.segments([{"role": "user", "content": "switch"}]) is None
    assert not segmented.enabled


@pytest.fixture(scope="module")
def hf() -> HFTokens:
    pytest.importorskip("transformers")
    from engine_server.tiny_model import build_tokenizer

    return HFTokens(build_tokenizer())


def test_the_tiny_models_template_renders_message_by_message(hf):
    assert hf.segmented.enabled and hf.pieces_exact


@pytest.mark.parametrize("seed", range(3))
def test_hf_ids_from_pieces_equal_the_full_render_and_encode_on_random_chats(hf, seed):
    rng = random.Random(seed)
    for _ in range(8):
        for msgs in random_session(rng, 6):
            body = {"messages": msgs}
            rendered = hf.render(body, "chat")
            assert isinstance(rendered, Segments)
            text = hf.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            assert "".join(rendered) == text
            expected = list(hf.tok.encode(text, add_special_tokens=not text.startswith(hf.tok.bos_token)))
            assert hf.encode_rendered(rendered) == expected
            assert hf.prompt_ids(body, "chat") == expected


def test_chats_the_pieces_do_not_cover_are_rendered_whole(hf):
    with_tools = {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}
    named = {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}
    for body in (with_tools, named):
        assert not isinstance(hf.render(body, "chat"), Segments)


def interleaved_chats(rng: random.Random, sessions: int, turns: int) -> list[list[dict]]:
    """Several sessions' bodies, interleaved; some re-send an earlier turn, some edit a message of their
    history (a recent chat's pieces must then not be taken for it) or add a message with extra fields."""
    out = []
    runs = [random_session(rng, turns) for _ in range(sessions)]
    for t in range(turns):
        for run in runs:
            msgs = run[t]
            pick = rng.random()
            if pick < 0.15 and t:
                msgs = run[t - 1]
            elif pick < 0.3 and len(msgs) > 1:
                at = rng.randrange(len(msgs) - 1)
                msgs = [*msgs[:at], {**msgs[at], "content": msgs[at]["content"] + "!"}, *msgs[at + 1 :]]
            elif pick < 0.35:
                msgs = [*msgs, {"role": "user", "content": "x", "name": "bob"}]
            out.append(msgs)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_chats_extending_recent_ones_get_the_pieces_a_fresh_template_gives(seed):
    render = jinja_render(CHATML)
    kept = SegmentedTemplate(render)  # keeps recent chats
    for msgs in interleaved_chats(random.Random(seed), 4, 8):
        assert kept.segments(msgs) == SegmentedTemplate(render).segments(msgs)


@pytest.mark.parametrize("seed", range(2))
def test_hf_ids_of_chats_extending_recent_ones_equal_the_full_render_and_encode(hf, seed):
    for msgs in interleaved_chats(random.Random(10 + seed), 4, 8):
        text = hf.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        expected = list(hf.tok.encode(text, add_special_tokens=not text.startswith(hf.tok.bos_token)))
        assert hf.prompt_ids({"messages": msgs}, "chat") == expected
