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
import os
import sys
import time
from pathlib import Path

import torch

from . import runs
from .config import DTYPES, SamplerConfig, option_spec
from .model_presets import DEFAULT_MODEL_PRESET, MODEL_PRESETS, model_preset
from .models import fused
from .models.attention import BACKENDS
from .outputs import check_output, free_output_path
from .pipeline import StreamingPipeline
from .render import RenderResult, render_story
from .settings import MODES, MemorySettings, build_memory, sampler_config
from .stops import exit_code, stop_name, stop_on_signals
from .story import DEFAULT_SEED, MAX_SEGMENT_SECONDS, Story, StoryError, load_stories, plan_chunks
from .story.entities import RegistryError


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
    files.add_argument(
        "--preset-model", choices=list(MODEL_PRESETS), default=DEFAULT_MODEL_PRESET, metavar="NAME",
        help="which streaming checkpoint the DiT is, for its frames per chunk, attention window, sink and steps: "
        f"{', '.join(MODEL_PRESETS)} (default {DEFAULT_MODEL_PRESET}; the README's 'Model files' lists them)",
    )  # fmt: skip
    dev_default, vae_default = runs.default_devices()
    run = p.add_argument_group("devices and precision")
    run.add_argument("--device", default=dev_default, help=f"DiT and text encoder (default {dev_default})")
    run.add_argument("--vae-device", default=vae_default, help=f"VAE decode (default {vae_default})")
    run.add_argument(
        "--clean-pass-device", default="none", metavar="DEVICE",
        help="where each chunk's clean pass (the forward that writes the KV cache) runs: none (the DiT's GPU), vae "
        "(the VAE's GPU) or a GPU such as cuda:1. On a second GPU it runs one layer behind the DiT's next chunk, "
        "with a copy of the DiT and of the cache there (README: 'Two GPUs'); default none",
    )  # fmt: skip
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
    _add_render_flags(p)
    # `bench start`: when the models were loaded and the first and last frames written, as JSON lines
    p.add_argument("--timeline", help=argparse.SUPPRESS)


