"""Command line: `python -m iamflow_core generate STORY --models DIR --out video.mp4`, `... bench speed`.

Errors about the user's inputs (story files, model files, settings) are printed as one clear message, without a
traceback, and exit with status 2. Ctrl-C keeps every finished chunk in a playable video (exit status 130).

The memory, transition, verifier and video-size flags are made from the library's option declarations
(`settings.MemorySettings`, `config.SamplerConfig`): the same names, defaults, bounds and help as the nodes' widgets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from .config import DTYPES, SamplerConfig, option_spec
from .devices import resolve_device
from .models.attention import BACKENDS
from .outputs import check_output, free_output_path
from .pipeline import StreamingPipeline
from .render import RenderResult, render_story, story_map
from .settings import MODES, PRESETS, MemorySettings, build_memory, build_verifier, sampler_config
from .stops import exit_code, stop_name, stop_on_signals
from .story import DEFAULT_SEED, MAX_SEGMENT_SECONDS, Story, StoryError, load_stories, plan_chunks
from .story.entities import EntityRegistry, RegistryError, load_registries

logger = logging.getLogger("iamflow_core.cli")
SMOKE_TEST = (
    "preset tiny: random-weight models on the CPU, so the frames are noise (a smoke test of the pipeline). "
    "With real files: python -m iamflow_core generate STORY --models DIR (the README's 'Model files' says which "
    "files and where to get them)"
)
# MemorySettings options with a flag of their own (`mode` is --memory, which also picks the preset).
MEMORY_FLAGS = (
    "transition", "max_frames", "min_frames_multi_entity", "bank_size", "record_interval", "sparse_topk",
    "visual_weight", "archive_limit_mb", "verifier_wait", "async_verifier",
)  # fmt: skip


def _default_devices() -> tuple[str, str]:
    if not torch.cuda.is_available():
        return "cpu", "cpu"
    return "cuda:0", "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"


def _add_option(group: argparse._ArgumentGroup, cls: type, name: str, default_text: str | None = None) -> None:
    """A flag for option `name` of settings class `cls`. Its argparse default is None ("not given"), so a preset's
    value stands unless the user gives one."""
    default, spec = option_spec(cls, name)
    shown = default_text or ("automatic" if default is None else str(default).lower())
    kwargs: dict = {"default": None, "help": f"{spec.help} (default: {shown})".replace("%", "%%")}
    if isinstance(default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif spec.choices is not None:
        kwargs["choices"] = spec.choices
    else:
        kwargs["type"] = float if isinstance(spec.step or default, float) else int
    group.add_argument("--" + name.replace("_", "-"), **kwargs)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
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
    run.add_argument(
        "--offload-text-encoder", action="store_true",
        help="keep umT5 on the CPU and move it to its device only to encode the prompts (frees ~11 GB on one GPU)",
    )  # fmt: skip
    run.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    run.add_argument("--quantization", choices=["auto", "off", "fp8"], default="auto")
    run.add_argument("--attention", default="auto", choices=BACKENDS, help="DiT attention backend (default auto)")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="render a story (JSON, NarraStream JSONL or text) to mp4")
    p.add_argument("story", nargs="?", help="story file (.json, .jsonl, .txt); optional with --preset tiny")
    p.add_argument("--out", default="video.mp4", help="output mp4 (several stories: _000, _001, ... are added)")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing video and its story map (default: write NAME_00001.mp4, ... beside it)",
    )  # fmt: skip
    p.add_argument("--preset", choices=["tiny"], help="tiny: random-weight models on CPU, a smoke test (noise)")
    _add_model_flags(p)
    gen = p.add_argument_group("generation")
    gen.add_argument("--seed", type=int, help=f"noise seed (default: the story's seed, else {DEFAULT_SEED})")
    _add_option(gen, SamplerConfig, "height", "480; 64 with --preset tiny")
    _add_option(gen, SamplerConfig, "width", "832; 96 with --preset tiny")
    gen.add_argument(
        "--seconds", type=float, default=10.0,
        help=f"seconds per prompt when the story gives none (at most {MAX_SEGMENT_SECONDS:g})",
    )  # fmt: skip
    gen.add_argument(
        "--no-overlap", action="store_true", help="decode after each chunk even when the VAE has its own device"
    )
    mem = p.add_argument_group("memory and identity (IAMFlow = identity memory + soft transition + verifier)")
    _, mode = option_spec(MemorySettings, "mode")
    mem.add_argument(
        "--memory", choices=MODES, default="identity", help=f"{mode.help} Picks the preset of that method."
    )
    for name in MEMORY_FLAGS:
        preset_text = "soft for identity, recache otherwise" if name == "transition" else None
        _add_option(mem, MemorySettings, name, preset_text)
    mem.add_argument(
        "--registry",
        help="entity registry to use as given (skips the LLM): a .json for one story, or a .jsonl with one registry "
        "per line in story order ({} for a story without entities)",
    )
    mem.add_argument("--llm", help="LLM folder for entity extraction (Qwen3-4B-Instruct-2507)")
    mem.add_argument("--llm-device", help="device of the LLM (default: --device; it is unloaded before sampling)")
    mem.add_argument("--vlm", help="VLM folder for frame verification (Qwen3-VL-2B-Instruct)")
    mem.add_argument("--vlm-device", help="device of the VLM (default: --vae-device)")
    p.add_argument("-v", "--verbose", action="store_true")
    # `bench start`: when the models were loaded and the first and last frames written, as JSON lines
    p.add_argument("--timeline", help=argparse.SUPPRESS)


def memory_settings(args: argparse.Namespace) -> MemorySettings:
    """The preset of `--memory`, with every memory flag the user gave."""
    given = {name: getattr(args, name) for name in MEMORY_FLAGS if getattr(args, name) is not None}
    given = {name: option_spec(MemorySettings, name)[1].value_of(value) for name, value in given.items()}
    return dataclasses.replace(PRESETS[args.memory], **given)


def _build(args: argparse.Namespace):
    """The models and the sampler's base config (video size)."""
    if args.preset == "tiny":
        from .presets import tiny_models

        dit, text_encoder, vae = tiny_models(device=args.device, vae_device=args.vae_device)
    else:
        from .weights import find_model_files, load_models

        files = find_model_files(
            args.models, dit=args.dit, text_encoder=args.text_encoder, vae=args.vae, tokenizer=args.tokenizer,
            lora=args.lora,
        )  # fmt: skip
        text_device = "cpu" if args.offload_text_encoder else args.text_device
        dit, text_encoder, vae = load_models(
            files, device=args.device, vae_device=args.vae_device, text_device=text_device,
            dtype=DTYPES[args.dtype], quantization=args.quantization, attention=args.attention,
        )  # fmt: skip
    if args.offload_text_encoder:
        from .text_encoder import OffloadedTextEncoder

        text_encoder = OffloadedTextEncoder(text_encoder, args.text_device or args.device)
    return dit, text_encoder, vae


