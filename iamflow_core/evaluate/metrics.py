"""The locally computable NarraStream-Bench dimensions, as pure functions of features and frame statistics.

Each function follows the benchmark's metric file named in its docstring (Eddie0521/NarraStream-Bench, commit
3443e52, Apache-2.0); the code is ours, the definitions and constants are theirs (`settings.BenchSettings`). Where
the benchmark has one video file per prompt ("segment"), we have one video and the prompts' frame ranges from the
story map (`inputs.StoryLayout`). Where it weights prompts by an LLM planner, we weight them equally: that is the
benchmark's own fallback (`fallback_strategy: mean`) when the planner is not available.

Each function returns a dict with "score" (None when the story has too little to score) and the raw numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .settings import BenchSettings

# frame sampling -----------------------------------------------------------------------------------------------


def consistency_frames(start: int, end: int, positions: Sequence[float]) -> list[int]:
    """The frames of one prompt [start, end) that subject/background consistency encode: each position p of
    `frame_positions` picks frame round(p * (n - 1)) (utils/consistency_metric.py)."""
    n = end - start
    if n <= 1:
        return [start] if n == 1 else []
    return sorted({start + min(n - 1, max(0, round(p * (n - 1)))) for p in positions})


def longrange_frames(start: int, end: int) -> list[int]:
    """The frames of one prompt whose mean DINO feature stands for it in conditional long-range consistency:
    0, n/4, n/2, 3n/4 and n-1 (models/dino_encoder.py `encode_segment`)."""
    n = end - start
    return sorted({start + i for i in (0, n // 4, n // 2, 3 * n // 4, n - 1) if 0 <= i < n})


def judge_frames(start: int, end: int, count: int) -> list[int]:
    """`count` frames spread evenly over one prompt, first and last included (models/vlm_client.py)."""
    n = end - start
    if n <= count:
        return list(range(start, end))
    if count == 1:
        return [start + n // 2]
    return sorted({start + round(i * (n - 1) / (count - 1)) for i in range(count)})


# reductions ---------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between ranks (the benchmark's `pXX` reductions)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def _weighted(parts: Sequence[tuple[float | None, float]]) -> float | None:
    """Weighted mean of the parts that have a value (consistency_metric.py `_combine_weighted_components`)."""
    kept = [(v, w) for v, w in parts if v is not None and w > 0]
    if not kept:
        return None
    return sum(v * w for v, w in kept) / sum(w for _, w in kept)


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def reverse_weighted(scores: Sequence[float]) -> float:
    """Later scores weigh more: weight (i + 1) / n (utils/aggregation.py `reverse_weighted`)."""
    weights = [(i + 1) / len(scores) for i in range(len(scores))]
    return sum(w * s for w, s in zip(weights, scores)) / sum(weights)


def affine_power(similarity: float, floor: float, power: float) -> float:
    """Cosine similarity mapped to [0, 1]: ((s - floor) / (1 - floor)) ** power, clipped (aggregation.py
    `remap_similarity_score`, mapping affine_power)."""
    value = (max(-1.0, min(1.0, similarity)) - floor) / (1.0 - floor)
    return max(0.0, min(1.0, value)) ** power


# subject / background consistency -----------------------------------------------------------------------------


def prompt_consistency(features: torch.Tensor, q: float) -> tuple[float, int, list[float]]:
    """One prompt's local consistency (utils/consistency_metric.py `_compute_segment_details`).

    features: [k, D] L2-normalised features of the sampled frames, in time order. The pairs are each frame with
    the next and the middle frame with every other (each pair once); similarities are cosines clipped at 0; the
    score is their q-th percentile. Also returns the representative frame (the one most similar on average to the
    others; ties: nearest the middle) and the pair similarities.
    """
    k = features.shape[0]
    if k == 1:
        return 1.0, 0, [1.0]
    sim = (features @ features.T).clamp(min=0.0).double()
    centre = k // 2
    pairs = [(i, i + 1) for i in range(k - 1)]
    pairs += [p for p in ((min(centre, i), max(centre, i)) for i in range(k) if i != centre) if p not in pairs]
    scores = [float(sim[a, b]) for a, b in pairs]
    centrality = ((sim.sum(dim=1) - sim.diagonal()) / (k - 1)).tolist()
    rep = max(range(k), key=lambda i: (centrality[i], -abs(i - centre)))
    return percentile(scores, q), rep, scores


def consistency(per_prompt: Sequence[torch.Tensor], s: BenchSettings) -> dict:
    """Subject (DINO) or background (CLIP) consistency of a story (utils/consistency_metric.py
    `_build_sample_details`): local = the mean of the prompts' local scores; inter = the p25 of the cosine
    similarities of consecutive prompts' representative frames, and of the first prompt's with every later one,
    averaged with weights 0.5/0.5; score = 0.34 local + 0.66 inter (local alone for a one-prompt story).

    per_prompt: one [k, D] L2-normalised feature tensor per prompt (k >= 1).
    """
    local, reps = [], []
    for features in per_prompt:
        score, rep, _ = prompt_consistency(features, s.intra_percentile)
        local.append(score)
        reps.append(features[rep])
    adjacent = [max(0.0, float(reps[i] @ reps[i + 1])) for i in range(len(reps) - 1)]
    anchor = [max(0.0, float(reps[0] @ r)) for r in reps[1:]]
    inter_adjacent = percentile(adjacent, s.inter_percentile)
    inter_anchor = percentile(anchor, s.inter_percentile)
    inter = _weighted([(inter_adjacent, s.inter_adjacent_weight), (inter_anchor, s.inter_anchor_weight)])
    local_score = _mean(local)
    return {
        "score": _weighted([(local_score, s.local_weight), (inter, s.inter_weight)]),
        "local": local_score,
        "inter": inter,
        "inter_adjacent": inter_adjacent,
        "inter_anchor": inter_anchor,
        "prompt_scores": local,
    }


# temporal flickering ------------------------------------------------------------------------------------------


def temporal_flickering(pair_errors: Sequence[Sequence[float]], s: BenchSettings) -> dict:
    """Temporal flickering of a story (metrics/quality/temporal_flickering.py).

    pair_errors: per prompt, the raw error of each pair of consecutive frames inside it: the p90 over pixels of
    |luma(a) - luma(b)| / 255. A prompt's raw error is the p84 of its pairs, its score exp(-raw / 0.5); the story's
    score is the mean over prompts. 1.0 means no change at all between frames.
    Deviation: the benchmark first warps frame b onto frame a with RAFT optical flow (and masks pixels failing a
    forward-backward check), over 8 frames sampled per prompt. Without a flow model we compare every pair of
    consecutive frames unwarped: at 16 fps motion between neighbours is small, so the residual is mostly change of
    brightness (flicker), though fast motion still counts against the score.
    """
    raw = [percentile(errors, s.raw_error_percentile) for errors in pair_errors if len(errors)]
    scores = [math.exp(-r / s.flicker_tau) for r in raw]
    return {"score": _mean(scores), "prompt_raw_errors": raw, "prompt_scores": scores}


# boundary smoothness ------------------------------------------------------------------------------------------


def boundary_smoothness(motion: Sequence[float], segments: Sequence[tuple[int, int]], s: BenchSettings) -> dict:
    """Boundary smoothness at each prompt switch (metrics/temporal/boundary_smoothness.py, window 2).

    motion[t]: the change between frames t and t+1. At a switch between prompts [a0, a1) and [a1, b1): left =
    motion of the last pair before it, right = of the first pair after it, boundary = of the pair across it;
    expected = (left + right) / 2, tolerance = 0.02 + 0.5 x expected, score = exp(-|boundary - expected| /
    tolerance). A switch that moves like its neighbours scores 1; a cut scores near 0. Story: mean over switches.
    Deviation: the benchmark's motion is the mean RAFT optical-flow magnitude (pixels); ours is the mean absolute
    luma difference in 8-bit levels (no flow model). Both are 0 for a still scene and grow with motion, and the
    score compares the switch with its own neighbours, so the tolerance keeps its meaning.
    """
    records = []
    for (a0, a1), (b0, b1) in zip(segments, segments[1:]):
        if a1 - a0 < 2 or b1 - b0 < 2 or b0 != a1:
            continue
        left, boundary, right = float(motion[a1 - 2]), float(motion[a1 - 1]), float(motion[b0])
        expected = 0.5 * (left + right)
        tolerance = max(1e-6, s.tolerance_abs + s.tolerance_rel * expected)
        score = math.exp(-abs(boundary - expected) / tolerance)
        records.append({"frame": b0, "left": left, "boundary": boundary, "right": right, "score": score})
    return {"score": _mean([r["score"] for r in records]), "switches": records}


# conditional long-range consistency ---------------------------------------------------------------------------


def conditional_longrange(entity_prompts: dict[int, Sequence[torch.Tensor]], s: BenchSettings) -> dict:
    """Per-entity long-range consistency (metrics/temporal/conditional_longrange.py).

    entity_prompts: entity id -> the DINO feature [D] of each prompt it appears in, in time order (the mean of the
    L2-normalised features of `longrange_frames`). For each entity seen in two or more prompts: the cosine
    similarity of its first prompt with each later one, mapped by affine_power (floor 0.58, power 1.5), combined
    with later prompts weighing more (`reverse_weighted`, the benchmark's fallback without planner weights).
    The story's score is the mean over entities. Entities are compared only with themselves.
    Deviation: the benchmark asks an LLM which prompts show the same entity; we take the entity IDs of the story
    map's registry (the ones the identity memory used), so every frame of a prompt is tagged with its entities.
    """
    entities = {}
    for entity, features in entity_prompts.items():
        if len(features) < 2:
            continue
        anchor = features[0]
        sims = [float(torch.nn.functional.cosine_similarity(anchor, f, dim=-1)) for f in features[1:]]
        mapped = [affine_power(v, s.longrange_floor, s.longrange_power) for v in sims]
        entities[str(entity)] = {"similarities": sims, "mapped": mapped, "score": reverse_weighted(mapped)}
    return {"score": _mean([e["score"] for e in entities.values()]), "entities": entities}
