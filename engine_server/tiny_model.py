"""Generate a tiny, random, Llama-architecture model that vLLM can serve, without downloading anything.

The weights are random (the text it writes is gibberish); what matters is that it exercises the real
engine end to end: tokenizer, chat template, paged KV cache, prefix caching, scheduling. The same seed
gives byte-identical `model.safetensors` and `tokenizer.json`, so benchmark runs are reproducible.

    python -m engine_server.tiny_model ./models/tiny-llama [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VOCAB_SIZE = 2048
BOS, EOS, IM_START, IM_END, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END, PAD]

# Tokenizer training text: plain English plus the shapes of chat and tool traffic, so common words and
# JSON punctuation become single tokens (prompts then tokenize to realistic lengths, ~4 chars a token).
CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.
A router sends each request to the replica that already holds the longest matching prefix in its cache.
When the cache is cold, the engine must compute attention over every prompt token before it can decode.
Prefix caching stores key and value blocks so that repeated system prompts are not computed twice.
The scheduler batches running sequences together and adds waiting requests when memory allows.
Each block holds sixteen tokens, and a block is shared when two prompts begin with the same text.
Please summarize the following document in three sentences and list the main points as bullets.
You are a helpful assistant. Answer the question briefly, politely, and with accurate information.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
How many days are there in a week? There are seven days in a week, from Monday to Sunday.
Translate the sentence into German, then explain the grammar of the verb in simple words.
Write a short poem about the ocean, the wind, the stars, and a small boat that sails at night.
The weather today is sunny with a light breeze, and tomorrow there may be rain in the evening.
Our team meets every morning to review the plan, discuss problems, and decide what to build next.
She opened the book, read the first chapter slowly, and wrote notes in the margin with a pencil.
The function returns a list of numbers sorted from smallest to largest, or an empty list on error.
def main(args): return sum(x * x for x in args if x > 0)  # square the positive values and add them
import json; data = json.loads(text); print(data["name"], data["value"], data.get("items", []))
{"name": "get_weather", "description": "Get the current weather", "parameters": {"type": "object"}}
{"role": "user", "content": "What is the weather in Berlin?"} {"role": "assistant", "content": null}
{"location": "Berlin", "unit": "celsius", "temperature": 21, "conditions": "partly cloudy"}
The model generates one token at a time, and each new token attends to all of the previous ones.
Latency matters to users: time to first token, time per output token, and the total request time.
Throughput is measured in tokens per second across all requests served by the fleet of replicas.
If a replica fails, the router retries the request on another healthy replica and marks it down.
Load balancing by queue length alone ignores the cache, so hit rates fall as the fleet grows larger.
Consistent hashing keeps a session on the same replica, but hot sessions can overload one machine.
The experiment compares random routing, round robin, least loaded, and prefix aware routing.
Results show that prefix aware routing reduces prefill work and improves tail latency under load.
In the spring the garden fills with flowers, bees, and birds that sing from early morning until dusk.
My grandmother baked bread every Sunday, and the whole house smelled of flour, butter, and honey.
The train leaves the station at nine o'clock, crosses the mountains, and arrives by the sea at noon.
Children played football in the park, laughing and shouting, until their parents called them home.
Science explains the world with experiments, measurements, careful reasoning, and honest doubt.
History teaches us how people lived, what they believed, and why their choices still matter today.
Mathematics studies numbers, shapes, patterns, and the logical rules that connect them together.
Computers follow instructions written in programming languages such as Python, C, Rust, and Go.
Networks carry packets between machines; a slow link or a lost packet can delay the whole response.
Memory is limited, so old cache entries are evicted when new requests need space for their blocks.
Thank you for your message. I will look into the issue and get back to you as soon as possible.
Error: the request could not be completed because the prompt is longer than the maximum length.
Step one: read the input. Step two: check the values. Step three: write the output and finish.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday; January, February, March, April.
One, two, three, four, five, six, seven, eight, nine, ten, hundred, thousand, million, billion.
0 1 2 3 4 5 6 7 8 9 10 12 16 32 64 128 256 512 1024 2048 4096 3.14 0.5 1e-3 100% $20 #1 @user
Red, orange, yellow, green, blue, and violet are the colors of the rainbow after a summer storm.
The doctor asked the patient to rest, drink water, and come back next week for another check.
A good explanation starts with a simple example, then builds toward the general idea step by step.
<|im_start|>system You are a helpful assistant.<|im_end|> <|im_start|>user Hello!<|im_end|>
<|im_start|>assistant Hello! How can I help you today?<|im_end|> <tool_call> </tool_call>
"""

# ChatML with a BOS in front (as Llama 3 does). Handles system/user/assistant/tool roles, assistant
# tool calls, an optional tool list and add_generation_prompt. Content is expected as a string.
CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- if tools -%}
<|im_start|>system
{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}# Tools
You may call one or more functions. Available functions:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}Reply with <tool_call>{"name": ..., "arguments": ...}</tool_call> to call one.<|im_end|>
{% set loop_messages = messages[1:] if messages and messages[0]['role'] == 'system' else messages -%}
{%- else -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
<|im_start|>{{ message['role'] }}
{% if message['content'] is string %}{{ message['content'] }}{% elif message['content'] %}\
{% for part in message['content'] %}{{ part['text'] if part['text'] is defined else '' }}{% endfor %}{% endif %}\
{% if message['tool_calls'] is defined and message['tool_calls'] %}{% for call in message['tool_calls'] %}
<tool_call>{"name": {{ call['function']['name'] | tojson }}, "arguments": {{ call['function']['arguments'] \
if call['function']['arguments'] is string else call['function']['arguments'] | tojson }}}</tool_call>\
{% endfor %}{% endif %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""


def build_tokenizer() -> object:
    """Train a byte-level BPE (GPT-2 style) and wrap it as a transformers fast tokenizer.

    Padded to exactly VOCAB_SIZE with reserved special tokens (as Llama 3 does), so the vocabulary
    size does not depend on how many merges the small corpus happens to yield.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    missing = VOCAB_SIZE - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=IM_END,  # chat turns end here; <|end_of_text|> also stops (generation_config)
        pad_token=PAD,
        additional_special_tokens=[IM_START, EOS],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def generate(outdir: str | Path, seed: int = 0) -> Path:
    """Write config, bf16 safetensors weights (~6 MB), tokenizer and generation config to `outdir`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=ids[BOS],
        eos_token_id=[ids[IM_END], ids[EOS]],
        pad_token_id=ids[PAD],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[IM_END], ids[EOS]], pad_token_id=ids[PAD],
        do_sample=True, temperature=1.0, top_p=1.0,
    )
    hf_logging.disable_progress_bar()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Name the generic fast-tokenizer class: transformers 4.x does not know v5's "TokenizersBackend".
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; the model dir is meant to be shared
    (out / "tiny_model.json").write_text(json.dumps({"generator": "engine_server.tiny_model", "seed": seed}) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine_server.tiny_model", description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", help="directory to write the model into (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    args = p.parse_args(argv)
    print(generate(args.outdir, args.seed).resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
