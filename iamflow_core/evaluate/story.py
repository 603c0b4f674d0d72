"""Scoring one story: plan which frames each dimension needs, scan the video once, compute the dimensions."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from . import metrics
from .features import ImageEncoder
from .inputs import EvalError, ManifestRow, StoryLayout, read_story_layout
from .judge import JudgeError, judge_story
from .scan import ScanRequest, ScanResult, scan_video
from .settings import BenchSettings

# Why a dimension may have no score for a story: what it needs that the story lacks.
WHY_NOT_SCORED = {
    "temporal_flickering": "needs a prompt with at least two frames",
    "boundary_smoothness": "needs two prompts with at least two frames each",
    "conditional_longrange": "needs an entity of the story map's registry in two or more prompts (it compares each "
    "entity's first prompt with its later ones)",
}


@dataclass(frozen=True)
class Judge:
    """The OpenAI-compatible endpoint of the MLLM-judged dimension and the model name it serves."""

    url: str
    model: str


def plan(layout: StoryLayout, s: BenchSettings, judged: bool) -> ScanRequest:
    """The frames each encoder sees and the frames kept for the judge."""
    consistency = {f for a, b in layout.segments for f in metrics.consistency_frames(a, b, s.frame_positions)}
    longrange = {f for a, b in layout.segments for f in metrics.longrange_frames(a, b)} if layout.entities else set()
    keep = set()
    if judged:
        keep = {f for a, b in layout.segments for f in metrics.judge_frames(a, b, s.judge_frames_per_prompt)}
    return ScanRequest({"dino": frozenset(consistency | longrange), "clip": frozenset(consistency)}, frozenset(keep))


def _stack(features: dict[int, torch.Tensor], frames: list[int]) -> torch.Tensor:
    return torch.stack([features[f] for f in frames])


def local_dimensions(layout: StoryLayout, scan: ScanResult, s: BenchSettings) -> dict[str, dict]:
    """The five locally computed dimensions of a scanned story."""
    segments = layout.segments
    picks = [metrics.consistency_frames(a, b, s.frame_positions) for a, b in segments]
    dino, clip = scan.features["dino"], scan.features["clip"]
    per_entity = {}
    for entity, indices in layout.entities.items():
        ranges = [segments[i] for i in indices]
        per_entity[entity] = [_stack(dino, metrics.longrange_frames(a, b)).mean(dim=0) for a, b in ranges]
    return {
        "subject_consistency": metrics.consistency([_stack(dino, p) for p in picks], s),
        "background_consistency": metrics.consistency([_stack(clip, p) for p in picks], s),
        "temporal_flickering": metrics.temporal_flickering([scan.pair_error[a : b - 1] for a, b in segments], s),
        "boundary_smoothness": metrics.boundary_smoothness(scan.motion, segments, s),
        "conditional_longrange": metrics.conditional_longrange(per_entity, s),
    }


def _judge(judge: Judge, layout: StoryLayout, scan: ScanResult, s: BenchSettings) -> dict:
    frames = [
        [scan.images[f] for f in metrics.judge_frames(a, b, s.judge_frames_per_prompt)] for a, b in layout.segments
    ]
    try:
        result = judge_story(judge.url, judge.model, layout.prompts, frames, s)
    except JudgeError as e:
        return {"score": None, "not_scored": str(e)}
    return {"score": result.score, "prompt_scores": list(result.prompt_scores), "overall": result.overall,
            "reply": result.reply}  # fmt: skip


def score_story(
    row: ManifestRow,
    encoders: dict[str, ImageEncoder],
    device: torch.device,
    batch_size: int,
    s: BenchSettings,
    judge: Judge | None = None,
) -> dict[str, Any]:
    """The eval record of one "done" story: scores per dimension (None = not scored, with the reason), details."""
    from ..video import read_video_frame_count

    start = time.perf_counter()
    frames = read_video_frame_count(row.video)
    layout = read_story_layout(row.story_map, frames)
    scan = scan_video(row.video, plan(layout, s, judge is not None), encoders, device, batch_size, s.pair_percentile)
    if scan.frames != frames:
        raise EvalError(f"{row.where}: {row.video} decodes to {scan.frames} frames, its index says {frames}")
    details = local_dimensions(layout, scan, s)
    if judge is not None:
        details["vlm_score"] = _judge(judge, layout, scan, s)
    scores = {name: d["score"] for name, d in details.items()}
    entities = layout.entities
    not_scored = {
        n: d.get("not_scored") or WHY_NOT_SCORED.get(n, "too little to score")
        for n, d in details.items()
        if d["score"] is None
    }
    return {
        "id": row.id, "video": str(row.video), "story_map": str(row.story_map), "status": row.status,
        "frames": frames, "seconds": row.seconds,
        "prompts": [{"frames": list(seg), "prompt": p} for seg, p in zip(layout.segments, layout.prompts)],
        "entities": {str(e): {"name": layout.names.get(e, ""), "prompts": list(i)} for e, i in entities.items()},
        "scores": scores, "not_scored": not_scored, "details": details,
        "eval_seconds": round(time.perf_counter() - start, 3),
    }  # fmt: skip
