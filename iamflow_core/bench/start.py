"""What a user waits for: one `python -m iamflow_core generate` per run, in its own process, on the 60-s story from
ComfyUI-layout files at full size (random weights), timed from process start to models loaded, first frame
written and last frame written, and to the command's end.

    python -m iamflow_core bench start [--workdir DIR] [--runs cold warm] [--memory identity] [-- extra flags]

A `cold` run starts with an empty kernel cache (`IAMFLOW_CACHE_DIR` = `--workdir`/cache: TorchInductor's and
Triton's), as on a fresh machine; a `warm` run reuses what the runs before it left there. The model files are
written once into `--workdir` (about 15 GB) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .stories import DEFAULT_PROMPTS


def model_files(workdir: Path) -> Path:
    from .files import write_full_size_files

    models = workdir / "models"
    if not (models / ".complete").exists():
        write_full_size_files(models, device="cuda:0", fp8_dit=False)
        (models / ".complete").touch()
    return models


def run_command(command: list[str], what: str, env: dict[str, str] | None = None):
    """Run a benchmark's command to its end, its output captured: (the result, its start and end as `time.time()`).
    A failure raises, naming `what` and giving the end of its stderr."""
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    end = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return done, start, end


def _run(workdir: Path, models: Path, story: Path, n: int, kind: str, flags: list[str]) -> dict:
    cache = workdir / "cache"
    if kind == "cold":
        shutil.rmtree(cache, ignore_errors=True)
    timeline = workdir / f"timeline_{n}.jsonl"
    timeline.unlink(missing_ok=True)
    # the product's own cache folder (as a user sets it), and not TorchInductor's or Triton's variables
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["IAMFLOW_CACHE_DIR"] = str(cache)
    command = [sys.executable, "-m", "iamflow_core", "generate", str(story), "--models", str(models),
               "--out", str(workdir / f"run_{n}.mp4"), "--overwrite", "--timeline", str(timeline), *flags]  # fmt: skip
    done, start, end = run_command(command, f"run {n} ({kind})", env)
    entries = [json.loads(line) for line in timeline.read_text().splitlines()]
    events = {e["event"]: e["time"] - start for e in entries}
    frames = int(done.stdout.split(" frames in ")[0].rsplit(" ", 1)[-1])
    row = {
        "run": n,
        "caches": kind,
        **{f"{k}_s": round(v, 1) for k, v in events.items()},
        "command_s": round(end - start, 1),
    }
    row["first_frame_after_load_s"] = round(events["first_frame"] - events["models_loaded"], 1)
    if "chunk_1" in events:  # the second chunk waits for the kernels to compile (or load from the cache)
        row["second_chunk_after_first_s"] = round(events["chunk_1"] - events["first_frame"], 1)
    row["after_last_frame_s"] = round(end - start - events["last_frame"], 1)  # the video closed, the process ends
    row["frames"] = frames
    row["peak_gib"] = entries[-1].get("peak_gib")
    row["render_fps"] = round(frames / (events["last_frame"] - events["models_loaded"]), 2)
    return row


def main(argv: list[str] | None = None) -> Iterator[str]:
    """Yield the result lines (comments start with #, results are JSON rows)."""
    parser = argparse.ArgumentParser(
        prog="python -m iamflow_core bench start", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--workdir", default="/tmp/iamflow-start-bench", help="model files, caches and videos")
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=["cold", "warm"],
        default=["cold", "warm"],
        help="cold: empty compile caches, as on a fresh machine; warm: the caches of the runs before",
    )
    parser.add_argument("--memory", default="identity", help="the generate --memory of every run")
    parser.add_argument("flags", nargs="*", help="more generate flags (after --)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("the start benchmark needs a CUDA GPU")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = model_files(workdir)
    yield f"# {torch.cuda.get_device_name()}; model files ready in {time.perf_counter() - t0:.0f} s ({models})"
    story = workdir / "story.json"
    story.write_text(json.dumps({"title": "bench 6 x 10 s", "seed": 0,
                                 "segments": [{"prompt": p, "seconds": 10} for p in DEFAULT_PROMPTS]}))  # fmt: skip
    for n, kind in enumerate(args.runs):
        yield json.dumps(_run(workdir, models, story, n, kind, ["--memory", args.memory, *args.flags]))
