"""3-D rotary position embedding of Wan2.1 (time, height, width sections of each head).

Angles are computed once in float64 and kept as float32 cos/sin tables, so no float64 math runs per forward
(the reference rotates in complex float64 on every call). Rotation pairs adjacent channels (2i, 2i+1), as Wan does.
Math follows Wan2.1 `wan/modules/model.py` (rope_params / rope_apply), Apache-2.0.
"""

from __future__ import annotations

import torch


def _axis_angles(positions: int, dim: int, theta: float) -> torch.Tensor:
    """Angles [positions, dim/2] of one axis, float64."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)


class RopeTables:
    """Per-axis cos/sin tables for one head layout, built lazily per device."""

    def __init__(self, split: tuple[int, int, int], max_positions: int, theta: float) -> None:
        self.split = split
        self.max_positions = max_positions
        self.theta = theta
        self._by_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._by_device:
            tables = []
            for dim in self.split:
                angles = _axis_angles(self.max_positions, dim, self.theta)
                tables += [angles.cos().float().to(device), angles.sin().float().to(device)]
            self._by_device[device] = tuple(tables)
        return self._by_device[device]

    def grid(self, frame_positions: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [F*height*width, head_dim/2] for tokens laid out frame-major, then rows, then columns.

        frame_positions: long [F], the temporal RoPE position of each frame (must be < max_positions).
        """
        if height > self.max_positions or width > self.max_positions:
            raise ValueError(f"latent grid {height}x{width} exceeds the RoPE table of {self.max_positions} positions")
        cos_t, sin_t, cos_h, sin_h, cos_w, sin_w = self._tables(frame_positions.device)
        f = frame_positions.numel()

        def expand(cos_f: torch.Tensor, cos_h_: torch.Tensor, cos_w_: torch.Tensor) -> torch.Tensor:
            parts = (
                cos_f[:, None, None, :].expand(f, height, width, -1),
                cos_h_[None, :height, None, :].expand(f, height, width, -1),
                cos_w_[None, None, :width, :].expand(f, height, width, -1),
            )
            return torch.cat(parts, dim=-1).reshape(f * height * width, -1)

        return expand(cos_t[frame_positions], cos_h, cos_w), expand(sin_t[frame_positions], sin_h, sin_w)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [B, L, H, D] by cos/sin: [L, D/2] (float32). Computed in float32, returned in x.dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
