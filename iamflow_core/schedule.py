"""Few-step flow-matching schedule of the distilled streaming models (Self-Forcing / LongLive / MemFlow).

The model predicts the velocity v = noise - x0 of x_t = (1 - sigma) x0 + sigma * noise, with t = 1000 * sigma.
Each step predicts x0 = x_t - sigma * v and re-noises it to the next sigma with fresh noise; the last x0 is the
chunk's output. The step list [1000, 750, 500, 250] is warped by the shift (5) to t = [1000, 937.5, 833.3, 625].
"""

from __future__ import annotations

from collections.abc import Sequence


def warp_timesteps(steps: Sequence[float], shift: float = 5.0, num_train_timesteps: int = 1000) -> list[float]:
    """Map nominal timesteps through the shifted sigma curve s' = shift * s / (1 + (shift - 1) * s)."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    out = []
    for t in steps:
        if not 0 < t <= num_train_timesteps:
            raise ValueError(f"timestep {t} is outside (0, {num_train_timesteps}]")
        s = t / num_train_timesteps
        out.append(num_train_timesteps * shift * s / (1 + (shift - 1) * s))
    return out


def sigma(t: float, num_train_timesteps: int = 1000) -> float:
    return t / num_train_timesteps
