"""The streaming Wan2.1-T2V-1.3B checkpoints we know, each as a named preset: frames per chunk, the attention window
and sink, and the few-step schedule its repository samples with.

Every checkpoint here is a Self-Forcing-format `.pt` (`generator_ema` / `generator`, keys `model.*`) with the same
tensor shapes, so its keys cannot tell which one it is: the user names it (`--preset-model NAME`, the Streaming
Sampler's *model_preset*). The values are read from each repository's inference config (the file named in
`source`); `differs` says, in plain words, what our engine does that the repository's own sampler does not.

Window and sink are in latent frames, counted as `CacheConfig` counts them (the window holds the sink, the previous
frames and the chunk itself). The repositories that attend to all 21 trained frames (`local_attn_size: -1`, no
sink: Self-Forcing, Causal Forcing) get a window of those 21 frames, and the first 3 frames as a sink once a video
runs past them, as Rolling Forcing and LongLive keep theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import CacheConfig, SamplerConfig

FOUR_STEPS = SamplerConfig.steps  # 1000, 750, 500, 250 before the shift: the schedule of the whole family
TRAINED_FRAMES = 21  # latent frames the 1.3B streaming models attend to in training (81 video frames, 5 s)
FIRST_CHUNK_SINK = 3  # the sink we give models trained without one: their first 3-frame chunk


@dataclass(frozen=True)
class ModelPreset:
    """How one checkpoint family streams. steps: nominal timesteps (warped by `shift`, as the repositories'
    `warp_denoising_step: true` does); first_steps: the first chunk's, when it has its own."""

    name: str
    chunk_frames: int
    sink_frames: int
    window_frames: int
    steps: tuple[float, ...]
    source: str  # the repository and the config file the values come from
    files: str  # where to get the checkpoint
    first_steps: tuple[float, ...] | None = None
    shift: float = SamplerConfig.shift
    sink_positions: str = CacheConfig.sink_positions  # "adjacent": the sink moves to sit just before the window
    sink_ema: float = CacheConfig.sink_ema  # weight of each frame leaving the window blended into the sink
    differs: str = ""  # what our engine does differently from the repository's own sampler

    def __post_init__(self) -> None:
        self.cache()  # a preset that does not make a valid cache fails at import, naming itself
        if not self.steps or (self.first_steps is not None and not self.first_steps):
            raise ValueError(f"model preset {self.name!r} needs at least one denoising step")

    def cache(self, memory_frames: int = CacheConfig.memory_frames, sparse_topk: int = 0) -> CacheConfig:
        """The KV cache this checkpoint streams with, plus the memory segment the memory mode needs."""
        try:
            return CacheConfig(
                chunk_frames=self.chunk_frames, sink_frames=self.sink_frames, window_frames=self.window_frames,
                memory_frames=memory_frames, sparse_topk=sparse_topk, sink_positions=self.sink_positions,
                sink_ema=self.sink_ema,
            )  # fmt: skip
        except ValueError as e:
            raise ValueError(f"model preset {self.name!r}: {e}") from e

    @property
    def summary(self) -> str:
        """One line for help texts and logs: frames per chunk, steps, window and sink."""
        first = f" (first chunk {len(self.first_steps)})" if self.first_steps else ""
        return (
            f"{self.chunk_frames} latent frame{'s' if self.chunk_frames > 1 else ''} per chunk, "
            f"{len(self.steps)} step{'s' if len(self.steps) > 1 else ''}{first}, window {self.window_frames} "
            f"frames with a {self.sink_frames}-frame sink"
        )


def _causal_forcing_frame(steps: tuple[float, ...], config: str, file: str, first: bool) -> dict:
    """The frame-wise Causal Forcing presets differ only in their steps and files."""
    return dict(
        chunk_frames=1, sink_frames=FIRST_CHUNK_SINK, window_frames=TRAINED_FRAMES, steps=steps,
        first_steps=FOUR_STEPS if first else None,
        source=f"github.com/thu-ml/Causal-Forcing configs/{config}",
        files=f"huggingface.co/zhuhz22/Causal-Forcing {file}",
        differs="trained on 21 latent frames with full attention and no sink; past 21 frames the window rolls and "
        "the first 3 frames stay as a sink (the repository stops at 21)",
    )  # fmt: skip


