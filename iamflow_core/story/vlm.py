"""Frame verification with a local vision-language model (Qwen3-VL-2B-Instruct): the `verify.Scorer` of IAMFlow.

`FrameVerifier.score` shows the VLM a few decoded frames of a chunk with the prompt and the entities that should be
in it, and reads back one score per frame in [0, 1] (and, on request, corrected attributes per entity ID) as a
`verify.Verdict`. Any failure (unreadable answer, model error) gives a neutral verdict (0.5 per frame) and a
logged warning: the verifier can make memory selection better, never stop a run. `verify.AsyncVerifier` runs it
off the DiT's critical path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..verify import NEUTRAL, Verdict, check_frames
from .entities import Entity
from .greedy import Unsupported, fast_decoder
from .hf import chat_prompt, check_model_folder, end_tokens, free_model, greedy_config, resolve_dtype
from .jsonish import parse_json_answer

logger = logging.getLogger(__name__)

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

INSTRUCTION = """\
The {n} images are frames from one shot of a generated video. The shot should show:
"{prompt}"
{entities}
Score each frame from 0 to 1 for how well it shows this: the subjects clearly visible, each listed entity \
recognisable as itself, its appearance as described. 1 means clearly and correctly shown; 0 means missing or wrong.
{check}Reply with JSON only, one score per frame in order: {{"scores": [{example}], "corrections": {{}}}}"""

CHECK = """\
Also compare each entity's expected appearance with the frames:
{lines}
For an entity that looks different, put the attributes as the frames show them under its ID, e.g. \
"corrections": {{"{first_id}": ["grey hoodie", "short brown hair"]}}; leave "corrections" empty when all match.
"""


# ---------------------------------------------------------------------------------------------------------------------
# Prompt and answer
# ---------------------------------------------------------------------------------------------------------------------


def verifier_instruction(num_frames: int, prompt: str, entities: Sequence[Entity], check_attributes: bool) -> str:
    """The text after the images: the prompt, the entities, and the JSON to answer with."""
    if entities:
        listed = "; ".join(f"ID {e.id}: {e.name} ({e.kind})" for e in entities)
        entity_text = f"Entities that should be recognisable: {listed}."
    else:
        entity_text = "No entities are listed; judge the main subject."
    check = ""
    if check_attributes and entities:
        lines = "\n".join(
            f"  ID {e.id} {e.name}: {', '.join(e.attributes) or 'no attributes given'}" for e in entities
        )
        check = CHECK.format(lines=lines, first_id=entities[0].id)
    example = ", ".join(f"<frame {i + 1}>" for i in range(num_frames))
    return INSTRUCTION.format(n=num_frames, prompt=prompt, entities=entity_text, check=check, example=example)


def parse_verdict(text: str, num_frames: int, entity_ids: Sequence[int], check_attributes: bool = False) -> Verdict:
    """A `Verdict` from the VLM's answer: scores clamped to [0, 1] and padded with 0.5 (extra ones dropped),
    corrections kept only for listed entity IDs and only when asked for. An answer without a score list is neutral."""
    data = parse_json_answer(text, list_key="scores") if isinstance(text, str) else None
    raw = data.get("scores") if data is not None else None
    notes = []
    if data is None and isinstance(text, str):  # e.g. cut off inside the corrections: keep the complete score list
        raw, data = _salvage_scores(text), {}
        notes.append("answer cut off or malformed; scores only")
    if not isinstance(raw, list) or not raw:
        return Verdict.neutral(num_frames, f"no score list in the verifier answer {str(text)[:80]!r}")
    scores = [_score(v) for v in raw[:num_frames]]
    if len(raw) != num_frames:
        notes.append(f"{len(raw)} scores for {num_frames} frames")
    if any(s is None for s in scores):
        notes.append("non-numeric scores set to 0.5")
    scores = [NEUTRAL if s is None else s for s in scores] + [NEUTRAL] * (num_frames - len(scores))
    corrections = _corrections(data.get("corrections"), set(entity_ids)) if check_attributes else {}
    return Verdict(tuple(scores), corrections, note="; ".join(notes))


_SCORES = re.compile(r"""["']?scores["']?\s*:\s*\[([^\[\]]*)\]""")


def _salvage_scores(text: str) -> list[str] | None:
    found = _SCORES.search(text)
    return [v.strip() for v in found.group(1).split(",") if v.strip()] if found else None


def _score(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip().rstrip("%")) / (100 if value.strip().endswith("%") else 1)
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or value != value:  # NaN
        return None
    return min(1.0, max(0.0, float(value)))


def _corrections(raw: Any, known: set[int]) -> dict[int, tuple[str, ...]]:
    """Accepts {"3": ["a", "b"]}, {"3": {"corrected_attrs": [...]}} / {"attributes": [...]}, or {"3": "a, b"}."""
    if not isinstance(raw, dict):
        return {}
    out: dict[int, tuple[str, ...]] = {}
    for key, value in raw.items():
        entity_id = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        if isinstance(value, dict):
            value = value.get("attributes", value.get("corrected_attrs", value.get("attrs")))
        if isinstance(value, str):
            value = value.split(",")
        if entity_id not in known or not isinstance(value, list):
            continue
        attrs = tuple(" ".join(v.split()) for v in value if isinstance(v, str) and v.strip())
        if attrs:
            out[entity_id] = attrs[:12]
    return out


def resize_frames(frames: np.ndarray, short_side: int) -> list[Any]:
    """PIL images with the short side at `short_side` (aspect kept; the long side capped at 4x)."""
    from PIL import Image

    out = []
    for frame in frames:
        h, w = frame.shape[:2]
        scale = short_side / min(h, w)
        size = (min(round(w * scale), 4 * short_side), min(round(h * scale), 4 * short_side))
        out.append(Image.fromarray(frame).resize(size, Image.Resampling.BICUBIC))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The verifier
# ---------------------------------------------------------------------------------------------------------------------


class FrameVerifier:
    """Scores frames against a prompt and its entities with a local Qwen3-VL folder (transformers, no remote code)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        max_new_tokens: int = 160,
        short_side: int = 256,
    ) -> None:
        if max_new_tokens < 16 or short_side < 32:
            raise ValueError(f"max_new_tokens {max_new_tokens} (>= 16) or short_side {short_side} (>= 32) too small")
        self.model_dir = check_model_folder(model_dir, "frame-verifier VLM (e.g. Qwen3-VL-2B-Instruct)")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_new_tokens, self.short_side = max_new_tokens, short_side
        self._model = self._load_model()
        self._inputs = _load_inputs(self.model_dir, self._model.config)
        self._greedy = fast_decoder(self._model, self.device, self._inputs.tokenizer.pad_token_id, "verifier VLM")

    @property
    def graph_captures(self) -> int:
        """CUDA graphs its answer decoder has captured so far (0 when it decodes with transformers' `generate`)."""
        return self._greedy.captures if self._greedy is not None else 0

    def _load_model(self) -> Any:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(self.model_dir, dtype=self.dtype, local_files_only=True)
        logger.info("verifier VLM loaded from %s on %s (%s)", self.model_dir, self.device, self.dtype)
        return model.to(self.device).eval()

    def unload(self) -> None:
        self._greedy = None
        if self._model is not None:
            model, self._model = self._model, None
            free_model(model, self.device)

    def score(
        self, frames: np.ndarray, prompt: str, entities: Sequence[Entity], check_attributes: bool = False
    ) -> Verdict:
        """Per-frame scores for `frames` [n, H, W, 3] uint8; a neutral verdict (and a warning) on any model failure."""
        check_frames(frames)
        n, ids = frames.shape[0], [e.id for e in entities]
        try:
            answer = self.answer(frames, prompt, entities, check_attributes)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:  # model-side failures: OOM, shapes, processor
            logger.warning("verifier failed (%s: %s); neutral scores", type(e).__name__, e)
            return Verdict.neutral(n, f"verifier error: {type(e).__name__}: {e}")
        verdict = parse_verdict(answer, n, ids, check_attributes)
        if not verdict.ok:
            logger.warning("verifier answer unreadable; neutral scores (%s)", verdict.note)
        return verdict

    def token_budget(self, num_frames: int, entities: Sequence[Entity], check_attributes: bool) -> int:
        """`max_new_tokens`, raised when the answer needs more: about 6 tokens per score and 48 per corrected entity
        (a cut-off answer loses its corrections; greedy decoding stops at the end of the JSON anyway)."""
        need = 16 + 6 * num_frames + (48 * len(entities) if check_attributes else 0)
        return max(self.max_new_tokens, need)

    def request(
        self, frames: np.ndarray, prompt: str, entities: Sequence[Entity], check_attributes: bool
    ) -> tuple[dict[str, torch.Tensor], Any]:
        """The model inputs for these frames (on the model's device) and the greedy generation config."""
        images = resize_frames(frames, self.short_side)
        instruction = verifier_instruction(len(images), prompt, entities, check_attributes)
        text = chat_prompt(
            self._inputs.tokenizer, [{"role": "user", "content": IMAGE * len(images) + "\n" + instruction}]
        )
        batch = self._inputs.encode(text, images)
        batch = {
            k: v.to(self.device, self.dtype) if k == "pixel_values" else v.to(self.device) for k, v in batch.items()
        }
        config = greedy_config(self._model, self.token_budget(len(images), entities, check_attributes),
                               self._inputs.tokenizer.pad_token_id)  # fmt: skip
        return batch, config

    @torch.inference_mode()
    def answer(self, frames: np.ndarray, prompt: str, entities: Sequence[Entity], check_attributes: bool) -> str:
        """The VLM's raw answer text for these frames (greedy decoding)."""
        if self._model is None:
            raise RuntimeError("the verifier VLM was unloaded; create a new FrameVerifier")
        tokenizer, greedy = self._inputs.tokenizer, self._greedy
        if greedy is not None:
            try:
                with greedy.on_stream():  # the inputs go up on the decoder's stream, not behind the sampler's chunk
                    batch, config = self.request(frames, prompt, entities, check_attributes)
                    tokens = greedy.generate(batch, config.max_new_tokens, end_tokens(config, tokenizer))[0]
                return tokenizer.decode(tokens, skip_special_tokens=True)
            except Unsupported as e:  # found at the first answer: every later one goes through generate
                logger.warning("verifier: CUDA-graph decoding does not cover this model (%s); using generate", e)
                self._greedy = None
        batch, config = self.request(frames, prompt, entities, check_attributes)
        out = self._model.generate(**batch, generation_config=config)
        return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


class _Inputs:
    """Turns a chat text with image placeholders plus PIL images into model inputs.

    With the real `AutoProcessor` when it loads. It needs torchvision (for its video processor), which cannot be
    installed next to a CPU build of torch; then the PIL image processor is used and each `<|image_pad|>` is expanded
    to `grid_t * grid_h * grid_w / merge**2` copies here, as the processor would do (parity.md §2.2)."""

    def __init__(self, processor: Any, tokenizer: Any, image_processor: Any, image_token_id: int) -> None:
        self.processor, self.tokenizer, self.image_processor = processor, tokenizer, image_processor
        self.image_token_id = image_token_id

    def encode(self, text: str, images: list[Any]) -> dict[str, torch.Tensor]:
        if self.processor is not None:
            return dict(self.processor(text=[text], images=images, return_tensors="pt"))
        pixels = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size**2
        pieces = text.split("<|image_pad|>")
        if len(pieces) != len(images) + 1:
            raise ValueError(f"{len(pieces) - 1} image placeholders for {len(images)} images")
        counts = [int(g.prod()) // merge for g in pixels["image_grid_thw"]]
        expanded = pieces[0] + "".join("<|image_pad|>" * c + p for c, p in zip(counts, pieces[1:]))
        tokens = self.tokenizer([expanded], return_tensors="pt")
        mm_types = (tokens["input_ids"] == self.image_token_id).to(torch.int32)  # 1 = image token (M-RoPE layout)
        return {**tokens, "mm_token_type_ids": mm_types, **pixels}


def _load_inputs(folder: Path, config: Any) -> _Inputs:
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    image_token_id = config.image_token_id
    if is_torchvision_available():
        try:
            processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            return _Inputs(processor, processor.tokenizer, processor.image_processor, image_token_id)
        except ImportError as e:  # a torchvision that does not match torch
            logger.warning("AutoProcessor failed to load (%s); using the PIL image processor", str(e).strip()[:200])
    else:
        logger.info("torchvision is not installed; the VLM uses the PIL image processor")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return _Inputs(None, tokenizer, _pil_image_processor(folder, config.vision_config), image_token_id)


def _pil_image_processor(folder: Path, vision: Any) -> Any:
    """Qwen2-VL's PIL image processor with the folder's settings; patch and merge sizes come from the model config."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    sizes = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                 temporal_patch_size=vision.temporal_patch_size)  # fmt: skip
    if (folder / "preprocessor_config.json").is_file():
        return Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True, **sizes)
    return Qwen2VLImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3, **sizes)


# ---------------------------------------------------------------------------------------------------------------------
# Running it beside the DiT
# ---------------------------------------------------------------------------------------------------------------------
