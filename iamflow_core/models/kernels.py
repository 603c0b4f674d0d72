"""Kernels written by hand in Triton, where TorchInductor's fall short.

`rms_norm_rope`: the RMS norm of the self-attention's q or k over the full width, its weight and the rotary
embedding, one row per program. TorchInductor compiled the same function (`fused.rms_norm_rope`'s plain PyTorch) into
a looped reduction with the rotary pairs gathered by index: 21.9 us a call at 4680 x 1536 in bf16 on an H200 (300
calls a chunk, 6.6 ms), 1.3 TB/s for the 28.8 MB it reads and writes. Here the row stays in registers, the rotary
pairs are split from it and joined back in place: 8.6 us a call in the same profile (3.3 TB/s). The result is
stored wherever the caller wants it: the KV cache's query slot for the keys, so no copy follows.

The math is the plain function's, roundings included: the norm rounded to the input's dtype, times the weight,
rounded again, then rotated in float32 and rounded once more.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU build of PyTorch: the callers run plain PyTorch
    triton = None


def available(x: torch.Tensor) -> bool:
    """Whether the hand-written kernels can run on x."""
    return triton is not None and x.is_cuda


def on_its_gpu(x: torch.Tensor) -> AbstractContextManager:
    """x's GPU as the current one while a kernel is launched on x: it need not be the current one (a batch rank's, a
    loader's device widget, a VLM on another GPU than the DiT's)."""
    return nullcontext() if x.device.index == torch.cuda.current_device() else torch.cuda.device(x.device)


if triton is not None:

    @triton.jit
    def _rms_norm_rope_kernel(
        x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
        tokens, x_stride_b, x_stride_l, cs_stride, out_stride_b, out_stride_l, eps,
        DIM: tl.constexpr, HALF_HEAD: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        b, t = row // tokens, row % tokens
        offs = tl.arange(0, BLOCK)
        mask = offs < DIM
        x = tl.load(x_ptr + b * x_stride_b + t * x_stride_l + offs, mask=mask, other=0.0)
        x32 = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(x32 * x32, axis=0) / DIM + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = ((x32 * inv).to(x.dtype).to(tl.float32) * w).to(x.dtype).to(tl.float32)
        even, odd = tl.split(tl.reshape(h, (BLOCK // 2, 2)))
        pair = tl.arange(0, BLOCK // 2)
        angle = t * cs_stride + pair % HALF_HEAD
        cos = tl.load(cos_ptr + angle, mask=pair < DIM // 2, other=0.0)
        sin = tl.load(sin_ptr + angle, mask=pair < DIM // 2, other=0.0)
        y = tl.reshape(tl.join(even * cos - odd * sin, odd * cos + even * sin), (BLOCK,))
        tl.store(out_ptr + b * out_stride_b + t * out_stride_l + offs, y.to(x.dtype), mask=mask)


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int, cos: torch.Tensor, sin: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """x: [B, L, dim] -> [B, L, H, D] normed, times weight, rotated by cos/sin [L, D/2] (float32) at pairs
    (2i, 2i + 1) of each head; written into `out` when given (its rows contiguous, as the KV cache's are)."""
    b, tokens, dim = x.shape
    head = dim // heads
    if out is None:
        out = torch.empty(b, tokens, heads, head, dtype=x.dtype, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    if out.shape != (b, tokens, heads, head) or out.stride(-1) != 1 or out.stride(-2) != head:
        raise ValueError(f"out must be [B, L, H, D] = {[b, tokens, heads, head]} with rows contiguous")
    if cos.shape != (tokens, head // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [L, D/2] = {[tokens, head // 2]}, got {list(cos.shape)}")
    block = triton.next_power_of_2(dim)
    with on_its_gpu(x):
        _rms_norm_rope_kernel[(b * tokens,)](
            x, weight, cos, sin, out, tokens, x.stride(0), x.stride(1), cos.stride(0), out.stride(0), out.stride(1),
            eps, DIM=dim, HALF_HEAD=head // 2, BLOCK=block, num_warps=4 if block <= 2048 else 8,
        )  # fmt: skip
    return out
