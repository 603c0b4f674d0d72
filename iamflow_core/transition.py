"""Prompt switches at chunk boundaries, as policies: each strategy owns the state it needs.

- `Recache` (LongLive / MemFlow): re-run the clean pass over the frames in the rolling window under the new prompt,
  so the cached context agrees with it; the sink keeps the old prompt (LongLive's global sink). It keeps the
  latents of the window's chunks for that pass.
- `Soft` (IAMFlow): keep the self-attention cache and blend the old and new prompts' cross-attention K/V with a
  cosine ramp after a short delay; the ramp is longer when the prompts' text embeddings are further apart.
- `Hard`: switch the text conditioning and nothing else.

The loop calls a transition at fixed points: `switch` at a segment boundary, `conditioning` before each chunk (the
cross-attention K/V the chunk is made with), `remember` after each chunk's context pass.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .cache import KVCache
from .config import STRATEGIES, TransitionConfig
from .models.dit import CrossKV

__all__ = ["STRATEGIES", "Hard", "Recache", "Soft", "Switch", "Transition", "TransitionConfig", "make_transition"]

# context_pass(latents [B, C, F, h, w], first_frame, cross): the clean pass at t = 0 that writes frames
# first_frame .. first_frame + F - 1 into the cache under `cross`.
ContextPass = Callable[[torch.Tensor, int, CrossKV], None]


@dataclass(frozen=True)
class Switch:
    """A prompt switch at the chunk starting at `start_frame`."""

    start_frame: int
    old_text: torch.Tensor  # [text_len, text_dim] umT5 states of the prompt that ends (on the CPU)
    new_text: torch.Tensor  # ... and of the prompt that begins
    cross: CrossKV  # the new prompt's cross-attention K/V
    context_pass: ContextPass


class Transition(Protocol):
    name: str
    cross: CrossKV  # the prompt in force (the newest one)

    def switch(self, switch: Switch) -> None: ...
    def conditioning(self, start_frame: int) -> tuple[CrossKV, float | None]:
        """The cross-attention K/V of the chunk starting at `start_frame`, and the new prompt's weight while a
        blend is under way (else None)."""
        ...

    def remember(self, start_frame: int, latents: torch.Tensor) -> None: ...


class Hard:
    name = "hard"

    def __init__(self, first: CrossKV) -> None:
        self.cross = first

    def switch(self, switch: Switch) -> None:
        self.cross = switch.cross

    def conditioning(self, start_frame: int) -> tuple[CrossKV, float | None]:
        return self.cross, None

    def remember(self, start_frame: int, latents: torch.Tensor) -> None:
        pass


class Recache(Hard):
    """Hard switch, then the window's frames re-encoded under the new prompt."""

    name = "recache"

    def __init__(self, first: CrossKV, cache: KVCache) -> None:
        super().__init__(first)
        self.sink_frames, self.capacity = cache.cfg.sink_frames, cache.query_capacity
        self.chunk_frames = cache.cfg.chunk_frames
        self.history: deque[tuple[int, torch.Tensor]] = deque()  # (start frame, clean latents) of recent chunks

    def switch(self, switch: Switch) -> None:
        super().switch(switch)
        first = max(self.sink_frames, switch.start_frame - self.capacity)
        # The remembered latents from `first` on (a chunk may straddle it: a start image shifts the chunks by one).
        parts = [(f, z[:, :, max(0, first - f) :]) for f, z in self.history if f + z.shape[2] > first]
        parts = [(max(f, first), z) for f, z in parts if f < switch.start_frame]
        if parts:
            switch.context_pass(torch.cat([z for _, z in parts], dim=2), parts[0][0], switch.cross)

    def remember(self, start_frame: int, latents: torch.Tensor) -> None:
        self.history.append((start_frame, latents))
        while len(self.history) * self.chunk_frames > self.capacity + self.chunk_frames:
            self.history.popleft()


class Soft(Hard):
    """Blend from the old prompt to the new one over a window sized by how far apart they are."""

    name = "soft"

    def __init__(self, first: CrossKV, cfg: TransitionConfig, chunk_frames: int) -> None:
        super().__init__(first)
        self.cfg, self.chunk_frames = cfg, chunk_frames
        self.previous: CrossKV | None = None  # the prompt the ramp blends from
        self.switch_frame = 0
        self.window = 0

    def switch(self, switch: Switch) -> None:
        distance = text_distance(switch.old_text, switch.new_text)
        self.window = soft_window(distance, self.cfg, self.chunk_frames)
        self.previous = self.previous or self.cross  # a switch during a ramp blends on from where it started
        self.switch_frame = switch.start_frame
        super().switch(switch)

    def conditioning(self, start_frame: int) -> tuple[CrossKV, float | None]:
        if self.previous is None:
            return self.cross, None
        alpha = soft_alpha(start_frame - self.switch_frame, self.window, self.cfg, self.chunk_frames)
        if alpha is None:
            self.previous = None
            return self.cross, None
        return self.previous.blend(self.cross, alpha), alpha


def make_transition(cfg: TransitionConfig, first: CrossKV, cache: KVCache) -> Transition:
    """A fresh transition for one run, starting with the first prompt's conditioning."""
    if cfg.strategy == "soft":
        return Soft(first, cfg, cache.cfg.chunk_frames)
    if cfg.strategy == "recache":
        return Recache(first, cache)
    return Hard(first)


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