def _size(args: argparse.Namespace) -> SamplerConfig:
    """The video size: the flags, else the preset's (the tiny preset is 96x64); validated before anything loads."""
    if args.preset == "tiny":
        from .presets import TINY_SAMPLER as base
    else:
        base = SamplerConfig()
    height, width = (
        default if v is None else v for v, default in ((args.height, base.height), (args.width, base.width))
    )
    return SamplerConfig(height=height, width=width)


def _targets(args: argparse.Namespace, stories: list[Story], size: SamplerConfig) -> list[Path]:
    """One video path per story, never over an existing file (unless --overwrite), each checked writable."""
    out = Path(args.out).expanduser()
    targets = []
    for i, story in enumerate(stories):
        wanted = out if len(stories) == 1 else out.with_name(f"{out.stem}_{i:03d}{out.suffix}")
        target = free_output_path(wanted, overwrite=args.overwrite)
        if target != wanted:
            print(f"{wanted} exists; writing {target} instead (--overwrite replaces it)", file=sys.stderr)
        check_output(target, plan_chunks(story).num_video_frames, size.width, size.height)
        targets.append(target)
    return targets


def _stories(args: argparse.Namespace) -> list[Story]:
    if args.story:
        stories = load_stories(args.story, default_seconds=args.seconds)
    elif args.preset == "tiny":
        from .presets import DEFAULT_STORY

        stories = [DEFAULT_STORY]
    else:
        raise StoryError("no story given; pass a story file (.json, .jsonl or .txt) or use --preset tiny")
    if args.seed is None:
        return stories
    return [dataclasses.replace(story, seed=args.seed) for story in stories]  # the story's seed is the one seed


