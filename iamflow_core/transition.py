"""Prompt-switch strategies at chunk boundaries.

- `recache` (LongLive / MemFlow): re-run the clean pass over the frames in the rolling window under the new
  prompt, so the cached context agrees with it; the sink keeps the old prompt (LongLive's global sink).
- `soft` (IAMFlow): keep the self-attention cache and blend the old and new prompts' cross-attention K/V with a
  cosine ramp after a short delay; the ramp is longer when the prompts' text embeddings are further apart.
- `hard`: switch the text conditioning and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STRATEGIES = ("recache", "soft", "hard")


@dataclass(frozen=True)
class TransitionConfig:
    strategy: str = "recache"
    delay_frames: int = 3
    min_window_frames: int = 3
    max_window_frames: int = 15

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown transition strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if not 0 < self.min_window_frames <= self.max_window_frames:
            lo, hi = self.min_window_frames, self.max_window_frames
            raise ValueError(f"need 0 < min_window_frames ({lo}) <= max_window_frames ({hi})")
        if self.delay_frames < 0:
            raise ValueError(f"delay_frames must be >= 0, got {self.delay_frames}")


def text_distance(old: torch.Tensor, new: torch.Tensor) -> float:
    """Cosine distance of two prompts' mean text embeddings over their real (non-padded) tokens.

    old, new: [L, D] zero-padded umT5 states. Averaging only real tokens keeps short prompts from being
    dominated by the zero padding.
    """

    def mean_real(x: torch.Tensor) -> torch.Tensor:
        real = x.float().abs().sum(-1) > 0
        return x.float()[real].mean(0) if real.any() else x.float().mean(0)

    return 1.0 - torch.nn.functional.cosine_similarity(mean_real(old), mean_real(new), dim=0).item()


def soft_window(distance: float, cfg: TransitionConfig, chunk_frames: int) -> int:
    """Ramp length in latent frames: min..max by distance in [0, 1], a whole number of chunks."""
    d = min(max(distance, 0.0), 1.0)
    frames = cfg.min_window_frames + d * (cfg.max_window_frames - cfg.min_window_frames)
    return max(chunk_frames, int(frames) // chunk_frames * chunk_frames)


def soft_alpha(frames_since_switch: int, window: int, cfg: TransitionConfig, chunk_frames: int) -> float | None:
    """Weight of the new prompt for the chunk starting `frames_since_switch` frames after the switch.

    0 during the delay, a cosine ramp over `window` frames, then None (the new prompt alone). The ramp is read at
    the chunk's centre, so even the shortest window blends for one chunk instead of holding the old prompt.
    """
    u = (frames_since_switch + chunk_frames / 2 - cfg.delay_frames) / window
    if frames_since_switch + chunk_frames <= cfg.delay_frames:
        return 0.0
    if u >= 1.0:
        return None
    return 0.5 * (1.0 - math.cos(math.pi * max(u, 0.0)))
