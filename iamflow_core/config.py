"""Frozen configuration dataclasses for the streaming engine.

Model dimensions are never hard-coded in the model code: `weights.py` detects them from checkpoint tensor shapes
and builds these configs, so tiny test checkpoints and full-size ones go through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

# Wan2.1 latent normalisation constants (16 channels), shared by every Wan2.1 VAE checkpoint.
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class DiTConfig:
    """Wan2.1 text-to-video DiT. Defaults are Wan2.1-T2V-1.3B."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    eps: float = 1e-6
    # Length of the RoPE position table the checkpoints were trained with (latent frames per axis).
    rope_max_positions: int = 1024
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_channels", "out_channels", "text_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Real dims of the (time, height, width) rotary sections of one head, as in Wan2.1: 44/42/42 for 128."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)


@dataclass(frozen=True)
class T5Config:
    """umT5 encoder in the Wan layout. Defaults are umT5-XXL."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    text_len: int = 512
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads != 0:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")


@dataclass(frozen=True)
class VAEConfig:
    """Causal Wan2.1 video VAE. Defaults are the released Wan2.1 VAE."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENT_STD

    def __post_init__(self) -> None:
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"latents_mean/std need {self.z_dim} values, got {len(self.latents_mean)}/{len(self.latents_std)}"
            )
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temporal_downsample needs one entry per downsampling stage (len(dim_mult) - 1)")

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


@dataclass(frozen=True)
class CacheConfig:
    """Self-attention KV cache of the streaming DiT, in latent frames.

    The attention context of a chunk is [sink | memory | local window | the chunk itself]. `window_frames` counts
    the sink, the previous frames and the current chunk together, as LongLive/MemFlow's `local_attn_size` does:
    with the defaults a chunk sees 3 sink frames, 6 previous frames and its own 3 frames, plus up to 6 memory frames.
    """

    chunk_frames: int = 3
    sink_frames: int = 3
    window_frames: int = 12
    memory_frames: int = 6
    # > 0: each attention head keeps only its top-k frames of sink + memory, ranked by mean-pooled q.k (MemFlow's
    # sparse memory activation); the local window and the chunk itself are always attended.
    sparse_topk: int = 0

    def __post_init__(self) -> None:
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        if self.sink_frames < 0 or self.memory_frames < 0 or self.sparse_topk < 0:
            raise ValueError("sink_frames, memory_frames and sparse_topk must be >= 0")
        if self.window_frames < self.sink_frames + self.chunk_frames:
            raise ValueError(
                f"window_frames {self.window_frames} must hold the sink ({self.sink_frames}) and one chunk "
                f"({self.chunk_frames}); use at least {self.sink_frames + self.chunk_frames}"
            )

    @property
    def local_frames(self) -> int:
        """Previous (non-sink) frames kept in the rolling window."""
        return self.window_frames - self.sink_frames - self.chunk_frames
