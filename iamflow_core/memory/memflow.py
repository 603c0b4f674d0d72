"""MemFlow's memory bank (baseline): remember a frame every few chunks, keep those most relevant to the prompt.

Every `record_interval` chunks the first latent frame of the chunk is captured from the cache (its clean K/V).
Before each chunk the captured frames are ranked by relevance to the current prompt's text keys and the top
`bank_size` go into the cache's memory segment. Unlike the MemFlow release, a frame is never held twice,
relevance uses only the prompt's real tokens and unrotated keys, and one ranking serves all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import StepContext, require_memory_segment
from .scoring import frame_descriptor, frame_relevance, text_query


@dataclass
class _Frame:
    index: int
    k: torch.Tensor  # [layers, B, T, H, D], rotated at `position`
    v: torch.Tensor
    position: int
    descriptor: torch.Tensor  # [layers, B, H, D]


class MemFlowMemory:
    name = "memflow"

    def __init__(self, *, bank_size: int, record_interval: int, candidates: int | None = None) -> None:
        """bank_size, record_interval: as `settings.MemorySettings` declares and validates them."""
        self.bank_size = bank_size
        self.record_interval = record_interval
        # Captured frames kept as candidates: the bank plus the newest capture (MemFlow keeps bank_size - 1 + 1).
        self.candidates = candidates or bank_size + 1
        self.frames: list[_Frame] = []
        self._selected: tuple[int, ...] = ()
        # The conditioning the frames were last ranked under (None: rank again). Ranking reads scores back from the
        # GPU, which waits for the chunks queued before: it is done only when the frames or the prompt changed.
        self._ranked_for: object | None = None

    def start(self, ctx: StepContext) -> None:
        require_memory_segment(ctx, self.bank_size, "bank_size")
        self.frames.clear()
        self._selected = ()
        self._ranked_for = None
        ctx.cache.clear_memory()

    def on_switch(self, ctx: StepContext) -> None:
        self._select(ctx)

    def before_chunk(self, ctx: StepContext) -> None:
        self._select(ctx)
        ctx.info["memory_frames"] = list(self._selected)

    def after_chunk(self, ctx: StepContext) -> None:
        if ctx.chunk % self.record_interval:
            return
        k, v, position = ctx.cache.frame_kv(ctx.start_frame)
        self.frames.append(_Frame(ctx.start_frame, k, v, position, frame_descriptor(k, position, ctx.rope)))
        self._ranked_for = None  # the next chunk ranks them (and drops the least relevant past `candidates`)
        ctx.info["recorded_frame"] = ctx.start_frame

    def on_frames(self, chunk: int, frames: np.ndarray) -> None:
        pass

    def _scores(self, ctx: StepContext) -> list[float]:
        query = text_query(ctx.cross, ctx.text.to(ctx.cross.k.device))
        return frame_relevance(query, torch.stack([f.descriptor for f in self.frames])).tolist()

    def _select(self, ctx: StepContext) -> None:
        if not self.frames or ctx.cross is self._ranked_for:
            return
        scores = self._scores(ctx)
        if len(self.frames) > self.candidates:  # the newest capture always stays a candidate
            drop = min(range(len(scores) - 1), key=scores.__getitem__)
            del self.frames[drop], scores[drop]
        self._ranked_for = ctx.cross
        top = sorted(range(len(scores)), key=lambda i: -scores[i])[: self.bank_size]
        chosen = sorted((self.frames[i] for i in top), key=lambda f: f.index)
        selected = tuple(f.index for f in chosen)
        if selected != self._selected:
            k = torch.cat([f.k for f in chosen], dim=2)
            v = torch.cat([f.v for f in chosen], dim=2)
            ctx.cache.set_memory(k, v, selected, [f.position for f in chosen])
            self._selected = selected
