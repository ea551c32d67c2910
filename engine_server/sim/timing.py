"""Step-time model: how long one engine step (one forward pass over a mixed batch) takes.

A step's cost is linear in what it computes, which is the form of BLIS's fitted model
(`beta0 + beta1 * uncached prefill tokens + beta2 * decode tokens`) and is accurate enough for routing
studies: what a router changes is how many prompt tokens must be computed (cache hits are free) and how
requests queue, not the fine structure of kernels. Cached prompt tokens never reach this model.

    step = step_overhead
         + prefill_overhead (if any prefill) + prefill_per_token * prefill tokens
         + decode_overhead (if any decode)   + decode_per_seq * decode sequences
    step *= 1 + kv_slowdown * kv usage        (attention reads grow with resident context)

Each profile also carries the engine shape it was measured with (KV blocks, batch limits, context), used
as defaults by `SimConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class TimingProfile:
    name: str
    description: str
    step_overhead_s: float = 0.0  # fixed cost of every non-empty step (scheduling, launch, sampling)
    prefill_overhead_s: float = 0.0  # extra once per step that contains prefill work
    prefill_per_token_s: float = 0.0  # per uncached prompt token computed
    decode_overhead_s: float = 0.0  # extra once per step that contains decode work
    decode_per_seq_s: float = 0.0  # per sequence decoding one token
    kv_slowdown: float = 0.0  # relative slowdown at 100% KV usage
    num_blocks: int = 16_384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192

    def step_time_s(self, prefill_tokens: int, decode_seqs: int, kv_usage: float = 0.0) -> float:
        """Model seconds for one step computing `prefill_tokens` prompt tokens and `decode_seqs` decodes."""
        if prefill_tokens <= 0 and decode_seqs <= 0:
            return 0.0
        t = self.step_overhead_s
        if prefill_tokens > 0:
            t += self.prefill_overhead_s + self.prefill_per_token_s * prefill_tokens
        if decode_seqs > 0:
            t += self.decode_overhead_s + self.decode_per_seq_s * decode_seqs
        return t * (1.0 + self.kv_slowdown * min(max(kv_usage, 0.0), 1.0))

    def cost_constants(self) -> dict[str, float]:
        """The cost policy's four time constants this profile truly has (`router.calibration`): a
        prefill's fixed time, time per prefill token, per running sequence, and of a decode step."""
        return {"request_overhead_s": self.step_overhead_s + self.prefill_overhead_s,
                "prefill_s_per_token": self.prefill_per_token_s,
                "decode_s_per_seq": self.decode_per_seq_s,
                "decode_step_s": self.step_overhead_s + self.decode_overhead_s}


US = 1e-6
MS = 1e-3

