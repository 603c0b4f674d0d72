"""The streaming story pipeline: a story (prompts with durations) becomes a video, chunk by chunk.

`StreamingPipeline.run` is an iterator of `ChunkEvent`s. Per chunk, in named steps: a prompt switch (the
transition policy and the memory policy), noise, a few denoising steps through the KV cache, one clean context
pass at t = 0 that writes the chunk into the cache, the memory's bookkeeping, and the decode (`decode.Decoder`) on
the VAE's device while the next chunk is made. What goes into the cache's memory segment is decided by a memory
policy (`memory/`), how the conditioning changes at a switch by a transition policy (`transition.py`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .cache import KVCache
from .config import CacheConfig, SamplerConfig
from .decode import Decoder, Pending
from .devices import to_device_async
from .memory import MemoryPolicy, NoMemory, StepContext
from .models import fused
from .models.dit import CausalWanDiT, CrossKV
from .models.vae import WanVAE
from .relay import Relay, SecondGPU, Written
from .schedule import sigma, warp_timesteps
from .story import ChunkPlan, Story, plan_chunks
from .transition import Switch, Transition, make_transition

logger = logging.getLogger(__name__)


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


# The cache a picture goes through alone (a reference frame): one frame, which lands in the sink slot.
REFERENCE_CACHE = CacheConfig(chunk_frames=1, sink_frames=1, window_frames=2, memory_frames=0)
# Prompts the text encoder takes at once: memory stays bounded however many prompts a story has.
ENCODE_BATCH = 32
# Profiler ranges around the memory policy's hooks are named with this prefix, so a trace (`bench.trace`) can tell
# the policy's GPU work and its host time from the sampler's.
MEMORY_HOOK = "iamflow.memory."


def _memory_hook(name: str) -> torch.profiler.record_function:
    return torch.profiler.record_function(MEMORY_HOOK + name)


def _frames_hook(memory: MemoryPolicy):
    """memory.on_frames inside its profiler range (it runs where the decoded frames arrive, often another thread)."""

    def on_frames(chunk: int, frames: np.ndarray) -> None:
        with _memory_hook("on_frames"):
            memory.on_frames(chunk, frames)

    return on_frames


class Prompts:
    """A story's prompts as umT5 states, kept on the CPU (one row per distinct prompt), and the prompt in force on
    the DiT's device: its states and its cross-attention K/V, made when its segment starts. Memory grows with the
    number of prompts only by their states; the K/V (about 94 MB a prompt at full size) exist for one or two."""

    def __init__(self, dit: CausalWanDiT, states: torch.Tensor, rows: list[int]) -> None:
        self.dit, self.states, self.rows = dit, states, rows  # states: [N_distinct, L, D]; rows[segment] -> row
        self._cache: dict[int, tuple[torch.Tensor, CrossKV]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _get(self, segment: int) -> tuple[torch.Tensor, CrossKV]:
        row = self.rows[segment]
        if row not in self._cache:
            text = to_device_async(self.states[row], self.dit.device)  # pageable .to(cuda) would wait for the GPU
            with torch.no_grad(), fused.eager():  # once per prompt: not worth a compile
                cross = self.dit.encode_text(text[None])
            self._cache = {r: v for r, v in self._cache.items() if r == self.rows[max(segment - 1, 0)]}
            self._cache[row] = (text, cross)
        return self._cache[row]

    def text(self, segment: int) -> torch.Tensor:
        """[text_len, text_dim] umT5 states of the segment's prompt, on the DiT's device."""
        return self._get(segment)[0]

    def cross(self, segment: int) -> CrossKV:
        return self._get(segment)[1]

    def host_text(self, segment: int) -> torch.Tensor:
        """The segment's umT5 states as kept on the CPU: host-side math on them does not wait for the GPU."""
        return self.states[self.rows[segment]]


def _decoded(decode: Pending | None) -> bool:
    """Whether a chunk can be handed out without the loop waiting for a decode that could leave the DiT's GPU idle:
    no decode, one queued on the DiT's GPU behind the chunk (the wait for it overlaps the next chunk there), or a
    decode worker's that is done. Waiting for a worker's decode of the previous chunk (the VAE, and the clean pass,
    on the second GPU) held the sampler 78-92 ms at a time in a story's first chunks, the DiT's GPU idle (2x H200)."""
    return not isinstance(decode, Future) or decode.done()


