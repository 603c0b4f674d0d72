"""One streaming pass over a video: what every dimension needs, with only a batch of frames in memory.

Frames are decoded with PyAV in batches of `batch_size`, moved to the device, and give
- for every pair of consecutive frames: the p90 over pixels of |luma difference| / 255 (temporal flickering) and
  the mean |luma difference| in 8-bit levels (the motion of boundary smoothness);
- for the frames asked for: DINO and CLIP features (batched through the models) and, for the judge, the frames.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .features import ImageEncoder

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, the benchmark's `_frame_to_luma_tensor`


@dataclass(frozen=True)
class ScanRequest:
    """Frame indices to encode with each encoder (by name) and frames to keep as images."""

    encode: dict[str, frozenset[int]]
    keep: frozenset[int] = frozenset()


@dataclass
class ScanResult:
    """frames: frames decoded. pair_error[t], motion[t]: of frames t and t+1. features[name][t]: [D] float32."""

    frames: int = 0
    pair_error: list[float] = field(default_factory=list)
    motion: list[float] = field(default_factory=list)
    features: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    images: dict[int, np.ndarray] = field(default_factory=dict)


def iter_frame_batches(path: str | Path, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 RGB frames [b, H, W, 3] of the first video stream, `batch_size` at a time (the last may be fewer)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        batch = []
        for frame in container.decode(stream):
            batch.append(frame.to_ndarray(format="rgb24"))
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)


def row_percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The q-th percentile of each row of x [N, M], linear between ranks (as numpy's default): [N]."""
    ordered = x.sort(dim=1).values
    position = q / 100.0 * (x.shape[1] - 1)
    low, frac = int(position), position - int(position)
    high = min(low + 1, x.shape[1] - 1)
    return ordered[:, low] * (1.0 - frac) + ordered[:, high] * frac


def pair_statistics(luma: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """luma: [n, H, W] in 8-bit levels, consecutive frames -> (p-q of |diff| / 255, mean |diff|), each [n - 1]."""
    diff = (luma[1:] - luma[:-1]).abs().flatten(1)
    return row_percentile(diff, q) / 255.0, diff.mean(dim=1)


class _Encoding:
    """Frames waiting for one encoder, encoded `batch_size` at a time."""

    def __init__(self, encoder: ImageEncoder, wanted: frozenset[int], batch_size: int, out: dict[int, torch.Tensor]):
        self.encoder, self.wanted, self.batch_size, self.out = encoder, wanted, batch_size, out
        self.pending: list[tuple[int, torch.Tensor]] = []

    def add(self, first: int, frames: torch.Tensor) -> None:
        self.pending += [(first + i, frames[i]) for i in range(frames.shape[0]) if first + i in self.wanted]
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size :]
            feats = self.encoder.encode(torch.stack([f for _, f in batch]))
            self.out.update({index: feats[i] for i, (index, _) in enumerate(batch)})


def scan_video(
    path: str | Path,
    request: ScanRequest,
    encoders: dict[str, ImageEncoder],
    device: torch.device,
    batch_size: int,
    pair_q: float,
) -> ScanResult:
    """Decode `path` once and collect what `request` asks for; pair statistics use percentile `pair_q`."""
    result = ScanResult(features={name: {} for name in request.encode})
    queues = [_Encoding(encoders[n], w, batch_size, result.features[n]) for n, w in request.encode.items() if w]
    weights = torch.tensor(_LUMA, device=device)
    previous = None  # the luma of the last frame of the batch before
    for batch in iter_frame_batches(path, batch_size):
        first = result.frames
        frames = torch.from_numpy(batch).to(device)
        luma = frames.float() @ weights  # [b, H, W]
        if previous is not None:
            luma = torch.cat([previous, luma])
        if luma.shape[0] > 1:
            error, motion = pair_statistics(luma, pair_q)
            result.pair_error += error.tolist()
            result.motion += motion.tolist()
        previous = luma[-1:]
        for queue in queues:
            queue.add(first, frames)
        result.images.update({first + i: batch[i].copy() for i in range(len(batch)) if first + i in request.keep})
        result.frames += len(batch)
    for queue in queues:
        queue.flush()
    return result
