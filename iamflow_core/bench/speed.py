"""End-to-end speed of the story pipeline at full size with random weights (compute does not depend on values).

    python -m iamflow_core bench speed [--story FILE] [--memory none memflow identity iamflow] [--gpus 1 2]

`identity` is IAMFlow's memory with the default story's entity registry and soft transitions, without the
verifier; `iamflow` adds the asynchronous verifier (a random Qwen3-VL-2B-shaped model on the VAE's GPU), so the
two rows show what verification costs.

For each memory mode and GPU count: renders a 60-s, 6-prompt story at 480x832 to an mp4 exactly as the CLI does
(text encoding, DiT, transitions, VAE decode overlapped on the VAE's GPU, writing in a background thread) and
prints video FPS end to end and peak memory per device; then a short profiled run (synchronised stages) gives the
time of each stage per chunk.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import DiTConfig, T5Config, VAEConfig
from ..models.attention import BACKENDS, resolve_backend
from ..models.dit import CausalWanDiT
from ..models.t5 import UMT5Encoder
from ..models.vae import WanVAE
from ..pipeline import StreamingPipeline
from ..render import render_story
from ..settings import IAMFLOW, LONGLIVE, MEMFLOW, build_memory, sampler_config
from ..story import Segment, Story, load_stories
from ..text_encoder import TextEncoder
from .stories import DEFAULT_REGISTRY, DEFAULT_STORY


def _story(path: str | None) -> Story:
    return load_stories(path)[0] if path else DEFAULT_STORY


def build_models(device: str, vae_device: str, dtype: torch.dtype = torch.bfloat16, attention: str = "auto"):
    """Full-size DiT, umT5 and VAE with random weights; attention resolved as the CLI does ('auto': FA3 on Hopper
    when installed, else SDPA)."""
    from ..presets import tiny_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        dit = CausalWanDiT(DiTConfig()).to(dtype).eval().requires_grad_(False)
        t5 = UMT5Encoder(T5Config()).to(dtype).eval().requires_grad_(False)
    dit.attention_backend = resolve_backend(attention)
    with torch.device(vae_device):
        vae = WanVAE(VAEConfig()).to(dtype).eval().requires_grad_(False)
    # A stand-in tokenizer: the encoder still runs its full 512 positions, which is what costs time.
    return dit, TextEncoder(t5, tiny_tokenizer(), device=device), vae


CASES = {"none": LONGLIVE, "memflow": MEMFLOW, "identity": IAMFLOW, "iamflow": IAMFLOW}


def _verifier(memory_mode: str, vlm_dir: Path | None, device: str, queue: int):
    """The asynchronous verifier of the `iamflow` case (a random Qwen3-VL-2B-shaped model), else None."""
    if memory_mode != "iamflow":
        return None
    from ..story.vlm import FrameVerifier
    from ..verify import AsyncVerifier

    # Random weights never end an answer, so cap each at the length a real verdict has (FrameVerifier's own
    # token budget: ~34 tokens for 3 frames, more on a prompt's first chunk where attributes are checked).
    return AsyncVerifier(FrameVerifier(vlm_dir, device=device, max_new_tokens=16), max_queue=queue)


def _warm_up(models, story: Story, config, memory) -> float:
    """Compiles the fused kernels for these shapes (not timed); 4 chunks before the switch, so the warm-up also
    compiles the full 9-frame recache. Returns its seconds."""
    t0 = time.perf_counter()
    warm = Story((Segment(story.prompts[0], 3.0), Segment(story.prompts[1], 1.5)))
    for _ in StreamingPipeline(*models).run(warm, config, memory):
        pass
    return time.perf_counter() - t0


def _per_chunk_ms(models, story: Story, config, memory, chunks: int) -> tuple[dict[str, float], float]:
    """Per-stage time per chunk from a short run with synchronised stages (slower overall, so separate), and the
    text encoding time."""
    half = 0.75 * chunks / 2
    short = Story((Segment(story.prompts[0], half), Segment(story.prompts[1], half)))
    events = list(StreamingPipeline(*models, profile=True).run(short, config, memory))
    sums: dict[str, float] = {}
    for e in events[1:]:  # skip the first chunk (warm-up, text encoding)
        for k, v in e.timings.items():
            sums[k] = sums.get(k, 0.0) + v
    per_chunk = {k: round(1000 * v / (len(events) - 1), 1) for k, v in sums.items()}
    return per_chunk, round(1000 * events[0].timings["text"], 1)


def run_case(
    models, story: Story, memory_mode: str, profile_chunks: int, vlm_dir: Path | None = None, verifier_queue: int = 4
) -> dict:
    dit, _, vae = models
    devices = sorted({str(dit.device), str(vae.device)})
    settings = CASES[memory_mode]
    config = sampler_config(settings)
    registry = DEFAULT_REGISTRY if settings.mode == "identity" and len(story.segments) == 6 else None
    verifier = _verifier(memory_mode, vlm_dir, str(vae.device), verifier_queue)
    warmup_s = _warm_up(models, story, config, build_memory(settings, registry, verifier))
    for d in devices:
        torch.cuda.reset_peak_memory_stats(d)
    policy = build_memory(settings, registry, verifier)
    with tempfile.TemporaryDirectory() as tmp:  # the CLI's own render call, so the benchmark measures what users run
        result = render_story(
            StreamingPipeline(*models), story, config, policy, out_path=Path(tmp) / "v.mp4", keep_frames=False,
            keep_latents=False,
        )  # fmt: skip
    wall = result.timings["wall"]
    row = {
        "memory": memory_mode, "attention": dit.attention_backend, "transition": settings.transition,
        "gpus": len(devices), "video_frames": result.frames_written, "wall_s": round(wall, 2),
        "video_fps": round(result.frames_written / wall, 2),
        "peak_gib": {d: round(torch.cuda.max_memory_allocated(d) / 2**30, 2) for d in devices},
        "warmup_s": round(warmup_s, 1),
    }  # fmt: skip
    if verifier is not None:
        # late_chunks: frames chosen on text alone because the verdict came too late (dropped jobs included)
        row["verifier"] = {"queue": verifier_queue, **verifier.stats(), "late_chunks": policy.late_verdicts}
    memory = build_memory(settings, registry, verifier)
    row["per_chunk_ms"], row["text_encoding_ms"] = _per_chunk_ms(models, story, config, memory, profile_chunks)
    if verifier is not None:
        verifier.close()
    return row


def main(argv: list[str] | None = None) -> Iterator[str]:
    """Yield the result lines (comments start with #, results are JSON rows)."""
    parser = argparse.ArgumentParser(
        prog="python -m iamflow_core bench speed", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--story", help="story file (first story is used); default: a built-in 6 x 10 s story")
    parser.add_argument("--memory", nargs="+", default=["none", "memflow"], choices=list(CASES))
    parser.add_argument("--workdir", default="/tmp/iamflow-agents-bench", help="where random VLM folders are built")
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--chunks-profile", type=int, default=8)
    parser.add_argument("--verifier-queue", type=int, default=4, help="iamflow: jobs that may wait for the VLM")
    parser.add_argument("--attention", default="auto", choices=BACKENDS, help="DiT attention backend (as the CLI)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the speed benchmark needs a CUDA GPU")
    story = _story(args.story)
    yield f"# {torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}"
    for gpus in args.gpus:
        if gpus > torch.cuda.device_count():
            yield f"# skipping {gpus} GPUs: only {torch.cuda.device_count()} visible"
            continue
        t0 = time.perf_counter()
        models = build_models("cuda:0", "cuda:1" if gpus == 2 else "cuda:0", attention=args.attention)
        yield f"# models built in {time.perf_counter() - t0:.1f} s"
        vlm_dir = None
        if "iamflow" in args.memory:
            from .qwen_random import model_folders

            vlm_dir = model_folders(Path(args.workdir), "cuda:1" if gpus == 2 else "cuda:0")[1]
        for memory_mode in args.memory:
            yield json.dumps(run_case(models, story, memory_mode, args.chunks_profile, vlm_dir, args.verifier_queue))
        del models
        torch.cuda.empty_cache()
