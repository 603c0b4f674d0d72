"""Typed self-attention KV cache of the streaming DiT: sink + rolling local window + memory segment.

One preallocated buffer per K and V holds every layer: `[layers, B, slots * tokens_per_frame, H, D]`, with the
slot layout `[memory (filled from the right) | sink | local window | query region]`. In steady state the context
of a chunk is therefore one contiguous slice of the buffer: attention reads it without a copy.

Keys are stored rotated (RoPE) at an absolute temporal position, rotated once when they are written, as the
checkpoints were trained. The local window is a ring: order does not matter to attention, so eviction moves no
data. Past the RoPE table (1024 latent frames) the window keeps absolute positions and the sink and memory frames
are re-rotated forward instead (from pristine copies, so rounding never accumulates): relative distances are those
of `rope_positions`, which slides the whole window back to the end of the table. All bookkeeping is host-side:
no `.item()` or device sync.

Eviction and positions are pure functions (`commit_frames`, `rope_positions`) with unit tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import CacheConfig
from .devices import to_device_async

# rotate(k [layers, B, n*T, H, D], per-frame temporal deltas) -> k rotated in time by those deltas
Rotate = Callable[[torch.Tensor, list[int]], torch.Tensor]


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
    """The attention context of one forward: token ranges of the buffer, their frames, and query positions."""

    ranges: tuple[tuple[int, int], ...]
    query_range: tuple[int, int]
    context_frames: tuple[int, ...]
    query_positions: tuple[int, ...]

    @property
    def context_tokens(self) -> int:
        return sum(end - start for start, end in self.ranges)


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if end <= start:
            continue
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return tuple(merged)


@dataclass
class _Memory:
    frames: tuple[int, ...]
    k: torch.Tensor  # [layers, B, n*T, H, D], rotated at `positions` (owned by the policy; never written)
    v: torch.Tensor
    positions: tuple[int, ...]
    placed_at: tuple[int, ...] | None = None  # positions of the copy in the cache, None until placed


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
        slots = cfg.memory_frames + cfg.sink_frames + cfg.local_frames + self.query_capacity
        shape = (num_layers, batch, slots * tokens_per_frame, num_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.state = WindowState.empty(cfg)
        self.slot_positions: list[int | None] = [None] * (cfg.sink_frames + cfg.local_frames)
        self.layout: ChunkLayout | None = None
        self._memory: _Memory | None = None
        self._sink_origin: torch.Tensor | None = None  # sink keys at their own positions, once they need moving
        self._global_frames: list[int] = []
        self._sparse_index: tuple[torch.Tensor, torch.Tensor] | None = None  # `frame_index` of this chunk's context
        self._query_frames: tuple[int, ...] = ()
        self._rotate: Rotate | None = None  # the last forward's, for blending into the sink (`cfg.sink_ema`)

    # slot arithmetic -------------------------------------------------------------------------------------------
    @property
    def query_capacity(self) -> int:
        """Frames one forward may query: a chunk, or a recache of the window (previous frames plus one chunk)."""
        return self.cfg.window_frames - self.cfg.sink_frames

    def _tokens(self, slot: int, count: int = 1) -> tuple[int, int]:
        return slot * self.tokens_per_frame, (slot + count) * self.tokens_per_frame

    def _window_slot(self, i: int) -> int:
        """Buffer slot of sink/local slot i."""
        return self.cfg.memory_frames + i

    @property
    def _query_slot(self) -> int:
        return self.cfg.memory_frames + self.cfg.sink_frames + self.cfg.local_frames

    @property
    def memory(self) -> tuple[int, ...]:
        return self._memory.frames if self._memory else ()

    # lifecycle ---------------------------------------------------------------------------------------------------
    def begin(self, frames: Sequence[int], rotate: Rotate | None = None) -> ChunkLayout:
        """Lay out the context for a forward over consecutive latent `frames`.

        The context is every stored frame that is not being queried, the queried frames themselves, and the memory
        segment. Queried frames that are already stored (a recache) get their slots rewritten on `commit`.
        `rotate` moves stored keys in time; it is needed only past the RoPE table or for moved memory frames.
        """
        frames = list(frames)
        if not frames or frames != list(range(frames[0], frames[0] + len(frames))):
            raise ValueError(f"a forward queries consecutive latent frames, got {frames}")
        if len(frames) > self.query_capacity:
            raise ValueError(f"{len(frames)} frames exceed the {self.query_capacity} frames one forward can query")
        query_end = frames[-1] + 1
        anchor = min([f for f in self.state.local if f is not None] + frames[:1])  # oldest non-sink frame
        ranges, context = [], []
        for i, frame in enumerate((*self.state.sink, *self.state.local)):
            if frame is None or frame in frames:
                continue
            if frame > frames[0]:
                raise ValueError(
                    f"the forward starts at frame {frames[0]} but the cache already holds frame {frame}; "
                    "frames must be generated in order (reset the cache to start over)"
                )
            self._place_window_slot(i, frame, self._wanted(i, frame, query_end, anchor), rotate)
            ranges.append(self._tokens(self._window_slot(i)))
            context.append(frame)
        query = self._tokens(self._query_slot, len(frames))
        ranges.append(query)
        context += frames
        if self._memory is not None:
            n = len(self._memory.frames)
            self._place_memory(query_end, rotate)
            ranges.append(self._tokens(self.cfg.memory_frames - n, n))
            context += list(self._memory.frames)
        # Queried frames are never sink frames once a shift exists (the first chunk has none): absolute positions.
        self.layout = ChunkLayout(_merge(ranges), query, tuple(context), tuple(frames))
        self._global_frames = self._global_frame_offsets(frames)
        self._sparse_index = None
        self._rotate = rotate
        self._query_frames = tuple(frames)
        return self.layout

    def _placed(self, frames: Sequence[int], query_end: int) -> list[int]:
        """Where keys of `frames` are rotated to for a query ending at `query_end`: `rope_positions` moved forward by
        its shift, which keeps the window's frames at their absolute positions (the same distances to the query)."""
        shift = max(0, query_end - self.rope_limit)
        return [p + shift for p in rope_positions(frames, query_end, self.cfg.sink_frames, self.rope_limit)]

    def _wanted(self, i: int, frame: int, query_end: int, anchor: int) -> int:
        """The position sink/local slot i's keys take for this query: the frame's own (`_placed`), or with
        `sink_positions="adjacent"` a sink slot's is just before `anchor`, the oldest other frame of the context."""
        if i < self.cfg.sink_frames and self.cfg.sink_positions == "adjacent":
            filled = sum(f is not None for f in self.state.sink)  # while the sink fills, this is the frame itself
            return anchor - filled + i
        (want,) = self._placed([frame], query_end)
        return want

    def _place_window_slot(self, i: int, frame: int, want: int, rotate: Rotate | None) -> None:
        """Make sure sink/local slot i holds keys rotated at position `want` for this query."""
        have = self.slot_positions[i]
        if have == want:
            return
        if rotate is None:
            raise ValueError("keys must move in time (past the RoPE table); pass the model's rotate function")
        start, end = self._tokens(self._window_slot(i))
        if i < self.cfg.sink_frames:
            if self._sink_origin is None:  # keep the sink as first written: every move starts from it
                s0, s1 = self._tokens(self._window_slot(0), self.cfg.sink_frames)
                self._sink_origin = self.k[:, :, s0:s1].clone()
            o0, o1 = self._tokens(i)
            self.k[:, :, start:end] = rotate(self._sink_origin[:, :, o0:o1], [want - frame])
        else:
            self.k[:, :, start:end] = rotate(self.k[:, :, start:end], [want - have])
        self.slot_positions[i] = want

    def _place_memory(self, query_end: int, rotate: Rotate | None) -> None:
        mem = self._memory
        want = tuple(self._placed(mem.positions, query_end))
        if mem.placed_at == want:
            return
        n = len(mem.frames)
        start, end = self._tokens(self.cfg.memory_frames - n, n)
        deltas = [w - p for w, p in zip(want, mem.positions)]
        if any(deltas):
            if rotate is None:
                raise ValueError("memory frames must move in time; pass the model's rotate function")
            self.k[:, :, start:end] = rotate(mem.k, deltas)
        else:
            self.k[:, :, start:end] = mem.k
        self.v[:, :, start:end] = mem.v
        mem.placed_at = want

    def _global_frame_offsets(self, frames: list[int]) -> list[int]:
        """Frame offsets (in the context, buffer order) of the sink and memory frames: what sparse activation ranks."""
        offsets, index = [], 0
        sink_slots = {self._window_slot(i) for i in range(self.cfg.sink_frames)}
        memory_slots = set(range(self.cfg.memory_frames))
        for start, end in self.layout.ranges:
            for token in range(start, end, self.tokens_per_frame):
                slot = token // self.tokens_per_frame
                if slot in sink_slots or slot in memory_slots:
                    offsets.append(index)
                index += 1
        return offsets

    def query_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffer views [B, Lq, H, D] that the forward under way writes its chunk's rotated K and its V to: a
        model may write them there itself, and `context` then copies nothing."""
        start, end = self.layout.query_range
        return self.k[layer, :, start:end], self.v[layer, :, start:end]

    def context(
        self, layer: int, k_query: torch.Tensor, v_query: torch.Tensor, q: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the chunk's rotated K and its V into the query slots (unless they are those slots already) and
        return the layer's context K, V.

        k_query, v_query: [B, Lq, H, D]. Returns [B, Lctx, H, D] each: a view of the buffer when contiguous. With
        `cfg.sparse_topk` and the rotated queries q, each head keeps only its top-k sink/memory frames.
        """
        for slot, value in zip(self.query_slots(layer), (k_query, v_query)):
            if value.data_ptr() != slot.data_ptr():  # not written there by the kernel that made it
                slot.copy_(value)
        if len(self.layout.ranges) == 1:
            ((s, e),) = self.layout.ranges
            k, v = self.k[layer, :, s:e], self.v[layer, :, s:e]
        else:
            k = torch.cat([self.k[layer, :, s:e] for s, e in self.layout.ranges], dim=1)
            v = torch.cat([self.v[layer, :, s:e] for s, e in self.layout.ranges], dim=1)
        if q is not None and 0 < self.cfg.sparse_topk < len(self._global_frames):
            if self._sparse_index is None:  # once per chunk, for every layer
                self._sparse_index = frame_index(self._global_frames, k.shape[1] // self.tokens_per_frame, k.device)
            k, v = sparse_select(q, k, v, self._global_frames, self.tokens_per_frame, self.cfg.sparse_topk,
                                 self._sparse_index)  # fmt: skip
        return k, v

    def commit(self) -> None:
        """Keep the last forward's K/V (the clean pass) in the sink / rolling window.

        New frames are placed by `commit_frames`; frames already stored (a recache) overwrite their own slots;
        frames older than the window (the head of a recache) are dropped.
        """
        slots = (*self.state.sink, *self.state.local)
        self.state, placements = self.placements()
        first = self._query_frames[0]
        for frame, i in placements:
            if self.cfg.sink_ema and i >= self.cfg.sink_frames > 0 and slots[i] not in (None, frame):
                self._blend_into_sink(i, slots[i])  # slots[i] leaves the window now
                slots = slots[:i] + (None,) + slots[i + 1 :]  # once per frame, however many pass through the slot
            self._keep(self._tokens(self._query_slot + frame - first), self._tokens(self._window_slot(i)))
            self.slot_positions[i] = self.layout.query_positions[frame - first]
            if i < self.cfg.sink_frames:
                self._sink_origin = None
        self.layout = None
        self._rotate = None

    def placements(self) -> tuple[WindowState, list[tuple[int, int]]]:
        """What `commit` would do now: the window state after it and the (frame, sink/local slot) of each queried
        frame it keeps (new frames by `commit_frames`, stored ones in their own slots; older ones are dropped)."""
        stored = {frame: i for i, frame in enumerate((*self.state.sink, *self.state.local)) if frame is not None}
        newest = max(stored, default=-1)
        state, placements = commit_frames(self.state, [f for f in self._query_frames if f > newest])
        return state, placements + [(f, stored[f]) for f in self._query_frames if f in stored]

    def _keep(self, src: tuple[int, int], dst: tuple[int, int]) -> None:
        """Copy the K/V of query tokens `src` into window tokens `dst` (a commit)."""
        self.k[:, :, dst[0] : dst[1]] = self.k[:, :, src[0] : src[1]]
        self.v[:, :, dst[0] : dst[1]] = self.v[:, :, src[0] : src[1]]

    def _blend_into_sink(self, slot: int, frame: int) -> None:
        """Reward Forcing's EMA sink: `frame`, leaving local slot `slot`, is blended into sink slot
        (frame - S) % S with weight `cfg.sink_ema`, its keys taken to the sink frame's own position first."""
        w, target = self.cfg.sink_ema, (frame - self.cfg.sink_frames) % self.cfg.sink_frames
        k0, k1 = self._tokens(self._window_slot(slot))
        t0, t1 = self._tokens(self._window_slot(target))
        delta = self.state.sink[target] - self.slot_positions[slot]
        if delta and self._rotate is None:
            raise ValueError("blending into the sink moves keys in time; pass the model's rotate function to begin")
        k = self._rotate(self.k[:, :, k0:k1], [delta]) if delta else self.k[:, :, k0:k1]
        if self._sink_origin is None:  # the sink's keys are at their own positions: blend them where they are
            self.k[:, :, t0:t1] = (1 - w) * self.k[:, :, t0:t1] + w * k
        else:  # moved: blend the pristine copy; the slot is placed again from it at the next forward
            o0, o1 = self._tokens(target)
            self._sink_origin[:, :, o0:o1] = (1 - w) * self._sink_origin[:, :, o0:o1] + w * k
            self.slot_positions[target] = None
        self.v[:, :, t0:t1] = (1 - w) * self.v[:, :, t0:t1] + w * self.v[:, :, k0:k1]

    # memory segment ----------------------------------------------------------------------------------------------
    def set_memory(
        self, k: torch.Tensor, v: torch.Tensor, frames: Sequence[int], positions: Sequence[int] | None = None
    ) -> None:
        """Use these frames as the memory segment from the next forward on.

        k, v: [layers, B, len(frames) * T, H, D], keys rotated at `positions` (default: the frames' own indices,
        which is what `frame_kv` returns). The tensors are kept by reference and never written.
        """
        if not frames:
            self.clear_memory()
            return
        if len(frames) > self.cfg.memory_frames:
            raise ValueError(f"{len(frames)} memory frames exceed the memory segment of {self.cfg.memory_frames}")
        if k.shape[2] != len(frames) * self.tokens_per_frame or k.shape != v.shape:
            raise ValueError(f"memory K/V of shape {list(k.shape)} do not hold {len(frames)} frames")
        positions = tuple(positions) if positions is not None else tuple(frames)
        self._memory = _Memory(tuple(frames), k, v, positions)

    def clear_memory(self) -> None:
        self._memory = None

    def arriving(self, frames: Sequence[int]) -> bool:
        """Whether any of these frames' K/V are still on their way from another GPU (`relay.ReceivingCache`): reading
        them now would wait for that GPU."""
        return False

    def _frame_tokens(self, frame: int) -> tuple[int, int, int]:
        """Token range of a stored frame in the buffer, and the position its keys are rotated at."""
        slots = [*self.state.sink, *self.state.local]
        if frame not in slots:
            raise KeyError(f"frame {frame} is not in the cache (holds {self.state.frames()})")
        i = slots.index(frame)
        start, end = self._tokens(self._window_slot(i))
        return start, end, self.slot_positions[i]

    def frame_kv(self, frame: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A copy of one stored frame: K, V [layers, B, T, H, D] and the position K is rotated at."""
        start, end, position = self._frame_tokens(frame)
        return self.k[:, :, start:end].clone(), self.v[:, :, start:end].clone(), position

    def frame_keys(self, frame: int) -> tuple[torch.Tensor, int]:
        """A view (no copy) of one stored frame's keys [layers, B, T, H, D] and their rotation position."""
        start, end, position = self._frame_tokens(frame)
        return self.k[:, :, start:end], position


def frame_index(global_frames: Sequence[int], frames: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The context's candidate frame offsets (`global_frames`) and the other offsets of its `frames` frames, as
    index tensors on `device`, copied there without waiting for the GPU."""
    chosen = set(global_frames)
    rest = [i for i in range(frames) if i not in chosen]
    return (to_device_async(torch.tensor(list(global_frames), dtype=torch.long), device),
            to_device_async(torch.tensor(rest, dtype=torch.long), device))  # fmt: skip


def sparse_select(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, global_frames: Sequence[int], tokens_per_frame: int, topk: int,
    index: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Sparse memory activation: per head, keep the `topk` of the candidate frames (at frame offsets
    `global_frames` of the context) whose mean key best matches the mean query; keep every other frame.

    q: [B, Lq, H, D]; k, v: [B, F*T, H, D]. Returns k, v [B, (F - n + topk)*T, H, D] where n = len(global_frames);
    the selected frames differ per head (attention treats heads independently). index: `frame_index` of
    global_frames already on the device (the cache makes it once per chunk), else made here.
    """
    b, _, h, d = k.shape
    frames = k.shape[1] // tokens_per_frame
    kf, vf = k.view(b, frames, tokens_per_frame, h, d), v.view(b, frames, tokens_per_frame, h, d)
    cand, rest = index if index is not None else frame_index(global_frames, frames, k.device)
    scores = torch.einsum("bhd,bnhd->bhn", q.float().mean(1), kf[:, cand].float().mean(2))
    pick = cand[scores.topk(topk, dim=-1).indices.sort(dim=-1).values]  # [B, H, topk] frame offsets
    index = pick.permute(0, 2, 1)[:, :, None, :, None].expand(b, topk, tokens_per_frame, h, d)
    k_sel, v_sel = torch.gather(kf, 1, index), torch.gather(vf, 1, index)
    k_out = torch.cat([k_sel, kf[:, rest]], dim=1).flatten(1, 2)
    v_out = torch.cat([v_sel, vf[:, rest]], dim=1).flatten(1, 2)
    return k_out, v_out


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