@dataclass
class _Run:
    """What one `run` holds: the plan, the prompts' conditioning, the cache, the noise and the policies."""

    story: Story
    plan: ChunkPlan
    memory: MemoryPolicy
    prompts: Prompts
    cache: KVCache
    transition: Transition
    generator: torch.Generator
    timesteps: list[float]  # warped, in [0, 1000]
    noise_shape: tuple[int, ...]
    decoder: Decoder | None
    text_seconds: float
    relay: Relay | None = None  # the clean passes on a second GPU
    written: Written | None = None  # the last clean pass sent to the second GPU
    in_flight: Pending | None = None  # the decode of the chunk made last, not handed out yet
    size: tuple[int, int] = (0, 0)  # the video's height and width
    first_frame: int = 0  # latent frames before chunk 0 (1 with a start image)
    lead: tuple[torch.Tensor, np.ndarray | None] | None = None  # the start image's latent and decoded frame
    start_info: dict[str, Any] = field(default_factory=dict)  # what the memory reported at the start (chunk 0's)
    t_dev: list[torch.Tensor] = field(default_factory=list)  # the timesteps as device tensors
    first: tuple[list[float], list[torch.Tensor]] | None = None  # chunk 0's own timesteps (and tensors), if any
    zero: torch.Tensor | None = None  # t = 0, the context pass's timestep

    @property
    def chunk_frames(self) -> int:
        return self.cache.cfg.chunk_frames

    def schedule(self, chunk: int) -> tuple[list[float], list[torch.Tensor]]:
        """The warped timesteps chunk `chunk` is denoised with, and their device tensors."""
        if chunk == 0 and self.first is not None:
            return self.first
        return self.timesteps, self.t_dev

    def start_of(self, chunk: int) -> int:
        """The first latent frame of chunk `chunk`."""
        return self.first_frame + chunk * self.chunk_frames

    def flush_frames(self) -> None:
        """Finish the decode of every chunk given to the decoder, so `on_frames` has run for each."""
        if self.in_flight is not None:
            self.in_flight.result()


