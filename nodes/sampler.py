"""The Streaming Sampler (story in, video out, chunk by chunk, previewed as it goes) and the streaming VAE decode."""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import folder_paths
import numpy as np
import torch

from .common import CATEGORY, HIDDEN, option_widget, show_text, widget
from .values import DIT, MEMORY, STATE, STORY, TEXT_ENCODER, VAE, StateValue

logger = logging.getLogger(__name__)

PREVIEW_SIZE = 512


def to_comfy_latent(latents: torch.Tensor) -> dict:
    """Our normalized latents -> ComfyUI's Wan LATENT (the VAE's raw latent space, as core's Wan nodes use)."""
    from iamflow_core.config import WAN21_LATENT_MEAN, WAN21_LATENT_STD

    shape = (1, len(WAN21_LATENT_MEAN), 1, 1, 1)
    mean, std = torch.tensor(WAN21_LATENT_MEAN).view(shape), torch.tensor(WAN21_LATENT_STD).view(shape)
    return {"samples": latents * std + mean}


def from_comfy_latent(latent: dict) -> torch.Tensor:
    from iamflow_core.config import WAN21_LATENT_MEAN, WAN21_LATENT_STD

    samples = latent["samples"].float()
    if samples.ndim != 5 or samples.shape[1] != len(WAN21_LATENT_MEAN):
        raise ValueError(
            f"expected a Wan2.1 video LATENT [B, 16, F, h, w], got {tuple(samples.shape)}; connect the LATENT "
            "output of the Streaming Sampler (or another Wan2.1 video latent)"
        )
    shape = (1, len(WAN21_LATENT_MEAN), 1, 1, 1)
    return (samples - torch.tensor(WAN21_LATENT_MEAN).view(shape)) / torch.tensor(WAN21_LATENT_STD).view(shape)


def to_image(frames: np.ndarray | None, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> ComfyUI IMAGE float32 [T, H, W, 3] in [0, 1] (one black frame when there are none)."""
    if frames is None or frames.shape[0] == 0:
        return torch.zeros(1, height, width, 3)
    return torch.from_numpy(frames).float().div_(255.0)


def _entities_in(memory_info: dict) -> list[int] | None:
    retrieved = memory_info.get("retrieved")
    if not isinstance(retrieved, dict):
        return None
    return sorted({e for frame in retrieved.get("frames", []) for e in frame.get("entities", [])})


class _ChunkMonitor:
    """Per chunk: progress bar with the newest frame as preview, status text, and ComfyUI's Cancel -> stop after
    the chunk in progress (`cancel`), remembering that the user asked (`interrupted`)."""

    def __init__(self, unique_id: str | None, num_chunks: int, out_path: Path | None) -> None:
        import comfy.utils

        self.unique_id, self.out_path = unique_id, out_path
        self.cancel = threading.Event()
        self.interrupted = False
        self.entities: list[int] | None = None
        self.pbar = comfy.utils.ProgressBar(num_chunks)

    def __call__(self, event, record) -> None:
        import comfy.model_management as mm
        from PIL import Image

        if mm.processing_interrupted():
            self._stop()
        preview = None if event.frames is None else ("JPEG", Image.fromarray(event.frames[-1]), PREVIEW_SIZE)
        try:
            self.pbar.update_absolute(record.index + 1, record.num_chunks, preview)
        except mm.InterruptProcessingException:  # the progress hook raises on Cancel; we stop after this chunk
            self._stop()
        self.entities = _entities_in(record.memory) or self.entities
        in_memory = ", ".join(f"#{e}" for e in self.entities) if self.entities else "none"
        show_text(
            self.unique_id,
            f"chunk {record.index + 1}/{record.num_chunks} · prompt {record.segment + 1}/{record.num_segments} · "
            f"entities in memory: {in_memory}"
            + (f" · {record.frames_done} frames -> {self.out_path.name}" if self.out_path else ""),
        )

    def _stop(self) -> None:
        if not self.interrupted:
            logger.info("cancel requested: stopping after the chunk in progress")
        self.interrupted = True
        self.cancel.set()

    def raise_if_cancelled(self, result) -> None:
        """After a cancelled run: say where the kept video is, then end the prompt as ComfyUI's Cancel does."""
        import comfy.model_management as mm

        if not self.interrupted:
            return
        where = f"; the {result.frames_written} frames made so far are in {self.out_path}" if self.out_path else ""
        show_text(self.unique_id, f"cancelled after {len(result.chunks)} of {result.plan.num_chunks} chunks{where}")
        logger.warning("cancelled after %d chunks%s", len(result.chunks), where)
        mm.throw_exception_if_processing_interrupted()  # clears ComfyUI's flag if our progress bar did not
        raise mm.InterruptProcessingException()


def _verifier_for_run(settings, memory):
    """A fresh verifier per run (the async one owns a worker thread), or None; as a context manager."""
    from iamflow_core.settings import build_verifier

    verifier = build_verifier(settings, memory.verifier if memory is not None else None)
    return verifier if verifier is not None else nullcontext()


def _output_path(prefix: str, width: int, height: int) -> tuple[Path, dict]:
    """A new mp4 path in ComfyUI's output folder, and the UI entry that shows it on the node."""
    out_dir = folder_paths.get_output_directory()
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, out_dir, width, height)
    filename = f"{name}_{counter:05}_.mp4"
    ui = {"images": [{"filename": filename, "subfolder": subfolder, "type": "output"}], "animated": (True,)}
    return Path(folder) / filename, ui


