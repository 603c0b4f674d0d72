"""The NarraStream-Bench constants the eval uses, in one place.

Every default is the value of the benchmark's `configs/default.yaml` (Eddie0521/NarraStream-Bench, commit 3443e52,
Apache-2.0), `aggregation.metrics.<metric>` and `evaluation`, unless its comment says otherwise. The metric code
reads them from here; nothing else writes these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchSettings:
    # subject_consistency / background_consistency (utils/consistency_metric.py)
    frame_positions: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # of each prompt's frames
    intra_percentile: float = 25.0  # intra_reduction: p25 of the in-prompt pair similarities
    inter_percentile: float = 25.0  # inter_reduction: p25 of the across-prompt similarities
    local_weight: float = 0.34
    inter_weight: float = 0.66
    inter_adjacent_weight: float = 0.5
    inter_anchor_weight: float = 0.5
    dino_input_size: int = 224  # models.dino.input_size: the short side DINO sees (no crop)
    # temporal_flickering (metrics/quality/temporal_flickering.py)
    pair_percentile: float = 90.0  # pair_spatial_reduction: p90 of a pair's per-pixel luma residual
    raw_error_percentile: float = 84.0  # raw_error_reduction: p84 over a prompt's pairs
    flicker_tau: float = 0.5  # score = exp(-raw_error / tau)
    # boundary_smoothness (metrics/temporal/boundary_smoothness.py)
    tolerance_abs: float = 0.02  # flow_tolerance_abs (here in luma levels, see metrics.boundary_smoothness)
    tolerance_rel: float = 0.5  # flow_tolerance_rel
    # conditional_longrange (metrics/temporal/conditional_longrange.py, models/dino_encoder.py)
    longrange_floor: float = 0.58  # similarity_floor of the affine_power mapping
    longrange_power: float = 1.5  # similarity_power
    # vlm_score (metrics/instruction/vlm_score.py, evaluation.vlm_frames_per_segment)
    judge_frames_per_prompt: int = 5
    judge_segment_weight: float = 0.8
    judge_overall_weight: float = 0.2
    judge_max_tokens: int = 256  # services.vlm.max_tokens
    judge_timeout_s: float = 300.0  # ours: one request carries 5 frames per prompt

    def __post_init__(self) -> None:
        if not self.frame_positions or not all(0.0 <= p <= 1.0 for p in self.frame_positions):
            raise ValueError(f"frame_positions must be fractions in [0, 1], got {self.frame_positions}")
        for name in ("intra_percentile", "inter_percentile", "pair_percentile", "raw_error_percentile"):
            if not 0.0 <= getattr(self, name) <= 100.0:
                raise ValueError(f"{name} must be in [0, 100], got {getattr(self, name)}")
        if self.flicker_tau <= 0 or self.judge_frames_per_prompt < 1:
            raise ValueError("flicker_tau must be positive and judge_frames_per_prompt at least 1")


BENCH = BenchSettings()

# The dimensions, in the benchmark's metric names (core/evaluator.py `metric_folder_map`), in table order.
LOCAL_DIMENSIONS = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "boundary_smoothness",
    "conditional_longrange",
)
JUDGE_DIMENSIONS = ("vlm_score",)
