"""FP8 (e4m3) linear layer with per-output-channel weight scales.

The storage format is the one of IAMFlow's `iamflow_fp8.safetensors`: `weight` in float8_e4m3fn [out, in] and
`weight_scale` in float32 [out, 1], so that W ≈ weight * weight_scale; the bias keeps the compute dtype.
The forward either dequantizes the weight (any device) or, on CUDA GPUs with FP8 tensor cores (compute capability
8.9+), runs `torch._scaled_mm` with row-wise scales (W8A8) on activations quantized per token. The DiT block has
the kernel that makes a linear's input quantize it on the way out (`Rows` from `fused.modulate_fp8` and
the residual-and-norm functions); other inputs are quantized by one compiled kernel (`fused.quantize_rows`).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused
from .fused import FP8_DTYPE

logger = logging.getLogger(__name__)

# Each row of w [out, in] to e4m3 with scale amax / 448: (w_fp8 [out, in], scale [out, 1] float32).
quantize_rows_fp8 = fused.rows_fp8


class Rows(NamedTuple):
    """An FP8 linear's input already quantized by the kernel that made it: data [..., in] float8_e4m3fn and
    per-row scales [..., 1] float32, x ≈ data * scale (`fused.modulate_fp8` returns these, and the residual-and-norm
    functions with fp8=True)."""

    data: torch.Tensor
    scale: torch.Tensor

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.data.float() * self.scale).to(dtype)


def scaled_mm_supported(device: torch.device | str) -> bool:
    """True when `device` is a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(nn.Module):
    """A linear layer whose weight is stored in FP8 with a per-output-channel float32 scale.

    `weight` and `weight_scale` are buffers that keep their dtypes under `.to(dtype)` / `.half()`: moving the
    module between devices moves them, casting it casts only the bias. With `use_scaled_mm=True` the forward
    runs an FP8 matmul when the input allows it (CUDA, bfloat16, in/out features multiples of 16) and falls
    back to the dequantized matmul otherwise.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, device: torch.device | str | None = None,
        bias_dtype: torch.dtype | None = None, use_scaled_mm: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.use_scaled_mm = use_scaled_mm
        self._scaled_mm_failed = False
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, use_scaled_mm: bool = False) -> FP8Linear:
        """Quantize a plain linear layer (per-output-channel amax / 448 scales)."""
        out = cls(
            linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
            bias_dtype=linear.weight.dtype, use_scaled_mm=use_scaled_mm,
        )  # fmt: skip
        out.weight, out.weight_scale = quantize_rows_fp8(linear.weight.detach())
        if linear.bias is not None:
            out.bias.data.copy_(linear.bias.detach())
        return out

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as `dtype` [out, in] (the product is taken in float32, then rounded once)."""
        return (self.weight.float() * self.weight_scale).to(dtype)

    def runs_fp8(self, dtype: torch.dtype) -> bool:
        """Whether inputs of `dtype` go through the FP8 matmul (W8A8): its producer may then hand over `Rows`."""
        # Row-wise scaled FP8 GEMM: bf16 output only; K and N must be multiples of 16.
        return (
            self.use_scaled_mm and not self._scaled_mm_failed and dtype == torch.bfloat16
            and self.in_features % 16 == 0 and self.out_features % 16 == 0
        )  # fmt: skip

    def forward(self, x: torch.Tensor | Rows) -> torch.Tensor:
        """x: [..., in_features], or its `Rows` -> [..., out_features] in x.dtype (bfloat16 for `Rows`)."""
        dtype = torch.bfloat16 if isinstance(x, Rows) else x.dtype
        if self.runs_fp8(dtype):
            try:
                rows = x if isinstance(x, Rows) else Rows(*fused.quantize_rows(x))
                return self._forward_scaled_mm(rows)
            except RuntimeError as exc:  # an unsupported GPU/driver combination: keep running, dequantized
                self._scaled_mm_failed = True
                logger.warning("FP8 matmul failed (%s); this layer falls back to dequantized weights", exc)
        if isinstance(x, Rows):
            x = x.dequantized(dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _forward_scaled_mm(self, x: Rows) -> torch.Tensor:
        lead = x.data.shape[:-1]
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        out = torch._scaled_mm(
            x.data.reshape(-1, self.in_features), self.weight.t(),  # [K, N] column-major, as the row-wise kernel needs
            scale_a=x.scale.reshape(-1, 1), scale_b=self.weight_scale.reshape(1, -1), bias=bias,
            out_dtype=torch.bfloat16,
            use_fast_accum=True,  # measured on H100: same error (3.7 % vs fp32), ~15 % faster GEMM
        )  # fmt: skip
        return out.reshape(*lead, self.out_features)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - signature of nn.Module._apply
        # Let `fn` move the FP8 weight and its scale between devices but never change their dtypes: `.to(bf16)`
        # would silently turn the weight into a 2-byte tensor and round the float32 scales.
        kept = {name: self._buffers.pop(name) for name in ("weight", "weight_scale")}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                target = fn(torch.empty(0, dtype=t.dtype, device=t.device))  # where would fn put it?
                self._buffers[name] = t if t.device == target.device else t.to(device=target.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"use_scaled_mm={self.use_scaled_mm}"
        )


def takes_rows(linear: nn.Module, dtype: torch.dtype) -> bool:
    """Whether `linear` is an FP8 linear that runs its matmul in FP8 for inputs of `dtype`, so the kernel making
    its input should quantize it (`Rows`) on the way out."""
    return isinstance(linear, FP8Linear) and linear.runs_fp8(dtype)


def fp8_linears(model: nn.Module) -> int:
    """How many FP8 linears `model` holds (an FP8 checkpoint kept as FP8, or quantized): with any, `auto` attention
    runs in FP8 too (`attention.resolve_backend`)."""
    return sum(isinstance(m, FP8Linear) for m in model.modules())


def quantize_linear_fp8(linear: nn.Linear, *, use_scaled_mm: bool = False) -> FP8Linear:
    """Quantize a plain linear layer to an `FP8Linear` with per-output-channel scales (amax / 448)."""
    return FP8Linear.from_linear(linear, use_scaled_mm=use_scaled_mm)
