"""Command line: `python -m iamflow_core generate STORY --models DIR --out video.mp4`, `... bench speed`.

Errors about the user's inputs (story files, model files, settings) are printed as one clear message, without a
traceback, and exit with status 2. Ctrl-C keeps every finished chunk in a playable video (exit status 130).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .memory.settings import MODES, MemorySettings, build_memory, sampler_config
from .pipeline import SamplerConfig, StreamingPipeline
from .render import render_story
from .story import Story, StoryError, load_stories, plan_chunks
from .story.entities import EntityRegistry, RegistryError
from .transition import STRATEGIES

logger = logging.getLogger("iamflow_core.cli")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _default_devices() -> tuple[str, str]:
    if not torch.cuda.is_available():
        return "cpu", "cpu"
    return "cuda:0", "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="render a story (JSON, NarraStream JSONL or text) to mp4")
    p.add_argument("story", nargs="?", help="story file (.json, .jsonl, .txt); optional with --preset tiny")
    p.add_argument("--out", default="video.mp4", help="output mp4 (several stories: _000, _001, ... are added)")
    p.add_argument("--preset", choices=["tiny"], help="tiny: random-weight models on CPU, a smoke test (noise)")
    files = p.add_argument_group("model files")
    files.add_argument("--models", help="folder with the model files (ComfyUI models/ or the Wan2.1 folder)")
    files.add_argument("--dit", help="DiT checkpoint (overrides the one found in --models)")
    files.add_argument("--lora", help="PEFT LoRA to merge into the DiT (LongLive/MemFlow lora.pt)")
    files.add_argument("--text-encoder", help="umT5-XXL encoder file")
    files.add_argument("--tokenizer", help="google/umt5-xxl tokenizer folder (else the one in the encoder file)")
    files.add_argument("--vae", help="Wan2.1 VAE file")
    dev_default, vae_default = _default_devices()
    run = p.add_argument_group("devices and precision")
    run.add_argument("--device", default=dev_default, help=f"DiT and text encoder (default {dev_default})")
    run.add_argument("--vae-device", default=vae_default, help=f"VAE decode (default {vae_default})")
    run.add_argument("--text-device", help="text encoder, if not the DiT's device (e.g. cpu)")
    run.add_argument("--offload-text-encoder", action="store_true", help="move umT5 to CPU after encoding")
    run.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    run.add_argument("--quantization", choices=["auto", "off", "fp8"], default="auto")
    run.add_argument("--attention", default="auto", help="auto, sdpa, sdpa_cudnn, flash2, flash3")
    gen = p.add_argument_group("generation")
    gen.add_argument("--seed", type=int, help="noise seed (default: the story's seed, else 0)")
    gen.add_argument("--height", type=int, default=480)
    gen.add_argument("--width", type=int, default=832)
    gen.add_argument("--seconds", type=float, default=10.0, help="seconds per prompt when the story gives none")
    gen.add_argument(
        "--no-overlap", action="store_true", help="decode after each chunk even when the VAE has its own device"
    )
    mem = p.add_argument_group("memory and identity (IAMFlow = identity memory + soft transition + verifier)")
    mem.add_argument("--memory", choices=MODES, default="identity", help="identity (IAMFlow), memflow, none")
    mem.add_argument("--transition", choices=STRATEGIES, help="prompt switch: soft (identity default) or recache")
    mem.add_argument("--max-frames", type=int, default=4, help="identity: memory frames at most")
    mem.add_argument("--bank-size", type=int, default=3, help="memflow: bank size in frames")
    mem.add_argument("--sparse-topk", type=int, default=0, help="sparse activation: top-k sink/memory frames per head")
    mem.add_argument("--registry", help="entity registry JSON to use as given (skips the LLM)")
    mem.add_argument("--llm", help="LLM folder for entity extraction (Qwen3-4B-Instruct-2507)")
    mem.add_argument("--llm-device", help="device of the LLM (default: --device; it is unloaded before sampling)")
    mem.add_argument("--vlm", help="VLM folder for frame verification (Qwen3-VL-2B-Instruct)")
    mem.add_argument("--vlm-device", help="device of the VLM (default: --vae-device)")
    mem.add_argument("--visual-weight", type=float, default=0.3, help="weight of the VLM score in frame choice")
    mem.add_argument("--sync-verifier", action="store_true", help="verify frames synchronously (ablation)")
    wait_help = "seconds the sampler waits for a late verdict, then chooses on text (default: 5%% of a chunk's time)"
    mem.add_argument("--verifier-wait", type=float, default=None, help=wait_help)
    p.add_argument("-v", "--verbose", action="store_true")


def _build(args: argparse.Namespace):
    if args.preset == "tiny":
        from .presets import TINY_SAMPLER, tiny_models

        logger.warning("preset tiny: random-weight models, the video is noise (a smoke test of the pipeline)")
        dit, text_encoder, vae = tiny_models(device=args.device, vae_device=args.vae_device)
        return dit, text_encoder, vae, TINY_SAMPLER
    from .model_files import find_model_files, load_models

    files = find_model_files(
        args.models, dit=args.dit, text_encoder=args.text_encoder, vae=args.vae, tokenizer=args.tokenizer,
        lora=args.lora,
    )  # fmt: skip
    dit, text_encoder, vae = load_models(
        files, device=args.device, vae_device=args.vae_device, text_device=args.text_device,
        dtype=DTYPES[args.dtype], quantization=args.quantization, attention=args.attention,
    )  # fmt: skip
    return dit, text_encoder, vae, SamplerConfig(height=args.height, width=args.width)


def _stories(args: argparse.Namespace) -> list[Story]:
    if args.story:
        return load_stories(args.story, default_seconds=args.seconds)
    if args.preset == "tiny":
        from .presets import DEFAULT_STORY

        return [DEFAULT_STORY]
    raise StoryError("no story given; pass a story file (.json, .jsonl or .txt) or use --preset tiny")


def _render(pipe: StreamingPipeline, story: Story, config: SamplerConfig, memory, out: Path) -> dict:
    """Render one story to `out` with a progress bar. Returns timings, frame count and per-chunk reports."""
    from tqdm import tqdm

    plan = plan_chunks(story, chunk_frames=config.cache.chunk_frames)
    for note in plan.rounding_notes():
        print(f"note: {note}", file=sys.stderr)
    print(f"{out}: {plan.summary()}", file=sys.stderr)
    with tqdm(total=plan.num_chunks, unit="chunk", file=sys.stderr) as bar:

        def progress(event, record) -> None:
            bar.set_postfix(prompt=f"{record.segment + 1}/{record.num_segments}")
            bar.update(1)

        result = render_story(
            pipe, story, config, memory, out_path=out, on_chunk=progress, keep_frames=False, keep_latents=False
        )
    chunks = [{"chunk": r.index, "segment": r.segment, **r.memory} for r in result.chunks]
    return {**result.timings, "frames": result.frames_written, "chunks": chunks}


def _registry(args: argparse.Namespace, story: Story) -> EntityRegistry | None:
    """The entities of the story: a registry file as given, else extracted by the LLM, else None."""
    if args.registry:
        registry = EntityRegistry.from_json(Path(args.registry).read_text(encoding="utf-8"))
        registry.check_story(len(story.segments))
        return registry
    if not args.llm:
        if args.memory == "identity":
            logger.warning("no --llm or --registry: identity memory keeps the frames most relevant to each prompt")
        return None
    from .story.llm import EntityExtractor

    extractor = EntityExtractor(args.llm, device=args.llm_device or args.device)
    try:
        return extractor.extract(list(story.prompts))
    finally:
        extractor.unload()  # free its memory before the DiT needs it


def _verifier(args: argparse.Namespace):
    if not args.vlm or args.memory != "identity":
        return None
    from .story.vlm import AsyncVerifier, FrameVerifier, ImmediateVerifier

    verifier = FrameVerifier(args.vlm, device=args.vlm_device or args.vae_device)
    return ImmediateVerifier(verifier) if args.sync_verifier else AsyncVerifier(verifier)


def _story_map(story: Story, registry: EntityRegistry | None, memory, totals: dict) -> dict:
    return {
        "title": story.title,
        "prompts": list(story.prompts),
        "registry": registry.to_dict() if registry is not None else None,
        "memory": memory.story_map() if hasattr(memory, "story_map") else {"mode": memory.name},
        "chunks": totals["chunks"],
    }


def generate(args: argparse.Namespace) -> int:
    stories = _stories(args)
    # Entities first: a bad registry fails before any model loads, and the LLM is gone before the DiT comes.
    registries = [_registry(args, story) if args.memory == "identity" else None for story in stories]
    dit, text_encoder, vae, base = _build(args)
    transition = args.transition or ("soft" if args.memory == "identity" else "recache")
    settings = MemorySettings(
        mode=args.memory, max_frames=args.max_frames, bank_size=args.bank_size, sparse_topk=args.sparse_topk,
        transition=transition, visual_weight=args.visual_weight, verifier_wait=args.verifier_wait,
        min_frames_multi_entity=min(2, args.max_frames),
    )  # fmt: skip
    seed = args.seed if args.seed is not None else base.seed
    config = sampler_config(settings, base.height, base.width, seed)
    pipe = StreamingPipeline(dit, text_encoder, vae, overlap_decode=False if args.no_overlap else None)
    verifier = _verifier(args)
    out = Path(args.out)
    try:
        for i, (story, registry) in enumerate(zip(stories, registries)):
            if args.seed is not None:
                story = Story(story.segments, story.title, args.seed)
            target = out if len(stories) == 1 else out.with_name(f"{out.stem}_{i:03d}{out.suffix}")
            memory = build_memory(settings, registry, verifier)
            totals = _render(pipe, story, config, memory, target)
            story_map = target.with_suffix(".story.json")
            story_map.write_text(json.dumps(_story_map(story, registry, memory, totals), indent=1), encoding="utf-8")
            fps = totals["frames"] / totals["wall"] if totals["wall"] else 0.0
            print(f"{target}: {int(totals['frames'])} frames in {totals['wall']:.1f} s ({fps:.1f} video FPS)")
            print(f"{story_map}: story map (entities, and per chunk what was archived, retrieved, injected)")
    finally:
        if verifier is not None:
            verifier.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iamflow_core", description="IAMFlow streaming long video")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    bench = sub.add_parser("bench", help="benchmarks (full-size models, random weights)")
    bench.add_argument(
        "which", choices=["speed", "dit", "agents"], help="speed: the whole pipeline; dit: one chunk; agents: LLM/VLM"
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    if args.command == "bench":
        import importlib

        module = {"speed": "speed", "dit": "dit_chunk", "agents": "agents"}[args.which]
        bench = importlib.import_module(f"iamflow_core.bench.{module}")
        for line in bench.main(args.rest):
            print(line, flush=True)
        return 0
    from .model_files import MissingModelFiles
    from .weights import CheckpointError

    try:
        return generate(args)
    except (StoryError, RegistryError, CheckpointError, MissingModelFiles, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every finished chunk was kept in the video", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