def _render(
    pipe: StreamingPipeline, story: Story, config: SamplerConfig, memory, out: Path, on_stop=None, on_first=None
) -> RenderResult:
    """Render one story to `out` with a progress bar (redrawn once per chunk); on_first() once the first chunk's
    frames are out."""
    from tqdm import tqdm

    plan = plan_chunks(story, chunk_frames=config.cache.chunk_frames)
    for note in plan.rounding_notes():
        print(f"note: {note}", file=sys.stderr)
    print(f"{out}: {plan.summary()}", file=sys.stderr)
    with tqdm(total=plan.num_chunks, unit="chunk", file=sys.stderr) as bar:

        def progress(event, record) -> None:
            if record.index == 0 and on_first is not None:
                on_first()
            bar.set_postfix(prompt=f"{record.segment + 1}/{record.num_segments}", refresh=False)
            bar.update(1)

        return render_story(
            pipe, story, config, memory, out_path=out, on_chunk=progress, on_stop=on_stop, keep_frames=False,
            keep_latents=False,
        )  # fmt: skip


def _registries(args: argparse.Namespace, stories: list[Story], settings: MemorySettings) -> list:
    """The entities of each story: from --registry (one registry per story: a .json for one story, a .jsonl line per
    story), else extracted by the LLM (loaded once, unloaded before the DiT needs the memory), else None."""
    if settings.mode != "identity":
        return [None] * len(stories)
    if args.registry:
        return load_registries(args.registry, len(stories), [len(s.segments) for s in stories])
    if not args.llm:
        if args.preset != "tiny":
            logger.warning("no --llm or --registry: identity memory keeps the frames most relevant to each prompt")
        return [None] * len(stories)
    from .story.llm import EntityExtractor

    extractor = EntityExtractor(args.llm, device=args.llm_device or args.device)
    try:
        return [extractor.extract(list(story.prompts)) for story in stories]
    finally:
        extractor.unload()  # free its memory before the DiT needs it


def _verifier(args: argparse.Namespace, settings: MemorySettings):
    if not args.vlm or settings.mode != "identity":
        return None
    from .story.vlm import FrameVerifier

    return build_verifier(settings, FrameVerifier(args.vlm, device=args.vlm_device or args.vae_device))


