"""Throughput of the batch renderer on 1 and N GPUs of one host, and the eval's time per minute of video, at full size
with random weights.

    python -m iamflow_core bench batch STORIES [--stories 6] [--seconds 10] [--ranks 1 2] [--workdir DIR]
        [-- more batch flags]

For each rank count, one `torchrun --nproc-per-node N -m iamflow_core batch` over the first `--stories` stories of
STORIES (a NarraStream JSONL file, `--seconds` per prompt) from ComfyUI-layout files (written once into `--workdir`,
as `bench start` does), each rank on its own GPU. A row gives the launch-to-exit wall time and, from the manifest,
the frames and each rank's render seconds (loading apart). Throughputs: `fps_wall` (frames over the wall time, loading
and compiling in), `fps_render` (frames over the slowest rank's render time) and `fps_after_first` (the sum of the
ranks' FPS over the stories after each rank's first, which compiles: the steady rate of a long batch); `speedup_*`
are their ratios to the first row's; `video_difference` is the largest mean absolute pixel difference of a story's
video against the first row's (the ranks render what one process renders). Then `eval` scores the last batch with
random full-size DINO ViT-B/16 and CLIP ViT-B/32 folders (built from their configs in `--workdir`) and the row gives
its seconds per minute of video, model loading apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .start import model_files, run_command


def _stories(source: Path, count: int, workdir: Path) -> Path:
    """The first `count` stories of `source` as their own JSONL file."""
    if not source.is_file():
        raise SystemExit(f"{source} is not a file; give a NarraStream JSONL, e.g. streambench_324.jsonl")
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()][:count]
    if len(lines) < count:
        raise SystemExit(f"{source} holds {len(lines)} stories, fewer than --stories {count}")
    path = workdir / f"stories_{count}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rate(frames: int, seconds: float) -> float | None:
    return round(frames / seconds, 2) if seconds else None


def _batch(stories: Path, models: Path, out: Path, ranks: int, flags: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # no resuming: every row renders every story
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
               "iamflow_core", "batch", str(stories), "--models", str(models), "--out", str(out), *flags]  # fmt: skip
    _, start, end = run_command(command, f"batch on {ranks} ranks", {**os.environ, "OMP_NUM_THREADS": "4"})
    wall = end - start
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    by_rank: dict[int, list[dict]] = {}
    for r in records:  # story order, which is each rank's render order (`batch.shard`)
        by_rank.setdefault(r["rank"], []).append(r)
    per_rank = {}
    for rank, rendered in by_rank.items():
        frames, seconds = sum(r["frames"] for r in rendered), sum(r["wall_s"] or 0.0 for r in rendered)
        per_rank[rank] = {"stories": len(rendered), "frames": frames, "render_s": round(seconds, 1),
                          "fps": _rate(frames, seconds)}  # fmt: skip
        if len(rendered) > 1:  # the stories after the rank's first, which compiled the kernels
            later = rendered[1:]
            per_rank[rank]["fps_after_first"] = _rate(sum(r["frames"] for r in later),
                                                      sum(r["wall_s"] or 0.0 for r in later))  # fmt: skip
    steady = sum(r.get("fps_after_first") or 0.0 for r in per_rank.values())
    frames = sum(r["frames"] for r in records)
    slowest = max(rank["render_s"] for rank in per_rank.values())
    return {
        "ranks": ranks, "stories": len(records), "done": sum(r["status"] == "done" for r in records),
        "frames": frames, "wall_s": round(wall, 1), "fps_wall": round(frames / wall, 2),
        "fps_render": round(frames / slowest, 2), "fps_after_first": round(steady, 2), "per_rank": per_rank,
    }  # fmt: skip


def _same_videos(first: Path, other: Path) -> float:
    """The largest mean absolute difference (0-255) between a story's video in two rows' folders: each rank
    renders the same frames as one rank alone (up to the GPU's rounding), or the split changed the work."""
    from ..video import read_video_frames

    worst = 0.0
    for video in sorted(first.glob("*.mp4")):
        a, b = read_video_frames(video), read_video_frames(other / video.name)
        if a.shape != b.shape:
            return float("inf")
        worst = max(worst, float(abs(a.astype(np.int16) - b.astype(np.int16)).mean()))
    return round(worst, 3)


def _eval_models(workdir: Path) -> tuple[Path, Path]:
    """Random DINO ViT-B/16 and CLIP ViT-B/32 folders at the benchmark's sizes, as transformers saves them."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

    dino, clip = workdir / "eval_models" / "dino-vitb16", workdir / "eval_models" / "clip-vit-base-patch32"
    if not (dino / "config.json").exists():
        torch.manual_seed(0)
        ViTModel(ViTConfig(patch_size=16, image_size=224), add_pooling_layer=False).save_pretrained(dino)
        ViTImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(dino)
    if not (clip / "config.json").exists():
        CLIPModel(CLIPConfig()).save_pretrained(clip)  # the defaults are ViT-B/32 at 224
        CLIPImageProcessor().save_pretrained(clip)
    return dino, clip


def _eval(manifest: Path, workdir: Path) -> dict:
    dino, clip = _eval_models(workdir)
    command = [sys.executable, "-m", "iamflow_core", "eval", str(manifest), "--dino", str(dino), "--clip", str(clip),
               "--out", str(workdir / "eval")]  # fmt: skip
    done, start, end = run_command(command, "eval")
    tail = [line for line in done.stdout.splitlines() if line.strip()][-3:]
    return {"eval_wall_s": round(end - start, 1), "eval_says": tail}


def main(argv: list[str] | None = None) -> Iterator[str]:
    """Yield the result lines (comments start with #, results are JSON rows)."""
    parser = argparse.ArgumentParser(
        prog="python -m iamflow_core bench batch", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("stories", type=Path, help="NarraStream JSONL, e.g. the benchmark's streambench_324.jsonl")
    parser.add_argument("--stories", dest="count", type=int, default=6, help="how many of its stories (first ones)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per prompt (the benchmark's is 10)")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2], help="rank counts, one row each")
    parser.add_argument("--workdir", default="/tmp/iamflow-batch-bench", help="model files, stories and videos")
    parser.add_argument("--no-eval", action="store_true", help="skip the eval row")
    parser.add_argument("flags", nargs="*", help="more batch flags (after --), e.g. --memory none")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("the batch benchmark needs CUDA GPUs")
    if max(args.ranks) > torch.cuda.device_count():
        raise SystemExit(f"--ranks {max(args.ranks)} needs as many GPUs; {torch.cuda.device_count()} visible")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = model_files(workdir)
    ready = time.perf_counter() - t0
    yield f"# {torch.cuda.get_device_name()} x{torch.cuda.device_count()}; model files ready in {ready:.0f} s"
    stories = _stories(args.stories, args.count, workdir)
    flags = ["--seconds", str(args.seconds), *args.flags]
    rows = []
    for ranks in args.ranks:
        row = _batch(stories, models, workdir / f"out_{ranks}", ranks, flags)
        if rows:
            row["video_difference"] = _same_videos(workdir / f"out_{args.ranks[0]}", workdir / f"out_{ranks}")
            for name in ("fps_wall", "fps_render", "fps_after_first"):
                if rows[0][name]:
                    row["speedup_" + name[4:]] = round(row[name] / rows[0][name], 3)
        rows.append(row)
        yield json.dumps(row)
    if not args.no_eval:
        yield json.dumps(_eval(workdir / f"out_{args.ranks[-1]}" / "manifest.jsonl", workdir))
