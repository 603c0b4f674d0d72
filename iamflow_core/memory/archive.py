"""The identity memory's frame archive: frames of K/V tagged with the entity IDs they show, bounded in bytes.

Reference pictures of entities are archived as pinned frames (`ArchivedFrame.reference`): never evicted, counted
in the bound, and kept on the device they were made on, so bringing them back at a prompt switch is a copy within
the GPU rather than hundreds of MB from host memory.

`Archive` holds the generated frames in host memory and evicts past its byte bound; `greedy_cover` and `evict` are the
pure choices (which frames cover a prompt's entities, which frame to drop) with unit tests of their own.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..devices import own_stream, resolve_device
from ..models.rope import RopeTables
from .scoring import frame_descriptor

logger = logging.getLogger(__name__)


@dataclass
class ArchivedFrame:
    frame: int  # absolute latent frame index
    chunk: int
    segment: int
    entities: tuple[int, ...]
    text_score: float
    visual_score: float
    k: torch.Tensor = field(repr=False)  # [layers, B, T, H, D] rotated at `position`: host memory (pictures: device)
    v: torch.Tensor = field(repr=False)
    position: int = 0
    reference: str | None = None  # a reference picture (its name): pinned, never evicted
    # its mean key moved back to time 0 (`frame_descriptor`), made on the GPU before K goes to host memory:
    # [layers, B, H, D]; None while K stays on the device (pictures), where it is cheap to make again
    descriptor: torch.Tensor | None = field(default=None, repr=False)

    @property
    def pinned(self) -> bool:
        return self.reference is not None

    @property
    def quality(self) -> float:
        """Cross-chunk rank: the verifier's visual score, text relevance breaking ties."""
        return self.visual_score + 1e-3 * self.text_score

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def summary(self) -> dict[str, Any]:
        out = {"frame": self.frame, "chunk": self.chunk, "segment": self.segment, "entities": list(self.entities),
               "text_score": round(self.text_score, 4), "visual_score": round(self.visual_score, 4)}  # fmt: skip
        if self.pinned:
            out.update(reference=True, image=self.reference)
        return out


def greedy_cover(
    archive: list[ArchivedFrame], wanted: tuple[int, ...], max_frames: int, min_frames_multi_entity: int
) -> list[ArchivedFrame]:
    """Frames covering the wanted entity IDs: repeatedly take the frame showing the most still-uncovered IDs (ties:
    better quality, then newer), up to `max_frames`; with two or more wanted IDs, top up to
    `min_frames_multi_entity` frames with the best remaining frames that show any of them."""
    chosen: list[ArchivedFrame] = []
    uncovered = set(wanted)
    while uncovered and len(chosen) < max_frames:
        options = [f for f in archive if f not in chosen and uncovered & set(f.entities)]
        if not options:
            break
        best = max(options, key=lambda f: (len(uncovered & set(f.entities)), f.quality, f.frame))
        chosen.append(best)
        uncovered -= set(best.entities)
    floor = min(min_frames_multi_entity, max_frames) if len(set(wanted)) >= 2 else 0
    while len(chosen) < floor:
        options = [f for f in archive if f not in chosen and set(wanted) & set(f.entities)]
        if not options:
            break
        chosen.append(max(options, key=lambda f: (f.quality, f.frame)))
    return chosen


def evict(archive: list[ArchivedFrame], limit_bytes: int, keep: int = 1) -> list[ArchivedFrame]:
    """Drop frames until the archive fits `limit_bytes` (keeping at least `keep` frames besides the pinned ones,
    which are never dropped): first the worst frame whose entities all appear in other frames (redundant), else the
    worst frame. Returns the evicted frames."""
    gone = []
    while len([f for f in archive if not f.pinned]) > keep and sum(f.nbytes for f in archive) > limit_bytes:

        def redundant(f: ArchivedFrame) -> bool:
            others = set().union(*(set(g.entities) for g in archive if g is not f))
            return set(f.entities) <= others

        candidates = [f for f in archive if not f.pinned]
        pool = [f for f in candidates if redundant(f)] or candidates
        worst = min(pool, key=lambda f: (f.quality, f.frame))
        archive.remove(worst)
        gone.append(worst)
    return gone


