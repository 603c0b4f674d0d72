"""The operations of one Qwen3 decoding step (`greedy.GreedyDecoder`) between its matmuls, each one kernel on a GPU.

Decoding a token of a batch of a few prompts is small work in many kernels: written as transformers writes it, each
layer launched ~30 (three norms, the rotary embedding as four elementwise ops per q and k, two cache writes, the
residual adds, SiLU and its product, one matmul per projection), ~850 a token for Qwen3-VL-2B. Inside a render on
one GPU those kernels queue behind the DiT's, 5 us each on average (a trace of `bench speed --gpus 1 --memory
iamflow`), so a verifier job took 1.3-1.7 s where the GPU work alone is ~0.2 s, and the DiT slowed by the
VLM's launches. Here a layer is nine kernels: the q/k/v projections as one matmul and gate/up as another (their
weights made views of one joined weight: no extra memory), and three Triton kernels:

- `add_rms_norm`: the residual add and the next RMSNorm, in one pass over the row;
- `qk_norm_rope_store`: q's and k's per-head RMSNorms and the rotary embedding, the new key and value written into
  the static cache at the step's slot (read on the GPU, so a CUDA graph replays it);
- `silu_mul`: SiLU of the gate times the up projection.

The math is transformers' (the norm in float32, rounded to the activations' dtype before its weight; SiLU and the
product rounded as eager PyTorch rounds them), so in float32 the answers match `generate` token for token. In bf16
the adds, norms and SiLU products are bit for bit eager PyTorch's; the rotated q and k are one unit in the last
place apart in about a fifth of their values (the compiled kernel's roundings there are not the three eager ops';
measured on an H200, `tests/gpu/test_gpu_greedy.py`), as the joined matmuls also round differently. Off the GPU
(or without Triton) the same functions run as plain PyTorch, and so they do for the rest of the process after a
hand-written kernel fails to build or launch (`kernels.launched`: one warning).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..models import kernels
from ..models.kernels import on_its_gpu

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU build of PyTorch: plain PyTorch below
    triton = None


def _launched(launch: Callable[[], None]) -> bool:
    return kernels.launched(launch, "the answer decoder's step kernel")


def _plain_rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm: normalised in float32, rounded to x's dtype, times the weight."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, h_out_ptr, x_out_ptr, eps, DIM: tl.constexpr, BLOCK: tl.constexpr,
                             ADD: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < DIM
        h = tl.load(h_ptr + row * DIM + offs, mask=mask, other=0.0)
        if ADD:
            d = tl.load(d_ptr + row * DIM + offs, mask=mask, other=0.0)
            h = (h.to(tl.float32) + d.to(tl.float32)).to(h.dtype)
            tl.store(h_out_ptr + row * DIM + offs, h, mask=mask)
        h32 = h.to(tl.float32)
        inv = tl.rsqrt(tl.sum(h32 * h32, axis=0) / DIM + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = (w * (h32 * inv).to(h.dtype).to(tl.float32)).to(h.dtype)
        tl.store(x_out_ptr + row * DIM + offs, x, mask=mask)

    @triton.jit
    def _qk_norm_rope_store_kernel(
        qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slot_ptr,
        qkv_stride, k_stride_b, k_stride_h, k_stride_l, v_stride_b, v_stride_h, v_stride_l, eps,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    ):  # fmt: skip
        row, head = tl.program_id(0), tl.program_id(1)
        lo = tl.arange(0, HALF)
        src = qkv_ptr + row * qkv_stride + head * 2 * HALF  # q heads, then k heads, then v heads
        x1 = tl.load(src + lo)
        x2 = tl.load(src + HALF + lo)
        dtype = x1.dtype
        if head < HEADS:
            w1 = tl.load(qw_ptr + lo).to(tl.float32)
            w2 = tl.load(qw_ptr + HALF + lo).to(tl.float32)
        else:
            w1 = tl.load(kw_ptr + lo).to(tl.float32)
            w2 = tl.load(kw_ptr + HALF + lo).to(tl.float32)
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        inv = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
        y1 = (w1 * (x1 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        y2 = (w2 * (x2 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        cos = tl.load(cos_ptr + row * HALF + lo).to(tl.float32)
        sin = tl.load(sin_ptr + row * HALF + lo).to(tl.float32)
        # x·cos + rotate_half(x)·sin, rotate_half(x) = (−x2, x1); each product rounded, as in eager PyTorch
        o1 = ((y1 * cos).to(dtype).to(tl.float32) - (y2 * sin).to(dtype).to(tl.float32)).to(dtype)
        o2 = ((y2 * cos).to(dtype).to(tl.float32) + (y1 * sin).to(dtype).to(tl.float32)).to(dtype)
        if head < HEADS:
            dst = q_ptr + (row * HEADS + head) * 2 * HALF
            tl.store(dst + lo, o1)
            tl.store(dst + HALF + lo, o2)
        else:
            kv = head - HEADS
            slot = tl.load(slot_ptr)
            dst = k_ptr + row * k_stride_b + kv * k_stride_h + slot * k_stride_l
            tl.store(dst + lo, o1)
            tl.store(dst + HALF + lo, o2)
            v_src = qkv_ptr + row * qkv_stride + (HEADS + KV_HEADS + kv) * 2 * HALF
            v_dst = v_ptr + row * v_stride_b + kv * v_stride_h + slot * v_stride_l
            tl.store(v_dst + lo, tl.load(v_src + lo))
            tl.store(v_dst + HALF + lo, tl.load(v_src + HALF + lo))

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, INTER: tl.constexpr, BLOCK: tl.constexpr):
        row, block = tl.program_id(0), tl.program_id(1)
        offs = block * BLOCK + tl.arange(0, BLOCK)
        mask = offs < INTER
        g = tl.load(gu_ptr + row * 2 * INTER + offs, mask=mask, other=0.0)
        u = tl.load(gu_ptr + row * 2 * INTER + INTER + offs, mask=mask, other=0.0)
        g32 = g.to(tl.float32)
        s = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)
        tl.store(out_ptr + row * INTER + offs, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, RMSNorm(h + delta)) over the last axis; without delta, (h, RMSNorm(h)). h, delta: [..., D]."""
    if kernels.available(h) and weight.dtype == h.dtype and h.is_contiguous():
        dim = h.shape[-1]
        out_h = torch.empty_like(h) if delta is not None else h
        out_x = torch.empty_like(h)
        block = triton.next_power_of_2(dim)

        def launch() -> None:
            with on_its_gpu(h):
                _add_rms_norm_kernel[(h.numel() // dim,)](
                    h, delta.contiguous() if delta is not None else h, weight, out_h, out_x, eps, DIM=dim,
                    BLOCK=block, ADD=delta is not None, num_warps=4 if block <= 2048 else 8,
                )  # fmt: skip

        if _launched(launch):
            return out_h, out_x
    if delta is not None:
        h = h + delta
    return h, _plain_rms(h, weight, eps)


def qk_norm_rope_store(
    qkv: torch.Tensor, heads: int, kv_heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
    cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """One token per row: qkv [B, (heads + 2 kv_heads) * D] (q, k, v heads in turn) -> q [B, heads, D], RMSNormed per
    head and rotated; k likewise and v as it is are written into keys/values [B, kv_heads, L, D] at position `slot`
    (a one-element long tensor). cos, sin: [B, D / 2], the angles of each row's position (the halves of
    rotate-half RoPE)."""
    rows = qkv.shape[0]
    head = q_weight.shape[0]
    half = head // 2
    fused = (
        kernels.available(qkv)
        and qkv.stride(-1) == 1
        and half == triton.next_power_of_2(half)
        and q_weight.dtype == k_weight.dtype == qkv.dtype == keys.dtype
        and keys.stride(-1) == 1
        and values.stride(-1) == 1
    )
    if fused:
        q = torch.empty(rows, heads, head, dtype=qkv.dtype, device=qkv.device)

        def launch() -> None:
            with on_its_gpu(qkv):
                _qk_norm_rope_store_kernel[(rows, heads + kv_heads)](
                    qkv, q_weight, k_weight, cos.contiguous(), sin.contiguous(), q, keys, values, slot,
                    qkv.stride(0), *keys.stride()[:3], *values.stride()[:3], eps,
                    HEADS=heads, KV_HEADS=kv_heads, HALF=half, num_warps=1,
                )  # fmt: skip

        if _launched(launch):
            return q
    q, k, v = qkv.view(rows, heads + 2 * kv_heads, head).split((heads, kv_heads, kv_heads), dim=1)
    cos2, sin2 = torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]
    q = _rope(_plain_rms(q, q_weight, eps), cos2, sin2)
    k = _rope(_plain_rms(k, k_weight, eps), cos2, sin2)
    keys.index_copy_(2, slot, k[:, :, None])
    values.index_copy_(2, slot, v[:, :, None])
    return q


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, x·cos + rotate_half(x)·sin, with rotate_half(x)·sin = roll(x, half)·(−sin | sin)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate, then up) -> SiLU(gate) * up [..., I]."""
    inter = gate_up.shape[-1] // 2
    if kernels.available(gate_up) and gate_up.is_contiguous():
        rows = gate_up.numel() // (2 * inter)
        out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
        block = min(1024, triton.next_power_of_2(inter))

        def launch() -> None:
            with on_its_gpu(gate_up):
                _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, INTER=inter, BLOCK=block,
                                                                    num_warps=4)  # fmt: skip

        if _launched(launch):
            return out
    gate, up = gate_up.split(inter, dim=-1)
    return F.silu(gate) * up
