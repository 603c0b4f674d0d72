"""End-to-end speed of the story pipeline at full size with random weights (compute does not depend on values).

    python -m iamflow_core bench speed [--story FILE] [--memory none memflow identity iamflow] [--gpus 1 2]
        [--preset-model causal-forcing-frame-2step] [--pictures 0 2] [--quantization off fp8] [--trace 7]

`identity` is IAMFlow's memory with the default story's entity registry and soft transitions, without the
verifier; `iamflow` adds the asynchronous verifier (a random Qwen3-VL-2B-shaped model on the VAE's GPU), so the
two rows show what verification costs. `--pictures 0 2` renders the identity rows once per count of random reference
pictures per entity (the archive bound raised by what the pictures take, so generated frames keep their room), and
gives the time to encode and prepare one picture.

For each memory mode and GPU count: renders a 60-s, 6-prompt story at 480x832 to an mp4 exactly as the CLI does
(text encoding, DiT, transitions, VAE decode overlapped on the VAE's GPU, writing in a background thread) and
prints video FPS end to end and peak memory per device; then a short profiled run (synchronised stages) gives the
time of each stage per chunk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..config import VIDEO_FPS, WAN21_TEMPORAL_FACTOR, DiTConfig, T5Config, VAEConfig
from ..model_presets import DEFAULT_MODEL_PRESET, MODEL_PRESETS, ModelPreset, model_preset
from ..models import fused
from ..models.attention import BACKENDS, resolve_backend
from ..models.dit import CausalWanDiT
from ..models.fp8 import fp8_linears
from ..models.t5 import UMT5Encoder
from ..models.vae import WanVAE
from ..pipeline import StreamingPipeline
from ..render import render_story
from ..settings import IAMFLOW, LONGLIVE, MEMFLOW, build_memory, sampler_config
from ..story import Segment, Story, load_stories, plan_chunks
from ..text_encoder import TextEncoder
from ..weights import quantize_dit
from .stories import DEFAULT_REGISTRY, DEFAULT_STORY


def _story(path: str | None) -> Story:
    return load_stories(path)[0] if path else DEFAULT_STORY


def build_models(
    device: str, vae_device: str, dtype: torch.dtype = torch.bfloat16, attention: str = "auto",
    quantization: str = "off",
):  # fmt: skip
    """Full-size DiT, umT5 and VAE with random weights; attention resolved as the CLI does ('auto': FA3 on Hopper
    when installed, else SDPA; FA3's FP8 kernel for the FP8 DiT); quantization "fp8" quantizes the DiT as the CLI's
    `--quantization fp8` does."""
    from ..presets import tiny_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        dit = CausalWanDiT(DiTConfig()).to(dtype).eval().requires_grad_(False)
        t5 = UMT5Encoder(T5Config()).to(dtype).eval().requires_grad_(False)
    if quantization == "fp8":
        quantize_dit(dit)
    dit.attention_backend = resolve_backend(attention, fp8=quantization == "fp8")
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


def _drain(verifier, limit: float = 120.0) -> tuple[float, dict]:
    """Wait (at most `limit` s) for the warm-up's verifier jobs, so the timed render starts with an idle verifier as
    a user's story does; the seconds waited and the verifier's counts then."""
    t0 = time.perf_counter()
    while verifier.pending() and time.perf_counter() - t0 < limit:
        time.sleep(0.05)
    return round(time.perf_counter() - t0, 1), verifier.stats()


def _jobs_since(before: dict, after: dict) -> dict:
    """The verifier's jobs scored and dropped between two `stats()`, and their mean seconds."""
    scored, dropped = after["scored"] - before["scored"], after["dropped"] - before["dropped"]
    seconds = after["seconds"] - before["seconds"]
    return {"scored": scored, "dropped": dropped, "mean_job_s": round(seconds / scored, 3) if scored else None}


def _warm_up(models, story: Story, config, memory, **pipeline) -> float:
    """Compiles the fused kernels for these shapes (not timed); a full window before the switch (4 chunks of 3
    frames, 21 of 1 frame-wise), so the warm-up also compiles the full recache. Returns its seconds."""
    t0 = time.perf_counter()
    frame_s = WAN21_TEMPORAL_FACTOR / VIDEO_FPS  # one latent frame: 0.25 s
    first, second = config.cache.window_frames * frame_s, 2 * config.cache.chunk_frames * frame_s  # 3 s, 1.5 s
    warm = Story((Segment(story.prompts[0], first), Segment(story.prompts[1], second)))
    for _ in StreamingPipeline(*models, **pipeline).run(warm, config, memory):
        pass
    return time.perf_counter() - t0


def _per_chunk_ms(models, story: Story, config, memory, chunks: int, **pipeline) -> tuple[dict[str, float], float]:
    """Per-stage time per chunk from a short run with synchronised stages (slower overall, so separate), and the
    text encoding time."""
    half = config.cache.chunk_frames * WAN21_TEMPORAL_FACTOR / VIDEO_FPS * chunks / 2  # seconds of chunks / 2
    short = Story((Segment(story.prompts[0], half), Segment(story.prompts[1], half)))
    events = list(StreamingPipeline(*models, profile=True, **pipeline).run(short, config, memory))
    sums: dict[str, float] = {}
    for e in events[1:]:  # skip the first chunk (warm-up, text encoding)
        for k, v in e.timings.items():
            sums[k] = sums.get(k, 0.0) + v
    per_chunk = {k: round(1000 * v / (len(events) - 1), 1) for k, v in sums.items()}
    return per_chunk, round(1000 * events[0].timings["text"], 1)


def _with_pictures(registry, per_entity: int, height: int, width: int):
    """The registry with `per_entity` random reference pictures (a photo's size, 3:2) of each entity."""
    rng = np.random.default_rng(0)
    for entity in registry.entities:
        for n in range(per_entity):
            pixels = rng.integers(0, 256, (height, height * 3 // 2, 3), dtype=np.uint8)
            registry = registry.with_reference(entity.id, pixels, f"random_{entity.id}_{n}.png")
    return registry


def _picture_ms(models, story: Story, config, settings, registry) -> float:
    """Milliseconds to encode and prepare one reference picture: the pipeline's preparation of `story` (text, cache,
    and the memory's start, which makes every picture's K/V and brings back the first prompt's) with the pictures
    minus without, per picture (GPU synchronised; the second of two runs each, the first compiles)."""
    times = []
    for pictures in (registry, dataclasses.replace(registry, references=())):
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run = StreamingPipeline(*models)._prepare(story, config, build_memory(settings, pictures), None)
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            if run.decoder is not None:
                run.decoder.close()
            del run
        times.append(elapsed)
    return round(1000 * (times[0] - times[1]) / len(registry.references), 1)


def story_timeline(
    handed_out: list[tuple[int, float]], switches: tuple[int, ...], wall: float, settle: int = 6, slowest: int = 8
) -> dict[str, float | int | list | None]:
    """Where a render's wall time goes beyond its steady chunks, from the times its chunks were handed out
    ((chunk, seconds since the render started), in order) and the chunks its prompt switches start at.

    steady_chunk_ms: the median interval between chunks away from the start and the switches (None, and no split,
    for a story too short to have one). The rest of the wall time is split into: first_chunk_ms (the render call to
    the first chunk out: text encoding, the eager first chunk, its decode), start_extra_ms (chunks 1..settle over
    steady ones: the layouts the cache fills through, their CUDA graph captures, a memory starting to archive),
    switch_extra_ms (the two intervals around each switch over steady ones, whichever the switch's work falls in: a
    decode is handed out a chunk late), other_extra_ms, and after_last_chunk_ms (the last decode, closing the
    file); slowest: the `slowest` longest intervals as [chunk, ms over steady], longest first."""
    if len(handed_out) < 2:
        return {}
    chunks = [c for c, _ in handed_out]
    interval = {c: 1000 * (t - t_before) for (c, t), (_, t_before) in zip(handed_out[1:], handed_out)}
    near_switch = {c for s in switches for c in (s - 1, s)}
    steady = sorted(ms for c, ms in interval.items() if c > settle and c not in near_switch)
    ends = {"first_chunk_ms": round(1000 * handed_out[0][1], 1),
            "after_last_chunk_ms": round(1000 * (wall - handed_out[-1][1]), 1)}  # fmt: skip
    if not steady:  # a story too short to reach a steady chunk
        return {"steady_chunk_ms": None, **ends}
    steady_ms = steady[len(steady) // 2]
    extra = {"start": 0.0, "switch": 0.0, "other": 0.0}
    for c, ms in interval.items():
        kind = "switch" if c in near_switch else "start" if c <= settle else "other"
        extra[kind] += ms - steady_ms
    return {
        "steady_chunk_ms": round(steady_ms, 1), "start_extra_ms": round(extra["start"]),
        "switch_extra_ms": round(extra["switch"]), "switches": len([s for s in switches if s in chunks]),
        "other_extra_ms": round(extra["other"]), **ends,
        "slowest": [[c, round(ms - steady_ms)] for c, ms in sorted(interval.items(), key=lambda i: -i[1])[:slowest]],
    }  # fmt: skip


# The traced window starts here: mid-prompt (the default story switches every 13 chunks), well past the warm-up.
TRACE_FIRST = 30


def run_case(
    models, story: Story, memory_mode: str, profile_chunks: int, vlm_dir: Path | None = None, verifier_queue: int = 4,
    model: ModelPreset | None = None, pictures: int = 0, trace: int = 0, trace_dir: Path | None = None,
    clean_pass_device: str | None = None, trace_from: int = TRACE_FIRST,
) -> dict:  # fmt: skip
    """One row: `story` rendered with memory `memory_mode` and the streaming preset `model` (default LongLive's);
    identity rows with `pictures` reference pictures per entity; with `trace` > 0, a profiler window over that many
    chunks of another render from chunk `trace_from` (`bench.trace`), its Chrome trace kept in `trace_dir` if given;
    `clean_pass_device`: the clean passes on that GPU (`relay.py`)."""
    dit, _, vae = models
    devices = sorted({str(dit.device), str(vae.device)})
    settings = CASES[memory_mode]
    model = model or model_preset(None)
    config = sampler_config(settings, model=model)
    registry = DEFAULT_REGISTRY if settings.mode == "identity" and len(story.segments) == 6 else None
    picture_ms = None
    if registry is not None and pictures:
        registry = _with_pictures(registry, pictures, config.height, config.width)
        frame_mib = 2 * dit.cfg.num_layers * (config.height // 16) * (config.width // 16) * dit.cfg.dim * 2 / 2**20
        extra = -(-int(frame_mib * len(registry.references)) // 64) * 64
        settings = dataclasses.replace(settings, archive_limit_mb=settings.archive_limit_mb + extra)
        picture_ms = _picture_ms(models, story, config, settings, registry)
    verifier = _verifier(memory_mode, vlm_dir, str(vae.device), verifier_queue)
    pipeline = {"clean_pass_device": clean_pass_device}
    warmup_s = _warm_up(models, story, config, build_memory(settings, registry, verifier), **pipeline)
    drain_s, before = _drain(verifier) if verifier is not None else (None, None)
    captures = verifier.verifier.graph_captures if verifier is not None else 0  # the VLM decoder's CUDA graphs
    for d in devices:
        torch.cuda.reset_peak_memory_stats(d)
    policy = build_memory(settings, registry, verifier)
    handed_out: list[tuple[int, float]] = []  # (chunk, seconds since the render call) as each chunk comes out
    pipe = StreamingPipeline(*models, **pipeline)  # made before the clock starts, as a CLI run makes it once
    runners = {"dit": dit} if pipe.second is None else {"dit": dit, "clean_pass": pipe.second.replica}
    captured = {name: m.graph_captures for name, m in runners.items()}
    with tempfile.TemporaryDirectory() as tmp:  # the CLI's own render call, so the benchmark measures what users run
        t0 = time.perf_counter()
        result = render_story(
            pipe, story, config, policy, out_path=Path(tmp) / "v.mp4", keep_frames=False, keep_latents=False,
            on_chunk=lambda event, _: handed_out.append((event.index, time.perf_counter() - t0)),
        )  # fmt: skip
    # CUDA graphs captured in the render (a layout's second chunk), and the host seconds their captures took
    graphs = {name: [m.graph_captures[0] - captured[name][0], round(m.graph_captures[1] - captured[name][1], 3)]
              for name, m in runners.items()}  # fmt: skip
    del pipe, runners
    wall = result.timings["wall"]
    plan = plan_chunks(story, chunk_frames=config.cache.chunk_frames)
    row = {
        "memory": memory_mode, "model": model.name, "attention": dit.attention_backend,
        "quantization": "fp8" if fp8_linears(dit) else "off",
        "transition": settings.transition, "clean_pass": clean_pass_device or "dit",
        "gpus": len(devices), "video_frames": result.frames_written, "wall_s": round(wall, 2),
        "video_fps": round(result.frames_written / wall, 2),
        "peak_gib": {d: round(torch.cuda.max_memory_allocated(d) / 2**30, 2) for d in devices},
        "warmup_s": round(warmup_s, 1), "timeline": story_timeline(handed_out, plan.switch_chunks, wall),
        "compiled_kernels": fused.in_effect(),  # after the render: a compile that failed in it turned them off
        "graph_captures": graphs,
    }  # fmt: skip
    if picture_ms is not None:
        row.update(pictures=len(registry.references), picture_prepare_ms=picture_ms,
                   archive_limit_mb=settings.archive_limit_mb)  # fmt: skip
    if verifier is not None:
        # late_chunks: frames chosen on text alone because the verdict came too late; used_chunks: chosen with the
        # verifier's scores; skipped_chunks: not sent, as their verdict could not have come in time; graph_captures:
        # CUDA graphs the VLM's decoder captured during the timed render (for answer shapes the warm-up did not meet)
        row["verifier"] = {"queue": verifier_queue, **_jobs_since(before, verifier.stats()),
                           "late_chunks": policy.late_verdicts, "used_chunks": policy.verdicts_used,
                           "skipped_chunks": policy.jobs_skipped, "warmup_drain_s": drain_s,
                           "graph_captures": verifier.verifier.graph_captures - captures}  # fmt: skip
    memory = build_memory(settings, registry, verifier)
    row["per_chunk_ms"], row["text_encoding_ms"] = _per_chunk_ms(
        models, story, config, memory, profile_chunks, **pipeline
    )
    if trace:
        from .trace import traced_render

        name = f"trace_{memory_mode}_{len(devices)}gpu_{row['quantization']}.json"
        saved = Path(trace_dir) / name if trace_dir is not None else None
        first = max(1, min(trace_from, plan.num_chunks - trace))  # a shorter --story: its last chunks
        memory = build_memory(settings, registry, verifier)
        row["trace"] = traced_render(models, story, config, memory, first, trace, saved, **pipeline)
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
    parser.add_argument(
        "--preset-model", choices=list(MODEL_PRESETS), default=DEFAULT_MODEL_PRESET,
        help="streaming preset (frames per chunk, window, sink, steps), as the CLI's; e.g. causal-forcing-frame-2step",
    )  # fmt: skip
    parser.add_argument(
        "--quantization", nargs="+", choices=["off", "fp8"], default=["off"],
        help="DiT linears: off (bf16) or fp8 (FP8 matmuls and, with --attention auto, FP8 attention, as the "
        "CLI's --quantization fp8); one set of rows each",
    )  # fmt: skip
    parser.add_argument(
        "--trace", type=int, default=0, metavar="N",
        help="profile N chunks (from --trace-from) of one more render per row: each GPU's busy share, "
        "the DiT GPU's idle gaps and what each thread ran in them, the top kernels, and what the memory policy's "
        "hooks cost the DiT's GPU (memory_critical_ms_per_chunk)",
    )  # fmt: skip
    parser.add_argument(
        "--trace-from", type=int, default=TRACE_FIRST, metavar="C",
        help=f"the first chunk --trace profiles (default {TRACE_FIRST}, steady chunks mid-prompt; 1: the start)",
    )  # fmt: skip
    parser.add_argument("--trace-dir", help="keep each traced window's Chrome trace here (open it in Perfetto)")
    parser.add_argument(
        "--clean-pass", nargs="+", choices=["dit", "second"], default=["dit"],
        help="2-GPU rows: the clean pass on the DiT's GPU (dit) or on the second GPU, one layer behind the next "
        "chunk (second; `--clean-pass-device cuda:1` of the CLI); one set of rows each",
    )  # fmt: skip
    parser.add_argument(
        "--pictures",
        nargs="+",
        type=int,
        default=[0],
        help="identity rows: random reference pictures per entity, one row per count (e.g. 0 2)",
    )
    args = parser.parse_args(argv)
    if args.trace < 0 or args.trace > 20:
        parser.error(f"--trace {args.trace}: give 1 to 20 chunks to profile (0, the default, profiles none)")
    if args.trace_from < 1:
        parser.error(f"--trace-from {args.trace_from}: give a chunk from 1 on (chunk 0 renders before any profile)")
    if not torch.cuda.is_available():
        raise SystemExit("the speed benchmark needs a CUDA GPU")
    story = _story(args.story)
    yield f"# {torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}"
    for gpus in args.gpus:
        if gpus > torch.cuda.device_count():
            yield f"# skipping {gpus} GPUs: only {torch.cuda.device_count()} visible"
            continue
        for quantization in args.quantization:
            t0 = time.perf_counter()
            models = build_models(
                "cuda:0", "cuda:1" if gpus == 2 else "cuda:0", attention=args.attention, quantization=quantization
            )
            yield f"# models built in {time.perf_counter() - t0:.1f} s (DiT linears: {quantization})"
            vlm_dir = None
            if "iamflow" in args.memory:
                from .qwen_random import model_folders

                vlm_dir = model_folders(Path(args.workdir), "cuda:1" if gpus == 2 else "cuda:0")[1]
            clean_passes = [None if c == "dit" else "cuda:1" for c in args.clean_pass if gpus == 2 or c == "dit"]
            for clean_pass in clean_passes:
                for memory_mode in args.memory:
                    for pictures in args.pictures if CASES[memory_mode].mode == "identity" else [0]:
                        row = run_case(
                            models, story, memory_mode, args.chunks_profile, vlm_dir, args.verifier_queue,
                            model_preset(args.preset_model), pictures, args.trace, args.trace_dir, clean_pass,
                            args.trace_from,
                        )  # fmt: skip
                        yield json.dumps(row)
            del models
            torch.cuda.empty_cache()