class StreamingPipeline:
    """DiT + text encoder on one device, VAE (optional) on the same or another device.

    text_encoder: anything with `encode(list[str]) -> [B, text_len, text_dim]` (e.g. `TextEncoder`, or
    `OffloadedTextEncoder` to keep it off the GPU between stories), or None when the caller passes precomputed text
    states to `run`.
    overlap_decode: decode chunk k in a worker thread while chunk k+1 is denoised. None (default) overlaps when the
    VAE has its own device; on the DiT's GPU the two compete for the same SMs and decoding in turn is faster
    (463 vs 484 ms per chunk on one H100). In turn on a GPU, the decode is queued behind its chunk and its frames
    are read back one chunk later, so the host's work between chunks never leaves the GPU idle.
    profile: synchronise the GPU after each stage, so a chunk's timings are its stages' GPU times.
    clean_pass_device: a second GPU that runs every pass writing the KV cache, one layer behind the DiT's next
    forward (`relay.py`): it holds a copy of the DiT and of the cache. None: the DiT's GPU runs them.
    """

    def __init__(
        self,
        dit: CausalWanDiT,
        text_encoder: Any | None,
        vae: WanVAE | None = None,
        *,
        overlap_decode: bool | None = None,
        profile: bool = False,
        compile_kernels: bool | None = None,
        clean_pass_device: torch.device | str | None = None,
    ) -> None:
        if compile_kernels if compile_kernels is not None else dit.device.type == "cuda":
            fused.enable()  # fused elementwise kernels: the second chunk compiles them (tens of seconds, once)
        self.dit = dit
        self.text_encoder = text_encoder
        self.vae = vae
        self.overlap_decode = overlap_decode
        self.profile = profile
        self.second = SecondGPU(dit, clean_pass_device) if clean_pass_device is not None else None

    def _prompts(self, prompts: list[str], texts: torch.Tensor | None) -> Prompts:
        """The prompts' states on the CPU: given (`texts`, one row per prompt), or encoded `ENCODE_BATCH` distinct
        prompts at a time."""
        if texts is not None:
            return Prompts(self.dit, texts.to("cpu"), list(range(texts.shape[0])))
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder; pass `texts` to run() or give it a TextEncoder")
        rows = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        distinct, states = list(rows), None
        with torch.no_grad():
            for i in range(0, len(distinct), ENCODE_BATCH):
                batch = self.text_encoder.encode(distinct[i : i + ENCODE_BATCH])
                if states is None:  # one buffer for all, filled batch by batch (no second copy)
                    states = torch.empty((len(distinct), *batch.shape[1:]), dtype=batch.dtype)
                states[i : i + len(batch)] = batch.to("cpu")
        return Prompts(self.dit, states, [rows[p] for p in prompts])

    # the loop --------------------------------------------------------------------------------------------------------
    def run(
        self,
        story: Story,
        config: SamplerConfig | None = None,
        memory: MemoryPolicy | None = None,
        *,
        texts: torch.Tensor | None = None,
        cancel: threading.Event | None = None,
        start_image: np.ndarray | None = None,
    ) -> Iterator[ChunkEvent]:
        """Generate `story` chunk by chunk. Events come in order, each with its decoded frames (if a VAE is set).

        texts: optional precomputed umT5 states [N_segments, text_len, text_dim]. cancel: set it to stop after
        the chunk in progress; every chunk finished so far is still handed out. start_image: uint8 RGB
        [H, W, 3] (`images.load_image`): the video's first frame; the chunks continue it (image-to-video).
        """
        # The preparation and the first chunk run without compiled kernels (`fused.eager`): the first frames come
        # in about a second, and compiling (or loading compiled kernels) waits for the second chunk.
        with fused.eager():
            run = self._prepare(story, config or SamplerConfig(), memory or NoMemory(), texts, start_image)
        pending: deque[tuple[dict, Pending | None]] = deque()  # chunks made, not handed out yet, in order
        try:
            for i in range(run.plan.num_chunks):
                if cancel is not None and cancel.is_set():
                    logger.info("cancelled after %d of %d chunks", i, run.plan.num_chunks)
                    break
                with fused.eager() if i == 0 else nullcontext():
                    made = self._chunk(run, i)
                # The previous chunk is handed out while this one decodes, once its own frames are there; one whose
                # frames a decode worker still makes waits for the next chunk to be made, not the loop for it.
                while pending and (len(pending) > 1 or _decoded(pending[0][1])):
                    finished = pending.popleft()
                    yield self._finish(finished)
                    if finished[0]["index"] == 1:  # chunk 1, decoded, traced what a steady chunk runs: the next
                        fused.save_traces()  # process loads the traces
                pending.append(made)
                run.in_flight = made[1]
                if i == 0:  # the first frames as soon as they exist, not after the second chunk is made
                    yield self._finish(pending.popleft())
            while pending:
                yield self._finish(pending.popleft())
        except (Exception, KeyboardInterrupt):
            # A failure or Ctrl-C while making chunk k+1 must not lose the chunks already made: hand them out, then
            # re-raise on the caller's next call. (GeneratorExit, the caller closing us, is not caught.)
            while pending and (pending[0][1] is None or not pending[0][1].cancelled()):
                yield self._finish(pending.popleft())
            raise
        finally:
            if run.decoder is not None:
                run.decoder.close()
            if run.relay is not None:
                run.relay.close()
            fused.save_traces()  # what later chunks traced (the rolling window's moves, a switch's shapes)
            self.dit.release_graphs()  # no GPU memory held between stories (ComfyUI keeps the model loaded)
            if self.second is not None:
                self.second.replica.release_graphs()

    def _prepare(
        self, story: Story, config: SamplerConfig, memory: MemoryPolicy, texts: torch.Tensor | None,
        start_image: np.ndarray | None = None,
    ) -> _Run:  # fmt: skip
        """1. Text: every prompt encoded once (the encoder can then leave the GPU). 2. State: cache, seeded
        noise, timesteps, transition, decoder; the start image as the first frame; the memory policy starts."""
        if start_image is not None and self.vae is None:
            raise ValueError("a start image needs the VAE to encode it; give the pipeline a VAE")
        plan = plan_chunks(story, chunk_frames=config.cache.chunk_frames)
        for note in plan.rounding_notes():
            logger.info(note)
        logger.info(plan.summary())
        device, (h, w) = self.dit.device, (config.height // 8, config.width // 8)
        t0 = time.perf_counter()
        prompts = self._prompts(list(story.prompts), texts)
        if len(prompts) != plan.num_segments:
            raise ValueError(f"texts has {len(prompts)} prompts, the story {plan.num_segments} segments")
        first = prompts.cross(0)
        text_seconds = time.perf_counter() - t0
        tokens_per_frame = (h // self.dit.cfg.patch_size[1]) * (w // self.dit.cfg.patch_size[2])
        relay = None
        if self.second is not None:
            cache, relay = self.second.pair(self.dit, config.cache, tokens_per_frame)
        else:
            cache = self.dit.new_cache(config.cache, tokens_per_frame=tokens_per_frame)
        decoder = None
        if self.vae is not None:
            decoder = Decoder(self.vae, self._overlaps(), _frames_hook(memory), sync=self.profile)
        run = _Run(
            story, plan, memory, prompts, cache, make_transition(config.transition, first, cache),
            torch.Generator(device).manual_seed(story.noise_seed), warp_timesteps(config.steps, config.shift),
            (1, self.dit.cfg.in_channels, config.cache.chunk_frames, h, w), decoder, text_seconds, relay,
        )  # fmt: skip
        run.t_dev = [torch.full((1,), t, device=device) for t in run.timesteps]
        if config.first_steps is not None:  # e.g. Causal Forcing++ 1/2-step: the first frame in 4 steps
            first = warp_timesteps(config.first_steps, config.shift)
            run.first = first, [torch.full((1,), t, device=device) for t in first]
        run.zero, run.size = torch.zeros(1, device=device), (config.height, config.width)
        if start_image is not None:
            self._start_image(run, start_image, config)
        start = self._context(run, 0, 0)
        memory.start(start)
        run.start_info = start.info
        return run

    def _start_image(self, run: _Run, rgb: np.ndarray, config: SamplerConfig) -> None:
        """Image-to-video, as Self-Forcing's and CausVid's image-to-video streaming do: the picture's latent (the
        VAE codes a first frame alone) becomes latent frame 0 through the clean pass under the first prompt, and
        the chunks start after it. Its decoded frame leads chunk 0's frames, its latent chunk 0's latents."""
        latent = self._picture_latent(run, rgb)
        with torch.no_grad():
            self._context_pass(run, latent, 0, run.prompts.cross(0))
        run.transition.remember(0, latent)
        frames = None
        if run.decoder is not None:
            frames = run.decoder.submit(-1, *self._to_decode(run, latent, 0)).result()[0]
        run.first_frame, run.lead = 1, (latent, frames)

    def _overlaps(self) -> bool:
        if self.overlap_decode is not None:
            return self.overlap_decode
        return self.vae is not None and self.vae.device != self.dit.device

    def _context(self, run: _Run, chunk: int, segment: int) -> StepContext:
        """What the memory policy sees of chunk `chunk` (one context per chunk: every hook reports into its info)."""
        tokenizer = getattr(self.text_encoder, "tokenizer", None)
        return StepContext(
            chunk, run.start_of(chunk), run.chunk_frames, segment, run.story.prompts[segment], run.cache,
            run.transition.cross, run.prompts.text(segment), self.dit.rope, tokenizer,
            decoding=run.decoder is not None, temporal_factor=self.vae.cfg.temporal_factor if self.vae else None,
            flush_frames=run.flush_frames,
            encode_image=(lambda rgb, segment: self._image_kv(run, rgb, segment)) if self.vae is not None else None,
        )  # fmt: skip

    def _picture_latent(self, run: _Run, rgb: np.ndarray) -> torch.Tensor:
        """A picture fitted to the video size as one latent frame [1, C, 1, h, w] on the DiT's device."""
        from . import images

        return images.encode(self.vae, rgb, *run.size).to(self.dit.device)

    def _image_kv(self, run: _Run, rgb: np.ndarray, segment: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A picture's K/V (a reference frame): its latent through the clean pass as frame 0 of an empty cache, under
        prompt `segment`. The same K/V a start image gets as the video's first frame."""
        latent = self._picture_latent(run, rgb)
        scratch = self.dit.new_cache(REFERENCE_CACHE, tokens_per_frame=run.cache.tokens_per_frame)
        with torch.no_grad(), fused.launch_guard():
            self.dit.write_chunk(latent, run.zero, run.prompts.cross(segment), scratch, 0)
        return scratch.frame_kv(0)

    def _chunk(self, run: _Run, i: int) -> tuple[dict, Pending | None]:
        """Make chunk i and queue its decode: the event to hand out once its frames are there, and the decode."""
        segment, start = run.plan.segment_of_chunk(i), run.start_of(i)
        timings: dict[str, float] = {"text": run.text_seconds} if i == 0 else {}
        with torch.no_grad():
            t0 = time.perf_counter()
            ctx, cross, alpha = self._switch(run, i, segment)  # 3. prompt switch
            if i == 0:
                ctx.info.update(run.start_info)
            self._sync()
            timings["transition"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            ctx.cross = cross
            with _memory_hook("before_chunk"):
                run.memory.before_chunk(ctx)  # 4. memory: the policy may fill the cache's memory segment
            timings["memory"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            x0 = self._denoise(run, cross, start, i)  # 5. denoise through the cache (read-only)
            self._context_pass(run, x0, start, cross)  # 6. the clean pass writes the chunk into the cache
            self._sync()
            timings["dit"] = time.perf_counter() - t0
            run.transition.remember(start, x0)
            t0 = time.perf_counter()
            ctx.latents = x0
            with _memory_hook("after_chunk"):
                run.memory.after_chunk(ctx)  # 7. memory: archive, score, refresh
            timings["memory"] += time.perf_counter() - t0
            if alpha is not None:
                ctx.info["transition_alpha"] = alpha
        decode = run.decoder.submit(i, *self._to_decode(run, x0, i)) if run.decoder is not None else None  # 8. decode
        event = {
            "index": i,
            "num_chunks": run.plan.num_chunks,
            "segment": segment,
            "prompt": run.story.prompts[segment],
        }
        event.update(start_frame=start, latents=x0, timings=timings, memory=ctx.info)
        if i == 0 and run.lead is not None:  # chunk 0 begins with the start image
            event.update(start_frame=0, latents=torch.cat([run.lead[0], x0], dim=2), lead=run.lead[1])
        return event, decode

    def _switch(self, run: _Run, i: int, segment: int) -> tuple[StepContext, CrossKV, float | None]:
        """At a segment boundary the transition changes the conditioning and the memory rebuilds its segment.
        Returns the chunk's context and the cross-attention K/V (and blend weight) it is made with."""
        start = run.start_of(i)
        switching = i in run.plan.switch_chunks
        if switching:
            old, new = run.prompts.host_text(segment - 1), run.prompts.host_text(segment)
            change = Switch(start, old, new, run.prompts.cross(segment),
                            lambda z, first, cross: self._context_pass(run, z, first, cross))  # fmt: skip
            with fused.eager():  # a recache pass has a shape of its own, run once per switch
                run.transition.switch(change)
        ctx = self._context(run, i, segment)
        if switching:
            with _memory_hook("on_switch"):
                run.memory.on_switch(ctx)
        cross, alpha = run.transition.conditioning(start)
        return ctx, cross, alpha

    def _denoise(self, run: _Run, cross: CrossKV, start: int, chunk: int) -> torch.Tensor:
        """Few-step flow matching from fresh noise: predict x0 = x_t - sigma * v, re-noise to the next sigma."""
        x = torch.randn(run.noise_shape, generator=run.generator, device=self.dit.device)
        timesteps, t_dev = run.schedule(chunk)
        for j, t in enumerate(t_dev):
            with fused.launch_guard():
                velocity = self.dit.forward_chunk(x, t, cross, run.cache, start)
            x0 = x - sigma(timesteps[j]) * velocity
            if j + 1 < len(timesteps):
                s = sigma(timesteps[j + 1])
                x = (1 - s) * x0 + s * torch.randn(run.noise_shape, generator=run.generator, device=self.dit.device)
        return x0

    def _context_pass(self, run: _Run, latents: torch.Tensor, first: int, cross: CrossKV) -> None:
        """The clean pass at t = 0: `latents` become frames first, first + 1, ... of the cache, under `cross`."""
        with fused.launch_guard():
            if run.relay is not None:
                run.written = run.relay.clean_pass(latents, cross, first)
            else:
                self.dit.write_chunk(latents, run.zero, cross, run.cache, first)

    def _to_decode(self, run: _Run, latents: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """The latents a decode takes and what it waits for. With the clean pass on the VAE's GPU: the copy made
        there for the pass, after the pass, which the DiT's next chunk waits for layer by layer (a decode beside it
        slowed it: 2x H200, iamflow, 303.7 ms a steady chunk against 259.8, two calls); the first chunk's right
        after the copy, for the first frames' sake. Else the latents, after the work queued on their GPU."""
        written = run.written
        if written is None or self.vae is None or self.vae.device != self.second.device:
            return latents, None
        return written.latents, written.copied if chunk == 0 else written.done

    def _sync(self) -> None:
        if self.profile and self.dit.device.type == "cuda":
            torch.cuda.synchronize(self.dit.device)

    @staticmethod
    def _finish(pending: tuple[dict, Pending | None]) -> ChunkEvent:
        event, decode = pending
        frames, lead = None, event.pop("lead", None)
        if decode is not None:
            t0 = time.perf_counter()
            frames, vae_s = decode.result()
            event["timings"]["vae"] = vae_s
            event["timings"]["vae_wait"] = time.perf_counter() - t0
            if lead is not None:
                frames = np.concatenate([lead, frames])
        return ChunkEvent(frames=frames, **event)
