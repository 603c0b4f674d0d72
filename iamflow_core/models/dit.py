"""Causal Wan2.1 text-to-video DiT with two entry points.

`forward` runs the full sequence (bidirectional, or with a block-causal mask); `forward_chunk` runs one chunk of
latent frames against a `KVCache` (sink + rolling window + memory) with the text K/V cached per prompt
(`CrossKV`). One timestep per latent frame. Parameter names are the original Wan2.1 checkpoint keys.

Math follows Wan2.1 `wan/modules/model.py` (Apache-2.0) and the block-causal streaming of Self-Forcing
`wan/modules/causal_model.py`; the residual stream, norms and adaLN modulation run in float32 as in Wan.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache import KVCache
from ..config import DiTConfig
from . import fused
from .attention import attention, precise
from .fp8 import Rows, takes_rows
from .fused import RMSNorm
from .graphs import GraphRunner, graphs_allowed
from .rope import RopeTables, apply_rope


class Context:
    """Where self-attention finds its keys and values; the two entry points differ only here. This one is the full
    sequence's: the chunk's own K/V are the context."""

    def slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Buffers [B, L, H, D] to write the rotated K and the V of `layer` into, or None (fresh tensors)."""
        return None

    def __call__(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer, the chunk's rotated k, v, rotated q or None) -> the context's k, v."""
        return k, v


class CachedContext(Context):
    """A chunk's context from the KV cache: its K/V go straight into the cache's query slots."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.query_slots(layer)

    def __call__(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.context(layer, k, v, q)


@dataclass(frozen=True)
class CrossKV:
    """Cross-attention K/V of one prompt for every layer: k, v [layers, B, text_len, H, D]."""

    k: torch.Tensor
    v: torch.Tensor

    def blend(self, other: CrossKV, alpha: float) -> CrossKV:
        """(1 - alpha) * self + alpha * other: the soft prompt transition. Returns a new object."""
        return CrossKV(torch.lerp(self.k, other.k, alpha), torch.lerp(self.v, other.v, alpha))


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 (x may be float32 already: the residual stream is)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(cfg.dim, cfg.eps), RMSNorm(cfg.dim, cfg.eps)

    def forward(
        self, x: torch.Tensor | Rows, rope: tuple[torch.Tensor, torch.Tensor], context: Context, layer: int,
        backend: str, mask: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """x: [B, L, dim] in the compute dtype, or its FP8 `Rows` -> [B, L, dim]. q and k are rotated at the
        queried positions."""
        q = fused.rms_norm_rope(self.q(x), self.norm_q.weight, self.norm_q.eps, self.num_heads, *rope)
        k_ctx, v_ctx = context(layer, *self.keys_values(x, rope, context, layer), q)
        norms = self.norm_q.weight, self.norm_k.weight  # bound q and k for FP8 attention
        return self.o(attention(q, k_ctx, v_ctx, backend, mask, norms).flatten(2))

    def keys_values(
        self, x: torch.Tensor | Rows, rope: tuple[torch.Tensor, torch.Tensor], context: Context, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated keys and the values [B, L, H, D] of x, written by the kernels that make them into the
        context's slots when it has them (the cache's query slots: no copy after, 2.3 ms of a chunk's 235 on an
        H200)."""
        eps, heads = self.norm_k.eps, self.num_heads
        slots = context.slots(layer)
        if slots is None:
            k = fused.rms_norm_rope(self.k(x), self.norm_k.weight, eps, heads, *rope)
            return k, self.v(x).unflatten(-1, (heads, self.head_dim))
        k, v = slots
        fused.rms_norm_rope(self.k(x), self.norm_k.weight, eps, heads, *rope, out=k)
        if not fused.linear_into(x, self.v, v.flatten(2)):
            v.copy_(self.v(x).unflatten(-1, (heads, self.head_dim)))
        return k, v


class CrossAttention(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(cfg.dim, cfg.eps), RMSNorm(cfg.dim, cfg.eps)

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context: [B, Lt, dim] (after text_embedding) -> k, v [B, Lt, H, D]."""
        heads = (context.shape[0], context.shape[1], self.num_heads, self.head_dim)
        return self.norm_k(self.k(context)).view(heads), self.v(context).view(heads)

    def forward(self, x: torch.Tensor | Rows, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        """x: [B, L, dim] in the compute dtype, or its FP8 `Rows` -> [B, L, dim]."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, self.head_dim))
        return self.o(attention(q, k, v, precise(backend)).flatten(2))  # 512 text keys: cheap, kept in 16 bits


class WanBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(
        self, x: torch.Tensor, pending: tuple[torch.Tensor, torch.Tensor] | None, e0: torch.Tensor,
        cross: tuple[torch.Tensor, torch.Tensor], frames: int, rope_q: tuple[torch.Tensor, torch.Tensor],
        context: Context, layer: int, backend: str, mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """x: [B, L, dim] float32 residual stream; e0: [B, F, 6, dim] float32 per-frame modulation. The FFN's gated
        residual is left to the caller: returns (x before it, (ffn output, gate)), and the previous block's such pair
        comes in as `pending`, added here in the pass of the first norm (one read and write of the float32 stream
        fewer per block on a GPU); the trunk adds the last block's."""
        dtype = self.norm3.weight.dtype  # the compute dtype (never quantized, unlike the linears)
        eps = self.norm3.eps
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float()[:, None] + e0[:, :, None]).unbind(3)
        cross_attn, (ffn_in, gelu, ffn_out) = self.cross_attn, self.ffn
        # 1. Self-attention over the context (full sequence or cache), gated per frame.
        x, h = self._attention_input(x, pending, shift1, scale1, frames)
        y = self.self_attn(h, rope_q, context, layer, backend, mask)
        # 2. Cross-attention to the prompt.
        fp8 = takes_rows(cross_attn.q, dtype)
        x, h = fused.gated_residual_norm(x, y, gate1, frames, self.norm3.weight, self.norm3.bias, eps, dtype, fp8)
        y = cross_attn(Rows(*h) if fp8 else h, *cross, backend)
        # 3. Feed-forward, gated per frame. FP8 files' ffn.0 takes FP8 rows and its GELU is a kernel of its own
        # (fused with a per-row FP8 quantization of the 8960-wide rows it took 0.13-0.15 ms against 0.05 ms on an
        # H200, more than an FP8 ffn.2 saves); a 16-bit ffn.0 runs its GELU in the GEMM (`fused.linear_gelu`).
        fp8 = takes_rows(ffn_in, dtype)
        x, h = fused.residual_modulate(x, y, shift2, scale2, frames, eps, dtype, fp8)
        return x, (ffn_out(fused.linear_gelu(Rows(*h) if fp8 else h, ffn_in, gelu)), gate2)

    def write_keys_values(
        self, x: torch.Tensor, pending: tuple[torch.Tensor, torch.Tensor] | None, e0: torch.Tensor, frames: int,
        rope_q: tuple[torch.Tensor, torch.Tensor], context: Context, layer: int,
    ) -> None:  # fmt: skip
        """Only what `forward` gives the cache: this block's keys and values of x, handed to `context` (the last
        block of a clean pass, whose output nothing reads)."""
        shift1, scale1, *_ = (self.modulation.float()[:, None] + e0[:, :, None]).unbind(3)
        _, h = self._attention_input(x, pending, shift1, scale1, frames)
        context(layer, *self.self_attn.keys_values(h, rope_q, context, layer), None)

    def _attention_input(
        self, x: torch.Tensor, pending: tuple[torch.Tensor, torch.Tensor] | None, shift: torch.Tensor,
        scale: torch.Tensor, frames: int,
    ) -> tuple[torch.Tensor, torch.Tensor | Rows]:  # fmt: skip
        """(the residual stream with the previous block's pending FFN residual added, the self-attention's input:
        its modulated first norm, as FP8 `Rows` when the q/k/v linears run FP8 matmuls)."""
        # FP8 linears that run FP8 matmuls get their input quantized by the kernel that makes it, in the same pass.
        # Each residual add and the norm after it are one compiled function too (one kernel each on contiguous rows,
        # H200 probe), so the float32 stream is read once for both.
        attn, dtype, eps = self.self_attn, self.norm3.weight.dtype, self.norm3.eps
        fp8 = takes_rows(attn.q, dtype) and takes_rows(attn.k, dtype) and takes_rows(attn.v, dtype)
        if pending is not None:
            y, gate = pending
            x, h = fused.residual_modulate(x, y, shift, scale, frames, eps, dtype, fp8, gate)
        elif fp8:
            h = fused.modulate_fp8(x, shift, scale, frames, eps)
        else:
            h = fused.modulate(x, shift, scale, frames, eps, dtype)
        return x, Rows(*h) if fp8 else h


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_channels)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, frames: int) -> torch.Tensor:
        """x: [B, L, dim] float32, e: [B, F, dim] float32 -> [B, L, patch_volume * out_channels]."""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)
        h = (self.norm(x).unflatten(1, (frames, -1)) * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)
        return self.head(h.to(self.head.weight.dtype))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [*t.shape, dim] in float32: cos half then sin half, as Wan."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class CausalWanDiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.rope = RopeTables(cfg.rope_split, cfg.rope_max_positions, cfg.rope_theta)
        self.attention_backend = "sdpa"
        # Replay chunk forwards as CUDA graphs once the cache layout repeats (see graphs.py); False: always eager.
        self.cuda_graphs = True
        self._graphs = GraphRunner()
        self._rope_memo: tuple[tuple, tuple[torch.Tensor, ...]] | None = None

    def reset_buffers(self) -> None:
        """Forget device-bound tables (call after moving a meta-initialised model to real tensors)."""
        self.rope = RopeTables(self.cfg.rope_split, self.cfg.rope_max_positions, self.cfg.rope_theta)
        self._rope_memo = None
        self.release_graphs()

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @property
    def graph_replays(self) -> int:
        """CUDA-graph replays of chunk forwards over this model's life."""
        return self._graphs.replays

    @property
    def graph_captures(self) -> tuple[int, float]:
        """CUDA graphs captured over this model's life, and the host seconds their captures took."""
        return self._graphs.captures, self._graphs.capture_s

    def release_graphs(self) -> None:
        """Free the captured CUDA graphs and their memory (the pipeline calls this when a story ends)."""
        self._graphs.clear()

    def _apply(self, fn, recurse: bool = True):
        # Moving or casting the weights invalidates captured graphs (they hold the old addresses).
        self.release_graphs()
        return super()._apply(fn, recurse)

    # conditioning --------------------------------------------------------------------------------------------------
    def encode_text(self, text: torch.Tensor) -> CrossKV:
        """text: [B, text_len, text_dim] umT5 states (zero-padded to 512) -> per-layer cross-attention K/V."""
        context = self.text_embedding(text.to(self.text_embedding[0].weight.dtype))
        kv = [block.cross_attn.text_kv(context) for block in self.blocks]
        return CrossKV(torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv]))

    def _time(self, t: torch.Tensor, batch: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t: [B] or [B, F] -> e [B, F, dim], e0 [B, F, 6, dim], both float32 (Wan keeps this path in fp32)."""
        t = t.to(self.device).float()
        t = t[:, None].expand(batch, frames) if t.dim() == 1 else t
        if t.shape != (batch, frames):
            raise ValueError(f"timesteps must be [B] or [B, F] = [{batch}, {frames}], got {list(t.shape)}")
        lin1, lin2, proj = self.time_embedding[0], self.time_embedding[2], self.time_projection[1]
        e = F.linear(timestep_embedding(t, self.cfg.freq_dim), lin1.weight.float(), lin1.bias.float())
        e = F.linear(F.silu(e), lin2.weight.float(), lin2.bias.float())
        e0 = F.linear(F.silu(e), proj.weight.float(), proj.bias.float()).unflatten(-1, (6, self.cfg.dim))
        return e, e0

    # shared trunk ----------------------------------------------------------------------------------------------
    def _run(
        self, x: torch.Tensor, t: torch.Tensor, cross: CrossKV, rope_q: tuple[torch.Tensor, torch.Tensor],
        context: Context, mask: torch.Tensor | None, keys_values_only: bool = False,
    ) -> torch.Tensor | None:  # fmt: skip
        """x: [B, C, F, H, W] latents -> velocity [B, C_out, F, H, W]. keys_values_only: the last block stops once
        its keys and values are handed to `context`, and nothing is returned (a clean pass)."""
        b, _, f, h, w = x.shape
        pt, ph, pw = self.cfg.patch_size
        # Rows made contiguous: the transposed view of the patch embedding's [B, dim, L] would carry its layout through
        # every residual add of all blocks (compiled kernels keep eager strides), and each norm would then reduce
        # along strided rows: on an H200 every LayerNorm ran as three kernels with the residual add left outside.
        tokens = self.patch_embedding(x.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        tokens = tokens.contiguous().float()  # one copy in the compute dtype, then the cast keeps the rows contiguous
        e, e0 = self._time(t, b, f // pt)
        pending, backend = None, self.attention_backend  # each block's FFN residual goes in the next one's first norm
        for i, block in enumerate(self.blocks):
            if keys_values_only and i == len(self.blocks) - 1:
                block.write_keys_values(tokens, pending, e0, f // pt, rope_q, context, i)
                return None
            tokens, pending = block(tokens, pending, e0, (cross.k[i], cross.v[i]), f // pt, rope_q, context, i,
                                    backend, mask)  # fmt: skip
        tokens = fused.gated_residual(tokens, *pending, f // pt)
        out = self.head(tokens, e, f // pt).float()
        # unpatchify: [B, F*h*w, pt*ph*pw*C] -> [B, C, F*pt, h*ph, w*pw]
        out = out.view(b, f // pt, h // ph, w // pw, pt, ph, pw, -1)
        return torch.einsum("bfhwpqrc->bcfphqwr", out).reshape(b, -1, f, h, w)

    def _grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        _, c, f, h, w = x.shape
        pt, ph, pw = self.cfg.patch_size
        if c != self.cfg.in_channels or f % pt or h % ph or w % pw:
            raise ValueError(
                f"latents {list(x.shape)} do not fit the DiT: need {self.cfg.in_channels} channels and "
                f"frames/height/width divisible by the patch {self.cfg.patch_size}"
            )
        return f // pt, h // ph, w // pw

    def _rope(self, positions: tuple[int, ...], h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of a token grid, memoised: the forwards of one chunk share their positions."""
        key = (positions, h, w, self.device)
        if self._rope_memo is None or self._rope_memo[0] != key:
            self._rope_memo = (key, self.rope.grid(positions, h, w, self.device))
        return self._rope_memo[1]

    def rotator(self, h: int, w: int) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
        """Moves stored keys [layers, B, n*T, H, D] in time by per-frame deltas (for the cache, past the table)."""

        def rotate(k: torch.Tensor, deltas: list[int]) -> torch.Tensor:
            return apply_rope(k, *self.rope.grid(deltas, h, w, self.device, spatial=False))

        return rotate

    # entry points --------------------------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor | CrossKV, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Full-sequence forward. x: [B, C, F, H, W]; t: [B] or [B, F]; text: [B, 512, text_dim] or CrossKV;
        mask: bool [L, L] over tokens (True = attend), e.g. `cache.block_causal_mask`, or None (bidirectional)."""
        f, h, w = self._grid(x)
        cross = text if isinstance(text, CrossKV) else self.encode_text(text)
        cos, sin = self.rope.grid(range(f), h, w, self.device)
        return self._run(x, t, cross, (cos, sin), Context(), None if mask is None else mask.to(self.device))

    def forward_chunk(
        self, x: torch.Tensor, t: torch.Tensor, cross: CrossKV, cache: KVCache, start_frame: int, commit: bool = False
    ) -> torch.Tensor:
        """One chunk of latent frames starting at absolute latent frame `start_frame`, attending to the cache.

        x: [B, C, F, H, W]; t: [B] or [B, F]. With `commit=True` (the clean t=0 pass) the chunk's K/V are kept in the
        cache afterwards; denoising passes leave the cache as it was. F may exceed a chunk up to
        `cache.query_capacity` to recache frames already in the window under a new prompt (LongLive's KV recache).
        """
        return self._chunk(x, t, cross, cache, start_frame, commit, keys_values_only=False)

    def write_chunk(self, x: torch.Tensor, t: torch.Tensor, cross: CrossKV, cache: KVCache, start_frame: int) -> None:
        """The clean pass when only the cache wants it: what `forward_chunk(..., commit=True)` leaves in the cache,
        without its output. Run eagerly (a recache, a reference picture, the CPU) the last block stops once its keys
        and values are written (its attention, cross-attention and FFN, and the head, would only make the output):
        1/30 of the forward less. Under CUDA graphs it replays the layout's graph of the whole forward."""
        self._chunk(x, t, cross, cache, start_frame, commit=True, keys_values_only=True)

    def _chunk(
        self, x: torch.Tensor, t: torch.Tensor, cross: CrossKV, cache: KVCache, start_frame: int, commit: bool,
        keys_values_only: bool,
    ) -> torch.Tensor | None:  # fmt: skip
        f, h, w = self._grid(x)
        if cache.tokens_per_frame != h * w:
            raise ValueError(f"cache holds {cache.tokens_per_frame} tokens per frame, latents give {h * w}")
        layout = cache.begin(range(start_frame, start_frame + f), self.rotator(h, w))
        q_cos, q_sin = self._rope(layout.query_positions, h, w)
        context = CachedContext(cache)
        if self._use_graphs(x, cache):
            # Graph inputs are exactly what changes between chunks of one layout; the cache is written in place.
            # A clean pass replays its layout's graph of the whole forward, its output unused: a graph of its own
            # would cost a capture for each layout (two eager forwards) against 1/30 of a forward a chunk, and
            # identity stories change layouts as their memory fills (one H200, one run each: 30.89 against 30.41 FPS).
            t = t.to(self.device)
            key = (layout.ranges, layout.query_range, tuple(x.shape), x.dtype, tuple(t.shape), t.dtype,
                   tuple(cross.k.shape), cross.k.dtype, self.attention_backend)  # fmt: skip

            def body(x, t, ck, cv, q_cos, q_sin):
                return self._run(x, t, CrossKV(ck, cv), (q_cos, q_sin), context, None)

            owner = (cache.k.data_ptr(), cache.v.data_ptr())
            out = self._graphs.run(owner, key, body, x, t, cross.k, cross.v, q_cos, q_sin)
        else:
            out = self._run(x, t, cross, (q_cos, q_sin), context, None, keys_values_only)
        if commit:
            cache.commit()
        return None if keys_values_only else out

    def _use_graphs(self, x: torch.Tensor, cache: KVCache) -> bool:
        # Sparse memory activation picks frames with host-built indices per call: not capturable.
        # Inside fused.eager() the forward is a one-off: capturing it would only cost memory.
        capturable = self.cuda_graphs and x.is_cuda and cache.cfg.sparse_topk == 0
        return capturable and graphs_allowed() and not fused.eager_now()

    def new_cache(
        self, cfg, tokens_per_frame: int, batch: int = 1, dtype: torch.dtype | None = None, kind: type = KVCache,
        device: torch.device | None = None,
    ) -> KVCache:  # fmt: skip
        """A KV cache (a `KVCache`, or the subclass `kind`) sized for this model, on its device or `device`."""
        return kind(
            cfg,
            num_layers=self.cfg.num_layers,
            tokens_per_frame=tokens_per_frame,
            num_heads=self.cfg.num_heads,
            head_dim=self.cfg.head_dim,
            batch=batch,
            device=device or self.device,
            dtype=dtype or self.blocks[0].norm3.weight.dtype,  # the compute dtype (linears may be FP8)
            rope_limit=self.cfg.rope_max_positions,
        )
