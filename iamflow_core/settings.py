"""What a user chooses about a run, in one place: the memory settings, the presets, and what they build.

`MemorySettings` is the one home of every memory, transition and verifier option: each field's default, help,
bounds and choices are declared once (`config.option`) and validated once, in `__post_init__`. The CLI's flags and
the ComfyUI nodes' widgets are built from these declarations. The presets are the three published methods;
`sampler_config`, `build_memory` and `build_verifier` turn settings into the engine's configs and a fresh policy
and verifier per run (ComfyUI passes settings between nodes and may reuse them; a run's state never lives in them).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import CacheConfig, SamplerConfig, TransitionConfig, check_options, option, option_from
from .memory import IdentityMemory, MemFlowMemory, MemoryPolicy, NoMemory
from .model_presets import ModelPreset, model_preset
from .story.entities import EntityRegistry
from .verify import AsyncVerifier, ImmediateVerifier, Scorer, Verifier

MODES = ("identity", "memflow", "none")


@dataclass(frozen=True)
class MemorySettings:
    mode: str = option(
        "identity",
        "identity: frames showing the new prompt's entities come back at each prompt switch (IAMFlow). memflow: a "
        "bank of frames ranked by prompt relevance (MemFlow). none: sink + rolling window only (LongLive).",
        choices=MODES,
        label="memory mode",
    )
    transition: str = option_from(TransitionConfig, "strategy")
    max_frames: int = option(4, "identity: memory frames put back into attention, at most.", min=1, max=16)
    min_frames_multi_entity: int = option(
        2, "identity: at least this many frames when a prompt has two or more entities (at most max_frames).",
        min=0, max=16,
    )  # fmt: skip
    bank_size: int = option(3, "memflow: frames in the bank.", min=1, max=16)
    record_interval: int = option(3, "memflow: capture a frame every this many chunks.", min=1, max=64)
    sparse_topk: int = option_from(CacheConfig, "sparse_topk")
    visual_weight: float = option(
        0.3,
        "identity: weight of the verifier's visual score against text relevance when choosing a chunk's frame "
        "(needs a verifier).",
        min=0.0, max=1.0, step=0.05,
    )  # fmt: skip
    reference_weight: float = option(
        0.0,
        "identity: the score entity reference pictures compete with when frames are chosen (generated frames score "
        "their verifier's visual score, 0.5 without one). 0: a picture comes back only while no generated frame "
        "shows its entity; 1: pictures win over generated frames.",
        min=0.0, max=1.0, step=0.05,
    )  # fmt: skip
    archive_limit_mb: int = option(
        2048, "identity: host memory for archived frames; beyond it the least useful frames are dropped.",
        min=64, max=65536, step=64,
    )  # fmt: skip
    verifier_wait: float | None = option(
        None,
        "identity: the longest the sampler waits for a late verdict when choosing a chunk's frame, in seconds (a "
        "later verdict still corrects attributes). -1 (or not given): automatic, 5% of the sampler's chunk time, so "
        "a slow verifier costs it at most that.",
        min=0.0, max=600.0, step=0.01, auto=-1.0,
    )  # fmt: skip
    async_verifier: bool = option(
        True,
        "Run the verifier in a worker thread on its own device while sampling goes on (the sampler waits only "
        "when memory needs a score). Off: verify inline (an ablation).",
    )

    def __post_init__(self) -> None:
        check_options(self)
        if self.min_frames_multi_entity > self.max_frames:
            raise ValueError(
                f"min_frames_multi_entity {self.min_frames_multi_entity} must be in 0..max_frames "
                f"({self.max_frames}); lower min_frames_multi_entity or raise max_frames"
            )

    @property
    def memory_frames(self) -> int:
        """Frames of the cache's memory segment this mode needs."""
        return {"identity": self.max_frames, "memflow": self.bank_size, "none": 0}[self.mode]


IAMFLOW = MemorySettings()  # identity memory + soft transition (+ the async verifier when one is given)
MEMFLOW = MemorySettings(mode="memflow", transition="recache")
LONGLIVE = MemorySettings(mode="none", transition="recache")
PRESETS = {"identity": IAMFLOW, "memflow": MEMFLOW, "none": LONGLIVE}  # by memory mode


def sampler_config(
    settings: MemorySettings,
    height: int = SamplerConfig.height,
    width: int = SamplerConfig.width,
    model: ModelPreset | None = None,
) -> SamplerConfig:
    """The sampler config these settings need (cache memory segment, sparse activation, transition) for the
    checkpoint `model` streams (frames per chunk, window, sink, steps; None: LongLive's, the default)."""
    model = model or model_preset(None)
    cache = model.cache(memory_frames=settings.memory_frames, sparse_topk=settings.sparse_topk)
    return SamplerConfig(
        height, width, steps=model.steps, shift=model.shift, cache=cache,
        transition=TransitionConfig(settings.transition), first_steps=model.first_steps,
    )  # fmt: skip


def build_memory(
    settings: MemorySettings, registry: EntityRegistry | None = None, verifier: Verifier | None = None
) -> MemoryPolicy:
    """A fresh policy for one run. registry: entities per prompt (identity mode; None = no LLM: prompt relevance
    only). verifier: from `build_verifier`, or None (no visual scores)."""
    if settings.mode == "memflow":
        return MemFlowMemory(bank_size=settings.bank_size, record_interval=settings.record_interval)
    if settings.mode == "none":
        return NoMemory()
    return IdentityMemory(
        registry,
        max_frames=settings.max_frames,
        min_frames_multi_entity=settings.min_frames_multi_entity,
        visual_weight=settings.visual_weight,
        archive_limit_bytes=settings.archive_limit_mb * 2**20,
        verifier=verifier,
        verifier_wait=settings.verifier_wait,
        reference_weight=settings.reference_weight,
    )


def build_verifier(settings: MemorySettings, scorer: Scorer | None) -> Verifier | None:
    """The verifier that runs `scorer` (e.g. a loaded `story.vlm.FrameVerifier`) for identity memory: on a worker
    thread, or inline with `async_verifier` off; None without a scorer or in another mode. Close it after the run
    (it is a context manager)."""
    if scorer is None or settings.mode != "identity":
        return None
    return AsyncVerifier(scorer) if settings.async_verifier else ImmediateVerifier(scorer)
