"""Streaming VAE decode beside the sampler: each chunk's latents go in, its uint8 frames come out.

`Decoder.submit` returns a handle whose `result()` gives ``(frames, seconds)``. Three ways, the same frames:

- overlapped: a worker thread (on its own CUDA stream) decodes chunk k while the loop denoises chunk k+1; for a
  VAE on its own GPU;
- queued (in turn on a GPU): the decode is queued on the stream behind the chunk and its frames are copied to
  pinned host memory without waiting; they are read when the chunk is handed out, when the GPU is already busy
  with the next chunk. The host never stands between two chunks on the GPU (writing, previews, Python);
- in turn on the CPU: decoded right away.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch

from .devices import own_stream
from .models import fused
from .models.vae import WanVAE
from .video import uint8_frames_on_device


class QueuedDecode:
    """A chunk's decode queued on a GPU, its frames on their way to pinned host memory. `result()` waits for them
    (once), hands them to `on_frames` and returns ``(frames, seconds)`` like the worker's future does."""

    def __init__(self, chunk: int, host: torch.Tensor, done: torch.cuda.Event, seconds: float, on_frames) -> None:
        self.chunk, self.host, self.done, self.seconds, self.on_frames = chunk, host, done, seconds, on_frames
        self.value: tuple[np.ndarray, float] | None = None

    def result(self) -> tuple[np.ndarray, float]:
        if self.value is None:
            start = time.perf_counter()
            self.done.synchronize()
            frames = self.host.numpy().copy()  # pageable: the pinned block goes back to the allocator's cache
            self.host = None
            self.value = frames, self.seconds + time.perf_counter() - start
            if self.on_frames is not None:
                self.on_frames(self.chunk, frames)
        return self.value

    def cancelled(self) -> bool:
        return False


Pending = Future | QueuedDecode


class Decoder:
    """One video's streaming decode on the VAE's device (see the module docstring for the three ways).

    on_frames(chunk, frames) is called as soon as a chunk's frames are on the host (from the worker thread when
    overlapped). `sync` (the pipeline's profile mode) waits for each queued decode, so its seconds are the GPU's.
    """

    def __init__(self, vae: WanVAE, overlap: bool, on_frames=None, sync: bool = False) -> None:
        self.vae = vae
        self.on_frames = on_frames
        self.device, self.dtype = vae.device, vae.dtype
        self.state = vae.new_decode_state()
        self.sync = sync
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="iamflow-vae") if overlap else None
        self.stream = own_stream(self.device, self) if overlap and self.device.type == "cuda" else None

    def submit(self, chunk: int, latents: torch.Tensor, after: torch.cuda.Event | None = None) -> Pending:
        """Decode a chunk's latents. after: an event the decode waits for instead of the work queued so far on the
        latents' GPU (the clean pass on the VAE's GPU, which made its own copy of them after that work)."""
        ready = after
        if ready is None and latents.is_cuda:  # the decode's stream must wait for the DiT's work that made them
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(latents.device))
        if self.pool is not None:  # the worker decodes as the submitting thread would (`fused.eager`)
            return self.pool.submit(self._decode, chunk, latents, ready, fused.eager_now())
        if self.device.type == "cuda":
            return self._queue(chunk, latents, ready)
        done: Future = Future()
        done.set_result(self._decode(chunk, latents, ready))
        return done

    def _video(self, latents: torch.Tensor, ready: torch.cuda.Event | None) -> torch.Tensor:
        """Queue the decode on the current stream of the VAE's device: uint8 frames [T, H, W, 3] there.

        The worker thread holds the launch lock (`fused.launch_guard`) layer by layer (`fused.launch_turn`), not for
        the whole decode: launching a decode takes it tens of ms, which the sampler's thread, waiting for the lock to
        launch its next chunk, spent idle with the DiT's GPU (2x H200, iamflow, the clean pass on the second GPU:
        gaps of 25-46 ms before every chunk; held layer by layer, none, and 42.23 FPS against 38.68). Decoding in
        turn on the sampler's own thread holds it once."""
        overlapped = self.pool is not None
        with nullcontext() if overlapped else fused.launch_guard():
            step = fused.launch_turn if overlapped else nullcontext
            with step():
                if ready is not None and self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).wait_event(ready)
                z = latents.to(self.device, self.dtype, non_blocking=True)
            video = self.vae.decode_stream(z, self.state, step)
            with step():
                return uint8_frames_on_device(video)

    def _queue(self, chunk: int, latents: torch.Tensor, ready: torch.cuda.Event | None) -> QueuedDecode:
        start = time.perf_counter()
        with torch.no_grad(), torch.cuda.device(self.device):
            frames = self._video(latents, ready)
            host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        if self.sync:
            done.synchronize()
        return QueuedDecode(chunk, host, done, time.perf_counter() - start, self.on_frames)

    def _decode(
        self, chunk: int, latents: torch.Tensor, ready: torch.cuda.Event | None, eager: bool = False
    ) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        stream = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with torch.no_grad(), stream, fused.eager() if eager else nullcontext():
            frames = self._video(latents, ready).cpu().numpy()  # waits for the decode, outside the launch lock
        seconds = time.perf_counter() - start
        if self.on_frames is not None:
            self.on_frames(chunk, frames)
        return frames, seconds

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