class Archive:
    """Archived frames under a byte bound: generated ones in host memory, pictures on their device. Iterating gives
    the frames, oldest first."""

    def __init__(self, limit_bytes: int, keep: int) -> None:
        self.limit_bytes, self.keep = limit_bytes, keep  # keep: never evict below this many frames
        self.frames: list[ArchivedFrame] = []
        self.peak_bytes = 0

    def __iter__(self) -> Iterator[ArchivedFrame]:
        return iter(self.frames)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.frames)

    def add(self, entry: ArchivedFrame) -> tuple[bool, list[ArchivedFrame]]:
        """Archive `entry` (its K/V may still be on the GPU); evict to the bound. Returns whether `entry` stayed
        and the evicted frames. Only a frame that keeps its place is copied to host memory, so the bound holds
        strictly."""
        self.frames.append(entry)
        gone = evict(self.frames, self.limit_bytes, keep=self.keep)
        kept = entry in self.frames
        if kept:
            entry.k, entry.v = to_host(entry.k), to_host(entry.v)
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        return kept, gone

    def check_room(self, count: int, frame_bytes: int) -> None:
        """Fail clearly when `count` reference frames of `frame_bytes` each do not fit the bound together."""
        need = count * frame_bytes
        if need > self.limit_bytes:
            mb = -(-need // 2**20)
            raise ValueError(
                f"{count} reference pictures take {mb} MB of the identity archive, more than its bound of "
                f"{self.limit_bytes // 2**20} MB; raise archive_limit_mb (--archive-limit-mb) to at least "
                f"{-(-mb // 64) * 64} or give fewer pictures"
            )

    def pin(self, entries: list[ArchivedFrame]) -> None:
        """Archive reference frames, which are never evicted; they must fit the bound together. They stay where
        their K/V are (the DiT's GPU): a few pictures are brought back at every switch that names their entity."""
        if entries:
            self.check_room(len(entries), max(f.nbytes for f in entries))
        self.frames += entries
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def descriptors(self, rope: RopeTables, like: torch.Tensor) -> torch.Tensor:
        """Each frame's mean key moved back to time 0 (`frame_descriptor`): [n, layers, B, H, D] on `like`'s
        device. Frames archived with their descriptor are not read again (their K may be in host memory)."""
        if like.is_cuda and any(f.descriptor is None and not f.k.is_cuda for f in self.frames):
            copy_stream(like.device).synchronize()  # host copies read on the CPU: let them land
        return torch.stack(
            [
                (f.descriptor if f.descriptor is not None else frame_descriptor(f.k, f.position, rope)).to(like.device)
                for f in self.frames
            ]
        )


_copy_streams: dict[torch.device, torch.cuda.Stream] = {}


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream a GPU's archive copies run on: the copy engine moves frames while the SMs sample. "cuda" is
    the current GPU, so it names the same stream as "cuda:N" (tensors always report their index)."""
    device = resolve_device(device)
    if device not in _copy_streams:
        _copy_streams[device] = own_stream(device, None)
    return _copy_streams[device]


def _page_locked(nbytes: int) -> torch.Tensor:
    """A uint8 host buffer of exactly `nbytes`, page-locked for asynchronous copies: zero-filled pageable memory (its
    pages touched by PyTorch's CPU threads) registered with CUDA. PyTorch's pinned allocator rounds each block up to
    a power of two, and making a fresh one blocked kernel launches from other threads meanwhile: measured on an H200
    host for one frame's K (144 MB), 129 ms a buffer with launches from another thread stalled throughout (p99 153 ms)
    against 21-45 ms for this one, the other thread's launches unaffected (p99 0.14 ms). Falls back to PyTorch's
    allocator where registering fails."""
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    if int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)) != 0:
        logger.debug("cudaHostRegister failed; a pinned buffer from PyTorch's allocator instead")
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return buffer


def _nbytes(shape: torch.Size, dtype: torch.dtype) -> int:
    return shape.numel() * dtype.itemsize


class HostBuffers:
    """Page-locked host buffers for archived frames' K and V, made once and reused for the life of the process.

    A buffer is lent as a tensor view and comes back when that view is dropped (its frame evicted, its story over),
    so a later frame, or the next story in a ComfyUI session, takes it without allocating. `reserve` makes the
    buffers a story will need on a thread ahead of time: the identity memory archives its first frames a few chunks
    in, and making them then cost the sampler's thread 0.1-0.17 s a buffer (an H200 host, PyTorch's pinned allocator).
    Reusing a buffer is safe for the archive's stream-ordered copies: a host copy is written on the copy stream
    after the work queued before it (`to_host`), which includes every read of the buffer's previous frame."""

    def __init__(self, make: Callable[[int], torch.Tensor] = _page_locked) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._made: dict[int, int] = defaultdict(int)  # buffers made per size (free or lent)
        self._filler: threading.Thread | None = None
        self._stop = threading.Event()  # set at exit: a reserve under way stops after the buffer in hand
        atexit.register(self._stop_filling)

    def lend(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised host tensor of `shape` and `dtype` in a page-locked buffer; the buffer goes back to the
        pool when this tensor object is gone. Views made from it do not hold the buffer: keep the tensor itself (the
        archive keeps each frame's K and V, and copies from them, never views of them)."""
        nbytes = _nbytes(shape, dtype)
        with self._lock:
            free = self._free[nbytes]
            buffer = free.pop() if free else None
        if buffer is None:  # none free: made here, on the caller's thread (a profiler range names it in traces)
            with torch.profiler.record_function("iamflow.archive.new_host_buffer"):
                buffer = self._new(nbytes)
        view = buffer.view(dtype).view(shape)
        weakref.finalize(view, self._give, buffer)
        return view

    def reserve(self, shape: torch.Size, dtype: torch.dtype, count: int) -> None:
        """Make buffers on a thread until `count` of this size exist (free or lent); returns at once. A failure is
        logged and the buffers are made when needed."""
        nbytes = _nbytes(shape, dtype)
        with self._lock:
            if self._made[nbytes] >= count or (self._filler is not None and self._filler.is_alive()):
                return
            self._filler = threading.Thread(target=self._fill, args=(nbytes, count), name="iamflow-host-buffers",
                                            daemon=True)  # fmt: skip
            self._filler.start()

    def made(self, shape: torch.Size, dtype: torch.dtype) -> int:
        """How many buffers of this size exist (free or lent)."""
        with self._lock:
            return self._made[_nbytes(shape, dtype)]

    def wait(self) -> None:
        """Wait for a `reserve` under way (tests, benchmarks)."""
        filler = self._filler
        if filler is not None:
            filler.join()

    def _stop_filling(self) -> None:
        """At exit, let a reserve under way finish its buffer and stop, so the interpreter does not tear down under
        a thread inside PyTorch (which aborts the process)."""
        self._stop.set()
        self.wait()

    def _fill(self, nbytes: int, count: int) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    if self._made[nbytes] >= count:
                        return
                self._give(self._new(nbytes))
        except Exception:  # noqa: BLE001 - only a head start: `lend` makes what is missing
            logger.warning("reserving host buffers for the archive failed; they are made when needed", exc_info=True)

    def _new(self, nbytes: int) -> torch.Tensor:
        buffer = self._make(nbytes)
        with self._lock:
            self._made[nbytes] += 1
        return buffer

    def _give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free[buffer.numel()].append(buffer)


host_buffers = HostBuffers()


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a frame's K or V. From a GPU it goes to a page-locked buffer of `host_buffers` on the copy
    stream, beside the sampling (a frame is 144 MB of K at full size): `t` is kept until the copy is done, GPU reads
    of the copy wait for it (`to_device`), and host reads synchronise first (`Archive.descriptors`)."""
    if not t.is_cuda:
        return t.cpu()
    host = host_buffers.lend(t.shape, t.dtype)
    stream = copy_stream(t.device)
    stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written by the work queued so far
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
    t.record_stream(stream)
    return host


class HostValues:
    """A small GPU result (scores) on its way to the host: copied to pinned memory behind the work that makes it, so
    making it never stops the loop, and `tolist` waits for that work only, not for the chunks queued after it."""

    def __init__(self, t: torch.Tensor) -> None:
        self._done = None
        if t.is_cuda:
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(t.device))
        else:
            self._host = t

    def ready(self) -> bool:
        """Whether `tolist` would return without waiting."""
        return self._done is None or self._done.query()

    def tolist(self) -> list:
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()


def to_device(
    frames: list[ArchivedFrame], name: str, like: torch.Tensor, on_device: dict[int, torch.Tensor] | None = None
) -> torch.Tensor:
    """The frames' K (or V) side by side along the token axis, on `like`'s device and dtype: [L, B, n*T, H, D].
    Each frame is copied straight into place (no host-side concatenation of hundreds of MB). on_device: copies
    already on the GPU by `id(frame)` (a frame still in the memory segment, one just archived), taken instead of
    the host copy."""
    on_device = on_device or {}
    parts = [on_device.get(id(f), getattr(f, name)) for f in frames]
    tokens = parts[0].shape[2]
    out = torch.empty((*parts[0].shape[:2], tokens * len(parts), *parts[0].shape[3:]), device=like.device,
                      dtype=like.dtype)  # fmt: skip
    if like.is_cuda and any(not p.is_cuda for p in parts) and like.device in _copy_streams:
        torch.cuda.current_stream(like.device).wait_stream(_copy_streams[like.device])  # host copies still landing
    for i, part in enumerate(parts):
        out[:, :, i * tokens : (i + 1) * tokens].copy_(part, non_blocking=part.is_cuda or part.is_pinned())
    return out
