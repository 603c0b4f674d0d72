"""The clean pass on a second GPU, one layer behind the next chunk's first forward.

Every chunk costs the DiT four denoising forwards and a fifth, the clean pass at t = 0 that writes the chunk's K/V
into the cache. On two GPUs the DiT's GPU runs all five and is busy ~99 % of a steady chunk, while the second GPU
decodes and verifies and idles half the time. Here a copy of the DiT on the second GPU runs the clean pass instead,
at the same time as the DiT's GPU starts the next chunk. That chunk needs the clean K/V only layer by layer: its
layer l attends to them after the clean pass's layer l made them. So the second GPU pushes each layer's K/V into
the DiT's cache as soon as they exist (`kernels.push`: peer writes over NVLink, then a per-layer counter there), and
the DiT's forward waits for that layer's count before its attention (`kernels.wait_count`). Both run inside the CUDA
graphs of the two forwards; the DiT's GPU then makes a chunk in four forwards and one layer.

The second GPU keeps a whole mirror of the cache (`SendingCache`). Every pass that writes the cache runs there (the
clean pass, a recache at a prompt switch, a start image), and the memory segment is copied there when it changes.
The DiT's cache (`ReceivingCache`) keeps the same books and takes the K/V from the pushes; whatever reads a frame
whose K/V are still on their way (the memory archiving it, keys moved in time) waits for them first.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .cache import KVCache, Rotate
from .devices import own_stream
from .memory.archive import HostValues
from .models import kernels
from .models.dit import CausalWanDiT, CrossKV
from .models.graphs import GraphRunner

logger = logging.getLogger(__name__)


class ReceivingCache(KVCache):
    """The DiT's cache when another GPU writes the K/V of the frames it keeps (`Relay`).

    Its forwards wait, layer by layer, for the pushes counted so far (`expect`); a commit only keeps the books. On
    the CPU (tests) the pushes are plain copies made before anything reads them, and nothing waits."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        device = self.k.device
        self.counter = torch.zeros(self.k.shape[0], dtype=torch.int32, device=device)  # pushes' programs per layer
        self.target = torch.zeros(1, dtype=torch.int32, device=device)  # the count every layer must reach
        self.error = torch.zeros(1, dtype=torch.int32, device=device)  # 1 when a wait gave up
        self.expected = 0
        self.mirror: SendingCache | None = None
        self.second: SecondGPU | None = None  # the mirror's GPU, which copies the memory segment across
        self._arriving: set[int] = set()

    def arriving(self, frames: Sequence[int]) -> bool:
        return not self._arriving.isdisjoint(frames)

    def expect(self, frames: Sequence[int], programs: int) -> None:
        """The K/V of these frames are pushed into their window slots, which adds `programs` to each layer's count."""
        self._arriving.update(frames)
        self.expected += programs
        if self.k.is_cuda:
            self.target.fill_(self.expected)  # on the stream, before the forwards that wait for it

    def settle(self) -> None:
        """Hold the current stream until every push counted so far has landed (reading their frames is then safe)."""
        if self._arriving:
            for layer in range(self.k.shape[0]):
                self._wait(layer)
            self._arriving.clear()

    def _wait(self, layer: int) -> None:
        if self.k.is_cuda:
            kernels.wait_count(self.counter[layer], self.target, self.error)

    # the forward's side: a wait before each layer's attention ---------------------------------------------------
    def begin(self, frames: Sequence[int], rotate: Rotate | None = None):
        layout = super().begin(frames, rotate)
        self._arriving.clear()  # the forward that follows waits for every layer before reading it
        return layout

    def context(self, layer: int, k_query: torch.Tensor, v_query: torch.Tensor, q: torch.Tensor | None = None):
        # Always launched on a GPU, even with nothing to wait for: a CUDA graph captured now replays it later.
        self._wait(layer)
        return super().context(layer, k_query, v_query, q)

    # readers of stored K/V wait for theirs -------------------------------------------------------------------------
    def _frame_tokens(self, frame: int) -> tuple[int, int, int]:
        if frame in self._arriving:
            self.settle()
        return super()._frame_tokens(frame)

    def _place_window_slot(self, i: int, frame: int, want: int, rotate: Rotate | None) -> None:
        if self.slot_positions[i] != want:  # keys move in time: they must be there
            self.settle()
        super()._place_window_slot(i, frame, want, rotate)

    def _keep(self, src: tuple[int, int], dst: tuple[int, int]) -> None:
        pass  # the second GPU pushes these K/V (`SendingCache.context`)

    # the memory segment goes to the mirror too -----------------------------------------------------------------------
    def set_memory(
        self, k: torch.Tensor, v: torch.Tensor, frames: Sequence[int], positions: Sequence[int] | None = None
    ) -> None:
        super().set_memory(k, v, frames, positions)
        if self.mirror is not None and frames:
            self.mirror.set_memory(*self.second.bring(k, v), frames, positions)

    def clear_memory(self) -> None:
        super().clear_memory()
        if self.mirror is not None:
            self.mirror.clear_memory()


