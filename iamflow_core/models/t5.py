"""umT5-XXL text encoder in the Wan2.1 layout.

Parameter names are the keys of Wan's `models_t5_umt5-xxl-enc-bf16.pth`, so that file loads with a plain
`load_state_dict`. The math is T5 v1.1 / umT5: RMS norm, attention without the 1/sqrt(d) scale plus a learned
relative position bias in every layer (umT5 does not share it across layers), gated-GELU feed-forward, no biases.

Math ported from Wan2.1 `wan/modules/t5.py` (github.com/Wan-Video/Wan2.1 @ 9737cba, Apache-2.0); dropout is left
out because the encoder is only run for inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import T5Config
from .fused import RMSNorm  # T5's layer norm: RMS, no mean subtraction, no bias


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """Keep the fp16 residual stream finite: umT5 activations overflow fp16 (Wan clamps the same way).

    Clamped unconditionally rather than only when an inf appears, so there is no host sync per layer.
    """
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max - 1000
    return x.clamp(-limit, limit)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """Bidirectional T5 buckets of `key - query` for a square [length, length] attention map, as int64.

    Half the buckets are for keys after the query. In each half, distances below `num_buckets // 4` get one bucket
    each, larger ones share log-spaced buckets up to `max_distance`, and anything farther goes into the last one.
    """
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # [Lq, Lk]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    max_exact = half // 2
    # The clamp only keeps log(0) out of the branch that `where` throws away for short distances.
    log_ratio = torch.log(rel.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    far = max_exact + (log_ratio * (half - max_exact)).long()
    far = far.clamp(max=half - 1)
    return buckets + torch.where(rel < max_exact, rel, far)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head), added to the attention logits."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """buckets: [Lq, Lk] int64 -> bias [1, num_heads, Lq, Lk]."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class Attention(nn.Module):
    """Multi-head self-attention with no biases and no 1/sqrt(head_dim) scale (T5 folds it into the weights)."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: [B, L, dim], bias: [B or 1, num_heads, L, L] additive logits bias in x's dtype -> [B, L, dim]."""
        b, n = x.shape[0], self.num_heads
        q, k, v = (proj(x).unflatten(-1, (n, -1)).transpose(1, 2) for proj in (self.q, self.k, self.v))  # [B, N, L, D]
        # SDPA's fused kernels take the softmax in fp32 even for bf16 inputs, as Wan's explicit `.float()` does.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]))


class GatedFeedForward(nn.Module):
    """`fc2(fc1(x) * gelu_tanh(gate(x)))`; `gate` is a Sequential so its weight is keyed `gate.0.weight` as in Wan."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, dim] -> [B, L, dim]."""
        return self.fc2(self.fc1(x) * self.gate(x))


class EncoderBlock(nn.Module):
    """Pre-norm residual block: self-attention with its own position bias, then the gated feed-forward."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = GatedFeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, padded: torch.Tensor | None) -> torch.Tensor:
        """x: [B, L, dim], buckets: [L, L] int64, padded: [B, 1, 1, L] bool, True = padded key -> [B, L, dim]."""
        bias = self.pos_embedding(buckets).to(x.dtype)  # [1, N, L, L]
        if padded is not None:
            # The most negative finite value rather than -inf: a row with no real key stays finite instead of NaN.
            bias = torch.where(padded, torch.finfo(x.dtype).min, bias)
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """The umT5 encoder stack: token embedding (unscaled), `num_layers` blocks, final RMS norm.

    Positions past a sequence's length are computed but never attended to; their outputs are meaningless and the
    caller zeros them (`TextEncoder` does).
    """

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids: [B, L] int64 token ids; mask: [B, L] bool/int, nonzero = real token (None = all real).

        Returns [B, L, dim] in the parameters' dtype.
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must be [B, L], got shape {tuple(ids.shape)}")
        x = self.token_embedding(ids)
        buckets = relative_position_buckets(ids.shape[1], self.cfg.num_buckets, self.cfg.max_distance, ids.device)
        padded = None
        if mask is not None:
            if mask.shape != ids.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match ids shape {tuple(ids.shape)}")
            padded = (mask == 0)[:, None, None, :]
        for block in self.blocks:
            x = block(x, buckets, padded)
        return self.norm(x)
