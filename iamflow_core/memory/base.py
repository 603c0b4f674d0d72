"""The memory-policy contract: what the streaming loop shows a policy (`StepContext`) and when it calls it.

The loop calls a policy at fixed points (`start`, `on_switch`, `before_chunk`, `after_chunk`, `on_frames`) with a
`StepContext`; a policy never reaches into the loop. `NoMemory` does nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..cache import KVCache
from ..models.dit import CrossKV
from ..models.rope import RopeTables


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
    temporal_factor: int | None = None  # video frames per latent frame of the decoder (the VAE's); None: no VAE
    latents: torch.Tensor | None = None  # [B, C, F, h, w] clean latents of the chunk (after_chunk)
    # Finishes the decode of every chunk already handed to the decoder, so `on_frames` has run for each: a policy
    # that needs a chunk's frames now calls this rather than wait (the loop may read frames back only later).
    flush_frames: Callable[[], None] = lambda: None
    # A picture (uint8 RGB [H, W, 3]) as a frame of K/V: encoded by the VAE and passed through the DiT's clean pass
    # as latent frame 0 of an empty cache, under prompt `segment`'s conditioning. Returns K, V [layers, B, T, H, D]
    # and the position K is rotated at. None without a VAE.
    encode_image: Callable[[np.ndarray, int], tuple[torch.Tensor, torch.Tensor, int]] | None = None
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
