"""Typed self-attention KV cache of the streaming DiT: sink + rolling local window + memory segment.

One preallocated buffer per K and V holds every layer: `[layers, B, slots * tokens_per_frame, H, D]` with the slot
layout `[sink | local window | current chunk | memory]`. Keys are stored *before* RoPE; the DiT rotates the context
by the positions this cache hands out. That makes slot order irrelevant (the rolling window is a ring that never
moves data), lets memory frames be placed at any position, and lets videos run past the 1024-frame RoPE table.
All bookkeeping is host-side Python ints: no `.item()` or device sync in the hot loop.

Eviction and RoPE positions are pure functions (`commit_frames`, `rope_positions`) with unit tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import CacheConfig


@dataclass(frozen=True)
class WindowState:
    """Which absolute latent frame each sink and local slot holds (None = empty)."""

    sink: tuple[int | None, ...]
    local: tuple[int | None, ...]

    @classmethod
    def empty(cls, cfg: CacheConfig) -> WindowState:
        return cls(sink=(None,) * cfg.sink_frames, local=(None,) * cfg.local_frames)

    def frames(self) -> list[int]:
        """Stored frames in slot order (sink slots first)."""
        return [f for f in (*self.sink, *self.local) if f is not None]


def commit_frames(state: WindowState, frames: Sequence[int]) -> tuple[WindowState, list[tuple[int, int]]]:
    """Place finished frames: the sink fills first and is never evicted, then the rolling window takes the rest,
    each new frame replacing the oldest one once the window is full.

    Returns the new state and `(frame, slot)` placements, where slots 0..S-1 are sink slots and S.. local slots.
    A window of zero local slots keeps only the sink.
    """
    sink, local = list(state.sink), list(state.local)
    placements = []
    for frame in frames:
        if None in sink:
            slot = sink.index(None)
            sink[slot] = frame
            placements.append((frame, slot))
            continue
        if not local:
            continue
        if None in local:
            slot = local.index(None)
        else:
            slot = min(range(len(local)), key=lambda i: local[i])
        local[slot] = frame
        placements.append((frame, len(sink) + slot))
    return WindowState(tuple(sink), tuple(local)), placements


def rope_positions(frames: Sequence[int], query_end: int, sink_frames: int, limit: int) -> list[int]:
    """Temporal RoPE position of each frame when the newest query frame is `query_end - 1`.

    Below `limit` (the trained table, 1024) every frame keeps its absolute index, exactly as the checkpoints were
    trained. Past it the whole window slides back by `query_end - limit`, so the current chunk sits at the end of
    the table; the sink keeps its first positions, and older memory frames are clamped to just after the sink.
    Relative distances inside the local window are unchanged; the sink and memory stay at most `limit` frames away.
    """
    shift = max(0, query_end - limit)
    return [f if f < sink_frames else max(f - shift, sink_frames) for f in frames]


@dataclass(frozen=True)
class ChunkLayout:
    """The attention context of one forward: token ranges of the buffer, their frames, and RoPE positions."""

    ranges: tuple[tuple[int, int], ...]
    query_range: tuple[int, int]
    context_frames: tuple[int, ...]
    context_positions: tuple[int, ...]
    query_positions: tuple[int, ...]

    @property
    def context_tokens(self) -> int:
        return sum(end - start for start, end in self.ranges)


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if end <= start:
            continue
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return tuple(merged)


class KVCache:
    """Self-attention K/V for all DiT layers. k, v: [layers, B, slots * T, H, D] with T tokens per latent frame."""

    def __init__(
        self,
        cfg: CacheConfig,
        *,
        num_layers: int,
        tokens_per_frame: int,
        num_heads: int,
        head_dim: int,
        batch: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        rope_limit: int = 1024,
    ) -> None:
        self.cfg = cfg
        self.tokens_per_frame = tokens_per_frame
        self.rope_limit = rope_limit
        # sink + local window + query region (a chunk, or a recache of local + chunk frames) + memory
        slots = cfg.sink_frames + 2 * cfg.local_frames + cfg.chunk_frames + cfg.memory_frames
        shape = (num_layers, batch, slots * tokens_per_frame, num_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.state = WindowState.empty(cfg)
        self.memory: tuple[int, ...] = ()
        self.layout: ChunkLayout | None = None
        self._query_frames: tuple[int, ...] = ()

    # slot arithmetic -------------------------------------------------------------------------------------------
    def _slot_tokens(self, slot: int, count: int = 1) -> tuple[int, int]:
        return slot * self.tokens_per_frame, (slot + count) * self.tokens_per_frame

    @property
    def _query_slot(self) -> int:
        return self.cfg.sink_frames + self.cfg.local_frames

    @property
    def _memory_slot(self) -> int:
        return self._query_slot + self.query_capacity

    # lifecycle ---------------------------------------------------------------------------------------------------
    @property
    def query_capacity(self) -> int:
        """Frames one forward may query: a chunk, or a recache of the window (previous frames plus one chunk)."""
        return self.cfg.window_frames - self.cfg.sink_frames

    def begin_chunk(self, start_frame: int, num_frames: int) -> ChunkLayout:
        """Lay out the context for the new chunk of latent frames [start_frame, start_frame + num_frames)."""
        if not 0 < num_frames <= self.cfg.chunk_frames:
            raise ValueError(f"a chunk has 1..{self.cfg.chunk_frames} latent frames, got {num_frames}")
        return self.begin(range(start_frame, start_frame + num_frames))

    def begin(self, frames: Sequence[int]) -> ChunkLayout:
        """Lay out the context for a forward over consecutive latent `frames`.

        The context is every stored frame that is not being queried, the queried frames themselves, and the memory
        segment. Queried frames that are already stored (a recache) get their slots rewritten on `commit`.
        """
        frames = list(frames)
        if not frames or frames != list(range(frames[0], frames[0] + len(frames))):
            raise ValueError(f"a forward queries consecutive latent frames, got {frames}")
        if len(frames) > self.query_capacity:
            raise ValueError(f"{len(frames)} frames exceed the {self.query_capacity} frames one forward can query")
        ranges, context = [], []
        for slot, frame in enumerate((*self.state.sink, *self.state.local)):
            if frame is not None and frame not in frames:
                if frame > frames[0]:
                    raise ValueError(
                        f"the forward starts at frame {frames[0]} but the cache already holds frame {frame}; "
                        "frames must be generated in order (reset the cache to start over)"
                    )
                ranges.append(self._slot_tokens(slot))
                context.append(frame)
        query = self._slot_tokens(self._query_slot, len(frames))
        ranges.append(query)
        context += frames
        if self.memory:
            ranges.append(self._slot_tokens(self._memory_slot, len(self.memory)))
            context += list(self.memory)
        query_end = frames[-1] + 1
        self.layout = ChunkLayout(
            ranges=_merge(ranges),
            query_range=query,
            context_frames=tuple(context),
            context_positions=tuple(rope_positions(context, query_end, self.cfg.sink_frames, self.rope_limit)),
            query_positions=tuple(rope_positions(frames, query_end, self.cfg.sink_frames, self.rope_limit)),
        )
        self._query_frames = tuple(frames)
        return self.layout

    def context(self, layer: int, k_query: torch.Tensor, v_query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the chunk's (unrotated) K/V into the query slots and return the layer's context K, V.

        k_query, v_query: [B, Lq, H, D]. Returns [B, Lctx, H, D] each, in `layout.context_positions` order.
        """
        start, end = self.layout.query_range
        self.k[layer, :, start:end] = k_query
        self.v[layer, :, start:end] = v_query
        if len(self.layout.ranges) == 1:
            ((s, e),) = self.layout.ranges
            return self.k[layer, :, s:e], self.v[layer, :, s:e]
        return (
            torch.cat([self.k[layer, :, s:e] for s, e in self.layout.ranges], dim=1),
            torch.cat([self.v[layer, :, s:e] for s, e in self.layout.ranges], dim=1),
        )

    def commit(self) -> None:
        """Keep the last forward's K/V (the clean pass) in the sink / rolling window.

        New frames are placed by `commit_frames`; frames already stored (a recache) overwrite their own slots;
        frames older than the window (the head of a recache) are dropped.
        """
        stored = {frame: slot for slot, frame in enumerate((*self.state.sink, *self.state.local)) if frame is not None}
        newest = max(stored, default=-1)
        fresh = [f for f in self._query_frames if f > newest]
        self.state, placements = commit_frames(self.state, fresh)
        placements += [(f, stored[f]) for f in self._query_frames if f in stored]
        first = self._query_frames[0] if self._query_frames else 0
        for frame, slot in placements:
            src = self._slot_tokens(self._query_slot + frame - first)
            dst = self._slot_tokens(slot)
            self.k[:, :, dst[0] : dst[1]] = self.k[:, :, src[0] : src[1]]
            self.v[:, :, dst[0] : dst[1]] = self.v[:, :, src[0] : src[1]]
        self.layout = None

    # memory segment ----------------------------------------------------------------------------------------------
    def set_memory(self, k: torch.Tensor, v: torch.Tensor, frames: Sequence[int]) -> None:
        """Put memory frames in the memory segment. k, v: [layers, B, len(frames) * T, H, D], unrotated keys;
        `frames` are their absolute latent frame indices (they keep their original RoPE positions)."""
        if len(frames) > self.cfg.memory_frames:
            raise ValueError(f"{len(frames)} memory frames exceed the memory segment of {self.cfg.memory_frames}")
        start, end = self._slot_tokens(self._memory_slot, len(frames))
        if k.shape[2] != end - start:
            raise ValueError(f"memory K has {k.shape[2]} tokens, expected {end - start} for {len(frames)} frames")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.memory = tuple(frames)

    def clear_memory(self) -> None:
        self.memory = ()

    def frame_kv(self, frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the stored K/V of one frame: [layers, B, T, H, D] each (for a memory archive)."""
        slots = [*self.state.sink, *self.state.local]
        if frame not in slots:
            raise KeyError(f"frame {frame} is not in the cache (holds {self.state.frames()})")
        start, end = self._slot_tokens(slots.index(frame))
        return self.k[:, :, start:end].clone(), self.v[:, :, start:end].clone()

    def reset(self) -> None:
        self.state = WindowState.empty(self.cfg)
        self.memory = ()
        self.layout = None


def frame_visibility(num_frames: int, cfg: CacheConfig) -> torch.Tensor:
    """bool [F, F]: which key frame each query frame sees under chunked streaming with sink and rolling window.

    The full-sequence equivalent of streaming through `KVCache` (memory segment empty): a frame in the chunk
    [s, e) sees every frame of its own chunk, the sink frames, and the `local_frames` frames before s.
    """
    q = torch.arange(num_frames)[:, None]
    k = torch.arange(num_frames)[None, :]
    chunk_start = q // cfg.chunk_frames * cfg.chunk_frames
    chunk_end = chunk_start + cfg.chunk_frames
    in_window = (k >= chunk_start - cfg.local_frames) | (k < cfg.sink_frames)
    return (k < chunk_end) & in_window


def block_causal_mask(num_frames: int, tokens_per_frame: int, cfg: CacheConfig) -> torch.Tensor:
    """Token-level bool mask [F*T, F*T] from `frame_visibility`."""
    vis = frame_visibility(num_frames, cfg)
    return vis.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
