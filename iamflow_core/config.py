"""Frozen configuration dataclasses for the streaming engine, and how a user-facing option is declared.

Model dimensions are never hard-coded in the model code: `weights/` detects them from checkpoint tensor shapes
and builds these configs, so tiny test checkpoints and full-size ones go through the same code.

An option a user can set (a CLI flag, a node widget) is a dataclass field made with `option(...)`: its default, help
text, bounds and choices are written once, there. `check_options` validates every such field in `__post_init__`,
and the CLI and the ComfyUI nodes build their flags and widgets from the same declaration (`option_spec`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

# Wan2.1 makes 16 video frames per second.
VIDEO_FPS = 16
# The number formats a user can pick for model weights, by the name the CLI and the nodes show.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """What the CLI and the nodes need to show one setting: help, bounds, choices.

    auto: for a setting whose "automatic" value is None, the number that stands for it where a number must be
    given (a widget); `value_of` turns it back into None.
    """

    help: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None
    label: str | None = None  # how messages name it, e.g. "memory mode"; default: the field name
    auto: float | None = None

    def value_of(self, value: Any) -> Any:
        """A widget's or flag's value as the setting's value (the `auto` number becomes None)."""
        return None if self.auto is not None and value == self.auto else value


def option(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field that is a user-facing option (see `Option`)."""
    return field(default=default, metadata={"option": Option(help, **spec)})


def option_from(cls: type, name: str) -> Any:
    """The same option as `cls.name` (its default and declaration), for a settings class that exposes it too."""
    default, spec = option_spec(cls, name)
    return field(default=default, metadata={"option": spec})


def option_spec(cls: type, name: str) -> tuple[Any, Option]:
    """The default and declaration of option `name` of dataclass `cls`."""
    found = {f.name: f for f in dataclasses.fields(cls)}
    if name not in found or "option" not in found[name].metadata:
        raise KeyError(f"{cls.__name__} has no option {name!r}")
    return found[name].default, found[name].metadata["option"]


def check_options(obj: Any) -> None:
    """Raise a ValueError naming the option, its value and what it may be, for the first out-of-range option."""
    for f in dataclasses.fields(obj):
        spec = f.metadata.get("option")
        value = getattr(obj, f.name)
        if spec is None or value is None:
            continue
        label = spec.label or f.name
        if spec.choices is not None and value not in spec.choices:
            raise ValueError(f"unknown {label} {value!r}; choose one of {', '.join(spec.choices)}")
        low = spec.min if spec.min is not None else float("-inf")
        high = spec.max if spec.max is not None else float("inf")
        if spec.choices is None and not isinstance(value, bool) and not low <= value <= high:
            raise ValueError(f"{label} must be in [{_num(low)}, {_num(high)}], got {value}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


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


# Video frames per latent frame of the Wan2.1 VAE (after the first frame, which is decoded alone).
WAN21_TEMPORAL_FACTOR = VAEConfig().temporal_factor


SINK_POSITIONS = ("absolute", "adjacent")


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
    sparse_topk: int = option(
        0,
        "0: off. Else each attention head attends only to its top-k sink and memory frames (sparse activation).",
        min=0,
        max=64,
    )
    # Where the sink's keys sit in time. absolute: at their own frames (Self-Forcing, LongLive). adjacent: just before
    # the oldest other frame of the context, moved as the window rolls (Rolling Forcing's anchor, Reward Forcing).
    sink_positions: str = "absolute"
    # > 0: each frame that leaves the rolling window is blended into a sink frame with this weight (Reward Forcing's
    # EMA sink: 0.001), so the sink follows the video slowly instead of staying its first frames.
    sink_ema: float = 0.0

    def __post_init__(self) -> None:
        check_options(self)
        if self.sink_positions not in SINK_POSITIONS:
            raise ValueError(
                f"unknown sink_positions {self.sink_positions!r}; choose one of {', '.join(SINK_POSITIONS)}"
            )
        if not 0.0 <= self.sink_ema <= 1.0:
            raise ValueError(f"sink_ema must be in [0, 1] (the weight of a leaving frame), got {self.sink_ema}")
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        if self.sink_frames < 0 or self.memory_frames < 0:
            raise ValueError("sink_frames and memory_frames must be >= 0")
        if self.window_frames < self.sink_frames + self.chunk_frames:
            raise ValueError(
                f"window_frames {self.window_frames} must hold the sink ({self.sink_frames}) and one chunk "
                f"({self.chunk_frames}); use at least {self.sink_frames + self.chunk_frames}"
            )

    @property
    def local_frames(self) -> int:
        """Previous (non-sink) frames kept in the rolling window."""
        return self.window_frames - self.sink_frames - self.chunk_frames


STRATEGIES = ("recache", "soft", "hard")


@dataclass(frozen=True)
class TransitionConfig:
    """How the conditioning changes at a prompt switch (see `transition.py` for the strategies)."""

    strategy: str = option(
        "soft",
        "Prompt switch. soft: blend old and new prompt over a window sized by how different they are (IAMFlow); "
        "recache: re-encode the recent frames under the new prompt (LongLive/MemFlow); hard: just switch.",
        choices=STRATEGIES,
        label="transition strategy",
    )
    delay_frames: int = 3
    min_window_frames: int = 3
    max_window_frames: int = 15

    def __post_init__(self) -> None:
        check_options(self)
        if not 0 < self.min_window_frames <= self.max_window_frames:
            lo, hi = self.min_window_frames, self.max_window_frames
            raise ValueError(f"need 0 < min_window_frames ({lo}) <= max_window_frames ({hi})")
        if self.delay_frames < 0:
            raise ValueError(f"delay_frames must be >= 0, got {self.delay_frames}")


@dataclass(frozen=True)
class SamplerConfig:
    """One run of the streaming sampler: video size, the few-step schedule, the cache and the transition.

    The noise seed is the story's (`Story.seed`), so a story file carries it and the sampler never picks it again.
    """

    height: int = option(480, "Video height in pixels, a multiple of 16.", min=16, max=2048, step=16)
    width: int = option(
        832,
        "Video width in pixels, a multiple of 16 (the models were trained at 832x480).",
        min=16,
        max=2048,
        step=16,
    )
    steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    shift: float = 5.0
    cache: CacheConfig = field(default_factory=CacheConfig)
    transition: TransitionConfig = field(default_factory=TransitionConfig)
    # The first chunk's timesteps when they differ from `steps` (None: the same). Causal Forcing++'s 1- and 2-step
    # frame-wise models make their first frame in 4 steps: it has no context to lean on.
    first_steps: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0 or self.height % 16 or self.width % 16:
            raise ValueError(
                f"video size {self.width}x{self.height} must be positive multiples of 16 (VAE 8x, patch 2x); "
                "e.g. 832x480"
            )
        check_options(self)
        if not self.steps:
            raise ValueError("steps must list at least one denoising timestep, e.g. (1000, 750, 500, 250)")
        if self.first_steps is not None and not self.first_steps:
            raise ValueError("first_steps must list at least one timestep, or be None to use steps")
