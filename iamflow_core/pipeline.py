"""The streaming story pipeline: a story (prompts with durations) becomes a video, chunk by chunk.

`StreamingPipeline.run` is an iterator of `ChunkEvent`s. Per chunk: draw noise, denoise in a few steps through
the KV cache, run one clean pass at t = 0 that writes the chunk into the cache, and decode it with the streaming
VAE on the VAE's device while the next chunk is being denoised. Prompt switches happen at chunk boundaries with a
transition strategy; what goes into the cache's memory segment is decided by a memory policy object.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .cache import KVCache
from .config import CacheConfig
from .memory import MemoryPolicy, NoMemory, StepContext
from .models import fused
from .models.dit import CausalWanDiT, CrossKV
from .models.vae import WanVAE
from .schedule import sigma, warp_timesteps
from .story import ChunkPlan, Story, plan_chunks
from .transition import TransitionConfig, soft_alpha, soft_window, text_distance
from .video import uint8_frames_on_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerConfig:
    height: int = 480
    width: int = 832
    steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    shift: float = 5.0
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    transition: TransitionConfig = field(default_factory=TransitionConfig)

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0 or self.height % 16 or self.width % 16:
            raise ValueError(
                f"video size {self.width}x{self.height} must be positive multiples of 16 (VAE 8x, patch 2x); "
                "e.g. 832x480"
            )
        if not self.steps:
            raise ValueError("steps must list at least one denoising timestep, e.g. (1000, 750, 500, 250)")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")


@dataclass(frozen=True)
class ChunkEvent:
    """One finished chunk. latents: [B, C, F, h, w] on the DiT device; frames: uint8 [T, H, W, 3] or None."""

    index: int
    num_chunks: int
    segment: int
    prompt: str
    start_frame: int
    latents: torch.Tensor
    frames: np.ndarray | None
    timings: dict[str, float]
    memory: dict[str, Any]


class _Decoded:
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


class _Decoder:
    """Streaming VAE decode on the VAE's device, in one of three ways that give the same frames:

    - overlapped: a worker thread (on its own CUDA stream) decodes chunk k while the loop denoises chunk k+1; for a
      VAE on its own GPU;
    - queued (in turn on a GPU): the decode is queued on the stream behind the chunk and its frames are copied to
      pinned host memory without waiting; they are read when the chunk is handed out, when the GPU is already busy
      with the next chunk. The host never stands between two chunks on the GPU (writing, previews, Python);
    - in turn on the CPU: decoded right away.

    `sync` (the pipeline's profile mode) waits for each queued decode, so its seconds are the GPU's.
    """

    def __init__(self, vae: WanVAE, overlap: bool, on_frames=None, sync: bool = False) -> None:
        self.vae = vae
        self.on_frames = on_frames  # (chunk, frames) -> None, called as soon as the frames are on the host
        self.device = next(vae.parameters()).device
        self.dtype = next(vae.parameters()).dtype
        self.state = vae.new_decode_state()
        self.sync = sync
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="iamflow-vae") if overlap else None
        self.stream = torch.cuda.Stream(self.device) if overlap and self.device.type == "cuda" else None

    def submit(self, chunk: int, latents: torch.Tensor) -> Future | _Decoded:
        ready = None
        if latents.is_cuda:  # the decode's stream must wait for the DiT's work that produced the latents
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(latents.device))
        if self.pool is not None:
            return self.pool.submit(self._decode, chunk, latents, ready)
        if self.device.type == "cuda":
            return self._queue(chunk, latents, ready)
        done: Future = Future()
        done.set_result(self._decode(chunk, latents, ready))
        return done

    def _video(self, latents: torch.Tensor, ready: torch.cuda.Event | None) -> torch.Tensor:
        """Queue the decode on the current stream of the VAE's device: uint8 frames [T, H, W, 3] there."""
        with fused.launch_guard():
            if ready is not None and self.device.type == "cuda":
                torch.cuda.current_stream(self.device).wait_event(ready)
            z = latents.to(self.device, self.dtype, non_blocking=True)
            return uint8_frames_on_device(self.vae.decode_stream(z, self.state))

    def _queue(self, chunk: int, latents: torch.Tensor, ready: torch.cuda.Event | None) -> _Decoded:
        start = time.perf_counter()
        with torch.no_grad(), torch.cuda.device(self.device):
            frames = self._video(latents, ready)
            host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        if self.sync:
            done.synchronize()
        return _Decoded(chunk, host, done, time.perf_counter() - start, self.on_frames)

    def _decode(self, chunk: int, latents: torch.Tensor, ready: torch.cuda.Event | None) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        stream = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with torch.no_grad(), stream:
            frames = self._video(latents, ready).cpu().numpy()  # waits for the decode, outside the launch lock
        seconds = time.perf_counter() - start
        if self.on_frames is not None:
            self.on_frames(chunk, frames)
        return frames, seconds

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Switch:
    """Prompt-transition state: the conditioning in force and, during a soft ramp, the one it blends from."""

    cross: CrossKV
    previous: CrossKV | None = None
    switch_frame: int = 0
    window: int = 0

    def cross_for(self, start_frame: int, cfg: TransitionConfig, chunk_frames: int) -> tuple[CrossKV, float | None]:
        if self.previous is None:
            return self.cross, None
        alpha = soft_alpha(start_frame - self.switch_frame, self.window, cfg, chunk_frames)
        if alpha is None:
            self.previous = None
            return self.cross, None
        return self.previous.blend(self.cross, alpha), alpha


class StreamingPipeline:
    """DiT + text encoder on one device, VAE (optional) on the same or another device.

    text_encoder: anything with `encode(list[str]) -> [B, text_len, text_dim]` (e.g. `TextEncoder`), or None when
    the caller passes precomputed text states to `run`.
    overlap_decode: decode chunk k in a worker thread while chunk k+1 is denoised. None (default) overlaps when the
    VAE has its own device; on the DiT's GPU the two compete for the same SMs and decoding in turn is faster
    (463 vs 484 ms per chunk on one H100). In turn on a GPU, the decode is queued behind its chunk and its frames
    are read back one chunk later, so the host's work between chunks never leaves the GPU idle.
    """

    def __init__(
        self,
        dit: CausalWanDiT,
        text_encoder: Any | None,
        vae: WanVAE | None = None,
        *,
        overlap_decode: bool | None = None,
        offload_text_encoder: bool = False,
        profile: bool = False,
        compile_kernels: bool | None = None,
    ) -> None:
        if compile_kernels if compile_kernels is not None else dit.device.type == "cuda":
            fused.enable()  # fused elementwise kernels: the first chunk compiles them (tens of seconds, once)
        self.dit = dit
        self.text_encoder = text_encoder
        self.vae = vae
        self.overlap_decode = overlap_decode
        self.offload_text_encoder = offload_text_encoder
        self.profile = profile

    # helpers -------------------------------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.profile and self.dit.device.type == "cuda":
            torch.cuda.synchronize(self.dit.device)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """umT5 states of each prompt, [N, text_len, text_dim] on the DiT device."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder; pass `texts` to run() or give it a TextEncoder")
        unique = list(dict.fromkeys(prompts))
        with torch.no_grad():
            states = self.text_encoder.encode(unique).to(self.dit.device)
        if self.offload_text_encoder and hasattr(self.text_encoder, "to"):
            self.text_encoder.to("cpu")
        return states[[unique.index(p) for p in prompts]]

    def _overlaps(self) -> bool:
        if self.overlap_decode is not None:
            return self.overlap_decode
        return self.vae is not None and next(self.vae.parameters()).device != self.dit.device

    def _latent_shape(self, cfg: SamplerConfig) -> tuple[int, int]:
        return cfg.height // 8, cfg.width // 8

    def _recache(self, cache: KVCache, history: deque, start_frame: int, cross: CrossKV, zero: torch.Tensor) -> int:
        """Re-run the clean pass over the latest frames under the new prompt (LongLive's KV recache)."""
        first = max(cache.cfg.sink_frames, start_frame - cache.query_capacity)
        frames = [z for f, z in history if first <= f < start_frame]
        if not frames:
            return 0
        latents = torch.cat(frames, dim=2)
        with fused.launch_guard():
            self.dit.forward_chunk(latents, zero, cross, cache, first, commit=True)
        return latents.shape[2]

    # the loop --------------------------------------------------------------------------------------------------------
    def run(
        self,
        story: Story,
        config: SamplerConfig | None = None,
        memory: MemoryPolicy | None = None,
        *,
        texts: torch.Tensor | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[ChunkEvent]:
        """Generate `story` chunk by chunk. Events come in order, each with its decoded frames (if a VAE is set).

        texts: optional precomputed umT5 states [N_segments, text_len, text_dim]. cancel: set it to stop after
        the chunk in progress; every chunk finished so far is still handed out.
        """
        config = config or SamplerConfig()
        memory = memory or NoMemory()
        cache_cfg, chunk_frames = config.cache, config.cache.chunk_frames
        plan: ChunkPlan = plan_chunks(story, chunk_frames=chunk_frames)
        for note in plan.rounding_notes():
            logger.info(note)
        logger.info(plan.summary())
        device = self.dit.device
        h, w = self._latent_shape(config)
        tokens_per_frame = (h // self.dit.cfg.patch_size[1]) * (w // self.dit.cfg.patch_size[2])

        # 1. Text: encode every prompt once (the encoder can then leave the GPU).
        t0 = time.perf_counter()
        texts = texts.to(device) if texts is not None else self.encode_prompts(list(story.prompts))
        if texts.shape[0] != plan.num_segments:
            raise ValueError(f"texts has {texts.shape[0]} prompts, the story {plan.num_segments} segments")
        with torch.no_grad():
            crosses = [self.dit.encode_text(texts[i : i + 1]) for i in range(plan.num_segments)]
        text_s = time.perf_counter() - t0

        # 2. State: cache, seeded noise, timesteps, decoder.
        cache = self.dit.new_cache(cache_cfg, tokens_per_frame=tokens_per_frame)
        generator = torch.Generator(device).manual_seed(story.seed if story.seed is not None else config.seed)
        ts = warp_timesteps(config.steps, config.shift)
        t_dev = [torch.full((1,), t, device=device) for t in ts]
        zero = torch.zeros(1, device=device)
        decoder = None
        if self.vae is not None:
            decoder = _Decoder(self.vae, self._overlaps(), memory.on_frames, sync=self.profile)
        switch = _Switch(crosses[0])
        history: deque = deque()
        noise_shape = (1, self.dit.cfg.in_channels, chunk_frames, h, w)

        def context(i: int, seg: int, start: int) -> StepContext:
            prompt = story.prompts[seg]
            tokenizer = getattr(self.text_encoder, "tokenizer", None)
            return StepContext(
                i,
                start,
                chunk_frames,
                seg,
                prompt,
                cache,
                switch.cross,
                texts[seg],
                self.dit.rope,
                tokenizer,
                decoding=decoder is not None,
                flush_frames=flush_frames,
            )

        def flush_frames() -> None:  # the frames of every chunk given to the decoder, through `on_frames`, now
            if pending is not None and pending[1] is not None:
                pending[1].result()

        pending: tuple[dict, Future | _Decoded | None] | None = None
        memory.start(context(0, 0, 0))
        try:
            for i in range(plan.num_chunks):
                if cancel is not None and cancel.is_set():
                    logger.info("cancelled after %d of %d chunks", i, plan.num_chunks)
                    break
                timings: dict[str, float] = {"text": text_s} if i == 0 else {}
                seg, start = plan.segment_of_chunk(i), i * chunk_frames
                with torch.no_grad():
                    # 3. Prompt switch at a segment boundary.
                    t0 = time.perf_counter()
                    if i in plan.switch_chunks:
                        self._switch(
                            switch, crosses[seg], texts[seg - 1], texts[seg], start, config, cache, history, zero
                        )
                    ctx = context(i, seg, start)  # one context per chunk: every hook reports into ctx.info
                    if i in plan.switch_chunks:
                        memory.on_switch(ctx)
                    chunk_cross, alpha = switch.cross_for(start, config.transition, chunk_frames)
                    self._sync()
                    timings["transition"] = time.perf_counter() - t0

                    # 4. Memory: the policy may fill the cache's memory segment.
                    t0 = time.perf_counter()
                    ctx.cross = chunk_cross
                    memory.before_chunk(ctx)
                    timings["memory"] = time.perf_counter() - t0

                    # 5. Denoise: few-step flow matching through the cache (read-only).
                    t0 = time.perf_counter()
                    x = torch.randn(noise_shape, generator=generator, device=device)
                    for j, t in enumerate(t_dev):
                        with fused.launch_guard():
                            velocity = self.dit.forward_chunk(x, t, chunk_cross, cache, start)
                        x0 = x - sigma(ts[j]) * velocity
                        if j + 1 < len(ts):
                            s = sigma(ts[j + 1])
                            x = (1 - s) * x0 + s * torch.randn(noise_shape, generator=generator, device=device)

                    # 6. Clean pass at t = 0 writes the chunk into the cache.
                    with fused.launch_guard():
                        self.dit.forward_chunk(x0, zero, chunk_cross, cache, start, commit=True)
                    self._sync()
                    timings["dit"] = time.perf_counter() - t0
                    history.append((start, x0))
                    while len(history) * chunk_frames > cache.query_capacity + chunk_frames:
                        history.popleft()
                    ctx.latents = x0
                    t0 = time.perf_counter()
                    memory.after_chunk(ctx)
                    timings["memory"] += time.perf_counter() - t0
                    if alpha is not None:
                        ctx.info["transition_alpha"] = alpha

                # 7. Decode on the VAE device while the next chunk is denoised; hand out the previous chunk.
                future = decoder.submit(i, x0) if decoder is not None else None
                if pending is not None:
                    yield self._finish(pending)
                event = {"index": i, "num_chunks": plan.num_chunks, "segment": seg, "prompt": story.prompts[seg]}
                event.update(start_frame=start, latents=x0, timings=timings, memory=ctx.info)
                pending = (event, future)
            if pending is not None:
                yield self._finish(pending)
        except (Exception, KeyboardInterrupt):
            # A failure or Ctrl-C while making chunk k+1 must not lose chunk k, already made: hand it out, then
            # re-raise on the caller's next call. (GeneratorExit, the caller closing us, is not caught.)
            if pending is not None and (pending[1] is None or not pending[1].cancelled()):
                finished, pending = pending, None
                yield self._finish(finished)
            raise
        finally:
            if decoder is not None:
                decoder.close()
            self.dit.release_graphs()  # no GPU memory held between stories (ComfyUI keeps the model loaded)

    def _switch(
        self, switch: _Switch, new: CrossKV, old_text: torch.Tensor, new_text: torch.Tensor, start: int,
        config: SamplerConfig, cache: KVCache, history: deque, zero: torch.Tensor,
    ) -> None:  # fmt: skip
        strategy = config.transition.strategy
        if strategy == "soft":
            window = soft_window(text_distance(old_text, new_text), config.transition, config.cache.chunk_frames)
            previous = switch.previous or switch.cross
            switch.previous, switch.window, switch.switch_frame = previous, window, start
        elif strategy == "recache":
            self._recache(cache, history, start, new, zero)
            switch.previous = None
        else:
            switch.previous = None
        switch.cross = new

    @staticmethod
    def _finish(pending: tuple[dict, Future | _Decoded | None]) -> ChunkEvent:
        event, future = pending
        frames = None
        if future is not None:
            t0 = time.perf_counter()
            frames, vae_s = future.result()
            event["timings"]["vae"] = vae_s
            event["timings"]["vae_wait"] = time.perf_counter() - t0
        return ChunkEvent(frames=frames, **event)
