"""The Streaming Sampler (story in, video out, chunk by chunk, previewed as it goes; the finished mp4 plays on the
node) and the streaming VAE decode."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import folder_paths
import numpy as np
import torch
from comfy_api.latest import InputImpl, io, ui

from iamflow_core.config import VIDEO_FPS
from iamflow_core.model_presets import DEFAULT_MODEL_PRESET, MODEL_PRESETS

from .common import CATEGORY, option_input, show_status
from .values import DIT, MEMORY, STATE, STORY, TEXT_ENCODER, VAE, StateValue

logger = logging.getLogger(__name__)

PREVIEW_SIZE = 512
PREVIEW_EVERY_S = 1.0  # the shortest time between two chunk clips on the node
# The frontend shows whichever of a node's videos finishes loading last, so a chunk clip sent just before the
# finished video can end up shown in its place. No clip goes out when the video is due sooner than this, and the
# video waits until this long after the last clip went out.
PREVIEW_LEAD_S = 2.0


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


def _send_output(unique_id: str | None, output: dict) -> None:
    """Show `output` (a node's ui dict) on the node now, in the middle of its run, as ComfyUI's "executed" message
    does at its end. The live preview goes this way, not as a progress-bar preview: the frontend keeps showing the
    last progress preview in place of a node's output, which would hide the finished video."""
    try:
        from server import PromptServer
    except ImportError:  # no ComfyUI server (scripts)
        return
    server = getattr(PromptServer, "instance", None)
    if unique_id is None or server is None:
        return
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    message = {"node": unique_id, "display_node": unique_id, "output": output,
               "prompt_id": context.prompt_id if context is not None else None}  # fmt: skip
    server.send_sync("executed", message, server.client_id)


def _save_preview(frames: np.ndarray, unique_id: str | None, index: int) -> dict:
    """The newest chunk as a short mp4 (long side at most PREVIEW_SIZE) in ComfyUI's temp folder: its ui entry. A
    clip rather than a still keeps the node a video node, so the finished video takes its place at the end."""
    from PIL import Image

    from iamflow_core.config import VIDEO_FPS
    from iamflow_core.video import VideoWriter

    height, width = frames.shape[1:3]
    scale = min(1.0, PREVIEW_SIZE / max(height, width))
    size = (max(2, round(width * scale) // 2 * 2), max(2, round(height * scale) // 2 * 2))
    small = np.stack([np.asarray(Image.fromarray(f).resize(size)) for f in frames]) if scale < 1 else frames
    name = f"iamflow_preview_{unique_id}_{index:05d}.mp4"
    with VideoWriter(Path(folder_paths.get_temp_directory()) / name, fps=VIDEO_FPS, preset="ultrafast",
                     fragmented=False) as writer:  # fmt: skip
        writer.write(small)
    return {"images": [{"filename": name, "subfolder": "", "type": "temp"}], "animated": (True,)}


class _ChunkMonitor:
    """Per chunk: the progress bar, the newest frame on the node, a two-line status, and ComfyUI's Cancel -> stop
    after the chunk in progress (`cancel`), remembering that the user asked (`interrupted`)."""

    def __init__(self, unique_id: str | None, num_chunks: int, out_path: Path | None) -> None:
        import comfy.utils

        self.unique_id, self.out_path = unique_id, out_path
        self.cancel = threading.Event()
        self.interrupted = False
        self.entities: list[int] | None = None
        self.pbar = comfy.utils.ProgressBar(num_chunks)
        # The chunk clips are encoded off the sampling thread, newest last.
        self.previews = ThreadPoolExecutor(1, thread_name_prefix="iamflow-preview")
        self.shown = -PREVIEW_EVERY_S  # when the last chunk clip was queued
        self.sent: float | None = None  # when the last chunk clip reached the frontend
        self.chunk_at = time.monotonic()  # when the last chunk ended

    def close(self) -> None:
        """Every chunk clip is out, and the browser had time to load the last one before the video replaces it."""
        self.previews.shutdown(wait=True)
        if self.sent is not None:
            time.sleep(max(0.0, self.sent + PREVIEW_LEAD_S - time.monotonic()))

    def _preview(self, frames: np.ndarray, index: int) -> None:
        try:
            _send_output(self.unique_id, _save_preview(frames, self.unique_id, index))
            self.sent = time.monotonic()
        except OSError as e:  # a preview is a convenience: never stop the render for it
            logger.warning("could not show chunk %d on the node: %s", index + 1, e)

    def __call__(self, event, record) -> None:
        import comfy.model_management as mm

        if mm.processing_interrupted():
            self._stop()
        now = time.monotonic()
        chunk_s, self.chunk_at = now - self.chunk_at, now
        # At most one clip a second, and none when the finished video is due within PREVIEW_LEAD_S at this pace.
        video_in_s = (record.num_chunks - record.index - 1) * chunk_s
        if event.frames is not None and now - self.shown >= PREVIEW_EVERY_S and video_in_s > PREVIEW_LEAD_S:
            self.shown = now
            self.previews.submit(self._preview, event.frames, record.index)
        try:
            self.pbar.update_absolute(record.index + 1, record.num_chunks)
        except mm.InterruptProcessingException:  # the progress hook raises on Cancel; we stop after this chunk
            self._stop()
        self.entities = _entities_in(record.memory) or self.entities
        in_memory = ", ".join(f"#{e}" for e in self.entities) if self.entities else "none"
        where = f"{record.frames_done} frames → {self.out_path.name}" if self.out_path else None
        show_status(
            self.unique_id,
            f"chunk {record.index + 1}/{record.num_chunks} · prompt {record.segment + 1}/{record.num_segments} · "
            f"memory: {in_memory}",
            where,
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
        where = f"{result.frames_written} frames kept in {self.out_path.name}" if self.out_path else None
        show_status(self.unique_id, f"cancelled after {len(result.chunks)} of {result.plan.num_chunks} chunks", where)
        logger.warning("cancelled after %d chunks; %s", len(result.chunks), self.out_path or "no video written")
        mm.throw_exception_if_processing_interrupted()  # clears ComfyUI's flag if our progress bar did not
        raise mm.InterruptProcessingException()


def _verifier_for_run(settings, memory):
    """A fresh verifier per run (the async one owns a worker thread), or None; as a context manager."""
    from iamflow_core.settings import build_verifier

    verifier = build_verifier(settings, memory.verifier if memory is not None else None)
    return verifier if verifier is not None else nullcontext()


def _output_path(prefix: str, width: int, height: int) -> tuple[Path, str]:
    """A new mp4 path in ComfyUI's output folder, and its subfolder there."""
    out_dir = folder_paths.get_output_directory()
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, out_dir, width, height)
    return Path(folder) / f"{name}_{counter:05}_.mp4", subfolder


class StreamingSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from iamflow_core.config import SamplerConfig

        return io.Schema(
            node_id="IAMFlowStreamingSampler",
            display_name="Streaming Sampler",
            category=CATEGORY,
            description="Generates the story's video chunk by chunk with the streaming DiT and the chosen memory; "
            "each chunk is previewed as soon as it exists and written to an mp4 in the output folder, which plays on "
            "the node when it is done. Cancel stops after the current chunk and keeps the video made so far.",
            inputs=[
                DIT.Input("dit", tooltip="The streaming DiT (Load Wan DiT)."),
                TEXT_ENCODER.Input("text_encoder", tooltip="umT5 (Load umT5 Text Encoder)."),
                STORY.Input("story", tooltip="The story (Story, or Entity Extractor for identity memory)."),
                option_input(SamplerConfig, "width"),
                option_input(SamplerConfig, "height"),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip="Noise seed of the whole video (it replaces a seed given in story JSON).",
                ),
                io.String.Input(
                    "filename_prefix", default="IAMFlow/story",
                    tooltip="The mp4 written chunk by chunk goes to ComfyUI's output folder under this prefix; it is "
                    "kept if you cancel.",
                ),
                io.Combo.Input(
                    "model_preset", options=list(MODEL_PRESETS), default=DEFAULT_MODEL_PRESET, optional=True,
                    tooltip="Which streaming checkpoint the DiT is: its frames per chunk, attention window, sink and "
                    "steps. longlive also fits MemFlow and IAMFlow; causal-forcing-frame-* make one latent frame "
                    "per chunk. The README's 'Model files' says where each file comes from. Optional, so prompts "
                    "saved before it existed still run (as longlive).",
                ),
                MEMORY.Input(
                    "memory", optional=True,
                    tooltip="Memory settings (Identity Memory). Not connected: no memory, KV recache at prompt "
                    "switches (LongLive).",
                ),
                VAE.Input(
                    "vae", optional=True,
                    tooltip="Wan VAE: decodes each chunk while the next one is sampled (on its own device). Not "
                    "connected: only LATENT comes out (decode it with Streaming VAE Decode).",
                ),
                io.Image.Input(
                    "start_image", optional=True,
                    tooltip="Image-to-video: the video's first frame, which the story continues (scaled to cover "
                    "width x height and cropped to its centre). Needs the VAE.",
                ),
                io.Combo.Input(
                    "clean_pass", options=list(CLEAN_PASS), default="dit_gpu", optional=True,
                    tooltip="Where each chunk's clean pass (the DiT forward that writes the chunk into its memory of "
                    "the video) runs. vae_gpu: on the VAE's GPU, one layer behind the DiT's next chunk, with a copy "
                    "of the DiT and of that memory there (about 9.5 GiB more on that GPU); faster on two GPUs linked "
                    "to each other (the README's 'Two GPUs'). dit_gpu: on the DiT's GPU.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="Every frame, [N, H, W, 3] (one black frame without "
                                "a VAE)."),
                io.Latent.Output(display_name="latent", tooltip="Wan2.1 latents [1, 16, F, H/8, W/8]."),
                STATE.Output(display_name="state", tooltip="Registry and per-chunk story map, for Inspect Memory."),
                io.Video.Output(display_name="video", tooltip="The mp4 it wrote (for Save Video and other video "
                                "nodes); none without a VAE."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )  # fmt: skip

    @classmethod
    def execute(
        cls, dit, text_encoder, story, width, height, seed, filename_prefix, memory=None, vae=None, start_image=None,
        model_preset=DEFAULT_MODEL_PRESET, clean_pass="dit_gpu",
    ):  # fmt: skip
        from iamflow_core.settings import LONGLIVE

        settings = memory.settings if memory is not None else LONGLIVE
        start = _pictures(start_image, vae, story, settings)
        run_story = replace(story.story, seed=seed)
        out_path, subfolder = _output_path(filename_prefix, width, height) if vae is not None else (None, "")
        config = _config(settings, height, width, model_preset)
        second, warning = _clean_pass_device(clean_pass, dit, vae)
        result = _render(cls.hidden.unique_id, (dit, text_encoder, vae), run_story, settings, story, memory,
                         config, out_path, start, second)  # fmt: skip
        state = StateValue(story.story, story.registry, replace(result, frames=None, latents=None))
        outputs = (to_image(result.frames, height, width), to_comfy_latent(result.latents), state)
        if out_path is None:
            return io.NodeOutput(*outputs, None)
        seconds = result.frames_written / VIDEO_FPS
        done = f"{result.frames_written} frames · {seconds:.1f} s → {out_path.name}"
        show_status(cls.hidden.unique_id, done, warning)
        video = ui.PreviewVideo([ui.SavedResult(out_path.name, subfolder, io.FolderType.output)])
        return io.NodeOutput(*outputs, InputImpl.VideoFromFile(str(out_path)), ui=video)


def _pictures(image, vae, story, settings):
    """The start picture as uint8 RGB, or None. A clear error for pictures this run could not use: entity pictures
    without identity memory, a start image without the VAE, a batch of start images."""
    from iamflow_core.images import as_rgb

    registry = story.registry
    if registry is not None and registry.references and settings.mode != "identity":
        names = ", ".join(sorted({registry.entity(r.entity).name for r in registry.references}))
        raise ValueError(
            f"the story has reference pictures of {names} (Entity Reference), which only identity memory uses; "
            f"connect an Identity Memory node with mode identity (the memory is {settings.mode})"
        )
    if image is None:
        return None
    if vae is None:
        raise ValueError("start_image needs the VAE to encode it; connect the vae input (Load Wan VAE)")
    if image.ndim == 4 and image.shape[0] > 1:
        raise ValueError(f"start_image is a batch of {image.shape[0]} pictures; give one (e.g. ImageFromBatch)")
    return as_rgb(image, "start_image")


# The sampler's clean_pass choices: where each chunk's clean pass runs (`StreamingPipeline(clean_pass_device=...)`).
CLEAN_PASS = ("dit_gpu", "vae_gpu")


def _clean_pass_device(choice: str, dit, vae) -> tuple[str | None, str | None]:
    """The clean pass's GPU for the clean_pass widget (None: the DiT's) and a short warning when vae_gpu could not be
    had: a workflow saved on two GPUs still runs on one, as the device widgets fall back (logged in full here)."""
    if choice not in CLEAN_PASS:
        raise ValueError(f"clean_pass {choice!r} is not one of {', '.join(CLEAN_PASS)}; pick one on the sampler")
    if choice == "dit_gpu":
        return None, None
    if vae is None:
        why = "no VAE connected"
    elif vae.device == dit.device:
        why = f"VAE on {vae.device} with the DiT"
    elif dit.device.type != "cuda" or vae.device.type != "cuda":
        why = f"VAE on {vae.device}, DiT on {dit.device}"
    else:
        return str(vae.device), None
    logger.warning("clean_pass vae_gpu: %s, so the clean pass runs on the DiT's GPU (load the VAE onto a second GPU "
                   "to move it there)", why)  # fmt: skip
    return None, f"clean pass on the DiT's GPU: {why}"


def _config(settings, height: int, width: int, preset: str):
    """The sampler config: the memory settings, the video size and the checkpoint's preset (a clear error for a
    preset name this pack does not have, e.g. from a newer workflow)."""
    from iamflow_core.model_presets import model_preset
    from iamflow_core.settings import sampler_config

    return sampler_config(settings, height, width, model_preset(preset))


def _render(unique_id, models, run_story, settings, story, memory, config, out_path, start_image=None, second=None):
    """The library's render with ComfyUI's progress, previews and Cancel; raises ComfyUI's interrupt on Cancel."""
    from iamflow_core.pipeline import StreamingPipeline
    from iamflow_core.weights import check_compatible

    check_compatible(*models)  # the three loaders are separate nodes: files that do not fit fail here, named
    from iamflow_core.render import render_story
    from iamflow_core.settings import build_memory
    from iamflow_core.story import plan_chunks

    monitor = _ChunkMonitor(unique_id, plan_chunks(run_story, config.cache.chunk_frames).num_chunks, out_path)
    try:
        with _verifier_for_run(settings, memory) as verifier:
            result = render_story(
                StreamingPipeline(*models, clean_pass_device=second), run_story, config,
                build_memory(settings, story.registry, verifier), out_path=out_path, on_chunk=monitor,
                cancel=monitor.cancel, spool_dir=folder_paths.get_temp_directory(), start_image=start_image,
            )  # fmt: skip
    finally:
        monitor.close()  # every chunk's preview is out before the final video replaces it
    monitor.raise_if_cancelled(result)
    return result


class DecodeVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IAMFlowDecodeVAE",
            display_name="Streaming VAE Decode",
            category=CATEGORY,
            description="Decodes a Wan2.1 video LATENT with the streaming VAE, chunk by chunk (the frames of a full "
            "decode, a fraction of the memory).",
            inputs=[
                VAE.Input("vae", tooltip="The Wan VAE (Load Wan VAE)."),
                io.Latent.Input("latent", tooltip="Wan2.1 video latents, e.g. the Streaming Sampler's LATENT."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="Decoded frames [N, H, W, 3].")],
        )

    @classmethod
    def execute(cls, vae, latent) -> io.NodeOutput:
        import comfy.utils

        from iamflow_core.config import CacheConfig
        from iamflow_core.render import decode_latents

        latents = from_comfy_latent(latent)
        pbar = comfy.utils.ProgressBar(-(-latents.shape[2] // CacheConfig.chunk_frames))
        frames = decode_latents(vae, latents[:1], on_chunk=lambda _: pbar.update(1))
        return io.NodeOutput(to_image(frames, 0, 0))