class SendingCache(KVCache):
    """The mirror of a `ReceivingCache` on the second GPU: an ordinary cache whose forwards also push each layer's
    chunk K/V into the receiver's window slots where its commit will keep them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.peer: ReceivingCache | None = None
        device, capacity = self.k.device, self.query_capacity
        self.src_offsets = torch.zeros(capacity, dtype=torch.int64, device=device)  # element offsets, per frame
        self.dst_offsets = torch.zeros(capacity, dtype=torch.int64, device=device)
        self._offsets: tuple[list[int], list[int]] = ([], [])
        self.pushes = 0  # forwards run outside a capture that pushed every layer (a replay pushes too)

    @property
    def frame_elements(self) -> int:
        """Elements of one frame's K (or V) in one layer."""
        return self.tokens_per_frame * self.k.shape[3] * self.k.shape[4]

    def begin(self, frames: Sequence[int], rotate: Rotate | None = None):
        layout = super().begin(frames, rotate)
        where = dict(self.placements()[1])
        size = self.frame_elements
        src = [j * size for j in range(len(self._query_frames))]
        dst = [self._window_slot(where[f]) * size if f in where else -1 for f in self._query_frames]
        self._offsets = (src, dst)
        for static, values in ((self.src_offsets, src), (self.dst_offsets, dst)):
            host = torch.tensor(values, dtype=torch.int64)
            static[: len(values)].copy_(host.pin_memory() if static.is_cuda else host, non_blocking=True)
        return layout

    def push_programs(self) -> int:
        """What one forward's pushes add to each layer's count in the receiver (nothing counts on the CPU)."""
        if not self.k.is_cuda:
            return 0
        return 2 * kernels.push_programs(self.frame_elements) * len(self._query_frames)

    def context(self, layer: int, k_query: torch.Tensor, v_query: torch.Tensor, q: torch.Tensor | None = None):
        out = super().context(layer, k_query, v_query, q)
        start, end = self.layout.query_range
        parts, size, gpu = len(self._query_frames), self.frame_elements, self.k.is_cuda
        for mine, theirs in ((self.k, self.peer.k), (self.v, self.peer.v)):
            src, dst = mine[layer, 0, start:end], theirs[layer, 0]
            if gpu:
                kernels.push(src, dst, self.src_offsets[:parts], self.dst_offsets[:parts], self.peer.counter[layer],
                             size)  # fmt: skip
                continue
            for s, d in zip(*self._offsets):
                if d >= 0:
                    dst.view(-1)[d : d + size] = src.reshape(-1)[s : s + size]
        if layer == self.k.shape[0] - 1 and not (gpu and torch.cuda.is_current_stream_capturing()):
            self.pushes += 1
        return out


@contextmanager
def _on(device: torch.device, stream: torch.cuda.Stream | None) -> Iterator[None]:
    """`device` and its `stream` current (a GPU), or nothing (the CPU)."""
    if stream is None:
        yield
        return
    with torch.cuda.device(device), torch.cuda.stream(stream):
        yield


