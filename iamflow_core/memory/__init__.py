"""Memory policies: what the streaming loop puts into the cache's memory segment, and when.

The loop calls a policy at fixed points (`start`, `on_switch`, `before_chunk`, `after_chunk`, `on_frames`) with a
`StepContext`; a policy never reaches into the loop. `NoMemory` does nothing; `MemFlowMemory` is the MemFlow
baseline bank; the identity-aware memory of IAMFlow plugs in the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..cache import KVCache
from ..models.dit import CrossKV
from ..models.rope import RopeTables, apply_rope


@dataclass
class StepContext:
    """What a memory policy may read (and, for the cache's memory segment, write) at one step of the loop."""

    chunk: int
    start_frame: int
    num_frames: int
    segment: int
    prompt: str
    cache: KVCache
    cross: CrossKV
    text: torch.Tensor  # [text_len, text_dim] umT5 states of the current prompt, zero-padded
    rope: RopeTables | None = None  # the DiT's rotary tables, to compare cached keys across time
    tokenizer: Any = None  # the text encoder's tokenizer (entity-token weighting), when the pipeline has one
    decoding: bool = False  # frames of this chunk will be decoded (and reach `on_frames`)
    latents: torch.Tensor | None = None  # [B, C, F, h, w] clean latents of the chunk (after_chunk)
    # Finishes the decode of every chunk already handed to the decoder, so `on_frames` has run for each: a policy
    # that needs a chunk's frames now calls this rather than wait (the loop may read frames back only later).
    flush_frames: Callable[[], None] = lambda: None
    info: dict[str, Any] = field(default_factory=dict)  # per-chunk report, copied into the chunk event


class MemoryPolicy(Protocol):
    name: str

    def start(self, ctx: StepContext) -> None: ...
    def on_switch(self, ctx: StepContext) -> None: ...
    def before_chunk(self, ctx: StepContext) -> None: ...
    def after_chunk(self, ctx: StepContext) -> None: ...
    def on_frames(self, chunk: int, frames: np.ndarray) -> None:
        """Called as soon as a chunk's frames are on the host, from the decode worker thread when decoding overlaps
        the loop: must be thread-safe."""
        ...


class NoMemory:
    """No memory segment: the chunk sees the sink and the rolling window only (LongLive)."""

    name = "none"

    def start(self, ctx: StepContext) -> None:
        ctx.cache.clear_memory()

    def on_switch(self, ctx: StepContext) -> None:
        pass

    def before_chunk(self, ctx: StepContext) -> None:
        pass

    def after_chunk(self, ctx: StepContext) -> None:
        pass

    def on_frames(self, chunk: int, frames: np.ndarray) -> None:
        pass


def require_memory_segment(ctx: StepContext, frames: int, what: str) -> None:
    """Fail clearly when a policy wants more memory frames than the cache's memory segment holds."""
    if ctx.cache.cfg.memory_frames < frames:
        raise ValueError(
            f"{what} {frames} exceeds the cache memory segment ({ctx.cache.cfg.memory_frames} frames); "
            f"raise CacheConfig.memory_frames or lower {what}"
        )


def text_query(cross: CrossKV, text: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean cross-attention key of the prompt's real tokens per layer and head: [layers, B, H, D].

    Padding rows (zero umT5 states) are left out: they all map to one constant key that would otherwise dominate
    the mean of a short prompt (MemFlow averages all 512 slots). weights: [text_len] per-token weights (e.g. higher
    on the tokens naming an entity); zero-state rows get weight 0 whatever is given.
    """
    real = (text.float().abs().sum(-1) > 0).float()
    if real.sum() == 0:
        real = torch.ones_like(real)
    w = real * (weights.to(real.device, real.dtype) if weights is not None else 1.0)
    w = w / w.sum().clamp_min(1e-8)
    return torch.einsum("lbthd,t->lbhd", cross.k.float(), w)


def frame_descriptor(k: torch.Tensor, position: int, rope: RopeTables) -> torch.Tensor:
    """Mean key of one cached frame, moved back to time 0: [layers, B, H, D].

    k: [layers, B, T, H, D] rotated at temporal `position`. The temporal rotation is the same for every token of a
    frame, so it commutes with the mean and is undone on the small mean alone; frames from different times then
    compare by content instead of by RoPE phase (which MemFlow's scores mix in).
    """
    mean = k.float().mean(2, keepdim=True)
    cos, sin = rope.grid([-position], 1, 1, k.device, spatial=False)
    return apply_rope(mean, cos, sin)[:, :, 0]


def frame_relevance(query: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
    """Relevance of stored frames to a text query: mean over layers and heads of <q, frame descriptor> / sqrt(D).

    query: [layers, B, H, D]; descriptors: [n, layers, B, H, D] from `frame_descriptor` -> [n].
    """
    return (descriptors * query[None]).sum(-1).mean((1, 2, 3)) / query.shape[-1] ** 0.5


from .memflow import MemFlowMemory  # noqa: E402  (re-export; memflow imports the helpers above)

__all__ = [
    "MemFlowMemory", "MemoryPolicy", "NoMemory", "StepContext", "frame_descriptor", "frame_relevance", "text_query",
]  # fmt: skip
