"""What a user chooses about memory (mode, budgets, transition), and the policy and sampler config it makes.

`MemorySettings` is an immutable value (ComfyUI passes it between nodes and may reuse it); each run builds a fresh,
stateful policy from it with `build_memory`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import CacheConfig
from ..pipeline import SamplerConfig
from ..story.entities import EntityRegistry
from ..transition import STRATEGIES, TransitionConfig
from . import MemoryPolicy, NoMemory
from .memflow import MemFlowMemory

MODES = ("identity", "memflow", "none")


@dataclass(frozen=True)
class MemorySettings:
    mode: str = "identity"  # IAMFlow identity memory, the MemFlow bank, or none (LongLive)
    max_frames: int = 4  # identity: memory frames injected at most
    min_frames_multi_entity: int = 2  # identity: at least this many when a prompt has two or more entities
    bank_size: int = 3  # memflow
    record_interval: int = 3  # memflow: capture a frame every this many chunks
    sparse_topk: int = 0  # >0: each head attends only to its top-k sink/memory frames (sparse activation)
    transition: str = "soft"
    visual_weight: float = 0.3  # identity: weight of the verifier's visual score in frame choice
    archive_limit_mb: int = 2048  # identity: host memory for archived frames
    # identity: the longest the loop waits for a late verdict when choosing a chunk's frame, in seconds (a later
    # verdict still corrects attributes). None: 5 % of the sampler's chunk time, so a slow verifier costs at most that.
    verifier_wait: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown memory mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.transition not in STRATEGIES:
            raise ValueError(f"unknown transition {self.transition!r}; choose one of {', '.join(STRATEGIES)}")
        if not 1 <= self.max_frames <= 16 or not 1 <= self.bank_size <= 16:
            raise ValueError(f"max_frames and bank_size must be in 1..16, got {self.max_frames}, {self.bank_size}")
        if not 0 <= self.min_frames_multi_entity <= self.max_frames:
            raise ValueError(
                f"min_frames_multi_entity {self.min_frames_multi_entity} must be in 0..max_frames ({self.max_frames})"
            )
        if not 0.0 <= self.visual_weight <= 1.0:
            raise ValueError(f"visual_weight must be in [0, 1], got {self.visual_weight}")
        if self.verifier_wait is not None and not 0.0 <= self.verifier_wait <= 600.0:
            raise ValueError(f"verifier_wait must be in [0, 600] seconds, got {self.verifier_wait}")
        if self.sparse_topk < 0 or self.record_interval < 1 or self.archive_limit_mb < 1:
            raise ValueError("sparse_topk must be >= 0, record_interval and archive_limit_mb >= 1")

    @property
    def memory_frames(self) -> int:
        return {"identity": self.max_frames, "memflow": self.bank_size, "none": 0}[self.mode]


IAMFLOW = MemorySettings()  # identity memory + soft transition (+ the async verifier when one is given)
MEMFLOW = MemorySettings(mode="memflow", transition="recache")
LONGLIVE = MemorySettings(mode="none", transition="recache")


def sampler_config(settings: MemorySettings, height: int = 480, width: int = 832, seed: int = 0) -> SamplerConfig:
    cache = CacheConfig(memory_frames=settings.memory_frames, sparse_topk=settings.sparse_topk)
    return SamplerConfig(height, width, seed=seed, cache=cache, transition=TransitionConfig(settings.transition))


def build_memory(
    settings: MemorySettings, registry: EntityRegistry | None = None, verifier: Any = None
) -> MemoryPolicy:
    """A fresh policy for one run. registry: entities per prompt (identity mode; None = no LLM: prompt relevance
    only). verifier: an `AsyncVerifier`/`ImmediateVerifier` or None (no visual scores)."""
    if settings.mode == "memflow":
        return MemFlowMemory(bank_size=settings.bank_size, record_interval=settings.record_interval)
    if settings.mode == "none":
        return NoMemory()
    from .identity import IdentityMemory

    return IdentityMemory(
        registry,
        verifier=verifier,
        max_frames=settings.max_frames,
        min_frames_multi_entity=settings.min_frames_multi_entity,
        visual_weight=settings.visual_weight,
        archive_limit_bytes=settings.archive_limit_mb * 2**20,
        verifier_wait=settings.verifier_wait,
    )
