"""`python -m iamflow_core eval MANIFEST --dino DIR --clip DIR`: NarraStream-Bench scores of a batch of videos.

Reads the batch renderer's manifest.jsonl, scores every "done" story (the others are listed as not scored), writes
OUT/<id>.eval.json per story and OUT/eval_summary.json, and prints a table of each dimension's mean over stories
and the time per minute of video. Bad inputs (manifest, story files, model folders, device) raise `EvalError`
(one line; the command line prints it as `error: ...` and exits 2) before any story is scored.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

from ..config import VIDEO_FPS
from .inputs import EvalError, ManifestRow, read_manifest
from .settings import BENCH, JUDGE_DIMENSIONS, LOCAL_DIMENSIONS
from .story import Judge, score_story

DEFAULT_BATCH = 16


DESCRIPTION = (
    "NarraStream-Bench scores of rendered stories: subject and background consistency, temporal flickering, "
    "boundary smoothness at prompt switches and per-entity long-range consistency, computed from the videos and "
    "their story maps; vlm_score through an OpenAI-compatible judge endpoint if given."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `eval` (also used by the `iamflow_core` command line's subparser)."""
    p.add_argument("manifest", help="manifest.jsonl of the batch renderer (video and story map paths per story)")
    p.add_argument("--dino", required=True, help="DINO model folder (transformers), e.g. facebook/dino-vitb16")
    p.add_argument("--clip", required=True, help="CLIP model folder (transformers), e.g. openai/clip-vit-base-patch32")
    p.add_argument("--device", help="device of the models and frame statistics (default: cuda:0 if any, else cpu)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"frames per batch (default {DEFAULT_BATCH})")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint for vlm_score, e.g. http://localhost:8000/v1")
    p.add_argument("--judge-model", help="the model name the judge endpoint serves (needed with --judge-url)")
    p.add_argument("--out", help="folder for <id>.eval.json and eval_summary.json (default: the manifest's)")


def _checked(args: argparse.Namespace):
    """The device, the judge and the output folder, each checked (one EvalError for a bad one)."""
    import torch

    from ..devices import resolve_device

    if args.batch_size < 1:
        raise EvalError(f"--batch-size {args.batch_size} must be at least 1")
    if bool(args.judge_url) != bool(args.judge_model):
        raise EvalError("--judge-url and --judge-model go together; give both (or neither to skip vlm_score)")
    try:
        device = resolve_device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    except ValueError as e:
        raise EvalError(f"--device: {e}") from None
    out = Path(args.out or Path(args.manifest).parent).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    judge = Judge(args.judge_url, args.judge_model) if args.judge_url else None
    return device, judge, out


def _table(records: list[dict], dimensions: tuple[str, ...]) -> tuple[list[str], dict]:
    """The summary lines and, per dimension, its mean over the stories that have a score and their count."""
    summary, lines = {}, [f"{'dimension':<24} {'mean':>7}  scored"]
    for name in dimensions:
        values = [r["scores"][name] for r in records if r["scores"].get(name) is not None]
        mean = sum(values) / len(values) if values else None
        summary[name] = {"mean": mean, "scored": len(values), "stories": len(records)}
        shown = f"{mean:7.4f}" if mean is not None else f"{'-':>7}"
        lines.append(f"{name:<24} {shown}  {len(values)}/{len(records)}")
    return lines, summary


def _not_scored(row: ManifestRow, why: str) -> dict:
    return {"id": row.id, "status": row.status, "why": why}


def _score_all(rows, encoders, device, args, judge, out) -> Iterator[tuple[dict | None, dict | None, str]]:
    """(record, not-scored entry, progress line) per story, as they are scored."""
    for n, row in enumerate(rows, start=1):
        if row.status != "done":
            yield None, _not_scored(row, row.error or row.status), f"[{n}/{len(rows)}] {row.id}: {row.status}"
            continue
        try:
            record = score_story(row, encoders, device, args.batch_size, BENCH, judge)
        except (EvalError, OSError, ValueError) as e:  # a broken video: recorded, the others go on
            yield None, _not_scored(row, f"eval failed: {e}"), f"[{n}/{len(rows)}] {row.id}: eval failed: {e}"
            continue
        path = out / f"{row.file_stem}.eval.json"
        path.write_text(json.dumps(record, indent=1), encoding="utf-8")
        scores = " ".join(f"{k}={v:.3f}" for k, v in record["scores"].items() if v is not None)
        yield record, None, f"[{n}/{len(rows)}] {row.id}: {scores} ({record['eval_seconds']:.1f} s) -> {path}"
        for name, why in record["not_scored"].items():
            yield None, None, f"  {row.id}: {name} not scored: {why}"


def run(args: argparse.Namespace) -> Iterator[str]:
    """Yield the progress lines, the table and the timing line; write the JSON files."""
    device, judge, out = _checked(args)
    rows = read_manifest(args.manifest)
    from .features import load_clip, load_dino

    start = time.perf_counter()
    encoders = {"dino": load_dino(args.dino, device, BENCH), "clip": load_clip(args.clip, device, BENCH)}
    load_s = time.perf_counter() - start
    yield f"# models loaded on {device} in {load_s:.1f} s; stories to score: {sum(r.status == 'done' for r in rows)}"
    records, skipped = [], []
    for record, missing, line in _score_all(rows, encoders, device, args, judge, out):
        records += [record] if record else []
        skipped += [missing] if missing else []
        yield line
    dimensions = LOCAL_DIMENSIONS + (JUDGE_DIMENSIONS if judge else ())
    lines, summary = _table(records, dimensions)
    yield from lines
    yield from (f"not scored: {s['id']} ({s['status']}: {s['why']})" for s in skipped)
    score_s = time.perf_counter() - start - load_s
    yield _write_summary(out, args, device, records, skipped, summary, score_s, load_s)


def _write_summary(out: Path, args, device, records, skipped, summary, score_s: float, load_s: float) -> str:
    """eval_summary.json, and the timing line."""
    video_min = sum(r["seconds"] or r["frames"] / VIDEO_FPS for r in records) / 60
    per_minute = score_s / video_min if video_min else None
    data = {
        "manifest": str(Path(args.manifest).resolve()), "device": str(device),
        "models": {"dino": str(args.dino), "clip": str(args.clip)},
        "judge": {"url": args.judge_url, "model": args.judge_model} if args.judge_url else None,
        "dimensions": summary, "stories": {r["id"]: r["scores"] for r in records}, "not_scored": skipped,
        "video_minutes": video_min, "eval_seconds": score_s, "load_seconds": load_s,
        "seconds_per_video_minute": per_minute,
    }  # fmt: skip
    path = out / "eval_summary.json"
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    rate = f"{per_minute:.1f} s per minute of video" if per_minute is not None else "no video scored"
    scored = f"scored {len(records)} of {len(records) + len(skipped)} stories"
    return f"# {scored}, {video_min:.2f} min of video in {score_s:.1f} s: {rate} -> {path}"
