"""Render a story to a video file chunk by chunk: the one call the CLI and the ComfyUI sampler node share.

`render_story` runs `StreamingPipeline.run`, hands each chunk's frames to a writer thread (the mp4, and a raw
uint8 spool file when the frames are wanted back), reports every chunk to `on_chunk`, stops after the chunk in
progress when `cancel` is set, and returns a `RenderResult`. Frames are never held in memory during the run: the
spool is read back once, at the end, so a long video costs RAM only for the final array.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .config import VIDEO_FPS, CacheConfig, SamplerConfig
from .memory import MemoryPolicy
from .models.vae import WanVAE
from .pipeline import ChunkEvent, StreamingPipeline
from .story import ChunkPlan, Story, plan_chunks
from .story.entities import EntityRegistry
from .video import VideoWriter, to_uint8_frames

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkRecord:
    """What happened in one chunk: where it sits in the story and what the memory policy reported."""

    index: int
    num_chunks: int
    segment: int
    num_segments: int
    prompt: str
    start_frame: int  # first latent frame of the chunk
    video_frames: int  # decoded frames of this chunk (0 without a VAE)
    frames_done: int  # decoded frames so far, this chunk included
    memory: dict[str, Any] = field(default_factory=dict)  # the policy's per-chunk report (a copy)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RenderResult:
    """frames: uint8 [T, H, W, 3] (None unless keep_frames and a VAE); latents: [1, C, F, h, w] float32 on the CPU
    (the DiT's normalized latent space). chunks: one record per finished chunk. memory_map: the policy's
    `story_map()` (identity memory), else None. timings: seconds summed over chunks, plus `wall`."""

    frames: np.ndarray | None
    latents: torch.Tensor | None
    chunks: tuple[ChunkRecord, ...]
    plan: ChunkPlan
    timings: dict[str, float]
    out_path: Path | None
    frames_written: int
    cancelled: bool
    memory_map: dict[str, Any] | None = None
    memory_name: str = ""  # the policy's name (identity, memflow, none)

    @property
    def complete(self) -> bool:
        return len(self.chunks) == self.plan.num_chunks


class _FrameSpool:
    """Raw uint8 frames appended to an (anonymous, temporary) file, read back once as one array: exact, unlike the
    mp4, and on disk rather than in RAM while the video is made."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.shape: tuple[int, ...] | None = None
        self.count = 0

    def write(self, frames: np.ndarray) -> None:
        self.shape = self.shape or frames.shape[1:]
        self.file.write(np.ascontiguousarray(frames, dtype=np.uint8).tobytes())
        self.count += frames.shape[0]

    def read(self) -> np.ndarray | None:
        if self.shape is None:
            return None
        self.file.flush()
        self.file.seek(0)
        return np.fromfile(self.file, dtype=np.uint8).reshape(self.count, *self.shape)


def _record(event: ChunkEvent, plan: ChunkPlan, frames_done: int) -> ChunkRecord:
    return ChunkRecord(
        index=event.index, num_chunks=event.num_chunks, segment=event.segment, num_segments=plan.num_segments,
        prompt=event.prompt, start_frame=event.start_frame,
        video_frames=0 if event.frames is None else int(event.frames.shape[0]), frames_done=frames_done,
        memory=copy.deepcopy(event.memory), timings=dict(event.timings),
    )  # fmt: skip


class _Outputs:
    """Where a render's frames go: the mp4 and, when the frames are wanted back, a temp spool; both written on one
    background thread in chunk order. A context manager: leaving it waits for every write, then closes the file."""

    def __init__(self, out_path: str | Path | None, fps: float, keep_frames: bool, spool_dir: str | Path | None):
        self.pending: list = []
        self.frames_made = 0
        self.writer, self.spool = None, None
        with ExitStack() as stack:  # a failure while opening closes what was opened
            if out_path is not None:
                self.writer = stack.enter_context(VideoWriter(out_path, fps=fps))
            if keep_frames:
                if spool_dir is not None:
                    Path(spool_dir).mkdir(parents=True, exist_ok=True)
                prefix = "iamflow-frames-"
                self.spool = _FrameSpool(stack.enter_context(tempfile.TemporaryFile(prefix=prefix, dir=spool_dir)))
            self.writes = ThreadPoolExecutor(1, thread_name_prefix="iamflow-write")
            stack.callback(self.writes.shutdown, wait=True)  # runs before the writer closes: every chunk reaches it
            self.stack = stack.pop_all()

    def __enter__(self) -> _Outputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def add(self, frames: np.ndarray) -> None:
        self.check()
        self.frames_made += frames.shape[0]
        self.pending.append(self.writes.submit(self._write, frames))

    def check(self) -> None:
        """Raise the error of a failed write (disk full, I/O error) now, so the render stops at once."""
        for future in self.pending:
            if future.done() and future.exception() is not None:
                future.result()
        self.pending = [f for f in self.pending if not f.done()]

    def _write(self, frames: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.write(frames)
        if self.spool is not None:
            self.spool.write(frames)

    def finish(self) -> np.ndarray | None:
        """Wait for every write; a failed one (disk full, ...) raises here, not silently. The spooled frames."""
        self.writes.shutdown(wait=True)
        self.check()
        return self.spool.read() if self.spool is not None else None

    @property
    def frames_written(self) -> int:
        return self.writer.frames_written if self.writer is not None else self.frames_made


@dataclass
class _Tally:
    """What a render has made so far."""

    plan: ChunkPlan
    start: float = field(default_factory=time.perf_counter)
    records: list[ChunkRecord] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)

    def add(self, event: ChunkEvent, frames_done: int, keep_latents: bool) -> ChunkRecord:
        if keep_latents:
            self.latents.append(event.latents.detach().to("cpu", torch.float32))
        for key, value in event.timings.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        self.records.append(_record(event, self.plan, frames_done))
        return self.records[-1]

    def result(self, frames, out_path, frames_written: int, memory: MemoryPolicy) -> RenderResult:
        cancelled = len(self.records) < self.plan.num_chunks
        if cancelled:
            done, planned = len(self.records), self.plan.num_chunks
            logger.info("stopped after %d of %d chunks; %d frames kept", done, planned, frames_written)
        report = getattr(memory, "story_map", None)
        return RenderResult(
            frames=frames, latents=torch.cat(self.latents, dim=2) if self.latents else None,
            chunks=tuple(self.records), plan=self.plan,
            timings={**self.totals, "wall": time.perf_counter() - self.start},
            out_path=Path(out_path) if out_path is not None else None, frames_written=frames_written,
            cancelled=cancelled, memory_map=copy.deepcopy(report()) if callable(report) else None,
            memory_name=memory.name,
        )  # fmt: skip


def render_story(
    pipe: StreamingPipeline,
    story: Story,
    config: SamplerConfig,
    memory: MemoryPolicy,
    *,
    out_path: str | Path | None = None,
    on_chunk: Callable[[ChunkEvent, ChunkRecord], None] | None = None,
    on_stop: Callable[[RenderResult, BaseException], None] | None = None,
    cancel: threading.Event | None = None,
    keep_frames: bool = True,
    keep_latents: bool = True,
    fps: float = VIDEO_FPS,
    spool_dir: str | Path | None = None,
    start_image: np.ndarray | None = None,
) -> RenderResult:
    """Render `story` with a fresh `memory` policy; write the frames to `out_path` (mp4) as they come.

    on_chunk(event, record) runs on the calling thread after each chunk (previews, progress, cancel checks).
    Setting `cancel` stops after the chunk in progress; every finished chunk is kept (in the file and the result).
    An exception (Ctrl-C, a stop signal, a failed write) still closes the file with every chunk handed out so far;
    then on_stop(partial result, exception) runs (e.g. to write the story map of what was made) and the exception
    propagates. A failed write stops the render at the next chunk with a `video.VideoWriteError`.
    fps: the frame rate written into the mp4 (Wan makes 16). keep_frames: return the decoded frames, read back from
    a temp spool at the end. keep_latents: return all latents on the CPU (one device sync per chunk; the CLI skips
    it). spool_dir: where that spool lives (default: the system temp folder, which may be in
    RAM); it is deleted when the call returns. start_image: uint8 RGB [H, W, 3], the video's first frame
    (image-to-video; `StreamingPipeline.run`).
    """
    tally = _Tally(plan_chunks(story, chunk_frames=config.cache.chunk_frames))
    outputs = None
    try:
        with _Outputs(out_path, fps, keep_frames, spool_dir) as outputs:
            for event in pipe.run(story, config, memory, cancel=cancel, start_image=start_image):
                if event.frames is not None:
                    outputs.add(event.frames)
                record = tally.add(event, outputs.frames_made, keep_latents)
                if on_chunk is not None:
                    on_chunk(event, record)
            frames = outputs.finish()
    except BaseException as stop:
        if on_stop is not None:
            written = outputs.frames_written if outputs is not None else 0
            on_stop(tally.result(None, out_path, written, memory), stop)
        raise
    return tally.result(frames, out_path, outputs.frames_written, memory)


def story_map(story: Story, registry: EntityRegistry | None, result: RenderResult) -> dict[str, Any]:
    """The story map of a render: the prompts, the frames written of those planned (and whether the render was cut
    short), the entity registry, the memory's own report, and per chunk what the memory did. Written next to a CLI
    video as JSON and drawn by `pictures.story_map_picture`; `batch` reads it to tell a finished video."""
    return {
        "title": story.title,
        "prompts": list(story.prompts),
        "frames": result.frames_written,
        "planned_frames": result.plan.num_video_frames,
        "chunk_frames": result.plan.chunk_frames,  # latent frames per chunk: 3, or 1 for a frame-wise model
        "cancelled": result.cancelled,
        "registry": registry.to_dict() if registry is not None else None,
        "memory": result.memory_map if result.memory_map is not None else {"mode": result.memory_name},
        "chunks": [{"chunk": r.index, "segment": r.segment, **r.memory} for r in result.chunks],
    }


def decode_latents(
    vae: WanVAE,
    latents: torch.Tensor,
    *,
    chunk_frames: int = CacheConfig.chunk_frames,
    on_chunk: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Decode normalized latents [1, C, F, h, w] chunk by chunk with the streaming VAE: uint8 [T, H, W, 3].

    The causal VAE keeps its cache across chunks, so the result equals a full decode; only one chunk's activations
    are alive at a time. on_chunk(frames) sees each chunk's frames (progress, previews).
    """
    if latents.ndim != 5 or latents.shape[0] != 1:
        raise ValueError(f"latents must be [1, C, F, h, w], got {tuple(latents.shape)}")
    state = vae.new_decode_state()
    chunks = []
    with torch.no_grad():
        for start in range(0, latents.shape[2], chunk_frames):
            z = latents[:, :, start : start + chunk_frames].to(vae.device, vae.dtype)
            chunks.append(to_uint8_frames(vae.decode_stream(z, state)))
            if on_chunk is not None:
                on_chunk(chunks[-1])
    return np.concatenate(chunks)