_PRESETS = (
    ModelPreset(
        "longlive",
        chunk_frames=CacheConfig.chunk_frames,
        sink_frames=CacheConfig.sink_frames,
        window_frames=CacheConfig.window_frames,
        steps=FOUR_STEPS,
        source="github.com/NVlabs/LongLive configs/longlive_inference.yaml (1.3B release)",
        files="huggingface.co/Efficient-Large-Model/LongLive-1.3B (with its lora.pt); also MemFlow's and IAMFlow's "
        "DiT, which keep LongLive's cache",
    ),
    ModelPreset(
        "self-forcing",
        chunk_frames=3,
        sink_frames=FIRST_CHUNK_SINK,
        window_frames=TRAINED_FRAMES,
        steps=FOUR_STEPS,
        source="github.com/guandeh17/Self-Forcing configs/self_forcing_dmd.yaml",
        files="huggingface.co/gdhe17/Self-Forcing checkpoints/self_forcing_dmd.pt",
        differs="trained on 21 latent frames with full attention and no sink; past 21 frames the window rolls and "
        "the first chunk stays as a sink (the repository stops at 21)",
    ),
    ModelPreset(
        "causal-forcing-chunk",
        chunk_frames=3,
        sink_frames=FIRST_CHUNK_SINK,
        window_frames=TRAINED_FRAMES,
        steps=FOUR_STEPS,
        source="github.com/thu-ml/Causal-Forcing configs/causal_forcing_dmd_chunkwise.yaml",
        files="huggingface.co/zhuhz22/Causal-Forcing chunkwise/causal_forcing.pt",
        differs="trained on 21 latent frames with full attention and no sink; past 21 frames the window rolls and "
        "the first chunk stays as a sink (the repository stops at 21)",
    ),
    ModelPreset(
        "causal-forcing-frame-4step",
        **_causal_forcing_frame(FOUR_STEPS, "causal_forcing_dmd_framewise.yaml", "framewise/causal_forcing.pt", False),
    ),
    ModelPreset(
        "causal-forcing-frame-2step",
        **_causal_forcing_frame(
            (1000.0, 500.0), "causal_forcing_dmd_framewise_2step.yaml", "causal-forcing++/framewise-2step.pt", True
        ),
    ),
    ModelPreset(
        "causal-forcing-frame-1step",
        **_causal_forcing_frame(
            (1000.0,), "causal_forcing_dmd_framewise_1step.yaml", "causal-forcing++/framewise-1step.pt", True
        ),
    ),
    ModelPreset(
        "rolling-forcing",
        chunk_frames=3,
        sink_frames=3,  # its first block, kept as the attention sink
        window_frames=TRAINED_FRAMES,  # its attention span: sink + working cache + the 15 frames of its window
        steps=(1000.0, 800.0, 600.0, 400.0, 200.0),
        sink_positions="adjacent",  # its anchor is rotated to sit just before the working cache
        source="github.com/TencentARC/RollingForcing configs/rolling_forcing_dmd.yaml, "
        "pipeline/rolling_forcing_inference.py",
        files="huggingface.co/TencentARC/RollingForcing checkpoints/rolling_forcing_dmd.pt",
        differs="each chunk is denoised on its own through the 5 steps; the repository denoises 5 chunks together, "
        "each at its own noise level (its rolling window), and commits only the oldest, which this engine does not do",
    ),
    ModelPreset(
        "reward-forcing",
        chunk_frames=3,
        sink_frames=3,
        window_frames=9,
        steps=FOUR_STEPS,
        sink_positions="adjacent",  # its cache is re-rotated from 0 each step: the sink sits just before the window
        sink_ema=0.001,  # compression_alpha 0.999 (wan/modules/causal_model.py): each leaving chunk joins the sink
        source="github.com/JaydenLyh/Reward-Forcing configs/reward_forcing.yaml (local_attn_size 9, sink_size 3)",
        files="huggingface.co/JaydenLu666/Reward-Forcing-T2V-1.3B rewardforcing.pt",
        differs="",  # its sink (adjacent, EMA 0.999) and window are the repository's
    ),
)
MODEL_PRESETS: dict[str, ModelPreset] = {p.name: p for p in _PRESETS}
DEFAULT_MODEL_PRESET = "longlive"


def model_preset(name: str | None) -> ModelPreset:
    """The preset called `name` (None: the default, LongLive's cache); one clear error for an unknown name."""
    if name is None:
        return MODEL_PRESETS[DEFAULT_MODEL_PRESET]
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]
