"""3-D rotary position embedding of Wan2.1 (time, height, width sections of each head).

Height/width angles come from float32 cos/sin tables computed once in float64. Temporal angles are computed per
call from the frame positions in float64 on the host (a few numbers per frame), so any position works, also past
the 1024-frame table of the checkpoints, with full precision; no float64 math touches activations. Rotation pairs
adjacent channels (2i, 2i+1), as Wan does.
Math follows Wan2.1 `wan/modules/model.py` (rope_params / rope_apply), Apache-2.0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..devices import to_device_async


def _inv_freq(dim: int, theta: float) -> torch.Tensor:
    # Explicitly on the host: models are often built under `with torch.device("cuda")`.
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)


class RopeTables:
    """cos/sin for token grids of one head layout; spatial tables are cached per device."""

    def __init__(self, split: tuple[int, int, int], max_positions: int, theta: float) -> None:
        self.split = split
        self.max_positions = max_positions
        self.theta = theta
        self._inv_t = _inv_freq(split[0], theta)
        self._spatial: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _spatial_tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._spatial:
            tables = []
            for dim in self.split[1:]:
                positions = torch.arange(self.max_positions, dtype=torch.float64, device="cpu")
                angles = torch.outer(positions, _inv_freq(dim, self.theta))
                tables += [angles.cos().float().to(device), angles.sin().float().to(device)]
            self._spatial[device] = tuple(tables)
        return self._spatial[device]

    def grid(
        self, frame_positions: Sequence[int], height: int, width: int, device: torch.device, spatial: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [F*height*width, head_dim/2] (float32) for tokens laid out frame-major, rows, then columns.

        frame_positions: the temporal position of each frame (any integer). spatial=False gives a pure temporal
        rotation (the height/width sections unrotated), used to move already-rotated keys in time.
        """
        if height > self.max_positions or width > self.max_positions:
            raise ValueError(f"latent grid {height}x{width} exceeds the RoPE table of {self.max_positions} positions")
        angles = torch.tensor(list(frame_positions), dtype=torch.float64, device="cpu")[:, None] * self._inv_t
        cos_t = to_device_async(angles.cos().float(), device)
        sin_t = to_device_async(angles.sin().float(), device)
        cos_h, sin_h, cos_w, sin_w = self._spatial_tables(device)
        if not spatial:
            cos_h, sin_h, cos_w, sin_w = (torch.ones_like(cos_h), torch.zeros_like(sin_h),
                                          torch.ones_like(cos_w), torch.zeros_like(sin_w))  # fmt: skip
        f = cos_t.shape[0]

        def expand(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            parts = (
                t[:, None, None, :].expand(f, height, width, -1),
                h[None, :height, None, :].expand(f, height, width, -1),
                w[None, None, :width, :].expand(f, height, width, -1),
            )
            return torch.cat(parts, dim=-1).reshape(f * height * width, -1)

        return expand(cos_t, cos_h, cos_w), expand(sin_t, sin_h, sin_w)


from .fused import apply_rope  # noqa: E402,F401  (re-exported: the rotation lives with the fused kernels)