PROFILES: dict[str, TimingProfile] = {
    p.name: p
    for p in (
        TimingProfile(
            name="h100-llama3-8b",
            description="Llama-3-8B on one H100 (BLIS blackbox fit: 5752.7us + 17.25us/prefill tok + "
            "6.00us/decode tok). 25,000 blocks ~= 400k tokens: (80 GB x 0.9 - 16 GB weights - ~3 GB "
            "activations) / 128 KiB per token (32 layers x 8 KV heads x 128 dims x 2 x bf16).",
            step_overhead_s=5752.7 * US,
            prefill_per_token_s=17.25 * US,
            decode_per_seq_s=6.00 * US,
            num_blocks=25_000,
            max_num_seqs=256,
            max_num_batched_tokens=8192,
            max_model_len=8192,
        ),
        TimingProfile(
            name="llmd-8b",
            description="llm-d-inference-sim style latency for an 8B model: 30 ms + 250 us per uncached "
            "prompt token to first token, 12 ms per decode step; small engine (16 seqs, 1024 blocks).",
            prefill_overhead_s=30 * MS,
            prefill_per_token_s=250 * US,
            decode_overhead_s=12 * MS,
            num_blocks=1024,
            max_num_seqs=16,
            max_num_batched_tokens=4096,
            max_model_len=4096,
        ),
        TimingProfile(
            # Fitted by `python -m benchmarks.calibrate` (benchmarks/results/calibration-tiny-cpu.json):
            # the project's tiny random Llama on vLLM CPU, float32, eager, one compute thread, R^2 0.95.
            # vLLM CPU uses 8192 blocks of 32 tokens there; the same capacity in 16-token blocks is 16384.
            name="tiny-cpu",
            description="the project's tiny Llama on vLLM CPU (fitted): 10.55 ms/step + 188 us/prefill tok "
            "+ 0.194 ms/decode seq.",
            step_overhead_s=10.55 * MS,
            prefill_per_token_s=0.1882 * MS,
            decode_per_seq_s=0.194 * MS,
            num_blocks=16_384,
            max_num_seqs=64,
            max_num_batched_tokens=2048,
            max_model_len=2048,
        ),
        # The calibration matrix (benchmarks/matrix.py): engines that differ from the cost model's H100
        # defaults in every direction. Nothing in the router is tuned to them.
        TimingProfile(
            name="slow-prefill",
            description="prefill 23x the H100 fit per token (400 us), cheap steps (4 ms) and decodes.",
            step_overhead_s=4 * MS,
            prefill_per_token_s=400 * US,
            decode_per_seq_s=6 * US,
            num_blocks=16_384,
            max_num_seqs=64,
            max_num_batched_tokens=4096,
            max_model_len=8192,
        ),
        TimingProfile(
            name="slow-decode",
            description="every running sequence adds 1.5 ms to a step (250x the H100 fit); prefill as H100.",
            step_overhead_s=8 * MS,
            prefill_per_token_s=20 * US,
            decode_per_seq_s=1.5 * MS,
            num_blocks=16_384,
            max_num_seqs=64,
            max_num_batched_tokens=4096,
            max_model_len=8192,
        ),
        TimingProfile(
            name="tiny-seqs",
            description="llmd-8b timing with at most 4 running sequences: requests wait for a slot.",
            prefill_overhead_s=30 * MS,
            prefill_per_token_s=250 * US,
            decode_overhead_s=12 * MS,
            num_blocks=1024,
            max_num_seqs=4,
            max_num_batched_tokens=4096,
            max_model_len=4096,
        ),
        TimingProfile(
            name="unbatched",
            description="decode barely batched (8 ms per running sequence, 1 ms per step, 150 us per "
            "prefill token) and at most 8 running sequences: a CPU-like engine.",
            step_overhead_s=1 * MS,
            prefill_per_token_s=150 * US,
            decode_per_seq_s=8 * MS,
            num_blocks=16_384,
            max_num_seqs=8,
            max_num_batched_tokens=4096,
            max_model_len=8192,
        ),
        TimingProfile(
            name="instant",
            description="zero step time: only scheduling and cache effects remain (router-overhead runs).",
            num_blocks=16_384,
            max_num_seqs=256,
            max_num_batched_tokens=8192,
            max_model_len=8192,
        ),
    )
}


def slowed(profile: TimingProfile, factor: float) -> TimingProfile:
    """The same engine ``factor`` times slower in every timing term (an older GPU of the same shape)."""
    return replace(profile, name=f"{profile.name}-x{factor:g}",
                   description=f"{profile.name}, every time {factor:g}x",
                   step_overhead_s=profile.step_overhead_s * factor,
                   prefill_overhead_s=profile.prefill_overhead_s * factor,
                   prefill_per_token_s=profile.prefill_per_token_s * factor,
                   decode_overhead_s=profile.decode_overhead_s * factor,
                   decode_per_seq_s=profile.decode_per_seq_s * factor)


def get_profile(name: str) -> TimingProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown sim profile {name!r}; choose from {', '.join(PROFILES)}") from None