def _write_story_map(target: Path, story: Story, registry: EntityRegistry | None, result: RenderResult) -> None:
    """The story map next to the video: `video.story.json` and its picture `video.story.png`."""
    from .pictures import story_map_picture

    data = story_map(story, registry, result)
    target.with_suffix(".story.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    story_map_picture(data).save(target.with_suffix(".story.png"))
    print(f"{target.with_suffix('.story.json')}: story map; picture: {target.with_suffix('.story.png')}")


def _on_stop(target: Path, story: Story, registry: EntityRegistry | None, stops: list):
    """What the CLI does when a render stops early (a signal, Ctrl-C, a failed write): the story map of what was
    made; the render is remembered in `stops` for the line that says where the frames are."""

    def stopped(result: RenderResult, stop: BaseException) -> None:
        stops.append((target, result))
        try:
            _write_story_map(target, story, registry, result)
        except OSError as e:  # a full disk may refuse the map too; the frames are still where the message says
            print(f"could not write the story map beside {target}: {e}", file=sys.stderr)

    return stopped


def _check_devices(args: argparse.Namespace) -> None:
    """Every device flag names a device this machine has (one message listing those it has)."""
    for flag in ("device", "vae_device", "text_device", "llm_device", "vlm_device"):
        if getattr(args, flag) is not None:
            setattr(args, flag, str(resolve_device(getattr(args, flag))))


class _Timeline:
    """Wall-clock moments of a run (`time.time()`), appended to a JSON-lines file when one is given."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None

    def mark(self, event: str) -> None:
        if self.path is None:
            return
        entry = {"event": event, "time": time.time()}
        if torch.cuda.is_available():  # the peak so far, per GPU
            entry["peak_gib"] = [
                round(torch.cuda.max_memory_allocated(i) / 2**30, 2) for i in range(torch.cuda.device_count())
            ]
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def generate(args: argparse.Namespace) -> int:
    if args.preset == "tiny":
        print(SMOKE_TEST, file=sys.stderr)
    _check_devices(args)
    settings = memory_settings(args)  # a bad flag fails before anything loads
    size = _size(args)
    stories = _stories(args)
    targets = _targets(args, stories, size)
    # Entities first: a bad registry fails before any model loads, and the LLM is gone before the DiT comes.
    registries = _registries(args, stories, settings)
    dit, text_encoder, vae = _build(args)
    timeline = _Timeline(args.timeline)
    timeline.mark("models_loaded")
    config = sampler_config(settings, size.height, size.width)
    pipe = StreamingPipeline(dit, text_encoder, vae, overlap_decode=False if args.no_overlap else None)
    verifier = _verifier(args, settings)
    stops: list[tuple[Path, RenderResult]] = []
    try:
        for story, registry, target in zip(stories, registries, targets):
            memory = build_memory(settings, registry, verifier)
            on_stop = _on_stop(target, story, registry, stops)
            result = _render(
                pipe, story, config, memory, target, on_stop, on_first=lambda: timeline.mark("first_frame")
            )
            timeline.mark("last_frame")
            wall = result.timings["wall"]
            fps = result.frames_written / wall if wall else 0.0
            print(f"{target}: {result.frames_written} frames in {wall:.1f} s ({fps:.1f} video FPS)")
            _write_story_map(target, story, registry, result)
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP during a render: say where its frames are
        if not stops:
            raise
        target, result = stops[-1]
        where = f"{result.frames_written} frames kept in {target} (playable)" if result.frames_written else "no frames"
        done = f"{len(result.chunks)} of {result.plan.num_chunks} chunks"
        print(f"stopped by {stop_name(stop)} after {done}: {where}", file=sys.stderr)
        return exit_code(stop)
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
        "which",
        choices=["speed", "start", "dit", "agents"],
        help="speed: the whole pipeline; start: what a user waits for; dit: one chunk; agents: LLM/VLM",
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    if not verbose:  # third-party progress bars (transformers' "Loading weights") only with -v
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if args.command == "bench":
        import importlib

        module = {"speed": "speed", "start": "start", "dit": "dit_chunk", "agents": "agents"}[args.which]
        bench = importlib.import_module(f"iamflow_core.bench.{module}")
        for line in bench.main(args.rest):
            print(line, flush=True)
        return 0
    from .weights import CheckpointError, MissingModelFiles

    try:
        with stop_on_signals():
            return generate(args)
    except (StoryError, RegistryError, CheckpointError, MissingModelFiles, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP before any render began
        print(f"stopped by {stop_name(stop)} before rendering; every finished chunk was kept", file=sys.stderr)
        return exit_code(stop)


if __name__ == "__main__":
    sys.exit(main())