class IAMFlowStreamingSampler:
    DESCRIPTION = (
        "Generates the story's video chunk by chunk with the streaming DiT and the chosen memory; each chunk is "
        "previewed as soon as it exists and written to an mp4 in the output folder. Cancel stops after the current "
        "chunk and keeps the video made so far."
    )

    @classmethod
    def INPUT_TYPES(cls):
        from iamflow_core.config import SamplerConfig

        return {
            "required": {
                "dit": widget(DIT, "The streaming DiT (Load Wan DiT)."),
                "text_encoder": widget(TEXT_ENCODER, "umT5 (Load Text Encoder)."),
                "story": widget(STORY, "The story (Story, or Entity Extractor for identity memory)."),
                "width": option_widget(SamplerConfig, "width"),
                "height": option_widget(SamplerConfig, "height"),
                "seed": widget(
                    "INT",
                    "Noise seed of the whole video (it replaces a seed given in story JSON).",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                ),
                "filename_prefix": widget(
                    "STRING",
                    "The mp4 written chunk by chunk goes to ComfyUI's output folder under this prefix; it is kept "
                    "if you cancel.",
                    default="IAMFlow/story",
                ),
            },
            "optional": {
                "memory": widget(
                    MEMORY,
                    "Memory settings (Identity Memory). Not connected: no memory, KV recache at prompt switches "
                    "(LongLive).",
                ),
                "vae": widget(
                    VAE,
                    "Wan VAE: decodes each chunk while the next one is sampled (on its own device). Not connected: "
                    "only LATENT comes out (decode it with Decode VAE).",
                ),
            },
            "hidden": HIDDEN,
        }

    RETURN_TYPES = ("IMAGE", "LATENT", STATE)
    RETURN_NAMES = ("images", "latent", "state")
    OUTPUT_TOOLTIPS = (
        "Every frame, [N, H, W, 3] (one black frame without a VAE).",
        "Wan2.1 latents [1, 16, F, H/8, W/8].",
        "Registry and per-chunk story map, for Inspect Memory.",
    )
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(self, dit, text_encoder, story, width, height, seed, filename_prefix, memory=None, vae=None,
               unique_id=None):  # fmt: skip
        from iamflow_core.pipeline import StreamingPipeline
        from iamflow_core.render import render_story
        from iamflow_core.settings import LONGLIVE, build_memory, sampler_config
        from iamflow_core.story import plan_chunks

        settings = memory.settings if memory is not None else LONGLIVE
        run_story = replace(story.story, seed=seed)
        out_path, ui = _output_path(filename_prefix, width, height) if vae is not None else (None, {})
        monitor = _ChunkMonitor(unique_id, plan_chunks(run_story).num_chunks, out_path)
        with _verifier_for_run(settings, memory) as verifier:
            result = render_story(
                StreamingPipeline(dit, text_encoder, vae), run_story, sampler_config(settings, height, width),
                build_memory(settings, story.registry, verifier), out_path=out_path, on_chunk=monitor,
                cancel=monitor.cancel, spool_dir=folder_paths.get_temp_directory(),
            )  # fmt: skip
        monitor.raise_if_cancelled(result)
        state = StateValue(story.story, story.registry, replace(result, frames=None, latents=None))
        images = to_image(result.frames, height, width)
        return {"ui": ui, "result": (images, to_comfy_latent(result.latents), state)}


class IAMFlowDecodeVAE:
    DESCRIPTION = (
        "Decodes a Wan2.1 video LATENT with the streaming VAE, chunk by chunk (the frames of a full decode, a "
        "fraction of the memory)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": widget(VAE, "The Wan VAE (Load Wan VAE)."),
                "latent": widget("LATENT", "Wan2.1 video latents, e.g. the Streaming Sampler's LATENT."),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("Decoded frames [N, H, W, 3].",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, vae, latent):
        import comfy.utils

        from iamflow_core.config import CacheConfig
        from iamflow_core.render import decode_latents

        latents = from_comfy_latent(latent)
        pbar = comfy.utils.ProgressBar(-(-latents.shape[2] // CacheConfig.chunk_frames))
        frames = decode_latents(vae, latents[:1], on_chunk=lambda _: pbar.update(1))
        return (to_image(frames, 0, 0),)
