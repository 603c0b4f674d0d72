"""What `generate` and `batch` build from their command-line flags: the models, the memory settings, each story's
entities, the verifier; and the story map written beside each video. Errors about the user's inputs are raised as
the library's own exceptions (the commands print them as one `error:` line).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DTYPES, SamplerConfig, option_spec
from .devices import resolve_device
from .render import RenderResult, story_map
from .settings import PRESETS, MemorySettings, build_verifier
from .story import Story
from .story.entities import EntityRegistry, load_registries

logger = logging.getLogger(__name__)

SMOKE_TEST = (
    "preset tiny: random-weight models on the CPU, so the frames are noise (a smoke test of the pipeline). "
    "With real files: python -m iamflow_core generate STORY --models DIR (the README's 'Model files' says which "
    "files and where to get them)"
)


# MemorySettings options with a flag of their own (`mode` is --memory, which also picks the preset).
MEMORY_FLAGS = (
    "transition", "max_frames", "min_frames_multi_entity", "bank_size", "record_interval", "sparse_topk",
    "visual_weight", "reference_weight", "archive_limit_mb", "verifier_wait", "async_verifier",
)  # fmt: skip


def default_devices() -> tuple[str, str]:
    if not torch.cuda.is_available():
        return "cpu", "cpu"
    return "cuda:0", "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"


def memory_settings(args: argparse.Namespace) -> MemorySettings:
    """The preset of `--memory`, with every memory flag the user gave."""
    given = {name: getattr(args, name) for name in MEMORY_FLAGS if getattr(args, name) is not None}
    given = {name: option_spec(MemorySettings, name)[1].value_of(value) for name, value in given.items()}
    return dataclasses.replace(PRESETS[args.memory], **given)


def build_models(args: argparse.Namespace):
    """The models and the sampler's base config (video size)."""
    if str(args.device).startswith("cuda:"):  # the DiT's GPU becomes the current one, also for code that assumes it
        torch.cuda.set_device(torch.device(args.device))
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


def dit_line(dit) -> str:
    """What the DiT runs as, said once it has loaded: its file's layout, device and dtype, its FP8 linears and its
    attention (FP8 attention is `auto`'s choice for a DiT with FP8 linears, and changes the frames by ~0.3-0.6 %)."""
    from .models.fp8 import fp8_linears

    info = getattr(dit, "load_info", None)
    layout = f"{info.layout}, " if info is not None else ""
    dtype = str(next(dit.parameters()).dtype).removeprefix("torch.")
    fp8 = fp8_linears(dit)
    linears = f", {fp8} FP8 linears" if fp8 else ""
    blocks = f"{dit.cfg.num_layers} blocks on {dit.device}, {dtype}"
    return f"DiT: {layout}{blocks}{linears}; attention {dit.attention_backend}"


def video_size(args: argparse.Namespace) -> SamplerConfig:
    """The video size: the flags, else the preset's (the tiny preset is 96x64); validated before anything loads."""
    if args.preset == "tiny":
        from .presets import TINY_SAMPLER as base
    else:
        base = SamplerConfig()
    height, width = (
        default if v is None else v for v, default in ((args.height, base.height), (args.width, base.width))
    )
    return SamplerConfig(height=height, width=width)


def registries(args: argparse.Namespace, stories: list[Story], settings: MemorySettings) -> list:
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


def extraction_line(
    args: argparse.Namespace, settings: MemorySettings, stories: list[Story], registries: list, seconds: float
) -> str | None:
    """What the LLM found and how long it took (the wait before the models load), or None when it did not run."""
    if not args.llm or args.registry or settings.mode != "identity":
        return None
    found = sum(len(r.entities) for r in registries if isinstance(r, EntityRegistry))
    prompts = sum(len(s.prompts) for s in stories)
    where = f" of {len(stories)} stories" if len(stories) > 1 else ""
    return f"entities: {found} found by the LLM in {prompts} prompts{where} ({seconds:.1f} s)"


def make_verifier(args: argparse.Namespace, settings: MemorySettings):
    if not args.vlm or settings.mode != "identity":
        return None
    from .story.vlm import FrameVerifier

    return build_verifier(settings, FrameVerifier(args.vlm, device=args.vlm_device or args.vae_device))


@dataclass(frozen=True)
class Say:
    """Where a command's lines go (the CLI prints them): `out` the results and progress, `err` the notices, stops
    and failures."""

    out: Callable[[str], None]
    err: Callable[[str], None]


def write_story_map(target: Path, story: Story, registry: EntityRegistry | None, result: RenderResult) -> str:
    """The story map next to the video: `video.story.json` and its picture `video.story.png`; the line that says
    where they are."""
    from .pictures import story_map_picture

    data = story_map(story, registry, result)
    target.with_suffix(".story.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    story_map_picture(data).save(target.with_suffix(".story.png"))
    return f"{target.with_suffix('.story.json')}: story map; picture: {target.with_suffix('.story.png')}"


def on_stop(target: Path, story: Story, registry: EntityRegistry | None, stops: list, say: Say):
    """What the CLI does when a render stops early (a signal, Ctrl-C, a failed write): the story map of what was
    made; the render is remembered in `stops` for the line that says where the frames are."""

    def stopped(result: RenderResult, stop: BaseException) -> None:
        stops.append((target, result))
        try:
            say.out(write_story_map(target, story, registry, result))
        except OSError as e:  # a full disk may refuse the map too; the frames are still where the message says
            say.err(f"could not write the story map beside {target}: {e}")

    return stopped


def check_devices(args: argparse.Namespace) -> None:
    """Every device flag names a device this machine has (one message listing those it has); --clean-pass-device
    becomes the GPU it names, or None for the DiT's own."""
    for flag in ("device", "vae_device", "text_device", "llm_device", "vlm_device"):
        if getattr(args, flag) is not None:
            setattr(args, flag, str(resolve_device(getattr(args, flag))))
    if hasattr(args, "clean_pass_device"):
        args.clean_pass_device = clean_pass_device(args.clean_pass_device, args.device, args.vae_device)


def clean_pass_device(want: str | None, device: str, vae_device: str) -> str | None:
    """The GPU the clean passes run on for --clean-pass-device `want`: none (None: the DiT's GPU), vae (the VAE's
    GPU) or a GPU's name. Raises ValueError naming the fix when that is not a second GPU."""
    if want in (None, "none"):
        return None
    target = vae_device if want == "vae" else str(resolve_device(want))
    if device.startswith("cuda") and target.startswith("cuda") and torch.device(target) != torch.device(device):
        return target
    where = f"the DiT is on {device}" + (f" and the VAE on {vae_device}" if want == "vae" else f", it names {target}")
    raise ValueError(
        f"--clean-pass-device {want}: the clean pass moves to a second GPU, but {where}; give the VAE or the clean "
        "pass a GPU of its own (--vae-device cuda:1 --clean-pass-device vae), or leave it out"
    )