def _add_batch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", help="render many stories, models loaded once; several GPUs and hosts with torchrun",
        description="Render every story of STORIES to OUT/<id>.mp4 with its story map; OUT/manifest.jsonl lists "
        "them as they end. A rerun skips finished stories. Several GPUs or hosts: torchrun --nproc-per-node N "
        "-m iamflow_core batch ... (the README's 'Batch and benchmark').",
    )  # fmt: skip
    p.add_argument(
        "stories", help='NarraStream .jsonl (one {"prompts": [...]} per line, optional "id"), a .json or .txt '
        "story, or a folder of story files",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output folder: <id>.mp4, <id>.story.json/.png, manifest.jsonl")
    p.add_argument(
        "--gpus-per-rank", type=int, choices=[1, 2], default=1,
        help="GPUs of each process (rank): 1, or 2 for the two-GPU layout (DiT on the first, VAE on the second)",
    )  # fmt: skip
    _add_render_flags(p)


def _add_render_flags(p: argparse.ArgumentParser) -> None:
    """The flags `generate` and `batch` share: the preset, the model files and devices, generation and memory."""
    p.add_argument("--preset", choices=["tiny"], help="tiny: random-weight models on CPU, a smoke test (noise)")
    _add_model_flags(p)
    _add_generation_flags(p)
    _add_memory_flags(p)
    p.add_argument("-v", "--verbose", action="store_true")


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
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
    gen.add_argument(
        "--image", metavar="PATH",
        help="start image: the video's first frame, which the story continues (image-to-video); scaled to cover "
        "the video size and cropped to its centre",
    )  # fmt: skip


def _add_memory_flags(p: argparse.ArgumentParser) -> None:
    mem = p.add_argument_group("memory and identity (IAMFlow = identity memory + soft transition + verifier)")
    _, mode = option_spec(MemorySettings, "mode")
    mem.add_argument(
        "--memory", choices=MODES, default="identity", help=f"{mode.help} Picks the preset of that method."
    )
    for name in runs.MEMORY_FLAGS:
        preset_text = "soft for identity, recache otherwise" if name == "transition" else None
        _add_option(mem, MemorySettings, name, preset_text)
    mem.add_argument(
        "--registry",
        help="entity registry to use as given (skips the LLM): a .json for one story, or a .jsonl with one registry "
        "per line in story order ({} for a story without entities)",
    )
    mem.add_argument(
        "--reference", action="append", metavar="ENTITY=IMAGE",
        help="a reference picture of an entity (its id, name or alias in the registry), e.g. Rosa=rosa.png; "
        "repeatable; kept as a pinned memory frame (needs --registry or --llm; or put \"images\" in the registry)",
    )  # fmt: skip
    mem.add_argument("--llm", help="LLM folder for entity extraction (Qwen3-4B-Instruct-2507)")
    mem.add_argument("--llm-device", help="device of the LLM (default: --device; it is unloaded before sampling)")
    mem.add_argument("--vlm", help="VLM folder for frame verification (Qwen3-VL-2B-Instruct)")
    mem.add_argument("--vlm-device", help="device of the VLM (default: --vae-device)")


def _targets(args: argparse.Namespace, stories: list[Story], size: SamplerConfig) -> list[Path]:
    """One video path per story, never over an existing file (unless --overwrite), each checked writable."""
    out = Path(args.out).expanduser()
    targets = []
    for i, story in enumerate(stories):
        wanted = out if len(stories) == 1 else out.with_name(f"{out.stem}_{i:03d}{out.suffix}")
        target = free_output_path(wanted, overwrite=args.overwrite)
        if target != wanted:
            print(f"{wanted} exists; writing {target} instead (--overwrite replaces it)", file=sys.stderr)
        frames = plan_chunks(story, chunk_frames=model_preset(args.preset_model).chunk_frames).num_video_frames
        check_output(target, frames, size.width, size.height)
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


# The chunk by which every compiled kernel of a story exists (chunk 0 runs eager, chunk 1 compiles or loads them; a
# few more for the rolling window's layouts).
_KERNELS_READY_BY = 4


def _render(
    pipe: StreamingPipeline, story: Story, config: SamplerConfig, memory, out: Path, on_stop=None, on_chunk=None,
    start_image=None,
) -> RenderResult:  # fmt: skip
    """Render one story to `out` with a progress bar (redrawn once per chunk); on_chunk(index) once each chunk's
    frames are out."""
    from tqdm import tqdm

    plan = plan_chunks(story, chunk_frames=config.cache.chunk_frames)
    for note in plan.rounding_notes():
        print(f"note: {note}", file=sys.stderr)
    print(f"{out}: {plan.summary()}", file=sys.stderr)
    if start_image is not None:
        print(
            f"{out}: the start image is frame 1; the story's {plan.num_video_frames} frames follow it", file=sys.stderr
        )
    with tqdm(total=plan.num_chunks, unit="chunk", file=sys.stderr) as bar:

        def progress(event, record) -> None:
            if on_chunk is not None:
                on_chunk(record.index)
            if record.index == _KERNELS_READY_BY:  # this process renders one story: its kernels are all in place
                fused.release_compile_workers()
            bar.set_postfix(prompt=f"{record.segment + 1}/{record.num_segments}", refresh=False)
            bar.update(1)

        return render_story(
            pipe, story, config, memory, out_path=out, on_chunk=progress, on_stop=on_stop, keep_frames=False,
            keep_latents=False, start_image=start_image,
        )  # fmt: skip


def _with_references(args: argparse.Namespace, registries: list, settings: MemorySettings) -> list:
    """The registries with the pictures of `--reference ENTITY=IMAGE` added (one story only)."""
    if not args.reference:
        return registries
    if settings.mode != "identity":
        raise ValueError(f"--reference needs identity memory, not --memory {settings.mode}; use --memory identity")
    if len(registries) != 1:
        raise ValueError(
            f'--reference adds pictures to one story, the story file holds {len(registries)}; put "images" in '
            "each story's line of the --registry .jsonl instead"
        )
    if registries[0] is None:
        raise ValueError("--reference needs the story's entities; give --registry FILE or --llm DIR")
    from .images import load_image

    registry = registries[0]
    for item in args.reference:
        key, sep, path = (part.strip() for part in item.partition("="))
        if not sep or not key or not path:
            raise ValueError(f"--reference {item!r} is not ENTITY=IMAGE; write e.g. --reference Rosa=rosa.png")
        registry.find(key)  # an unknown entity fails before its picture is read
        registry = registry.with_reference(key, load_image(path, f"--reference picture of {key}"), Path(path).name)
    return [registry]


def _start_image(args: argparse.Namespace):
    if not args.image:
        return None
    from .images import load_image

    return load_image(args.image, "--image start image")


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

    def chunk(self, index: int) -> None:
        """A chunk's frames are out: the first one is the first frame; the next few show what compiling costs."""
        if index == 0:
            self.mark("first_frame")
        elif index < 4:
            self.mark(f"chunk_{index}")


def generate(args: argparse.Namespace) -> int:
    if args.preset == "tiny":
        print(runs.SMOKE_TEST, file=sys.stderr)
    runs.check_devices(args)
    settings = runs.memory_settings(args)  # a bad flag fails before anything loads
    size = runs.video_size(args)
    stories = _stories(args)
    targets = _targets(args, stories, size)
    # Entities first: a bad registry fails before any model loads, and the LLM is gone before the DiT comes.
    t0 = time.perf_counter()
    registries = runs.registries(args, stories, settings)
    extracted = runs.extraction_line(args, settings, stories, registries, time.perf_counter() - t0)
    if extracted:  # the wait before the models load, said
        print(extracted, file=sys.stderr)
    registries = _with_references(args, registries, settings)
    start_image = _start_image(args)
    dit, text_encoder, vae = runs.build_models(args)
    timeline = _Timeline(args.timeline)
    timeline.mark("models_loaded")
    print(runs.dit_line(dit), file=sys.stderr)
    preset = model_preset(args.preset_model)
    print(f"model preset {preset.name}: {preset.summary}", file=sys.stderr)
    config = sampler_config(settings, size.height, size.width, preset)
    pipe = StreamingPipeline(dit, text_encoder, vae, overlap_decode=False if args.no_overlap else None,
                             clean_pass_device=args.clean_pass_device)  # fmt: skip
    verifier = runs.make_verifier(args, settings)
    stops: list[tuple[Path, RenderResult]] = []
    try:
        for story, registry, target in zip(stories, registries, targets):
            memory = build_memory(settings, registry, verifier)
            on_stop = runs.on_stop(target, story, registry, stops, runs.Say(out=_print_out, err=_print_err))
            result = _render(
                pipe, story, config, memory, target, on_stop, on_chunk=timeline.chunk, start_image=start_image,
            )  # fmt: skip
            timeline.mark("last_frame")
            wall = result.timings["wall"]
            fps = result.frames_written / wall if wall else 0.0
            print(f"{target}: {result.frames_written} frames in {wall:.1f} s ({fps:.1f} video FPS)")
            _print_out(runs.write_story_map(target, story, registry, result))
            timeline.mark("story_map_written")
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


def _print_out(line: str) -> None:
    print(line, flush=True)  # a line at a time: progress read live, also through a pipe


def _print_err(line: str) -> None:
    print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iamflow_core", description="IAMFlow streaming long video")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_batch(sub)
    bench = sub.add_parser("bench", help="benchmarks (full-size models, random weights)")
    bench.add_argument(
        "which",
        choices=["speed", "start", "batch", "dit", "vae", "agents", "pacing"],
        help="speed: the whole pipeline; start: what a user waits for; batch: the batch renderer on 1 and N GPUs "
        "and the eval; dit: one chunk; vae: one chunk's decode; agents: LLM/VLM; pacing: which verifier jobs pay "
        "off at a given pace (CPU)",
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    from .evaluate import cli as evaluate

    evaluate.add_arguments(sub.add_parser("eval", help="NarraStream-Bench scores", description=evaluate.DESCRIPTION))
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    if not verbose:  # third-party progress bars (transformers' "Loading weights") only with -v
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is first imported
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    if args.command == "bench":
        import importlib

        module = {"dit": "dit_chunk", "vae": "vae_decode"}.get(args.which, args.which)
        bench = importlib.import_module(f"iamflow_core.bench.{module}")
        for line in bench.main(args.rest):
            _print_out(line)
        return 0
    if args.command == "eval":
        try:
            for line in evaluate.run(args):
                _print_out(line)
        except (ValueError, OSError) as e:  # evaluate.EvalError is a ValueError
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    from .weights import CheckpointError, MissingModelFiles

    try:
        with stop_on_signals():
            if args.command == "batch":
                from .batch import run as batch

                return batch(args, runs.Say(out=_print_out, err=_print_err))
            return generate(args)
    except (StoryError, RegistryError, CheckpointError, MissingModelFiles, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP before any render began
        print(f"stopped by {stop_name(stop)} before rendering; every finished chunk was kept", file=sys.stderr)
        return exit_code(stop)


if __name__ == "__main__":
    sys.exit(main())
