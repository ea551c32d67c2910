"""The simulated vLLM replica ("sim" backend): paged prefix cache, continuous batching, step-time model.

`scheduler` (with `kv_cache`, `timing`, `tokenizer`) is a pure, clock-free core that an offline
discrete-event simulator can drive in virtual time; `backend.SimBackend` runs it in real time behind the
engine server's `Backend` interface. See docs/sim_engine.md.
"""

from engine_server.sim.backend import SimBackend, SimConfig
from engine_server.sim.faults import FaultConfig
from engine_server.sim.kv_cache import KVCache
from engine_server.sim.scheduler import RequestOutput, Scheduler, SchedulerConfig, SimRequest, StepResult
from engine_server.sim.timing import PROFILES, TimingProfile, get_profile
from engine_server.sim.tokenizer import SimTokenizer

__all__ = [
    "PROFILES",
    "FaultConfig",
    "KVCache",
    "RequestOutput",
    "Scheduler",
    "SchedulerConfig",
    "SimBackend",
    "SimConfig",
    "SimRequest",
    "SimTokenizer",
    "StepResult",
    "TimingProfile",
    "get_profile",
]
