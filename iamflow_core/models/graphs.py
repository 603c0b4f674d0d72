"""CUDA graphs of the DiT's chunk forward: one captured graph per attention layout, replayed chunk after chunk.

A streaming forward launches about a thousand small kernels; at Wan's chunk shapes the host needs about as long
to launch them as the GPU needs to run them, so the GPU idles between kernels and a second thread (the VAE
decoder) slows it further. Once the KV cache is full, every chunk has the same shapes and the same buffer
addresses (the chunk's own K/V always go to the cache's query region, the context is a fixed view of the buffer,
and attention does not care in which slot a frame sits), so the forward can be captured once and replayed with a
single launch.

`GraphRunner.run(owner, key, fn, *inputs)` runs `fn(*inputs)` eagerly the first times a key is seen (which also
compiles the fused kernels), captures it on the next sighting, and from then on copies the inputs into the graph's
static buffers and replays. Everything `fn` reads besides `inputs` (weights, the cache buffer) must keep its address
while the graph lives: the key includes the cache buffer, and moving the model clears the graphs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, suppress

import torch

from ..devices import own_stream
from . import fused

logger = logging.getLogger(__name__)


# One capture at a time in the process, as PyTorch's CUDA graphs expect (their memory pools and the RNG state are
# process-wide). The sampler captures the DiT's forwards and the verifier's thread its answer step, at moments
# neither controls (an attention layout met after a prompt switch, answer buffers that grow). In 1-GPU iamflow
# renders with a trial answer step two such captures overlapped and both failed (cudaErrorStreamCaptureUnsupported
# in the verifier's, cudaErrorStreamCaptureInvalidated in the DiT's), which left both running eagerly for the rest
# of the story.
# Captures are few (a handful in a story), so one waiting for another's end is rare.
capture_lock = threading.Lock()


# Free GPU memory below which a capture first empties PyTorch's cache (`capturing`). A DiT forward's graph takes a
# few hundred MB from its pool.
ROOM_FOR_A_CAPTURE = 2 << 30


@contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool, stream: torch.cuda.Stream) -> Iterator[None]:
    """A capture of the work launched inside onto `stream`, as every capture here runs: in thread_local mode, holding
    `capture_lock`, and before it the launch lock of compiled kernels (`fused.launch_guard`), always in that order,
    so the two cannot deadlock.

    The launch lock keeps compiles out of a capture. Seen in a 1-GPU iamflow render (one H200): while the verifier's
    thread captured its answer step, the sampler loaded a compiled function from the kernel cache; the capture was
    invalidated (cudaErrorStreamCaptureInvalidated) and the load failed (cudaErrorStreamCaptureUnsupported), and
    the verifier decoded without graphs from then on. The sampler launches (and compiles) under that lock
    already; so a capture in the verifier's thread waits for the sampler's current launches, and the sampler for
    the capture (once or twice a story).

    Not `torch.cuda.graph`: before each capture it synchronises the GPU and empties PyTorch's caches of GPU and
    page-locked host memory, on every GPU. In a render that stalls the thread capturing until all the GPU's queued
    work is done (with the clean pass on the second GPU, a verifier's job there as well), frees the blocks the VAE
    decode and the archive's copies reuse (freeing memory synchronises again), and can leave the DiT's GPU idle (a
    render captures 2 graphs on each GPU: 2x H200, iamflow, 41.81 against 42.24 FPS in one process, no gain to
    measure). Nothing in a capture needs them: the capture stream waits for the work the captured run depends on,
    and the graph's memory comes from its own pool. Only where the GPU is nearly full (a 24-GB card) is PyTorch's
    cache emptied first, so that the pool has room without freeing memory during the capture.

    `stream` must be one no other thread launches on (`devices.own_stream`): work launched onto a stream being
    captured joins the capture."""
    launches = fused.launch_guard()
    before = torch.cuda.current_stream(), torch.cuda.current_stream(stream.device)
    try:
        with launches, capture_lock, torch.cuda.stream(stream):
            if torch.cuda.mem_get_info(stream.device)[0] < ROOM_FOR_A_CAPTURE:
                torch.cuda.empty_cache()
            graph.capture_begin(*(() if pool is None else (pool,)), capture_error_mode="thread_local")
            try:
                yield
            except BaseException:
                with suppress(RuntimeError):
                    graph.capture_end()  # ends the capture this failure broke; its own error says less
                raise
            graph.capture_end()
    finally:
        # Leave both GPUs' current streams as they were, also when the capture failed to begin or end (with
        # `torch.cuda.graph`, a failed capture left this thread launching on the capture stream; seen on an H200).
        for previous in reversed(before):  # the stream's GPU first, the current GPU's last (set_stream moves to it)
            torch.cuda.set_stream(previous)


def graphs_allowed() -> bool:
    """CUDA graphs are on unless IAMFLOW_CUDA_GRAPHS=0."""
    return os.environ.get("IAMFLOW_CUDA_GRAPHS", "1") != "0"


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphRunner:
    """Captured graphs by key, sharing one memory pool (they never run concurrently; outputs are copied out).

    eager_runs: how many eager runs of a key come before its capture. The default, one chunk's forwards (4 denoising
    + 1 clean pass), captures a layout when a second chunk uses it, never the warm-up chunks that fill the cache.
    max_graphs: captured graphs kept at once; further keys run eagerly.
    """

    def __init__(self, eager_runs: int = 5, max_graphs: int = 12) -> None:
        self.eager_runs = eager_runs
        self.max_graphs = max_graphs
        self._graphs: dict[Hashable, _Graph] = {}
        self._seen: dict[Hashable, int] = {}
        self._pool = None
        self._owner: Hashable | None = None
        self._side: torch.cuda.Stream | None = None  # the stream captures run on (`_capture_stream`)
        self.captures = 0  # graphs captured and replays run over this runner's life (not reset by clear)
        self.replays = 0
        self.capture_s = 0.0  # host seconds in captures (with their real run before) over its life

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph and its memory (call when the buffers a graph reads move or are freed)."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None
        self._owner = None

    def run(
        self, owner: Hashable, key: Hashable, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor
    ) -> torch.Tensor:
        """fn(*inputs), through a graph once `key` has run eagerly `eager_runs` times.

        owner: identifies the long-lived buffers fn writes (e.g. the KV cache); a new owner drops all graphs, so
        a finished story's graphs do not hold memory into the next.
        """
        if owner != self._owner:
            self.clear()
            self._owner = owner
        graph = self._graphs.get(key)
        if graph is None:
            seen = self._seen.get(key, 0)
            self._seen[key] = seen + 1
            if seen < self.eager_runs or len(self._graphs) >= self.max_graphs:
                return fn(*inputs)
            t0 = time.perf_counter()
            graph = self._capture(fn, inputs)
            self.capture_s += time.perf_counter() - t0
            if graph is None:
                return fn(*inputs)
            self._graphs[key] = graph
            self.captures += 1
        for static, value in zip(graph.inputs, inputs):
            static.copy_(value)
        graph.graph.replay()
        self.replays += 1
        return graph.output.clone()

    def _capture_stream(self, device: torch.device) -> torch.cuda.Stream:
        """This runner's capture stream on `device`: one of its own (`devices.own_stream`), kept for later captures
        instead of a new one from PyTorch's pool each time."""
        if self._side is None or self._side.device != device:
            self._side = own_stream(device, self)
        return self._side

    def _capture(self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> _Graph | None:
        static = tuple(x.clone() for x in inputs)
        device = static[0].device
        graph = torch.cuda.CUDAGraph()
        try:
            # On the inputs' GPU, which need not be the current one (a torchrun rank, a loader's device widget):
            # a capture stream of another GPU would record nothing and every replay would return this output.
            with torch.cuda.device(device):
                # One real run on a side stream first, as capture requires (libraries set up per-stream state
                # lazily); the capture then runs on that stream too.
                side = self._capture_stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    fn(*static)
                torch.cuda.current_stream(device).wait_stream(side)
                with capturing(graph, self._pool, side):
                    output = fn(*static)
        except RuntimeError as error:
            logger.warning("CUDA graph capture failed, running this forward eagerly from now on: %s", error)
            self.max_graphs = len(self._graphs)  # no further tries
            return None
        self._pool = graph.pool()
        logger.debug("captured a CUDA graph (%d kept)", len(self._graphs) + 1)
        return _Graph(graph, static, output)