def replicate(dit: CausalWanDiT, device: torch.device) -> CausalWanDiT:
    """A copy of `dit` on `device` for clean passes: the same modules (FP8 linears, merged LoRA), its weights copied
    across, none of its CUDA graphs or device-bound tables. It runs one forward a chunk, so it captures a layout's
    graph at the layout's second chunk (the DiT's own waits for a chunk's five forwards)."""
    memo: dict[int, object] = {id(dit._graphs): GraphRunner(eager_runs=1)}
    for t in (*dit.parameters(), *dit.buffers()):
        moved = t.detach().to(device)
        memo[id(t)] = torch.nn.Parameter(moved, requires_grad=False) if isinstance(t, torch.nn.Parameter) else moved
    replica = copy.deepcopy(dit, memo)
    replica.reset_buffers()
    return replica


class SecondGPU:
    """A copy of the DiT on another GPU that runs every pass writing the KV cache (`Relay`, one per story).

    Needs a GPU the DiT's GPU can reach directly (peer access, NVLink or PCIe) and Triton for the signal kernels.
    On the CPU (tests) `device` may be the CPU: the same books, plain copies."""

    def __init__(self, dit: CausalWanDiT, device: torch.device | str) -> None:
        device = torch.device(device)
        if device.type != dit.device.type:
            raise ValueError(
                f"the clean pass goes to the same kind of device as the DiT's ({dit.device}), not {device}: with the "
                "DiT on a GPU name another GPU such as cuda:1"
            )
        if dit.device.type == "cuda":
            _check_pair(dit.device, device)
            _enable_peer_access(dit.device, device)
        self.device = device
        self.replica = replicate(dit, device)
        # The passes run at the highest priority PyTorch gives (a value past its range maps to the end): their pushes
        # gate the DiT's GPU, and the VAE decode and the verifier share this GPU. Copies from the DiT's GPU come in
        # on a stream of their own (`bring`).
        gpu = device.type == "cuda"
        self.stream = own_stream(device, self, priority=-(1 << 10)) if gpu else None
        self.copies = own_stream(device, self) if gpu else None
        size = sum(t.nbytes for t in (*self.replica.parameters(), *self.replica.buffers()))
        logger.info("clean passes on %s, one layer behind the DiT on %s (a copy of the DiT there: %.1f GB)", device,
                    dit.device, size / 1e9)  # fmt: skip

    def bring(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Copies on this GPU of tensors of the DiT's GPU, made after the work queued there so far; the passes wait
        for them. Neither GPU's working stream waits for the other's work (a copy with this GPU's working stream
        current would make the DiT's GPU wait for the pass under way)."""
        if self.stream is None:
            return [t.to(self.device) for t in tensors]
        self.copies.wait_stream(torch.cuda.current_stream(tensors[0].device))
        with _on(self.device, self.copies):
            out = [t.to(self.device, non_blocking=True) for t in tensors]
        self.stream.wait_stream(self.copies)
        for t in out:
            t.record_stream(self.stream)  # its memory is not reused before the passes read it
        return out

    def pair(self, dit: CausalWanDiT, cfg, tokens_per_frame: int) -> tuple[ReceivingCache, Relay]:
        """A story's cache on the DiT's GPU and the relay that writes it from this GPU."""
        if cfg.sink_ema or cfg.sparse_topk:
            raise ValueError(
                "the clean pass on a second GPU does not support an EMA sink or sparse memory activation "
                f"(sink_ema={cfg.sink_ema}, sparse_topk={cfg.sparse_topk}); run the clean pass on the DiT's GPU"
            )
        cache = dit.new_cache(cfg, tokens_per_frame, kind=ReceivingCache)
        with _on(self.device, self.stream):
            mirror = self.replica.new_cache(cfg, tokens_per_frame, kind=SendingCache, dtype=cache.k.dtype)
        return cache, Relay(dit, self, cache, mirror)


@dataclass(frozen=True)
class Written:
    """A clean pass sent to the second GPU: the latents' copy there, and events on that GPU after the copy and after
    the pass (None on the CPU), for work there that takes them (the VAE decode)."""

    latents: torch.Tensor
    copied: torch.cuda.Event | None
    done: torch.cuda.Event | None


def _event(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


class Relay:
    """One story's clean passes on the second GPU (`SecondGPU.pair`)."""

    def __init__(self, dit: CausalWanDiT, gpu: SecondGPU, cache: ReceivingCache, mirror: SendingCache) -> None:
        self.dit, self.gpu, self.cache, self.mirror = dit, gpu, cache, mirror
        mirror.peer, cache.mirror, cache.second = cache, mirror, gpu
        with _on(gpu.device, gpu.stream):
            self.zero = torch.zeros(1, device=gpu.device)
        self._cross: tuple[CrossKV, CrossKV] | None = None  # (the DiT's conditioning, its copy on the second GPU)
        self._error: HostValues | None = None  # the wait's flag on its way to the host

    def clean_pass(self, latents: torch.Tensor, cross: CrossKV, first: int) -> Written:
        """Write latent frames first, first + 1, ... into both caches under `cross`, from the second GPU. Returns the
        latents' copy there."""
        self._check()
        replica, mirror, gpu = self.gpu.replica, self.mirror, self.gpu
        z, *kv = gpu.bring(latents, *self._cross_parts(cross))
        if kv:
            self._cross = (cross, CrossKV(*kv))
        copied = _event(gpu.copies)
        with _on(gpu.device, gpu.stream):
            pushes, replays = mirror.pushes, replica.graph_replays
            replica.write_chunk(z, self.zero, self._cross[1], mirror, first)
            runs = mirror.pushes - pushes + replica.graph_replays - replays  # a capture runs once more before it
        done = _event(gpu.stream)
        # the same books on the DiT's cache; its K/V are on their way
        pt, ph, pw = self.dit.cfg.patch_size
        frames = range(first, first + latents.shape[2] // pt)
        KVCache.begin(self.cache, frames, self.dit.rotator(latents.shape[3] // ph, latents.shape[4] // pw))
        kept = [frame for frame, _ in self.cache.placements()[1]]
        self.cache.commit()
        self.cache.expect(kept, runs * mirror.push_programs())
        return Written(z, copied, done)

    def close(self) -> None:
        """Unlink the two caches (they refer to each other): a finished story's caches are freed at once, not at
        the next garbage collection (GBs on both GPUs)."""
        self.cache.mirror = self.cache.second = self.mirror.peer = None
        self._cross = None

    def _cross_parts(self, cross: CrossKV) -> tuple[torch.Tensor, ...]:
        """The conditioning's K and V to bring across when it changed (a new prompt, a soft switch's blend), else
        nothing (its copy is kept)."""
        if self._cross is not None and self._cross[0] is cross:
            return ()
        return (cross.k, cross.v)

    def _check(self) -> None:
        """Raise if a wait of the DiT's GPU gave up (read a chunk late, without waiting for the GPU)."""
        if not self.cache.error.is_cuda:
            return
        if self._error is not None and self._error.ready():
            if self._error.tolist()[0]:
                raise RuntimeError(
                    f"the DiT's GPU waited more than {kernels.WAIT_LIMIT} spins (~13 s) for the clean pass on "
                    f"{self.gpu.device}: that GPU stopped or fell far behind. Render with the clean pass on the DiT's "
                    "GPU (--clean-pass-device none, or the sampler's clean_pass dit_gpu)"
                )
            self._error = None
        if self._error is None:
            self._error = HostValues(self.cache.error)


def _check_pair(dit_device: torch.device, device: torch.device) -> None:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(f"{device}: this machine has {torch.cuda.device_count()} GPU(s); name one of them")
    if index != dit_device.index and not torch.cuda.can_device_access_peer(dit_device.index, index):
        raise ValueError(
            f"{dit_device} cannot write to {device} directly (no peer access between them); run the clean pass on "
            "the DiT's GPU, or pick a GPU linked to it (`nvidia-smi topo -m`)"
        )
    if not kernels.available(torch.empty(0, device=dit_device)):
        raise ValueError(f"the clean pass on a second GPU needs Triton's kernels: {kernels.NEEDS}")


def _enable_peer_access(a: torch.device, b: torch.device) -> None:
    """PyTorch enables peer access between two GPUs at their first copy; the push kernels write across before."""
    if a != b:
        for src, dst in ((a, b), (b, a)):
            torch.empty(1, device=dst).copy_(torch.zeros(1, device=src))
